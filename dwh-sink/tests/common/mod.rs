//! Shared support for the warehouse tests: a scratch `instashop` source
//! database with the real reader on it, a scratch warehouse database built
//! from `sql/dwh.sql`, and the `dwh-sink` binary as a child process (so a
//! test can kill -9 it). Every name is unique per test run; the databases,
//! slots and processes go away with the guards, also after a failed
//! assertion.
#![allow(dead_code, clippy::unwrap_used, clippy::print_stdout)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_postgres::{Client, NoTls};

/// The five instashop tables, as topic suffixes.
pub const TABLES: [&str; 5] = [
    "customer",
    "buyer",
    "product",
    "transaction",
    "transactiondetail",
];

/// A variable of the stack's env file.
pub fn var(k: &str) -> String {
    local_stack::envfile::load();
    std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set: run scripts/up"))
}

/// Creates `topic` with `partitions` partitions (the cluster's replication
/// factor) for hand-made messages, and a producer to write them.
pub async fn hand_made_topic(topic: &str, partitions: i32) -> rdkafka::producer::FutureProducer {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;

    let kafka = var("KAFKA_BOOTSTRAP_SERVERS");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &kafka)
        .create()
        .unwrap();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    for r in admin
        .create_topics(
            &[NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(-1),
            )],
            &options,
        )
        .await
        .unwrap()
    {
        r.unwrap();
    }
    ClientConfig::new()
        .set("bootstrap.servers", &kafka)
        .create()
        .unwrap()
}

/// Deletes hand-made topics (best effort: a test that failed before this
/// leaves them for a look).
pub async fn delete_topics(topics: &[&str]) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", var("KAFKA_BOOTSTRAP_SERVERS"))
        .create()
        .unwrap();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let _ = admin.delete_topics(topics, &options).await;
}

/// A name no other test or run uses.
pub fn unique(base: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{base}{}x{nanos}", std::process::id())
}

/// `url` with another database.
pub fn with_db(url: &str, db: &str) -> String {
    format!("{}/{db}", url.rsplit_once('/').unwrap().0)
}

/// A session on `url`.
pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("postgres unreachable ({e}): run scripts/up"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The reader binary (`CDC_READER_BIN`, else `target/debug/cdc-reader`).
fn reader_binary() -> PathBuf {
    if let Ok(path) = std::env::var("CDC_READER_BIN") {
        return path.into();
    }
    let target =
        std::env::var("CARGO_TARGET_DIR").map_or_else(|_| repo().join("target"), PathBuf::from);
    let path = target.join("debug/cdc-reader");
    assert!(
        path.exists(),
        "{} is missing: build the reader first (cargo build -p cdc-reader --bin cdc-reader)",
        path.display()
    );
    path
}

fn drop_database(admin_url: &str, db: &str, slot_prefix: Option<&str>) {
    let (admin_url, db, slot_prefix) = (
        admin_url.to_owned(),
        db.to_owned(),
        slot_prefix.map(str::to_owned),
    );
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let admin = connect(&admin_url).await;
            if let Some(prefix) = slot_prefix {
                let deadline = Instant::now() + Duration::from_secs(20);
                while Instant::now() < deadline {
                    let _ = admin.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE starts_with(slot_name, $1) AND active_pid IS NOT NULL", &[&prefix]).await;
                    let _ = admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE starts_with(slot_name, $1) AND NOT active", &[&prefix]).await;
                    let left: i64 = admin.query_one("SELECT count(*) FROM pg_replication_slots WHERE starts_with(slot_name, $1)", &[&prefix]).await.unwrap().get(0);
                    if left == 0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .await;
        });
    })
    .join();
}

/// A scratch `instashop` source with the reader streaming it to topics
/// `<db>.public.<table>`.
pub struct Source {
    pub db: String,
    pub url: String,
    pub reader: Option<Child>,
    pub log: PathBuf,
    /// The reader's slot: the database's name, until a restart from
    /// scratch gives it another.
    pub slot: String,
    admin_url: String,
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Some(mut child) = self.reader.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        drop_database(&self.admin_url, &self.db, Some(&self.db));
    }
}

impl Source {
    /// A database with the instashop schema, owned by `instashop_app`.
    pub async fn create(tag: &str) -> Source {
        let admin_url = var("PG_ADMIN_URL");
        let db = unique(&format!("dwhsrc_{tag}_"));
        connect(&admin_url)
            .await
            .batch_execute(&format!("CREATE DATABASE {db} OWNER instashop_app"))
            .await
            .unwrap();
        let url = with_db(&var("PG_INSTASHOP_URL"), &db);
        let schema = std::fs::read_to_string(repo().join("sql/instashop.sql")).unwrap();
        connect(&url).await.batch_execute(&schema).await.unwrap();
        Source {
            log: std::env::temp_dir().join(format!("{db}.reader.log")),
            slot: db.clone(),
            db,
            url,
            reader: None,
            admin_url,
        }
    }

    /// The topics of the five tables.
    pub fn topics(&self) -> Vec<String> {
        TABLES
            .iter()
            .map(|t| format!("{}.public.{t}", self.db))
            .collect()
    }

    /// Starts the reader (slot `<db>`, topics `<db>.public.<table>`).
    pub fn start_reader(&mut self) {
        let file = std::fs::File::create(&self.log).unwrap();
        self.reader = Some(
            Command::new(reader_binary())
                .arg("--source")
                .arg(format!(
                    "instashop={}",
                    with_db(&var("CDC_PG_INSTASHOP_URL"), &self.db)
                ))
                .args(["--slot", &self.slot])
                .args(["--topic-prefix", &format!("instashop={}", self.db)])
                .args([
                    "--metrics-addr",
                    "127.0.0.1:0",
                    "--status-interval-ms",
                    "200",
                ])
                .env("KAFKA_BOOTSTRAP_SERVERS", var("KAFKA_BOOTSTRAP_SERVERS"))
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .env_remove("CDC_SOURCES")
                .stdout(Stdio::null())
                .stderr(file)
                .spawn()
                .unwrap(),
        );
    }

