//! One transaction of 1,000,000 rows: every row reaches Kafka exactly once
//! (no restart, so no re-sends) before the slot confirms the commit.
//!
//! Why no full replay here: consuming a million records back from the local
//! brokers (SQLite-backed) takes far longer than the test budget on this
//! machine; the count of records per topic is exact and cheap, and the replay
//! checker covers row contents in the other tests.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod support;

use std::time::{Duration, Instant};

use support::{Reader, TestDb};

const SCHEMA: &str = "
CREATE TABLE big (id bigint PRIMARY KEY, n integer NOT NULL, note text NOT NULL);
CREATE PUBLICATION instashop_cdc FOR TABLE big;
GRANT SELECT ON big TO cdc_reader;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_million_row_transaction() {
    let db = TestDb::create("big", SCHEMA).await;
    let reader = Reader::start(&db, &[]);
    db.wait_caught_up(Duration::from_secs(60), Some(&reader.log))
        .await;
    let owner = db.owner().await;
    owner
        .batch_execute(
            "INSERT INTO big SELECT g, g % 1000, 'row ' || g FROM generate_series(1, 1000000) g",
        )
        .await
        .unwrap();
    let started = Instant::now();
    db.wait_caught_up(Duration::from_secs(900), Some(&reader.log))
        .await;
    println!(
        "1,000,000 rows confirmed after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let topic = support::topic(&db, "big");
    let count = tokio::task::spawn_blocking(move || support::message_count(&topic))
        .await
        .unwrap();
    assert_eq!(count, 1_000_000, "every row exactly once in Kafka");
    drop(reader);
    db.cleanup().await;
}
