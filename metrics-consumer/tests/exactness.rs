//! Against the real local stack (Redis + brokers + PostgreSQL): hand-made
//! Debezium events go to unique topics, the consumer applies them under a
//! unique Redis prefix and group, and every metric must equal the README's SQL
//! definition run on the same final rows in a scratch database.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use rand::{RngExt, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 3;

/// Stops an in-process consumer when the test ends, also on a failed assert
/// (else the runtime would wait for the consumer thread forever).
struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

async fn setup(name: &str) -> (Stack, Topics, String, String, String) {
    let s = stack();
    let topics = Topics {
        base: unique(&format!("mctest.{name}.")),
    };
    let dlq = format!("{}.dlq", topics.base);
    create_topics(&s.kafka, &topics.all(), PARTITIONS).await;
    create_topics(&s.kafka, std::slice::from_ref(&dlq), 1).await;
    let prefix = format!("{}:", unique(&format!("mctest:{name}:")));
    let group = unique(&format!("mctest-{name}-"));
    (s, topics, prefix, group, dlq)
}

async fn caught_up(s: &Stack, prefix: &str, topics: &Topics, secs: u64) {
    let (kafka, redis) = (s.kafka.clone(), s.redis.clone());
    let prefix = prefix.to_owned();
    let topics = topics.all();
    tokio::task::spawn_blocking(move || {
        let s = Stack {
            kafka,
            redis,
            pg_admin: String::new(),
        };
        wait_caught_up(&s, &prefix, &topics, PARTITIONS, Duration::from_secs(secs));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_snapshot_tombstones_and_malformed_messages_stay_exact() {
    let (s, topics, prefix, group, dlq) = setup("replay").await;
    let producer = producer(&s.kafka);
    let mut model = Model::new(7, topics.clone());
    let first = model.step(3000);
    let bad = model.malformed();
    let mut all = first.clone();
    all.extend(bad.iter().cloned());
    // The reader re-sends the second half after its crash, then re-snapshots.
    all.extend(first[first.len() / 2..].iter().cloned());
    all.extend(model.snapshot());
    all.extend(model.step(1000));
    produce(&producer, &all).await;

    let shutdown = CancellationToken::new();
    let _stop = StopOnDrop(shutdown.clone());
    let run = tokio::spawn(metrics_consumer::run(
        config(&s, &topics, &prefix, &group, &dlq),
        shutdown.clone(),
    ));
    caught_up(&s, &prefix, &topics, 300).await;
    assert_exact(&s, &prefix, &model).await;

    let pipeline = pipeline_hash(&s, &prefix);
    assert_eq!(
        pipeline.get("bad_messages"),
        Some(&(bad.len() as i64)),
        "{pipeline:?}"
    );
    assert!(
        pipeline.get("duplicates_skipped").copied().unwrap_or(0) >= (first.len() / 2) as i64 / 2,
        "{pipeline:?}"
    );
    assert!(pipeline.contains_key("last_source_ts_ms"), "{pipeline:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while topic_count(&s.kafka, &dlq, 1) < bad.len() as i64 {
        assert!(
            std::time::Instant::now() < deadline,
            "dead-letter topic did not receive {} messages",
            bad.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The dashboard summary catches up within a few seconds of being idle.
    let mut con = redis::Client::open(s.redis.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let count: i64 = redis::cmd("GET")
        .arg(format!("{prefix}count:instashop.transaction"))
        .query(&mut con)
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let dashboard: String = redis::cmd("GET")
            .arg(format!("{prefix}dashboard"))
            .query(&mut con)
            .unwrap();
        let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
        if dashboard["counts"]["instashop.transaction"].as_i64() == Some(count) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dashboard stale: {dashboard} (count {count})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    shutdown.cancel();
    run.await.unwrap().unwrap();

    // A new group has no committed offsets: Redis's offsets are the truth, so
    // nothing is applied twice; a full replay of every event changes nothing.
    produce(&producer, &all).await;
    let shutdown = CancellationToken::new();
    let _stop_b = StopOnDrop(shutdown.clone());
    let run = tokio::spawn(metrics_consumer::run(
        config(&s, &topics, &prefix, &format!("{group}-b"), &dlq),
        shutdown.clone(),
    ));
    caught_up(&s, &prefix, &topics, 300).await;
    assert_exact(&s, &prefix, &model).await;
    shutdown.cancel();
    run.await.unwrap().unwrap();
    cleanup_redis(&s, &prefix);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[allow(clippy::too_many_arguments)]
fn spawn_binary(
    s: &Stack,
    topics: &Topics,
    prefix: &str,
    group: &str,
    dlq: &str,
    port: u16,
    log: &str,
    instance_id: &str,
) -> tokio::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_metrics-consumer"))
        .env("KAFKA_BOOTSTRAP_SERVERS", &s.kafka)
        .env("REDIS_URL", &s.redis)
        .env("RUST_LOG", "info")
        .args([
            "--group",
            group,
            "--prefix",
            prefix,
            "--dlq-topic",
            dlq,
            "--batch-size",
            "2000",
        ])
        .args(["--topics", &topics.all().join(",")])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(["--instance-id", instance_id])
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn sigterm(child: &mut tokio::process::Child) {
    let pid = child.id().unwrap();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "consumer exited with {status} after SIGTERM"
    );
}

async fn http_get(port: u16, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

async fn wait_http(port: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "consumer http on port {port} never came up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `/health` until it answers 200 (the consume loop runs and Redis
/// accepts batches), with a deadline.
async fn wait_healthy(port: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let health = http_get(port, "/health").await;
        if health.contains("200 OK") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "consumer on port {port} not healthy within 30 s: {health}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn events_applied(s: &Stack, prefix: &str) -> i64 {
    pipeline_hash(s, prefix)
        .get("events_applied")
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_under_load_stays_exact() {
    const KILLS: usize = 12;
    let (s, topics, prefix, group, dlq) = setup("kill").await;
    let log = std::env::temp_dir().join(format!("{}.log", topics.base));
    let log = log.to_str().unwrap().to_owned();
    // The load: a chunk of events every 1.5 s until the kills are done (and
    // at least 21 chunks, for the malformed messages and the snapshot).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let kafka = s.kafka.clone();
    let load_stop = std::sync::Arc::clone(&stop);
    let load_topics = topics.clone();
    let load = tokio::spawn(async move {
        let mut model = Model::new(11, load_topics);
        let producer = producer(&kafka);
        let mut total = 0;
        let mut i = 0;
        while i <= 20 || !load_stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut chunk = model.step(400);
            if i == 10 {
                chunk.extend(model.malformed());
            }
            if i == 20 {
                chunk.extend(model.snapshot());
            }
            total += chunk.len();
            produce(&producer, &chunk).await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            i += 1;
        }
        (model, total)
    });

    // Static membership (one fixed group.instance.id): each restarted
    // process takes the partitions back from its killed predecessor at once,
    // instead of waiting for that member's session to time out. Every kill
    // must hit a process that holds partitions: it is killed only after the
    // events applied (counted in Redis, atomically with the metrics) grew
    // since its start, i.e. it applied batches itself, the one before it
    // being dead.
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let mut kills = 0;
    while kills < KILLS {
        let before = events_applied(&s, &prefix);
        let port = free_port();
        let mut child = spawn_binary(
            &s,
            &topics,
            &prefix,
            &group,
            &dlq,
            port,
            &log,
            "kill-slot-0",
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while events_applied(&s, &prefix) <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "restart {} applied nothing within 60 s; see {log}",
                kills + 1
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Then a random moment while it works through the load.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..2500))).await;
        child.start_kill().unwrap(); // SIGKILL
        child.wait().await.unwrap();
        kills += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (model, total) = load.await.unwrap();
    let assigned = std::fs::read_to_string(&log)
        .unwrap()
        .matches("partitions assigned")
        .count();
    assert!(
        assigned >= KILLS,
        "only {assigned} of {KILLS} killed processes logged an assignment; see {log}"
    );

    let port = free_port();
    let mut child = spawn_binary(
        &s,
        &topics,
        &prefix,
        &group,
        &dlq,
        port,
        &log,
        "kill-slot-0",
    );
    caught_up(&s, &prefix, &topics, 240).await;
    wait_http(port).await;
    let metrics = http_get(port, "/metrics").await;
    assert!(
        metrics.contains("metrics_consumer_events_applied_total{table=\"instashop.transaction\"}"),
        "{metrics}"
    );
    // The offsets in Redis may already be complete from the killed processes,
    // so "caught up" can come before this process reports itself consuming.
    wait_healthy(port).await;
    sigterm(&mut child).await;
    println!("{kills} kills, {total} events, log {log}");
    assert_exact(&s, &prefix, &model).await;
    let pipeline = pipeline_hash(&s, &prefix);
    assert_eq!(pipeline.get("bad_messages"), Some(&6), "{pipeline:?}");
    cleanup_redis(&s, &prefix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumer_processes_in_one_group_split_partitions_and_stay_exact() {
    let (s, topics, prefix, group, dlq) = setup("two").await;
    let log = std::env::temp_dir().join(format!("{}.log", topics.base));
    let log = log.to_str().unwrap().to_owned();
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = spawn_binary(&s, &topics, &prefix, &group, &dlq, port_a, &log, "");
    let mut b = spawn_binary(&s, &topics, &prefix, &group, &dlq, port_b, &log, "");
    let mut model = Model::new(23, topics.clone());
    let producer = producer(&s.kafka);
    for _ in 0..10 {
        let chunk = model.step(500);
        produce(&producer, &chunk).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    caught_up(&s, &prefix, &topics, 300).await;
    wait_http(port_a).await;
    wait_http(port_b).await;
    let batches = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("metrics_consumer_batches_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let (ma, mb) = (
        http_get(port_a, "/metrics").await,
        http_get(port_b, "/metrics").await,
    );
    assert!(
        batches(&ma) > 0 && batches(&mb) > 0,
        "both processes must apply batches:\nA:\n{ma}\nB:\n{mb}"
    );
    sigterm(&mut a).await;
    // B takes over A's partitions from the offsets in Redis.
    let chunk = model.step(500);
    produce(&producer, &chunk).await;
    caught_up(&s, &prefix, &topics, 300).await;
    sigterm(&mut b).await;
    assert_exact(&s, &prefix, &model).await;
    cleanup_redis(&s, &prefix);
}

/// A value of Redis under the prefix (0 when absent).
fn redis_int(s: &Stack, key: &str) -> i64 {
    redis::cmd("GET")
        .arg(key)
        .query::<Option<i64>>(
            &mut redis::Client::open(s.redis.as_str())
                .unwrap()
                .get_connection()
                .unwrap(),
        )
        .unwrap()
        .unwrap_or(0)
}

fn tx_event(id: i64, lsn: u64) -> String {
    format!(
        r#"{{"before":null,"after":{{"id":{id},"total_amount":"12.50","status":"completed","created_at":"2026-11-22T10:00:15Z"}},"source":{{"db":"instashop","table":"transaction","ts_ms":1795000000000,"lsn":{lsn},"commit_lsn":{lsn}}},"op":"c"}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_aborted_kafka_transactions_are_not_applied() {
    use rdkafka::ClientConfig;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let (s, topics, prefix, group, dlq) = setup("txn").await;
    let topic = topics.topic("instashop", "transaction");
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &s.kafka)
        .set("transactional.id", unique("mctest-txn-"))
        .create()
        .unwrap();
    let timeout = Duration::from_secs(30);
    producer.init_transactions(timeout).unwrap();
    for (id, commit) in [(1, false), (2, true)] {
        producer.begin_transaction().unwrap();
        let (key, value) = (format!(r#"{{"id":{id}}}"#), tx_event(id, 10 * id as u64));
        producer
            .send(BaseRecord::to(&topic).key(&key).payload(&value))
            .map_err(|(e, _)| e)
            .unwrap();
        // On the broker before the abort, so the abort marks it aborted.
        producer.flush(timeout).unwrap();
        if commit {
            producer.commit_transaction(timeout).unwrap();
        } else {
            producer.abort_transaction(timeout).unwrap();
        }
    }
    let shutdown = CancellationToken::new();
    let _stop = StopOnDrop(shutdown.clone());
    let run = tokio::spawn(metrics_consumer::run(
        config(&s, &topics, &prefix, &group, &dlq),
        shutdown.clone(),
    ));
    // Event 2 comes after the aborted event 1 in the partition: once it is
    // applied, event 1 was read or skipped.
    let count = format!("{prefix}count:instashop.transaction");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while redis_int(&s, &format!("{prefix}revenue:total_cents")) < 1250 {
        assert!(
            std::time::Instant::now() < deadline,
            "the committed event was never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(redis_int(&s, &count), 1, "the aborted event was applied");
    assert_eq!(redis_int(&s, &format!("{prefix}revenue:total_cents")), 1250);
    shutdown.cancel();
    run.await.unwrap().unwrap();
    cleanup_redis(&s, &prefix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_mib_event_and_a_16_mib_dead_letter_go_through() {
    // Wide REPLICA IDENTITY FULL rows give events up to 16 MiB; the brokers
    // of the local stack take 17 MiB messages.
    let (s, topics, prefix, group, dlq) = setup("big").await;
    let topic = topics.topic("instashop", "transaction");
    let padding = "x".repeat(16 << 20);
    let good = format!(
        r#"{{"before":null,"after":{{"id":1,"total_amount":"12.50","status":"completed","created_at":"2026-11-22T10:00:15Z","note":"{padding}"}},"source":{{"db":"instashop","table":"transaction","ts_ms":1795000000000,"lsn":10,"commit_lsn":10}},"op":"c"}}"#
    );
    let bad = format!(r#"{{"not a change event":"{padding}"}}"#);
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &s.kafka)
        .set("message.max.bytes", "17825792")
        .create()
        .unwrap();
    for (id, value) in [(1, &good), (2, &bad)] {
        let key = format!(r#"{{"id":{id}}}"#);
        producer
            .send(
                rdkafka::producer::FutureRecord::to(&topic)
                    .key(&key)
                    .payload(value),
                Duration::from_secs(60),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let shutdown = CancellationToken::new();
    let _stop = StopOnDrop(shutdown.clone());
    let mut run = tokio::spawn(metrics_consumer::run(
        config(&s, &topics, &prefix, &group, &dlq),
        shutdown.clone(),
    ));
    tokio::select! {
        stopped = &mut run => panic!("the consumer stopped: {stopped:?}"),
        () = caught_up(&s, &prefix, &topics, 120) => {}
    }
    shutdown.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(redis_int(&s, &format!("{prefix}revenue:total_cents")), 1250);
    assert_eq!(topic_count(&s.kafka, &dlq, 1), 1);
    cleanup_redis(&s, &prefix);
}
