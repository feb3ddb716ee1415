-- Applies one batch of decoded change events to the metrics, atomically.
--
-- Redis runs a script to completion before any other command, so the batch's
-- metric changes, row states and consumed Kafka offsets land together or not
-- at all (a kill -9 of the consumer never leaves half a batch). All reads and
-- arithmetic happen first; the writes come last and cannot fail on our own
-- keys, so an error never leaves a partial write either.
--
-- Exactly-once effect, two layers:
--   * per partition: a message whose offset is below the stored next offset
--     was applied already (a re-delivery after a crash or a rebalance): skip;
--   * per source row: the row's stored state (its LSN and its contributions)
--     is retracted and the new one added; an event with an older LSN, or the
--     same event again, is a re-send and changes nothing.
-- The rules mirror fold.rs (`fold` and `MemStore`).
--
-- ARGV: prefix, now_ms, ntp, <ntp topic/partition names>, then per message
-- 7 values: tp index (1-based), offset, kind (R row, T truncate, S skip,
-- B bad), table (<db>.<table>), id, state (fold::encode_state), source ts_ms.
-- Returns {applied, duplicates, bad, skipped}.

local P = ARGV[1]
local now_ms = tonumber(ARGV[2])
local ntp = tonumber(ARGV[3])
local STRIDE = 7
local base = 4 + ntp
local nargs = #ARGV
local US, RS, GS = '\31', '\30', '\29'

local function fmt(n) return string.format('%.0f', n) end

-- Stored next offsets per topic/partition.
local offkey = P .. 'offsets'
local tpname, nexto, changed_tp = {}, {}, {}
for i = 1, ntp do tpname[i] = ARGV[3 + i] end
local stored = redis.call('HMGET', offkey, unpack(tpname))
for i = 1, ntp do nexto[i] = tonumber(stored[i]) or -1 end

