-- Database `dwh`: the data warehouse written by dwh-sink. Idempotent: applied
-- by scripts/up as the owner role dwh_sink (and by the tests on scratch
-- databases).
--
-- Two layers, both written by dwh-sink in one transaction per batch together
-- with the Kafka positions the batch covers (sink_offset), so a kill -9 at
-- any instant, a re-delivery or a replay from offset 0 neither loses nor
-- duplicates a row:
--
-- * change_event: every change event of every topic, once, append-only,
--   partitioned by day of the source commit time. Any past state of any row
--   is the `after` of its last event at or before that time.
-- * the star schema of the shop: SCD2 dimensions (dim_customer, dim_buyer,
--   dim_product, dim_carrier: one version per change of a tracked
--   attribute, valid from its source commit to the next version's), dim_date,
--   and the facts fact_purchase, fact_sale_line (a view: the lines of
--   sale_line with their purchase's columns) and fact_shipment (their
--   current state: updates and deletes of the source rows apply to them).
--
-- Positions: `commit_lsn` is the LSN of the source transaction's commit
-- (`source.commit_lsn`; for sources without it, e.g. Debezium, the change's
-- own LSN), `lsn` the change's. Versions and facts are ordered by
-- (commit_lsn, lsn), never by arrival, so events arriving out of order
-- across topics (a purchase line before the product version it sold) still
-- join the right version.

SET client_min_messages = warning;

-- ------------------------------------------------------------------ raw history

-- One row per source change. The unique key is (source db, table, key, lsn,
-- op) plus the partition key commit_time (a primary key of a partitioned
-- table must contain it); a re-sent event carries the same commit time, so
-- it is one row. Snapshot reads (`r`) are observations, not changes: those
-- of our reader (with commit_lsn) are all kept, as the record that the row
-- still existed at that snapshot, which its snapshot-complete marker needs
-- to tell the rows deleted meanwhile (they get a delete event at the
-- marker's position, lsn = commit_lsn); another source's is kept only when
-- it shows something the table does not already hold as the row's state
-- before it (the first sight of a row, or a row that differs from its last
-- recorded state).
CREATE TABLE IF NOT EXISTS change_event (
    source_db       text        NOT NULL,
    source_table    text        NOT NULL,
    -- The Kafka key as canonical JSON ({"id":42}); '' for a truncate.
    row_key         text        NOT NULL,
    -- c insert, u update, d delete, r snapshot read, t truncate.
    op              "char"      NOT NULL,
    -- source.ts_ms: the commit time of the source transaction.
    commit_time     timestamptz NOT NULL,
    lsn             bigint      NOT NULL,
    commit_lsn      bigint,
    snapshot        boolean     NOT NULL DEFAULT false,
    tx_id           bigint,
    before          jsonb,
    after           jsonb,
    kafka_topic     text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    loaded_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_db, source_table, row_key, lsn, op, commit_time)
) PARTITION BY RANGE (commit_time);
-- The deletes alone, for the facts' resurrection guard (is there a later
-- delete of this row?): through the primary key that question scans every
-- event of the table, as the key's row_key comes before op.
CREATE INDEX IF NOT EXISTS change_event_delete_idx
    ON change_event (source_db, source_table, row_key) WHERE op = 'd';
-- Daily partitions change_event_YYYYMMDD are created by dwh-sink, in the
-- transaction of the first batch that needs them. No default partition: a
-- row for a day without its partition would keep that day's partition from
-- ever being created.

