//! Real brokers lost under load, on a scratch three-node Apache Kafka
//! cluster of the test's own (`support::scratch_kafka`, the settings of
//! `scripts/up`):
//!
//! 1. kill -9 of the node that leads a busy partition, down for 20 s, then
//!    back: leadership moves, `acks=all` is met by the two in-sync replicas
//!    left, and the reader keeps confirming while the node is down;
//! 2. two of three nodes down: the KRaft quorum is lost with them (each node
//!    is also a controller) and no partition has two in-sync replicas, so
//!    producing stalls (the slot's confirmed position stands still while the
//!    load commits) without an error, and resumes when one node returns.
//!    (Seen to fail: with every topic placed on the surviving node alone and
//!    `min.insync.replicas=1`, the slot confirmed positions during the
//!    outage and the stall assertion fired.)
//!
//! Afterwards every topic replays to its table, and no event was written
//! twice (the idempotent producer retried within `message.timeout.ms`).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

#[path = "support/scratch_kafka.rs"]
mod scratch_kafka;
mod support;

use std::time::{Duration, Instant};

use scratch_kafka::ScratchKafka;
use support::{
    Reader, SHOP_TABLES, ShopLoad, TestDb, check_duplicates, replay_equals_db, shop_batch_sql, tail,
};

/// How long the killed leader stays down.
const LEADER_DOWN: Duration = Duration::from_secs(20);
/// How long the stall is watched with two nodes down.
const STALL_WATCH: Duration = Duration::from_secs(12);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_loss_under_load_stalls_or_fails_over_and_loses_nothing() {
    let mut kafka = tokio::task::spawn_blocking(|| ScratchKafka::start("loss"))
        .await
        .unwrap();
    let bootstrap = kafka.bootstrap();
    support::BOOTSTRAP_OVERRIDE.set(bootstrap.clone()).unwrap();
    let db = TestDb::create("brokerloss", support::INSTASHOP_SQL).await;
    db.owner()
        .await
        .batch_execute(&shop_batch_sql(100))
        .await
        .unwrap();
    let mut reader = Reader::start(&db, &["--kafka-bootstrap-servers", &bootstrap]);
    db.wait_streaming(&reader).await;

    let load = ShopLoad::start(&db, 20);
    load.wait_batches(5, &reader).await;
    db.wait_caught_up(Duration::from_secs(60), Some(&reader.log))
        .await;

    // 1. The leader of a busy partition dies for 20 s.
    let topic = support::topic(&db, "transaction");
    let leader = kafka.leader(&topic, 0);
    kafka.kill9(leader);
    let killed = Instant::now();
    println!("killed node {leader}, the leader of {topic}[0]");
    load.wait_batches(5, &reader).await;
    // Everything committed after the kill reaches Kafka with the node down.
    db.wait_caught_up(Duration::from_secs(60), Some(&reader.log))
        .await;
    println!(
        "confirmed past the kill {:.1} s after it",
        killed.elapsed().as_secs_f64()
    );
    while killed.elapsed() < LEADER_DOWN {
        assert_alive(&mut reader);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    kafka.start_node(leader);
    tokio::task::block_in_place(|| kafka.wait_brokers(3, Duration::from_secs(120)));
    load.wait_batches(5, &reader).await;

    // 2. Two nodes down: acks=all cannot be met anywhere.
    let (a, b) = (leader, leader % 3 + 1);
    kafka.kill9(a);
    kafka.kill9(b);
    println!("killed nodes {a} and {b}");
    // Acknowledgements already on their way may still land: the stall
    // starts once the confirmed position stood still for a second.
    let stalled_at = settled_position(&db).await;
    let batches_before = load.committed();
    let watch = Instant::now();
    while watch.elapsed() < STALL_WATCH {
        assert_alive(&mut reader);
        assert_eq!(
            db.confirmed_flush().await,
            stalled_at,
            "the slot confirmed a position with two of three brokers down"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        load.committed() > batches_before,
        "the load committed nothing while two brokers were down: the stall proves nothing"
    );
    let behind = db.current_lsn().await;
    kafka.start_node(a);
    let resumed = Instant::now();
    db.wait_confirmed(behind, Duration::from_secs(120), Some(&reader.log))
        .await;
    println!(
        "producing resumed {:.1} s after one node returned",
        resumed.elapsed().as_secs_f64()
    );
    kafka.start_node(b);
    tokio::task::block_in_place(|| kafka.wait_brokers(3, Duration::from_secs(120)));

    let batches = load.committed();
    load.finish().await;
    db.wait_caught_up(Duration::from_secs(120), Some(&reader.log))
        .await;
    assert_alive(&mut reader);
    let events = replay_equals_db(&db, &SHOP_TABLES, true).await;
    let dups = check_duplicates(&events);
    println!(
        "{batches} batches, {} events, {dups} duplicates",
        events.len()
    );
    assert_eq!(dups, 0, "events written twice");
    assert!(
        reader.stop(),
        "reader did not exit 0 on SIGTERM:\n{}",
        tail(&reader.log_text(), 20)
    );
    db.cleanup().await;
}

fn assert_alive(reader: &mut Reader) {
    assert!(
        reader.child.try_wait().unwrap().is_none(),
        "the reader exited:\n{}",
        tail(&reader.log_text(), 30)
    );
}

/// The slot's confirmed position once it has not moved for a second
/// (polled every 100 ms, for up to 30 s).
async fn settled_position(db: &TestDb) -> Option<cdc_reader::change::Lsn> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = db.confirmed_flush().await;
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_secs(1) {
        assert!(
            Instant::now() < deadline,
            "the confirmed position kept moving for 30 s with two of three brokers down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = db.confirmed_flush().await;
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    last
}
