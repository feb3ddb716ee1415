//! Shared helpers of the replication integration tests: a fresh database per
//! test, the reader binary as a child process, and the replay checker.
//!
//! The replay checker consumes every topic of a test from the beginning (a
//! throwaway consumer, no group offsets), applies the events by key
//! (c/r/u: row = `after`; d: removed; t: the rows of that partition
//! removed, as a truncate reaches every partition in order with its events; an
//! `__debezium_unavailable_value` keeps the previous value of that column,
//! as a Debezium consumer merging by key would) and compares with a `SELECT`
//! of every column converted by the reader's own `value::to_json` from the
//! same text, so both sides render values identically.
#![allow(dead_code, clippy::unwrap_used, clippy::print_stdout)]

pub mod scratch_pg;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cdc_reader::change::{Datum, Lsn, parse_lsn};
use cdc_reader::value::{DecimalMode, to_json};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use tokio_postgres::{Client, NoTls};

/// `sql/instashop.sql`.
pub const INSTASHOP_SQL: &str = include_str!("../../../sql/instashop.sql");
/// `sql/roles.sql`.
pub const ROLES_SQL: &str = include_str!("../../../sql/roles.sql");
/// `sql/crm.sql`.
pub const CRM_SQL: &str = include_str!("../../../sql/crm.sql");
/// The reader's Debezium placeholder.
pub const UNAVAILABLE: &str = "__debezium_unavailable_value";

/// Loads `.local/env` and returns a variable, failing the test clearly when the stack is not up.
pub fn env(var: &str) -> String {
    local_stack::envfile::load();
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: the local stack is not up (run scripts/up, which writes .local/env)"
        )
    })
}

/// Overrides the Kafka bootstrap servers of the replay checker (in-process mock clusters).
pub static BOOTSTRAP_OVERRIDE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Bootstrap servers for the replay checker.
pub fn kafka_bootstrap() -> String {
    BOOTSTRAP_OVERRIDE
        .get()
        .cloned()
        .unwrap_or_else(|| env("KAFKA_BOOTSTRAP_SERVERS"))
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique lowercase name with a prefix.
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}_{}_{:x}_{}",
        std::process::id(),
        nanos & 0xffff_ffff,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

/// A free port on 127.0.0.1 for a scratch server, below the kernel's
/// ephemeral range (32768 and up): a port the kernel handed out for a
/// moment (`bind` to port 0) can be taken by any outgoing connection before
/// the server binds it, and a scratch Kafka node binds seconds later, after
/// formatting its storage (seen: a node that never came up). Each test
/// process starts in a block of its own (by pid), so concurrent tests do
/// not pick the same port.
pub fn listen_port() -> u16 {
    let block = std::process::id() % 1000 * 12;
    loop {
        let i = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
        let port = 20_000 + ((block + i) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A xorshift generator of numbers below its argument, seeded from the
/// clock, so each run kills at other moments.
pub fn random_below() -> impl FnMut(u64) -> u64 {
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    move |max: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % max
    }
}

/// Replaces the database of a URL.
pub fn with_db(url: &str, db: &str) -> String {
    let base = url.rsplit_once('/').unwrap().0;
    format!("{base}/{db}")
}

/// Connects an ordinary session.
pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "connect {}: {e} (is the local stack up? scripts/up)",
                local_stack::redact::url(url)
            )
        });
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A fresh database owned by `instashop_app`, with its slot name and topic prefix.
#[derive(Debug)]
pub struct TestDb {
    /// Database name (also the topic prefix and source name).
    pub name: String,
    /// Superuser URL of the `postgres` database.
    pub admin_url: String,
    /// Owner URL of this database.
    pub owner_url: String,
    /// `cdc_reader` URL of this database.
    pub cdc_url: String,
    /// Slot name the reader uses.
    pub slot: String,
    /// Set once cleaned up (otherwise `Drop` cleans up, e.g. after a failed assertion).
    cleaned: bool,
}

