//! The sink under broker faults, against librdkafka's in-process mock cluster
//! (three brokers, replicated topics): a partition leader down for several
//! seconds under load, and injected produce errors (retriable and permanent).
//!
//! Each test plays the source's part: transactions of row changes with
//! increasing LSNs, `end_transaction` per commit, and on a failed delivery a
//! fresh tracker that resends from the last confirmed LSN. It then checks:
//! - nothing lost: every change is in Kafka;
//! - per-key order: each key's versions appear in order in its partition
//!   (a resend may repeat a suffix, never reorder);
//! - the confirmed LSN never passes an unacknowledged message: whenever the
//!   confirmed LSN moves to `L`, every record with `source.lsn < L` has
//!   already been acknowledged by Kafka (observed from delivery reports that
//!   run before the tracker counts them).
//!
//! Needs no local stack: the mock cluster runs inside the test process.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cdc_reader::change::{Change, Column, Datum, Lsn, Op, Row, SnapshotMarker, Source, TableName};
use cdc_reader::sink::{Sink, SinkConfig, SinkMetrics, SourceSink};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::watch;

const KEYS: u32 = 200;
const ROWS_PER_TX: u32 = 5;
const PARTITIONS: i32 = 3;

/// Records acknowledged by Kafka, by `source.lsn`, plus an exact check at
/// each delivery report: the confirmed LSN must not already be past it.
#[derive(Default)]
struct Observer {
    acked: Mutex<HashSet<Lsn>>,
    delivered: AtomicUsize,
    /// Confirmed LSN of the current tracker, for the exact check (only set
    /// while no resend can deliver stale copies).
    confirmed: Mutex<Option<watch::Receiver<Lsn>>>,
    violations: Mutex<Vec<String>>,
}

impl SinkMetrics for Observer {
    fn record_acknowledged(&self, _topic: &str, _key: Option<&[u8]>, payload: Option<&[u8]>) {
        let Some(lsn) = payload.and_then(event_lsn) else {
            return;
        };
        if let Ok(guard) = self.confirmed.lock()
            && let Some(rx) = guard.as_ref()
        {
            let confirmed = *rx.borrow();
            if confirmed > lsn {
                push(
                    &self.violations,
                    format!("record lsn {lsn} acknowledged after confirmed {confirmed}"),
                );
            }
        }
        if let Ok(mut acked) = self.acked.lock() {
            acked.insert(lsn);
        }
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }
}

fn push(v: &Mutex<Vec<String>>, s: String) {
    if let Ok(mut v) = v.lock() {
        v.push(s);
    }
}

/// `"lsn":N` inside the `source` block of an event.
fn event_lsn(payload: &[u8]) -> Option<Lsn> {
    let text = std::str::from_utf8(payload).ok()?;
    let start = text.find("\"lsn\":")? + 6;
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

struct Tx {
    end_lsn: Lsn,
    changes: Vec<Change>,
}

/// A stream of transactions: tx `i` has LSNs `i*100 + j`, ends at `i*100+99`;
/// each row bumps its key's version by one.
fn workload(prefix: &str, transactions: u32) -> (Vec<Tx>, u64) {
    let table = Arc::new(TableName {
        prefix: prefix.to_owned(),
        database: "faults".into(),
        schema: "public".into(),
        table: "item".into(),
    });
    let columns: Arc<[Column]> = Arc::from(vec![
        Column {
            name: "id".into(),
            type_oid: 23,
            type_modifier: -1,
            is_key: true,
        },
        Column {
            name: "version".into(),
            type_oid: 20,
            type_modifier: -1,
            is_key: false,
        },
    ]);
    let mut versions = vec![0u64; KEYS as usize];
    let mut txs = Vec::new();
    let mut total = 0;
    for i in 1..=transactions {
        let base = u64::from(i) * 100;
        let mut changes = Vec::new();
        for j in 0..ROWS_PER_TX {
            let key = (i * 7 + j * 31) % KEYS;
            versions[key as usize] += 1;
            let text = |s: String| Datum::Text(Bytes::from(s));
            let after: Row = vec![
                text(key.to_string()),
                text(versions[key as usize].to_string()),
            ];
            changes.push(Change {
                table: table.clone(),
                columns: columns.clone(),
                op: if versions[key as usize] == 1 {
                    Op::Create
                } else {
                    Op::Update
                },
                before: None,
                after: Some(after),
                source: Source {
                    commit_ts_us: 1_700_000_000_000_000,
                    snapshot: SnapshotMarker::No,
                    tx_id: Some(i),
                    lsn: base + u64::from(j),
                    last_commit_lsn: Some(base - 1),
                    commit_lsn: base - 1,
                },
            });
            total += 1;
        }
        txs.push(Tx {
            end_lsn: base + 99,
            changes,
        });
    }
    (txs, total)
}

fn unique_prefix(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("faults-{test}-{}-{nanos}", std::process::id())
}

fn mock_cluster(topic: &str) -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let mock = MockCluster::new(3).expect("mock cluster starts");
    mock.create_topic(topic, PARTITIONS, 3)
        .expect("topic created");
    // One partition led by each broker, so a broker down stalls exactly one.
    for p in 0..PARTITIONS {
        mock.partition_leader(topic, p, Some(p + 1))
            .expect("leader set");
    }
    mock
}

