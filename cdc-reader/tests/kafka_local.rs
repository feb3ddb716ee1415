//! The sink against the local stack's real brokers (three Apache Kafka nodes,
//! `KAFKA_BOOTSTRAP_SERVERS` from `.local/env`): CreateTopics for a missing
//! topic, then idempotent `acks=all` produce of many transactions, every
//! transaction confirmed, and every record in Kafka exactly once in per-key
//! order; with transaction metadata on, BEGIN/END records with event counts
//! on `<prefix>.transaction`. Topics get unique names and are never deleted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cdc_reader::change::{Change, Column, Datum, Op, SnapshotMarker, Source, TableName};
use cdc_reader::sink::{NoMetrics, Sink, SinkConfig};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

fn bootstrap() -> String {
    local_stack::envfile::load();
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| {
        panic!("KAFKA_BOOTSTRAP_SERVERS is not set: the local stack is not up (run scripts/up)")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_topic_and_produces_idempotently_with_acks_all() {
    let bootstrap = bootstrap();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let prefix = format!("sinktest{}x{nanos}", std::process::id());
    let table = Arc::new(TableName {
        prefix: prefix.clone(),
        database: "sinktest".into(),
        schema: "public".into(),
        table: "item".into(),
    });
    let topic = table.topic();
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

    let cfg = SinkConfig::new(bootstrap.clone());
    let sink = Sink::new(&cfg, Arc::new(NoMetrics)).expect("sink created");
    let mut src = sink.source("sinktest");
    let (transactions, rows, keys) = (500u64, 4u64, 50u64);
    let mut versions = vec![0u64; keys as usize];
    for i in 1..=transactions {
        for j in 0..rows {
            let key = (i * 7 + j * 13) % keys;
            versions[key as usize] += 1;
            let text = |s: String| Datum::Text(Bytes::from(s));
            let change = Change {
                table: table.clone(),
                columns: columns.clone(),
                op: Op::Update,
                before: None,
                after: Some(vec![
                    text(key.to_string()),
                    text(versions[key as usize].to_string()),
                ]),
                source: Source {
                    commit_ts_us: 1_700_000_000_000_000,
                    snapshot: SnapshotMarker::No,
                    tx_id: Some(i as u32),
                    lsn: i * 100 + j,
                    last_commit_lsn: Some(i * 100 - 1),
                    commit_lsn: i * 100 - 1,
                },
            };
            src.send(&change).await.expect("enqueued");
        }
        src.end_transaction(i * 100 + 99);
    }
    let last = transactions * 100 + 99;
    let mut confirmed = src.confirmed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while *confirmed.borrow_and_update() < last {
        if let Some(e) = src.take_fatal() {
            panic!("delivery failed on the local brokers: {e}");
        }
        assert!(
            Instant::now() < deadline,
            "confirmed lsn stuck at {} of {last} ({} in flight)",
            *confirmed.borrow(),
            src.in_flight()
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), confirmed.changed()).await;
    }
    assert_eq!(src.in_flight(), 0);

    let expected = (transactions * rows) as usize;
    let records = tokio::task::spawn_blocking({
        let (bootstrap, topic) = (bootstrap.clone(), topic.clone());
        move || read_topic(&bootstrap, &topic, expected)
    })
    .await
    .expect("consumer task");
    assert_eq!(records.len(), expected, "every record exactly once");
    let mut per_key: HashMap<u64, (i32, u64)> = HashMap::new();
    for (partition, key, version) in records {
        let entry = per_key.entry(key).or_insert((partition, 0));
        assert_eq!(entry.0, partition, "key {key} in two partitions");
        assert_eq!(
            version,
            entry.1 + 1,
            "key {key}: version {version} after {}",
            entry.1
        );
        entry.1 = version;
    }
}

/// (partition, id, version) of every record, per partition in offset order;
/// also checks the topic was created with 3 partitions.
fn read_topic(bootstrap: &str, topic: &str, expected: usize) -> Vec<(i32, u64, u64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{topic}-check"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .expect("consumer created");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len());
    assert_eq!(partitions, 3, "CreateTopics made 3 partitions");
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition added");
    }
    consumer.assign(&tpl).expect("assigned");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                quiet = Instant::now();
                let v: serde_json::Value =
                    serde_json::from_slice(m.payload().expect("payload")).expect("JSON");
                out.push((
                    m.partition(),
                    v["after"]["id"].as_u64().expect("id"),
                    v["after"]["version"].as_u64().expect("version"),
                ));
            }
            Some(Err(e)) => panic!("consume failed: {e}"),
            None if out.len() >= expected && quiet.elapsed() > Duration::from_secs(2) => break,
            None => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_metadata_begin_end_records_reach_kafka() {
    let bootstrap = bootstrap();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let prefix = format!("sinktx{}x{nanos}", std::process::id());
    let table = Arc::new(TableName {
        prefix: prefix.clone(),
        database: "sinktx".into(),
        schema: "public".into(),
        table: "item".into(),
    });
    let columns: Arc<[Column]> = Arc::from(vec![Column {
        name: "id".into(),
        type_oid: 23,
        type_modifier: -1,
        is_key: true,
    }]);
    let mut cfg = SinkConfig::new(bootstrap.clone());
    cfg.envelope.transaction_metadata = true;
    let sink = Sink::new(&cfg, Arc::new(NoMetrics)).expect("sink created");
    let mut src = sink.source("sinktx");
    for tx in 1..=3u64 {
        for row in 0..2u64 {
            let change = Change {
                table: table.clone(),
                columns: columns.clone(),
                op: Op::Create,
                before: None,
                after: Some(vec![Datum::Text(Bytes::from((tx * 10 + row).to_string()))]),
                source: Source {
                    commit_ts_us: 1_700_000_000_000_000,
                    snapshot: SnapshotMarker::No,
                    tx_id: Some(tx as u32),
                    lsn: tx * 100 + row,
                    last_commit_lsn: Some(tx * 100 - 1),
                    commit_lsn: tx * 100 - 1,
                },
            };
            src.send(&change).await.expect("enqueued");
        }
        src.end_transaction(tx * 100 + 99);
    }
    let mut confirmed = src.confirmed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while *confirmed.borrow_and_update() < 399 {
        if let Some(e) = src.take_fatal() {
            panic!("delivery failed on the local brokers: {e}");
        }
        assert!(Instant::now() < deadline, "transactions not confirmed");
        let _ = tokio::time::timeout(Duration::from_millis(200), confirmed.changed()).await;
    }

    let tx_topic = format!("{prefix}.transaction");
    let records = tokio::task::spawn_blocking({
        let bootstrap = bootstrap.clone();
        move || read_json(&bootstrap, &tx_topic, 6)
    })
    .await
    .expect("consumer task");
    let mut statuses: Vec<(String, String, Option<u64>)> = records
        .iter()
        .map(|v| {
            (
                v["id"].as_str().unwrap_or_default().to_owned(),
                v["status"].as_str().unwrap_or_default().to_owned(),
                v["event_count"].as_u64(),
            )
        })
        .collect();
    statuses.sort();
    assert_eq!(
        statuses,
        vec![
            ("1:100".into(), "BEGIN".into(), None),
            ("1:100".into(), "END".into(), Some(2)),
            ("2:200".into(), "BEGIN".into(), None),
            ("2:200".into(), "END".into(), Some(2)),
            ("3:300".into(), "BEGIN".into(), None),
            ("3:300".into(), "END".into(), Some(2)),
        ]
    );
}

/// Every record value of `topic` as JSON (all partitions, from the start).
fn read_json(bootstrap: &str, topic: &str, expected: usize) -> Vec<serde_json::Value> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{topic}-check"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .expect("consumer created");
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition added");
    }
    consumer.assign(&tpl).expect("assigned");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                quiet = Instant::now();
                out.push(serde_json::from_slice(m.payload().expect("payload")).expect("JSON"));
            }
            Some(Err(e)) => panic!("consume failed: {e}"),
            None if out.len() >= expected && quiet.elapsed() > Duration::from_secs(2) => break,
            None => {}
        }
    }
    out
}
