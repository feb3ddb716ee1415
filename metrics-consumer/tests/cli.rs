//! The binary's contract for a definite error: one line on stderr, exit
//! status 1, before anything is read or written.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

#[test]
fn a_refused_kafka_property_exits_1_with_one_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_metrics-consumer"))
        .args([
            "--kafka-property",
            "enable.auto.commit=true",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("error: --kafka-property enable.auto.commit:")
            && lines[0].contains("redis"),
        "{stderr}"
    );
}

/// Runs the binary with `args` (and `env`) on a scratch group and Redis
/// prefix until it exits or `limit` passes (then it is killed): its exit
/// status, `None` when killed, and its stderr. The prefix's keys are deleted.
fn run_for(args: &[&str], env: &[(&str, &str)], limit: Duration) -> (Option<ExitStatus>, String) {
    let s = common::stack();
    let prefix = common::unique("test-cli:");
    let group = common::unique("test-cli-");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_metrics-consumer"))
        .args([
            "--redis-url",
            &s.redis,
            "--group",
            &group,
            "--prefix",
            &prefix,
        ])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(args)
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drained on its own thread: a consumer that warns forever must not
    // block on a full pipe before the deadline ends it.
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() >= limit {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = reader.join().unwrap();
    common::cleanup_redis(&s, &prefix);
    (status, stderr)
}

/// The exit status, or a failure showing how stderr began.
fn exited(status: Option<ExitStatus>, stderr: &str, limit: Duration) -> ExitStatus {
    status.unwrap_or_else(|| {
        let head: Vec<&str> = stderr.lines().take(5).collect();
        panic!(
            "still running after {limit:?}; stderr began:\n{}",
            head.join("\n")
        )
    })
}

/// A Kafka address where no broker answers ends the consumer at startup
/// with one line naming the address and what to check, instead of warning
/// forever (librdkafka retries an unreachable bootstrap address endlessly).
/// The timeout comes from the environment variable, so the flag's name is
/// checked by the unit tests and this test also ran before the check existed.
#[test]
fn no_broker_at_the_address_exits_1_with_one_line() {
    let limit = Duration::from_secs(20);
    let (status, stderr) = run_for(
        &["--bootstrap-servers", "127.0.0.1:1"],
        &[("METRICS_KAFKA_STARTUP_TIMEOUT_SECS", "2")],
        limit,
    );
    let status = exited(status, &stderr, limit);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("error: no Kafka broker answered at 127.0.0.1:1 within 2 s")
            && lines[0].contains("--bootstrap-servers / KAFKA_BOOTSTRAP_SERVERS"),
        "{stderr}"
    );
}

/// A session timeout the brokers refuse (below their
/// `group.min.session.timeout.ms`, 6000 ms by default) can never let the
/// consumer join: it ends with one error line naming the flag instead of
/// retrying the join forever. Needs the local cluster.
#[test]
fn a_session_timeout_the_brokers_refuse_exits_1_naming_the_flag() {
    let s = common::stack();
    // An existing topic: without one the consumer never asks to join.
    let topic = common::unique("test-cli-session.");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(common::create_topics(
        &s.kafka,
        std::slice::from_ref(&topic),
        1,
    ));
    let limit = Duration::from_secs(30);
    let (status, stderr) = run_for(
        &[
            "--bootstrap-servers",
            &s.kafka,
            "--topics",
            &topic,
            "--session-timeout-ms",
            "3000",
        ],
        &[],
        limit,
    );
    runtime.block_on(common::delete_topics(
        &s.kafka,
        std::slice::from_ref(&topic),
    ));
    let status = exited(status, &stderr, limit);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("--session-timeout-ms")
            && errors[0].contains("group.min.session.timeout.ms"),
        "{stderr}"
    );
    assert!(!stderr.contains("WARN"), "{stderr}");
}