fn sink_for(mock_bootstrap: &str, observer: &Arc<Observer>) -> Sink {
    let mut cfg = SinkConfig::new(mock_bootstrap);
    cfg.topics.create = false; // the mock has no CreateTopics; topics are made above
    cfg.extra.push(("retry.backoff.ms".into(), "50".into()));
    Sink::new(&cfg, observer.clone()).expect("sink created")
}

/// Checks that every sent record with an LSN below the confirmed LSN has
/// been acknowledged, each time the confirmed LSN moves. Runs until the
/// receiver's sender is gone or `done` is set.
fn spawn_checker(
    mut rx: watch::Receiver<Lsn>,
    sent: Arc<Mutex<Vec<Lsn>>>,
    observer: Arc<Observer>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let confirmed = *rx.borrow_and_update();
            let acked = match observer.acked.lock() {
                Ok(a) => a.clone(),
                Err(_) => return,
            };
            let sent = match sent.lock() {
                Ok(s) => s.clone(),
                Err(_) => return,
            };
            for lsn in sent.iter().filter(|&&l| l < confirmed) {
                if !acked.contains(lsn) {
                    push(
                        &observer.violations,
                        format!("confirmed {confirmed} while record lsn {lsn} was unacknowledged"),
                    );
                }
            }
        }
    })
}

/// The source's loop: send every transaction; on a failed delivery take a
/// fresh tracker and resend from the last confirmed LSN. `fault` runs after
/// each transaction (index, elapsed since start) to inject faults.
async fn drive(
    sink: &Sink,
    txs: &[Tx],
    observer: &Arc<Observer>,
    sent: &Arc<Mutex<Vec<Lsn>>>,
    exact_check: bool,
    mut fault: impl FnMut(usize, &SourceSink) -> Option<Duration>,
) -> (Lsn, u32) {
    let last = txs.last().map_or(0, |t| t.end_lsn);
    let mut confirmed: Lsn = 0;
    let mut restarts = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    'restart: loop {
        let mut src = sink.source(&format!("faults-{restarts}"));
        if exact_check && let Ok(mut c) = observer.confirmed.lock() {
            *c = Some(src.confirmed());
        }
        let checker = spawn_checker(src.confirmed(), sent.clone(), observer.clone());
        let start = txs
            .iter()
            .position(|t| t.end_lsn > confirmed)
            .unwrap_or(txs.len());
        for (i, tx) in txs.iter().enumerate().skip(start) {
            for change in &tx.changes {
                if let Ok(mut s) = sent.lock() {
                    s.push(change.source.lsn);
                }
                if let Err(e) = src.send(change).await {
                    eprintln!("send failed ({e}); resending from {confirmed}");
                    confirmed = confirmed.max(*src.confirmed().borrow());
                    restarts += 1;
                    checker.abort();
                    continue 'restart;
                }
            }
            src.end_transaction(tx.end_lsn);
            if let Some(pause) = fault(i, &src) {
                tokio::time::sleep(pause).await;
            }
            if let Some(e) = src.take_fatal() {
                eprintln!("delivery failed ({e}); resending from the last confirmed lsn");
                confirmed = confirmed.max(*src.confirmed().borrow());
                restarts += 1;
                checker.abort();
                continue 'restart;
            }
        }
        // Everything enqueued: wait for the last transaction to be confirmed.
        let mut rx = src.confirmed();
        loop {
            if *rx.borrow_and_update() >= last {
                checker.abort();
                return (last, restarts);
            }
            if let Some(e) = src.take_fatal() {
                eprintln!("delivery failed ({e}); resending from the last confirmed lsn");
                confirmed = confirmed.max(*src.confirmed().borrow());
                restarts += 1;
                checker.abort();
                continue 'restart;
            }
            assert!(
                Instant::now() < deadline,
                "confirmed lsn stuck at {} (want {last}), {} in flight",
                *rx.borrow(),
                src.in_flight()
            );
            let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
        }
    }
}

