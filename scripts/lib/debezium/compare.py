"""Differential comparison of the cdc-reader's topics with Debezium's.

Both pipelines captured the same databases at the same time, starting on
empty tables. For every table and every message key, the ordered sequence of
events must be the same in both: the key, `op`, `before`, `after`, the
`source` fields db/schema/table/lsn/txId/snapshot/sequence and the commit
time `ts_ms`/`ts_us`/`ts_ns`, `transaction`, tombstones, and TRUNCATE
events. The top-level processing timestamps (`ts_ms`, `ts_us`, `ts_ns`),
`source.version`, `source.name` and the
connector-specific `source` fields (ours: `commit_lsn`; Debezium's: `origin`,
`origin_lsn`) may differ.

Every other difference fails, unless it matches one of the EXCEPTIONS below:
the differences we keep on purpose, each checked for its exact shape (so a
new difference in the same column still fails), and each listed in the
README under "Differences from Debezium".

First waits (--timeout) until both topic sets hold the `difftest_done` row
of every database and every slot of --slots confirmed past it, so nothing
is still in flight. Exit status 0 identical (up to the exceptions), 1
different, 2 setup problem.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import re
import sys
import time
import uuid

I64_MAX, I64_MIN = 2**63 - 1, -(2**63)
I32_MAX, I32_MIN = 2**31 - 1, -(2**31)
COMPARED_SOURCE = ("db", "schema", "table", "lsn", "txId", "snapshot", "sequence", "ts_ms", "ts_us", "ts_ns")
IGNORED_TOP = {"ts_ms", "ts_us", "ts_ns"}
TRUNCATE_KEY = "<truncate>"


def die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------- exceptions
#
# Each takes (ours, debezium) for one column value of `before`/`after` (or
# the sequence field) and returns True when the pair is that deliberate
# difference.


def _is_list(v) -> bool:
    return isinstance(v, list)


def multidimensional_array(ours, dbz) -> bool:
    """Debezium writes each element of a multi-dimensional array as null
    (the values are lost); we write nested JSON arrays."""
    return (
        _is_list(ours)
        and _is_list(dbz)
        and len(ours) == len(dbz)
        and any(_is_list(e) for e in ours)
        and all(e is None for e in dbz)
    )


def infinite_timestamp(ours, dbz) -> bool:
    """`timestamp` ±infinity: we write i64::MAX / i64::MIN (as documented);
    Debezium writes the result of an overflowing conversion
    (9223372036825200000 / -9223372036832400000)."""
    return ours in (I64_MAX, I64_MIN) and isinstance(dbz, int) and dbz != ours


def infinite_date(ours, dbz) -> bool:
    """`date` ±infinity: we write i32::MAX / i32::MIN (as documented);
    Debezium writes -2147472692 / -2147472691 (an overflow)."""
    return ours in (I32_MAX, I32_MIN) and isinstance(dbz, int) and dbz != ours


def overflowing_timestamp(ours, dbz) -> bool:
    """`timestamp` beyond year 292277 (PostgreSQL allows up to 294276): the
    microseconds exceed i64 in Debezium's conversion and wrap to a negative
    number; ours stay positive (checked arithmetic)."""
    return isinstance(ours, int) and isinstance(dbz, int) and ours > 0 > dbz


def infinite_timestamptz(ours, dbz) -> bool:
    """`timestamptz` ±infinity inside an array: we write "infinity" /
    "-infinity" as for a single value (Debezium does too there); Debezium
    writes "-infinity" in an array as the year 292269055."""
    return ours in ("infinity", "-infinity") and isinstance(dbz, str) and dbz != ours


def numeric_array_special(ours, dbz) -> bool:
    """A `numeric[]` holding NaN or ±Infinity: we write the array with
    "NAN" / "POSITIVE_INFINITY" / "NEGATIVE_INFINITY" elements, as for a
    single value; Debezium writes null for the whole array (values lost)."""
    special = {"NAN", "POSITIVE_INFINITY", "NEGATIVE_INFINITY"}
    return dbz is None and _is_list(ours) and any(e in special for e in ours)


def _numbers(text: str) -> list[float]:
    return [float(n) for n in re.findall(r"[-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?", text)]


def geometric_text(ours, dbz) -> bool:
    """Geometric types: we write PostgreSQL's text form ("(1.5,2)",
    "((0,0),(1,1))"); Debezium writes `point` as {"x","y","wkb","srid"} and
    box, circle, polygon (include.unknown.datatypes) as base64 of the JDBC
    driver's text form. Checked: the same numbers in the same order."""
    if not isinstance(ours, str) or not ours.startswith(("(", "<", "[")):
        return False
    if isinstance(dbz, dict) and set(dbz) == {"x", "y", "wkb", "srid"}:
        return _numbers(ours) == [dbz["x"], dbz["y"]]
    if isinstance(dbz, str):
        try:
            text = base64.b64decode(dbz, validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return False
        return _numbers(ours) == _numbers(text)
    return False


def bit_string(ours, dbz) -> bool:
    """`bit(n)` (n > 1) and `varbit`: we write the bits as a string
    ("10100101"); Debezium writes base64 of their value as little-endian
    bytes without leading zero bytes ("pQ=="), which loses the length
    (B'0' and B'0000' are both ""). Checked: the same value."""
    if not isinstance(ours, str) or not isinstance(dbz, str) or set(ours) - {"0", "1"}:
        return False
    try:
        raw = base64.b64decode(dbz, validate=True)
    except ValueError:
        return False
    value = int(ours, 2) if ours else 0
    return int.from_bytes(raw, "little") == value and (value == 0) == (len(raw) == 0)


EXCEPTIONS = {
    "infinite_timestamptz": infinite_timestamptz,
    "numeric_array_special": numeric_array_special,
    "geometric_text": geometric_text,
    "bit_string": bit_string,
    "multidimensional_array": multidimensional_array,
    "infinite_timestamp": infinite_timestamp,
    "infinite_date": infinite_date,
    "overflowing_timestamp": overflowing_timestamp,
}


def array_exception(ours, dbz):
    """An exception applied element-wise inside one-dimensional arrays."""
    if _is_list(ours) and _is_list(dbz) and len(ours) == len(dbz):
        names = []
        for o, d in zip(ours, dbz):
            if o == d:
                continue
            name = value_exception(o, d)
            if name is None:
                return None
            names.append(name)
        return names[0] if names else None
    return None


def value_exception(ours, dbz):
    for name, matches in EXCEPTIONS.items():
        if matches(ours, dbz):
            return name
    return array_exception(ours, dbz)


def sequence_exception(ours_event, dbz_event) -> str | None:
    """`source.sequence`'s first element: ours is the event's own
    transaction's commit LSN (so a transaction re-sent after a crash has the
    same pair); Debezium's is the end of the previous commit this connector
    process saw (null for the first transaction after its start), which
    lies at or before ours. The second element (the change's LSN) must be
    equal."""
    try:
        o = json.loads(ours_event["source"]["sequence"])
        d = json.loads(dbz_event["source"]["sequence"])
    except (TypeError, ValueError, KeyError):
        return None
    if len(o) != 2 or len(d) != 2 or o[1] != d[1]:
        return None
    if o[0] is None or int(o[0]) != ours_event["source"].get("commit_lsn"):
        return None
    # Transactions stream in commit order, so the previous commit ends at
    # or before this one starts (it may end after this change's LSN when
    # the two transactions ran concurrently).
    if d[0] is not None and int(d[0]) > int(o[0]):
        return None
    return "sequence_commit_lsn"


# ---------------------------------------------------------------- reading


def consumer(bootstrap: str):
    import logging

    from confluent_kafka import Consumer

    logger = logging.getLogger("difftest")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"difftest-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 50,
            "logger": logger,
        }
    )


