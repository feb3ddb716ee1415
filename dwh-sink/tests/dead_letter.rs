//! Bad input: a message that is not an envelope, one whose shop column
//! cannot be read and one whose row image jsonb cannot store (`\u0000`) go
//! to the dead-letter topic with the reason in a header; the good events
//! around them are stored, the tombstone is skipped, and the stored offset
//! covers all five messages.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Dwh, Sink};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureRecord;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_go_to_the_dead_letter_topic_and_the_rest_is_stored() {
    let kafka = common::var("KAFKA_BOOTSTRAP_SERVERS");
    let dwh = Dwh::create("dlq").await;
    let topic = common::unique("dwh_dlq_test_");
    let producer = common::hand_made_topic(&topic, 1).await;
    let product = r#"{"before":null,"after":{"id":1,"customer_id":1,"name":"Lamp","category":"home","price":"9.99"},"source":{"db":"instashop","table":"product","ts_ms":1795360039853,"lsn":100,"commit_lsn":120},"op":"c"}"#;
    let bad_line = r#"{"before":null,"after":{"id":2,"transaction_id":1,"product_id":1,"quantity":"lots","unit_price":"9.99"},"source":{"db":"instashop","table":"transactiondetail","ts_ms":1795360039853,"lsn":110,"commit_lsn":120},"op":"c"}"#;
    let nul_stock = r#"{"before":null,"after":{"id":3,"product_id":1,"warehouse":"A\u0000B","quantity":5},"source":{"db":"erp","table":"stock","ts_ms":1795360039853,"lsn":115,"commit_lsn":120},"op":"c"}"#;
    for (key, value) in [
        (r#"{"id":1}"#, Some(product)),
        (r#"{"id":9}"#, Some("not json at all")),
        (r#"{"id":2}"#, Some(bad_line)),
        (r#"{"id":3}"#, Some(nul_stock)),
        (r#"{"id":1}"#, None),
    ] {
        let mut record: FutureRecord<'_, str, str> = FutureRecord::to(&topic).key(key);
        if let Some(v) = value {
            record = record.payload(v);
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    let log = std::env::temp_dir().join(format!("{}.sink.log", dwh.db));
    let topics = vec![topic.clone()];
    let mut sink = Sink::start(&dwh, &topics, "instashop", &log);
    dwh.wait_caught_up(&topics, &mut sink).await;
    assert!(sink.terminate().success(), "{}", sink.log_tail());

    assert_eq!(dwh.count("SELECT count(*) FROM change_event").await, 1);
    assert_eq!(
        dwh.count("SELECT count(*) FROM dim_product WHERE is_current AND price_cents = 999")
            .await,
        1
    );
    assert_eq!(
        dwh.count("SELECT next_offset FROM sink_offset").await,
        5,
        "the offset covers the bad messages and the tombstone"
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("bad message: counted, sent to the dead-letter topic"),
        "{log_text}"
    );

    let dlq = format!("{}.dlq", dwh.db);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka)
        .set("group.id", &dlq)
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&dlq]).unwrap();
    let mut errors = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while errors.len() < 3 && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
            let headers = m.headers().unwrap();
            let error = headers
                .iter()
                .find(|h| h.key == "dwh.error")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap();
            errors.push(error);
        }
    }
    errors.sort();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(errors[0].contains("`after`"), "{errors:?}");
    assert!(errors[0].contains("jsonb cannot store"), "{errors:?}");
    assert!(errors[1].contains("`quantity`"), "{errors:?}");
    assert!(
        errors[2].contains("not a Debezium JSON envelope"),
        "{errors:?}"
    );
    common::delete_topics(&[&topic, &dlq]).await;
}
