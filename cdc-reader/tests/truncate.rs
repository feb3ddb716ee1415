//! TRUNCATE reaches every partition of the table's topic, in order with that
//! partition's other events: a consumer of any one partition that empties
//! its rows on `op: "t"` ends with exactly the table's rows of that
//! partition, even when rows are inserted right before and after the
//! truncate under load.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value;
use support::{Event, Reader, TestDb, consume_all, db_rows, topic};
use tokio_util::sync::CancellationToken;

const SCHEMA: &str = "
CREATE TABLE item (id bigserial PRIMARY KEY, v int NOT NULL);
ALTER TABLE item REPLICA IDENTITY FULL;
INSERT INTO item (v) SELECT g FROM generate_series(1, 300) g;
CREATE PUBLICATION instashop_cdc FOR TABLE item;
GRANT SELECT ON item TO cdc_reader;
";

/// Inserts, updates and deletes rows of `item` until `stop`.
async fn load(url: String, stop: CancellationToken) -> u64 {
    let client = support::connect(&url).await;
    let mut batches = 0;
    while !stop.is_cancelled() {
        client
            .batch_execute(
                "INSERT INTO item (v) SELECT g FROM generate_series(1, 40) g;
                 UPDATE item SET v = v + 1 WHERE id IN (SELECT id FROM item ORDER BY random() LIMIT 5);
                 DELETE FROM item WHERE id IN (SELECT id FROM item ORDER BY random() LIMIT 3);",
            )
            .await
            .unwrap();
        batches += 1;
        tokio::task::yield_now().await;
    }
    batches
}

/// Folds each partition on its own, as a consumer of only that partition
/// would: `t` empties that partition's rows.
fn replay_per_partition(events: &[Event]) -> BTreeMap<String, Value> {
    let mut partitions: HashMap<i32, BTreeMap<String, Value>> = HashMap::new();
    for e in events {
        let Some(v) = &e.value else { continue };
        let rows = partitions.entry(e.partition).or_default();
        match v["op"].as_str().unwrap() {
            "c" | "r" | "u" => {
                rows.insert(e.key.clone(), v["after"].clone());
            }
            "d" => {
                rows.remove(&e.key);
            }
            "t" => rows.clear(),
            other => panic!("unknown op {other}"),
        }
    }
    partitions.into_values().flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_under_load_reaches_every_partition_in_order() {
    let db = TestDb::create("truncate", SCHEMA).await;
    let mut reader = Reader::start(&db, &[]);
    db.wait_streaming(&reader).await;
    let owner = db.owner().await;

    let stop = CancellationToken::new();
    let loader = tokio::spawn(load(db.owner_url.clone(), stop.clone()));
    for round in 0..3 {
        // Let the load write for a while, measured in committed WAL, not time.
        let from = db.current_lsn().await;
        while db.current_lsn().await < from + 64 * 1024 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        owner.batch_execute("TRUNCATE item").await.unwrap();
        if round == 1 {
            // Truncate and insert in one transaction.
            owner
                .batch_execute(
                    "BEGIN; TRUNCATE item; INSERT INTO item (v) VALUES (-1), (-2); COMMIT",
                )
                .await
                .unwrap();
        }
    }
    let from = db.current_lsn().await;
    while db.current_lsn().await < from + 64 * 1024 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    assert!(loader.await.unwrap() > 0);
    db.wait_caught_up(Duration::from_secs(180), Some(&reader.log))
        .await;

    let events = consume_all(&[topic(&db, "item")]);
    let truncates: Vec<&Event> = events
        .iter()
        .filter(|e| e.value.as_ref().is_some_and(|v| v["op"] == "t"))
        .collect();
    let mut per_partition: BTreeMap<i32, usize> = BTreeMap::new();
    for t in &truncates {
        assert_eq!(t.key, "null", "a truncate has a null key, as Debezium's");
        let v = t.value.as_ref().unwrap();
        assert!(v["source"]["commit_lsn"].as_u64().is_some());
        assert!(v["source"]["lsn"].as_u64().is_some());
        *per_partition.entry(t.partition).or_default() += 1;
    }
    assert_eq!(
        per_partition,
        (0..3).map(|p| (p, 4)).collect::<BTreeMap<i32, usize>>(),
        "each of the four truncates on each of the three partitions"
    );
    let client = db.owner().await;
    let table = db_rows(&client, "item").await;
    let replayed = replay_per_partition(&events);
    assert_eq!(
        replayed.len(),
        table.len(),
        "rows after replaying each partition on its own"
    );
    assert_eq!(replayed, table);
    // The shared replay checker, reading every partition interleaved.
    support::assert_replay_equals_db(&db, &["item"]).await;
    assert!(reader.stop());
    db.cleanup().await;
}