def topics_with_prefix(c, prefix: str) -> list[str]:
    meta = c.list_topics(timeout=10)
    return sorted(t for t in meta.topics if t.startswith(prefix + "."))


def read_topics(bootstrap: str, topics: list[str], timeout_s: float):
    """Every message of `topics` up to their current high watermarks:
    {topic: [(partition, offset, key bytes, value bytes)]} in partition order."""
    from confluent_kafka import TopicPartition

    c = consumer(bootstrap)
    out: dict[str, list] = {t: [] for t in topics}
    try:
        meta = c.list_topics(timeout=10)
        assign, ends = [], {}
        for t in topics:
            for p in meta.topics[t].partitions:
                low, high = c.get_watermark_offsets(TopicPartition(t, p), timeout=10)
                if high > low:
                    assign.append(TopicPartition(t, p, low))
                    ends[(t, p)] = high
        if not assign:
            return out
        c.assign(assign)
        deadline = time.monotonic() + timeout_s
        remaining = dict(ends)
        while remaining:
            if time.monotonic() > deadline:
                die(f"reading timed out with {len(remaining)} partitions unfinished")
            for m in c.consume(1000, 0.5):
                if m.error():
                    continue
                tp = (m.topic(), m.partition())
                if tp not in remaining:
                    continue
                out[m.topic()].append((m.partition(), m.offset(), m.key(), m.value()))
                if m.offset() + 1 >= remaining[tp]:
                    del remaining[tp]
    finally:
        c.close()
    for t in out:
        out[t].sort(key=lambda r: (r[0], r[1]))
    return out


