//! Incremental snapshot by signal, under a writer that inserts, updates and
//! deletes rows of the same table, with the reader killed (kill -9) in the
//! middle of it: the reader started with `--snapshot-mode never`, so the
//! rows that existed before reach the topic only through the incremental
//! snapshot, and the topic must still replay to the table. Killed three
//! times; each restarted reader resumes from its saved progress, not from
//! the first chunk.
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
    let mut killed_at = vec![chunks_done(&p).unwrap()];

    // Two more kills, each a few chunks after the restart resumed.
    for _ in 0..2 {
        let reader = Reader::start(&db, &args);
        let resumed = wait_log(&reader, &["resuming incremental snapshot"]).await;
        let last = *killed_at.last().unwrap();
        assert!(
            !resumed.contains("chunks_done=0"),
            "resumed from saved progress (killed after {last} chunks): {resumed}"
        );
        let p = wait_progress(&db, &reader, "of 5 more chunks", |p| {
            chunks_done(p).is_some_and(|c| c >= last + 5)
        })
        .await;
        let mut reader = reader;
        reader.kill9();
        killed_at.push(chunks_done(&p).unwrap());
    }

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
        "resumed from saved progress (killed after {killed_at:?} chunks): {resumed}"
    );
    assert!(done["paused"].as_bool() == Some(false));
    eprintln!(
        "killed after {killed_at:?} chunks; the last reader finished in {:.1} s",
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

/// Waits until the reader's log has a line containing every one of `parts`.
async fn wait_log(reader: &Reader, parts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = reader.log_text();
        if let Some(line) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {parts:?} within 120 s\n{}",
            tail(&log, 40)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn signal(db: &TestDb, id: &str, kind: &str, data: Option<&str>) {
    db.owner()
        .await
        .execute(
            "INSERT INTO cdc_signal VALUES ($1, $2, $3)",
            &[&id, &kind, &data],
        )
        .await
        .unwrap();
}

/// `--snapshot-mode initial-incremental` copies the existing rows through
/// chunks and skips (with one line naming the GRANT) a published table the
/// CDC role cannot read; a table created and published later is snapshotted
/// by one signal, held back while paused, and resumed; stop-snapshot
/// empties the queue. Every topic replays to its table.
#[tokio::test]
async fn initial_incremental_pause_resume_stop_and_a_table_added_later() {
    let db = TestDb::create(
        "incr2",
        "
CREATE TABLE item (id int PRIMARY KEY, v text NOT NULL);
INSERT INTO item SELECT g, 'v' || g FROM generate_series(1, 3000) g;
CREATE TABLE secret (id int PRIMARY KEY);
INSERT INTO secret VALUES (1);
CREATE TABLE cdc_signal (id text PRIMARY KEY, type text NOT NULL, data text);
CREATE PUBLICATION instashop_cdc FOR TABLE item, secret, cdc_signal;
GRANT SELECT ON item TO cdc_reader;
GRANT SELECT, INSERT, UPDATE ON cdc_signal TO cdc_reader;
",
    )
    .await;
    let mut reader = Reader::start(
        &db,
        &[
            "--snapshot-mode",
            "initial-incremental",
            "--incremental-chunk-size",
            "100",
        ],
    );
    let line = wait_log(&reader, &["incremental snapshot of public.secret skipped"]).await;
    assert!(
        line.contains("GRANT SELECT ON \"public\".\"secret\""),
        "{line}"
    );
    // Reported where an operator looks, not only in the log.
    let health = support::http_get(&reader, "/health");
    assert!(
        health.contains("skipped public.secret: the CDC role cannot read it: GRANT SELECT"),
        "{health}"
    );
    let metrics = support::http_get(&reader, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("cdc_incremental_table_skipped{")
                && l.contains("table=\"public.secret\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    wait_progress(&db, &reader, "(queue empty)", |p| {
        p["queue"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    db.wait_caught_up(Duration::from_secs(60), Some(&reader.log))
        .await;
    support::assert_replay_equals_db(&db, &["item"]).await;

    // A table created later, published, and signalled while paused.
    db.owner()
        .await
        .batch_execute(
            "CREATE TABLE extra (id int PRIMARY KEY, v text);
             INSERT INTO extra SELECT g, 'x' || g FROM generate_series(1, 2000) g;
             GRANT SELECT ON extra TO cdc_reader;
             ALTER PUBLICATION instashop_cdc ADD TABLE extra;",
        )
        .await
        .unwrap();
    signal(&db, "p1", "pause-snapshot", None).await;
    signal(
        &db,
        "x1",
        "execute-snapshot",
        Some(r#"{"data-collections":["public.extra"],"type":"incremental"}"#),
    )
    .await;
    // A probe after both: once it is logged, both were acted on.
    signal(&db, "probe-1", "no-such-signal", None).await;
    wait_log(&reader, &["signal \"probe-1\" ignored", "unknown type"]).await;
    // Let the loop go round: a few streamed transactions, each caught up
    // (and so each chunk a non-paused reader would have read by then).
    for i in 0..5 {
        db.owner()
            .await
            .execute(
                "UPDATE item SET v = $1 WHERE id = 1",
                &[&format!("round {i}")],
            )
            .await
            .unwrap();
        db.wait_caught_up(Duration::from_secs(60), Some(&reader.log))
            .await;
    }
    let p = progress(&db).await.unwrap();
    assert_eq!(p["paused"], true, "{p}");
    assert_eq!(p["queue"][0]["table"], "public.extra", "{p}");
    assert_eq!(chunks_done(&p), Some(0), "no chunk while paused: {p}");

    // Resumed from the command line, with the reader's own settings.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cdc-reader"))
        .args([
            "signal",
            "resume-snapshot",
            "--db",
            &db.name,
            "--",
            "--source",
        ])
        .arg(format!("{}={}", db.name, db.cdc_url))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cdc-reader signal: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_progress(&db, &reader, "(extra done)", |p| {
        p["queue"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    db.owner()
        .await
        .batch_execute(
            "UPDATE extra SET v = 'after' WHERE id <= 10; DELETE FROM extra WHERE id > 1990",
        )
        .await
        .unwrap();

    // Stop: queued twice over, then stopped; the queue empties.
    signal(
        &db,
        "x2",
        "execute-snapshot",
        Some(r#"{"data-collections":["public.item","public.extra"]}"#),
    )
    .await;
    signal(&db, "s1", "stop-snapshot", None).await;
    wait_log(&reader, &["incremental snapshot stopped", "signal=s1"]).await;
    wait_progress(&db, &reader, "(stopped)", |p| {
        p["queue"].as_array().is_some_and(Vec::is_empty)
    })
    .await;

    db.wait_caught_up(Duration::from_secs(60), Some(&reader.log))
        .await;
    support::assert_replay_equals_db(&db, &["item", "extra"]).await;
    assert!(
        reader.stop(),
        "clean stop\n{}",
        tail(&reader.log_text(), 20)
    );
    db.cleanup().await;
}
