"""End-to-end exactness check of the whole pipeline, used by scripts/chaos.

Two independent proofs, each computed from the sources of truth only:

(a) replay: every table topic, consumed from the beginning and applied by key
    (c/r/u: the row becomes `after`; d: removed; t: table emptied), equals the
    table's current rows, every column. Event values are parsed back from
    Debezium's JSON representations (decimal strings, ISO-8601 UTC timestamps,
    days since the epoch, JSON strings for jsonb, base64 for bytea) and compared
    with the values psycopg reads from Postgres, so a rendering bug shows up as
    a difference, not as a false pass.

(b) metrics: every Redis key of the metrics table in the README equals its SQL
    definition on the source databases.

Prints PASS, or FAIL with the differences found; exit status 0 / 1 (2 for a
usage or connection problem).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import decimal
import json
import os
import sys
import time
import uuid

TABLES = {
    "instashop": ["customer", "buyer", "product", "transaction", "transactiondetail"],
    "crm": ["interaction"],
    "erp": ["stock"],
    "ecommerce": ["carrier", "shipment"],
}
EPOCH_DATE = dt.date(1970, 1, 1)
UNAVAILABLE = "__debezium_unavailable_value"


def die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def db_url(env: dict[str, str], db: str) -> str:
    key = f"PG_{db.upper()}_URL"
    if key not in env:
        die(f"{key} is not set: run scripts/up (it writes .local/env) or export it")
    return env[key]


def connect_pg(env: dict[str, str], db: str):
    import psycopg

    url = db_url(env, db)
    try:
        return psycopg.connect(url, autocommit=True)
    except Exception as exc:  # one line, no password
        die(f"cannot connect to database {db}: {type(exc).__name__}: {str(exc).splitlines()[0]}")


# ---------------------------------------------------------------- replay (a)


def column_types(conn, table: str) -> dict[str, str]:
    rows = conn.execute(
        """SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typtype
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
            WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped""",
        (f"public.{table}",),
    ).fetchall()
    return {name: ("enum" if typtype == "e" else fmt) for name, fmt, typtype in rows}


def from_event(value, pg_type: str):
    """Debezium JSON value -> the Python value psycopg would return."""
    if value is None:
        return None
    if value == UNAVAILABLE:
        return UNAVAILABLE
    if pg_type.endswith("[]"):
        return [from_event(v, pg_type[:-2]) for v in value]
    if pg_type.startswith("numeric"):
        return decimal.Decimal(str(value))
    if pg_type.startswith("timestamp with time zone"):
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if pg_type == "date":
        return EPOCH_DATE + dt.timedelta(days=value)
    if pg_type in ("jsonb", "json"):
        return json.loads(value)
    if pg_type == "bytea":
        return base64.b64decode(value)
    if pg_type == "uuid":
        return uuid.UUID(value)
    if pg_type.startswith("character(") or pg_type == "bpchar":
        return value
    return value


def normalise_db(value, pg_type: str):
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, decimal.Decimal):
        return value
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.timezone.utc)
    return value


ISOLATION = "read_uncommitted"


def consume_topic(bootstrap: str, topic: str, timeout_s: float):
    """Every message of `topic` from offset 0 to the high watermark, in
    partition order (per-key order is what matters: a key lives in one
    partition). With --isolation read_committed, aborted transactions are
    skipped and the last offsets may be commit markers, so a partition is
    done once the consumer's position reaches the watermark."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"pipeline-check-{os.getpid()}-{time.time_ns()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": ISOLATION,
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s)
        if topic not in meta.topics or meta.topics[topic].error is not None:
            die(f"topic {topic} does not exist on {bootstrap}")
        partitions = sorted(meta.topics[topic].partitions)
        ends = {}
        for p in partitions:
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
            ends[p] = high
        wanted = {p for p in partitions if ends[p] > 0}
        consumer.assign([TopicPartition(topic, p, 0) for p in wanted])
        out: dict[int, list] = {p: [] for p in partitions}
        deadline = time.monotonic() + timeout_s
        while wanted:
            if time.monotonic() > deadline:
                die(f"timed out reading {topic}: partitions {sorted(wanted)} not read to their end")
            if ISOLATION == "read_committed":
                # Before the next poll: every message below the position was handed out.
                for tp in consumer.position([TopicPartition(topic, p) for p in wanted]):
                    if tp.offset >= ends[tp.partition]:
                        wanted.discard(tp.partition)
                if not wanted:
                    break
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                continue
            p = msg.partition()
            if p in wanted and msg.offset() < ends[p]:
                value = msg.value()
                if value is None:
                    # A null value may be the reader's snapshot-complete
                    # marker: its headers carry what it says.
                    value = snapshot_marker(msg.headers())
                out[p].append((msg.offset(), msg.key(), value))
                if msg.offset() + 1 >= ends[p]:
                    wanted.discard(p)
        return out
    finally:
        consumer.close()


