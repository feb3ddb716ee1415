//! A quiet database's slot advances while another database is busy (the
//! reader acknowledges keepalive positions when nothing is in flight), so
//! retained WAL stays bounded.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use support::{Reader, TestDb, tail};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_database_slot_advances_while_another_is_busy() {
    let quiet = TestDb::create("quiet", support::CRM_SQL).await;
    let busy = TestDb::create("busy", support::CRM_SQL).await;
    // Slot template: `{name}_slot`, which is what TestDb::slot is.
    let reader = Reader::start_sources(
        &[(&quiet.name, &quiet.cdc_url), (&busy.name, &busy.cdc_url)],
        "{name}_slot",
        &[],
    );
    quiet
        .wait_caught_up(Duration::from_secs(120), Some(&reader.log))
        .await;
    let before = quiet.confirmed_flush().await.unwrap();
    let writer = busy.owner().await;
    for i in 0..50 {
        writer
            .batch_execute(&format!(
                "INSERT INTO interaction (customer_id, buyer_id, interaction_type) SELECT g, {i}, 'view' FROM generate_series(1, 200) g"
            ))
            .await
            .unwrap();
    }
    let busy_end = busy.current_lsn().await;
    assert!(
        busy_end > before + 100_000,
        "the busy database should have written WAL"
    );
    // The quiet slot must move past the busy database's WAL without any write of its own.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = quiet.confirmed_flush().await.unwrap();
        if now >= busy_end {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "quiet slot stuck at {} (busy WAL at {})\n{}",
            cdc_reader::change::lsn_to_string(now),
            cdc_reader::change::lsn_to_string(busy_end),
            tail(&reader.log_text(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(reader);
    quiet.cleanup().await;
    busy.cleanup().await;
}
