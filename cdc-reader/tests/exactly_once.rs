//! `--exactly-once true`: a `read_committed` consumer sees every change
//! once, through kill -9 of the reader under load; a second reader on the
//! same slot is refused, and a reader whose Kafka transactions were taken
//! over is fenced with one line; a checkpoint is found behind another
//! source's open transaction. (The full acceptance run with Postgres and
//! broker restarts is `scripts/chaos-eos`.)
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cdc_reader::change::{Change, Column, Datum, Op, SnapshotMarker, Source, TableName};
use cdc_reader::exactly_once::{ExactlyOnce, transactional_id};
use cdc_reader::sink::{NoMetrics, Sink, SinkConfig, SourceSink};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use support::{Event, Reader, SHOP_TABLES, TestDb, shop_batch_sql, shop_load};
use tokio_util::sync::CancellationToken;

const EXACTLY_ONCE: [&str; 2] = ["--exactly-once", "true"];

/// Every event of `topics` as a `read_committed` consumer sees it, from the
/// beginning to the high watermarks at start (the last offsets may be commit
/// markers, so a partition is done when the position passes its watermark).
fn consume_committed(topics: &[String]) -> Vec<Event> {
    // The watermarks come from a read_uncommitted client: a read_committed
    // one is answered the last stable offset, which stays behind a
    // transaction whose commit markers are still being written after the
    // producer's commit returned, and would leave its partition out.
    let watermarks: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", support::kafka_bootstrap())
        .set("group.id", support::unique("eos-watermarks"))
        .set("isolation.level", "read_uncommitted")
        .create()
        .unwrap();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", support::kafka_bootstrap())
        .set("group.id", support::unique("eos-replay"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    for topic in topics {
        let Ok(md) = watermarks.fetch_metadata(Some(topic), Duration::from_secs(10)) else {
            continue;
        };
        for t in md.topics().iter().filter(|t| t.error().is_none()) {
            for p in t.partitions() {
                let (low, high) = watermarks
                    .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                    .unwrap();
                if high > low {
                    ends.insert((topic.clone(), p.id()), high);
                    tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                        .unwrap();
                }
            }
        }
    }
    let mut events = Vec::new();
    if ends.is_empty() {
        return events;
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let positions = consumer.position().unwrap();
        let done = ends.iter().all(|((topic, p), end)| {
            positions
                .find_partition(topic, *p)
                .and_then(|e| e.offset().to_raw())
                .is_some_and(|pos| pos >= *end)
        });
        if done {
            return events;
        }
        assert!(Instant::now() < deadline, "read_committed replay stalled");
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg.unwrap();
        events.push(Event {
            topic: msg.topic().to_owned(),
            partition: msg.partition(),
            key: msg
                .key()
                .map(|k| serde_json::from_slice::<Value>(k).unwrap().to_string())
                .unwrap_or_else(|| "null".to_owned()),
            value: msg
                .payload()
                .map(|v| serde_json::from_slice::<Value>(v).unwrap()),
        });
    }
}

/// Events seen more than once: same topic, key, `source.lsn` and `op`.
fn duplicates(events: &[Event]) -> usize {
    let mut seen = HashSet::new();
    events
        .iter()
        .filter_map(|e| e.value.as_ref().map(|v| (e, v)))
        .filter(|(e, v)| {
            let id = (
                e.topic.clone(),
                e.key.clone(),
                v["source"]["lsn"].to_string(),
                v["op"].to_string(),
            );
            !seen.insert(id)
        })
        .count()
}

/// The committed replay of the shop tables equals the database.
async fn assert_committed_replay_equals_db(db: &TestDb, events: &[Event]) {
    let mut tables = support::Tables::new();
    for e in events {
        support::apply_one(&mut tables, e);
    }
    let client = db.owner().await;
    for table in SHOP_TABLES {
        let expected = support::db_rows(&client, table).await;
        let got: BTreeMap<String, Value> = tables
            .get(&support::topic(db, table))
            .map(|rows| {
                rows.iter()
                    .map(|(k, (_, r))| (k.clone(), r.clone()))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            got == expected,
            "read_committed replay of {table}: {} rows, table {} rows",
            got.len(),
            expected.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_writes_every_change_once() {
    let db = TestDb::create("eoskill", support::INSTASHOP_SQL).await;
    db.owner()
        .await
        .batch_execute(&shop_batch_sql(200))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let load = tokio::spawn(shop_load(db.owner_url.clone(), 30, stop.clone()));
    let mut next = support::random_below();
    let mut reader = Reader::start(&db, &EXACTLY_ONCE);
    db.wait_streaming(&reader).await;
    let kills = 5;
    for i in 0..kills {
        // Wait for the session to commit something, then kill at a random
        // moment: mid-transaction, mid-commit, or while starting up.
        let wait = 300 + next(1500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        reader.kill9();
        println!("kill {i} after {wait} ms");
        reader = Reader::start(&db, &EXACTLY_ONCE);
    }
    stop.cancel();
    let batches = load.await.unwrap();
    assert!(batches >= 5, "load wrote only {batches} batches");
    db.wait_caught_up(Duration::from_secs(300), Some(&reader.log))
        .await;
    let topics: Vec<String> = SHOP_TABLES.iter().map(|t| support::topic(&db, t)).collect();
    let events = tokio::task::spawn_blocking(move || consume_committed(&topics))
        .await
        .unwrap();
    let dups = duplicates(&events);
    println!("{} events read_committed, {dups} duplicates", events.len());
    assert_eq!(
        dups,
        0,
        "duplicates seen read_committed; reader log:\n{}",
        support::tail(&reader.log_text(), 20)
    );
    assert_committed_replay_equals_db(&db, &events).await;
    assert!(reader.stop());
    db.cleanup().await;
}

/// A second reader on a running reader's slot never gets to Kafka: Postgres
/// refuses it the slot, and it ends with one line; the first goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_reader_on_the_slot_is_refused() {
    let db = TestDb::create(
        "eossecond",
        "CREATE TABLE item (id bigint PRIMARY KEY, note text NOT NULL);
         CREATE PUBLICATION instashop_cdc FOR TABLE item;
         GRANT SELECT ON item TO cdc_reader;
         INSERT INTO item VALUES (1, 'one');",
    )
    .await;
    let mut first = Reader::start(&db, &EXACTLY_ONCE);
    db.wait_streaming(&first).await;
    let mut second = Reader::start(&db, &EXACTLY_ONCE);
    let (ok, log) = second.wait_exit(Duration::from_secs(60));
    assert!(!ok, "the second reader must fail");
    let line = log
        .lines()
        .find(|l| l.contains("error"))
        .unwrap_or_default()
        .to_owned();
    assert!(line.contains("in use by another reader"), "{log}");
    assert!(!log.contains("kafka transactions ready"), "{log}");
    db.owner()
        .await
        .batch_execute("INSERT INTO item VALUES (2, 'two')")
        .await
        .unwrap();
    db.wait_caught_up(Duration::from_secs(60), Some(&first.log))
        .await;
    assert!(
        first.child.try_wait().unwrap().is_none(),
        "first reader died"
    );
    let topic = support::topic(&db, "item");
    let events = tokio::task::spawn_blocking(move || consume_committed(&[topic]))
        .await
        .unwrap();
    // Change events only (the snapshot's end marker has no value).
    let changes = events.iter().filter(|e| e.value.is_some()).count();
    assert_eq!(changes, 2, "each row once: {events:?}");
    assert!(first.stop());
    db.cleanup().await;
}

fn change(prefix: &str, id: u32, lsn: u64) -> Change {
    Change {
        table: Arc::new(TableName {
            prefix: prefix.to_owned(),
            database: prefix.to_owned(),
            schema: "public".to_owned(),
            table: "item".to_owned(),
        }),
        columns: Arc::from(vec![Column {
            name: "id".to_owned(),
            type_oid: 20,
            type_modifier: -1,
            is_key: true,
        }]),
        op: Op::Create,
        before: None,
        after: Some(vec![Datum::Text(Bytes::from(id.to_string()))]),
        source: Source {
            commit_ts_us: 0,
            snapshot: SnapshotMarker::No,
            tx_id: Some(id),
            lsn,
            last_commit_lsn: None,
            commit_lsn: lsn,
        },
    }
}

/// Two writers with one `transactional.id` (a reader that lost its slot to
/// another without noticing): the newer one fences the older, whose next
/// commit fails with one line naming the slot; only the newer one's write
/// is visible to `read_committed` consumers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_whose_transactions_were_taken_over_is_fenced() {
    let prefix = support::unique("eosfence");
    let slot = format!("{prefix}_slot");
    let sink = eos_sink(&prefix, None);
    let mut old = sink.source(&prefix);
    old.open().await.unwrap();
    old.send(&change(&prefix, 1, 100)).await.unwrap();
    old.end_transaction(110);
    old.commit().await.unwrap();

    let mut new = sink.source(&prefix);
    new.open().await.unwrap();
    // The old writer goes on as if nothing happened.
    let old_result = async {
        old.send(&change(&prefix, 2, 200)).await?;
        old.end_transaction(210);
        old.commit().await
    }
    .await;
    let err = old_result.expect_err("the old writer must be fenced");
    let line = err.to_string();
    assert!(!err.is_retryable(), "{line}");
    assert!(line.contains("fenced") && line.contains(&slot), "{line}");
    assert!(!line.contains('\n'), "{line}");
    // The new writer resumes after the old one's committed checkpoint.
    resume_and_check(&mut new, &prefix).await;
}

/// A writer resuming after a checkpoint that covers change 1 (at LSN 100):
/// writes changes 1 (dropped) and 2, and checks that `read_committed`
/// consumers see each once.
async fn resume_and_check(writer: &mut SourceSink, prefix: &str) {
    writer.send(&change(prefix, 1, 100)).await.unwrap();
    writer.end_transaction(110);
    writer.send(&change(prefix, 2, 200)).await.unwrap();
    writer.end_transaction(210);
    writer.commit().await.unwrap();
    assert_eq!(*writer.confirmed().borrow(), 210);
    let topic = format!("{prefix}.public.item");
    let events = tokio::task::spawn_blocking(move || consume_committed(&[topic]))
        .await
        .unwrap();
    // Keys 1 and 2 may sit in different partitions: compare as a set.
    let mut ids: Vec<String> = events
        .iter()
        .filter_map(|e| e.value.as_ref().map(|v| v["after"]["id"].to_string()))
        .collect();
    ids.sort();
    assert_eq!(ids, ["1", "2"], "each change once");
}

/// A sink writing source `prefix` exactly once, its checkpoints in
/// `checkpoints` (the default topic when `None`).
fn eos_sink(prefix: &str, checkpoints: Option<String>) -> Sink {
    let slot = format!("{prefix}_slot");
    let mut cfg = SinkConfig::new(support::kafka_bootstrap());
    let mut eos = ExactlyOnce::default();
    if let Some(topic) = checkpoints {
        eos.checkpoint_topic = topic;
    }
    eos.sources.insert(
        prefix.to_owned(),
        (slot.clone(), transactional_id(prefix, &slot)),
    );
    cfg.exactly_once = Some(eos);
    Sink::new(&cfg, Arc::new(NoMetrics)).unwrap()
}

/// The checkpoint topic is shared by every source: while another source's
/// Kafka transaction is open on it below this source's newest checkpoint,
/// a restarted writer waits for that transaction instead of stopping at
/// the last stable offset with an older checkpoint (and writing again what
/// the newest one covers: CI's chaos-eos found such duplicates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_behind_another_sources_open_transaction_is_read() {
    let prefix = support::unique("eosshared");
    let checkpoints = format!("{prefix}.checkpoints");
    let sink = eos_sink(&prefix, Some(checkpoints.clone()));
    let mut first = sink.source(&prefix);
    first.open().await.unwrap();

    // Another source writes its checkpoint and has not committed yet.
    let other: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", support::kafka_bootstrap())
        .set("transactional.id", format!("{prefix}.other"))
        .create()
        .unwrap();
    let other = tokio::task::spawn_blocking(move || {
        other.init_transactions(Duration::from_secs(30)).unwrap();
        other.begin_transaction().unwrap();
        other
            .send(
                BaseRecord::to(&checkpoints)
                    .partition(0)
                    .key("other")
                    .payload("{}"),
            )
            .map_err(|(e, _)| e)
            .unwrap();
        other.flush(Duration::from_secs(30)).unwrap();
        other
    })
    .await
    .unwrap();

    first.send(&change(&prefix, 1, 100)).await.unwrap();
    first.end_transaction(110);
    first.commit().await.unwrap();

    // The reader restarts while the other transaction is open. The fixed
    // reader cannot finish its checkpoint read before that transaction
    // ends, so it is held open for 3 s (the condition under test, not a
    // wait for readiness) and then aborted; the old reader stopped at the
    // open transaction at once, with the older checkpoint.
    let abort = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_secs(3));
        other.abort_transaction(Duration::from_secs(30))
    });
    let mut second = sink.source(&prefix);
    second.open().await.unwrap();
    abort.await.unwrap().unwrap();
    resume_and_check(&mut second, &prefix).await;
}