class SnapshotMarker:
    """The reader's snapshot-complete marker (null key, null value, headers
    cdc.marker=snapshot_complete, cdc.db, cdc.schema, cdc.table,
    cdc.commit_lsn, cdc.lsn), sent to every partition of a table's topic
    after the table's snapshot rows."""

    def __init__(self, commit_lsn: int, lsn: int):
        self.commit_lsn = commit_lsn
        self.lsn = lsn


def snapshot_marker(headers) -> SnapshotMarker | None:
    fields = {k: (v or b"").decode("utf-8", "replace") for k, v in (headers or [])}
    if fields.get("cdc.marker") != "snapshot_complete":
        return None
    try:
        return SnapshotMarker(int(fields["cdc.commit_lsn"]), int(fields["cdc.lsn"]))
    except (KeyError, ValueError):
        die(f"snapshot marker with unreadable headers: {fields}")
        return None


def replay(bootstrap: str, db: str, table: str, types: dict[str, str], timeout_s: float):
    topic = f"{db}.public.{table}"
    rows: dict[str, dict] = {}
    problems: list[str] = []
    events = []
    for partition, messages in consume_topic(bootstrap, topic, timeout_s).items():
        for offset, key, value in messages:
            events.append((partition, offset, key, value))
    # A key lives in one partition, but offset order is not always commit
    # order: a reader killed while a partition leader fails over can have
    # unacknowledged batches appended after its successor's resends of the
    # same transactions (seen in chaos runs). So, as a careful consumer
    # does, each key keeps the event with the highest position
    # (source.commit_lsn, source.lsn); an older event that arrives later is
    # skipped, and a delete keeps its position so an older create cannot
    # bring the row back. A TRUNCATE (op t) wipes everything before it:
    # events whose change LSN precedes the latest truncate are skipped
    # (TRUNCATE takes an exclusive lock, so no transaction that wrote the
    # table before it can commit after it).
    # A snapshot-complete marker: every row whose newest event committed
    # before that snapshot (position below (marker commit_lsn, 0)) and that
    # the snapshot did not re-read is gone (deleted while the reader had no
    # slot). Each snapshot is a whole image, so the latest marker decides.
    decoded = []
    snapshot_before = None
    for partition, offset, key, value in sorted(events, key=lambda e: (e[0], e[1])):
        if isinstance(value, SnapshotMarker):
            at = (value.commit_lsn, 0)
            snapshot_before = at if snapshot_before is None else max(snapshot_before, at)
            continue
        if value is None:
            continue  # tombstone: the delete before it already removed the row
        try:
            event = json.loads(value)
        except ValueError:
            problems.append(f"{topic}[{partition}]@{offset}: value is not JSON")
            continue
        if "payload" in event and "schema" in event:
            event = event["payload"]
        source = event.get("source") or {}
        lsn = int(source.get("lsn") or 0)
        position = (int(source.get("commit_lsn") or lsn), lsn)
        decoded.append((lsn, key, event, position))
    truncated_at = max((lsn for lsn, _k, e, _p in decoded if e.get("op") == "t"), default=None)
    if truncated_at is not None:
        decoded = [d for d in decoded if d[0] >= truncated_at]
    newest: dict[str, tuple[int, int]] = {}

    def newer(pk: str, position: tuple[int, int]) -> bool:
        if position < newest.get(pk, (-1, -1)):
            return False
        newest[pk] = position
        return True

    for _lsn, key, event, position in decoded:
        op = event.get("op")
        if op in ("c", "r", "u"):
            after = event.get("after")
            if after is None:
                problems.append(f"{topic}: {op} event without after")
                continue
            row = {k: from_event(v, types.get(k, "text")) for k, v in after.items()}
            pk = row_key(row, key)
            if not newer(pk, position):
                continue
            if op == "u" and event.get("before"):
                old_key = row_key({k: from_event(v, types.get(k, "text")) for k, v in event["before"].items()}, None)
                if old_key != pk and newer(old_key, position):
                    rows.pop(old_key, None)
            rows[pk] = row
        elif op == "d":
            before = event.get("before") or {}
            pk = row_key({k: from_event(v, types.get(k, "text")) for k, v in before.items()}, key)
            if newer(pk, position):
                rows.pop(pk, None)
        elif op == "t":
            pass  # already applied: everything before the latest truncate was dropped above
        else:
            problems.append(f"{topic}: unknown op {op!r}")
    if snapshot_before is not None:
        for pk in [pk for pk in rows if newest.get(pk, (-1, -1)) < snapshot_before]:
            del rows[pk]
    return rows, problems


