-- Database `ecommerce`: carriers and shipments of completed purchases. Idempotent.
--
-- REPLICA IDENTITY: shipment is FULL (the status metric must retract the old
-- status on update and delete, and the `label` bytea can be TOASTed: with FULL
-- an update that leaves it alone still carries its value in the old row, so
-- no placeholder reaches consumers). carrier only feeds a count: DEFAULT.

SET client_min_messages = warning;

CREATE TABLE IF NOT EXISTS carrier (
    id                    serial PRIMARY KEY,
    name                  text        NOT NULL UNIQUE,
    tracking_url_template text        NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE carrier REPLICA IDENTITY DEFAULT;

CREATE TABLE IF NOT EXISTS shipment (
    id             bigserial PRIMARY KEY,
    transaction_id bigint      NOT NULL,
    carrier_id     integer     NOT NULL REFERENCES carrier (id),
    status         text        NOT NULL DEFAULT 'created'
        CHECK (status IN ('created', 'in_transit', 'delivered', 'returned')),
    tracking_code  text        NOT NULL,
    label          bytea,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS shipment_transaction_id_idx ON shipment (transaction_id);
CREATE INDEX IF NOT EXISTS shipment_carrier_id_idx ON shipment (carrier_id);
-- No index on status: a shipment changes status two or three times, and with
-- an index none of those updates could be HOT. The carrier index serves the
-- foreign key when a carrier is deleted.
DROP INDEX IF EXISTS shipment_status_idx;
ALTER TABLE shipment REPLICA IDENTITY FULL;
-- Half of each page kept free: a shipment is updated two or three times
-- soon after its insert, and HOT updates need room on the same page.
ALTER TABLE shipment SET (fillfactor = 50);

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'instashop_cdc') THEN
        CREATE PUBLICATION instashop_cdc FOR TABLE carrier, shipment;
    END IF;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'cdc_reader') THEN
        GRANT USAGE ON SCHEMA public TO cdc_reader;
        GRANT SELECT ON carrier, shipment TO cdc_reader;
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
