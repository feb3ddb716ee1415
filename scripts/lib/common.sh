# shellcheck shell=bash disable=SC2034
# Shared helpers for the local-stack scripts (sourced, never executed).
#
# Layout of the state directory (default: .local/ in the repository root):
#   env          KEY=value lines read by the binaries and tests
#   pg/          PostgreSQL data directory      pgsock/  its unix socket
#   redis/       Redis data (AOF + RDB)
#   kafka/       cluster-id, log4j2 settings, broker-N/{server.properties,data/}
#   kafka-dist/  Apache Kafka's jars from Maven (libs/), fetched once per version
#   venv/        Python venv with confluent-kafka (Admin API helpers, pipeline checks)
#   run/*.pid    one PID file per service       log/*.log one log per service
#                                               log/broker-N/ each broker's own logs

# Ports chosen to stay clear of system services on 5432/6379/9092. The
# INSTASHOP_*_PORT(S) variables move them, e.g. for a second, throwaway stack
# in another state directory beside the main one.
PG_PORT="${INSTASHOP_PG_PORT:-54329}"
REDIS_PORT="${INSTASHOP_REDIS_PORT:-63790}"
read -r -a BROKER_PORTS <<<"${INSTASHOP_BROKER_PORTS:-19092 19093 19094}"
# The KRaft controller listeners of the same three nodes.
read -r -a CONTROLLER_PORTS <<<"${INSTASHOP_CONTROLLER_PORTS:-19192 19193 19194}"
# The one Apache Kafka version of the project: the local cluster, the
# docker-compose.yml image and Kafka Connect. scripts/lib/kafka/pom.xml has
# the same default; scripts/test checks that the three agree.
KAFKA_VERSION=4.3.1
# Each broker's JVM heap, fixed (no resizing). Three brokers, PostgreSQL and
# the binaries share two cores, so GC time is what to save, not memory:
# measured under the e2e benchmark's load, 512 MiB spent 12.5 s of the
# brokers' 41.5 s CPU in G1 (concurrent marking cycle after cycle), 1 GiB
# 0.6 s. Resident memory is then about 0.5-1.3 GiB per broker.
KAFKA_HEAP="${INSTASHOP_KAFKA_HEAP:-1g}"
# Largest record batch the brokers and topics accept (17 MiB): events up to
# 16 MiB (a wide REPLICA IDENTITY FULL row with big TOASTed values) plus
# headroom for the batch header.
KAFKA_MAX_MESSAGE_BYTES=17825792
# Python's confluent-kafka (a current librdkafka): the Admin API helpers of
# the scripts and the pipeline checks.
CONFLUENT_KAFKA_VERSION=2.16.1
PG_BIN=/usr/lib/postgresql/15/bin
DATABASES=(instashop crm erp ecommerce)
METRICS_GROUP=instashop-metrics
SERVICES=(postgres redis broker-1 broker-2 broker-3)
# Per-table topics plus the consumer's dead-letter topic, 3 partitions each.
TOPICS=(
    instashop.public.customer
    instashop.public.buyer
    instashop.public.product
    instashop.public.transaction
    instashop.public.transactiondetail
    crm.public.interaction
    erp.public.stock
    ecommerce.public.carrier
    ecommerce.public.shipment
    metrics.dlq
)
TOPIC_PARTITIONS=3

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"

die() {
    echo "error: $*" >&2
    exit 1
}

say() {
    echo "$*"
}