-- Pass 1: prefetch the row states of messages not applied yet.
local rows = {}      -- table -> id -> state string | false
local dirty = {}     -- table -> id -> true
local want = {}      -- table -> list of ids
local wantp, seenp = {}, {} -- product ids of join tokens (P, C) in new states
local sim = {}
for i = 1, ntp do sim[i] = nexto[i] end
for i = base, nargs, STRIDE do
  local tpi = tonumber(ARGV[i])
  local off = tonumber(ARGV[i + 1])
  if off >= sim[tpi] then
    sim[tpi] = off + 1
    if ARGV[i + 2] == 'R' then
      local t, id = ARGV[i + 3], ARGV[i + 4]
      local cache = rows[t]
      if not cache then cache = {}; rows[t] = cache; dirty[t] = {}; want[t] = {} end
      if cache[id] == nil then
        cache[id] = false
        local w = want[t]
        w[#w + 1] = id
      end
      local st = ARGV[i + 5]
      if t == 'instashop.transactiondetail' or t == 'instashop.product' then
        for pid in string.gmatch(st, '\30[PC]([^\31\29]*)') do
          if not seenp[pid] then seenp[pid] = true; wantp[#wantp + 1] = pid end
        end
      end
    end
  end
end
for t, ids in pairs(want) do
  local cache = rows[t]
  local key = P .. 'rows:' .. t
  local n = #ids
  local from = 1
  while from <= n do
    local to = math.min(from + 499, n)
    local vals = redis.call('HMGET', key, unpack(ids, from, to))
    for j = from, to do
      local v = vals[j - from + 1]
      if v then cache[ids[j]] = v end
    end
    from = to + 1
  end
end

-- Metric deltas per code and field (no key strings built per event),
-- accumulated and written once at the end. Code G is the category GMV.
local acc = {}
local function add(code, field, n)
  local a = acc[code]
  if not a then a = {}; acc[code] = a end
  a[field] = (a[field] or 0) + n
end

-- Join state (product GMV cents, product -> category), read lazily.
local gmvkey = P .. 'join:product_gmv_cents'
local catkey = P .. 'join:product_category'
local pg, pgd, pc, pcd = {}, {}, {}, {}
do
  local n = #wantp
  local from = 1
  while from <= n do
    local to = math.min(from + 499, n)
    local g = redis.call('HMGET', gmvkey, unpack(wantp, from, to))
    local c = redis.call('HMGET', catkey, unpack(wantp, from, to))
    for j = from, to do
      pg[wantp[j]] = tonumber(g[j - from + 1]) or 0
      pc[wantp[j]] = c[j - from + 1] or false
    end
    from = to + 1
  end
end
local function getpg(pid)
  local v = pg[pid]
  if v == nil then v = tonumber(redis.call('HGET', gmvkey, pid)) or 0; pg[pid] = v end
  return v
end
local function getpc(pid)
  local v = pc[pid]
  if v == nil then v = redis.call('HGET', catkey, pid) or false; pc[pid] = v end
  return v
end

local K_COUNT = P .. 'count:'
local K_WIN = P .. 'window:30s:'
local HASHES = {
  S = P .. 'transactions:status', D = P .. 'revenue:daily_cents', H = P .. 'shipments:status',
  I = P .. 'interactions:type', G = P .. 'gmv:category_cents',
}
local STRINGS = { R = P .. 'revenue:total_cents', K = P .. 'stock:units' }

local function contribute(state, sign)
  for code, field, amt in string.gmatch(state, '\30(.)([^\31]*)\31(-?%d+)') do
    amt = tonumber(amt) * sign
    if code == 'P' then
      pg[field] = getpg(field) + amt; pgd[field] = true
      local cat = getpc(field)
      if cat then add('G', cat, amt) end
    elseif code == 'C' then
      local g = string.find(field, GS, 1, true)
      local pid, cat = string.sub(field, 1, g - 1), string.sub(field, g + 1)
      if amt > 0 then
        pc[pid] = cat; pcd[pid] = true
        add('G', cat, getpg(pid))
      elseif getpc(pid) == cat then
        pc[pid] = false; pcd[pid] = true
        add('G', cat, -getpg(pid))
      end
    else
      add(code, field, amt)
    end
  end
end

local function lsn_of(state)
  local p = string.find(state, RS, 1, true)
  if p then return string.sub(state, 1, p - 1) end
  return state
end

-- Pass 2: apply in order.
local applied, dups, bad, skipped = 0, 0, 0, 0
local last_ts = nil
local truncated = {}
for i = base, nargs, STRIDE do
  local tpi = tonumber(ARGV[i])
  local off = tonumber(ARGV[i + 1])
  if off < nexto[tpi] then
    dups = dups + 1
  else
    nexto[tpi] = off + 1
    changed_tp[tpi] = true
    local kind = ARGV[i + 2]
    if kind == 'R' then
      local t, id, new = ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
      local old = rows[t][id]
      local dup = false
      if old then
        local ol, nl = lsn_of(old), lsn_of(new)
        if ol ~= '' and nl ~= '' and (nl < ol or (nl == ol and old == new)) then dup = true end
      end
      if dup then
        dups = dups + 1
      else
        if old then contribute(old, -1) end
        contribute(new, 1)
        rows[t][id] = new
        dirty[t][id] = true
        applied = applied + 1
        if ARGV[i + 6] ~= '' then last_ts = ARGV[i + 6] end
      end
    elseif kind == 'T' then
      local t = ARGV[i + 3]
      local cache = rows[t]
      if not cache then cache = {}; rows[t] = cache; dirty[t] = {} end
      local all = redis.call('HGETALL', P .. 'rows:' .. t)
      for j = 1, #all, 2 do
        if cache[all[j]] == nil then cache[all[j]] = all[j + 1] end
      end
      for id, state in pairs(cache) do
        if state then contribute(state, -1) end
        cache[id] = false
        dirty[t][id] = nil
      end
      truncated[t] = true
      applied = applied + 1
      if ARGV[i + 6] ~= '' then last_ts = ARGV[i + 6] end
    elseif kind == 'B' then
      bad = bad + 1
    else
      skipped = skipped + 1
    end
  end
end

-- Writes.
local tpargs = {}
for i = 1, ntp do
  if changed_tp[i] then
    tpargs[#tpargs + 1] = tpname[i]
    tpargs[#tpargs + 1] = fmt(nexto[i])
  end
end
if #tpargs > 0 then redis.call('HSET', offkey, unpack(tpargs)) end

for t, ids in pairs(dirty) do
  local key = P .. 'rows:' .. t
  if truncated[t] then redis.call('DEL', key) end
  local cache = rows[t]
  local batch = {}
  for id, _ in pairs(ids) do
    local s = cache[id]
    if s then
      batch[#batch + 1] = id
      batch[#batch + 1] = s
      if #batch >= 1000 then redis.call('HSET', key, unpack(batch)); batch = {} end
    end
  end
  if #batch > 0 then redis.call('HSET', key, unpack(batch)) end
end

for code, a in pairs(acc) do
  for field, n in pairs(a) do
    if code == 'W' or code == 'V' then
      local k = K_WIN .. field
      if n ~= 0 then
        redis.call('HINCRBY', k, code == 'W' and 'transactions' or 'revenue_cents', fmt(n))
      end
      redis.call('EXPIREAT', k, fmt(tonumber(field) + 30 + 3600))
    elseif n ~= 0 then
      if code == 'N' then redis.call('INCRBY', K_COUNT .. field, fmt(n))
      elseif STRINGS[code] then redis.call('INCRBY', STRINGS[code], fmt(n))
      elseif HASHES[code] then redis.call('HINCRBY', HASHES[code], field, fmt(n))
      end
    end
  end
end

local function flush(cmd, key, list)
  if #list > 0 then redis.call(cmd, key, unpack(list)) end
end
do
  local g, c, d = {}, {}, {}
  for pid, _ in pairs(pgd) do
    g[#g + 1] = pid; g[#g + 1] = fmt(pg[pid])
    if #g >= 1000 then flush('HSET', gmvkey, g); g = {} end
  end
  flush('HSET', gmvkey, g)
  for pid, _ in pairs(pcd) do
    if pc[pid] then
      c[#c + 1] = pid; c[#c + 1] = pc[pid]
      if #c >= 1000 then flush('HSET', catkey, c); c = {} end
    else
      d[#d + 1] = pid
      if #d >= 1000 then flush('HDEL', catkey, d); d = {} end
    end
  end
  flush('HSET', catkey, c)
  flush('HDEL', catkey, d)
end

local pk = P .. 'pipeline'
if applied > 0 then redis.call('HINCRBY', pk, 'events_applied', applied) end
if dups > 0 then redis.call('HINCRBY', pk, 'duplicates_skipped', dups) end
if bad > 0 then redis.call('HINCRBY', pk, 'bad_messages', bad) end
if skipped > 0 then redis.call('HINCRBY', pk, 'tombstones_skipped', skipped) end
if last_ts then
  redis.call('HSET', pk, 'last_source_ts_ms', last_ts, 'lag_ms', fmt(now_ms - tonumber(last_ts)),
    'last_applied_at_ms', fmt(now_ms))
end
return {applied, dups, bad, skipped}
