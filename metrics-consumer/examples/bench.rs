//! Benchmark helper for `scripts/bench-consumer`.
//!
//! `bench fill <topic> <events>`: creates the topic (as `create`) and fills
//! it with a realistic mix of synthetic Debezium events (new purchases with
//! their details, status changes, stock and interaction changes).
//!
//! `bench create <topic>...`: creates topics (3 partitions, the cluster's
//! default replication factor: 3 on the local stack) on the brokers.
//!
//! `bench delete <topic>... [--groups <group>...]`: deletes the named topics
//! (those that exist) and the named consumer groups: a benchmark's scratch
//! names, nothing else.
//!
//! `bench apply <events>`: decodes and applies the same kind of events
//! straight to Redis in batches (no Kafka), under a throw-away prefix: the
//! consumer's own ceiling, apart from the brokers. Decoding, planning and
//! the compare-and-write script run on three threads, as in the consumer.
//!
//! `bench mock <events> <partitions> <topic>...`: starts a librdkafka mock
//! cluster (one broker, in this process), creates the topics, fills the
//! first with `events` events like `fill` (0: none), prints `bootstrap
//! <servers>` and serves until killed. The mock
//! keeps at most 5 MiB / 100,000 messages per partition (older ones are
//! dropped), so a 1,000,000-event backlog (~450 bytes each) needs over 100
//! partitions; `fill` fails if the broker dropped any.
//!
//! Reads KAFKA_BOOTSTRAP_SERVERS / REDIS_URL (from `.local/env`).
#![allow(clippy::print_stdout)]

use std::io::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

// The batch fold allocates many small strings per event; glibc's malloc
// spent about a third of the consumer's CPU on them (perf), mimalloc far less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Deterministic synthetic event stream.
struct Synth {
    n: u64,
    lsn: u64,
    now_s: i64,
}

impl Synth {
    fn new() -> Synth {
        let now_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        Synth {
            n: 0,
            lsn: 1_000_000,
            now_s,
        }
    }

    fn event(&mut self, db: &str, table: &str, op: &str, after: &str) -> String {
        self.lsn += 8;
        let ts = self.now_s * 1000;
        format!(
            r#"{{"before":null,"after":{after},"source":{{"version":"2.7.0.Final","connector":"postgresql","name":"{db}","ts_ms":{ts},"snapshot":"false","db":"{db}","sequence":"[\"{l0}\",\"{l1}\"]","schema":"public","table":"{table}","txId":{tx},"lsn":{l1},"xmin":null}},"op":"{op}","ts_ms":{ts}}}"#,
            l0 = self.lsn - 8,
            l1 = self.lsn,
            tx = self.lsn / 64
        )
    }

