"""Kafka helpers for the local-stack scripts, on the Admin API of
confluent-kafka (librdkafka). They start in a fraction of a second, where each
of Kafka's own JVM tools (scripts/kafka) takes one to two. Run with the venv's
python that scripts/up makes.

Subcommands:
  ping            one metadata request; exit 0 when the broker answers
  ready           exit 0 when --brokers brokers are registered and a controller is known
  leader          node id of the leader of a topic's partition
  create-topics   create the named topics that do not exist yet (never deletes)
  list            topic names, one per line
  offsets         end offsets per topic (and per partition with --partitions)
  lag             a consumer group's committed offsets and lag per topic
  consume         console consumer: key<TAB>value per message
"""

import argparse
import os
import sys
import time
import uuid

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

DEFAULT_BOOTSTRAP = os.environ.get(
    "KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094"
)


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def quiet_logger():
    """librdkafka logs connection errors to stderr; keep them out of the
    scripts' output (errors still surface as exceptions)."""
    import logging

    logger = logging.getLogger("kafka_tool")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger


def admin(bootstrap):
    return AdminClient({"bootstrap.servers": bootstrap, "logger": quiet_logger()})


def consumer(bootstrap, group=None, **extra):
    config = {
        "bootstrap.servers": bootstrap,
        "group.id": group or f"instashop-console-{uuid.uuid4()}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 50,
        "logger": quiet_logger(),
    }
    config.update(extra)
    return Consumer(config)


def user_topics(client, timeout):
    metadata = client.list_topics(timeout=timeout)
    return {
        name: sorted(t.partitions)
        for name, t in metadata.topics.items()
        if not name.startswith("__") and t.error is None
    }


def cmd_ping(args):
    try:
        admin(args.bootstrap).list_topics(timeout=args.timeout)
    except KafkaException as e:
        fail(f"no metadata from {args.bootstrap}: {e}")


def cmd_ready(args):
    """All brokers registered (unfenced, in the metadata) and a controller known."""
    client = admin(args.bootstrap)  # kept alive until the result arrives
    try:
        cluster = client.describe_cluster(request_timeout=args.timeout).result(timeout=args.timeout)
    except KafkaException as e:
        fail(f"no cluster description from {args.bootstrap}: {e}")
    ids = sorted({node.id for node in cluster.nodes})
    if args.node is not None:
        if args.node not in ids:
            fail(f"broker {args.node} is not registered (registered: {ids})")
    elif len(ids) < args.brokers:
        fail(f"{len(ids)} of {args.brokers} brokers registered (ids {ids})")
    if cluster.controller is None:
        fail("no active controller")
    print(f"brokers {ids}, controller {cluster.controller.id}")


def cmd_leader(args):
    """Node id of the leader of one partition."""
    client = admin(args.bootstrap)
    try:
        meta = client.list_topics(args.topic, timeout=args.timeout)
    except KafkaException as e:
        fail(f"no metadata for {args.topic} from {args.bootstrap}: {e}")
    topic = meta.topics.get(args.topic)
    if topic is None or topic.error is not None or args.partition not in topic.partitions:
        fail(f"{args.topic}[{args.partition}] does not exist")
    leader = topic.partitions[args.partition].leader
    if leader < 0:
        fail(f"{args.topic}[{args.partition}] has no leader")
    print(leader)


def cmd_create_topics(args):
    client = admin(args.bootstrap)
    try:
        existing = user_topics(client, args.timeout)
    except KafkaException as e:
        fail(f"cannot list topics on {args.bootstrap}: {e}")
    wanted = [t for t in args.topics if t not in existing]
    if not wanted:
        return
    futures = client.create_topics(
        [NewTopic(t, num_partitions=args.partitions, replication_factor=-1) for t in wanted],
        operation_timeout=args.timeout,
        request_timeout=args.timeout,
    )
    created = []
    for topic, future in futures.items():
        try:
            future.result()
            created.append(topic)
        except KafkaException as e:
            # Another process may have created it in between: that is fine.
            if e.args and e.args[0].name() == "TOPIC_ALREADY_EXISTS":
                continue
            fail(f"creating topic {topic} failed: {e}")
    print(" ".join(created))


def cmd_list(args):
    try:
        topics = user_topics(admin(args.bootstrap), args.timeout)
    except KafkaException as e:
        fail(f"cannot list topics on {args.bootstrap}: {e}")
    for name in sorted(topics):
        print(name)


def watermarks(c, topic, partitions, timeout):
    return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout) for p in partitions}


def cmd_offsets(args):
    c = consumer(args.bootstrap)
    try:
        topics = user_topics(c, args.timeout)
        names = args.topics or sorted(topics)
        w = max([len("topic"), *map(len, names)])
        print(f"{'topic':<{w}} {'end offset (sum)':>16}  per partition")
        for name in names:
            if name not in topics:
                print(f"{name:<{w}} {'missing':>16}")
                continue
            marks = watermarks(c, name, topics[name], args.timeout)
            total = sum(high for _, high in marks.values())
            parts = " ".join(f"{p}:{high}" for p, (_, high) in sorted(marks.items()))
            print(f"{name:<{w}} {total:>16}  {parts}")
        others = len(set(topics) - set(names))
        if others:
            print(f"(and {others} other topics, e.g. from tests)")
    except KafkaException as e:
        fail(f"cannot read offsets from {args.bootstrap}: {e}")
    finally:
        c.close()


