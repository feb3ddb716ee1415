-- Database `erp`: stock per product and warehouse. Idempotent.
--
-- REPLICA IDENTITY FULL: the stock-units metric sums `quantity`; updates and
-- deletes must carry the old quantity so consumers can retract it.

SET client_min_messages = warning;

CREATE TABLE IF NOT EXISTS stock (
    id         bigserial PRIMARY KEY,
    product_id bigint      NOT NULL,
    warehouse  text        NOT NULL,
    quantity   integer     NOT NULL CHECK (quantity >= 0),
    reorder_level integer  NOT NULL DEFAULT 10,
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (product_id, warehouse)
);
ALTER TABLE stock REPLICA IDENTITY FULL;
-- Stock rows are updated all the time: leave room on each page for HOT updates.
ALTER TABLE stock SET (fillfactor = 70);

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'instashop_cdc') THEN
        CREATE PUBLICATION instashop_cdc FOR TABLE stock;
    END IF;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'cdc_reader') THEN
        GRANT USAGE ON SCHEMA public TO cdc_reader;
        GRANT SELECT ON stock TO cdc_reader;
    END IF;
END
$$;

-- The CDC signal table (README, "Incremental snapshots and signals"):
-- Debezium's columns; a user inserts execute-snapshot, stop-snapshot,
-- pause-snapshot or resume-snapshot rows, the reader sees them through the
-- publication (never as a topic) and keeps its own snapshot progress in one
-- row of type 'snapshot-progress' per slot. Hence INSERT and UPDATE for the
-- CDC role on this table only. Tables the application creates later are
-- readable by the CDC role without a manual GRANT (default privileges), so
-- adding one to the publication and signalling a snapshot is enough.
CREATE TABLE IF NOT EXISTS cdc_signal (
    id   text PRIMARY KEY,
    type text NOT NULL,
    data text
);
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_publication_tables
                   WHERE pubname = 'instashop_cdc' AND schemaname = 'public' AND tablename = 'cdc_signal') THEN
        ALTER PUBLICATION instashop_cdc ADD TABLE cdc_signal;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'cdc_reader') THEN
        GRANT SELECT, INSERT, UPDATE ON cdc_signal TO cdc_reader;
        ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO cdc_reader;
    END IF;
END
$$;
