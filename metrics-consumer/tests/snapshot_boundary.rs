//! End to end across the reader's snapshot point: transactions that update
//! and delete existing rows are held open while a fresh reader creates its
//! slot, begin after the snapshot builder saw every older transaction, and
//! commit after the slot's consistent point C. The reader streams them in
//! full, with changes whose LSN is below the snapshot rows' C; the consumer
//! must still apply them (it orders by `source.commit_lsn`, then
//! `source.lsn`). Checked against the README's SQL run on the captured
//! database itself.
//!
//! Needs the local stack and the reader binary (`cargo build -p cdc-reader
//! --bin cdc-reader`; `CDC_READER_BIN` overrides its path).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

const INSTASHOP: [(&str, &str); 5] = [
    ("instashop", "customer"),
    ("instashop", "buyer"),
    ("instashop", "product"),
    ("instashop", "transaction"),
    ("instashop", "transactiondetail"),
];

fn var(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set: run scripts/up"))
}

fn with_db(url: &str, db: &str) -> String {
    format!("{}/{db}", url.rsplit_once('/').unwrap().0)
}

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("postgres unreachable ({e}): run scripts/up"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

fn reader_binary() -> PathBuf {
    if let Ok(path) = std::env::var("CDC_READER_BIN") {
        return path.into();
    }
    let target = std::env::var("CARGO_TARGET_DIR").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let path = target.join("debug/cdc-reader");
    assert!(
        path.exists(),
        "{} is missing: build the reader first (cargo build -p cdc-reader --bin cdc-reader)",
        path.display()
    );
    path
}

/// The scratch database, its slot and the reader; dropped in any case.
struct Scratch {
    admin_url: String,
    db: String,
    slot: String,
    reader: Option<Child>,
    log: PathBuf,
}

impl Scratch {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(mut child) = self.reader.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let (admin_url, db, slot) = (self.admin_url.clone(), self.db.clone(), self.slot.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let admin = connect(&admin_url).await;
                let deadline = Instant::now() + Duration::from_secs(20);
                while Instant::now() < deadline {
                    let _ = admin
                        .execute(
                            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE starts_with(slot_name, $1) AND active_pid IS NOT NULL",
                            &[&slot],
                        )
                        .await;
                    let _ = admin
                        .execute(
                            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE starts_with(slot_name, $1) AND NOT active",
                            &[&slot],
                        )
                        .await;
                    let left: i64 = admin
                        .query_one(
                            "SELECT count(*) FROM pg_replication_slots WHERE starts_with(slot_name, $1)",
                            &[&slot],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    if left == 0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                    .await;
            });
        })
        .join();
    }
}

const SEED: &str = "
INSERT INTO customer (name, email, subscription_plan, country)
    SELECT 'c' || g, 'c@x', 'free', 'NL' FROM generate_series(1, 5) g;
INSERT INTO buyer (customer_id, name, email) SELECT 1, 'b' || g, 'b@x' FROM generate_series(1, 5) g;
INSERT INTO product (customer_id, name, category, price)
    SELECT 1, 'p' || g, (ARRAY['toys', 'books', 'garden'])[1 + g % 3], 1.00 FROM generate_series(1, 6) g;
INSERT INTO transaction (external_id, customer_id, buyer_id, total_amount, payment_method, status, created_at)
    SELECT gen_random_uuid(), 1, 1, (g * 1.25)::numeric(12,2), 'paypal',
           (CASE WHEN g % 4 = 0 THEN 'pending' ELSE 'completed' END)::transaction_status,
           now() - make_interval(mins => g)
    FROM generate_series(1, 40) g;
INSERT INTO transactiondetail (transaction_id, product_id, quantity, unit_price)
    SELECT g, 1 + g % 6, 1 + g % 3, 2.50 FROM generate_series(1, 40) g;
";

/// The held transactions: each updates or deletes rows the snapshot copies.
const HELD: [&str; 5] = [
    "UPDATE transaction SET total_amount = total_amount + 1 WHERE id = 1",
    "UPDATE transaction SET total_amount = total_amount + 1 WHERE id = 2; UPDATE transaction SET status = 'refunded' WHERE id = 3",
    "DELETE FROM transaction WHERE id = 5",
    "UPDATE product SET category = 'food' WHERE id = 2; UPDATE transactiondetail SET quantity = quantity + 2 WHERE id = 7",
    "UPDATE transaction SET status = 'completed' WHERE id = 4; DELETE FROM transactiondetail WHERE id = 9",
];

