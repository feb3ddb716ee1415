//! `source.commit_lsn` across the snapshot boundary: a transaction that is
//! open at the new slot's consistent point C, changed rows before C and
//! commits after it is streamed with change LSNs below C. Ordered by
//! `(commit_lsn, lsn)` its events come after the snapshot rows; ordered by
//! `lsn` alone they look older and a consumer would drop them.
//!
//! Getting a transaction open across C: creating a logical slot waits for
//! the transactions running at its first `running_xacts` record (T1), then
//! for those running when it reached its full snapshot (T2); a transaction
//! started after that (T3) may stay open across the consistent point. The
//! test follows those phases through `pg_locks` (the walsender waiting on
//! T1's, then T2's transaction id), never by sleeping.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Reader, TestDb, consume_all, db_rows, tail, topic};
use tokio_postgres::Client;

const SCHEMA: &str = "
CREATE TABLE item (id int PRIMARY KEY, v int NOT NULL);
ALTER TABLE item REPLICA IDENTITY FULL;
CREATE TABLE blocker (id int PRIMARY KEY);
INSERT INTO item SELECT g, 0 FROM generate_series(1, 20) g;
CREATE PUBLICATION instashop_cdc FOR TABLE item;
GRANT SELECT ON item TO cdc_reader;
";

/// Opens a transaction with a transaction id on `client`; returns its backend pid.
async fn open_transaction(client: &Client, sql: &str) -> i32 {
    client.batch_execute("BEGIN").await.unwrap();
    client.batch_execute(sql).await.unwrap();
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Waits until some backend waits on the transaction id of backend `pid`.
async fn wait_for_waiter_on(admin: &Client, pid: i32, reader: &Reader, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = $1 \
                 WHERE l.locktype = 'transactionid' AND NOT l.granted AND l.transactionid = a.backend_xid",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "slot creation never waited on {what}:\n{}",
            tail(&reader.log_text(), 30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn position(v: &Value) -> (u64, u64) {
    (
        v["source"]["commit_lsn"]
            .as_u64()
            .expect("commit_lsn is a number"),
        v["source"]["lsn"].as_u64().expect("lsn is a number"),
    )
}

/// Folds events by key, skipping an event whose `order` is not above the
/// key's last applied one, as an idempotent consumer does.
fn fold_newest(
    events: &[(String, Value)],
    order: impl Fn(&Value) -> (u64, u64),
) -> BTreeMap<String, Value> {
    let mut rows: BTreeMap<String, ((u64, u64), Option<Value>)> = BTreeMap::new();
    for (key, v) in events {
        let at = order(v);
        if rows.get(key).is_some_and(|(last, _)| *last >= at) {
            continue;
        }
        let row = match v["op"].as_str().unwrap() {
            "d" => None,
            _ => Some(v["after"].clone()),
        };
        rows.insert(key.clone(), (at, row));
    }
    rows.into_iter()
        .filter_map(|(k, (_, row))| row.map(|r| (k, r)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_open_across_the_consistent_point_orders_after_the_snapshot() {
    let db = TestDb::create("commitpos", SCHEMA).await;
    let admin = support::connect(&db.admin_url).await;
    let (t1, t2, t3) = (db.owner().await, db.owner().await, db.owner().await);

    let t1_pid = open_transaction(&t1, "INSERT INTO blocker VALUES (1)").await;
    let mut reader = Reader::start(&db, &[]);
    wait_for_waiter_on(&admin, t1_pid, &reader, "T1").await;
    let t2_pid = open_transaction(&t2, "INSERT INTO blocker VALUES (2)").await;
    t1.batch_execute("COMMIT").await.unwrap();
    wait_for_waiter_on(&admin, t2_pid, &reader, "T2").await;
    // T3: updates and deletes of existing rows, open across the consistent point.
    open_transaction(
        &t3,
        "UPDATE item SET v = v + 1 WHERE id <= 5; DELETE FROM item WHERE id IN (6, 7); UPDATE item SET v = 100 WHERE id = 8",
    )
    .await;
    t2.batch_execute("COMMIT").await.unwrap();
    db.wait_streaming(&reader).await;
    t3.batch_execute("COMMIT").await.unwrap();
    db.wait_caught_up(Duration::from_secs(120), Some(&reader.log))
        .await;

    let events: Vec<(String, Value)> = consume_all(&[topic(&db, "item")])
        .into_iter()
        .filter_map(|e| e.value.map(|v| (e.key, v)))
        .collect();
    let snapshot: Vec<&Value> = events
        .iter()
        .map(|(_, v)| v)
        .filter(|v| v["op"] == "r")
        .collect();
    let streamed: Vec<&Value> = events
        .iter()
        .map(|(_, v)| v)
        .filter(|v| v["op"] != "r")
        .collect();
    assert_eq!(snapshot.len(), 20, "every pre-existing row as an r event");
    assert_eq!(
        streamed.len(),
        8,
        "T3's five updates, two deletes and one update"
    );
    let consistent_point = snapshot[0]["source"]["lsn"].as_u64().unwrap();
    let snapshot_commit = snapshot.iter().map(|v| position(v).0).max().unwrap();
    // The premise: T3 changed rows before the consistent point.
    assert!(
        streamed.iter().all(|v| position(v).1 < consistent_point),
        "T3's changes should precede the consistent point {consistent_point}: {:?}",
        streamed.iter().map(|v| position(v)).collect::<Vec<_>>()
    );
    for v in &streamed {
        assert!(
            position(v).0 > snapshot_commit,
            "streamed event at {:?} does not order after the snapshot rows' commit_lsn {snapshot_commit}",
            position(v)
        );
    }

    let client = db.owner().await;
    let table = db_rows(&client, "item").await;
    assert_eq!(
        fold_newest(&events, position),
        table,
        "ordered by (commit_lsn, lsn) the events give the table"
    );
    let by_lsn_alone = |v: &Value| (v["source"]["lsn"].as_u64().unwrap(), 0);
    assert_ne!(
        fold_newest(&events, by_lsn_alone),
        table,
        "ordered by lsn alone T3's changes look older than the snapshot rows"
    );
    assert!(reader.stop());
    db.cleanup().await;
}
