//! End to end across the reader's snapshot point: transactions that update
//! and delete existing rows are held open while a fresh reader creates its
//! slot, begin after the snapshot builder saw every older transaction, and
//! commit after the slot's consistent point C. The reader streams them in
//! full, with changes whose LSN is below the snapshot rows' C; the consumer
//! must still apply them (it orders by `source.commit_lsn`, then
//! `source.lsn`). Then the reader starts from scratch (new slot, new
//! snapshot) on the same topics, again with transactions held across its
//! snapshot point. Checked against the README's SQL run on the captured
//! database itself.
//!
//! Needs the local stack and the reader binary (`cargo build -p cdc-reader
//! --bin cdc-reader`; `CDC_READER_BIN` overrides its path).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::time::{Duration, Instant};

use common::reader::{Scratch, connect, start_consumer, stop_and_compare};
use common::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_postgres::Client;

/// The held transactions: each updates or deletes rows the snapshot copies.
const HELD: [&str; 5] = [
    "UPDATE transaction SET total_amount = total_amount + 1 WHERE id = 1",
    "UPDATE transaction SET total_amount = total_amount + 1 WHERE id = 2; UPDATE transaction SET status = 'refunded' WHERE id = 3",
    "DELETE FROM transaction WHERE id = 5",
    "UPDATE product SET category = 'food' WHERE id = 2; UPDATE transactiondetail SET quantity = quantity + 2 WHERE id = 7",
    "UPDATE transaction SET status = 'completed' WHERE id = 4; DELETE FROM transactiondetail WHERE id = 9",
];

/// Held across the second (re-)snapshot.
const HELD_AGAIN: [&str; 4] = [
    "UPDATE transaction SET total_amount = total_amount + 3 WHERE id = 10",
    "UPDATE transaction SET status = 'refunded' WHERE id = 11; DELETE FROM transaction WHERE id = 12",
    "UPDATE product SET category = 'garden' WHERE id = 3",
    "UPDATE transactiondetail SET quantity = quantity + 1 WHERE id = 13; UPDATE transaction SET total_amount = total_amount + 5 WHERE id = 1",
];

/// A transaction holding an xid, left open.
async fn open_xact(url: &str) -> (Client, i64) {
    let c = connect(url).await;
    c.batch_execute("BEGIN").await.unwrap();
    let xid: i64 = c
        .query_one("SELECT pg_current_xact_id()::text::bigint", &[])
        .await
        .unwrap()
        .get(0);
    (c, xid)
}