ABSENT = "<absent>"


def same_value(replayed, actual) -> bool:
    """Equality that also sees a numeric's scale: Decimal('4.0') == Decimal('4.00')
    in Python, but a numeric(12,2) rendered as "4.0" is a rendering bug."""
    if isinstance(replayed, decimal.Decimal) and isinstance(actual, decimal.Decimal):
        return replayed == actual and replayed.as_tuple().exponent == actual.as_tuple().exponent
    if isinstance(replayed, list) and isinstance(actual, list):
        return len(replayed) == len(actual) and all(same_value(r, a) for r, a in zip(replayed, actual))
    if type(replayed) is bool or type(actual) is bool:
        return type(replayed) is type(actual) and replayed == actual  # True == 1 otherwise
    return replayed == actual


def row_key(row: dict, key_bytes) -> str:
    if "id" in row and row["id"] is not None:
        return str(row["id"])
    if key_bytes:
        return json.dumps(json.loads(key_bytes), sort_keys=True)
    return json.dumps(row, sort_keys=True, default=str)


def check_replay(env, bootstrap: str, timeout_s: float) -> list[str]:
    diffs: list[str] = []
    for db, tables in TABLES.items():
        conn = connect_pg(env, db)
        for table in tables:
            types = column_types(conn, table)
            replayed, problems = replay(bootstrap, db, table, types, timeout_s)
            diffs.extend(problems)
            cur = conn.execute(f'SELECT * FROM public."{table}"')
            names = [d.name for d in cur.description]
            actual = {}
            for record in cur.fetchall():
                row = {n: normalise_db(v, types.get(n, "")) for n, v in zip(names, record)}
                actual[str(row["id"])] = row
            missing = sorted(set(actual) - set(replayed), key=int)
            extra = sorted(set(replayed) - set(actual), key=lambda s: (len(s), s))
            differing = []
            samples: list[str] = []
            for pk in set(actual) & set(replayed):
                a, r = actual[pk], replayed[pk]
                cols = [c for c in names if not same_value(r.get(c, ABSENT), a[c])]
                cols += [f"{c} (not a column)" for c in r if c not in a]
                if cols:
                    differing.append((pk, cols))
            for pk, cols in sorted(differing, key=lambda d: int(d[0]))[:3]:
                for c in cols[:3]:
                    c = c.removesuffix(" (not a column)")
                    samples.append(f"id {pk} {c}: table {actual[pk].get(c, ABSENT)!r} topic {replayed[pk].get(c, ABSENT)!r}")
            label = f"{db}.public.{table}"
            if missing:
                diffs.append(f"{label}: {len(missing)} rows missing from the topic (e.g. id {', '.join(missing[:5])})")
            if extra:
                diffs.append(f"{label}: {len(extra)} rows in the topic but not in the table (e.g. id {', '.join(extra[:5])})")
            if differing:
                sample = "; ".join(f"id {pk}: {', '.join(cols)}" for pk, cols in sorted(differing, key=lambda d: int(d[0]))[:5])
                diffs.append(f"{label}: {len(differing)} rows differ ({sample})")
                diffs.extend(f"{label}:   {line[:300]}" for line in samples)
            print(f"  replay {label:<36} table {len(actual):>8} rows  topic {len(replayed):>8} rows  "
                  f"{'ok' if not (missing or extra or differing) else 'DIFFERENT'}")
        conn.close()
    return diffs


# --------------------------------------------------------------- metrics (b)


def as_int_map(mapping) -> dict[str, int]:
    return {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in mapping.items()}


def drop_zero(mapping: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in mapping.items() if v != 0}


