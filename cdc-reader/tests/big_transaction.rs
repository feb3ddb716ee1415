//! One transaction of 1,000,000 rows: every row reaches Kafka and the replay
//! equals the table.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod support;

use std::time::{Duration, Instant};

use support::{Reader, TestDb, replay_equals_db};

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
    replay_equals_db(&db, &["big"], false).await;
    drop(reader);
    db.cleanup().await;
}
