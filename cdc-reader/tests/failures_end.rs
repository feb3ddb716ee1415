//! Failures that end: a definite error met while streaming (here a
//! permission the heartbeat needs is revoked) stops the reader with one
//! clear line and a non-zero exit instead of being retried forever.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{Reader, TestDb, tail};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_error_mid_stream_ends_the_reader() {
    let db = TestDb::create(
        "permend",
        "CREATE TABLE item (id int PRIMARY KEY);
         CREATE PUBLICATION instashop_cdc FOR TABLE item;
         GRANT SELECT ON item TO cdc_reader;",
    )
    .await;
    let mut reader = Reader::start(&db, &["--heartbeat-secs", "1"]);
    db.wait_streaming(&reader).await;
    // Function privileges live in each database: this one only.
    db.admin_here()
        .await
        .batch_execute(
            "REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) FROM PUBLIC",
        )
        .await
        .unwrap();
    let (ok, log) = reader.wait_exit(Duration::from_secs(60));
    assert!(!ok, "non-zero exit");
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{}", tail(&log, 30));
    for needle in ["heartbeat", "permission denied"] {
        assert!(
            errors[0].contains(needle),
            "{:?} lacks {needle:?}",
            errors[0]
        );
    }
    db.cleanup().await;
}
