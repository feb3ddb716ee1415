//! A Postgres restart under load: the reader loses its connections, keeps
//! running, reconnects with backoff, resumes from the slot, and the replay of
//! every topic still equals the tables.
//!
//! The shared instance must not restart under other tests, so
//! this runs on a scratch cluster of its own (`support::scratch_pg`), with
//! the instashop schema, the roles of `sql/roles.sql` and the local brokers.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::scratch_pg::ScratchPg;
use support::{
    Reader, SHOP_TABLES, ShopLoad, TestDb, check_duplicates, replay_equals_db, shop_batch_sql, tail,
};

/// Batches the load must commit between two restarts, so each restart
/// happens with the reader streaming fresh changes.
const BATCHES_BETWEEN_RESTARTS: u64 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_load_loses_nothing() {
    let pg = Arc::new(ScratchPg::start(
        "restart",
        &[
            ("wal_level", "logical"),
            ("max_replication_slots", "4"),
            ("max_wal_senders", "4"),
        ],
    ));
    let db = TestDb::create_on(&pg, "pgrestart", support::INSTASHOP_SQL).await;
    db.owner()
        .await
        .batch_execute(&shop_batch_sql(100))
        .await
        .unwrap();
    let mut reader = Reader::start(&db, &[]);
    db.wait_streaming(&reader).await;

    let load = ShopLoad::start(&db, 20);
    let restarts = 2;
    for i in 0..restarts {
        load.wait_batches(BATCHES_BETWEEN_RESTARTS, &reader).await;
        let started = Instant::now();
        let p = pg.clone();
        tokio::task::spawn_blocking(move || p.restart())
            .await
            .unwrap();
        println!(
            "restart {i}: postgres back after {:.1} s",
            started.elapsed().as_secs_f64()
        );
        // The restart ended every walsender: active again = the reader reconnected.
        db.wait_streaming(&reader).await;
        println!(
            "restart {i}: reader streaming again after {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    load.wait_batches(BATCHES_BETWEEN_RESTARTS, &reader).await;
    let batches = load.committed();
    let failed = load.finish().await;
    println!("load: {batches} batches committed, {failed} failed attempts");

    db.wait_caught_up(Duration::from_secs(120), Some(&reader.log))
        .await;
    assert!(
        reader.child.try_wait().unwrap().is_none(),
        "the reader exited instead of reconnecting:\n{}",
        tail(&reader.log_text(), 30)
    );
    let log = reader.log_text();
    assert!(
        log.matches("reconnecting").count() >= restarts,
        "expected a reconnect per restart:\n{}",
        tail(&log, 30)
    );
    let events = replay_equals_db(&db, &SHOP_TABLES, true).await;
    let dups = check_duplicates(&events);
    println!("{} events, {dups} exact duplicates", events.len());
    assert!(
        reader.stop(),
        "reader did not exit 0 on SIGTERM:\n{}",
        tail(&reader.log_text(), 20)
    );
}