    /// The next (key, value) pair.
    fn next(&mut self) -> (String, String) {
        self.n += 1;
        let i = self.n;
        let id = i / 10 + 1;
        let created = format!("2026-11-22T10:{:02}:{:02}.000000Z", (i / 60) % 60, i % 60);
        let cents = (i * 7919) % 100_000;
        let amount = format!("{}.{:02}", cents / 100, cents % 100);
        let (key, value) = match i % 10 {
            0 | 1 => {
                let status = if i.is_multiple_of(10) { "pending" } else { "completed" };
                let op = if i.is_multiple_of(10) { "c" } else { "u" };
                (id, self.event("instashop", "transaction", op, &format!(
                    r#"{{"id":{id},"external_id":"00000000-0000-0000-0000-{id:012}","customer_id":1,"buyer_id":1,"total_amount":"{amount}","currency":"USD","payment_method":"paypal","status":"{status}","created_at":"{created}","updated_at":"{created}"}}"#
                )))
            }
            2..=4 => {
                let did = i;
                let pid = i % 5000 + 1;
                (did, self.event("instashop", "transactiondetail", "c", &format!(
                    r#"{{"id":{did},"transaction_id":{id},"product_id":{pid},"quantity":{q},"unit_price":"{amount}"}}"#,
                    q = i % 4 + 1
                )))
            }
            5 => {
                let pid = i % 5000 + 1;
                (pid, self.event("instashop", "product", "u", &format!(
                    r#"{{"id":{pid},"customer_id":1,"name":"p","category":"cat{c}","price":"{amount}","tags":[],"description":null}}"#,
                    c = i % 7
                )))
            }
            6 | 7 => (i, self.event("crm", "interaction", "c", &format!(
                r#"{{"id":{i},"customer_id":1,"buyer_id":1,"interaction_type":"view","session_id":null,"payload":"{{}}","created_at":"{created}"}}"#
            ))),
            8 => {
                let sid = i % 20_000 + 1;
                (sid, self.event("erp", "stock", "u", &format!(
                    r#"{{"id":{sid},"product_id":{sid},"warehouse":"w","quantity":{q},"reorder_level":10,"updated_at":"{created}"}}"#,
                    q = i % 1000
                )))
            }
            _ => (id, self.event("ecommerce", "shipment", "c", &format!(
                r#"{{"id":{id},"transaction_id":{id},"carrier_id":1,"status":"created","tracking_code":"t","label":null,"created_at":"{created}","updated_at":"{created}"}}"#
            ))),
        };
        (format!(r#"{{"id":{key}}}"#), value)
    }
}

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set: run scripts/up"))
}

async fn create(kafka: &str, topics: &[String]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        // -1: the broker's default.replication.factor (3 with min ISR 2 on the
        // local stack; a topic of one replica could not take acks=all writes).
        .map(|t| NewTopic::new(t, 3, TopicReplication::Fixed(-1)))
        .collect();
    for r in admin.create_topics(&new, &AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("cannot create topic {t}: {e}"))?;
    }
    Ok(())
}

/// Deletes the topics and consumer groups named; a missing one is no error.
async fn delete(kafka: &str, topics: &[String], groups: &[String]) -> anyhow::Result<()> {
    use rdkafka::types::RDKafkaErrorCode::{GroupIdNotFound, UnknownTopicOrPartition};
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    if !topics.is_empty() {
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        for r in admin.delete_topics(&names, &options).await? {
            match r {
                Ok(_) | Err((_, UnknownTopicOrPartition)) => {}
                Err((t, e)) => bail!("cannot delete topic {t}: {e}"),
            }
        }
    }
    if !groups.is_empty() {
        let names: Vec<&str> = groups.iter().map(String::as_str).collect();
        for r in admin.delete_groups(&names, &options).await? {
            match r {
                Ok(_) | Err((_, GroupIdNotFound)) => {}
                Err((g, e)) => bail!("cannot delete consumer group {g}: {e}"),
            }
        }
    }
    Ok(())
}

fn fill(kafka: &str, topic: &str, events: u64) -> anyhow::Result<()> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("batch.size", "4000000")
        .set("queue.buffering.max.messages", "2000000")
        .set("queue.buffering.max.kbytes", "2000000")
        .set("message.timeout.ms", "600000")
        .create()?;
    let mut synth = Synth::new();
    let started = Instant::now();
    for _ in 0..events {
        let (key, value) = synth.next();
        let mut record = BaseRecord::to(topic)
            .key(key.as_str())
            .payload(value.as_str());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(600))?;
    let secs = started.elapsed().as_secs_f64();
    let total = backlog(kafka, topic)?;
    if total < events as i64 {
        bail!("{topic} holds {total} of the {events} events produced: the broker dropped some");
    }
    println!(
        "filled {events} events into {topic} in {secs:.1} s ({:.0} events/s)",
        events as f64 / secs
    );
    Ok(())
}

/// Messages held by the topic (high minus low watermarks, all partitions).
fn backlog(kafka: &str, topic: &str) -> anyhow::Result<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(30))?;
    let mut total = 0;
    for t in metadata.topics() {
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(30))?;
            total += high - low;
        }
    }
    Ok(total)
}

fn mock(events: u64, partitions: i32, topics: &[String]) -> anyhow::Result<()> {
    let mock = MockCluster::new(1).context("cannot start the mock cluster")?;
    for topic in topics {
        mock.create_topic(topic, partitions, 1)
            .with_context(|| format!("cannot create {topic} on the mock cluster"))?;
    }
    let bootstrap = mock.bootstrap_servers();
    if let (Some(topic), true) = (topics.first(), events > 0) {
        fill(&bootstrap, topic, events)?;
    }
    let mut out = std::io::stdout();
    writeln!(out, "bootstrap {bootstrap}")?;
    out.flush()?;
    loop {
        std::thread::park();
    }
}

