//! SCD2 end to end: a product's price changes three times with a sale
//! between the changes, through the real reader; each sale must join the
//! product version (and price) it was sold at. The sale lines reach the
//! warehouse first and the product versions only afterwards (the sink is
//! first run without the product topic), so the join must not depend on
//! arrival order.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Dwh, Sink, Source};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sale_joins_the_price_it_was_sold_at_whatever_the_arrival_order() {
    let mut source = Source::create("scd2").await;
    let dwh = Dwh::create("scd2").await;
    let db = common::connect(&source.url).await;
    db.batch_execute(
        "INSERT INTO customer (id, name, email, subscription_plan, country) VALUES (1, 'shop', 's@x', 'free', 'NL');
         INSERT INTO buyer (id, customer_id, name, email) VALUES (1, 1, 'b', 'b@x');
         INSERT INTO product (id, customer_id, name, category, price) VALUES (1, 1, 'lamp', 'home', 10.00);",
    )
    .await
    .unwrap();
    source.start_reader();
    source.wait_confirmed_now().await;
    // Sale at 10.00, then 12.00, 15.00, 20.00: each in its own transaction.
    for (sale, next_price) in [
        (1, Some("12.00")),
        (2, Some("15.00")),
        (3, Some("20.00")),
        (4, None),
    ] {
        db.batch_execute(&format!(
            "BEGIN;
             INSERT INTO transaction (id, external_id, customer_id, buyer_id, total_amount, payment_method, status)
                 SELECT {sale}, gen_random_uuid(), 1, 1, price * 2, 'paypal', 'completed' FROM product WHERE id = 1;
             INSERT INTO transactiondetail (id, transaction_id, product_id, quantity, unit_price)
                 SELECT {sale}, {sale}, 1, 2, price FROM product WHERE id = 1;
             COMMIT;"
        ))
        .await
        .unwrap();
        if let Some(price) = next_price {
            db.batch_execute(&format!(
                "UPDATE product SET price = {price}, updated_at = now() WHERE id = 1"
            ))
            .await
            .unwrap();
        }
    }
    // An update of an untracked column makes no new version.
    db.batch_execute("UPDATE product SET description = 'bright' WHERE id = 1")
        .await
        .unwrap();
    source.wait_confirmed_now().await;

    let log = std::env::temp_dir().join(format!("{}.sink.log", dwh.db));
    let all = source.topics();
    let without_product: Vec<String> = all
        .iter()
        .filter(|t| !t.ends_with(".public.product"))
        .cloned()
        .collect();
    let mut sink = Sink::start(&dwh, &without_product, &source.db, &log);
    dwh.wait_caught_up(&without_product, &mut sink).await;
    assert!(sink.terminate().success(), "{}", sink.log_tail());
    assert_eq!(
        dwh.count("SELECT count(*) FROM fact_sale_line WHERE product_key IS NULL")
            .await,
        4,
        "the lines came before any product version"
    );

    let mut sink = Sink::start(&dwh, &all, &source.db, &log);
    dwh.wait_caught_up(&all, &mut sink).await;
    // Its endpoints while it consumes: healthy, and the written events
    // counted under their exported names.
    let addr = sink.http_addr().await;
    assert_eq!(
        common::http_get(&addr, "/health").await,
        (200, "ok\n".to_owned())
    );
    let (status, metrics) = common::http_get(&addr, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "\ndwh_sink_up 1\n",
        "\ndwh_sink_events_total{table=\"instashop.product\"} ",
        "\n# TYPE dwh_sink_batch_seconds histogram\n",
    ] {
        assert!(metrics.contains(line), "no {line:?} in\n{metrics}");
    }
    // The lag, measured every 5 s on a client of its own: none once caught up.
    let caught_up = format!(
        "\ndwh_sink_lag_messages{{topic=\"{}.public.product\",partition=\"0\"}} 0\n",
        source.db
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, metrics) = common::http_get(&addr, "/metrics").await;
        if metrics.contains(&caught_up) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {caught_up:?} within 20 s:\n{metrics}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    sink.terminate();

    let client = dwh.client().await;
    let sold: Vec<(i64, i64, i64)> = client
        .query(
            "SELECT f.line_id, f.unit_price_cents, p.price_cents FROM fact_sale_line f
             JOIN dim_product p ON p.product_key = f.product_key ORDER BY f.line_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        sold,
        vec![
            (1, 1000, 1000),
            (2, 1200, 1200),
            (3, 1500, 1500),
            (4, 2000, 2000)
        ]
    );
    let versions: Vec<(i64, bool, bool)> = client
        .query(
            "SELECT price_cents, valid_to IS NULL, is_current FROM dim_product WHERE product_id = 1
             ORDER BY valid_from_commit_lsn, valid_from_lsn",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        versions,
        vec![
            (1000, false, false),
            (1200, false, false),
            (1500, false, false),
            (2000, true, true)
        ]
    );
    // Each version ends where the next begins.
    assert_eq!(
        dwh.count(
            "SELECT count(*) FROM dim_product a JOIN dim_product b
               ON b.product_id = a.product_id AND b.valid_from_commit_lsn = a.valid_to_commit_lsn
              AND b.valid_from_lsn = a.valid_to_lsn AND b.valid_from = a.valid_to"
        )
        .await,
        3
    );
    let (ok, out) = common::verify(&dwh, &source);
    assert!(ok, "verify found differences:\n{out}");
}
