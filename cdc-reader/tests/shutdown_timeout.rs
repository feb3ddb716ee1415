//! Shutdown respects `--shutdown-timeout-secs`: with Kafka unreachable and
//! events in flight (they would wait `message.timeout.ms`, 300 s), SIGTERM
//! ends the reader after about the configured timeout (the whole drain, not
//! each step of it), not a fixed 30 s.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use support::{Reader, TestDb, http_get, tail, topic};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_kafka_down_stops_within_the_shutdown_timeout() {
    let mock = MockCluster::new(1).unwrap();
    let db = TestDb::create(
        "shutdown",
        "CREATE TABLE item (id int PRIMARY KEY);
         CREATE PUBLICATION instashop_cdc FOR TABLE item;
         GRANT SELECT ON item TO cdc_reader;",
    )
    .await;
    let item = topic(&db, "item");
    mock.create_topic(&item, 1, 1).unwrap();
    let mut reader = Reader::start(
        &db,
        &[
            "--kafka-bootstrap-servers",
            &mock.bootstrap_servers(),
            "--shutdown-timeout-secs",
            "5",
        ],
    );
    db.wait_streaming(&reader).await;
    let owner = db.owner().await;
    // One event delivered first: the reader knows the topic exists.
    owner
        .batch_execute("INSERT INTO item VALUES (0)")
        .await
        .unwrap();
    db.wait_caught_up(Duration::from_secs(60), Some(&reader.log))
        .await;
    mock.broker_down(1).unwrap();
    owner
        .batch_execute("INSERT INTO item SELECT generate_series(1, 100)")
        .await
        .unwrap();
    // The events were handed to the producer (and cannot be delivered).
    let handed = format!("cdc_events_total{{topic=\"{item}\",op=\"c\"}} 101");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http_get(&reader, "/metrics").contains(&handed) {
        assert!(
            Instant::now() < deadline,
            "the reader never handed the events to kafka:\n{}",
            tail(&reader.log_text(), 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopping = Instant::now();
    let exited_ok = tokio::task::block_in_place(|| reader.stop());
    let took = stopping.elapsed();
    assert!(exited_ok, "clean exit:\n{}", tail(&reader.log_text(), 20));
    // The timeout bounds the whole drain, not each of its steps.
    assert!(
        took < Duration::from_secs(9),
        "shutdown took {took:?} with --shutdown-timeout-secs 5:\n{}",
        tail(&reader.log_text(), 20)
    );
    db.cleanup().await;
}