/// Every record of the topic: (partition, key id, version, lsn), in offset order per partition.
fn consume_all(
    bootstrap: &str,
    topic: &str,
    expected_at_least: usize,
) -> Vec<(i32, u32, u64, Lsn)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{topic}-check"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("consumer created");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition added");
    }
    consumer.assign(&tpl).expect("assigned");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                quiet_since = Instant::now();
                let payload = m.payload().expect("no tombstones in this workload");
                let v: serde_json::Value = serde_json::from_slice(payload).expect("event is JSON");
                let after = &v["after"];
                out.push((
                    m.partition(),
                    after["id"].as_u64().expect("id") as u32,
                    after["version"].as_u64().expect("version"),
                    v["source"]["lsn"].as_u64().expect("lsn"),
                ));
            }
            Some(Err(e)) => panic!("consume failed: {e}"),
            None => {
                // Everything read and nothing more arriving.
                if out.len() >= expected_at_least && quiet_since.elapsed() > Duration::from_secs(1)
                {
                    break;
                }
            }
        }
    }
    out
}

/// Nothing lost and per-key order: for each key, its partition is fixed and
/// its versions 1..=max all appear, each later copy of a version only as part
/// of a resent suffix (never a smaller version after a larger one unless the
/// sequence restarts at a version it already had), and the last is max.
fn check_stream(records: &[(i32, u32, u64, Lsn)], txs: &[Tx], exactly_once: bool) {
    let mut by_key: HashMap<u32, (i32, Vec<u64>)> = HashMap::new();
    for &(partition, key, version, _) in records {
        let entry = by_key.entry(key).or_insert((partition, Vec::new()));
        assert_eq!(entry.0, partition, "key {key} appeared in two partitions");
        entry.1.push(version);
    }
    let lsns: HashSet<Lsn> = records.iter().map(|r| r.3).collect();
    for tx in txs {
        for change in &tx.changes {
            assert!(
                lsns.contains(&change.source.lsn),
                "record lsn {} lost",
                change.source.lsn
            );
        }
    }
    let expected_total: usize = txs.iter().map(|t| t.changes.len()).sum();
    if exactly_once {
        assert_eq!(
            records.len(),
            expected_total,
            "duplicates without any resend"
        );
    }
    for (key, (_, versions)) in &by_key {
        let max = versions.iter().copied().max().unwrap_or(0);
        assert_eq!(
            versions.last().copied(),
            Some(max),
            "key {key}: last version is not the newest"
        );
        for w in versions.windows(2) {
            // In order, or a resend going back to an earlier version.
            let (a, b) = (w[0], w[1]);
            if exactly_once {
                assert_eq!(b, a + 1, "key {key}: version {b} after {a}");
            } else {
                assert!(
                    b == a + 1 || b <= a,
                    "key {key}: version {b} after {a} skips a version"
                );
            }
        }
        assert_eq!(
            versions.first().copied(),
            Some(1),
            "key {key}: first version missing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_leader_down_for_seconds_under_load_loses_nothing() {
    let prefix = unique_prefix("leader");
    let topic = format!("{prefix}.public.item");
    let mock = mock_cluster(&topic);
    let bootstrap = mock.bootstrap_servers();
    let observer = Arc::new(Observer::default());
    let sink = sink_for(&bootstrap, &observer);
    let (txs, total) = workload(&prefix, 3000);
    let sent = Arc::new(Mutex::new(Vec::new()));

    let (down_at, up_at) = (1000usize, 2000usize);
    let mut down_since: Option<Instant> = None;
    let mut stalled_confirmed = None;
    let (_, restarts) = drive(&sink, &txs, &observer, &sent, true, |i, src| {
        if i == down_at {
            mock.broker_down(1).expect("broker down");
            down_since = Some(Instant::now());
        }
        if (down_at..up_at).contains(&i) {
            // Keep producing while the leader is away: ~4 s for this phase.
            return Some(Duration::from_millis(4));
        }
        if i == up_at {
            let since = down_since.map(|d| d.elapsed()).unwrap_or_default();
            assert!(
                since >= Duration::from_secs(3),
                "leader was down only {since:?}"
            );
            stalled_confirmed = Some(*src.confirmed().borrow());
            mock.broker_up(1).expect("broker up");
        }
        None
    })
    .await;

    // While partition 0 had no leader, confirmation stalled before the
    // first transaction that touched it.
    let stalled = stalled_confirmed.expect("fault phase ran");
    assert!(
        stalled < txs[down_at + 5].end_lsn,
        "confirmed {stalled} ran ahead while a partition leader was down"
    );
    assert_eq!(
        restarts, 0,
        "no delivery should fail: the outage is shorter than message.timeout.ms"
    );
    let violations = observer
        .violations
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    assert!(
        violations.is_empty(),
        "confirmed past unacknowledged records: {violations:?}"
    );

    let records = tokio::task::spawn_blocking({
        let (bootstrap, topic) = (bootstrap.clone(), topic.clone());
        move || consume_all(&bootstrap, &topic, total as usize)
    })
    .await
    .expect("consumer task");
    check_stream(&records, &txs, true);
    drop(mock);
}

/// The mock cluster checks idempotent sequence numbers only for
/// transactional producers. With several produce requests in flight, a batch
/// behind a rejected one would be appended out of order (a real broker
/// rejects it with OUT_OF_ORDER_SEQUENCE_NUMBER and librdkafka resends in
/// order). The error-injection tests therefore keep one request in flight
/// per connection, so the mock shows what a real broker would.
fn sink_one_in_flight(mock_bootstrap: &str, observer: &Arc<Observer>) -> Sink {
    let mut cfg = SinkConfig::new(mock_bootstrap);
    cfg.topics.create = false;
    cfg.extra.push(("retry.backoff.ms".into(), "50".into()));
    cfg.extra
        .push(("max.in.flight.requests.per.connection".into(), "1".into()));
    Sink::new(&cfg, observer.clone()).expect("sink created")
}

async fn consume(bootstrap: &str, topic: &str, total: u64) -> Vec<(i32, u32, u64, Lsn)> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || consume_all(&bootstrap, &topic, total as usize))
        .await
        .expect("consumer task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_produce_errors_are_retried_exactly_once_in_order() {
    let prefix = unique_prefix("retriable");
    let topic = format!("{prefix}.public.item");
    let mock = mock_cluster(&topic);
    let bootstrap = mock.bootstrap_servers();
    let observer = Arc::new(Observer::default());
    let sink = sink_one_in_flight(&bootstrap, &observer);
    let (txs, total) = workload(&prefix, 2000);
    let sent = Arc::new(Mutex::new(Vec::new()));

    use RDKafkaRespErr::*;
    let (_, restarts) = drive(&sink, &txs, &observer, &sent, true, |i, _| {
        if i % 300 == 100 {
            mock.request_errors(
                RDKafkaApiKey::Produce,
                &[
                    RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                    RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                    RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                    RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                    RD_KAFKA_RESP_ERR__TRANSPORT,
                    RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
                ],
            );
        }
        (i % 50 == 0).then_some(Duration::from_millis(5))
    })
    .await;

    assert_eq!(restarts, 0, "retriable errors must not fail a delivery");
    let violations = observer
        .violations
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    assert!(
        violations.is_empty(),
        "confirmed past unacknowledged records: {violations:?}"
    );
    let records = consume(&bootstrap, &topic, total).await;
    check_stream(&records, &txs, true);
    drop(mock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_produce_errors_resend_from_confirmed_lsn_losing_nothing() {
    let prefix = unique_prefix("permanent");
    let topic = format!("{prefix}.public.item");
    let mock = mock_cluster(&topic);
    let bootstrap = mock.bootstrap_servers();
    let observer = Arc::new(Observer::default());
    let sink = sink_one_in_flight(&bootstrap, &observer);
    let (txs, total) = workload(&prefix, 2000);
    let sent = Arc::new(Mutex::new(Vec::new()));

    use RDKafkaRespErr::*;
    // Resends pass the same indexes again: inject each fault once.
    let mut injected = HashSet::new();
    let (_, restarts) = drive(&sink, &txs, &observer, &sent, false, |i, _| {
        if (i == 500 || i == 1400) && injected.insert(i) {
            // Permanent: the batch fails; with the gapless guarantee the
            // producer turns fatal and is re-created, and the source resends
            // from its last confirmed LSN.
            mock.request_errors(RDKafkaApiKey::Produce, &[RD_KAFKA_RESP_ERR_INVALID_RECORD]);
        }
        (i % 50 == 0).then_some(Duration::from_millis(5))
    })
    .await;

    let violations = observer
        .violations
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    assert!(
        violations.is_empty(),
        "confirmed past unacknowledged records: {violations:?}"
    );
    assert!(
        restarts >= 2,
        "each permanent error should fail a delivery (restarts: {restarts})"
    );
    assert!(
        sink.producer_generation() >= 1,
        "the fatal producer should have been re-created"
    );
    let records = consume(&bootstrap, &topic, total).await;
    check_stream(&records, &txs, false);
    drop(mock);
}
