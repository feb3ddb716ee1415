//! The reader binary on a scratch database of the instashop schema, for the
//! end-to-end tests: the database, its slots and the reader process are
//! dropped with [`Scratch`], also after a failed assertion.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

/// The captured tables.
pub const INSTASHOP: [(&str, &str); 5] = [
    ("instashop", "customer"),
    ("instashop", "buyer"),
    ("instashop", "product"),
    ("instashop", "transaction"),
    ("instashop", "transactiondetail"),
];

/// A variable of `.local/env`.
pub fn var(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set: run scripts/up"))
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

/// The reader binary (`CDC_READER_BIN`, else `target/debug/cdc-reader`).
pub fn reader_binary() -> PathBuf {
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
pub struct Scratch {
    pub admin_url: String,
    pub db: String,
    pub slot: String,
    pub reader: Option<Child>,
    pub log: PathBuf,
}

impl Scratch {
    /// The last lines of the reader's log.
    pub fn log_tail(&self) -> String {
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
        // Every slot of a test is named after its database.
        let (admin_url, db) = (self.admin_url.clone(), self.db.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let admin = connect(&admin_url).await;
                drop_slots(&admin, &db).await;
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                    .await;
            });
        })
        .join();
    }
}

/// Ends the walsenders of the slots starting with `prefix` and drops the
/// slots (a killed reader's walsender lingers a moment).
pub async fn drop_slots(admin: &Client, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let _ = admin
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE starts_with(slot_name, $1) AND active_pid IS NOT NULL",
                &[&prefix],
            )
            .await;
        let _ = admin
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE starts_with(slot_name, $1) AND NOT active",
                &[&prefix],
            )
            .await;
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE starts_with(slot_name, $1)",
                &[&prefix],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the slots {prefix}* could not be dropped within 20 s");
}

/// A few rows in every table.
pub const SEED: &str = "
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

impl Scratch {
    /// A fresh database owned by `instashop_app` with the instashop schema
    /// and [`SEED`]; returns it with the owner's URL.
    pub async fn create(tag: &str) -> (Scratch, String) {
        let admin_url = var("PG_ADMIN_URL");
        let db = super::unique(&format!("mc_{tag}_"));
        connect(&admin_url)
            .await
            .batch_execute(&format!("CREATE DATABASE {db} OWNER instashop_app"))
            .await
            .unwrap();
        let scratch = Scratch {
            admin_url,
            log: std::env::temp_dir().join(format!("{db}.reader.log")),
            slot: format!("{db}_slot"),
            db: db.clone(),
            reader: None,
        };
        let owner_url = with_db(&var("PG_INSTASHOP_URL"), &db);
        let schema = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sql/instashop.sql"),
        )
        .unwrap();
        let owner = connect(&owner_url).await;
        owner.batch_execute(&schema).await.unwrap();
        owner.batch_execute(SEED).await.unwrap();
        (scratch, owner_url)
    }

    /// Starts the reader on this database (source `instashop`, topics
    /// `<topic_prefix>.public.<table>`, three partitions).
    pub fn start_reader(&mut self, kafka: &str, topic_prefix: &str) {
        self.start_reader_with(kafka, topic_prefix, &[]);
    }

    /// [`Scratch::start_reader`] with more arguments for the reader.
    pub fn start_reader_with(&mut self, kafka: &str, topic_prefix: &str, extra: &[&str]) {
        let file = std::fs::File::create(&self.log).unwrap();
        self.reader = Some(
            Command::new(reader_binary())
                .args(extra)
                .arg("--source")
                .arg(format!(
                    "instashop={}",
                    with_db(&var("CDC_PG_INSTASHOP_URL"), &self.db)
                ))
                .args(["--slot", &self.slot])
                .args(["--topic-prefix", &format!("instashop={topic_prefix}")])
                .args([
                    "--metrics-addr",
                    "127.0.0.1:0",
                    "--status-interval-ms",
                    "200",
                ])
                .env("KAFKA_BOOTSTRAP_SERVERS", kafka)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .env_remove("CDC_SOURCES")
                .stdout(Stdio::null())
                .stderr(file)
                .spawn()
                .unwrap(),
        );
    }

    /// Restarting from scratch, first half: kills the reader and drops its
    /// slots; the next [`Scratch::start_reader`] creates the slot
    /// `<db>_again` and takes a new snapshot.
    pub async fn kill_reader_and_drop_slots(&mut self, admin: &Client) {
        if let Some(mut reader) = self.reader.take() {
            reader.kill().unwrap();
            reader.wait().unwrap();
        }
        drop_slots(admin, &self.slot).await;
        self.slot = format!("{}_again", self.db);
    }

    /// A column of `pg_replication_slots` of slot `name`, as text.
    pub async fn slot_field(&self, admin: &Client, name: &str, field: &str) -> Option<String> {
        admin
            .query_opt(
                &format!("SELECT {field}::text FROM pg_replication_slots WHERE slot_name = $1"),
                &[&name],
            )
            .await
            .unwrap()
            .and_then(|r| r.get(0))
    }

    /// Waits until the reader's incremental snapshot queue, as saved in the
    /// signal table, is empty (every queued table finished).
    pub async fn wait_incremental_done(&self, owner: &Client) {
        let id = format!("progress:{}", self.slot);
        self.wait_until(
            owner,
            "SELECT json_array_length(data::json -> 'queue') = 0 FROM cdc_signal WHERE id = $1",
            &[&id],
            "the incremental snapshot did not finish",
        )
        .await;
    }

    /// Waits until the reader's slot confirmed everything committed so far
    /// (every earlier change is in Kafka).
    pub async fn wait_confirmed_now(&self, admin: &Client) {
        let end: String = admin
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        self.wait_until(
            admin,
            "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&self.slot, &end],
            &format!("the reader did not confirm {end}"),
        )
        .await;
    }

    /// Polls `sql` (one boolean, or no row) until it is true, at most 180 s;
    /// then fails with `what` and the reader's log tail.
    async fn wait_until(
        &self,
        client: &Client,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        what: &str,
    ) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let done: Option<bool> = client
                .query_opt(sql, params)
                .await
                .unwrap()
                .and_then(|r| r.get(0));
            if done == Some(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} within 180 s:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A consumer of the scratch database's topics under a unique prefix and
