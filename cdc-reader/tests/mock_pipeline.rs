//! The whole pipeline in-process against librdkafka's mock cluster (real
//! Postgres, mock Kafka): snapshot, streaming, a primary-key change, replay
//! equals the database, graceful stop. Runs even while the local brokers are down.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod support;
use clap::Parser;
use rdkafka::mocking::MockCluster;
use std::time::Duration;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_against_mock_cluster_replays_exactly() {
    local_stack::envfile::load();
    let mock = MockCluster::new(1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let db = TestDb::create("mock", support::INSTASHOP_SQL).await;
    let owner = db.owner().await;
    owner.batch_execute(&shop_batch_sql(100)).await.unwrap();
    for t in SHOP_TABLES {
        mock.create_topic(&topic(&db, t), 3, 1).unwrap();
    }
    let cfg = cdc_reader::Config::try_parse_from([
        "x",
        "--source",
        &format!("{}={}", db.name, db.cdc_url),
        "--slot",
        &db.slot,
        "--metrics-addr",
        "127.0.0.1:0",
        "--kafka-bootstrap-servers",
        &bootstrap,
        "--status-interval-ms",
        "200",
    ])
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let h = tokio::spawn(cdc_reader::run(cfg, stop.clone()));
    // Streaming first, so the writes below arrive as change events.
    db.wait_slot_active(|| "the in-process reader (log on stderr)".to_owned())
        .await;
    for _ in 0..5 {
        owner.batch_execute(&shop_batch_sql(30)).await.unwrap();
    }
    owner.batch_execute("INSERT INTO customer (name, email, subscription_plan, country) VALUES ('solo', 'solo@example.com', 'free', 'FR'); UPDATE customer SET id = id + 1000000 WHERE name = 'solo'").await.unwrap();
    db.wait_caught_up(Duration::from_secs(60), None).await;
    println!("caught up");
    BOOTSTRAP_OVERRIDE.set(bootstrap.clone()).unwrap();
    let events = assert_replay_equals_db(&db, &SHOP_TABLES).await;
    println!("events {}", events.len());
    stop.cancel();
    h.await.unwrap().unwrap();
    db.cleanup().await;
}
