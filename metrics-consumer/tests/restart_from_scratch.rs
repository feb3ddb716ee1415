//! End to end through a reader restarted from scratch: the reader is
//! stopped, its slot dropped, and while no slot records anything rows are
//! deleted, updated and inserted; then the reader starts on a new slot and
//! takes a new snapshot onto the same topics, with the consumer running all
//! along. No delete event is ever sent for the rows deleted meanwhile; the
//! snapshot-complete marker each table's snapshot ends with must retract
//! them. Checked against the README's SQL run on the captured database.
//!
//! Needs the local stack and the reader binary (`cargo build -p cdc-reader
//! --bin cdc-reader`; `CDC_READER_BIN` overrides its path).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use common::reader::{Scratch, connect, start_consumer, stop_and_compare};
use common::*;

/// Changes made while the reader is down with its slot dropped.
const WHILE_DOWN: &str = "
DELETE FROM transactiondetail WHERE id IN (2, 4, 6, 30);
DELETE FROM transaction WHERE id IN (2, 4, 6, 30);
UPDATE transaction SET total_amount = total_amount + 7, status = 'completed' WHERE id IN (8, 12);
DELETE FROM product WHERE id = 6 AND NOT EXISTS (SELECT 1 FROM transactiondetail WHERE product_id = 6);
DELETE FROM buyer WHERE id = 5;
INSERT INTO transaction (external_id, customer_id, buyer_id, total_amount, payment_method, status, created_at)
    VALUES (gen_random_uuid(), 1, 1, 99.99, 'paypal', 'completed', now());
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_deleted_while_no_slot_existed_are_retracted_by_the_new_snapshot() {
    from_scratch("fromscratch", &[], "then a new snapshot").await;
}

/// The same through incremental snapshots (`--snapshot-mode
/// initial-incremental` on both starts): each table's last chunk ends with
/// the marker, at a position before every change its chunks could miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_deleted_while_no_slot_existed_are_retracted_by_a_new_incremental_snapshot() {
    from_scratch(
        "fromscratchincr",
        &[
            "--snapshot-mode",
            "initial-incremental",
            "--incremental-chunk-size",
            "7",
        ],
        "then a new incremental snapshot",
    )
    .await;
}

/// The scenario, with the reader started with `reader_args` both times.
async fn from_scratch(tag: &str, reader_args: &[&str], what: &str) {
    let incremental = reader_args.contains(&"initial-incremental");
    let s = stack();
    let (mut scratch, owner_url) = Scratch::create(tag).await;
    let admin = connect(&scratch.admin_url).await;
    let owner = connect(&owner_url).await;
    let topic_prefix = unique(&format!("mctest.{tag}."));
    scratch.start_reader_with(&s.kafka, &topic_prefix, reader_args);
    if incremental {
        scratch.wait_incremental_done(&owner).await;
    }
    scratch.wait_confirmed_now(&admin).await;
    let consumer = start_consumer(&s, &scratch, &topic_prefix).await;
    owner
        .batch_execute("UPDATE transaction SET total_amount = total_amount + 1 WHERE id <= 10")
        .await
        .unwrap();
    scratch.wait_confirmed_now(&admin).await;

    scratch.kill_reader_and_drop_slots(&admin).await;
    owner.batch_execute(WHILE_DOWN).await.unwrap();
    scratch.start_reader_with(&s.kafka, &topic_prefix, reader_args);
    if incremental {
        scratch.wait_incremental_done(&owner).await;
    }
    scratch.wait_confirmed_now(&admin).await;
    // Streamed after the new snapshot: later traffic goes on as usual.
    owner
        .batch_execute(
            "UPDATE transaction SET total_amount = total_amount + 2 WHERE id IN (1, 8);
             DELETE FROM transactiondetail WHERE id = 10; DELETE FROM transaction WHERE id = 10;",
        )
        .await
        .unwrap();
    scratch.wait_confirmed_now(&admin).await;

    stop_and_compare(
        &s,
        consumer,
        &owner,
        &format!("rows deleted while the reader had no slot, {what}"),
    )
    .await;
}