impl TestDb {
    /// Creates the database and applies `schema` as the owner.
    pub async fn create(tag: &str, schema: &str) -> TestDb {
        let admin_url = env("PG_ADMIN_URL");
        let owner_base = env("PG_INSTASHOP_URL");
        let cdc_base = env("CDC_PG_INSTASHOP_URL");
        let name = unique(&format!("cdct_{tag}"));
        let admin = connect(&admin_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name} OWNER instashop_app"))
            .await
            .unwrap();
        let db = TestDb {
            slot: format!("{name}_slot"),
            owner_url: with_db(&owner_base, &name),
            cdc_url: with_db(&cdc_base, &name),
            admin_url,
            name,
            cleaned: false,
        };
        if !schema.is_empty() {
            db.owner().await.batch_execute(schema).await.unwrap();
        }
        db
    }

    /// Creates the database on a scratch cluster: the roles of
    /// `sql/roles.sql` (with their passwords from that file), the database
    /// owned by `instashop_app`, then `schema` applied as the owner. Nothing
    /// to clean up: the whole cluster goes when the `ScratchPg` is dropped.
    pub async fn create_on(pg: &scratch_pg::ScratchPg, tag: &str, schema: &str) -> TestDb {
        let admin_url = pg.admin_url("postgres");
        let admin = connect(&admin_url).await;
        admin.batch_execute(ROLES_SQL).await.unwrap();
        let name = unique(&format!("cdct_{tag}"));
        admin
            .batch_execute(&format!("CREATE DATABASE {name} OWNER instashop_app"))
            .await
            .unwrap();
        let db = TestDb {
            slot: format!("{name}_slot"),
            owner_url: pg.url("instashop_app", "instashop_app", &name),
            cdc_url: pg.url("cdc_reader", "cdc_reader", &name),
            admin_url,
            name,
            cleaned: true,
        };
        if !schema.is_empty() {
            db.owner().await.batch_execute(schema).await.unwrap();
        }
        db
    }

    /// A session as the owner.
    pub async fn owner(&self) -> Client {
        connect(&self.owner_url).await
    }

    /// A superuser session in this database.
    pub async fn admin_here(&self) -> Client {
        connect(&with_db(&self.admin_url, &self.name)).await
    }

    /// The slot's `confirmed_flush_lsn`.
    pub async fn confirmed_flush(&self) -> Option<Lsn> {
        let admin = connect(&self.admin_url).await;
        let row = admin
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .unwrap()?;
        row.get::<_, Option<String>>(0)
            .as_deref()
            .and_then(parse_lsn)
    }

