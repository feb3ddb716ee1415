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
