//! Integration tests against the real local stack (`scripts/up`). Each test
//! creates its own four databases (unique names, owner `instashop_app`) via
//! `PG_ADMIN_URL` and drops them afterwards; the shared databases are never
//! touched. Without the stack these tests fail with a message saying so.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use generator::config::{MetricsAddr, Rate};
use generator::op::{Database, ShipStatus, Table, TxStatus};
use generator::progress::Counters;
use generator::{Config, Error};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

fn admin_url() -> String {
    local_stack::envfile::load();
    std::env::var("PG_ADMIN_URL").unwrap_or_else(|_| {
        panic!("PG_ADMIN_URL is not set: the local stack is not up (run scripts/up, which writes .local/env)")
    })
}

/// `url` with its database replaced.
fn with_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("URL has a database path");
    format!("{base}/{db}")
}

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot connect to {} ({e}); is the stack up? run scripts/up",
                local_stack::redact::url(url)
            )
        });
    tokio::spawn(conn);
    client
}

/// Four fresh databases, dropped (with their slots) when this goes away.
struct TestDbs {
    admin: String,
    names: [String; 4],
    app_base: String,
    slots: Vec<(String, String)>,
}

impl TestDbs {
    async fn create(tag: &str) -> TestDbs {
        let admin = admin_url();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos();
        let unique = format!("gt_{tag}_{}_{nanos}", std::process::id());
        let names = Database::ALL.map(|db| format!("{unique}_{}", db.name()));
        let client = connect(&admin).await;
        for name in &names {
            client
                .batch_execute(&format!("CREATE DATABASE {name} OWNER instashop_app"))
                .await
                .expect("create test database");
        }
        let app = std::env::var("PG_INSTASHOP_URL").expect("PG_INSTASHOP_URL in .local/env");
        TestDbs {
            admin,
            names,
            app_base: app,
            slots: Vec::new(),
        }
    }

    fn url(&self, db: Database) -> String {
        with_db(&self.app_base, &self.names[db.index()])
    }

    fn admin_url(&self, db: Database) -> String {
        with_db(&self.admin, &self.names[db.index()])
    }

    async fn admin(&self, db: Database) -> Client {
        connect(&self.admin_url(db)).await
    }

    fn config(&self, seed: u64, events: u64) -> Config {
        let mut c = Config::defaults();
        c.instashop_url = self.url(Database::Instashop);
        c.crm_url = self.url(Database::Crm);
        c.erp_url = self.url(Database::Erp);
        c.ecommerce_url = self.url(Database::Ecommerce);
        c.rate = Rate::Max;
        c.events = Some(events);
        c.seed = seed;
        c.metrics_addr = MetricsAddr(None);
        c.progress_secs = 0;
        c
    }

    /// A test_decoding slot: every change from now on, for auditing. Needs
    /// the tables to exist for nothing; it sees everything after creation.
    async fn audit(&mut self, db: Database) -> String {
        let slot = format!("{}_{}", self.names[db.index()], "audit");
        self.admin(db)
            .await
            .query(
                "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
                &[&slot],
            )
            .await
            .expect("create audit slot");
        self.slots
            .push((self.names[db.index()].clone(), slot.clone()));
        slot
    }

    /// Decoded changes of an audit slot (consumed).
    async fn changes(&self, db: Database, slot: &str) -> Vec<String> {
        self.admin(db)
            .await
            .query(
                "SELECT data FROM pg_logical_slot_get_changes($1, NULL, NULL)",
                &[&slot],
            )
            .await
            .expect("read audit slot")
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect()
    }
}