fn apply(events: u64) -> anyhow::Result<()> {
    use metrics_consumer::plan::Plan;
    use metrics_consumer::store::{Batch, Planner, Store};
    let redis = env("REDIS_URL")?;
    let prefix = format!("bench:apply:{}:", std::process::id());
    let batch_size: usize = std::env::var("BATCH_SIZE")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(10_000);
    let mut store = Store::new(&redis, &prefix)?;
    let mut planner = Planner::new(&redis, &prefix)?;
    let mut synth = Synth::new();
    let pairs: Vec<(String, String)> = (0..events).map(|_| synth.next()).collect();
    let started = Instant::now();
    // As in the consumer: one thread decodes, one reads and plans the next
    // batch while this one's script runs.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(1);
    let decoder = std::thread::spawn(move || {
        let mut batch = Batch::default();
        for (offset, (key, value)) in pairs.iter().enumerate() {
            let change =
                metrics_consumer::fold::decode(Some(key.as_bytes()), Some(value.as_bytes())).ok();
            batch.push("bench", 0, offset as i64, change);
            if batch.len >= batch_size && tx.send(std::mem::take(&mut batch)).is_err() {
                return;
            }
        }
        let _ = tx.send(batch);
    });
    let (ptx, prx) = std::sync::mpsc::sync_channel::<(Batch, Option<Plan>)>(0);
    let plans = std::thread::spawn(move || {
        for batch in rx {
            let plan = planner.plan(&batch, 0).ok();
            if ptx.send((batch, plan)).is_err() {
                return;
            }
        }
    });
    for (batch, plan) in prx {
        store.apply_planned(&batch, plan.as_ref(), 0)?;
    }
    let _ = decoder.join();
    let _ = plans.join();
    let secs = started.elapsed().as_secs_f64();
    cleanup(&redis, &prefix)?;
    println!(
        "applied {events} events (decode + plan + compare-and-write, no Kafka) in {secs:.2} s: {:.0} events/s ({} conflicts re-planned)",
        events as f64 / secs,
        store.conflicts()
    );
    Ok(())
}

/// Deletes the run's keys: left over, they would slow Redis's background
/// saves for everyone on the stack.
fn cleanup(redis_url: &str, prefix: &str) -> anyhow::Result<()> {
    let mut con = redis::Client::open(redis_url)?.get_connection()?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut con)?;
    for chunk in keys.chunks(500) {
        redis::cmd("UNLINK").arg(chunk).query::<()>(&mut con)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    local_stack::envfile::load();
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("fill") if args.len() == 4 => {
            let events = args[3].parse()?;
            let kafka = env("KAFKA_BOOTSTRAP_SERVERS")?;
            tokio::runtime::Runtime::new()?.block_on(create(&kafka, &args[2..3]))?;
            fill(&kafka, &args[2], events)
        }
        Some("create") if args.len() >= 3 => {
            let kafka = env("KAFKA_BOOTSTRAP_SERVERS")?;
            tokio::runtime::Runtime::new()?.block_on(create(&kafka, &args[2..]))
        }
        Some("delete") if args.len() >= 3 => {
            let kafka = env("KAFKA_BOOTSTRAP_SERVERS")?;
            let rest = &args[2..];
            let (topics, groups) = match rest.iter().position(|a| a == "--groups") {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            tokio::runtime::Runtime::new()?.block_on(delete(&kafka, topics, groups))
        }
        Some("mock") if args.len() >= 5 => mock(args[2].parse()?, args[3].parse()?, &args[4..]),
        Some("apply") if args.len() == 3 => apply(args[2].parse()?),
        _ => bail!(
            "usage: bench fill <topic> <events> | bench create <topic>... | bench delete <topic>... [--groups <group>...] | bench apply <events> | bench mock <events> <partitions> <topic>..."
        ),
    }
}
