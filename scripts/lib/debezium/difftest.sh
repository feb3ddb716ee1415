#!/usr/bin/env bash
# The differential test against real Debezium (scripts/debezium test; run by
# scripts/test). Usage: difftest.sh STATE REST_PORT HEAP
#
# 1. A scratch PostgreSQL cluster (initdb in a temporary directory, free
#    port, wal_level=logical) with the four databases from sql/ under their
#    own names, so both pipelines start on empty tables and the
#    metrics-consumer recognises source.db; plus the edge table
#    (edge-schema.sql) and a one-row `difftest_done` table per database.
# 2. The cdc-reader (own publication difftest_ours, slots difftest_ours_<db>,
#    topics RUN.ours.<db>.*) and Debezium (scripts/debezium up: slots and
#    publications debezium_<db>, topics RUN.debezium.<db>.*), both without a
#    snapshot, on the stack's Kafka cluster; the workload starts once both
#    have an active slot in every database.
# 3. The workload: the generator at --rate for a while on all nine tables,
#    with edge-workload.sql (edge values, unchanged TOAST, delete, key
#    change, ALTER TABLE ADD COLUMN, TRUNCATE) in the middle of it; then one
#    row into difftest_done per database. Done when both topic sets hold
#    those rows and every slot confirmed them.
# 4. compare.py: per table, per key, the two ordered event sequences.
# 5. The metrics-consumer with --topic-prefix on Debezium's topics: its
#    Redis metrics must equal their SQL definitions (pipeline_check.py).
# 6. dwh-sink on each topic set (--topic-prefix RUN.ours. / RUN.debezium.)
#    into its own scratch warehouse (difftest_dwh_ours, difftest_dwh_debezium
#    in the scratch cluster, sql/dwh.sql), until each has stored the end
#    offsets of its nine topics; `dwh-sink verify` must pass on both, and
#    dwh_compare.py must find the same warehouse: change_event's
#    (db, table, key, lsn, op) and contents, every dimension version, the
#    facts with their dimension versions, up to its named exceptions.
# 7. scripts/debezium down; no debezium_% slot may be left.
set -euo pipefail
STATE="$1"
REST_PORT="$2"
HEAP="$3"
source "$(dirname "$0")/../common.sh"
init_state "$STATE"
cd "$REPO_ROOT"

RATE="${DIFFTEST_RATE:-200}"
LOAD_SECS="${DIFFTEST_SECONDS:-20}"
TAG="difftest-$(date -u +%Y%m%d%H%M%S)-$$"
WORK="$STATE/difftest/$TAG"
mkdir -p "$WORK"
[[ -f "$STATE/env" ]] || die "$STATE/env is missing; run scripts/up first"
BOOTSTRAP_ENV="$(sed -n 's/^KAFKA_BOOTSTRAP_SERVERS=//p' "$STATE/env")"
REDIS_ENV="$(sed -n 's/^REDIS_URL=//p' "$STATE/env")"
PY="$STATE/venv/bin/python"
[[ -x "$PY" ]] || die "$PY is missing; run scripts/up first"
if ! "$PY" -c 'import psycopg, redis' 2>/dev/null; then
    "$PY" -m pip install --quiet --disable-pip-version-check 'psycopg[binary]>=3.1' 'redis>=5' >>"$LOG/pip.log" 2>&1 ||
        die "pip install psycopg redis failed; see $LOG/pip.log"
fi
log() { echo "difftest: $*"; }
failed=()

# ------------------------------------------------------------ binaries

# DIFFTEST_BIN_DIR: use the binaries there instead of building (e.g. a
# build of another checkout).
bin_dir="${DIFFTEST_BIN_DIR:-}"
if [[ -z "$bin_dir" ]]; then
    log "building release binaries (generator, cdc-reader, metrics-consumer, dwh-sink)"
    cargo build --release --quiet -p generator -p cdc-reader -p metrics-consumer -p dwh-sink
    bin_dir="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release"
fi
# Copies: a rebuild during the run must not swap a binary under it.
mkdir -p "$WORK/bin"
for bin in generator cdc-reader metrics-consumer dwh-sink; do
    cp "$bin_dir/$bin" "$WORK/bin/$bin"
done

# ------------------------------------------------------------ scratch postgres