-- The next Kafka offset to read per topic partition, written in the same
-- transaction as the rows read before it. dwh-sink seeks here on start.
CREATE TABLE IF NOT EXISTS sink_offset (
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint  NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- ------------------------------------------------------------------ dimensions

-- SCD2: a version per change of a tracked attribute. valid_to is the next
-- version's valid_from (NULL while current). A delete of the source row is
-- a version with is_deleted (attributes NULL) that closes the one before it.
-- is_current: the newest version of a live row.
CREATE TABLE IF NOT EXISTS dim_customer (
    customer_key          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id           bigint      NOT NULL,
    name                  text,
    email                 text,
    subscription_plan     text,
    country               text,
    is_active             boolean,
    valid_from            timestamptz NOT NULL,
    valid_to              timestamptz,
    valid_from_commit_lsn bigint      NOT NULL,
    valid_from_lsn        bigint      NOT NULL,
    valid_to_commit_lsn   bigint,
    valid_to_lsn          bigint,
    is_current            boolean     NOT NULL DEFAULT true,
    is_deleted            boolean     NOT NULL DEFAULT false,
    UNIQUE (customer_id, valid_from_commit_lsn, valid_from_lsn)
);

CREATE TABLE IF NOT EXISTS dim_buyer (
    buyer_key             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    buyer_id              bigint      NOT NULL,
    customer_id           bigint,
    name                  text,
    email                 text,
    valid_from            timestamptz NOT NULL,
    valid_to              timestamptz,
    valid_from_commit_lsn bigint      NOT NULL,
    valid_from_lsn        bigint      NOT NULL,
    valid_to_commit_lsn   bigint,
    valid_to_lsn          bigint,
    is_current            boolean     NOT NULL DEFAULT true,
    is_deleted            boolean     NOT NULL DEFAULT false,
    UNIQUE (buyer_id, valid_from_commit_lsn, valid_from_lsn)
);

CREATE TABLE IF NOT EXISTS dim_product (
    product_key           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    product_id            bigint      NOT NULL,
    customer_id           bigint,
    name                  text,
    category              text,
    price_cents           bigint,
    valid_from            timestamptz NOT NULL,
    valid_to              timestamptz,
    valid_from_commit_lsn bigint      NOT NULL,
    valid_from_lsn        bigint      NOT NULL,
    valid_to_commit_lsn   bigint,
    valid_to_lsn          bigint,
    is_current            boolean     NOT NULL DEFAULT true,
    is_deleted            boolean     NOT NULL DEFAULT false,
    UNIQUE (product_id, valid_from_commit_lsn, valid_from_lsn)
);

CREATE TABLE IF NOT EXISTS dim_carrier (
    carrier_key           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    carrier_id            bigint      NOT NULL,
    name                  text,
    tracking_url_template text,
    valid_from            timestamptz NOT NULL,
    valid_to              timestamptz,
    valid_from_commit_lsn bigint      NOT NULL,
    valid_from_lsn        bigint      NOT NULL,
    valid_to_commit_lsn   bigint,
    valid_to_lsn          bigint,
    is_current            boolean     NOT NULL DEFAULT true,
    is_deleted            boolean     NOT NULL DEFAULT false,
    UNIQUE (carrier_id, valid_from_commit_lsn, valid_from_lsn)
);

-- One row per UTC calendar day a purchase fell on (filled as they arrive).
CREATE TABLE IF NOT EXISTS dim_date (
    date_key    integer PRIMARY KEY, -- YYYYMMDD
    date        date    NOT NULL UNIQUE,
    year        integer NOT NULL,
    quarter     integer NOT NULL,
    month       integer NOT NULL,
    day         integer NOT NULL,
    iso_week    integer NOT NULL,
    day_of_week integer NOT NULL -- ISO: 1 Monday .. 7 Sunday
);

-- ------------------------------------------------------------------ facts

-- A warehouse written before purchase-level columns moved to fact_purchase
-- had fact_sale_line as a table holding them per line: it becomes
-- sale_line, and the purchases get their creation position (from their
-- first change event) and their customer and buyer versions (as the sink
-- resolves them: valid at that position, or the first for an older
-- purchase). Runs once; a no-op on a new warehouse.
DO $migrate$
BEGIN
    IF to_regclass('fact_sale_line') IS NULL
       OR (SELECT relkind FROM pg_class WHERE oid = to_regclass('fact_sale_line')) <> 'r' THEN
        RETURN;
    END IF;
    ALTER TABLE fact_purchase
        ADD COLUMN customer_key bigint,
        ADD COLUMN buyer_key bigint,
        ADD COLUMN created_commit_lsn bigint,
        ADD COLUMN created_lsn bigint;
    UPDATE fact_purchase f SET (created_commit_lsn, created_lsn) = (
        SELECT coalesce(e.commit_lsn, e.lsn), e.lsn FROM change_event e
        WHERE e.source_db = 'instashop' AND e.source_table = 'transaction'
          AND e.row_key = '{"id":' || f.purchase_id || '}' AND e.op IN ('c', 'r', 'u')
        ORDER BY 1, 2 LIMIT 1);
    -- No event left of it (history cut): its newest position stands in.
    UPDATE fact_purchase SET created_commit_lsn = last_commit_lsn, created_lsn = last_lsn
    WHERE created_commit_lsn IS NULL;
    UPDATE fact_purchase f SET
        customer_key = (SELECT d.customer_key FROM dim_customer d WHERE d.customer_id = f.customer_id AND NOT d.is_deleted
            AND ((d.valid_from_commit_lsn, d.valid_from_lsn) <= (f.created_commit_lsn, f.created_lsn)
              OR NOT EXISTS (SELECT 1 FROM dim_customer e WHERE e.customer_id = d.customer_id
                AND (e.valid_from_commit_lsn, e.valid_from_lsn) < (d.valid_from_commit_lsn, d.valid_from_lsn)))
            AND (d.valid_to_commit_lsn IS NULL OR (d.valid_to_commit_lsn, d.valid_to_lsn) > (f.created_commit_lsn, f.created_lsn))
            LIMIT 1),
        buyer_key = (SELECT d.buyer_key FROM dim_buyer d WHERE d.buyer_id = f.buyer_id AND NOT d.is_deleted
            AND ((d.valid_from_commit_lsn, d.valid_from_lsn) <= (f.created_commit_lsn, f.created_lsn)
              OR NOT EXISTS (SELECT 1 FROM dim_buyer e WHERE e.buyer_id = d.buyer_id
                AND (e.valid_from_commit_lsn, e.valid_from_lsn) < (d.valid_from_commit_lsn, d.valid_from_lsn)))
            AND (d.valid_to_commit_lsn IS NULL OR (d.valid_to_commit_lsn, d.valid_to_lsn) > (f.created_commit_lsn, f.created_lsn))
            LIMIT 1);
    ALTER TABLE fact_purchase
        ALTER COLUMN created_commit_lsn SET NOT NULL,
        ALTER COLUMN created_lsn SET NOT NULL;
    DROP VIEW IF EXISTS sale_line_as_sold;
    ALTER TABLE fact_sale_line RENAME TO sale_line;
    ALTER TABLE sale_line
        DROP COLUMN customer_id, DROP COLUMN buyer_id, DROP COLUMN status,
        DROP COLUMN purchase_time, DROP COLUMN date_key,
        DROP COLUMN customer_key, DROP COLUMN buyer_key;
    ALTER INDEX IF EXISTS fact_sale_line_pkey RENAME TO sale_line_pkey;
    ALTER INDEX IF EXISTS fact_sale_line_purchase_idx RENAME TO sale_line_purchase_idx;
    ALTER INDEX IF EXISTS fact_sale_line_product_idx RENAME TO sale_line_product_idx;
END
$migrate$;

-- One row per purchase (instashop.transaction), its current state.
-- customer_key and buyer_key are the dimension versions valid at the
-- purchase's creation commit (created_commit_lsn, created_lsn), NULL until
-- that version has arrived; they are the sale lines' too (fact_sale_line).
CREATE TABLE IF NOT EXISTS fact_purchase (
    purchase_id        bigint PRIMARY KEY,
    customer_id        bigint      NOT NULL,
    buyer_id           bigint      NOT NULL,
    total_cents        bigint      NOT NULL,
    currency           text        NOT NULL,
    payment_method     text        NOT NULL,
    status             text        NOT NULL,
    purchase_time      timestamptz NOT NULL,
    date_key           integer     NOT NULL,
    commit_time        timestamptz NOT NULL,
    last_commit_lsn    bigint      NOT NULL,
    last_lsn           bigint      NOT NULL,
    customer_key       bigint,
    buyer_key          bigint,
    created_commit_lsn bigint      NOT NULL,
    created_lsn        bigint      NOT NULL
);
CREATE INDEX IF NOT EXISTS fact_purchase_date_idx ON fact_purchase (date_key);
CREATE INDEX IF NOT EXISTS fact_purchase_customer_idx ON fact_purchase (customer_id, created_commit_lsn);
CREATE INDEX IF NOT EXISTS fact_purchase_buyer_idx ON fact_purchase (buyer_id, created_commit_lsn);
-- Room for HOT updates: a purchase changes status once or twice soon after
-- its insert.
ALTER TABLE fact_purchase SET (fillfactor = 80);

-- One row per purchase line (instashop.transactiondetail), its own current
-- state; product_key is the product version valid at the line's creation
-- commit (sold_commit_lsn, sold_lsn), NULL until that version has arrived.
-- The purchase-level columns are in fact_purchase, once per purchase:
-- fact_sale_line joins them. So a purchase's change (its status, mostly)
-- is one row written, not one per line, and a line that arrives before its
-- purchase (they come through different topics) is never written twice.
CREATE TABLE IF NOT EXISTS sale_line (
    line_id          bigint PRIMARY KEY,
    purchase_id      bigint      NOT NULL,
    product_id       bigint      NOT NULL,
    quantity         integer     NOT NULL,
    unit_price_cents bigint      NOT NULL,
    amount_cents     bigint      NOT NULL,
    product_key      bigint,
    sold_time        timestamptz NOT NULL,
    sold_commit_lsn  bigint      NOT NULL,
    sold_lsn         bigint      NOT NULL,
    commit_time      timestamptz NOT NULL,
    last_commit_lsn  bigint      NOT NULL,
    last_lsn         bigint      NOT NULL
);
CREATE INDEX IF NOT EXISTS sale_line_purchase_idx ON sale_line (purchase_id);
CREATE INDEX IF NOT EXISTS sale_line_product_idx ON sale_line (product_id, sold_commit_lsn);

-- The sales fact, one row per purchase line: the line with its purchase's
-- status, time, customer, buyer and their versions (NULL while the purchase
-- has not arrived).
CREATE OR REPLACE VIEW fact_sale_line AS
SELECT l.line_id, l.purchase_id, l.product_id, l.quantity, l.unit_price_cents, l.amount_cents,
       p.customer_id, p.buyer_id, p.status, p.purchase_time, p.date_key,
       l.product_key, p.customer_key, p.buyer_key,
       l.sold_time, l.sold_commit_lsn, l.sold_lsn, l.commit_time, l.last_commit_lsn, l.last_lsn
FROM sale_line l
LEFT JOIN fact_purchase p ON p.purchase_id = l.purchase_id;

-- One row per shipment (ecommerce.shipment), its current state; carrier_key
-- is the carrier version valid at the shipment's creation commit.
CREATE TABLE IF NOT EXISTS fact_shipment (
    shipment_id       bigint PRIMARY KEY,
    purchase_id       bigint      NOT NULL,
    carrier_id        bigint      NOT NULL,
    carrier_key       bigint,
    status            text        NOT NULL,
    tracking_code     text        NOT NULL,
    created_time      timestamptz NOT NULL,
    updated_time      timestamptz NOT NULL,
    created_commit_lsn bigint     NOT NULL,
    created_lsn       bigint      NOT NULL,
    commit_time       timestamptz NOT NULL,
    last_commit_lsn   bigint      NOT NULL,
    last_lsn          bigint      NOT NULL
);
CREATE INDEX IF NOT EXISTS fact_shipment_carrier_idx ON fact_shipment (carrier_id, created_commit_lsn);

-- ------------------------------------------------------------------ views

-- Sales with the product, customer and buyer as they were when sold.
CREATE OR REPLACE VIEW sale_line_as_sold AS
SELECT f.line_id, f.purchase_id, f.status, f.purchase_time, f.date_key,
       f.quantity, f.unit_price_cents, f.amount_cents,
       p.product_id, p.name AS product_name, p.category, p.price_cents AS list_price_cents,
       c.customer_id, c.name AS customer_name, c.subscription_plan, c.country,
       b.buyer_id, b.name AS buyer_name
FROM fact_sale_line f
LEFT JOIN dim_product p ON p.product_key = f.product_key
LEFT JOIN dim_customer c ON c.customer_key = f.customer_key
LEFT JOIN dim_buyer b ON b.buyer_key = f.buyer_key;

-- Revenue of completed purchases per UTC day (the metrics' revenue:daily).
CREATE OR REPLACE VIEW revenue_daily AS
SELECT d.date, count(*) AS purchases, sum(f.total_cents) AS revenue_cents
FROM fact_purchase f JOIN dim_date d USING (date_key)
WHERE f.status = 'completed'
GROUP BY d.date;

-- A row's state at any time: SELECT after FROM change_event WHERE
-- source_table = 'product' AND row_key = '{"id":42}' AND commit_time <= T
-- ORDER BY commit_lsn DESC NULLS LAST, lsn DESC LIMIT 1.
