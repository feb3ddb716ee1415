-- Cluster-wide roles, applied once by scripts/up as the superuser.
--
-- instashop_app owns the four databases and their tables; the generator writes
-- as this role.
-- cdc_reader is the least-privilege role of the CDC reader: LOGIN and
-- REPLICATION (to open a walsender and use a slot) and, in each database,
-- SELECT on the tables (granted in the per-database files, for the snapshot).
-- Nothing else: no ownership, no CREATE, no superuser.
-- dwh_sink owns the `dwh` warehouse database (sql/dwh.sql) and nothing in
-- the four source databases.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'instashop_app') THEN
        CREATE ROLE instashop_app LOGIN PASSWORD 'instashop_app';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cdc_reader') THEN
        CREATE ROLE cdc_reader LOGIN REPLICATION PASSWORD 'cdc_reader';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dwh_sink') THEN
        CREATE ROLE dwh_sink LOGIN PASSWORD 'dwh_sink';
    END IF;
END
$$;
