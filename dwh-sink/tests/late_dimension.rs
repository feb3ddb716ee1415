//! A late-arriving dimension: a sale whose buyer has no version valid when
//! it was sold, because the buyer's first event in the topics is later
//! (seen in chaos: a snapshot attempt killed after two of a topic's three
//! partitions were written, so a buyer's only record came with the next
//! attempt's snapshot, after the sales that the first attempt had sent).
//! The sale joins the buyer's first version, whichever of the two arrives
//! first; once an older version arrives, the sale moves to it.
//!
//! Hand-made events on one topic, so the arrival order is exact. Needs the
//! local stack.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Dwh, Sink};
use rdkafka::producer::FutureRecord;

fn event(table: &str, after: &str, op: &str, commit_lsn: i64, lsn: i64) -> String {
    format!(
        r#"{{"before":null,"after":{after},"source":{{"db":"instashop","table":"{table}","ts_ms":1795360039853,"lsn":{lsn},"commit_lsn":{commit_lsn},"snapshot":"{}"}},"op":"{op}"}}"#,
        op == "r"
    )
}

fn buyer(name: &str) -> String {
    format!(r#"{{"id":7,"customer_id":1,"name":"{name}","email":"b@x"}}"#)
}

/// (buyer 7's version key the sale joins, that version's name).
async fn sale_buyer(dwh: &Dwh) -> Option<(i64, String)> {
    dwh.client()
        .await
        .query_opt(
            "SELECT b.buyer_key, b.name FROM fact_sale_line f JOIN dim_buyer b ON b.buyer_key = f.buyer_key
             WHERE f.line_id = 20 AND b.buyer_id = 7",
            &[],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_older_than_every_version_of_its_buyer_joins_the_first() {
    let dwh = Dwh::create("latedim").await;
    let topic = common::unique("dwh_late_dim_");
    let producer = common::hand_made_topic(&topic, 1).await;
    let send = |key: String, value: String| {
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&value),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    };
    let key = |id: i64| format!(r#"{{"id":{id}}}"#);
    // The first snapshot attempt's rows at (1000, 1001): the shop, its
    // product, a purchase by buyer 7 and its line; buyer 7 is not among them.
    for (table, id, after) in [
        (
            "customer",
            1,
            r#"{"id":1,"name":"shop","email":"s@x","subscription_plan":"free","country":"NL","is_active":true}"#.to_owned(),
        ),
        (
            "product",
            5,
            r#"{"id":5,"customer_id":1,"name":"p5","category":"home","price":"9.99"}"#.to_owned(),
        ),
        (
            "transaction",
            10,
            r#"{"id":10,"customer_id":1,"buyer_id":7,"total_amount":"19.98","currency":"EUR","payment_method":"paypal","status":"completed","created_at":"2026-12-06T10:00:00.000000Z"}"#.to_owned(),
        ),
        (
            "transactiondetail",
            20,
            r#"{"id":20,"transaction_id":10,"product_id":5,"quantity":2,"unit_price":"9.99"}"#.to_owned(),
        ),
    ] {
        send(key(id), event(table, &after, "r", 1000, 1001)).await;
    }
    let log = std::env::temp_dir().join(format!("{}.sink.log", dwh.db));
    let topics = vec![topic.clone()];
    let mut sink = Sink::start(&dwh, &topics, "instashop", &log);
    dwh.wait_caught_up(&topics, &mut sink).await;
    // The next attempt's snapshot, later: buyer 7's first record.
    send(key(7), event("buyer", &buyer("second"), "r", 3000, 3001)).await;
    dwh.wait_caught_up(&topics, &mut sink).await;
    let joined = sale_buyer(&dwh).await;
    assert_eq!(
        joined.as_ref().map(|(_, name)| name.as_str()),
        Some("second"),
        "the sale joins the buyer's only version"
    );
    // An older version arrives (a re-delivery of an earlier record): the
    // sale moves to the version valid when it was sold.
    send(key(7), event("buyer", &buyer("first"), "c", 900, 900)).await;
    dwh.wait_caught_up(&topics, &mut sink).await;
    let moved = sale_buyer(&dwh).await;
    assert_eq!(
        moved.as_ref().map(|(_, name)| name.as_str()),
        Some("first"),
        "the sale joins the version valid when sold"
    );
    assert!(sink.terminate().success(), "{}", sink.log_tail());
    common::delete_topics(&[&topic, &format!("{}.dlq", dwh.db)]).await;
}