def done_lsns(bootstrap: str, prefix: str, databases: list[str]) -> dict[str, int] | None:
    """source.lsn of the difftest_done row per database, once all are there."""
    topics = [f"{prefix}.{db}.public.difftest_done" for db in databases]
    c = consumer(bootstrap)
    try:
        existing = set(topics_with_prefix(c, prefix))
    finally:
        c.close()
    if not all(t in existing for t in topics):
        return None
    found: dict[str, int] = {}
    for topic, rows in read_topics(bootstrap, topics, 30).items():
        for _, _, _, value in rows:
            if value:
                source = json.loads(value)["source"]
                # What the slot must have confirmed: the row's own position;
                # for Debezium the commit before it (sequence[0]), because
                # Connect confirms a transaction's commit only once a later
                # event carries it (its last transaction stays unconfirmed
                # without heartbeats). Either way every event before the
                # row has been acknowledged by Kafka.
                last_commit = json.loads(source["sequence"])[0]
                target = int(source["lsn"])
                if last_commit is not None:
                    target = min(target, int(last_commit))
                found[source["db"]] = target
    return found if len(found) == len(databases) else None


def wait_drained(args, databases: list[str]) -> None:
    import psycopg

    env = load_env(args.env_file)
    admin = env.get("PG_ADMIN_URL") or die(f"PG_ADMIN_URL is not in {args.env_file}")
    deadline = time.monotonic() + args.timeout
    slots = [s.strip() for s in args.slots.split(",") if s.strip()]
    waiting = "the difftest_done rows"
    while time.monotonic() < deadline:
        lsns = {}
        ok = True
        for prefix, pattern in zip((args.ours, args.debezium), slots):
            found = done_lsns(args.bootstrap, prefix, databases)
            if found is None:
                ok, waiting = False, f"the difftest_done rows in {prefix}.*"
                break
            for db, lsn in found.items():
                lsns[pattern.format(db=db)] = lsn
        if ok:
            with psycopg.connect(admin, autocommit=True) as conn:
                for db in databases:
                    for pattern in slots:
                        slot = pattern.format(db=db)
                        row = conn.execute(
                            "SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
                            (slot,),
                        ).fetchone()
                        if row is None or row[0] is None or int(row[0]) < lsns[slot]:
                            ok, waiting = False, f"slot {slot} to confirm {lsns[slot]}"
                            break
                    if not ok:
                        break
        if ok:
            return
        time.sleep(0.5)
    die(f"timed out after {args.timeout:.0f} s waiting for {waiting}")


def load_env(path: str) -> dict[str, str]:
    env = {}
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                env[k] = v
    return env


# ---------------------------------------------------------------- comparing


def table_of(topic: str, prefix: str) -> str:
    return topic[len(prefix) + 1 :]


