//! Replay equals the database: snapshot of pre-existing rows plus streaming,
//! writes during startup, ALTER TABLE mid-stream, unchanged TOASTed values.
//! Each test has its own database, slot and topic prefix (= database name).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{
    Reader, SHOP_TABLES, TestDb, assert_replay_equals_db, shop_batch_sql, shop_load, tail,
};
use tokio_util::sync::CancellationToken;

const CATCH_UP: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_streaming_replays_exactly() {
    let db = TestDb::create("snap", support::INSTASHOP_SQL).await;
    let owner = db.owner().await;
    for _ in 0..3 {
        owner.batch_execute(&shop_batch_sql(200)).await.unwrap();
    }
    let mut reader = Reader::start(&db, &[]);
    db.wait_streaming(&reader).await;
    // Streaming: more traffic, single-row changes, a key change, a delete.
    owner.batch_execute(&shop_batch_sql(50)).await.unwrap();
    owner
        .batch_execute("INSERT INTO customer (name, email, subscription_plan, country) VALUES ('solo', 'solo@example.com', 'free', 'FR')")
        .await
        .unwrap();
    owner
        .batch_execute("UPDATE customer SET id = id + 1000000 WHERE name = 'solo'")
        .await
        .unwrap();
    owner
        .batch_execute(
            "DELETE FROM transactiondetail WHERE id = (SELECT max(id) FROM transactiondetail)",
        )
        .await
        .unwrap();
    db.wait_caught_up(CATCH_UP, Some(&reader.log)).await;
    let events = assert_replay_equals_db(&db, &SHOP_TABLES).await;

    // Snapshot rows: op r with first/last markers, then streamed events.
    let snapshot: Vec<&serde_json::Value> = events
        .iter()
        .filter_map(|e| e.value.as_ref())
        .filter(|v| v["op"] == "r")
        .collect();
    assert!(
        snapshot.len() >= 600,
        "expected the pre-existing rows as r events, got {}",
        snapshot.len()
    );
    let markers: Vec<&str> = snapshot
        .iter()
        .map(|v| v["source"]["snapshot"].as_str().unwrap())
        .collect();
    assert_eq!(markers.iter().filter(|m| **m == "first").count(), 1);
    assert_eq!(markers.iter().filter(|m| **m == "last").count(), 1);
    assert!(
        events
            .iter()
            .filter_map(|e| e.value.as_ref())
            .any(|v| v["op"] == "c" && v["source"]["snapshot"] == "false")
    );
    // A delete is followed by a tombstone.
    assert!(events.iter().any(|e| e.value.is_none()));

    // /metrics and /health.
    let metrics = support::http_get(&reader, "/metrics");
    let created = format!(
        "cdc_events_total{{topic=\"{}\",op=\"c\"}}",
        support::topic(&db, "customer")
    );
    assert!(metrics.contains(&created), "no {created} in:\n{metrics}");
    for family in [
        "cdc_replication_lag_bytes{",
        "cdc_replication_lag_seconds{",
        "cdc_confirmed_lsn{",
        "cdc_kafka_records_delivered_total{",
        "cdc_snapshot_rows_copied{",
    ] {
        assert!(metrics.contains(family), "no {family} in:\n{metrics}");
    }
    let health = support::http_get(&reader, "/health");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("streaming"), "{health}");

    assert!(
        reader.stop(),
        "reader did not exit 0 on SIGTERM:\n{}",
        tail(&reader.log_text(), 20)
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_startup_and_restart_lose_nothing() {
    let db = TestDb::create("startup", support::INSTASHOP_SQL).await;
    db.owner()
        .await
        .batch_execute(&shop_batch_sql(100))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let load = tokio::spawn(shop_load(db.owner_url.clone(), 20, stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut reader = Reader::start(&db, &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A graceful restart under load as well.
    assert!(reader.stop(), "{}", tail(&reader.log_text(), 20));
    let reader = Reader::start(&db, &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let batches = load.await.unwrap();
    assert!(batches > 3, "the load wrote only {batches} batches");
    db.wait_caught_up(CATCH_UP, Some(&reader.log)).await;
    let events = assert_replay_equals_db(&db, &SHOP_TABLES).await;
    support::check_duplicates(&events);
    drop(reader);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alter_table_add_column_mid_stream() {
    let db = TestDb::create("alter", support::CRM_SQL).await;
    let owner = db.owner().await;
    owner
        .batch_execute("INSERT INTO interaction (customer_id, buyer_id, interaction_type) SELECT g, g, 'view' FROM generate_series(1, 50) g")
        .await
        .unwrap();
    let reader = Reader::start(&db, &[]);
    db.wait_streaming(&reader).await;
    owner
        .batch_execute("INSERT INTO interaction (customer_id, buyer_id, interaction_type) VALUES (1, 1, 'click')")
        .await
        .unwrap();
    db.wait_caught_up(CATCH_UP, Some(&reader.log)).await;
    owner
        .batch_execute(
            "ALTER TABLE interaction ADD COLUMN channel text;
             INSERT INTO interaction (customer_id, buyer_id, interaction_type, channel) VALUES (2, 2, 'search', 'app');
             UPDATE interaction SET channel = 'email' WHERE id = 1;",
        )
        .await
        .unwrap();
    db.wait_caught_up(CATCH_UP, Some(&reader.log)).await;
    let events = assert_replay_equals_db(&db, &["interaction"]).await;
    // Partitions interleave in the replay: find events by content, not position.
    let values: Vec<&serde_json::Value> = events.iter().filter_map(|e| e.value.as_ref()).collect();
    let update = values
        .iter()
        .find(|v| v["op"] == "u" && v["after"]["id"] == 1)
        .unwrap();
    assert_eq!(
        update["after"]["channel"], "email",
        "the new column must appear in later events: {update}"
    );
    let before_alter = values
        .iter()
        .find(|v| v["op"] == "c" && v["after"]["interaction_type"] == "click")
        .unwrap();
    assert!(before_alter["after"].get("channel").is_none());
    drop(reader);
    db.cleanup().await;
}

const TOAST_SQL: &str = "
CREATE TABLE doc_full (id bigint PRIMARY KEY, title text NOT NULL, body text NOT NULL);
ALTER TABLE doc_full REPLICA IDENTITY FULL;
ALTER TABLE doc_full ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE TABLE doc_default (id bigint PRIMARY KEY, title text NOT NULL, body text NOT NULL);
ALTER TABLE doc_default ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE PUBLICATION instashop_cdc FOR TABLE doc_full, doc_default;
GRANT SELECT ON doc_full, doc_default TO cdc_reader;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_values_full_and_default_identity() {
    let db = TestDb::create("toast", TOAST_SQL).await;
    let owner = db.owner().await;
    let reader = Reader::start(&db, &[]);
    db.wait_streaming(&reader).await;
    owner
        .batch_execute(
            "INSERT INTO doc_full SELECT g, 't' || g, repeat(md5(g::text), 400) FROM generate_series(1, 5) g;
             INSERT INTO doc_default SELECT g, 't' || g, repeat(md5(g::text), 400) FROM generate_series(1, 5) g;",
        )
        .await
        .unwrap();
    owner
        .batch_execute(
            "UPDATE doc_full SET title = 'changed' WHERE id <= 3;
             UPDATE doc_default SET title = 'changed' WHERE id <= 3;",
        )
        .await
        .unwrap();
    db.wait_caught_up(CATCH_UP, Some(&reader.log)).await;
    let events = assert_replay_equals_db(&db, &["doc_full", "doc_default"]).await;
    let updates = |topic: &str| -> Vec<serde_json::Value> {
        events
            .iter()
            .filter(|e| e.topic.ends_with(topic))
            .filter_map(|e| e.value.clone())
            .filter(|v| v["op"] == "u")
            .collect()
    };
    let full = updates(".doc_full");
    assert_eq!(full.len(), 3);
    for u in &full {
        let body = u["after"]["body"].as_str().unwrap();
        assert_eq!(
            body.len(),
            32 * 400,
            "FULL identity: the body is filled from before"
        );
    }
    let default = updates(".doc_default");
    assert_eq!(default.len(), 3);
    for u in &default {
        assert_eq!(
            u["after"]["body"],
            support::UNAVAILABLE,
            "DEFAULT identity: never a silent null, Debezium's placeholder"
        );
    }
    drop(reader);
    db.cleanup().await;
}
