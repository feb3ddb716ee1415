-- The differential test's edge values and schema changes, run in database
-- instashop while both pipelines capture it (each statement its own
-- transaction). Row 1 typical values, 2 the lows, 3 the highs, 4 NaN and
-- infinities, 5 BC dates, 6 NULLs (the largest `timestamp` is the last one
-- MicroTimestamp's 64 bits hold: later ones stop the cdc-reader with one
-- line, see the README); then an update that leaves the TOASTed
-- column unchanged, a delete, a primary-key update, ALTER TABLE ... ADD
-- COLUMN (here and on the generator's customer table), a TRUNCATE, and rows
-- after both.
SET client_min_messages = warning;

INSERT INTO edge_values VALUES (1,
    42, 42, 42, 42, 1.5, 2.25, 22.22,
    12345678901234567890123456789012345678, 0.000000000000000000000000000001, 1234.56, 1234.56,
    true, B'1', B'10100101', B'101',
    'plain', 'vc', 'ab', 'nm', 'x', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '<a>1</a>',
    '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', 'happy ☺',
    '(1.5,2)', '((0,0),(1,1))', '<(1,1),2>', '((0,0),(1,0),(1,1))',
    '[1,10)', '(1.5,2.5]', '[2026-01-01 00:00+00,2026-02-01 00:00+00)', '[2026-01-01,2026-02-01)',
    '{"a":[1,2,{"b":null}]}', '{"a": [1, 2, {"b": null, "c": {"d": [[]]}}], "é": "😀"}', '\x0102ff',
    '2016-11-04 11:51:30.123456+00', '2016-11-04 11:51:30.5+00', '2016-11-04 11:51:30.123456', '2016-11-04',
    '11:51:30.123456', '11:51:30.123456+02', '1 year 2 months 3 days 04:05:06.78',
    '{{1,NULL,3},{4,5,NULL}}', '{"a",NULL,"b \"q\"","😀𝄞",""}', '{1.5,NULL,NaN,-0.001}',
    '{"2016-11-04 11:51:30+00",NULL}', '{2016-11-04,infinity,NULL}',
    (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i));

INSERT INTO edge_values VALUES (2,
    -32768, -2147483648, -9223372036854775808, 0, '-Infinity', '-Infinity', '-Infinity',
    -99999999999999999999999999999999999999, -99999999.999999999999999999999999999999, -9999999999.99,
    '-92233720368547758.08',
    false, B'0', B'00000000', B'',
    '', '', '', '', ' ', '00000000-0000-0000-0000-000000000000', '',
    '::1', '::/0', '00:00:00:00:00:00', 'sad',
    '(-1e+300,1e-300)', '((-1,-1),(-1,-1))', '<(0,0),0>', '((0,0))',
    'empty', 'empty', 'empty', 'empty',
    '[]', '{}', '',
    '-infinity', '1970-01-01 00:00:00+00', '-infinity', '-infinity',
    '00:00:00', '00:00:00+14:59', '-178000000 years',
    '{}', '{}', '{}', '{}', '{}',
    'short');

INSERT INTO edge_values VALUES (3,
    32767, 2147483647, 9223372036854775807, 4294967295, 3.4028235e38, 1.7976931348623157e308, 'Infinity',
    99999999999999999999999999999999999999, 99999999.999999999999999999999999999999, 9999999999.99,
    '92233720368547758.07',
    true, B'1', B'11111111', B'1111111111111111111111111111111111111111111111111111111111111111111111',
    '𝄞😀 beyond the BMP, "quotes", back\slash, tab	and
newline', 'äöü€', 'xyz  ', 'n', 'Z', 'ffffffff-ffff-ffff-ffff-ffffffffffff', '<a b="&amp;">x</a>',
    'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128', '255.255.255.255/32', 'ff:ff:ff:ff:ff:ff', 'ok',
    '(1e+300,-1e-300)', '((1e+10,1e+10),(-1e+10,-1e+10))', '<(1e+10,-1e+10),1e+10>', '((0,0),(0,1),(1,1),(1,0))',
    '[-2147483648,2147483647)', '(,)', '(,"2026-01-01 00:00:00+00")', '[2026-01-01,)',
    '{"deep":{"a":{"b":{"c":{"d":[1,[2,[3,[4]]]]}}}}}', '{"n": 1e+300, "s": "\u00e9x"}', '\x00',
    '294276-12-31 23:59:59.999999+00', '9999-12-31 23:59:59.999+00', '294247-01-10 04:00:54.775806', '5874897-12-31',
    '24:00:00', '24:00:00-15:59', '178000000 years 11 months 30 days 23:59:59.999999',
    '{{{1,2},{3,4}},{{5,NULL},{NULL,8}}}', '{NULL,NULL}', '{99999999999999999999999999999999999999.5}',
    '{infinity,-infinity}', '{-infinity}',
    'short');

INSERT INTO edge_values VALUES (4,
    0, 0, 0, 1, 'NaN', 'NaN', 'NaN',
    0, 0, 0, 0,
    NULL, NULL, NULL, NULL,
    NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
    NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
    'infinity', 'infinity', 'infinity', 'infinity',
    '00:00:00.000001', '23:59:59.999999-01', '-1 days +00:00:00.000001',
    NULL, NULL, NULL, NULL, NULL,
    NULL);

INSERT INTO edge_values (id, c_tstz, c_ts, c_date, c_time, c_timetz, c_interval) VALUES (5,
    '4713-01-01 00:00:00+00 BC', '4713-01-01 00:00:00 BC', '4713-01-01 BC',
    '12:34:56.000001', '12:00:00+05:30', '-1 years -2 mons +3 days -04:05:06.000001');

INSERT INTO edge_values (id) VALUES (6);

-- Leaves the TOASTed c_big unchanged: neither pipeline knows its value.
UPDATE edge_values SET c_int4 = 43 WHERE id = 1;
DELETE FROM edge_values WHERE id = 2;
-- A primary-key change: delete (+ tombstone) of 3, create of 1003.
UPDATE edge_values SET id = 1003 WHERE id = 3;
-- Mid-stream schema changes, on this table and on one the generator writes.
ALTER TABLE edge_values ADD COLUMN c_added integer NOT NULL DEFAULT 7;
ALTER TABLE customer ADD COLUMN c_added text;
UPDATE edge_values SET c_added = 8, c_text = 'after alter' WHERE id = 4;
INSERT INTO edge_values (id, c_added) VALUES (7, 9);
BEGIN;
UPDATE edge_values SET c_int8 = c_int8 + 1 WHERE id IN (1, 4);
INSERT INTO edge_values (id) VALUES (8);
COMMIT;
-- An unchanged TOASTed value on a REPLICA IDENTITY FULL table (the old row
-- carries it).
INSERT INTO product (customer_id, name, category, price, description)
SELECT min(id), 'edge toast', 'edge', 1.00,
       (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i)
FROM customer;
UPDATE product SET price = 2.00 WHERE name = 'edge toast';
TRUNCATE edge_values;
INSERT INTO edge_values (id, c_text, c_added) VALUES (9, 'after truncate', 10);
