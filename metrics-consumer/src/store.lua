-- Applies one batch's plan (plan.rs) atomically: compare, then write.
--
-- Redis runs a script to completion before any other command. The plan was
-- folded in Rust from values read earlier (offsets, row states, join inputs);
-- this script first compares every one of them with what Redis holds now. If
-- any differs (another consumer, or a re-delivery of the same batch, got
-- there first) it writes nothing and returns 0: the caller re-reads and
-- re-plans. If all match, the plan is exactly what an atomic read-fold-write
-- would produce, and its writes (row states, summed metric deltas, join
-- inputs, offsets, pipeline counters) land together. Write names are checked
-- before the first write, so a malformed plan never writes half.
--
-- No string parsing per event: per row one HMGET slot compared and one HSET
-- slot written, both in bulk.
--
-- ARGV[1] = C, the number of check values that follow (ARGV[2 .. 1+C]), then
-- the writes. Each operation is: name, key, n, then its values:
--   checks:  eq n fields then n expected values | absent n fields |
--            hlen (n = the expected field count, no values)
--   writes:  del (n = 0) | hset n field/value pairs | hdel n fields |
--            hincrby n field/amount pairs | incrby 1 amount | expireat 1 unix-seconds
-- Returns 1 when written, 0 on a conflict.

local last_check = 1 + tonumber(ARGV[1])
local nargs = #ARGV

local i = 2
while i <= last_check do
  local op, key, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local a = i + 3
  if op == 'eq' then
    local got = redis.call('HMGET', key, unpack(ARGV, a, a + n - 1))
    local e = a + n - 1
    for j = 1, n do
      if got[j] ~= ARGV[e + j] then return 0 end
    end
    i = a + 2 * n
  elseif op == 'absent' then
    local got = redis.call('HMGET', key, unpack(ARGV, a, a + n - 1))
    for j = 1, n do
      if got[j] then return 0 end
    end
    i = a + n
  elseif op == 'hlen' then
    if redis.call('HLEN', key) ~= n then return 0 end
    i = a
  else
    return redis.error_reply('unknown check ' .. tostring(op))
  end
end

local WIDTH = { del = 0, hset = 2, hdel = 1, hincrby = 2, incrby = 1, expireat = 1 }
local first_write = i
while i <= nargs do
  local w = WIDTH[ARGV[i]]
  if not w then return redis.error_reply('unknown write ' .. tostring(ARGV[i])) end
  i = i + 3 + w * tonumber(ARGV[i + 2])
end

i = first_write
while i <= nargs do
  local op, key, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local a = i + 3
  if op == 'hset' then
    redis.call('HSET', key, unpack(ARGV, a, a + 2 * n - 1))
  elseif op == 'hdel' then
    redis.call('HDEL', key, unpack(ARGV, a, a + n - 1))
  elseif op == 'hincrby' then
    for j = a, a + 2 * n - 1, 2 do
      redis.call('HINCRBY', key, ARGV[j], ARGV[j + 1])
    end
  elseif op == 'incrby' then
    redis.call('INCRBY', key, ARGV[a])
  elseif op == 'expireat' then
    redis.call('EXPIREAT', key, ARGV[a])
  elseif op == 'del' then
    redis.call('DEL', key)
  end
  i = a + WIDTH[op] * n
end
return 1