# Sets STATE and the derived paths. Precedence: --state-dir flag (passed in
# as $1), then $INSTASHOP_STATE_DIR, then .local in the repository root.
# With a second argument --no-create (scripts that only look: status, down),
# a missing directory is not created.
init_state() {
    local requested="${1:-${INSTASHOP_STATE_DIR:-$REPO_ROOT/.local}}"
    local create=1
    [[ "${2:-}" == --no-create ]] && create=0
    if ((create)); then
        mkdir -p "$requested"
    fi
    if [[ -d "$requested" ]]; then
        STATE="$(cd "$requested" && pwd)"
    else
        STATE="$(realpath -m "$requested")"
    fi
    RUN="$STATE/run"
    LOG="$STATE/log"
    PGDATA="$STATE/pg"
    PGSOCK="$STATE/pgsock"
    VENV="$STATE/venv"
    PY="$VENV/bin/python"
    KAFKA_TOOL="$REPO_ROOT/scripts/lib/kafka_tool.py"
    KAFKA_LIBS="$STATE/kafka-dist/libs"
    BOOTSTRAP="$(IFS=,; echo "${BROKER_PORTS[*]/#/127.0.0.1:}")"
    if ((create)); then
        mkdir -p "$RUN" "$LOG"
    fi
}

# Runs a command as the postgres OS user when we are root (initdb and the
# server refuse to run as root), else as ourselves.
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# poll DEADLINE_SECONDS DESCRIPTION CMD...: re-runs CMD every 0.1 s until it
# succeeds; fails with one line after the deadline.
poll() {
    local deadline=$((SECONDS + $1)) what="$2"
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "error: timed out waiting for $what" >&2
            return 1
        fi
        sleep 0.1
    done
}

# PID from a pidfile if that process is alive, else nothing (and status 1).
live_pid() {
    local file="$1" pid
    [[ -s "$file" ]] || return 1
    pid="$(head -n1 "$file" | tr -dc 0-9)"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

# PID of the process listening on 127.0.0.1:PORT (or any address), if any.
port_pid() {
    ss -ltnpH "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2  || true
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# The state directory an InstaShop service process belongs to, from its
# command line or working directory; empty for foreign processes.
stack_dir_of_pid() {
    local pid="$1" cmd cwd
    cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    cwd="$(readlink "/proc/$pid/cwd" 2>/dev/null || true)"
    cwd="${cwd% (deleted)}"
    if [[ "$cmd" =~ -D\ ([^ ]+)/pg ]]; then
        # A data directory kept outside STATE (see pg_paths in scripts/up)
        # names its state directory in a file beside it.
        cat "${BASH_REMATCH[1]}/state-dir" 2>/dev/null || echo "${BASH_REMATCH[1]}"
    elif [[ "$cmd" == *redis-server* && "$cwd" == */redis ]]; then
        echo "${cwd%/redis}"
    elif [[ "$cmd" =~ kafka\.Kafka\ ([^ ]+)/kafka/broker-[0-9]+/server\.properties ]]; then
        echo "${BASH_REMATCH[1]}"
    fi
}

# Fails with one line when PORT is held by a process that is not OUR_PID.
check_port() {
    local port="$1" name="$2" our_pid="${3:-}" holder other
    holder="$(port_pid "$port")"
    [[ -z "$holder" || "$holder" == "$our_pid" ]] && return 0
    # A postgres child process may show up as the holder; its parent is ours.
    if [[ -n "$our_pid" && "$(ps -o ppid= -p "$holder" 2>/dev/null | tr -d ' ')" == "$our_pid" ]]; then
        return 0
    fi
    other="$(stack_dir_of_pid "$holder")"
    if [[ -n "$other" && "$other" != "$STATE" ]]; then
        die "port $port ($name) is held by the InstaShop stack in $other (pid $holder); stop it with: scripts/down --state-dir $other"
    fi
    die "port $port ($name) is held by another process: pid $holder ($(ps -o comm= -p "$holder" 2>/dev/null || echo unknown)); stop it and re-run"
}

pidfile() {
    echo "$RUN/$1.pid"
}

# Port of a service name.
service_port() {
    case "$1" in
    postgres) echo "$PG_PORT" ;;
    redis) echo "$REDIS_PORT" ;;
    broker-[123]) echo "${BROKER_PORTS[${1#broker-} - 1]}" ;;
    controller-[123]) echo "${CONTROLLER_PORTS[${1#controller-} - 1]}" ;;
    *) return 1 ;;
    esac
}

valid_service() {
    local s
    for s in "${SERVICES[@]}"; do [[ "$s" == "$1" ]] && return 0; done
    die "unknown service '$1' (expected one of: ${SERVICES[*]})"
}

# apt_install PACKAGE...: apt-get update (once per script run), then install.
APT_UPDATED=0
apt_install() {
    [[ $EUID -eq 0 ]] || die "missing Debian packages: $*; install them with: sudo apt-get install $*"
    if ((APT_UPDATED == 0)); then
        say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"$LOG/apt.log" 2>&1 ||
            die "apt-get update failed; see $LOG/apt.log"
        APT_UPDATED=1
    fi
    say "installing Debian packages: $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >>"$LOG/apt.log" 2>&1 ||
        die "apt-get install $* failed; see $LOG/apt.log"
}

