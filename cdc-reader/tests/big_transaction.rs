//! One transaction of 1,000,000 rows: every row reaches Kafka exactly once
//! (no restart, so no re-sends) before the slot confirms the commit, and the
//! replay of the topic equals the table, row by row and column by column.
//!
//! The replay streams the records through `consume_fold`, so no list of a
//! million events is held.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod support;

use std::time::{Duration, Instant};

use support::{Reader, TestDb};

const SCHEMA: &str = "
CREATE TABLE big (id bigint PRIMARY KEY, n integer NOT NULL, note text NOT NULL);
CREATE PUBLICATION instashop_cdc FOR TABLE big;
GRANT SELECT ON big TO cdc_reader;
";

const ROWS: i64 = 1_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_million_row_transaction() {
    let db = TestDb::create("big", SCHEMA).await;
    let reader = Reader::start(&db, &[]);
    db.wait_caught_up(Duration::from_secs(60), Some(&reader.log))
        .await;
    let topic = support::topic(&db, "big");
    // The empty table's snapshot left its end markers in the topic: count
    // what the transaction adds.
    let before = {
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || support::message_count(&topic))
            .await
            .unwrap()
    };
    let owner = db.owner().await;
    owner
        .batch_execute(&format!(
            "INSERT INTO big SELECT g, g % 1000, 'row ' || g FROM generate_series(1, {ROWS}) g"
        ))
        .await
        .unwrap();
    let started = Instant::now();
    db.wait_caught_up(Duration::from_secs(900), Some(&reader.log))
        .await;
    println!(
        "{ROWS} rows confirmed after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let count = tokio::task::spawn_blocking(move || support::message_count(&topic))
        .await
        .unwrap();
    assert_eq!(count - before, ROWS, "every row exactly once in Kafka");
    let started = Instant::now();
    support::replay_equals_db(&db, &["big"], false).await;
    println!(
        "replay of {ROWS} records equals the table ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    drop(reader);
    db.cleanup().await;
}
