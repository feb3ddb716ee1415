-- Database `instashop`: the shops on the platform, their buyers, products and
-- purchases. Idempotent: applied by scripts/up and again by the generator.
--
-- REPLICA IDENTITY: tables whose updates and deletes change a metric
-- (product: its category moves past sales between GMV categories;
-- transaction: status and amount drive revenue; transactiondetail: GMV) are
-- FULL, so every update and delete event carries the complete old row in
-- `before`, unchanged TOASTed values are filled from it, and Debezium-style
-- consumers can retract the old contribution without keeping state.
-- customer and buyer only feed counts, for which the key in a delete event
-- suffices: they keep DEFAULT (primary key) and write less WAL.

SET client_min_messages = warning;

DO $$
BEGIN
    CREATE TYPE transaction_status AS ENUM ('pending', 'completed', 'failed', 'refunded');
EXCEPTION WHEN duplicate_object THEN NULL;
END
$$;

CREATE TABLE IF NOT EXISTS customer (
    id                bigserial PRIMARY KEY,
    name              text        NOT NULL,
    email             text        NOT NULL,
    subscription_plan text        NOT NULL
        CHECK (subscription_plan IN ('free', 'basic', 'premium', 'enterprise')),
    country           text        NOT NULL,
    is_active         boolean     NOT NULL DEFAULT true,
    created_at        timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE customer REPLICA IDENTITY DEFAULT;

CREATE TABLE IF NOT EXISTS buyer (
    id          bigserial PRIMARY KEY,
    customer_id bigint      NOT NULL REFERENCES customer (id),
    name        text        NOT NULL,
    email       text        NOT NULL,
    birth_date  date,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS buyer_customer_id_idx ON buyer (customer_id);
ALTER TABLE buyer REPLICA IDENTITY DEFAULT;

CREATE TABLE IF NOT EXISTS product (
    id          bigserial PRIMARY KEY,
    customer_id bigint        NOT NULL REFERENCES customer (id),
    name        text          NOT NULL,
    category    text          NOT NULL,
    price       numeric(12,2) NOT NULL CHECK (price >= 0),
    tags        text[]        NOT NULL DEFAULT '{}',
    description text,
    created_at  timestamptz   NOT NULL DEFAULT now(),
    updated_at  timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS product_customer_id_idx ON product (customer_id);
ALTER TABLE product REPLICA IDENTITY FULL;

CREATE TABLE IF NOT EXISTS transaction (
    id             bigserial PRIMARY KEY,
    external_id    uuid               NOT NULL UNIQUE,
    customer_id    bigint             NOT NULL REFERENCES customer (id),
    buyer_id       bigint             NOT NULL REFERENCES buyer (id),
    total_amount   numeric(12,2)      NOT NULL CHECK (total_amount >= 0),
    currency       char(3)            NOT NULL DEFAULT 'USD',
    payment_method text               NOT NULL
        CHECK (payment_method IN ('credit_card', 'debit_card', 'paypal', 'bank_transfer', 'apple_pay', 'google_pay')),
    status         transaction_status NOT NULL DEFAULT 'pending',
    created_at     timestamptz        NOT NULL DEFAULT now(),
    updated_at     timestamptz        NOT NULL DEFAULT now()
);
-- No index on status: every purchase changes status once or twice, and an
-- index on it would make each of those updates non-HOT (new index entries in
-- every index). Nothing looks purchases up by status often enough to pay
-- for that; created_at serves time-range reads.
DROP INDEX IF EXISTS transaction_status_created_idx;
CREATE INDEX IF NOT EXISTS transaction_created_at_idx ON transaction (created_at);
CREATE INDEX IF NOT EXISTS transaction_buyer_id_idx ON transaction (buyer_id);
CREATE INDEX IF NOT EXISTS transaction_customer_id_idx ON transaction (customer_id);
ALTER TABLE transaction REPLICA IDENTITY FULL;
-- Room on each page for HOT updates (status changes, cart edits).
ALTER TABLE transaction SET (fillfactor = 85);

CREATE TABLE IF NOT EXISTS transactiondetail (
    id             bigserial PRIMARY KEY,
    transaction_id bigint        NOT NULL REFERENCES transaction (id) ON DELETE CASCADE,
    product_id     bigint        NOT NULL REFERENCES product (id),
    quantity       integer       NOT NULL CHECK (quantity > 0),
    unit_price     numeric(12,2) NOT NULL CHECK (unit_price >= 0)
);
CREATE INDEX IF NOT EXISTS transactiondetail_transaction_id_idx ON transactiondetail (transaction_id);
CREATE INDEX IF NOT EXISTS transactiondetail_product_id_idx ON transactiondetail (product_id);
ALTER TABLE transactiondetail REPLICA IDENTITY FULL;

-- One publication per database, named the same everywhere; the reader's slot
-- names carry the database name because slots are cluster-wide.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'instashop_cdc') THEN
        CREATE PUBLICATION instashop_cdc
            FOR TABLE customer, buyer, product, transaction, transactiondetail;
    END IF;
END
$$;

-- The reader's snapshot needs SELECT; nothing else.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'cdc_reader') THEN
        GRANT USAGE ON SCHEMA public TO cdc_reader;
        GRANT SELECT ON customer, buyer, product, transaction, transactiondetail TO cdc_reader;
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
