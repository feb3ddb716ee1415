//! A warehouse of the earlier layout (purchase-level columns stored per
//! line in a `fact_sale_line` table; built by turning a new one back, with
//! tests/fixtures/lines-stored-per-line.sql) is migrated by applying
//! `sql/dwh.sql`:
//! the lines move to `sale_line`, each purchase gets its creation position
//! from its first change event and the customer and buyer versions valid
//! there, and `fact_sale_line` becomes the view with the same columns.
//! Applying the schema again changes nothing. Needs the local stack's
//! PostgreSQL.
#![allow(clippy::unwrap_used)]

mod common;

use common::Dwh;

#[tokio::test]
async fn an_earlier_warehouse_is_migrated_in_place() {
    let dwh = Dwh::create("migrate").await;
    let client = dwh.client().await;
    let earlier = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/lines-stored-per-line.sql"),
    )
    .unwrap();
    client.batch_execute(&earlier).await.unwrap();
    // Customer 1 changed at position 50; purchase 7 was created at
    // (30, 20), before that change, and completed at 90. Its line was sold
    // with it. Purchase 8 has no change event left (created at its last
    // position then).
    client
        .batch_execute(
            r#"CREATE TABLE change_event_20261207 PARTITION OF change_event FOR VALUES FROM ('2026-12-07') TO ('2026-12-08');
            INSERT INTO dim_customer (customer_id, name, valid_from, valid_from_commit_lsn, valid_from_lsn, valid_to, valid_to_commit_lsn, valid_to_lsn, is_current)
            VALUES (1, 'before', '2026-12-07', 10, 10, '2026-12-07 01:00', 50, 50, false),
                   (1, 'after', '2026-12-07 01:00', 50, 50, NULL, NULL, NULL, true);
            INSERT INTO dim_buyer (buyer_id, name, valid_from, valid_from_commit_lsn, valid_from_lsn) VALUES (2, 'b', '2026-12-07', 10, 10);
            INSERT INTO fact_purchase VALUES
                (7, 1, 2, 100, 'USD', 'cc', 'completed', '2026-12-07 00:30Z', 20261207, '2026-12-07 02:00Z', 90, 90),
                (8, 1, 2, 300, 'USD', 'cc', 'pending', '2026-12-07 03:00Z', 20261207, '2026-12-07 03:00Z', 95, 95);
            INSERT INTO change_event (source_db, source_table, row_key, op, commit_time, lsn, commit_lsn, kafka_topic, kafka_partition, kafka_offset)
            VALUES ('instashop', 'transaction', '{"id":7}', 'c', '2026-12-07 00:30Z', 20, 30, 't', 0, 0),
                   ('instashop', 'transaction', '{"id":7}', 'u', '2026-12-07 02:00Z', 90, 90, 't', 0, 1);
            INSERT INTO fact_sale_line (line_id, purchase_id, product_id, quantity, unit_price_cents, amount_cents,
                customer_id, buyer_id, status, purchase_time, date_key, sold_time, sold_commit_lsn, sold_lsn, commit_time, last_commit_lsn, last_lsn)
            VALUES (70, 7, 3, 1, 100, 100, 1, 2, 'completed', '2026-12-07 00:30Z', 20261207, '2026-12-07 00:30Z', 30, 21, '2026-12-07 00:30Z', 30, 21);"#,
        )
        .await
        .unwrap();

    let schema = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/dwh.sql"),
    )
    .unwrap();
    client.batch_execute(&schema).await.unwrap();

    let purchases: Vec<(i64, i64, i64, String, Option<String>)> = client
        .query(
            "SELECT p.purchase_id, p.created_commit_lsn, p.created_lsn, c.name, b.name
             FROM fact_purchase p JOIN dim_customer c ON c.customer_key = p.customer_key
             LEFT JOIN dim_buyer b ON b.buyer_key = p.buyer_key ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        purchases,
        [
            (7, 30, 20, "before".into(), Some("b".into())),
            (8, 95, 95, "after".into(), Some("b".into())),
        ],
        "creation position from the first event (else the last), versions valid there"
    );
    let line = client
        .query_one(
            "SELECT f.status, f.customer_id, c.name, f.sold_commit_lsn FROM fact_sale_line f
             JOIN dim_customer c ON c.customer_key = f.customer_key WHERE f.line_id = 70",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            line.get::<_, String>(0),
            line.get::<_, i64>(1),
            line.get::<_, String>(2),
            line.get::<_, i64>(3)
        ),
        ("completed".into(), 1, "before".into(), 30),
        "the line through the view, with its purchase's columns"
    );
    let kinds: Vec<(String, String)> = client
        .query(
            "SELECT relname::text, relkind::text FROM pg_class
             WHERE relname IN ('fact_sale_line', 'sale_line', 'sale_line_purchase_idx', 'sale_line_product_idx') ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        kinds,
        [
            ("fact_sale_line".into(), "v".into()),
            ("sale_line".into(), "r".into()),
            ("sale_line_product_idx".into(), "i".into()),
            ("sale_line_purchase_idx".into(), "i".into()),
        ]
    );

    // Applied again (scripts/up does, on every change of the file): no-op.
    client.batch_execute(&schema).await.unwrap();
    assert_eq!(dwh.count("SELECT count(*) FROM fact_sale_line").await, 1);
    assert_eq!(
        dwh.count("SELECT count(*) FROM fact_purchase WHERE customer_key IS NOT NULL")
            .await,
        2
    );
}