    /// Kills the reader and drops its slot, so the next start takes a new
    /// snapshot on a new slot: nothing records the changes made meanwhile.
    pub async fn kill_reader_and_drop_slot(&mut self) {
        self.kill_reader();
        let admin = connect(&self.admin_url).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let _ = admin
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                    &[&self.slot],
                )
                .await;
            let left: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.slot],
                )
                .await
                .unwrap()
                .get(0);
            if left == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "slot {} not dropped in 20 s",
                self.slot
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.slot = format!("{}_again", self.db);
    }

    /// Kills the reader with SIGKILL.
    pub fn kill_reader(&mut self) {
        if let Some(mut child) = self.reader.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until the reader's slot confirmed everything committed so far
    /// (every earlier change is in Kafka).
    pub async fn wait_confirmed_now(&self) {
        let admin = connect(&self.admin_url).await;
        let end: String = admin
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let past: Option<bool> = admin
                .query_opt(
                    "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.slot, &end],
                )
                .await
                .unwrap()
                .and_then(|r| r.get(0));
            if past == Some(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the reader did not confirm {end} within 180 s:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A scratch warehouse database from `sql/dwh.sql`, owned by `dwh_sink`.
pub struct Dwh {
    pub db: String,
    pub url: String,
    admin_url: String,
}

impl Drop for Dwh {
    fn drop(&mut self) {
        drop_database(&self.admin_url, &self.db, None);
    }
}

impl Dwh {
    /// Creates it and applies the schema.
    pub async fn create(tag: &str) -> Dwh {
        let admin_url = var("PG_ADMIN_URL");
        let db = unique(&format!("dwh_{tag}_"));
        connect(&admin_url)
            .await
            .batch_execute(&format!("CREATE DATABASE {db} OWNER dwh_sink"))
            .await
            .unwrap();
        let url = with_db(&var("DWH_URL"), &db);
        let schema = std::fs::read_to_string(repo().join("sql/dwh.sql")).unwrap();
        connect(&url).await.batch_execute(&schema).await.unwrap();
        Dwh { db, url, admin_url }
    }

    /// A session.
    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// An integer from a query.
    pub async fn count(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Waits until the stored offsets reach the topics' high watermarks.
    pub async fn wait_caught_up(&self, topics: &[String], sink: &mut Sink) {
        let highs = high_watermarks(topics);
        let client = self.client().await;
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let stored: Vec<(String, i32, i64)> = client
                .query("SELECT topic, partition, next_offset FROM sink_offset", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            let behind = highs.iter().filter(|((t, p), high)| {
                *high > 0
                    && !stored
                        .iter()
                        .any(|(st, sp, next)| st == t && sp == p && *next >= *high)
            });
            if behind.count() == 0 {
                return;
            }
            if let Some(status) = sink.exited() {
                panic!("dwh-sink exited ({status}):\n{}", sink.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "the sink did not catch up within 180 s:\n{}",
                sink.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// High watermark per (topic, partition).
pub fn high_watermarks(topics: &[String]) -> Vec<((String, i32), i64)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", var("KAFKA_BOOTSTRAP_SERVERS"))
        .create()
        .unwrap();
    let mut out = Vec::new();
    for t in topics {
        let md = c.fetch_metadata(Some(t), Duration::from_secs(10)).unwrap();
        let partitions = md.topics()[0].partitions().len() as i32;
        for p in 0..partitions {
            let (_, high) = c.fetch_watermarks(t, p, Duration::from_secs(10)).unwrap();
            out.push(((t.clone(), p), high));
        }
    }
    out
}

/// The `dwh-sink` binary as a child process.
pub struct Sink {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Sink {
    /// Starts the sink on `topics` into `dwh`, reading `source_db` as
    /// `instashop`.
    pub fn start(dwh: &Dwh, topics: &[String], source_db: &str, log: &PathBuf) -> Sink {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_dwh-sink"))
            .args(["--dwh-url", &dwh.url])
            .args(["--topics", &topics.join(",")])
            .args(["--source-dbs", &format!("instashop={source_db}")])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--dlq-topic", &format!("{}.dlq", dwh.db)])
            .args(["--batch-size", "500", "--linger-ms", "50"])
            .env("KAFKA_BOOTSTRAP_SERVERS", var("KAFKA_BOOTSTRAP_SERVERS"))
            .env("INSTASHOP_ENV_FILE", "")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Sink {
            child: Some(child),
            log: log.clone(),
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().unwrap()
    }

    /// The exit status, if it exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The address of its `/metrics` and `/health`, from its start line
    /// (it binds port 0); waits for the line.
    pub async fn http_addr(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let found = text
                .lines()
                .rev()
                .find(|l| l.contains("dwh-sink starting"))
                .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")))
                .map(str::to_owned);
            if let Some(addr) = found {
                return addr;
            }
            if let Some(status) = self.exited() {
                panic!("dwh-sink exited ({status}):\n{}", self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "no start line in 60 s:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of the log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// `dwh-sink verify` of the instashop checks against `source`; returns
/// (success, output).
pub fn verify(dwh: &Dwh, source: &Source) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dwh-sink"))
        .args(["--dwh-url", &dwh.url, "verify", "--databases", "instashop"])
        .args(["--instashop-url", &source.url])
        .env("INSTASHOP_ENV_FILE", "")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `GET path` on `addr`: the status code and the body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    sock.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    sock.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}