def check_metrics(env, prefix: str) -> list[str]:
    import redis

    diffs: list[str] = []
    r = redis.Redis.from_url(env.get("REDIS_URL", "redis://127.0.0.1:63790/0"))
    try:
        r.ping()
    except Exception as exc:
        die(f"cannot reach redis: {exc}")
    conns = {db: connect_pg(env, db) for db in TABLES}

    def scalar(db: str, sql: str) -> int:
        return int(conns[db].execute(sql).fetchone()[0])

    def grouped(db: str, sql: str) -> dict[str, int]:
        return {str(k): int(v) for k, v in conns[db].execute(sql).fetchall()}

    def compare(key: str, expected, actual) -> None:
        ok = expected == actual
        print(f"  metric {key:<44} sql {str(expected)[:60]:<60} redis {'ok' if ok else 'DIFFERENT'}")
        if not ok:
            diffs.append(f"{key}: sql {expected} != redis {actual}")

    def get_int(key: str) -> int:
        value = r.get(key)
        return int(value) if value is not None else 0

    for db, tables in TABLES.items():
        for table in tables:
            key = f"{prefix}count:{db}.{table}"
            compare(key, scalar(db, f'SELECT count(*) FROM public."{table}"'), get_int(key))

    key = f"{prefix}transactions:status"
    compare(key, drop_zero(grouped("instashop", "SELECT status::text, count(*) FROM transaction GROUP BY 1")),
            drop_zero(as_int_map(r.hgetall(key))))
    key = f"{prefix}revenue:total_cents"
    compare(key, scalar("instashop", "SELECT coalesce(sum(total_amount*100),0)::bigint FROM transaction WHERE status='completed'"),
            get_int(key))
    key = f"{prefix}revenue:daily_cents"
    compare(key, drop_zero(grouped("instashop",
            "SELECT to_char(created_at AT TIME ZONE 'UTC','YYYY-MM-DD'), sum(total_amount*100)::bigint "
            "FROM transaction WHERE status='completed' GROUP BY 1")), drop_zero(as_int_map(r.hgetall(key))))
    key = f"{prefix}gmv:category_cents"
    compare(key, drop_zero(grouped("instashop",
            "SELECT p.category, sum(d.quantity*d.unit_price*100)::bigint FROM transactiondetail d "
            "JOIN product p ON p.id = d.product_id GROUP BY p.category")), drop_zero(as_int_map(r.hgetall(key))))
    key = f"{prefix}stock:units"
    compare(key, scalar("erp", "SELECT coalesce(sum(quantity),0) FROM stock"), get_int(key))
    key = f"{prefix}shipments:status"
    compare(key, drop_zero(grouped("ecommerce", "SELECT status, count(*) FROM shipment GROUP BY 1")),
            drop_zero(as_int_map(r.hgetall(key))))
    key = f"{prefix}interactions:type"
    compare(key, drop_zero(grouped("crm", "SELECT interaction_type, count(*) FROM interaction GROUP BY 1")),
            drop_zero(as_int_map(r.hgetall(key))))

    # 30-second windows: the keys expire after an hour, so compare the windows
    # that started in the last 50 minutes (no key can have expired yet).
    since = int(time.time()) - 50 * 60
    windows = conns["instashop"].execute(
        "SELECT (floor(extract(epoch FROM created_at)/30)*30)::bigint, count(*), "
        "coalesce(sum(total_amount*100) FILTER (WHERE status='completed'),0)::bigint "
        "FROM transaction WHERE created_at >= to_timestamp(%s) GROUP BY 1", (since - since % 30,)).fetchall()
    sql_windows = {int(start): (int(n), int(cents)) for start, n, cents in windows}
    bad = []
    for start, (n, cents) in sql_windows.items():
        h = as_int_map(r.hgetall(f"{prefix}window:30s:{start}"))
        got = (h.get("transactions", 0), h.get("revenue_cents", 0))
        if got != (n, cents):
            bad.append(f"{start}: sql {(n, cents)} redis {got}")
    for raw in r.scan_iter(match=f"{prefix}window:30s:*", count=1000):
        start = int(raw.decode().rsplit(":", 1)[1])
        if start >= since and start not in sql_windows:
            h = as_int_map(r.hgetall(raw))
            if drop_zero(h):
                bad.append(f"{start}: sql (0, 0) redis {h}")
    print(f"  metric {prefix + 'window:30s:*':<44} sql {len(sql_windows):>4} windows{'':<48} redis {'ok' if not bad else 'DIFFERENT'}")
    diffs.extend(f"{prefix}window:30s:{b}" for b in bad[:10])
    for conn in conns.values():
        conn.close()
    return diffs


