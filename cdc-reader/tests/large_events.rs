//! Large rows: an event of a few MB goes through; one larger than Kafka
//! accepts ends the reader with one line naming the table, the key, the size
//! and the setting to raise, instead of reconnecting forever behind it.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{Reader, TestDb, consume_all, tail, topic};

const SCHEMA: &str = "
CREATE TABLE doc (id int PRIMARY KEY, body text NOT NULL);
ALTER TABLE doc REPLICA IDENTITY FULL;
CREATE PUBLICATION instashop_cdc FOR TABLE doc;
GRANT SELECT ON doc TO cdc_reader;
";

/// A text of about `mb` MB that does not compress (md5 chains).
fn insert_sql(id: i32, mb: usize) -> String {
    let chunks = mb * 1024 * 1024 / 32;
    format!(
        "INSERT INTO doc SELECT {id}, string_agg(md5(g::text || '-{id}'), '') FROM generate_series(1, {chunks}) g"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3_mb_event_goes_through_and_a_20_mb_one_ends_the_reader_clearly() {
    let db = TestDb::create("large", SCHEMA).await;
    let mut reader = Reader::start(&db, &[]);
    db.wait_streaming(&reader).await;
    let owner = db.owner().await;
    owner.batch_execute(&insert_sql(1, 3)).await.unwrap();
    db.wait_caught_up(Duration::from_secs(60), Some(&reader.log))
        .await;
    let events = consume_all(&[topic(&db, "doc")]);
    assert_eq!(events.len(), 1);
    let body = events[0].value.as_ref().unwrap()["after"]["body"]
        .as_str()
        .unwrap()
        .len();
    assert_eq!(body, 3 * 1024 * 1024);

    owner.batch_execute(&insert_sql(2, 20)).await.unwrap();
    let (ok, log) = reader.wait_exit(Duration::from_secs(120));
    assert!(!ok, "non-zero exit");
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{}", tail(&log, 30));
    for needle in [
        topic(&db, "doc").as_str(),
        r#"{"id":2}"#,
        "bytes",
        "message.max.bytes",
    ] {
        assert!(
            errors[0].contains(needle),
            "{:?} lacks {needle:?}",
            errors[0]
        );
    }
    assert!(
        !log.contains("reconnecting"),
        "a too-large event is not retried:\n{}",
        tail(&log, 30)
    );
    db.cleanup().await;
}
