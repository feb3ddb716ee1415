#!/usr/bin/env bash
# docker-compose: initialises PostgreSQL like scripts/up does. Runs once from
# /docker-entrypoint-initdb.d on an empty data directory, with ./sql mounted
# at /sql. Roles as the superuser; the four databases owned by instashop_app,
# each schema applied as instashop_app so that it owns the tables; the
# warehouse `dwh` owned by dwh_sink.
set -euo pipefail

psql_as() {
    local user="$1" db="$2"
    shift 2
    psql -X -q -v ON_ERROR_STOP=1 --username "$user" --dbname "$db" "$@"
}

psql_as "$POSTGRES_USER" postgres -f /sql/roles.sql
for db in instashop crm erp ecommerce; do
    if [[ "$(psql_as "$POSTGRES_USER" postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]]; then
        psql_as "$POSTGRES_USER" postgres -c "CREATE DATABASE $db OWNER instashop_app"
    fi
    psql_as instashop_app "$db" -f "/sql/$db.sql"
done
# The data warehouse of dwh-sink, owned by its own role.
if [[ "$(psql_as "$POSTGRES_USER" postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'dwh'")" != 1 ]]; then
    psql_as "$POSTGRES_USER" postgres -c "CREATE DATABASE dwh OWNER dwh_sink"
fi
psql_as dwh_sink dwh -f /sql/dwh.sql