def cmd_lag(args):
    c = consumer(args.bootstrap, group=args.group)
    try:
        topics = user_topics(c, args.timeout)
        names = args.topics or sorted(topics)
        partitions = [TopicPartition(t, p) for t in names if t in topics for p in topics[t]]
        # The group coordinator may still be moving (the offsets topic is
        # created on first use, or a broker just restarted): retriable.
        deadline = time.monotonic() + args.timeout
        while True:
            try:
                committed = c.committed(partitions, timeout=args.timeout)
                break
            except KafkaException as e:
                if not e.args[0].retriable() or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        rows = {}
        for tp in committed:
            _, high = c.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=args.timeout)
            done = tp.offset if tp.offset >= 0 else None
            row = rows.setdefault(tp.topic, [0, 0, False])
            row[0] += high
            if done is None:
                row[1] += high
            else:
                row[1] += max(high - done, 0)
                row[2] = True
        w = max([len("topic"), *map(len, names)])
        print(f"consumer group {args.group}")
        print(f"{'topic':<{w}} {'end offset':>12} {'lag':>12}")
        total = 0
        for name in names:
            if name not in rows:
                continue
            high, lag, any_committed = rows[name]
            total += lag
            note = "" if any_committed else "  (nothing committed)"
            print(f"{name:<{w}} {high:>12} {lag:>12}{note}")
        print(f"{'total':<{w}} {'':>12} {total:>12}")
    except KafkaException as e:
        fail(f"cannot read group offsets from {args.bootstrap}: {e}")
    finally:
        c.close()


def cmd_consume(args):
    c = consumer(args.bootstrap, **{"isolation.level": args.isolation})
    out = sys.stdout.buffer
    try:
        topics = user_topics(c, args.timeout)
        if args.topic not in topics:
            fail(f"topic {args.topic} does not exist (scripts/topic --list shows the topics)")
        marks = watermarks(c, args.topic, topics[args.topic], args.timeout)
        assignment = []
        remaining = {}
        for p, (low, high) in marks.items():
            offset = high if args.from_end else low
            assignment.append(TopicPartition(args.topic, p, offset))
            if offset < high:
                remaining[p] = high
        c.assign(assignment)
        count = 0
        if not args.follow and not remaining:
            return
        while True:
            if args.max is not None and count >= args.max:
                break
            if not args.follow and args.isolation == "read_committed":
                # Aborted records are skipped and the last offsets may be
                # commit markers: a partition is done once the position
                # (checked before the next poll) passes the start watermark.
                for tp in c.position([TopicPartition(args.topic, p) for p in remaining]):
                    if tp.offset >= remaining[tp.partition]:
                        del remaining[tp.partition]
                if not remaining:
                    break
            msg = c.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                print(f"warning: {msg.error()}", file=sys.stderr)
                continue
            key = msg.key()
            value = msg.value()
            if args.value_only:
                line = (value if value is not None else b"null") + b"\n"
            else:
                line = (key if key is not None else b"null") + b"\t" + (value if value is not None else b"null") + b"\n"
            out.write(line)
            if args.follow:
                out.flush()
            count += 1
            if not args.follow:
                p = msg.partition()
                if p in remaining and msg.offset() + 1 >= remaining[p]:
                    del remaining[p]
                if not remaining:
                    break
    except KafkaException as e:
        fail(f"consuming {args.topic} from {args.bootstrap}: {e}")
    except BrokenPipeError:
        # `scripts/topic X | head`: the reader went away; stop quietly.
        sys.stderr.close()
    except KeyboardInterrupt:
        pass
    finally:
        try:
            out.flush()
        except BrokenPipeError:
            pass
        c.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", default=DEFAULT_BOOTSTRAP)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per broker request")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ping")
    p.set_defaults(func=cmd_ping)
    p.add_argument("--bootstrap", default=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=3.0)

    p = sub.add_parser("ready")
    p.set_defaults(func=cmd_ready)
    p.add_argument("--bootstrap", default=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--brokers", type=int, default=3)
    p.add_argument("--node", type=int, help="only this broker must be registered")

    p = sub.add_parser("leader")
    p.set_defaults(func=cmd_leader)
    p.add_argument("--bootstrap", default=argparse.SUPPRESS)
    p.add_argument("topic")
    p.add_argument("--partition", type=int, default=0)

    p = sub.add_parser("create-topics")
    p.set_defaults(func=cmd_create_topics)
    p.add_argument("--bootstrap", default=argparse.SUPPRESS)
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("topics", nargs="+")

    p = sub.add_parser("list")
    p.set_defaults(func=cmd_list)
    p.add_argument("--bootstrap", default=argparse.SUPPRESS)

    p = sub.add_parser("offsets")
    p.set_defaults(func=cmd_offsets)
    p.add_argument("--bootstrap", default=argparse.SUPPRESS)
    p.add_argument("topics", nargs="*")

    p = sub.add_parser("lag")
    p.set_defaults(func=cmd_lag)
    p.add_argument("--bootstrap", default=argparse.SUPPRESS)
    p.add_argument("--group", required=True)
    p.add_argument("topics", nargs="*")

    p = sub.add_parser("consume")
    p.set_defaults(func=cmd_consume)
    p.add_argument("--bootstrap", default=argparse.SUPPRESS)
    p.add_argument("topic")
    p.add_argument("--follow", action="store_true")
    p.add_argument("--from-end", action="store_true")
    p.add_argument("--max", type=int)
    p.add_argument("--value-only", action="store_true")
    p.add_argument("--isolation", choices=["read_uncommitted", "read_committed"], default="read_uncommitted")

    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
