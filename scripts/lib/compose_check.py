"""Checks that docker-compose.yml parses and agrees with scripts/up.

Used by scripts/test (after `docker compose config` when a compose client is
installed; on its own otherwise). Checks: the YAML parses; the services
exist; Kafka runs in KRaft mode with three brokers, replication factor 3 and
min.insync.replicas=2; kafka-init creates exactly scripts/up's topics with
the same partition count; every binary gets the env variables that
.local/env defines, and every variable given to a binary is one the Rust
code reads; the host ports equal the local stack's.
Prints one line per problem and exits 1 when there is any.
"""

import argparse
import base64
import binascii
import pathlib
import sys

import yaml

# The contract of .local/env that the binaries read (INSTASHOP_* extras and
# the superuser URL are for scripts and tests, not for the binaries).
APP_ENV = [
    "PG_INSTASHOP_URL",
    "PG_CRM_URL",
    "PG_ERP_URL",
    "PG_ECOMMERCE_URL",
    "CDC_PG_INSTASHOP_URL",
    "CDC_PG_CRM_URL",
    "CDC_PG_ERP_URL",
    "CDC_PG_ECOMMERCE_URL",
    "REDIS_URL",
    "KAFKA_BOOTSTRAP_SERVERS",
]
NOT_FOR_APPS = {"PG_ADMIN_URL"}
APPS = ["generator", "cdc-reader", "metrics-consumer", "dwh-sink"]
BROKERS = ["kafka-1", "kafka-2", "kafka-3"]
HOST_PORTS = {
    "postgres": "54329",
    "redis": "63790",
    "kafka-1": "19092",
    "kafka-2": "19093",
    "kafka-3": "19094",
}


def env_of(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("file")
    parser.add_argument("--topics", nargs="+", required=True)
    parser.add_argument("--partitions", required=True)
    parser.add_argument("--env-file-vars", default="", help="comma-separated names from .local/env")
    parser.add_argument("--kafka-version", help="the Kafka version scripts/up runs")
    parser.add_argument("--broker-properties", help="scripts/up's server.properties of node 1")
    parser.add_argument("--rust-root", help="workspace root: every app env variable must appear in its Rust code")
    args = parser.parse_args()

    problems = []
    try:
        with open(args.file, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        print(f"error: {args.file} does not parse: {e}", file=sys.stderr)
        sys.exit(1)
    services = doc.get("services") or {}

    for name in ["postgres", "redis", *BROKERS, "kafka-init", *APPS]:
        if name not in services:
            problems.append(f"service {name} is missing")

    for name in BROKERS:
        env = env_of(services.get(name, {}))
        if "controller" not in env.get("KAFKA_PROCESS_ROLES", ""):
            problems.append(f"{name}: not a KRaft controller (KAFKA_PROCESS_ROLES)")
        if len(env.get("KAFKA_CONTROLLER_QUORUM_VOTERS", "").split(",")) != 3:
            problems.append(f"{name}: KAFKA_CONTROLLER_QUORUM_VOTERS must name three voters")
        if env.get("KAFKA_DEFAULT_REPLICATION_FACTOR") != "3":
            problems.append(f"{name}: KAFKA_DEFAULT_REPLICATION_FACTOR must be 3")
        if env.get("KAFKA_MIN_INSYNC_REPLICAS") != "2":
            problems.append(f"{name}: KAFKA_MIN_INSYNC_REPLICAS must be 2")
        cluster_id = env.get("CLUSTER_ID", "")
        try:
            ok = len(base64.urlsafe_b64decode(cluster_id + "==")) == 16
        except (binascii.Error, ValueError):
            ok = False
        if not ok:
            problems.append(f"{name}: CLUSTER_ID must be a url-safe base64 16-byte UUID (22 chars)")
        if not services.get(name, {}).get("image", "").startswith("apache/kafka:"):
            problems.append(f"{name}: image must be apache/kafka")

    if args.kafka_version:
        for name in [*BROKERS, "kafka-init"]:
            image = services.get(name, {}).get("image", "")
            if image != f"apache/kafka:{args.kafka_version}":
                problems.append(f"{name}: image is {image}, scripts/up runs apache/kafka:{args.kafka_version}")

    if args.broker_properties:
        # Listener, node and path settings differ by design (container names,
        # ports, volumes); every other broker setting must be the same.
        per_node = {
            "node.id", "controller.quorum.voters", "listeners", "advertised.listeners",
            "inter.broker.listener.name", "listener.security.protocol.map", "log.dirs",
            "controller.listener.names", "process.roles",
        }
        with open(args.broker_properties, encoding="utf-8") as f:
            props = dict(
                line.strip().split("=", 1)
                for line in f
                if "=" in line and not line.lstrip().startswith("#")
            )
        for name in BROKERS:
            env = env_of(services.get(name, {}))
            for key, value in sorted(props.items()):
                if key in per_node:
                    continue
                var = "KAFKA_" + key.upper().replace(".", "_")
                if env.get(var) != value:
                    problems.append(f"{name}: {var} is {env.get(var)!r}, scripts/up sets {key}={value}")

    init_env = env_of(services.get("kafka-init", {}))
    compose_topics = init_env.get("TOPICS", "").split()
    if sorted(compose_topics) != sorted(args.topics):
        missing = sorted(set(args.topics) - set(compose_topics))
        extra = sorted(set(compose_topics) - set(args.topics))
        problems.append(f"kafka-init TOPICS differ from scripts/up: missing {missing}, extra {extra}")
    if init_env.get("PARTITIONS") != args.partitions:
        problems.append(f"kafka-init PARTITIONS is {init_env.get('PARTITIONS')}, scripts/up uses {args.partitions}")

    wanted = set(APP_ENV)
    if args.env_file_vars:
        file_vars = {v for v in args.env_file_vars.split(",") if v and not v.startswith("INSTASHOP_")}
        wanted |= file_vars - NOT_FOR_APPS
    for name in APPS:
        env = env_of(services.get(name, {}))
        for var in sorted(wanted - set(env)):
            problems.append(f"{name}: environment lacks {var} (scripts/up writes it to .local/env)")

    if args.rust_root:
        root = pathlib.Path(args.rust_root)
        code = "\n".join(
            p.read_text(encoding="utf-8", errors="replace")
            for p in root.glob("*/src/**/*.rs")
            if "target" not in p.parts
        )
        for name in APPS + ["dashboard"]:
            if name not in services:
                continue
            for var in sorted(env_of(services[name])):
                if var != "RUST_LOG" and f'"{var}"' not in code:
                    problems.append(f"{name}: {var} is not read by any binary (no \"{var}\" in */src)")

    for name, port in HOST_PORTS.items():
        ports = [str(p) for p in services.get(name, {}).get("ports", [])]
        if not any(p.split(":")[-2] == port for p in ports if p.count(":") >= 1):
            problems.append(f"{name}: host port {port} (as in scripts/up) is not published")

    for p in problems:
        print(f"docker-compose.yml: {p}")
    if problems:
        sys.exit(1)
    print(f"docker-compose.yml: {len(services)} services agree with scripts/up")


if __name__ == "__main__":
    main()