PGTMP="$(mktemp -d /tmp/instashop-difftest.XXXXXX)"
PG_SCRATCH_PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
chmod 755 "$PGTMP"
mkdir -p "$PGTMP/data" "$PGTMP/sock"
[[ $EUID -eq 0 ]] && chown postgres:postgres "$PGTMP/data" "$PGTMP/sock"
declare -A PIDS=()
cleanup() {
    local rc=$?
    for name in "${!PIDS[@]}"; do
        kill -TERM "${PIDS[$name]}" 2>/dev/null || true
    done
    for name in "${!PIDS[@]}"; do
        wait "${PIDS[$name]}" 2>/dev/null || true
    done
    if [[ -n "${DBZ_UP:-}" ]]; then
        "$REPO_ROOT/scripts/debezium" down --state-dir "$STATE" --env-file "$WORK/env" --rest-port "$REST_PORT" >/dev/null 2>&1 || true
    fi
    as_pg "$PG_BIN/pg_ctl" stop -D "$PGTMP/data" -m immediate >/dev/null 2>&1 || true
    rm -rf "$PGTMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "scratch postgres on 127.0.0.1:$PG_SCRATCH_PORT ($PGTMP)"
echo postgres >"$PGTMP/pw"
[[ $EUID -eq 0 ]] && chown postgres "$PGTMP/pw"
as_pg "$PG_BIN/initdb" -D "$PGTMP/data" -U postgres --pwfile="$PGTMP/pw" --auth-host=scram-sha-256 \
    --auth-local=trust --encoding=UTF8 --locale=C.UTF-8 >"$WORK/initdb.log" 2>&1 ||
    die "initdb failed; see $WORK/initdb.log"
touch "$PGTMP/postgres.log"
[[ $EUID -eq 0 ]] && chown postgres "$PGTMP/postgres.log"
as_pg "$PG_BIN/pg_ctl" start -D "$PGTMP/data" -w -t 60 -l "$PGTMP/postgres.log" -o \
    "-c port=$PG_SCRATCH_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$PGTMP/sock -c wal_level=logical -c max_replication_slots=16 -c max_wal_senders=16 -c timezone=UTC -c shared_buffers=64MB -c wal_writer_delay=10ms -c max_connections=100" \
    >/dev/null || { cp "$PGTMP/postgres.log" "$WORK/" 2>/dev/null; die "scratch postgres did not start; see $WORK/postgres.log"; }

spsql() { # db, psql args...
    local db="$1"
    shift
    psql -X -q -v ON_ERROR_STOP=1 -h "$PGTMP/sock" -p "$PG_SCRATCH_PORT" -U postgres -d "$db" "$@"
}
spsql postgres -f sql/roles.sql >/dev/null
for db in "${DATABASES[@]}"; do
    spsql postgres -c "CREATE DATABASE $db OWNER instashop_app" >/dev/null
    psql -X -q -v ON_ERROR_STOP=1 -h "$PGTMP/sock" -p "$PG_SCRATCH_PORT" -U instashop_app -d "$db" -f "sql/$db.sql" >/dev/null
    spsql "$db" -c "CREATE TABLE difftest_done (id integer PRIMARY KEY); GRANT SELECT ON difftest_done TO cdc_reader;
        CREATE PUBLICATION difftest_ours FOR ALL TABLES" >/dev/null
done
spsql instashop -f scripts/lib/debezium/edge-schema.sql >/dev/null

url() { echo "postgres://$1:$1@127.0.0.1:$PG_SCRATCH_PORT/$2"; }
{
    echo "PG_ADMIN_URL=postgres://postgres:postgres@127.0.0.1:$PG_SCRATCH_PORT/postgres"
    for db in "${DATABASES[@]}"; do
        echo "PG_${db^^}_URL=$(url instashop_app "$db")"
        echo "CDC_PG_${db^^}_URL=$(url cdc_reader "$db")"
    done
    echo "REDIS_URL=$REDIS_ENV"
    echo "KAFKA_BOOTSTRAP_SERVERS=$BOOTSTRAP_ENV"
} >"$WORK/env"

slot_active() { # slot
    [[ "$(spsql postgres -tAc "SELECT active FROM pg_replication_slots WHERE slot_name = '$1'")" == t ]]
}

# ------------------------------------------------------------ both pipelines

sources=() prefixes=()
for db in "${DATABASES[@]}"; do
    sources+=(--source "$db=$(url cdc_reader "$db")")
    prefixes+=(--topic-prefix "$db=$TAG.ours.$db")
done
log "starting the cdc-reader (topics $TAG.ours.<db>.*)"
INSTASHOP_ENV_FILE="" CDC_METRICS_ADDR=127.0.0.1:0 KAFKA_BOOTSTRAP_SERVERS="$BOOTSTRAP_ENV" \
    "$WORK/bin/cdc-reader" "${sources[@]}" "${prefixes[@]}" --publication difftest_ours \
    --slot 'difftest_ours_{name}' --snapshot-mode never >"$WORK/cdc-reader.log" 2>&1 &
PIDS[cdc-reader]=$!

log "starting Debezium (topics $TAG.debezium.<db>.*)"
DBZ_UP=1
"$REPO_ROOT/scripts/debezium" up --state-dir "$STATE" --env-file "$WORK/env" --prefix "$TAG.debezium" \
    --snapshot-mode no_data --rest-port "$REST_PORT" --heap "$HEAP" | sed 's/^/difftest: /'

deadline=$((SECONDS + 60))
for db in "${DATABASES[@]}"; do
    until slot_active "difftest_ours_$db"; do
        kill -0 "${PIDS[cdc-reader]}" 2>/dev/null || { tail -5 "$WORK/cdc-reader.log"; die "the cdc-reader exited; see $WORK/cdc-reader.log"; }
        ((SECONDS < deadline)) || die "the cdc-reader's slot difftest_ours_$db is not active after 60 s; see $WORK/cdc-reader.log"
        sleep 0.2
    done
done

# ------------------------------------------------------------ workload

log "workload: generator at $RATE events/s for ${LOAD_SECS}s, edge values and schema changes halfway"
INSTASHOP_ENV_FILE="$WORK/env" GENERATOR_METRICS_ADDR=127.0.0.1:0 \
    "$WORK/bin/generator" --rate "$RATE" --duration "${LOAD_SECS}s" >"$WORK/generator.log" 2>&1 &
PIDS[generator]=$!
gen_start=$SECONDS
# Halfway, as the generator's rows stream by.
while ((SECONDS - gen_start < LOAD_SECS / 2)) && kill -0 "${PIDS[generator]}" 2>/dev/null; do
    sleep 0.2
done
spsql instashop -f scripts/lib/debezium/edge-workload.sql >"$WORK/edge.log" 2>&1 ||
    die "edge-workload.sql failed; see $WORK/edge.log"
wait "${PIDS[generator]}" || die "the generator failed; see $WORK/generator.log"
unset 'PIDS[generator]'
for db in "${DATABASES[@]}"; do
    spsql "$db" -c "INSERT INTO difftest_done VALUES (1)" >/dev/null
done

# ------------------------------------------------------------ compare

log "waiting for both pipelines to deliver and confirm everything"
"$PY" scripts/lib/debezium/compare.py --bootstrap "$BOOTSTRAP_ENV" --env-file "$WORK/env" \
    --ours "$TAG.ours" --debezium "$TAG.debezium" --databases "${DATABASES[*]}" \
    --slots "difftest_ours_{db},debezium_{db}" --timeout 180 --report "$WORK/differences.txt" ||
    failed+=("differential comparison (every difference: $WORK/differences.txt)")

kill -TERM "${PIDS[cdc-reader]}" 2>/dev/null || true
wait "${PIDS[cdc-reader]}" 2>/dev/null || true
unset 'PIDS[cdc-reader]'

# ------------------------------------------------------------ drop-in consumer

# The seed's architecture for real: Debezium -> Kafka -> metrics-consumer.
log "metrics-consumer on Debezium's topics (--topic-prefix $TAG.debezium.)"
INSTASHOP_ENV_FILE="" METRICS_ADDR=127.0.0.1:0 KAFKA_BOOTSTRAP_SERVERS="$BOOTSTRAP_ENV" REDIS_URL="$REDIS_ENV" \
    "$WORK/bin/metrics-consumer" --topic-prefix "$TAG.debezium." --group "$TAG" --prefix "$TAG:" \
    --dlq-topic "$TAG.dlq" >"$WORK/metrics-consumer.log" 2>&1 &
PIDS[metrics-consumer]=$!
# Polls the check (each pass reads Redis and SQL once) until it passes or
# the deadline ends; the last output is kept for the failure message.
deadline=$((SECONDS + 120))
until INSTASHOP_ENV_FILE="$WORK/env" "$PY" scripts/lib/pipeline_check.py --env-file "$WORK/env" \
    --skip-replay --prefix "$TAG:" --dlq-topic "" >"$WORK/metrics-check.log" 2>&1; do
    if ! kill -0 "${PIDS[metrics-consumer]}" 2>/dev/null; then
        tail -3 "$WORK/metrics-consumer.log"
        failed+=("metrics-consumer on Debezium's topics: it exited; see $WORK/metrics-consumer.log")
        break
    fi
    if ((SECONDS >= deadline)); then
        grep -E 'DIFFERENT|^  - ' "$WORK/metrics-check.log" | head -10
        failed+=("metrics-consumer on Debezium's topics: metrics differ from SQL after 120 s; see $WORK/metrics-check.log")
        break
    fi
    sleep 1
done
if kill -0 "${PIDS[metrics-consumer]}" 2>/dev/null && [[ " ${failed[*]} " != *metrics-consumer* ]]; then
    log "metrics-consumer on Debezium's topics: every metric equals its SQL definition ($(grep -c ' ok$' "$WORK/metrics-check.log") checked)"
fi
kill -TERM "${PIDS[metrics-consumer]}" 2>/dev/null || true
wait "${PIDS[metrics-consumer]}" 2>/dev/null || true
unset 'PIDS[metrics-consumer]'

# ------------------------------------------------------------ the same warehouse

# The acceptance point "dwh-sink started on Debezium's topics gives the same
# warehouse": one sink per topic set, each into its own scratch warehouse in
# the scratch cluster (whose databases have their logical names, so source.db
# needs no --source-dbs alias). The topics are complete: compare.py waited
# for both pipelines, and the cdc-reader has stopped.
dwh_start=$SECONDS
dwh_failed=""
dwh_fail() { failed+=("$1"); dwh_failed=1; }
dwh_tables=()
for topic in "${TOPICS[@]}"; do
    [[ "$topic" == *.dlq ]] || dwh_tables+=("$topic")
done
# dwh_topics SIDE: that side's nine topics, comma-separated.
dwh_topics() {
    local out=() topic
    for topic in "${dwh_tables[@]}"; do
        out+=("$TAG.$1.$topic")
    done
    (IFS=,; echo "${out[*]}")
}
declare -A DWH_URL=() DWH_WANT=()
pending=()
log "dwh-sink on each topic set into its own scratch warehouse (difftest_dwh_ours, difftest_dwh_debezium)"
for side in ours debezium; do
    spsql postgres -c "CREATE DATABASE difftest_dwh_$side OWNER dwh_sink" >/dev/null
    psql -X -q -v ON_ERROR_STOP=1 -h "$PGTMP/sock" -p "$PG_SCRATCH_PORT" -U dwh_sink -d "difftest_dwh_$side" \
        -f sql/dwh.sql >/dev/null
    DWH_URL[$side]="$(url dwh_sink "difftest_dwh_$side")"
    # What the sink must have stored when done: its topics' end offsets.
    if ! DWH_WANT[$side]="$("$PY" scripts/lib/debezium/dwh_compare.py offsets --bootstrap "$BOOTSTRAP_ENV" \
        --topics "$(dwh_topics "$side")")"; then
        dwh_fail "dwh-sink on $side topics: could not read the end offsets of $TAG.$side.*"
        continue
    fi
    INSTASHOP_ENV_FILE="" DWH_URL="${DWH_URL[$side]}" KAFKA_BOOTSTRAP_SERVERS="$BOOTSTRAP_ENV" \
        "$WORK/bin/dwh-sink" --topic-prefix "$TAG.$side." --topics "$(IFS=,; echo "${dwh_tables[*]}")" \
        --metrics-addr 127.0.0.1:0 --dlq-topic "$TAG.dlq-dwh-$side" >"$WORK/dwh-sink-$side.log" 2>&1 &
    PIDS[dwh-sink-$side]=$!
    pending+=("$side")
done
started=(${pending[@]+"${pending[@]}"})
# Each sink is done when the offsets it stored with its batches add up to
# its topics' end offsets.
deadline=$((SECONDS + 120))
while ((${#pending[@]})); do
    waiting=()
    for side in "${pending[@]}"; do
        stored="$(psql -X -qtA "${DWH_URL[$side]}" -c "SELECT coalesce(sum(next_offset), 0) FROM sink_offset" 2>/dev/null)" ||
            stored=0
        if ((stored >= DWH_WANT[$side])); then
            log "dwh-sink on $side topics: stored every offset (${DWH_WANT[$side]} messages) after $((SECONDS - dwh_start)) s"
        elif ! kill -0 "${PIDS[dwh-sink-$side]}" 2>/dev/null; then
            tail -3 "$WORK/dwh-sink-$side.log"
            dwh_fail "dwh-sink on $side topics: it exited; see $WORK/dwh-sink-$side.log"
        elif ((SECONDS >= deadline)); then
            dwh_fail "dwh-sink on $side topics: $stored of ${DWH_WANT[$side]} offsets stored after 120 s; see $WORK/dwh-sink-$side.log"
        else
            waiting+=("$side")
        fi
    done
    pending=(${waiting[@]+"${waiting[@]}"})
    if ((${#pending[@]})); then sleep 0.5; fi
done
for side in ${started[@]+"${started[@]}"}; do
    kill -TERM "${PIDS[dwh-sink-$side]}" 2>/dev/null || true
    rc=0
    wait "${PIDS[dwh-sink-$side]}" 2>/dev/null || rc=$?
    unset "PIDS[dwh-sink-$side]"
    if ((rc != 0)) && [[ -z "$dwh_failed" ]]; then
        dwh_fail "dwh-sink on $side topics: exit status $rc after SIGTERM; see $WORK/dwh-sink-$side.log"
    fi
done
# A dead-lettered message is missing from its warehouse.
dlq="$("$PY" scripts/lib/debezium/dwh_compare.py offsets --bootstrap "$BOOTSTRAP_ENV" --missing-ok \
    --topics "$TAG.dlq-dwh-ours,$TAG.dlq-dwh-debezium")" || dlq="(unknown)"
[[ "$dlq" == 0 ]] || dwh_fail "dwh-sink: $dlq messages dead-lettered ($TAG.dlq-dwh-ours, $TAG.dlq-dwh-debezium)"
if [[ -z "$dwh_failed" ]]; then
    for side in ours debezium; do
        if INSTASHOP_ENV_FILE="" DWH_URL="${DWH_URL[$side]}" "$WORK/bin/dwh-sink" verify \
            --instashop-url "$(url instashop_app instashop)" --crm-url "$(url instashop_app crm)" \
            --erp-url "$(url instashop_app erp)" --ecommerce-url "$(url instashop_app ecommerce)" \
            >"$WORK/dwh-verify-$side.log" 2>&1; then
            log "dwh-sink verify, warehouse from $side topics: equals the sources ($(grep -c '^ok ' "$WORK/dwh-verify-$side.log") checks)"
        else
            grep -E '^DIFF|^error' "$WORK/dwh-verify-$side.log" | head -10
            dwh_fail "dwh-sink verify, warehouse from $side topics: differences; see $WORK/dwh-verify-$side.log"
        fi
    done
    # One line per check; every difference into the report.
    if "$PY" scripts/lib/debezium/dwh_compare.py compare --ours "${DWH_URL[ours]}" --debezium "${DWH_URL[debezium]}" \
        --report "$WORK/dwh-differences.txt" | tee "$WORK/dwh-compare.log"; then
        log "dwh-sink on Debezium's topics: the same warehouse as on ours ($(sed -n 's/^dwh-compare: PASS: //p' "$WORK/dwh-compare.log"); step $((SECONDS - dwh_start)) s)"
    else
        dwh_fail "dwh-sink on Debezium's topics: not the same warehouse as on ours (every difference: $WORK/dwh-differences.txt)"
    fi
fi
# The scratch cluster goes at exit anyway (with a failing run's warehouses:
# the logs and the report stay in WORK); dropped here all the same.
for side in ours debezium; do
    spsql postgres -c "DROP DATABASE IF EXISTS difftest_dwh_$side WITH (FORCE)" >/dev/null ||
        log "could not drop difftest_dwh_$side (harmless: the scratch cluster is removed at exit)"
done

# ------------------------------------------------------------ cleanup check

"$REPO_ROOT/scripts/debezium" down --state-dir "$STATE" --env-file "$WORK/env" --rest-port "$REST_PORT" | sed 's/^/difftest: /'
DBZ_UP=""
left="$(spsql postgres -tAc "SELECT string_agg(slot_name || CASE WHEN active THEN ' (active)' ELSE '' END, ', ') FROM pg_replication_slots WHERE slot_name LIKE 'debezium%'")"
if [[ -n "$left" ]]; then
    failed+=("scripts/debezium down left replication slots: $left")
else
    log "no Debezium slot left after scripts/debezium down"
fi

if ((${#failed[@]})); then
    printf 'difftest: FAIL: %s\n' "${failed[@]}"
    exit 1
fi
# Nothing of a passing run is kept: its topics and Redis keys go (a failing
# run keeps them, and WORK, for a look).
"$PY" - "$BOOTSTRAP_ENV" "$REDIS_ENV" "$TAG" <<'PY' || log "could not delete the run's topics or Redis keys (harmless)"
import sys
import redis
from confluent_kafka.admin import AdminClient
bootstrap, redis_url, tag = sys.argv[1:4]
admin = AdminClient({"bootstrap.servers": bootstrap})
topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(tag + ".")]
for future in (admin.delete_topics(topics).values() if topics else []):
    future.result()
r = redis.Redis.from_url(redis_url)
for key in r.scan_iter(match=tag + ":*", count=1000):
    r.delete(key)
PY
rm -rf "$WORK"
log "PASS"