/// A transaction holding an xid, left open.
async fn open_xact(url: &str) -> (Client, i64) {
    let c = connect(url).await;
    c.batch_execute("BEGIN").await.unwrap();
    let xid: i64 = c
        .query_one("SELECT pg_current_xact_id()::text::bigint", &[])
        .await
        .unwrap()
        .get(0);
    (c, xid)
}

/// Waits until every transaction older than `xid` has ended (the oldest
/// running xid is `xid` or later), then has a checkpoint log the running
/// transactions, which is what moves the slot's snapshot builder on.
async fn older_ended_then_checkpoint(admin: &Client, xid: i64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let xmin: i64 = admin
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if xmin >= xid {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: a transaction older than {xid} kept running for 60 s (oldest {xmin})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin.batch_execute("CHECKPOINT").await.unwrap();
}

async fn slot_field(admin: &Client, slot: &str, field: &str) -> Option<String> {
    admin
        .query_opt(
            &format!("SELECT {field}::text FROM pg_replication_slots WHERE slot_name = $1"),
            &[&slot],
        )
        .await
        .unwrap()
        .and_then(|r| r.get(0))
}

/// Every event of `topic` (all partitions) as JSON values (tombstones skipped).
fn read_topic(kafka: &str, topic: &str, partitions: i32) -> Vec<serde_json::Value> {
    let highs = high_watermarks(kafka, &[topic.to_owned()], partitions);
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("group.id", unique("mctest-boundary-read-"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let total: i64 = highs.values().sum();
    let mut seen = 0;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen < total {
        assert!(Instant::now() < deadline, "reading {topic} timed out");
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            seen += 1;
            if let Some(v) = m.payload() {
                out.push(serde_json::from_slice(v).unwrap());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_open_across_the_snapshot_point_are_applied() {
    let s = stack();
    let reader_bin = reader_binary();
    let admin_url = var("PG_ADMIN_URL");
    let db = unique("mc_boundary_");
    let admin = connect(&admin_url).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {db} OWNER instashop_app"))
        .await
        .unwrap();
    let log = std::env::temp_dir().join(format!("{db}.reader.log"));
    let mut scratch = Scratch {
        admin_url: admin_url.clone(),
        db: db.clone(),
        slot: format!("{db}_slot"),
        reader: None,
        log: log.clone(),
    };
    let owner_url = with_db(&var("PG_INSTASHOP_URL"), &db);
    let owner = connect(&owner_url).await;
    let schema = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sql/instashop.sql"),
    )
    .unwrap();
    owner.batch_execute(&schema).await.unwrap();
    owner.batch_execute(SEED).await.unwrap();

    // The slot's snapshot builder logs the running transactions (R0) when
    // the slot is created; it becomes consistent only after every
    // transaction running at R0, and then every one running when those had
    // ended (R1), has ended. A transaction that begins after R1 and commits
    // after the consistent point is streamed in full.
    let (t0, _) = open_xact(&owner_url).await;
    let topic_prefix = unique("mctest.boundary.");
    let file = std::fs::File::create(&log).unwrap();
    scratch.reader = Some(
        Command::new(&reader_bin)
            .arg("--source")
            .arg(format!(
                "instashop={}",
                with_db(&var("CDC_PG_INSTASHOP_URL"), &db)
            ))
            .args(["--slot", &scratch.slot])
            .args(["--topic-prefix", &format!("instashop={topic_prefix}")])
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--status-interval-ms",
                "200",
            ])
            .env("KAFKA_BOOTSTRAP_SERVERS", &s.kafka)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("CDC_SOURCES")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    // The reader snapshots from a pending slot `<slot>_snapshot`.
    let pending = format!("{}_snapshot", scratch.slot);
    while slot_field(&admin, &pending, "restart_lsn").await.is_none() {
        assert!(
            Instant::now() < deadline,
            "the reader never created its slot:\n{}",
            scratch.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (t1, t1_xid) = open_xact(&owner_url).await;
    t0.batch_execute("COMMIT").await.unwrap();
    older_ended_then_checkpoint(&admin, t1_xid, "first phase").await;
    let mut held = Vec::new();
    for sql in HELD {
        let (c, xid) = open_xact(&owner_url).await;
        c.batch_execute(sql).await.unwrap();
        held.push((c, xid));
    }
    t1.batch_execute("COMMIT").await.unwrap();
    let first_held = held.iter().map(|(_, x)| *x).min().unwrap();
    older_ended_then_checkpoint(&admin, first_held, "second phase").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while slot_field(&admin, &pending, "confirmed_flush_lsn")
        .await
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "the slot never became consistent with the held transactions open:\n{}",
            scratch.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        admin.batch_execute("CHECKPOINT").await.unwrap();
    }
    for (c, _) in &held {
        c.batch_execute("COMMIT").await.unwrap();
    }
    // Later traffic on the same rows, as a live shop would have.
    owner
        .batch_execute(
            "UPDATE transaction SET total_amount = total_amount + 2 WHERE id IN (1, 6);
             UPDATE transaction SET status = 'refunded' WHERE id = 7;",
        )
        .await
        .unwrap();

    // Everything committed is in Kafka once the slot confirmed it.
    let end: String = admin
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let confirmed_past: Option<bool> = admin
            .query_opt(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&scratch.slot, &end],
            )
            .await
            .unwrap()
            .and_then(|r| r.get(0));
        if confirmed_past == Some(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reader did not confirm {end} within 120 s:\n{}",
            scratch.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The scenario happened: updates below the snapshot rows' LSN were streamed.
    let tx_topic = format!("{topic_prefix}.public.transaction");
    let events = read_topic(&s.kafka, &tx_topic, 3);
    let snapshot_lsn = events
        .iter()
        .find(|e| e["op"] == "r")
        .and_then(|e| e["source"]["lsn"].as_u64())
        .expect("snapshot rows in the topic");
    let below: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| {
            e["op"] != "r"
                && e["source"]["lsn"]
                    .as_u64()
                    .is_some_and(|l| l < snapshot_lsn)
        })
        .collect();
    assert!(
        !below.is_empty(),
        "no streamed change below the snapshot point {snapshot_lsn}: the held transactions did not cross it"
    );

    let topics: Vec<String> = INSTASHOP
        .iter()
        .map(|(_, t)| format!("{topic_prefix}.public.{t}"))
        .collect();
    let prefix = format!("{}:", unique("mctest:boundary:"));
    let group = unique("mctest-boundary-");
    let dlq = format!("{topic_prefix}.dlq");
    create_topics(&s.kafka, std::slice::from_ref(&dlq), 1).await;
    let mut config = config(
        &s,
        &Topics {
            base: String::new(),
        },
        &prefix,
        &group,
        &dlq,
    );
    config.topics = topics.join(",");
    config.source_dbs = format!("instashop={db}");
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(metrics_consumer::run(config, shutdown.clone()));
    let (kafka, redis) = (s.kafka.clone(), s.redis.clone());
    let wait_prefix = prefix.clone();
    let wait = tokio::task::spawn_blocking(move || {
        let s = Stack {
            kafka,
            redis,
            pg_admin: String::new(),
        };
        wait_caught_up(&s, &wait_prefix, &topics, 3, Duration::from_secs(120));
    })
    .await;
    shutdown.cancel();
    run.await.unwrap().unwrap();
    wait.unwrap();

    let min_window = now_ms() / 1000 - 3600 + 120;
    let expected = sql_metrics(&owner, &INSTASHOP, min_window).await;
    let actual = redis_metrics(&s, &prefix, min_window);
    let diff: Vec<(&String, Option<&i64>, Option<&i64>)> = expected
        .keys()
        .chain(actual.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|k| expected.get(*k) != actual.get(*k))
        .map(|k| (k, expected.get(k), actual.get(k)))
        .collect();
    assert!(
        diff.is_empty(),
        "metrics differ from SQL (key, sql, redis), {} changes streamed below the snapshot point: {diff:#?}",
        below.len()
    );
    cleanup_redis(&s, &prefix);
    drop(owner);
    drop(scratch);
}
