//! Keys that survive schema changes: with REPLICA IDENTITY FULL pgoutput
//! marks every column as key, so the reader takes the primary key from the
//! catalog. When the table was altered and dropped by the time its last
//! events are decoded, the key it last knew still keys them; when it never
//! knew one, the reader stops with one clear line instead of sending
//! unkeyed events to random partitions.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{Reader, TestDb, consume_all, tail, topic};

const SCHEMA: &str = "
CREATE TABLE item (id int PRIMARY KEY, v int NOT NULL);
ALTER TABLE item REPLICA IDENTITY FULL;
CREATE PUBLICATION instashop_cdc FOR TABLE item;
GRANT SELECT ON item TO cdc_reader;
";

const CATCH_UP: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_known_key_keys_events_of_an_altered_then_dropped_table() {
    let db = TestDb::create("keydrop", SCHEMA).await;
    let mut reader = Reader::start(&db, &[]);
    db.wait_streaming(&reader).await;
    let owner = db.owner().await;
    owner
        .batch_execute("INSERT INTO item VALUES (1, 1), (2, 2), (3, 3)")
        .await
        .unwrap();
    db.wait_caught_up(CATCH_UP, Some(&reader.log)).await;
    // Decoded after the commit, when the table is gone from the catalog; the
    // ALTER makes the server send a new Relation message first.
    owner
        .batch_execute(
            "BEGIN;
             ALTER TABLE item ADD COLUMN extra int;
             UPDATE item SET extra = 7 WHERE id = 1;
             DELETE FROM item WHERE id = 2;
             DROP TABLE item;
             COMMIT;",
        )
        .await
        .unwrap();
    db.wait_caught_up(CATCH_UP, Some(&reader.log)).await;

    let events = consume_all(&[topic(&db, "item")]);
    let ops: Vec<(String, Option<String>)> = events
        .iter()
        .map(|e| {
            (
                e.key.clone(),
                e.value
                    .as_ref()
                    .map(|v| v["op"].as_str().unwrap().to_owned()),
            )
        })
        .collect();
    let expected: Vec<(String, Option<String>)> = [
        (r#"{"id":1}"#, Some("c")),
        (r#"{"id":2}"#, Some("c")),
        (r#"{"id":3}"#, Some("c")),
        (r#"{"id":1}"#, Some("u")),
        (r#"{"id":2}"#, Some("d")),
        (r#"{"id":2}"#, None),
    ]
    .into_iter()
    .map(|(k, op)| (k.to_owned(), op.map(str::to_owned)))
    .collect();
    let mut sorted = ops.clone();
    let mut want = expected.clone();
    // Consumed across partitions: compare as multisets, per key in order.
    sorted.sort();
    want.sort();
    assert_eq!(
        sorted,
        want,
        "events and keys: {ops:?}\n{}",
        tail(&reader.log_text(), 20)
    );
    assert!(reader.stop());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_table_whose_key_was_never_seen_stops_with_one_line() {
    let db = TestDb::create("keynever", SCHEMA).await;
    let mut reader = Reader::start(&db, &[]);
    db.wait_streaming(&reader).await;
    assert!(reader.stop());
    // Written, published and dropped while no reader runs.
    db.owner()
        .await
        .batch_execute(
            "CREATE TABLE gone (id int PRIMARY KEY, v int NOT NULL);
             ALTER TABLE gone REPLICA IDENTITY FULL;
             ALTER PUBLICATION instashop_cdc ADD TABLE gone;
             INSERT INTO gone VALUES (1, 1);
             DROP TABLE gone;",
        )
        .await
        .unwrap();
    let mut reader = Reader::start(&db, &[]);
    let (ok, log) = reader.wait_exit(Duration::from_secs(60));
    assert!(!ok, "non-zero exit");
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{}", tail(&log, 30));
    for needle in ["public.gone", "dropped", "primary key", &db.slot] {
        assert!(
            errors[0].contains(needle),
            "{:?} lacks {needle:?}",
            errors[0]
        );
    }
    assert_eq!(
        support::message_count(&topic(&db, "gone")),
        0,
        "no unkeyed event was sent"
    );
    db.cleanup().await;
}
