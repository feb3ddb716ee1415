-- The differential test's own table, in database instashop: one column for
-- every row of the README's value-mapping table (and the types it names),
-- created before either pipeline starts. REPLICA IDENTITY DEFAULT, so an
-- update that leaves the TOASTed column alone carries Debezium's
-- placeholder in both pipelines; the generator's FULL tables cover the
-- other identity.
SET client_min_messages = warning;

DO $$
BEGIN
    CREATE TYPE edge_mood AS ENUM ('sad', 'ok', 'happy ☺');
EXCEPTION WHEN duplicate_object THEN NULL;
END
$$;

CREATE TABLE edge_values (
    id          integer PRIMARY KEY,
    c_int2      smallint,
    c_int4      integer,
    c_int8      bigint,
    c_oid       oid,
    c_float4    real,
    c_float8    double precision,
    c_numeric   numeric,
    c_num_38_0  numeric(38, 0),
    c_num_38_30 numeric(38, 30),
    c_num_12_2  numeric(12, 2),
    c_money     money,
    c_bool      boolean,
    c_bit1      bit(1),
    c_bit8      bit(8),
    c_varbit    varbit,
    c_text      text,
    c_varchar   varchar(20),
    c_char      char(5),
    c_name      name,
    c_qchar     "char",
    c_uuid      uuid,
    c_xml       xml,
    c_inet      inet,
    c_cidr      cidr,
    c_macaddr   macaddr,
    c_enum      edge_mood,
    c_point     point,
    c_box       box,
    c_circle    circle,
    c_polygon   polygon,
    c_int4range int4range,
    c_numrange  numrange,
    c_tstzrange tstzrange,
    c_daterange daterange,
    c_json      json,
    c_jsonb     jsonb,
    c_bytea     bytea,
    c_tstz      timestamptz,
    c_tstz3     timestamptz(3),
    c_ts        timestamp,
    c_date      date,
    c_time      time,
    c_timetz    timetz,
    c_interval  interval,
    c_int_2d    integer[],
    c_text_arr  text[],
    c_num_arr   numeric[],
    c_tstz_arr  timestamptz[],
    c_date_arr  date[],
    c_big       text
);
ALTER TABLE edge_values REPLICA IDENTITY DEFAULT;
GRANT SELECT ON edge_values TO cdc_reader;
