//! A reader restarted from scratch under a running sink: the reader is
//! stopped and its slot dropped, and while no slot records anything a
//! product and a purchase line are deleted and another product's price
//! changes; then the reader starts on a new slot and takes a new snapshot
//! onto the same topics. No delete event is ever sent for the rows deleted
//! meanwhile; the snapshot-complete marker each table's snapshot ends with
//! (on every partition) must end them in the warehouse, and only them: the
//! rows the snapshot read again keep their versions as they were.
//!
//! Needs the local stack and the reader binary (`cargo build -p cdc-reader
//! --bin cdc-reader`; `CDC_READER_BIN` overrides its path).
#![allow(clippy::unwrap_used)]

mod common;

use common::{Dwh, Sink, Source};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_deleted_while_no_slot_existed_end_at_the_new_snapshot() {
    let mut source = Source::create("fromscratch").await;
    let dwh = Dwh::create("fromscratch").await;
    let db = common::connect(&source.url).await;
    db.batch_execute(
        "INSERT INTO customer (id, name, email, subscription_plan, country) VALUES (1, 'shop', 's@x', 'free', 'NL');
         INSERT INTO buyer (id, customer_id, name, email) VALUES (1, 1, 'b', 'b@x');
         INSERT INTO product (id, customer_id, name, category, price)
             SELECT i, 1, 'p' || i, 'home', 10 + i FROM generate_series(1, 12) i;
         INSERT INTO transaction (id, external_id, customer_id, buyer_id, total_amount, payment_method, status)
             VALUES (1, gen_random_uuid(), 1, 1, 33.00, 'paypal', 'completed');
         INSERT INTO transactiondetail (id, transaction_id, product_id, quantity, unit_price)
             SELECT i, 1, i, 1, 10 + i FROM generate_series(1, 6) i;",
    )
    .await
    .unwrap();
    source.start_reader();
    source.wait_confirmed_now().await;
    let log = std::env::temp_dir().join(format!("{}.sink.log", dwh.db));
    let topics = source.topics();
    let mut sink = Sink::start(&dwh, &topics, &source.db, &log);
    dwh.wait_caught_up(&topics, &mut sink).await;

    source.kill_reader_and_drop_slot().await;
    db.batch_execute(
        "DELETE FROM transactiondetail WHERE id IN (2, 5);
         DELETE FROM product WHERE id IN (9, 11);
         UPDATE product SET price = 99 WHERE id = 10;",
    )
    .await
    .unwrap();
    source.start_reader();
    source.wait_confirmed_now().await;
    dwh.wait_caught_up(&topics, &mut sink).await;
    sink.terminate();

    let client = dwh.client().await;
    let current: Vec<i64> = client
        .query(
            "SELECT product_id FROM dim_product WHERE is_current ORDER BY product_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(current, vec![1, 2, 3, 4, 5, 6, 7, 8, 10, 12]);
    // A deleted product's history ends with a deleting version; a product
    // read again unchanged keeps its one version (no delete and re-create).
    let versions: Vec<(i64, i64, bool)> = client
        .query(
            "SELECT product_id, count(*), bool_or(is_deleted) FROM dim_product
             WHERE product_id IN (1, 9, 10) GROUP BY product_id ORDER BY product_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(versions, vec![(1, 1, false), (9, 2, true), (10, 2, false)]);
    let lines: Vec<i64> = client
        .query("SELECT line_id FROM fact_sale_line ORDER BY line_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(lines, vec![1, 3, 4, 6]);
    // The lines read again still join the product version they were sold at.
    assert_eq!(
        dwh.count(
            "SELECT count(*) FROM fact_sale_line f JOIN dim_product p ON p.product_key = f.product_key
             WHERE (p.valid_from_commit_lsn, p.valid_from_lsn) <= (f.sold_commit_lsn, f.sold_lsn)"
        )
        .await,
        4
    );
    let (ok, out) = common::verify(&dwh, &source);
    assert!(ok, "verify found differences:\n{out}");
}

/// Hand-made messages on a two-partition topic: partition 0's copy of a
/// marker is read before partition 1's snapshot rows have been produced.
/// It ends partition 0's row that its snapshot did not read again, and must
/// leave partition 1's row alone: that row's snapshot read comes later,
/// before partition 1's own copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marker_copy_ends_only_the_rows_of_its_own_partition() {
    use std::time::Duration;

    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;

    let dwh = Dwh::create("markerparts").await;
    let topic = common::unique("dwh_marker_test_");
    let producer = common::hand_made_topic(&topic, 2).await;
    let product = |id: i64, op: &str, lsn: i64, commit_lsn: i64| {
        format!(
            r#"{{"before":null,"after":{{"id":{id},"customer_id":1,"name":"p{id}","category":"home","price":"9.99"}},"source":{{"db":"instashop","table":"product","ts_ms":1795360039853,"lsn":{lsn},"commit_lsn":{commit_lsn},"snapshot":"{}"}},"op":"{op}"}}"#,
            op == "r"
        )
    };
    let send = |partition: i32, key: Option<String>, value: Option<String>| {
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            let mut record: FutureRecord<'_, str, str> =
                FutureRecord::to(&topic).partition(partition);
            if let Some(k) = key.as_deref() {
                record = record.key(k);
            }
            if let Some(v) = value.as_deref() {
                record = record.payload(v);
            } else {
                let mut headers = OwnedHeaders::new();
                for (k, v) in [
                    ("cdc.marker", "snapshot_complete"),
                    ("cdc.db", "instashop"),
                    ("cdc.schema", "public"),
                    ("cdc.table", "product"),
                    ("cdc.commit_lsn", "1000"),
                    ("cdc.lsn", "1001"),
                ] {
                    headers = headers.insert(Header {
                        key: k,
                        value: Some(v),
                    });
                }
                record = record.headers(headers);
            }
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    };
    let key = |id: i64| Some(format!(r#"{{"id":{id}}}"#));
    send(0, key(1), Some(product(1, "c", 100, 120))).await;
    send(1, key(2), Some(product(2, "c", 200, 220))).await;

    let log = std::env::temp_dir().join(format!("{}.sink.log", dwh.db));
    let topics = vec![topic.clone()];
    let mut sink = Sink::start(&dwh, &topics, "instashop", &log);
    dwh.wait_caught_up(&topics, &mut sink).await;
    // Partition 0's snapshot read nothing, then its copy of the marker.
    send(0, None, None).await;
    dwh.wait_caught_up(&topics, &mut sink).await;
    // Partition 1's snapshot read product 2 again, then its copy.
    send(1, key(2), Some(product(2, "r", 1001, 1000))).await;
    send(1, None, None).await;
    dwh.wait_caught_up(&topics, &mut sink).await;
    assert!(sink.terminate().success(), "{}", sink.log_tail());

    let client = dwh.client().await;
    let versions: Vec<(i64, i64, bool, bool)> = client
        .query(
            "SELECT product_id, count(*), bool_or(is_deleted), bool_or(is_current) FROM dim_product
             GROUP BY product_id ORDER BY product_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(versions, vec![(1, 2, true, false), (2, 1, false, true)]);
    let last_ops: Vec<(String, String)> = client
        .query(
            "SELECT DISTINCT ON (row_key) row_key, op::text FROM change_event
             ORDER BY row_key, coalesce(commit_lsn, lsn) DESC, lsn DESC",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        last_ops,
        vec![
            (r#"{"id":1}"#.to_owned(), "d".to_owned()),
            (r#"{"id":2}"#.to_owned(), "r".to_owned())
        ]
    );
    common::delete_topics(&[&topic, &format!("{}.dlq", dwh.db)]).await;
}