    /// Waits until a reader streams from the slot (it exists and is active).
    /// Waits until `reader` itself streams: the slot is active *and* its log
    /// says so. The slot alone is not enough: on a first start the slot is
    /// active while the snapshot is read, then free for a moment before
    /// START_REPLICATION, and a reader started in that moment takes it.
    pub async fn wait_streaming(&self, reader: &Reader) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            self.wait_slot_active(|| tail(&reader.log_text(), 30)).await;
            if reader.log_text().contains(" streaming source=") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the reader never logged that it streams from {}:\n{}",
                self.slot,
                tail(&reader.log_text(), 30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the slot exists and a walsender uses it; `context` says
    /// what to print if that never happens (e.g. the reader's log).
    pub async fn wait_slot_active(&self, context: impl Fn() -> String) {
        let admin = connect(&self.admin_url).await;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let active: Option<bool> = admin
                .query_opt(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.slot],
                )
                .await
                .unwrap()
                .map(|r| r.get(0));
            if active == Some(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the reader never started streaming from {}:\n{}",
                self.slot,
                context()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Current WAL position.
    pub async fn current_lsn(&self) -> Lsn {
        let c = connect(&self.admin_url).await;
        let s: String = c
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        parse_lsn(&s).unwrap()
    }

    /// Waits until the slot confirmed `lsn` (every earlier commit is in Kafka).
    pub async fn wait_confirmed(&self, lsn: Lsn, timeout: Duration, reader_log: Option<&PathBuf>) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.confirmed_flush().await
                && c >= lsn
            {
                return;
            }
            if Instant::now() > deadline {
                let log = reader_log
                    .map(|p| std::fs::read_to_string(p).unwrap_or_default())
                    .unwrap_or_default();
                panic!(
                    "slot {} did not confirm {} within {timeout:?} (confirmed {:?})\nreader log tail:\n{}",
                    self.slot,
                    cdc_reader::change::lsn_to_string(lsn),
                    self.confirmed_flush()
                        .await
                        .map(cdc_reader::change::lsn_to_string),
                    tail(&log, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until everything committed so far is confirmed.
    pub async fn wait_caught_up(&self, timeout: Duration, reader_log: Option<&PathBuf>) {
        let lsn = self.current_lsn().await;
        self.wait_confirmed(lsn, timeout, reader_log).await;
    }

    /// Drops the slot(s) and the database.
    pub async fn cleanup(mut self) {
        drop_db(&self.admin_url, &self.name).await;
        self.cleaned = true;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        // A failed test must not leave a slot retaining WAL on the shared server.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(drop_db(&admin_url, &name));
        })
        .join();
    }
}

/// Terminates the database's walsenders, drops its slots and the database.
pub async fn drop_db(admin_url: &str, name: &str) {
    {
        let admin = connect(admin_url).await;
        for _ in 0..50 {
            let _ = admin
                .execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = $1 AND active_pid IS NOT NULL",
                    &[&name],
                )
                .await;
            let _ = admin
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active",
                    &[&name],
                )
                .await;
            let left: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE database = $1",
                    &[&name],
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
            .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", name))
            .await;
    }
}

/// Last `n` lines.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The reader binary as a child process.
#[derive(Debug)]
pub struct Reader {
    /// The process.
    pub child: Child,
    /// Its stderr (logs).
    pub log: PathBuf,
}

impl Reader {
    /// Starts the reader for one database (source name = prefix = database name).
    pub fn start(db: &TestDb, extra: &[&str]) -> Reader {
        Reader::start_sources(&[(&db.name, &db.cdc_url)], &db.slot, extra)
    }

    /// Starts the reader for several sources with slot `slot` (may contain `{name}`).
    pub fn start_sources(sources: &[(&str, &str)], slot: &str, extra: &[&str]) -> Reader {
        let _ = env("KAFKA_BOOTSTRAP_SERVERS");
        let log = std::env::temp_dir().join(format!("{}.log", unique("cdc-reader-test")));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdc-reader"));
        for (name, url) in sources {
            cmd.arg("--source").arg(format!("{name}={url}"));
        }
        cmd.args([
            "--slot",
            slot,
            "--metrics-addr",
            "127.0.0.1:0",
            "--status-interval-ms",
            "200",
        ])
        .args(extra)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("CDC_SOURCES")
        .stdout(Stdio::null())
        .stderr(file);
        let child = cmd.spawn().unwrap();
        Reader { child, log }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for exit (with a deadline); returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!(
                    "reader did not stop within 60 s after SIGTERM\n{}",
                    tail(&self.log_text(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to exit by itself; returns (success, stderr).
    pub fn wait_exit(&mut self, timeout: Duration) -> (bool, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.success(), self.log_text());
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!(
                    "reader did not exit within {timeout:?}\n{}",
                    tail(&self.log_text(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One consumed change event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Key JSON (canonical: object keys sorted).
    pub key: String,
    /// Value (`None` = tombstone).
    pub value: Option<Value>,
}

/// Reads every change event of `topics` from the beginning up to the high
/// watermarks seen at start (missing topics are empty); snapshot-complete
/// markers are skipped.
pub fn consume_all(topics: &[String]) -> Vec<Event> {
    let mut events = Vec::new();
    consume_fold(topics, |e| events.push(e));
    events
}

/// Like [`consume_all`] but hands each event to `f` instead of keeping them.
pub fn consume_fold(topics: &[String], mut f: impl FnMut(Event)) {
    let bootstrap = kafka_bootstrap();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", unique("replay"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "50")
        .set("queued.min.messages", "100000")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    for topic in topics {
        let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) else {
            continue;
        };
        let Some(t) = md.topics().first() else {
            continue;
        };
        if t.error().is_some() {
            continue;
        }
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .unwrap();
            if high > low {
                ends.insert((topic.clone(), p.id()), high);
                tpl.add_partition_offset(topic, p.id(), Offset::Offset(low))
                    .unwrap();
            }
        }
    }
    if ends.is_empty() {
        return;
    }
    consumer.assign(&tpl).unwrap();
    let mut positions: HashMap<(String, i32), i64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while ends
        .iter()
        .any(|(k, end)| positions.get(k).copied().unwrap_or(-1) + 1 < *end)
    {
        assert!(
            Instant::now() < deadline,
            "replay did not reach the end offsets within 10 minutes"
        );
        let Some(msg) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let msg = msg.unwrap();
        positions.insert((msg.topic().to_owned(), msg.partition()), msg.offset());
        // The snapshot-complete marker (null key and value, a header naming
        // it) is the pipeline's own record, not a change of the table.
        let is_marker = msg.headers().is_some_and(|h| {
            h.iter()
                .any(|h| h.key == cdc_reader::envelope::marker::KIND)
        });
        if is_marker {
            continue;
        }
        let key = msg
            .key()
            .map(|k| serde_json::from_slice::<Value>(k).unwrap().to_string())
            .unwrap_or_else(|| "null".to_owned());
        let value = msg
            .payload()
            .map(|v| serde_json::from_slice::<Value>(v).unwrap());
        f(Event {
            topic: msg.topic().to_owned(),
            partition: msg.partition(),
            key,
            value,
        });
    }
}

/// Rows (with the partition they came from) by canonical key JSON, per topic.
pub type Tables = BTreeMap<String, BTreeMap<String, (i32, Value)>>;

/// Applies events in order (per partition order is what matters; keys live in one partition).
pub fn apply(events: &[Event]) -> Tables {
    let mut tables: Tables = BTreeMap::new();
    for e in events {
        apply_one(&mut tables, e);
    }
    tables
}

/// Applies one event.
pub fn apply_one(tables: &mut Tables, e: &Event) {
    {
        let Some(v) = &e.value else { return };
        let table = tables.entry(e.topic.clone()).or_default();
        match v["op"].as_str().unwrap() {
            "c" | "r" | "u" => {
                let mut after = v["after"].clone();
                if let (Some((_, prev)), Some(obj)) = (table.get(&e.key), after.as_object_mut()) {
                    for (col, val) in obj.iter_mut() {
                        if val.as_str() == Some(UNAVAILABLE)
                            && let Some(p) = prev.get(col)
                        {
                            *val = p.clone();
                        }
                    }
                }
                table.insert(e.key.clone(), (e.partition, after));
            }
            "d" => {
                table.remove(&e.key);
            }
            "t" => table.retain(|_, (partition, _)| *partition != e.partition),
            other => panic!("unknown op {other}"),
        }
    }
}

/// Every row of `schema.table` rendered as the reader renders it, keyed like the topic.
pub async fn db_rows(client: &Client, table: &str) -> BTreeMap<String, Value> {
    client
        .batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; SET IntervalStyle = 'postgres'; SET extra_float_digits = 1")
        .await
        .unwrap();
    let oid: u32 = client
        .query_one("SELECT $1::text::regclass::oid", &[&table])
        .await
        .unwrap()
        .get(0);
    let columns = cdc_reader::snapshot::table_columns(client, oid)
        .await
        .unwrap();
    // The simple protocol returns each type's output-function text, like pgoutput.
    let select: Vec<String> = columns.iter().map(|c| format!("\"{}\"", c.name)).collect();
    let messages = client
        .simple_query(&format!("SELECT {} FROM {table}", select.join(", ")))
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for m in messages {
        let tokio_postgres::SimpleQueryMessage::Row(r) = m else {
            continue;
        };
        let mut obj = serde_json::Map::new();
        let mut key = serde_json::Map::new();
        for (i, c) in columns.iter().enumerate() {
            let text: Option<&str> = r.get(i);
            let datum = text.map_or(Datum::Null, |t| {
                Datum::Text(Bytes::copy_from_slice(t.as_bytes()))
            });
            let v = to_json(&datum, c, DecimalMode::String).unwrap();
            if c.is_key {
                key.insert(c.name.clone(), v.clone());
            }
            obj.insert(c.name.clone(), v);
        }
        let key = if key.is_empty() {
            "null".to_owned()
        } else {
            Value::Object(key).to_string()
        };
        out.insert(key, Value::Object(obj));
    }
    out
}

/// Topic of a table of a test database.
pub fn topic(db: &TestDb, table: &str) -> String {
    format!("{}.public.{table}", db.name)
}

/// Replays the topics of `tables` and asserts they equal the database.
pub async fn assert_replay_equals_db(db: &TestDb, tables: &[&str]) -> Vec<Event> {
    replay_equals_db(db, tables, true).await
}

/// Replays and compares; keeps the events only when `keep` (big backlogs don't).
pub async fn replay_equals_db(db: &TestDb, tables: &[&str], keep: bool) -> Vec<Event> {
    let topics: Vec<String> = tables.iter().map(|t| topic(db, t)).collect();
    let t2 = topics.clone();
    let (events, replayed) = tokio::task::spawn_blocking(move || {
        let mut events = Vec::new();
        let mut replayed = Tables::new();
        consume_fold(&t2, |e| {
            apply_one(&mut replayed, &e);
            if keep {
                events.push(e);
            }
        });
        (events, replayed)
    })
    .await
    .unwrap();
    let client = db.owner().await;
    for (t, topic) in tables.iter().zip(&topics) {
        let expected = db_rows(&client, t).await;
        // A column added after a row's last event is absent from it: a
        // consumer reads it as null, like Debezium sinks do.
        let mut got: BTreeMap<String, Value> = replayed
            .get(topic)
            .map(|rows| {
                rows.iter()
                    .map(|(k, (_, row))| (k.clone(), row.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (k, row) in &mut got {
            if let (Some(Value::Object(exp)), Value::Object(obj)) = (expected.get(k), row) {
                for col in exp.keys() {
                    obj.entry(col.clone()).or_insert(Value::Null);
                }
            }
        }
        let got = &got;
        if *got != expected {
            let missing: Vec<&String> = expected
                .keys()
                .filter(|k| !got.contains_key(*k))
                .take(5)
                .collect();
            let extra: Vec<&String> = got
                .keys()
                .filter(|k| !expected.contains_key(*k))
                .take(5)
                .collect();
            let differing: Vec<String> = expected
                .iter()
                .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
                .take(3)
                .map(|(k, v)| format!("{k}: db {v} vs replay {}", got[k]))
                .collect();
            panic!(
                "replay of {topic} != table {t}: {} rows in db, {} replayed; missing {missing:?}; extra {extra:?}; differing {differing:?}",
                expected.len(),
                got.len()
            );
        }
    }
    events
}

/// Asserts that every duplicate of an event (same topic, key and
/// `source.sequence`) is identical apart from `ts_ms`, and returns the number of duplicates.
pub fn check_duplicates(events: &[Event]) -> usize {
    let mut seen: HashMap<(String, String, String, String), Value> = HashMap::new();
    let mut dups = 0;
    for e in events {
        let Some(v) = &e.value else { continue };
        let seq = v["source"]["sequence"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let op = v["op"].as_str().unwrap_or_default().to_owned();
        let k = (e.topic.clone(), e.key.clone(), seq, op);
        let mut norm = v.clone();
        for f in ["ts_ms", "ts_us", "ts_ns"] {
            norm[f] = Value::Null;
        }
        if let Some(prev) = seen.get(&k) {
            assert_eq!(prev, &norm, "a duplicate with the same sequence differs");
            dups += 1;
        } else {
            seen.insert(k, norm);
        }
    }
    dups
}

/// The five instashop tables, in dependency order.
pub const SHOP_TABLES: [&str; 5] = [
    "customer",
    "buyer",
    "product",
    "transaction",
    "transactiondetail",
];

/// One transaction of shop traffic: inserts in every table, updates and deletes.
pub fn shop_batch_sql(n: u32) -> String {
    let half = (n / 2).max(1);
    let quarter = (n / 4).max(1);
    let tenth = (n / 10).max(1);
    format!(
        "BEGIN;
INSERT INTO customer (name, email, subscription_plan, country)
  SELECT 'c' || g, 'c' || g || '@example.com', (ARRAY['free','basic','premium','enterprise'])[1 + g % 4], 'NL'
  FROM generate_series(1, {n}) g;
INSERT INTO buyer (customer_id, name, email, birth_date)
  SELECT id, 'b' || id, 'b' || id || '@example.com', date '1980-01-01' + (id % 9000)::int
  FROM customer ORDER BY id DESC LIMIT {n};
INSERT INTO product (customer_id, name, category, price, tags, description)
  SELECT id, 'p' || id, 'cat' || (id % 7), (id % 1000) + 0.99, ARRAY['a', 'b c', 'quote\"d'], repeat('desc ', (id % 3)::int)
  FROM customer ORDER BY id DESC LIMIT {n};
INSERT INTO transaction (external_id, customer_id, buyer_id, total_amount, payment_method, status)
  SELECT gen_random_uuid(), b.customer_id, b.id, 10.50 + b.id % 100, 'paypal', 'pending'
  FROM buyer b ORDER BY b.id DESC LIMIT {n};
INSERT INTO transactiondetail (transaction_id, product_id, quantity, unit_price)
  SELECT t.id, p.id, 1 + t.id % 3, 5.25 FROM transaction t JOIN product p ON p.customer_id = t.customer_id
  ORDER BY t.id DESC LIMIT {n};
UPDATE transaction SET status = 'completed', updated_at = now()
  WHERE id IN (SELECT id FROM transaction WHERE status = 'pending' ORDER BY random() LIMIT {half});
UPDATE customer SET is_active = NOT is_active WHERE id IN (SELECT id FROM customer ORDER BY random() LIMIT {quarter});
UPDATE product SET price = price + 1 WHERE id IN (SELECT id FROM product ORDER BY random() LIMIT {quarter});
DELETE FROM transaction WHERE id IN (SELECT id FROM transaction ORDER BY random() LIMIT {tenth});
COMMIT;"
    )
}

/// Runs shop batches until `stop`, returns how many committed.
pub async fn shop_load(url: String, n: u32, stop: tokio_util::sync::CancellationToken) -> u64 {
    let client = connect(&url).await;
    let mut done = 0;
    while !stop.is_cancelled() {
        client.batch_execute(&shop_batch_sql(n)).await.unwrap();
        done += 1;
        // Single-row transactions too.
        client
            .batch_execute(
                "UPDATE customer SET country = 'DE' WHERE id = (SELECT max(id) FROM customer)",
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done
}

/// Like [`shop_load`], for a server that restarts under it: a failed batch
/// (connection lost, server shutting down or starting up) is dropped and the
/// connection opened again, until `stop`. Every committed batch adds one to
/// `committed`; a batch cut off at its COMMIT may or may not have committed,
/// which the replay check does not care about (it compares with the tables).
pub async fn shop_load_through_restarts(
    url: String,
    n: u32,
    stop: tokio_util::sync::CancellationToken,
    committed: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> u64 {
    let mut failed = 0;
    let mut client: Option<Client> = None;
    while !stop.is_cancelled() {
        if client.as_ref().is_none_or(Client::is_closed) {
            match tokio_postgres::connect(&url, NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    client = Some(c);
                }
                Err(_) => {
                    // The server is restarting: try again shortly.
                    failed += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let c = client.as_ref().unwrap();
        match c.batch_execute(&shop_batch_sql(n)).await {
            Ok(()) => {
                committed.fetch_add(1, Ordering::SeqCst);
            }
            Err(_) => {
                failed += 1;
                client = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    failed
}

/// [`shop_load_through_restarts`] running in the background, with what the
/// tests ask of it.
pub struct ShopLoad {
    stop: tokio_util::sync::CancellationToken,
    committed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<u64>,
}

impl ShopLoad {
    /// Starts batches of `n` rows per table on `db`.
    pub fn start(db: &TestDb, n: u32) -> ShopLoad {
        let stop = tokio_util::sync::CancellationToken::new();
        let committed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = tokio::spawn(shop_load_through_restarts(
            db.owner_url.clone(),
            n,
            stop.clone(),
            committed.clone(),
        ));
        ShopLoad {
            stop,
            committed,
            task,
        }
    }

    /// Batches committed so far.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// Polls until `more` batches beyond now have committed, failing with
    /// the reader's log after 60 s.
    pub async fn wait_batches(&self, more: u64, reader: &Reader) {
        let from = self.committed();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.committed() < from + more {
            assert!(
                Instant::now() < deadline,
                "the load committed no {more} batches in 60 s; reader log:\n{}",
                tail(&reader.log_text(), 30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the load; returns the failed attempts.
    pub async fn finish(self) -> u64 {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

/// Number of messages in a topic (sum of high minus low watermarks), without consuming.
pub fn message_count(topic: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", unique("count"))
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut n = 0;
    for t in md.topics() {
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .unwrap();
            n += high - low;
        }
    }
    n
}

/// GETs `path` from the reader's metrics endpoint (address taken from its log).
pub fn http_get(reader: &Reader, path: &str) -> String {
    use std::io::{Read, Write};
    let log = reader.log_text();
    let addr = log
        .lines()
        .find_map(|l| l.split("metrics=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no metrics address in the reader log:\n{}", tail(&log, 10)))
        .to_owned();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