/// Waits until every transaction older than `xid` has ended (the oldest
/// running xid is `xid` or later), then has a checkpoint log the running
/// transactions, which is what moves the slot's snapshot builder on.
async fn older_ended_then_checkpoint(admin: &Client, xid: i64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let xmin: i64 = admin
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if xmin >= xid {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: a transaction older than {xid} kept running for 60 s (oldest {xmin})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin.batch_execute("CHECKPOINT").await.unwrap();
}

/// Every event of `topic` (all partitions) as JSON values (tombstones skipped).
fn read_topic(kafka: &str, topic: &str, partitions: i32) -> Vec<serde_json::Value> {
    let highs = high_watermarks(kafka, &[topic.to_owned()], partitions);
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("group.id", unique("mctest-boundary-read-"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let total: i64 = highs.values().sum();
    let mut seen = 0;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen < total {
        assert!(Instant::now() < deadline, "reading {topic} timed out");
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            seen += 1;
            if let Some(v) = m.payload() {
                out.push(serde_json::from_slice(v).unwrap());
            }
        }
    }
    out
}

/// Starts the reader on a new slot and holds `held` open across its
/// snapshot point: each begins after the slot's snapshot builder saw every
/// older transaction and commits after the consistent point. The slot's
/// snapshot builder logs the running transactions (R0) when the slot is
/// created; it becomes consistent only after every transaction running at
/// R0, and then every one running when those had ended (R1), has ended. A
/// transaction that begins after R1 and commits after the consistent point
/// is streamed in full.
async fn reader_across(
    s: &Stack,
    scratch: &mut Scratch,
    admin: &Client,
    owner_url: &str,
    topic_prefix: &str,
    held: &[&str],
) {
    let (t0, _) = open_xact(owner_url).await;
    scratch.start_reader(&s.kafka, topic_prefix);
    // The reader snapshots from a pending slot `<slot>_snapshot`.
    let pending = format!("{}_snapshot", scratch.slot);
    let deadline = Instant::now() + Duration::from_secs(60);
    while scratch
        .slot_field(admin, &pending, "restart_lsn")
        .await
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "the reader never created its slot:\n{}",
            scratch.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (t1, t1_xid) = open_xact(owner_url).await;
    t0.batch_execute("COMMIT").await.unwrap();
    older_ended_then_checkpoint(admin, t1_xid, "first phase").await;
    let mut open = Vec::new();
    for sql in held {
        let (c, xid) = open_xact(owner_url).await;
        c.batch_execute(sql).await.unwrap();
        open.push((c, xid));
    }
    t1.batch_execute("COMMIT").await.unwrap();
    let first_held = open.iter().map(|(_, x)| *x).min().unwrap();
    older_ended_then_checkpoint(admin, first_held, "second phase").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while scratch
        .slot_field(admin, &pending, "confirmed_flush_lsn")
        .await
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "the slot never became consistent with the held transactions open:\n{}",
            scratch.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        admin.batch_execute("CHECKPOINT").await.unwrap();
    }
    for (c, _) in &open {
        c.batch_execute("COMMIT").await.unwrap();
    }
}

/// Per snapshot point C (the `source.lsn` of snapshot rows), the streamed
/// changes with `lsn < C <= commit_lsn`: those of transactions that crossed it.
fn crossed(events: &[serde_json::Value]) -> Vec<(u64, usize)> {
    let points: std::collections::BTreeSet<u64> = events
        .iter()
        .filter(|e| e["op"] == "r")
        .filter_map(|e| e["source"]["lsn"].as_u64())
        .collect();
    points
        .into_iter()
        .map(|c| {
            let n = events
                .iter()
                .filter(|e| e["op"] != "r")
                .filter(|e| {
                    let (lsn, commit) = (
                        e["source"]["lsn"].as_u64(),
                        e["source"]["commit_lsn"].as_u64(),
                    );
                    lsn.is_some_and(|l| l < c) && commit.is_none_or(|k| k >= c)
                })
                .count();
            (c, n)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_open_across_the_snapshot_point_are_applied() {
    let s = stack();
    let (mut scratch, owner_url) = Scratch::create("boundary").await;
    let admin = connect(&scratch.admin_url).await;
    let owner = connect(&owner_url).await;
    let topic_prefix = unique("mctest.boundary.");
    reader_across(&s, &mut scratch, &admin, &owner_url, &topic_prefix, &HELD).await;
    // Later traffic on the same rows, as a live shop would have.
    owner
        .batch_execute(
            "UPDATE transaction SET total_amount = total_amount + 2 WHERE id IN (1, 6);
             UPDATE transaction SET status = 'refunded' WHERE id = 7;",
        )
        .await
        .unwrap();
    scratch.wait_confirmed_now(&admin).await;

    // The re-snapshot path: the reader starts from scratch (a new slot and
    // a new snapshot) on the same topics, again with transactions held
    // across its snapshot point.
    scratch.kill_reader_and_drop_slots(&admin).await;
    reader_across(
        &s,
        &mut scratch,
        &admin,
        &owner_url,
        &topic_prefix,
        &HELD_AGAIN,
    )
    .await;
    scratch.wait_confirmed_now(&admin).await;

    // The scenario happened: each snapshot point was crossed.
    let tx_topic = format!("{topic_prefix}.public.transaction");
    let crossed = crossed(&read_topic(&s.kafka, &tx_topic, 3));
    assert!(
        crossed.len() == 2 && crossed.iter().all(|(_, n)| *n > 0),
        "held transactions did not cross both snapshot points (point, changes): {crossed:?}"
    );

    let consumer = start_consumer(&s, &scratch, &topic_prefix).await;
    stop_and_compare(
        &s,
        consumer,
        &owner,
        &format!("changes across the snapshot points (point, changes): {crossed:?}"),
    )
    .await;
}
