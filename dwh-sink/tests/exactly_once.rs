//! Exactly once through kill -9: a SQL workload runs on a scratch source
//! through the real reader while the sink is killed -9 at random moments
//! (mid-batch among them) and the reader twice (its re-sends reach the
//! topics twice). At rest `dwh-sink verify` finds no difference and no
//! change is stored twice; then a replay of every topic from offset 0
//! changes nothing in the warehouse.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Dwh, Sink, Source};
use rand::RngExt as _;

/// Rows of every warehouse table, and a digest of their content.
async fn fingerprint(dwh: &Dwh) -> Vec<(String, i64, String)> {
    let client = dwh.client().await;
    let mut out = Vec::new();
    for (table, order) in [
        ("change_event", "source_table, row_key, lsn, op"),
        (
            "dim_customer",
            "customer_id, valid_from_commit_lsn, valid_from_lsn",
        ),
        (
            "dim_buyer",
            "buyer_id, valid_from_commit_lsn, valid_from_lsn",
        ),
        (
            "dim_product",
            "product_id, valid_from_commit_lsn, valid_from_lsn",
        ),
        ("fact_purchase", "purchase_id"),
        ("fact_sale_line", "line_id"),
    ] {
        // Surrogate keys and load times differ between runs by design;
        // everything else must be identical.
        let columns = match table {
            "change_event" => {
                "source_table, row_key, op, commit_time, lsn, commit_lsn, before, after"
            }
            "dim_product" => {
                "product_id, valid_from_commit_lsn, valid_from_lsn, price_cents, category, valid_from, valid_to, is_current, is_deleted"
            }
            "dim_customer" => {
                "customer_id, valid_from_commit_lsn, valid_from_lsn, name, valid_from, valid_to, is_current"
            }
            "dim_buyer" => {
                "buyer_id, valid_from_commit_lsn, valid_from_lsn, name, valid_from, valid_to, is_current"
            }
            "fact_purchase" => "purchase_id, status, total_cents, last_lsn",
            _ => "line_id, quantity, unit_price_cents, status, sold_lsn, last_lsn",
        };
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(md5(string_agg(x::text, ',' ORDER BY {order})), '')
                     FROM (SELECT {columns} FROM {table}) x"
                ),
                &[],
            )
            .await
            .unwrap();
        out.push((table.to_owned(), row.get(0), row.get(1)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_sink_and_reader_and_a_replay_from_zero_change_nothing() {
    let mut source = Source::create("eo").await;
    let dwh = Dwh::create("eo").await;
    let db = common::connect(&source.url).await;
    db.batch_execute(
        "INSERT INTO customer (name, email, subscription_plan, country)
             SELECT 'c' || g, 'c@x', 'free', 'NL' FROM generate_series(1, 5) g;
         INSERT INTO buyer (customer_id, name, email) SELECT 1 + g % 5, 'b' || g, 'b@x' FROM generate_series(1, 10) g;
         INSERT INTO product (customer_id, name, category, price)
             SELECT 1 + g % 5, 'p' || g, (ARRAY['toys', 'books', 'garden'])[1 + g % 3], 1.00 + g FROM generate_series(1, 20) g;",
    )
    .await
    .unwrap();
    source.start_reader();
    source.wait_confirmed_now().await;
    let topics = source.topics();
    let log = std::env::temp_dir().join(format!("{}.sink.log", dwh.db));
    let mut sink = Sink::start(&dwh, &topics, &source.db, &log);

    // The workload: purchases with lines at the current price, price and
    // category changes, status changes, deletes of lines and purchases,
    // customer renames; a transaction every few milliseconds.
    let load = {
        let url = source.url.clone();
        tokio::spawn(async move {
            let db = common::connect(&url).await;
            let until = Instant::now() + Duration::from_secs(25);
            let mut rounds = 0u32;
            while Instant::now() < until {
                rounds += 1;
                db.batch_execute(
                    "BEGIN;
                     WITH t AS (INSERT INTO transaction (external_id, customer_id, buyer_id, total_amount, payment_method, status)
                                VALUES (gen_random_uuid(), 1 + (random() * 4)::int, 1 + (random() * 9)::int, 5.00, 'paypal', 'pending') RETURNING id)
                     INSERT INTO transactiondetail (transaction_id, product_id, quantity, unit_price)
                         SELECT t.id, p.id, 1 + (random() * 3)::int, p.price
                         FROM t, (SELECT id, price FROM product ORDER BY random() LIMIT 2) p;
                     UPDATE product SET price = price + 0.25 WHERE id = 1 + (random() * 19)::int;
                     UPDATE transaction SET status = (ARRAY['completed', 'failed', 'refunded'])[1 + (random() * 2)::int]::transaction_status
                         WHERE id = (SELECT max(id) - 2 FROM transaction);
                     COMMIT;",
                )
                .await
                .unwrap();
                if rounds.is_multiple_of(7) {
                    db.batch_execute(
                        "DELETE FROM transactiondetail WHERE id = (SELECT min(id) FROM transactiondetail);
                         UPDATE product SET category = 'misc' WHERE id = 1 + (random() * 19)::int;
                         UPDATE customer SET name = name || '.' WHERE id = 1 + (random() * 4)::int;",
                    )
                    .await
                    .unwrap();
                }
                if rounds.is_multiple_of(23) {
                    db.batch_execute(
                        "DELETE FROM transaction WHERE id = (SELECT min(id) FROM transaction WHERE status = 'failed')",
                    )
                    .await
                    .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            rounds
        })
    };

    let mut rng = rand::rng();
    let mut sink_kills = 0;
    let mut reader_kills = 0;
    let started = Instant::now();
    while !load.is_finished() {
        tokio::time::sleep(Duration::from_millis(rng.random_range(800..2500))).await;
        if let Some(status) = sink.exited() {
            panic!(
                "dwh-sink exited on its own ({status}):\n{}",
                sink.log_tail()
            );
        }
        sink.kill();
        sink_kills += 1;
        sink = Sink::start(&dwh, &topics, &source.db, &log);
        if reader_kills < 2 && started.elapsed() > Duration::from_secs(6 + 8 * reader_kills) {
            source.kill_reader();
            source.start_reader();
            reader_kills += 1;
        }
    }
    let rounds = load.await.unwrap();
    assert!(sink_kills >= 8, "only {sink_kills} kills in the load");
    source.wait_confirmed_now().await;
    dwh.wait_caught_up(&topics, &mut sink).await;
    assert!(sink.terminate().success(), "{}", sink.log_tail());

    let (ok, out) = common::verify(&dwh, &source);
    assert!(
        ok,
        "verify after {rounds} rounds, {sink_kills} sink kills, {reader_kills} reader kills:\n{out}"
    );
    let before = fingerprint(&dwh).await;
    assert!(before[0].1 > i64::from(rounds) * 3, "{before:?}");

    // Replay every topic from offset 0: nothing may change.
    dwh.client()
        .await
        .batch_execute("DELETE FROM sink_offset")
        .await
        .unwrap();
    let mut sink = Sink::start(&dwh, &topics, &source.db, &log);
    dwh.wait_caught_up(&topics, &mut sink).await;
    assert!(sink.terminate().success(), "{}", sink.log_tail());
    assert_eq!(
        fingerprint(&dwh).await,
        before,
        "the replay changed the warehouse"
    );
    let (ok, out) = common::verify(&dwh, &source);
    assert!(ok, "verify after the replay:\n{out}");
}