def sequences(rows_by_topic, prefix: str, partitions: dict[str, int]):
    """{table: {key: [event]}} where an event is None (tombstone) or the
    parsed value; TRUNCATE events (null key) under TRUNCATE_KEY."""
    out: dict[str, dict[str, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for topic, rows in rows_by_topic.items():
        table = table_of(topic, prefix)
        for partition, offset, key, value in rows:
            event = json.loads(value) if value is not None else None
            if key is None:
                k = TRUNCATE_KEY
            else:
                k = json.dumps(json.loads(key), sort_keys=True)
            out[table][k].append({"event": event, "partition": partition, "offset": offset})
    return out


def collapse_truncates(events: list, partitions: int, side: str, problems: list[str], table: str) -> list:
    """Ours sends each TRUNCATE to every partition of the topic (named
    exception `truncate_every_partition`): one copy per partition, same
    position, collapsed to one here. Debezium sends it once (null key, one
    partition)."""
    by_lsn = collections.OrderedDict()
    for e in events:
        lsn = e["event"]["source"]["lsn"] if e["event"] else None
        by_lsn.setdefault(lsn, []).append(e)
    out = []
    for lsn, copies in by_lsn.items():
        if side == "ours" and len({c["partition"] for c in copies}) != partitions:
            problems.append(
                f"{table}: TRUNCATE at lsn {lsn}: ours on partitions {sorted(c['partition'] for c in copies)}, expected every one of {partitions}"
            )
        out.append(copies[0])
    return out


def identity_default_before(path: str, op: str, col: str, ctx: dict, ours) -> bool:
    """A delete on a REPLICA IDENTITY DEFAULT table: the server sends the
    key columns only. We write null for every other column; Debezium writes
    a made-up value for each NOT NULL one (the column's default, "" for
    text, 1970-01-01 for timestamps), which no consumer can tell from data."""
    return (
        path == "before"
        and op == "d"
        and ctx.get("identity") == "d"
        and col not in ctx.get("key_cols", ())
        and ours is None
    )


def diff_values(path: str, ours, dbz, found: list, used: collections.Counter, ctx: dict) -> None:
    """Column-level comparison of before/after objects."""
    if ours == dbz:
        return
    if isinstance(ours, dict) and isinstance(dbz, dict) and path.endswith(("before", "after")):
        for col in sorted(set(ours) | set(dbz)):
            if col not in dbz:
                found.append((f"{path}.{col}", "only in ours", ours[col], None))
            elif col not in ours:
                found.append((f"{path}.{col}", "only in debezium", None, dbz[col]))
            elif ours[col] != dbz[col]:
                if identity_default_before(path, ctx.get("op"), col, ctx, ours[col]):
                    used["identity_default_before"] += 1
                    continue
                name = value_exception(ours[col], dbz[col])
                if name:
                    used[name] += 1
                else:
                    found.append((f"{path}.{col}", "value", ours[col], dbz[col]))
        return
    found.append((path, "value", ours, dbz))


def diff_event(o, d, used: collections.Counter, ctx: dict) -> list:
    found: list = []
    if o is None or d is None:
        if (o is None) != (d is None):
            found.append(("value", "tombstone in one only", o is None, d is None))
        return found
    ctx = dict(ctx, op=o.get("op"))
    for field in sorted((set(o) | set(d)) - IGNORED_TOP - {"source"}):
        diff_values(field, o.get(field, "<absent>"), d.get(field, "<absent>"), found, used, ctx)
    os_, ds = o.get("source") or {}, d.get("source") or {}
    for field in COMPARED_SOURCE:
        if os_.get(field, "<absent>") == ds.get(field, "<absent>"):
            continue
        if field == "sequence":
            name = sequence_exception(o, d)
            if name:
                used[name] += 1
                continue
        found.append((f"source.{field}", "value", os_.get(field, "<absent>"), ds.get(field, "<absent>")))
    return found


def short(v) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 90 else s[:87] + "..."


def replica_identities(env_file: str, databases: list[str]) -> dict[str, str]:
    """{"<db>.<schema>.<table>": relreplident} of every table."""
    import psycopg

    admin = load_env(env_file)["PG_ADMIN_URL"]
    out = {}
    for db in databases:
        with psycopg.connect(admin.rsplit("/", 1)[0] + "/" + db, autocommit=True) as conn:
            for schema, table, ident in conn.execute(
                "SELECT n.nspname, c.relname, c.relreplident::text FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
                "AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
            ):
                out[f"{db}.{schema}.{table}"] = ident
    return out


def compare(ours_rows, dbz_rows, args, partitions_of, identities) -> tuple[list[str], collections.Counter, dict]:
    ours = sequences(ours_rows, args.ours, partitions_of)
    dbz = sequences(dbz_rows, args.debezium, partitions_of)
    problems: list[str] = []
    used: collections.Counter = collections.Counter()
    by_field: dict[tuple, list] = collections.defaultdict(list)
    stats = {"tables": 0, "keys": 0, "events": 0}
    for table in sorted(set(ours) | set(dbz)):
        stats["tables"] += 1
        if table not in dbz:
            problems.append(f"{table}: only in ours ({sum(len(v) for v in ours[table].values())} events)")
            continue
        if table not in ours:
            problems.append(f"{table}: only in debezium ({sum(len(v) for v in dbz[table].values())} events)")
            continue
        parts = partitions_of.get(f"{args.ours}.{table}", 1)
        for key in sorted(set(ours[table]) | set(dbz[table])):
            stats["keys"] += 1
            o_events = ours[table].get(key, [])
            d_events = dbz[table].get(key, [])
            if key == TRUNCATE_KEY:
                o_events = collapse_truncates(o_events, parts, "ours", problems, table)
                if o_events:
                    used["truncate_every_partition"] += 1
            stats["events"] += len(o_events)
            if len(o_events) != len(d_events):
                ops_o = [e["event"]["op"] if e["event"] else "tombstone" for e in o_events]
                ops_d = [e["event"]["op"] if e["event"] else "tombstone" for e in d_events]
                problems.append(f"{table} key {key}: {len(o_events)} events in ours {ops_o[:12]}, {len(d_events)} in debezium {ops_d[:12]}")
                continue
            ctx = {
                "identity": identities.get(table),
                "key_cols": set(json.loads(key)) if key != TRUNCATE_KEY else set(),
            }
            for i, (o, d) in enumerate(zip(o_events, d_events)):
                for path, kind, ov, dv in diff_event(o["event"], d["event"], used, ctx):
                    by_field[(table, path, kind)].append((key, i, ov, dv))
    for (table, path, kind), cases in sorted(by_field.items()):
        key, i, ov, dv = cases[0]
        problems.append(
            f"{table} {path}: {kind} differs in {len(cases)} events; first: key {key} event #{i}: ours {short(ov)} debezium {short(dv)}"
        )
    return problems, used, stats


NAMED = {
    "sequence_commit_lsn": sequence_exception,
    "truncate_every_partition": collapse_truncates,
    "identity_default_before": identity_default_before,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--env-file", required=True, help="PG_ADMIN_URL of the captured cluster")
    parser.add_argument("--ours", required=True, help="topic prefix base of the cdc-reader's topics")
    parser.add_argument("--debezium", required=True, help="topic prefix base of Debezium's topics")
    parser.add_argument("--databases", required=True, help="space-separated")
    parser.add_argument("--slots", required=True, help="the slot name patterns of ours and Debezium's, with {db}: OURS,DEBEZIUM")
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--report", help="write every difference to this file")
    args = parser.parse_args()
    databases = args.databases.split()

    started = time.monotonic()
    wait_drained(args, databases)
    print(f"compare: both pipelines delivered and confirmed everything ({time.monotonic() - started:.1f} s)")

    c = consumer(args.bootstrap)
    try:
        ours_topics = topics_with_prefix(c, args.ours)
        dbz_topics = topics_with_prefix(c, args.debezium)
        meta = c.list_topics(timeout=10)
        partitions_of = {t: len(meta.topics[t].partitions) for t in ours_topics + dbz_topics}
    finally:
        c.close()
    ours_rows = read_topics(args.bootstrap, ours_topics, args.timeout)
    dbz_rows = read_topics(args.bootstrap, dbz_topics, args.timeout)
    identities = replica_identities(args.env_file, databases)
    problems, used, stats = compare(ours_rows, dbz_rows, args, partitions_of, identities)
    n_ours = sum(len(v) for v in ours_rows.values())
    n_dbz = sum(len(v) for v in dbz_rows.values())
    print(
        f"compare: {stats['tables']} tables, {stats['keys']} keys, {n_ours} messages ours, {n_dbz} debezium"
    )
    for name in sorted(used):
        doc = (EXCEPTIONS.get(name) or NAMED[name]).__doc__
        print(f"  exception {name}: {used[name]} values ({' '.join(doc.split())[:110]}...)")
    if args.report:
        with open(args.report, "w") as fh:
            fh.write("\n".join(problems) + "\n")
    if stats["events"] == 0:
        print("compare: FAIL: no events to compare")
        return 1
    if problems:
        print(f"compare: FAIL: {len(problems)} differences")
        for p in problems[:40]:
            print(f"  - {p}")
        if len(problems) > 40:
            print(f"  ... {len(problems) - 40} more in {args.report}")
        return 1
    print("compare: PASS: identical per table and key, up to the named exceptions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
