//! Bad input: each case ends the reader with one clear `error:` line and a
//! non-zero exit. `wal_level` is `logical` on the shared stack (changing it
//! needs a restart that would disturb other tests), so that case runs
//! against a scratch cluster of its own started with `wal_level = replica`.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::scratch_pg::ScratchPg;
use support::{Reader, TestDb, connect, tail, unique, with_db};

const EXIT: Duration = Duration::from_secs(60);

/// Exactly one `error:` line, containing every `needle`.
fn assert_one_error_line(log: &str, needles: &[&str]) {
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(
        errors.len(),
        1,
        "expected exactly one error line, log:\n{}",
        tail(log, 30)
    );
    for n in needles {
        assert!(
            errors[0].contains(n),
            "error line {:?} lacks {n:?}",
            errors[0]
        );
    }
    assert!(!log.contains("panicked"), "no panics: {}", tail(log, 30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_reader_on_the_same_slot_exits_clearly() {
    let db = TestDb::create("twoslot", support::CRM_SQL).await;
    let first = Reader::start(&db, &[]);
    db.wait_streaming(&first).await;
    let mut second = Reader::start(&db, &[]);
    let (ok, log) = second.wait_exit(EXIT);
    assert!(!ok);
    assert_one_error_line(&log, &["in use by another reader", &db.slot]);
    drop(first);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_exits_clearly() {
    let db = TestDb::create("badpw", support::CRM_SQL).await;
    let url = db
        .cdc_url
        .replace("cdc_reader:cdc_reader@", "cdc_reader:not-the-password@");
    let mut r = Reader::start_sources(&[(&db.name, &url)], &db.slot, &[]);
    let (ok, log) = r.wait_exit(EXIT);
    assert!(!ok);
    assert_one_error_line(&log, &["password authentication failed", "cdc_reader"]);
    assert!(
        !log.contains("not-the-password"),
        "the password must never be logged"
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_replication_privilege_says_how_to_fix() {
    let db = TestDb::create("norepl", support::CRM_SQL).await;
    let role = unique("cdct_norepl");
    let admin = connect(&db.admin_url).await;
    admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD 'pw'"))
        .await
        .unwrap();
    db.admin_here()
        .await
        .batch_execute(&format!("GRANT SELECT ON interaction TO {role}"))
        .await
        .unwrap();
    let url = with_db(
        &format!("postgres://{role}:pw@127.0.0.1:{}/x", port(&db.admin_url)),
        &db.name,
    );
    let mut r = Reader::start_sources(&[(&db.name, &url)], &db.slot, &[]);
    let (ok, log) = r.wait_exit(EXIT);
    assert!(!ok);
    assert_one_error_line(
        &log,
        &[
            "lacks the REPLICATION attribute",
            &format!("ALTER ROLE \"{role}\" REPLICATION"),
        ],
    );
    db.admin_here()
        .await
        .batch_execute(&format!("DROP OWNED BY {role}"))
        .await
        .unwrap();
    db.cleanup().await;
    admin
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .unwrap();
}

fn port(url: &str) -> String {
    url.rsplit_once(':')
        .unwrap()
        .1
        .split('/')
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_publication_names_the_sql_to_run() {
    let db = TestDb::create(
        "nopub",
        "CREATE TABLE item (id bigint PRIMARY KEY, name text); GRANT SELECT ON item TO cdc_reader;",
    )
    .await;
    let mut r = Reader::start(&db, &[]);
    let (ok, log) = r.wait_exit(EXIT);
    assert!(!ok);
    assert_one_error_line(
        &log,
        &[
            "publication \"instashop_cdc\" does not exist",
            "CREATE PUBLICATION \"instashop_cdc\" FOR TABLE \"public\".\"item\"",
        ],
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_select_privilege_names_the_grant() {
    let db = TestDb::create(
        "nosel",
        "CREATE TABLE item (id bigint PRIMARY KEY, name text); CREATE PUBLICATION instashop_cdc FOR TABLE item;",
    )
    .await;
    let mut r = Reader::start(&db, &[]);
    let (ok, log) = r.wait_exit(EXIT);
    assert!(!ok);
    assert_one_error_line(
        &log,
        &[
            "cannot SELECT",
            "GRANT SELECT ON \"public\".\"item\" TO \"cdc_reader\"",
        ],
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_table_in_include_list_exits_clearly() {
    let db = TestDb::create("incl", support::CRM_SQL).await;
    let mut r = Reader::start(&db, &["--include-tables", "interaction,no_such_table"]);
    let (ok, log) = r.wait_exit(EXIT);
    assert!(!ok);
    assert_one_error_line(&log, &["unknown table public.no_such_table"]);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_not_logical_says_how_to_fix() {
    let pg = ScratchPg::start("replica", &[("wal_level", "replica")]);
    let db = TestDb::create_on(&pg, "walreplica", support::CRM_SQL).await;
    let level: String = connect(&pg.admin_url("postgres"))
        .await
        .query_one("SHOW wal_level", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(level, "replica", "the scratch cluster must not be logical");
    let mut r = Reader::start(&db, &[]);
    let (ok, log) = r.wait_exit(EXIT);
    assert!(!ok, "the reader must exit non-zero:\n{}", tail(&log, 30));
    assert_one_error_line(
        &log,
        &[
            "wal_level is 'replica'",
            "ALTER SYSTEM SET wal_level = logical",
            "restart PostgreSQL",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_kafka_exits_clearly() {
    let db = TestDb::create("nokafka", support::CRM_SQL).await;
    // Port 1: nothing listens there, so no broker can ever answer.
    let bad = "127.0.0.1:1";
    let mut r = Reader::start(
        &db,
        &[
            "--kafka-bootstrap-servers",
            bad,
            "--kafka-startup-timeout-secs",
            "2",
        ],
    );
    let (ok, log) = r.wait_exit(Duration::from_secs(30));
    assert!(!ok, "the reader must exit non-zero:\n{}", tail(&log, 30));
    assert_one_error_line(
        &log,
        &[
            &format!("no Kafka broker answered at {bad} within 2 s"),
            "--kafka-bootstrap-servers",
            "KAFKA_BOOTSTRAP_SERVERS",
            "scripts/status",
        ],
    );
    // Checked before any slot work: nothing was created in the database.
    let slots: i64 = connect(&db.admin_url)
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "no slot may be created before Kafka answered");
    db.cleanup().await;
}