impl Drop for TestDbs {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let names = self.names.clone();
        let slots = self.slots.clone();
        // Runs even when the test panicked; a fresh runtime on a plain thread
        // because Drop cannot await.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok((client, conn)) = tokio_postgres::connect(&admin, NoTls).await else {
                    return;
                };
                tokio::spawn(conn);
                for (_, slot) in &slots {
                    let _ = client
                        .query("SELECT pg_drop_replication_slot($1)", &[slot])
                        .await;
                }
                for name in &names {
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

async fn run(config: Config) -> Arc<Counters> {
    let counters = Arc::new(Counters::default());
    generator::run_with(config, CancellationToken::new(), counters.clone())
        .await
        .unwrap_or_else(|e| panic!("generator failed: {e:#}"));
    counters
}

/// Every row of every table as JSON, minus wall-clock timestamps.
async fn dump(dbs: &TestDbs) -> BTreeMap<&'static str, Vec<String>> {
    let mut out = BTreeMap::new();
    for db in Database::ALL {
        let client = dbs.admin(db).await;
        for table in Table::ALL.iter().filter(|t| t.database() == db) {
            let rows = client
                .query(
                    &format!(
                        "SELECT (to_jsonb(t) - 'created_at' - 'updated_at')::text FROM {} t ORDER BY id",
                        table.name()
                    ),
                    &[],
                )
                .await
                .expect("dump table");
            out.insert(table.name(), rows.iter().map(|r| r.get(0)).collect());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_schema_publications_and_grants() {
    let dbs = TestDbs::create("schema").await;
    run(dbs.config(1, 200)).await;
    for db in Database::ALL {
        let client = dbs.admin(db).await;
        let expected: Vec<&str> = Table::ALL
            .iter()
            .filter(|t| t.database() == db)
            .map(|t| t.name())
            .collect();
        let mut published: Vec<String> = client
            .query(
                "SELECT tablename::text FROM pg_publication_tables WHERE pubname = 'instashop_cdc'",
                &[],
            )
            .await
            .expect("publication query")
            .iter()
            .map(|r| r.get(0))
            .collect();
        published.sort();
        // The reader's signal table is published too (its rows are signals
        // to the reader, never a topic).
        let mut want: Vec<String> = expected
            .iter()
            .map(|s| s.to_string())
            .chain(std::iter::once("cdc_signal".to_owned()))
            .collect();
        want.sort();
        assert_eq!(published, want, "publication of {}", db.name());
        for table in &expected {
            let row = client
                .query_one(
                    "SELECT c.relreplident::text, pg_get_userbyid(c.relowner)::text, \
                     has_table_privilege('cdc_reader', c.oid, 'SELECT'), \
                     has_table_privilege('cdc_reader', c.oid, 'INSERT'), \
                     (SELECT count(*) FROM pg_class p WHERE p.oid = c.oid) \
                     FROM pg_class c WHERE c.oid = $1::text::regclass",
                    &[&format!("public.{table}")],
                )
                .await
                .expect("table exists");
            let ident: String = row.get(0);
            let owner: String = row.get(1);
            let full = !matches!(*table, "customer" | "buyer" | "carrier");
            assert_eq!(
                ident,
                if full { "f" } else { "d" },
                "replica identity of {table}"
            );
            assert_eq!(owner, "instashop_app", "owner of {table}");
            assert!(row.get::<_, bool>(2), "cdc_reader can read {table}");
            assert!(!row.get::<_, bool>(3), "cdc_reader cannot write {table}");
            let rows: i64 = client
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .expect("count")
                .get(0);
            if *table != "transactiondetail"
                && *table != "transaction"
                && *table != "shipment"
                && *table != "interaction"
            {
                assert!(rows > 0, "base data in {table}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_gives_same_rows_whatever_the_batching() {
    let a = TestDbs::create("seed_a").await;
    let b = TestDbs::create("seed_b").await;
    let c = TestDbs::create("seed_c").await;
    let mut config_a = a.config(7, 3000);
    config_a.batch = Some(500);
    let mut config_b = b.config(7, 3000);
    config_b.batch = Some(37);
    let mut config_c = c.config(8, 3000);
    config_c.batch = Some(500);
    let (ca, cb, _cc) = tokio::join!(run(config_a), run(config_b), run(config_c));
    assert_eq!(ca.events.get(), 3000);
    assert_eq!(cb.events.get(), 3000);
    let (da, db, dc) = tokio::join!(dump(&a), dump(&b), dump(&c));
    for (table, rows) in &da {
        assert!(!rows.is_empty(), "{table} has rows");
        assert!(
            rows == &db[table],
            "{table} differs between runs with seed 7"
        );
    }
    assert_ne!(
        da["transaction"], dc["transaction"],
        "seed 8 gives other purchases"
    );
}

fn parse_status(line: &str, column: &str, after: &str) -> Option<String> {
    let rest = &line[line.find(after)? + after.len()..];
    let start = rest.find(&format!("{column}["))?;
    let rest = &rest[start..];
    let quote = rest.find(":'")? + 2;
    let end = rest[quote..].find('\'')?;
    Some(rest[quote..quote + end].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariants_hold_across_runs_and_restarts() {
    let mut dbs = TestDbs::create("inv").await;
    // The schema must exist before a slot can decode its tables' rows; the
    // first short run creates it and the base data.
    run(dbs.config(3, 10)).await;
    let tx_slot = dbs.audit(Database::Instashop).await;
    let ship_slot = dbs.audit(Database::Ecommerce).await;
    // Two runs: the second resumes from the rows the first left.
    for _ in 0..2 {
        let counters = run(dbs.config(3, 3000)).await;
        // The model's view matches the rows: no guarded update or delete
        // found its row changed behind its back.
        assert_eq!(counters.skipped.get(), 0, "skipped writes");
    }

    let shop = dbs.admin(Database::Instashop).await;
    let q = |sql: &'static str| {
        let shop = &shop;
        async move {
            shop.query_one(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .get::<_, i64>(0)
        }
    };
    assert!(q("SELECT count(*) FROM transaction").await > 3000);
    assert_eq!(
        q("SELECT count(*) FROM transactiondetail d WHERE NOT EXISTS \
           (SELECT 1 FROM transaction t WHERE t.id = d.transaction_id) \
           OR NOT EXISTS (SELECT 1 FROM product p WHERE p.id = d.product_id)")
        .await,
        0,
        "details point at existing purchases and products"
    );
    assert_eq!(
        q("SELECT count(*) FROM transaction t WHERE total_amount IS DISTINCT FROM \
           (SELECT sum(d.quantity * d.unit_price) FROM transactiondetail d WHERE d.transaction_id = t.id)")
        .await,
        0,
        "total_amount is the sum of the lines (and every purchase has lines)"
    );
    let erp = dbs.admin(Database::Erp).await;
    let negative: i64 = erp
        .query_one("SELECT count(*) FROM stock WHERE quantity < 0", &[])
        .await
        .expect("stock query")
        .get(0);
    assert_eq!(negative, 0);

    // Shipments only for completed or refunded purchases (two databases).
    let statuses: HashMap<i64, String> = shop
        .query("SELECT id, status::text FROM transaction", &[])
        .await
        .expect("statuses")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let ecommerce = dbs.admin(Database::Ecommerce).await;
    let shipments = ecommerce
        .query("SELECT transaction_id FROM shipment", &[])
        .await
        .expect("shipments");
    assert!(shipments.len() > 1000);
    for r in &shipments {
        let t: i64 = r.get(0);
        let s = statuses.get(&t).map(String::as_str);
        assert!(
            matches!(s, Some("completed" | "refunded")),
            "shipment of purchase {t} in status {s:?}"
        );
    }

    // Status transitions, from the decoded WAL (test_decoding prints the old
    // row of REPLICA IDENTITY FULL tables): no trigger, nothing the generator
    // could fake.
    let mut seen_tx = 0;
    for line in dbs.changes(Database::Instashop, &tx_slot).await {
        if !line.starts_with("table public.transaction: UPDATE:") {
            continue;
        }
        let from = parse_status(&line, "status", "old-key:").expect("old status");
        let to = parse_status(&line, "status", "new-tuple:").expect("new status");
        if from == to {
            assert_eq!(from, "pending", "only carts change without a status change");
            continue;
        }
        let (f, t) = (
            TxStatus::parse(&from).expect("status"),
            TxStatus::parse(&to).expect("status"),
        );
        assert!(f.can_become(t), "purchase went {from} -> {to}");
        seen_tx += 1;
    }
    let mut seen_ship = 0;
    for line in dbs.changes(Database::Ecommerce, &ship_slot).await {
        if !line.starts_with("table public.shipment: UPDATE:") {
            continue;
        }
        let from = parse_status(&line, "status", "old-key:").expect("old status");
        let to = parse_status(&line, "status", "new-tuple:").expect("new status");
        let (f, t) = (
            ShipStatus::parse(&from).expect("status"),
            ShipStatus::parse(&to).expect("status"),
        );
        assert!(f.can_become(t), "shipment went {from} -> {to}");
        seen_ship += 1;
    }
    assert!(seen_tx > 500, "saw {seen_tx} purchase transitions");
    assert!(seen_ship > 1000, "saw {seen_ship} shipment transitions");

    // Inserts, updates and deletes on every table, as Postgres counts them.
    // Statistics are flushed when the generator's sessions end; poll.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut missing = Vec::new();
        for db in Database::ALL {
            let client = dbs.admin(db).await;
            // The generator's tables (the reader's signal table is not
            // written by it).
            let tables: Vec<&str> = Table::ALL
                .iter()
                .filter(|t| t.database() == db)
                .map(|t| t.name())
                .collect();
            for r in client
                .query(
                    "SELECT relname::text, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables WHERE relname = ANY($1)",
                    &[&tables],
                )
                .await
                .expect("pg_stat_user_tables")
            {
                let name: String = r.get(0);
                for (i, op) in ["insert", "update", "delete"].iter().enumerate() {
                    if r.get::<_, i64>(i + 1) == 0 {
                        missing.push(format!("{name}: no {op}"));
                    }
                }
            }
        }
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "after 15 s: {missing:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_lost_connections_without_losing_or_repeating_events() {
    local_stack::init_tracing();
    let clean = TestDbs::create("clean").await;
    let broken = TestDbs::create("broken").await;
    let mut config = clean.config(5, 4000);
    config.rate = Rate::PerSecond(2000.0);
    config.batch = Some(20);
    run(config).await;

    let mut config = broken.config(5, 4000);
    config.rate = Rate::PerSecond(2000.0);
    config.batch = Some(20);
    let counters = Arc::new(Counters::default());
    let task = tokio::spawn(generator::run_with(
        config,
        CancellationToken::new(),
        counters.clone(),
    ));
    let admin = connect(&broken.admin).await;
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    // A session killed while idle is replaced without an error (the client
    // sees it closed), so the retry path needs a kill during a write: four
    // rounds make one that lands only on idle sessions unlikely.
    for threshold in [800u64, 1600, 2400, 3200] {
        while counters.events.get() < threshold {
            assert!(Instant::now() < deadline, "generator stalled");
            if task.is_finished() {
                let result = task.await.expect("task joins");
                panic!("generator ended early: {result:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let killed: i64 = admin
            .query_one(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = ANY($1) AND application_name = 'instashop-generator') k",
                &[&broken.names.to_vec()],
            )
            .await
            .expect("terminate")
            .get(0);
        kills += killed;
    }
    assert!(kills >= 4, "killed {kills} sessions");
    let result = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("generator finishes")
        .expect("task joins");
    result.unwrap_or_else(|e| panic!("generator failed: {e:#}"));
    assert_eq!(counters.events.get(), 4000);
    assert!(counters.unavailable.get() >= 1);
    let (a, b) = tokio::join!(dump(&clean), dump(&broken));
    for (table, rows) in &a {
        assert!(rows == &b[table], "{table} differs after lost connections");
    }
}

#[test]
fn unreachable_database_gives_one_clear_line() {
    let bin = env!("CARGO_BIN_EXE_generator");
    for (bad, var) in [("instashop", "PG_INSTASHOP_URL"), ("erp", "PG_ERP_URL")] {
        let mut cmd = std::process::Command::new(bin);
        cmd.env("INSTASHOP_ENV_FILE", "")
            .env("RUST_BACKTRACE", "1")
            .env("GENERATOR_METRICS_ADDR", "")
            .args(["--events", "1"]);
        for db in ["instashop", "crm", "erp", "ecommerce"] {
            let port = if db == bad { 1 } else { 9 };
            cmd.env(
                format!("PG_{}_URL", db.to_uppercase()),
                format!("postgres://instashop_app:s3cret-pw@127.0.0.1:{port}/{db}"),
            );
        }
        // Only `bad` fails first: the others point at the discard port too,
        // but databases are reported in order, so make them valid-looking
        // only up to `bad`.
        if bad == "erp" {
            let admin = admin_url();
            cmd.env("PG_INSTASHOP_URL", with_db(&admin, "postgres"))
                .env("PG_CRM_URL", with_db(&admin, "postgres"));
        }
        let out = cmd.output().expect("run the generator binary");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "exit status {:?}", out.status);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line on stderr, got: {stderr}");
        let line = lines[0];
        assert!(line.starts_with("error: "), "{line}");
        assert!(line.contains(&format!("database {bad}")), "{line}");
        assert!(line.contains("127.0.0.1:1"), "{line}");
        assert!(line.contains(var), "{line}");
        assert!(!line.contains("s3cret-pw"), "password leaked: {line}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_returns_connect_error_naming_the_database() {
    let mut config = Config::defaults();
    config.crm_url = "postgres://instashop_app:pw@127.0.0.1:1/crm".into();
    config.instashop_url = with_db(&admin_url(), "postgres");
    config.events = Some(1);
    let err = generator::run(config, CancellationToken::new())
        .await
        .expect_err("crm is unreachable");
    assert!(
        matches!(
            err,
            Error::Connect {
                database: "crm",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn help_shows_no_password() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_generator"))
        .env(
            "PG_CRM_URL",
            "postgres://instashop_app:hunter2-pw@127.0.0.1:54329/crm",
        )
        .arg("--help")
        .output()
        .expect("run the generator binary");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--rate") && help.contains("GENERATOR_RATE"),
        "{help}"
    );
    assert!(!help.contains("hunter2-pw"), "{help}");
    assert!(!help.contains("instashop_app:instashop_app"), "{help}");
}