# Properties of node N of the three (scripts/up writes them; scripts/test
# checks that docker-compose.yml sets the same): broker and KRaft controller in one process, as the
# Kafka quickstart runs it. Settings beyond the defaults protect the
# pipeline's guarantees (replication 3, two in-sync copies for acks=all, no
# unclean election) or size the node for a two-core development machine.
node_properties() {
    local n="$1" voters="" i
    for i in 1 2 3; do
        voters+="${voters:+,}$i@127.0.0.1:${CONTROLLER_PORTS[i - 1]}"
    done
    cat <<PROPS
# Written by scripts/up; re-running it overwrites this file.
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:${BROKER_PORTS[n - 1]},CONTROLLER://127.0.0.1:${CONTROLLER_PORTS[n - 1]}
advertised.listeners=PLAINTEXT://127.0.0.1:${BROKER_PORTS[n - 1]}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$STATE/kafka/broker-$n/data

# Replication: every topic on all three nodes, a write acknowledged (acks=all)
# once two copies have it, and never a leader that missed acknowledged writes.
num.partitions=$TOPIC_PARTITIONS
default.replication.factor=3
min.insync.replicas=2
unclean.leader.election.enable=false
offsets.topic.replication.factor=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
# Topics are created explicitly (scripts/up, the reader), never by a typo.
auto.create.topics.enable=false

# Events up to 16 MiB (wide REPLICA IDENTITY FULL rows).
message.max.bytes=$KAFKA_MAX_MESSAGE_BYTES
replica.fetch.max.bytes=$KAFKA_MAX_MESSAGE_BYTES
replica.fetch.response.max.bytes=$((KAFKA_MAX_MESSAGE_BYTES * 3))

# Two cores for three nodes and the rest of the stack.
num.network.threads=2
num.io.threads=2
num.replica.fetchers=1
background.threads=2
num.recovery.threads.per.data.dir=1
# A consumer group of one starts consuming at once.
group.initial.rebalance.delay.ms=0
log.retention.hours=168
log.segment.bytes=268435456
PROPS
}

# The classpath of Apache Kafka's jars, or a one-line error when scripts/up
# has not fetched them yet.
kafka_classpath() {
    [[ -f "$KAFKA_LIBS/.fetched" ]] ||
        die "Apache Kafka's jars are not in $KAFKA_LIBS yet; run scripts/up first"
    echo "$KAFKA_LIBS/*"
}

psql_super() {
    psql -X -q -v ON_ERROR_STOP=1 -h "$PGSOCK" -p "$PG_PORT" -U postgres "$@"
}

# stop_pid NAME PID SIGNAL DEADLINE: graceful signal, then SIGKILL after the
# deadline.
stop_pid() {
    local name="$1" pid="$2" sig="$3" deadline="$4"
    kill "-$sig" "$pid" 2>/dev/null || return 0
    if ! poll "$deadline" "$name to stop" bash -c "! kill -0 $pid 2>/dev/null"; then
        echo "$name (pid $pid) did not stop within ${deadline}s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        poll 10 "$name to die" bash -c "! kill -0 $pid 2>/dev/null" || true
    fi
}

# The browser tests drive Chromium from Node.js over a WebSocket. Node 21+
# has WebSocket built in, Node 20.10+ behind --experimental-websocket; older
# Node (Debian 12 ships 18) gets the `ws` package from npm under the state
# directory. Installs chromium and nodejs when missing, then exports
# INSTASHOP_NODE_FLAGS (read by dashboard/tests/browser.rs) and NODE_PATH.
ensure_browser_driver() {
    local want=()
    [[ -x /usr/bin/chromium ]] || want+=(chromium)
    command -v node >/dev/null || want+=(nodejs npm)
    ((${#want[@]} == 0)) || apt_install "${want[@]}"
    if node -e 'if (typeof WebSocket !== "function") process.exit(1)' 2>/dev/null; then
        export INSTASHOP_NODE_FLAGS="--no-warnings"
    elif node --no-warnings --experimental-websocket -e 'if (typeof WebSocket !== "function") process.exit(1)' 2>/dev/null; then
        export INSTASHOP_NODE_FLAGS="--no-warnings --experimental-websocket"
    else
        local dir="$STATE/node"
        if [[ ! -d "$dir/node_modules/ws" ]]; then
            command -v npm >/dev/null || apt_install npm
            say "installing the ws package for node $(node --version) (npm install ws@8)"
            npm install --silent --no-audit --no-fund --prefix "$dir" ws@8 >>"$LOG/npm.log" 2>&1 ||
                die "npm install ws failed; see $LOG/npm.log"
        fi
        export INSTASHOP_NODE_FLAGS="--no-warnings"
        export NODE_PATH="$dir/node_modules${NODE_PATH:+:$NODE_PATH}"
    fi
}
