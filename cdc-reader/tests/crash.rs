//! kill -9 of the reader at random moments under load, at least ten times:
//! replay still equals the database, and every duplicate is an exact re-send
//! (same `source.lsn` and `sequence`). Also: kill -9 inside the initial
//! snapshot, and connection loss (the reader's view of a Postgres restart).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod support;

use std::time::Duration;

use support::{
    Reader, SHOP_TABLES, TestDb, check_duplicates, replay_equals_db, shop_batch_sql, shop_load,
};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_under_load_loses_nothing() {
    let db = TestDb::create("kill9", support::INSTASHOP_SQL).await;
    db.owner()
        .await
        .batch_execute(&shop_batch_sql(300))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let load = tokio::spawn(shop_load(db.owner_url.clone(), 30, stop.clone()));
    let mut next = support::random_below();
    let mut reader = Reader::start(&db, &[]);
    let kills = 12;
    for i in 0..kills {
        // Kills land anywhere after the initial snapshot finished (a kill
        // inside the snapshot is `kill_9_during_the_snapshot_starts_it_over`):
        // during streaming, during a restart's preflight, while reconnecting.
        if i == 0 {
            db.wait_streaming(&reader).await;
        }
        let wait = if i % 3 == 0 {
            20 + next(300)
        } else {
            200 + next(2500)
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        reader.kill9();
        println!("kill {i} after {wait} ms");
        reader = Reader::start(&db, &[]);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let batches = load.await.unwrap();
    assert!(batches >= 10, "load wrote only {batches} batches");
    db.wait_caught_up(Duration::from_secs(300), Some(&reader.log))
        .await;
    let events = replay_equals_db(&db, &SHOP_TABLES, true).await;
    let dups = check_duplicates(&events);
    println!(
        "{} events, {dups} exact duplicates after {kills} kills",
        events.len()
    );
    assert!(reader.stop());
    db.cleanup().await;
}

/// Connection loss under load (the reader's side of a Postgres restart or a
/// network cut): the walsender is terminated several times; the reader
/// reconnects with backoff, resumes from the slot and loses nothing. A real
/// Postgres restart under load is done by `scripts/chaos`, not here: the
/// instance is shared by every test running at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_loss_under_load_reconnects_and_loses_nothing() {
    let db = TestDb::create("connloss", support::INSTASHOP_SQL).await;
    db.owner()
        .await
        .batch_execute(&shop_batch_sql(100))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let load = tokio::spawn(shop_load(db.owner_url.clone(), 30, stop.clone()));
    let reader = Reader::start(&db, &[]);
    let admin = support::connect(&db.admin_url).await;
    let mut last_pid: Option<i32> = None;
    for _ in 0..4 {
        // Wait for a walsender other than the one terminated last time.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let pid = loop {
            let pid: Option<i32> = admin
                .query_opt(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                    &[&db.slot],
                )
                .await
                .unwrap()
                .and_then(|r| r.get(0));
            if let Some(p) = pid
                && Some(p) != last_pid
            {
                break p;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the reader did not reconnect:\n{}",
                support::tail(&reader.log_text(), 20)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        tokio::time::sleep(Duration::from_millis(700)).await;
        admin
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap();
        last_pid = Some(pid);
    }
    stop.cancel();
    load.await.unwrap();
    db.wait_caught_up(Duration::from_secs(300), Some(&reader.log))
        .await;
    let log = reader.log_text();
    assert!(
        log.contains("reconnecting"),
        "the reader should have reconnected:\n{}",
        support::tail(&log, 20)
    );
    let events = replay_equals_db(&db, &SHOP_TABLES, true).await;
    check_duplicates(&events);
    drop(reader);
    db.cleanup().await;
}

/// kill -9 in the middle of the initial snapshot, twice: once in the first
/// attempt, once in the repeated one. Each kill leaves `r` events of rows
/// that the window before the next start then deletes (and updates and
/// inserts others). The pending snapshot slot kept every change since the
/// first attempt's consistent point, so the deletes still reach Kafka and the
/// replay equals the table; no helper slot is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_the_snapshot_starts_it_over() {
    let db = TestDb::create(
        "snapkill",
        "CREATE TABLE item (id bigint PRIMARY KEY, note text NOT NULL);
         CREATE PUBLICATION instashop_cdc FOR TABLE item;
         GRANT SELECT ON item TO cdc_reader;
         INSERT INTO item SELECT g, 'item ' || g FROM generate_series(1, 100000) g;",
    )
    .await;
    let topic = support::topic(&db, "item");
    let count = |topic: &str| {
        let topic = topic.to_owned();
        async move {
            tokio::task::spawn_blocking(move || support::message_count(&topic))
                .await
                .unwrap()
        }
    };
    let admin = support::connect(&db.admin_url).await;
    let owner = db.owner().await;
    let mut interrupted = 0;
    for round in 0..2_i64 {
        let before = count(&topic).await;
        let mut reader = Reader::start(&db, &["--snapshot-workers", "1"]);
        // Kill once this attempt has put rows into Kafka (COPY reads in
        // physical order: the low ids went out first).
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let log = reader.log_text();
            if log.contains("slot created")
                || (log.contains("snapshot started") && count(&topic).await >= before + 2000)
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{}",
                support::tail(&log, 20)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let finished = reader.log_text().contains("slot created");
        reader.kill9();
        println!(
            "round {round}: killed after {} snapshot events (finished: {finished})",
            count(&topic).await - before
        );
        // No permanent slot unless the snapshot had already been acknowledged;
        // until then the pending slot marks the interrupted snapshot.
        assert_eq!(db.confirmed_flush().await.is_some(), finished);
        if !finished {
            interrupted += 1;
            let pending = format!("{}_snapshot", db.slot);
            assert!(
                helper_slots(&admin, &db.slot).await.contains(&pending),
                "no pending slot {pending} after the kill"
            );
        }
        // While down: delete rows this attempt already sent, plus rows spread
        // over the table; update and insert others.
        let lo = round * 100 + 1;
        owner
            .batch_execute(&format!(
                "DELETE FROM item WHERE id BETWEEN {lo} AND {lo} + 49;
                 DELETE FROM item WHERE id % 1000 = {};
                 UPDATE item SET note = 'changed {round}' WHERE id % 1000 = 500 OR id BETWEEN {lo} + 50 AND {lo} + 59;
                 INSERT INTO item VALUES ({}, 'while down');",
                round + 1,
                -round - 1
            ))
            .await
            .unwrap();
    }
    assert!(interrupted > 0, "no kill landed inside a snapshot");
    let reader = Reader::start(&db, &[]);
    db.wait_streaming(&reader).await;
    owner
        .batch_execute("INSERT INTO item VALUES (100001, 'after the snapshot'); DELETE FROM item WHERE id = 2000")
        .await
        .unwrap();
    db.wait_caught_up(Duration::from_secs(300), Some(&reader.log))
        .await;
    replay_equals_db(&db, &["item"], false).await;
    assert_eq!(helper_slots(&admin, &db.slot).await, Vec::<String>::new());
    drop(reader);
    db.cleanup().await;
}

/// The reader's helper slots (`<slot>_...`) that exist.
async fn helper_slots(admin: &tokio_postgres::Client, slot: &str) -> Vec<String> {
    admin
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE $1 ORDER BY 1",
            &[&format!("{slot}\\_%")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}
