//! End to end: TRUNCATE under load, then inserts. The reader writes the
//! truncate to every partition of the table's topic, each copy in order with
//! that partition's events; the consumer, running all along, meets the
//! copies at different times than the other partitions' inserts made after
//! the truncate, and must retract only the rows older than the truncate.
//! Checked against the README's SQL on the captured database.
//!
//! Needs the local stack and the reader binary (`cargo build -p cdc-reader
//! --bin cdc-reader`; `CDC_READER_BIN` overrides its path).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::reader::{Scratch, connect, start_consumer, stop_and_compare};
use common::*;

/// One purchase with a detail, and a status change of an earlier one.
fn purchase(i: u64) -> String {
    format!(
        "WITH t AS (
             INSERT INTO transaction (external_id, customer_id, buyer_id, total_amount, payment_method, status)
             VALUES (gen_random_uuid(), 1, 1, {cents} / 100.0, 'paypal', 'completed') RETURNING id)
         INSERT INTO transactiondetail (transaction_id, product_id, quantity, unit_price)
             SELECT id, 1 + id % 6, 2, 1.50 FROM t;
         UPDATE transaction SET status = 'refunded'
             WHERE id = (SELECT max(id) - 2 FROM transaction);",
        cents = 75 * (i % 50 + 1)
    )
}

async fn wait_count(done: &AtomicU64, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.load(Ordering::Relaxed) < n {
        assert!(Instant::now() < deadline, "the load stalled before {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_then_insert_under_load_stays_exact() {
    const PURCHASES: u64 = 600;
    let s = stack();
    let (mut scratch, owner_url) = Scratch::create("truncate").await;
    let admin = connect(&scratch.admin_url).await;
    let topic_prefix = unique("mctest.truncate.");
    scratch.start_reader(&s.kafka, &topic_prefix);
    // Streaming once the real slot exists (the snapshot is in Kafka).
    let deadline = Instant::now() + Duration::from_secs(120);
    let slot = scratch.slot.clone();
    while scratch
        .slot_field(&admin, &slot, "confirmed_flush_lsn")
        .await
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "the reader never finished its snapshot:\n{}",
            scratch.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let consumer = start_consumer(&s, &scratch, &topic_prefix).await;

    let done = Arc::new(AtomicU64::new(0));
    let load_done = Arc::clone(&done);
    let load_url = owner_url.clone();
    let load = tokio::spawn(async move {
        let c = connect(&load_url).await;
        for i in 0..PURCHASES {
            c.batch_execute(&purchase(i)).await.unwrap();
            load_done.store(i + 1, Ordering::Relaxed);
        }
    });
    // Two truncates from another session while the purchases go on; the
    // details go with their purchases (CASCADE: one truncate of both tables).
    let owner = connect(&owner_url).await;
    for at in [PURCHASES / 3, 2 * PURCHASES / 3] {
        wait_count(&done, at).await;
        owner
            .batch_execute("TRUNCATE transaction CASCADE")
            .await
            .unwrap();
    }
    load.await.unwrap();
    let left: i64 = owner
        .query_one("SELECT count(*) FROM transaction", &[])
        .await
        .unwrap()
        .get(0);
    assert!(left > 0, "no purchase after the last truncate");

    scratch.wait_confirmed_now(&admin).await;
    stop_and_compare(
        &s,
        consumer,
        &owner,
        &format!("{left} purchases after the last truncate"),
    )
    .await;
}
