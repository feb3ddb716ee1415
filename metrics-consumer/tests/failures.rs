//! Failures that end: a definite error stops the consumer with one error and
//! nothing applied; a transient one (Redis unreachable) is retried, but a
//! clean stop still ends within `--shutdown-timeout-secs`. Kafka is a
//! librdkafka mock cluster (in process); Redis is the local stack's, reached
//! directly or through a proxy the test can cut.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use metrics_consumer::Error;
use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "instashop.public.transaction";

fn tx_event(id: i64, lsn: u64) -> String {
    format!(
        r#"{{"before":null,"after":{{"id":{id},"total_amount":"12.50","status":"completed","created_at":"2026-11-22T10:00:15Z"}},"source":{{"db":"instashop","table":"transaction","ts_ms":1795000000000,"lsn":{lsn},"commit_lsn":{lsn}}},"op":"c"}}"#
    )
}

async fn produce_to(bootstrap: &str, topic: &str, events: &[(i64, String)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    for (id, value) in events {
        let key = format!(r#"{{"id":{id}}}"#);
        producer
            .send(
                FutureRecord::to(topic).key(&key).payload(value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

fn mock_config(bootstrap: &str, redis: &str, prefix: &str) -> metrics_consumer::Config {
    use clap::Parser;
    metrics_consumer::Config::parse_from([
        "metrics-consumer",
        "--bootstrap-servers",
        bootstrap,
        "--redis-url",
        redis,
        "--group",
        &unique("mctest-failures-"),
        "--prefix",
        prefix,
        "--topics",
        TOPIC,
        "--dlq-topic",
        "dlq",
        "--metrics-addr",
        "127.0.0.1:0",
        "--session-timeout-ms",
        "6000",
    ])
}

fn redis_con(s: &Stack) -> redis::Connection {
    redis::Client::open(s.redis.as_str())
        .unwrap()
        .get_connection()
        .unwrap()
}

fn stored_offsets(s: &Stack, prefix: &str) -> std::collections::BTreeMap<String, i64> {
    redis::cmd("HGETALL")
        .arg(format!("{prefix}offsets"))
        .query(&mut redis_con(s))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definite_redis_error_stops_the_consumer_and_applies_nothing() {
    let s = stack();
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic(TOPIC, 1, 1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    produce_to(&bootstrap, TOPIC, &[(1, tx_event(1, 10))]).await;
    let prefix = format!("{}:", unique("mctest:definite:"));
    // A key the consumer owns holds a value of another type: every apply
    // fails the same way (WRONGTYPE), retrying cannot help.
    redis::cmd("SET")
        .arg(format!("{prefix}rows:instashop.transaction"))
        .arg("not a hash")
        .query::<()>(&mut redis_con(&s))
        .unwrap();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(metrics_consumer::run(
        mock_config(&bootstrap, &s.redis, &prefix),
        shutdown.clone(),
    ));
    let result = tokio::time::timeout(Duration::from_secs(60), run).await;
    shutdown.cancel();
    let result = result
        .expect("the consumer kept retrying a definite error for 60 s")
        .unwrap();
    match result {
        Err(Error::RedisRejected(e)) => {
            assert!(e.to_string().contains("WRONGTYPE"), "{e}");
        }
        other => panic!("expected a definite redis error, got {other:?}"),
    }
    assert!(stored_offsets(&s, &prefix).is_empty());
    cleanup_redis(&s, &prefix);
}

/// A TCP proxy to the local Redis that the test can cut: open connections
/// are dropped and new ones refused.
struct Proxy {
    url: String,
    cut: CancellationToken,
}

async fn redis_proxy(s: &Stack) -> Proxy {
    let target = s
        .redis
        .strip_prefix("redis://")
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned();
    let db = s.redis.rsplit('/').next().unwrap_or("0").to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}/{db}", listener.local_addr().unwrap());
    let cut = CancellationToken::new();
    let stop = cut.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((mut client, _)) = accepted else {
                continue;
            };
            let target = target.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(&target).await else {
                    return;
                };
                tokio::select! {
                    () = stop.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                }
            });
        }
    });
    Proxy { url, cut }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_at_shutdown_ends_within_the_shutdown_timeout() {
    let s = stack();
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic(TOPIC, 1, 1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    produce_to(&bootstrap, TOPIC, &[(1, tx_event(1, 10))]).await;
    let prefix = format!("{}:", unique("mctest:transient:"));
    let proxy = redis_proxy(&s).await;
    let mut config = mock_config(&bootstrap, &proxy.url, &prefix);
    config.shutdown_timeout_secs = 2;
    let shutdown = CancellationToken::new();
    let mut run = tokio::spawn(metrics_consumer::run(config, shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored_offsets(&s, &prefix).get(&format!("{TOPIC}/0")) != Some(&1) {
        assert!(
            Instant::now() < deadline,
            "the first event was never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Redis goes away; the next batch cannot be applied and is retried.
    proxy.cut.cancel();
    produce_to(&bootstrap, TOPIC, &[(2, tx_event(2, 20))]).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(3), &mut run)
            .await
            .is_err(),
        "a transient failure must be retried, not end the consumer"
    );
    let asked = Instant::now();
    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the consumer ignored the shutdown timeout while redis was unreachable")
        .unwrap();
    assert!(
        asked.elapsed() >= Duration::from_secs(2),
        "gave up before the timeout"
    );
    assert!(
        matches!(result, Err(Error::ShutdownTimeout { secs: 2 })),
        "{result:?}"
    );
    assert_eq!(
        stored_offsets(&s, &prefix).get(&format!("{TOPIC}/0")),
        Some(&1)
    );
    cleanup_redis(&s, &prefix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_cannot_be_written_stops_the_consumer_before_its_offset() {
    let s = stack();
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic(TOPIC, 1, 1).unwrap();
    mock.create_topic("dlq", 1, 1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    produce_to(
        &bootstrap,
        TOPIC,
        &[
            (1, tx_event(1, 10)),
            (2, "not json".to_owned()),
            (3, tx_event(3, 30)),
        ],
    )
    .await;
    // Every write to the dead-letter topic fails for good from now on.
    mock.request_errors(
        rdkafka::types::RDKafkaApiKey::Produce,
        &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 50],
    );
    let prefix = format!("{}:", unique("mctest:dlq:"));
    let shutdown = CancellationToken::new();
    let mut run = tokio::spawn(metrics_consumer::run(
        mock_config(&bootstrap, &s.redis, &prefix),
        shutdown.clone(),
    ));
    let field = format!("{TOPIC}/0");
    let deadline = Instant::now() + Duration::from_secs(90);
    let result = loop {
        if let Ok(done) = tokio::time::timeout(Duration::from_millis(200), &mut run).await {
            break done.unwrap();
        }
        let next = stored_offsets(&s, &prefix)
            .get(&field)
            .copied()
            .unwrap_or(0);
        assert!(
            next <= 1,
            "offset {next} stored: the bad message's offset was applied although its dead letter was not written"
        );
        assert!(
            Instant::now() < deadline,
            "the consumer neither stopped nor applied within 90 s"
        );
    };
    shutdown.cancel();
    match result {
        Err(Error::DeadLetter { topic, source }) => {
            assert_eq!(topic, "dlq");
            assert!(source.to_string().contains("uthoriz"), "{source}");
        }
        other => panic!("expected a dead-letter error, got {other:?}"),
    }
    assert!(
        stored_offsets(&s, &prefix)
            .get(&field)
            .copied()
            .unwrap_or(0)
            <= 1
    );
    cleanup_redis(&s, &prefix);
}
