//! Incremental snapshot by signal, under a writer that inserts, updates and
//! deletes rows of the same table, with the reader killed (kill -9) in the
//! middle of it: the reader started with `--snapshot-mode never`, so the
//! rows that existed before reach the topic only through the incremental
//! snapshot, and the topic must still replay to the table. The restarted
//! reader resumes from its saved progress, not from the first chunk.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Reader, TestDb, tail};
use tokio_util::sync::CancellationToken;

const ROWS: u32 = 40_000;

fn schema() -> String {
    format!(
        "
CREATE TABLE item (id bigserial PRIMARY KEY, v int NOT NULL, note text);
INSERT INTO item (v, note) SELECT g, 'row ' || g FROM generate_series(1, {ROWS}) g;
CREATE TABLE cdc_signal (id text PRIMARY KEY, type text NOT NULL, data text);
CREATE PUBLICATION instashop_cdc FOR TABLE item, cdc_signal;
GRANT SELECT ON item TO cdc_reader;
GRANT SELECT, INSERT, UPDATE ON cdc_signal TO cdc_reader;
"
    )
}

/// Updates, deletes and inserts rows spread over the whole key range
/// (so chunks before, at and after the snapshot's position are hit) until
/// `stop`.
async fn load(url: String, stop: CancellationToken) -> u64 {
    let client = support::connect(&url).await;
    let mut batches = 0;
    while !stop.is_cancelled() {
        client
            .batch_execute(&format!(
                "UPDATE item SET v = v + 1, note = 'upd' WHERE id IN (SELECT (random() * {ROWS})::bigint FROM generate_series(1, 20));
                 DELETE FROM item WHERE id IN (SELECT (random() * {ROWS})::bigint FROM generate_series(1, 5));
                 INSERT INTO item (v) SELECT g FROM generate_series(1, 10) g;"
            ))
            .await
            .unwrap();
        batches += 1;
        tokio::task::yield_now().await;
    }
    batches
}

/// The reader's saved progress (`None` until the first write).
async fn progress(db: &TestDb) -> Option<Value> {
    let client = db.owner().await;
    let row = client
        .query_opt(
            "SELECT data FROM cdc_signal WHERE id = $1",
            &[&format!("progress:{}", db.slot)],
        )
        .await
        .unwrap()?;
    let data: String = row.get(0);
    Some(serde_json::from_str(&data).unwrap())
}

fn chunks_done(p: &Value) -> Option<u64> {
    p["queue"].as_array()?.first()?["chunks"].as_u64()
}

/// Polls until the saved progress satisfies `pred`.
async fn wait_progress(
    db: &TestDb,
    reader: &Reader,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(p) = progress(db).await
            && pred(&p)
        {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "no progress {what} within 180 s; last {:?}\n{}",
            progress(db).await,
            tail(&reader.log_text(), 40)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_signalled_snapshot_under_load_and_kill_9_replays_to_the_table() {
    let db = TestDb::create("incr", &schema()).await;
    let args = [
        "--snapshot-mode",
        "never",
        "--incremental-chunk-size",
        "200",
    ];
    let mut reader = Reader::start(&db, &args);
    db.wait_streaming(&reader).await;

    let stop = CancellationToken::new();
    let writer = tokio::spawn(load(db.owner_url.clone(), stop.clone()));
    db.owner()
        .await
        .batch_execute(
            r#"INSERT INTO cdc_signal VALUES ('bad-1', 'execute-snapshot', '{not json');
               INSERT INTO cdc_signal VALUES ('sig-1', 'execute-snapshot',
                 '{"data-collections":["public.item"],"type":"incremental"}');"#,
        )
        .await
        .unwrap();

    // Kill it a few chunks in, while the writer goes on.
    let p = wait_progress(&db, &reader, "of 5 chunks", |p| {
        chunks_done(p).is_some_and(|c| c >= 5)
    })
    .await;
    let log = reader.log_text();
    assert!(
        log.contains("signal \"bad-1\" ignored") && log.contains("not valid"),
        "the malformed signal is one warn line:\n{}",
        tail(&log, 30)
    );
    reader.kill9();
    let killed_at = chunks_done(&p).unwrap();

    let mut reader = Reader::start(&db, &args);
    let restarted = Instant::now();
    let done = wait_progress(&db, &reader, "to the end of the table", |p| {
        p["queue"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    let log = reader.log_text();
    let resumed = log
        .lines()
        .find(|l| l.contains("resuming incremental snapshot"))
        .unwrap_or_else(|| panic!("no resume line:\n{}", tail(&log, 30)));
    assert!(
        !resumed.contains("chunks_done=0"),
        "resumed from saved progress (killed after {killed_at} chunks): {resumed}"
    );
    assert!(done["paused"].as_bool() == Some(false));
    eprintln!(
        "killed after {killed_at} chunks; the restarted reader finished in {:.1} s",
        restarted.elapsed().as_secs_f64()
    );

    stop.cancel();
    let batches = writer.await.unwrap();
    assert!(batches > 0);
    db.wait_caught_up(Duration::from_secs(120), Some(&reader.log))
        .await;
    let events = support::assert_replay_equals_db(&db, &["item"]).await;
    let incremental = events
        .iter()
        .filter(|e| {
            e.value
                .as_ref()
                .is_some_and(|v| v["source"]["snapshot"] == "incremental" && v["op"] == "r")
        })
        .count();
    eprintln!(
        "{} events replayed, {incremental} incremental r rows, {batches} writer batches",
        events.len()
    );
    assert!(
        incremental >= (ROWS as usize) / 2,
        "most existing rows came as incremental r events: {incremental}"
    );
    assert!(
        reader.stop(),
        "clean stop\n{}",
        tail(&reader.log_text(), 20)
    );
    db.cleanup().await;
}