def check_dlq(bootstrap: str, topic: str, timeout_s: float) -> list[str]:
    """Nothing the generator writes is undecodable: a message on the consumer's
    dead-letter topic is a dropped change (its metric contribution is lost)."""
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"pipeline-check-dlq-{os.getpid()}",
                         "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s)
        if topic not in meta.topics or meta.topics[topic].error is not None:
            print(f"  dlq    {topic:<44} (no such topic)")
            return []
        from confluent_kafka import TopicPartition

        count = 0
        for p in meta.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
            count += max(0, high - low)
    finally:
        consumer.close()
    print(f"  dlq    {topic:<44} {count} messages{'':<47} {'ok' if count == 0 else 'NOT EMPTY'}")
    if count:
        return [f"{topic}: {count} messages dead-lettered by the consumer (read them with scripts/topic)"]
    return []


# ------------------------------------------------------------ duplicates (c)


def count_duplicates(bootstrap: str, timeout_s: float) -> int:
    """Events of the table topics that occur more than once: the same table,
    key, source.lsn and op (a truncate counts once per partition, where it
    is meant to be). Prints the count per topic; returns the total."""
    total = 0
    for db, tables in TABLES.items():
        for table in tables:
            topic = f"{db}.public.{table}"
            seen: set = set()
            dups = 0
            for partition, messages in consume_topic(bootstrap, topic, timeout_s).items():
                for _offset, key, value in messages:
                    if value is None or isinstance(value, SnapshotMarker):
                        continue
                    try:
                        event = json.loads(value)
                    except ValueError:
                        continue
                    if "payload" in event and "schema" in event:
                        event = event["payload"]
                    op = event.get("op")
                    lsn = (event.get("source") or {}).get("lsn")
                    ident = (key, lsn, op, partition if op == "t" else None)
                    if ident in seen:
                        dups += 1
                    seen.add(ident)
            total += dups
            print(f"  dups   {topic:<44} {len(seen):>8} events  {dups:>6} duplicates")
    return total


def load_env(path: str | None) -> dict[str, str]:
    env: dict[str, str] = {}
    if path and os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                line = line.strip()
                if not line or line.startswith("#") or "=" not in line:
                    continue
                k, v = line.removeprefix("export ").split("=", 1)
                env[k.strip()] = v.strip().strip('"').strip("'")
    env.update({k: v for k, v in os.environ.items() if k.startswith(("PG_", "REDIS_", "KAFKA_"))})
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-file", default=os.environ.get("INSTASHOP_ENV_FILE", ".local/env"))
    parser.add_argument("--prefix", default="metrics:", help="Redis key prefix of the metrics")
    parser.add_argument("--skip-replay", action="store_true")
    parser.add_argument("--skip-metrics", action="store_true")
    parser.add_argument("--dlq-topic", default="metrics.dlq", help="the consumer's dead-letter topic; empty to skip")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to read one topic")
    parser.add_argument("--isolation", choices=["read_uncommitted", "read_committed"], default="read_uncommitted",
                        help="how the topics are read (read_committed: what an exactly-once consumer sees)")
    parser.add_argument("--max-duplicates", type=int, default=None,
                        help="also count duplicate events (same table, key, source.lsn, op); FAIL above this many")
    args = parser.parse_args()
    global ISOLATION
    ISOLATION = args.isolation
    env = load_env(args.env_file)
    bootstrap = env.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        die("KAFKA_BOOTSTRAP_SERVERS is not set: run scripts/up or export it")
    diffs: list[str] = []
    if not args.skip_replay:
        print("replay of every topic against its table:")
        diffs += check_replay(env, bootstrap, args.timeout)
    if not args.skip_metrics:
        print("redis metrics against their sql definitions:")
        diffs += check_metrics(env, args.prefix)
        if args.dlq_topic:
            diffs += check_dlq(bootstrap, args.dlq_topic, args.timeout)
    if args.max_duplicates is not None:
        print(f"duplicate events ({args.isolation}):")
        dups = count_duplicates(bootstrap, args.timeout)
        print(f"duplicates: {dups}")
        if dups > args.max_duplicates:
            diffs.append(f"{dups} duplicate events, more than --max-duplicates {args.max_duplicates}")
    if diffs:
        print("FAIL")
        for d in diffs:
            print(f"  - {d}")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
