-- Database `crm`: buyers' behaviour on the shops. Idempotent.
--
-- REPLICA IDENTITY FULL: the interaction-type metric counts rows per type, and
-- a delete (old interactions are purged) must say which type it takes away;
-- with FULL the delete event's `before` carries it.

SET client_min_messages = warning;

CREATE TABLE IF NOT EXISTS interaction (
    id               bigserial PRIMARY KEY,
    customer_id      bigint      NOT NULL,
    buyer_id         bigint      NOT NULL,
    interaction_type text        NOT NULL
        CHECK (interaction_type IN ('view', 'click', 'search', 'cart_add', 'cart_abandonment', 'support_ticket')),
    session_id       uuid,
    payload          jsonb       NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS interaction_created_at_idx ON interaction (created_at);
ALTER TABLE interaction REPLICA IDENTITY FULL;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'instashop_cdc') THEN
        CREATE PUBLICATION instashop_cdc FOR TABLE interaction;
    END IF;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'cdc_reader') THEN
        GRANT USAGE ON SCHEMA public TO cdc_reader;
        GRANT SELECT ON interaction TO cdc_reader;
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
