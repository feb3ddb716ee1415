//! kill -9 of the reader at random moments under load, at least ten times:
//! replay still equals the database, and every duplicate is an exact re-send
//! (same `source.lsn` and `sequence`).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut next = move |max_ms: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % max_ms
    };
    let mut reader = Reader::start(&db, &[]);
    let kills = 12;
    for i in 0..kills {
        // The first kill lands early (often inside the snapshot), later ones anywhere.
        let wait = if i == 0 {
            50 + next(400)
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
