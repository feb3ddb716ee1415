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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::scratch_pg::ScratchPg;
use support::{
    Reader, SHOP_TABLES, TestDb, check_duplicates, replay_equals_db, shop_batch_sql,
    shop_load_through_restarts, tail,
};
use tokio_util::sync::CancellationToken;

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

    let stop = CancellationToken::new();
    let committed = Arc::new(AtomicU64::new(0));
    let load = tokio::spawn(shop_load_through_restarts(
        db.owner_url.clone(),
        20,
        stop.clone(),
        committed.clone(),
    ));
    let restarts = 2;
    for i in 0..restarts {
        let from = committed.load(Ordering::SeqCst);
        wait_for(
            || committed.load(Ordering::SeqCst) >= from + BATCHES_BETWEEN_RESTARTS,
            "the load to commit batches",
            &reader,
        )
        .await;
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
    let from = committed.load(Ordering::SeqCst);
    wait_for(
        || committed.load(Ordering::SeqCst) >= from + BATCHES_BETWEEN_RESTARTS,
        "the load to commit batches after the last restart",
        &reader,
    )
    .await;
    stop.cancel();
    let failed = load.await.unwrap();
    println!(
        "load: {} batches committed, {failed} failed attempts",
        committed.load(Ordering::SeqCst)
    );

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

/// Polls `done` every 50 ms for up to 60 s.
async fn wait_for(done: impl Fn() -> bool, what: &str, reader: &Reader) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; reader log:\n{}",
            tail(&reader.log_text(), 30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