/// group; returns it with the prefix and the topics.
pub async fn consumer_config(
    s: &super::Stack,
    scratch: &Scratch,
    topic_prefix: &str,
) -> (metrics_consumer::Config, String, Vec<String>) {
    let topics: Vec<String> = INSTASHOP
        .iter()
        .map(|(_, t)| format!("{topic_prefix}.public.{t}"))
        .collect();
    let prefix = format!("{}:", super::unique("mctest:e2e:"));
    let group = super::unique("mctest-e2e-");
    let dlq = format!("{topic_prefix}.dlq");
    super::create_topics(&s.kafka, std::slice::from_ref(&dlq), 1).await;
    let mut config = super::config(
        s,
        &super::Topics {
            base: String::new(),
        },
        &prefix,
        &group,
        &dlq,
    );
    config.topics = topics.join(",");
    config.source_dbs = format!("instashop={}", scratch.db);
    (config, prefix, topics)
}

/// Waits (blocking task) until the consumer stored the topics' end offsets.
pub async fn caught_up(s: &super::Stack, prefix: &str, topics: &[String]) {
    let (kafka, redis) = (s.kafka.clone(), s.redis.clone());
    let (prefix, topics) = (prefix.to_owned(), topics.to_vec());
    tokio::task::spawn_blocking(move || {
        let s = super::Stack {
            kafka,
            redis,
            pg_admin: String::new(),
        };
        super::wait_caught_up(&s, &prefix, &topics, 3, Duration::from_secs(180));
    })
    .await
    .unwrap();
}

/// Asserts the metrics under `prefix` equal the SQL definitions run on the
/// captured database itself.
pub async fn assert_equals_source(s: &super::Stack, prefix: &str, owner: &Client, note: &str) {
    let min_window = super::now_ms() / 1000 - 3600 + 120;
    let expected = super::sql_metrics(owner, &INSTASHOP, min_window).await;
    let actual = super::redis_metrics(s, prefix, min_window);
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
        "metrics differ from SQL (key, sql, redis), {note}: {diff:#?}"
    );
}

/// A consumer started on the scratch topics, with what ends it.
pub struct RunningConsumer {
    /// Cancels the consumer's run.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The consumer's run.
    pub run: tokio::task::JoinHandle<Result<(), metrics_consumer::Error>>,
    /// Its Redis key prefix.
    pub prefix: String,
    /// The topics it reads.
    pub topics: Vec<String>,
}

/// Starts a consumer of the scratch database's topics (see [`consumer_config`]).
pub async fn start_consumer(
    s: &super::Stack,
    scratch: &Scratch,
    topic_prefix: &str,
) -> RunningConsumer {
    let (config, prefix, topics) = consumer_config(s, scratch, topic_prefix).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(metrics_consumer::run(config, shutdown.clone()));
    RunningConsumer {
        shutdown,
        run,
        prefix,
        topics,
    }
}

/// Waits until the consumer applied everything in its topics, stops it
/// (it must exit cleanly), checks every metric against its SQL on the
/// source and removes the consumer's keys.
pub async fn stop_and_compare(s: &super::Stack, c: RunningConsumer, owner: &Client, note: &str) {
    caught_up(s, &c.prefix, &c.topics).await;
    c.shutdown.cancel();
    c.run.await.unwrap().unwrap();
    assert_equals_source(s, &c.prefix, owner, note).await;
    super::cleanup_redis(s, &c.prefix);
}
