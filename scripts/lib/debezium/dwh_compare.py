"""The differential test's warehouse step: dwh-sink on our topics and on
Debezium's must build the same warehouse.

Two commands:

  offsets  --bootstrap B --topics T1,T2,...: the sum of the topics' end
           offsets (high watermarks), printed; a missing topic counts 0
           with --missing-ok, else it is an error.
  compare  --ours URL --debezium URL [--report FILE]: the two warehouses,
           one line per check, every difference into the report. Exit
           status 0 identical (up to the named exceptions), 1 different,
           2 setup problem.

What is compared (surrogate keys differ between the two warehouses, so a
fact's dimension key is compared as the version it points to, without its
key):

* change_event: the set of (source_db, source_table, row_key, lsn, op), none
  twice, then per such event its commit time, snapshot flag, txId, before
  and after.
  The Kafka topic, partition, offset and load time differ by design.
* dim_customer, dim_buyer, dim_product, dim_carrier: the current versions
  (is_current) per natural id, every column but the key; then every version
  (deleting ones included), the whole SCD2 history.
* dim_date.
* fact_purchase, fact_sale_line, fact_shipment per natural id, every column,
  the dimension keys replaced by the versions they point to.

Named exceptions (each checked for its exact shape, so anything else in the
same column still fails):

* `commit_lsn_stand_in`: Debezium's events carry no `source.commit_lsn`;
  dwh-sink stores NULL in change_event.commit_lsn and the change's own LSN
  in every `*_commit_lsn` position column of the star schema (README, "Data
  warehouse"). Checked: ours is at or after the matching `*_lsn` (a commit
  follows its changes), Debezium's is NULL (change_event) or equal to it.
* `identity_default_before`: a delete on a REPLICA IDENTITY DEFAULT table
  (customer, buyer, carrier) carries only the key columns; ours writes null
  for every other column of `before`, Debezium a made-up value per NOT NULL
  column (compare.py's exception of the same name, README "Differences from
  Debezium"). Checked: op d, same columns and key values, every non-key
  column null in ours.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

DIMENSIONS = {
    # table: (surrogate key, natural id)
    "dim_customer": ("customer_key", "customer_id"),
    "dim_buyer": ("buyer_key", "buyer_id"),
    "dim_product": ("product_key", "product_id"),
    "dim_carrier": ("carrier_key", "carrier_id"),
}
# The dimension each fact column's surrogate key points into.
DIMENSION_OF_KEY = {key: table for table, (key, _) in DIMENSIONS.items()}
FACTS = {
    "fact_purchase": "purchase_id",
    "fact_sale_line": "line_id",
    "fact_shipment": "shipment_id",
}
EVENT_KEY = ("source_db", "source_table", "row_key", "lsn", "op")
EVENT_CONTENT = ("commit_time", "snapshot", "tx_id", "before", "after")
SHOW = 5


def die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)


def short(value) -> str:
    s = canonical(value)
    return s if len(s) <= 160 else s[:157] + "..."


# ---------------------------------------------------------------- exceptions


def commit_lsn_stand_in(row: dict, side: str, used: collections.Counter) -> dict:
    """Drops every `*_commit_lsn` column of a warehouse row after checking
    its shape against the `*_lsn` column beside it: ours at or after it
    (the commit follows the change), Debezium's equal to it (dwh-sink's
    stand-in, Debezium sends no commit_lsn). A column without its partner,
    or a value of another shape, stays and is compared as it is."""
    out = dict(row)
    for col in [c for c in row if c.endswith("_commit_lsn")]:
        partner = col[: -len("_commit_lsn")] + "_lsn"
        if partner not in row:
            continue
        value, lsn = row[col], row[partner]
        if value is None and lsn is None:
            ok = True
        elif value is None or lsn is None:
            ok = False
        else:
            ok = value >= lsn if side == "ours" else value == lsn
        if ok:
            del out[col]
            if side == "debezium":
                used["commit_lsn_stand_in"] += 1
    return out


def event_commit_lsn(row: dict, side: str, used: collections.Counter) -> str | None:
    """change_event.commit_lsn: ours at or after lsn, Debezium's NULL. None
    when the shape holds, else what is wrong."""
    value, lsn = row["commit_lsn"], row["lsn"]
    if side == "ours":
        return None if value is not None and value >= lsn else f"ours commit_lsn {value} at lsn {lsn}"
    if value is None:
        used["commit_lsn_stand_in"] += 1
        return None
    return f"debezium commit_lsn {value} at lsn {lsn} (expected NULL)"


def identity_default_before(key: tuple, ours, dbz) -> bool:
    """A delete's `before` on a REPLICA IDENTITY DEFAULT table: the same
    columns and key values, every non-key column null in ours (Debezium
    makes values up for the NOT NULL ones)."""
    if key[4] != "d" or not isinstance(ours, dict) or not isinstance(dbz, dict) or set(ours) != set(dbz):
        return False
    key_cols = json.loads(key[2])
    if not key_cols or any(ours.get(c) != v or dbz.get(c) != v for c, v in key_cols.items()):
        return False
    return all(v is None for c, v in ours.items() if c not in key_cols)


# ---------------------------------------------------------------- reading


def rows(conn, sql: str) -> list[dict]:
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql)
        return cur.fetchall()


def versions(conn, side: str, used: collections.Counter) -> dict[str, dict[int, dict]]:
    """{dimension: {surrogate key: the version without its key}}."""
    out = {}
    for table, (key, _) in DIMENSIONS.items():
        out[table] = {}
        for r in rows(conn, f"SELECT * FROM {table}"):
            k = r.pop(key)
            out[table][k] = commit_lsn_stand_in(r, side, used)
    return out


# ---------------------------------------------------------------- comparing


def leaves(ours, dbz, path: str = ""):
    """(column path, ours, debezium) of every unequal value that is no
    named exception, nested rows opened."""
    if isinstance(ours, dict) and isinstance(dbz, dict):
        for col in sorted(set(ours) | set(dbz)):
            o, d = ours.get(col, "<absent>"), dbz.get(col, "<absent>")
            if o != d:
                yield from leaves(o, d, f"{path}.{col}" if path else col)
    else:
        yield path or "value", ours, dbz


class Checks:
    def __init__(self, used: collections.Counter) -> None:
        self.problems: list[str] = []
        self.failed = 0
        self.used = used

    def keyed(self, name: str, ours: dict, dbz: dict) -> None:
        """Two {key: value} maps must be equal (the named exceptions are
        applied while reading); one line either way."""
        only_o = sorted(set(ours) - set(dbz), key=canonical)
        only_d = sorted(set(dbz) - set(ours), key=canonical)
        differ = sorted((k for k in set(ours) & set(dbz) if ours[k] != dbz[k]), key=canonical)
        if not (only_o or only_d or differ):
            print(f"dwh-compare: {name}: same ({len(ours)} rows)")
            return
        self.failed += 1
        print(
            f"dwh-compare: {name}: DIFFERENT: {len(only_o)} only in ours, {len(only_d)} only in debezium, "
            f"{len(differ)} differ (of {len(ours)} / {len(dbz)})"
        )
        lines = [f"only in ours: {short(k)}: {short(ours[k])}" for k in only_o]
        lines += [f"only in debezium: {short(k)}: {short(dbz[k])}" for k in only_d]
        for k in differ:
            detail = "; ".join(f"{path}: ours {short(o)} debezium {short(d)}" for path, o, d in leaves(ours[k], dbz[k]))
            lines.append(f"differs: {short(k)}: {detail}")
        for line in lines[:SHOW]:
            print(f"  - {line}")
        self.problems += [f"{name}: {line}" for line in lines]


def change_events(conn, side: str, used: collections.Counter, checks: Checks) -> dict[tuple, dict]:
    out: dict[tuple, dict] = {}
    bad: list[str] = []
    for r in rows(conn, f"SELECT {', '.join(EVENT_KEY + EVENT_CONTENT)}, commit_lsn FROM change_event"):
        key = tuple(r[c] for c in EVENT_KEY)
        if key in out:
            bad.append(f"{side}: two events {short(key)}")
        wrong = event_commit_lsn(r, side, used)
        if wrong:
            bad.append(f"{short(key)}: {wrong}")
        out[key] = {c: r[c] for c in EVENT_CONTENT}
    if bad:
        checks.failed += 1
        print(f"dwh-compare: change_event commit_lsn and uniqueness ({side}): DIFFERENT: {len(bad)} events")
        for line in bad[:SHOW]:
            print(f"  - {line}")
        checks.problems += bad
    return out


def compare(args) -> int:
    import psycopg

    used: collections.Counter = collections.Counter()
    checks = Checks(used)
    try:
        ours_conn = psycopg.connect(args.ours, autocommit=True)
        dbz_conn = psycopg.connect(args.debezium, autocommit=True)
    except psycopg.Error as e:
        die(f"cannot connect to a warehouse: {e}")
    with ours_conn, dbz_conn:
        # change_event: which events, then what each holds.
        ev_o = change_events(ours_conn, "ours", used, checks)
        ev_d = change_events(dbz_conn, "debezium", used, checks)
        checks.keyed(
            "change_event (source_db, source_table, row_key, lsn, op)",
            dict.fromkeys(ev_o, "present"),
            dict.fromkeys(ev_d, "present"),
        )
        content_d = {}
        for k in set(ev_o) & set(ev_d):
            o, d = ev_o[k], dict(ev_d[k])
            if o["before"] != d["before"] and identity_default_before(k, o["before"], d["before"]):
                used["identity_default_before"] += 1
                d["before"] = o["before"]
            content_d[k] = d
        checks.keyed(
            "change_event commit time, snapshot, txId, before, after",
            {k: ev_o[k] for k in content_d},
            content_d,
        )

        ver_o = versions(ours_conn, "ours", used)
        ver_d = versions(dbz_conn, "debezium", used)
        for table, (_, natural) in DIMENSIONS.items():
            current_o = {v[natural]: v for v in ver_o[table].values() if v["is_current"]}
            current_d = {v[natural]: v for v in ver_d[table].values() if v["is_current"]}
            checks.keyed(f"{table} current versions", current_o, current_d)
        for table, (_, natural) in DIMENSIONS.items():
            # Every version, keyed by natural id and position (the change's
            # own LSN: the commit LSN is the stand-in's).
            all_o = {(v[natural], v["valid_from_lsn"]): v for v in ver_o[table].values()}
            all_d = {(v[natural], v["valid_from_lsn"]): v for v in ver_d[table].values()}
            if len(all_o) != len(ver_o[table]) or len(all_d) != len(ver_d[table]):
                checks.failed += 1
                print(f"dwh-compare: {table}: two versions of a row at one LSN")
            checks.keyed(f"{table} all versions", all_o, all_d)

        checks.keyed(
            "dim_date",
            {r["date_key"]: r for r in rows(ours_conn, "SELECT * FROM dim_date")},
            {r["date_key"]: r for r in rows(dbz_conn, "SELECT * FROM dim_date")},
        )

        counts = {}
        for table, natural in FACTS.items():
            sides = []
            for conn, side, ver in ((ours_conn, "ours", ver_o), (dbz_conn, "debezium", ver_d)):
                out = {}
                for r in rows(conn, f"SELECT * FROM {table}"):
                    r = commit_lsn_stand_in(r, side, used)
                    for col, dim in DIMENSION_OF_KEY.items():
                        if col in r:
                            k = r.pop(col)
                            r[col.replace("_key", "_version")] = None if k is None else ver[dim].get(k, f"<key {k} missing>")
                    out[r[natural]] = r
                sides.append(out)
            counts[table] = len(sides[0])
            checks.keyed(table, *sides)

    for name in sorted(used):
        doc = globals()[name].__doc__
        print(f"  exception {name}: {used[name]} values ({' '.join(doc.split())[:110]}...)")
    if args.report:
        with open(args.report, "w") as fh:
            fh.write("\n".join(checks.problems) + ("\n" if checks.problems else ""))
    if not ev_o:
        print("dwh-compare: FAIL: no change events in our warehouse")
        return 1
    if checks.failed:
        print(f"dwh-compare: FAIL: {checks.failed} checks differ")
        return 1
    print(
        f"dwh-compare: PASS: {len(ev_o)} change events, {counts['fact_sale_line']} sale lines, "
        f"{counts['fact_purchase']} purchases, {counts['fact_shipment']} shipments, "
        f"{sum(len(v) for v in ver_o.values())} dimension versions"
    )
    return 0


def offsets(args) -> int:
    import logging

    from confluent_kafka import Consumer, TopicPartition

    logger = logging.getLogger("dwh-compare")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    c = Consumer({"bootstrap.servers": args.bootstrap, "group.id": "dwh-compare-offsets", "logger": logger})
    try:
        meta = c.list_topics(timeout=10)
        total = 0
        for t in [t for t in args.topics.split(",") if t]:
            if t not in meta.topics:
                if args.missing_ok:
                    continue
                die(f"topic {t} does not exist")
            for p in meta.topics[t].partitions:
                total += c.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
    finally:
        c.close()
    print(total)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("offsets", help="sum of the topics' end offsets")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topics", required=True, help="comma-separated")
    p.add_argument("--missing-ok", action="store_true", help="a missing topic counts 0")
    p = sub.add_parser("compare", help="compare two warehouses")
    p.add_argument("--ours", required=True, help="URL of the warehouse built from our topics")
    p.add_argument("--debezium", required=True, help="URL of the warehouse built from Debezium's topics")
    p.add_argument("--report", help="write every difference to this file")
    args = parser.parse_args()
    return offsets(args) if args.cmd == "offsets" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
