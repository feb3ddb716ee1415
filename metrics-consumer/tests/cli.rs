//! The binary's contract for a definite error: one line on stderr, exit
//! status 1, before anything is read or written.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
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

/// A Kafka address where no broker answers ends the consumer at startup
/// with one line naming the address and what to check, instead of warning
/// forever (librdkafka retries an unreachable bootstrap address endlessly).
/// The timeout comes from the environment variable, so the flag's name is
/// checked by the unit tests and this test also ran before the check existed.
#[test]
fn no_broker_at_the_address_exits_1_with_one_line() {
    let s = common::stack();
    let prefix = common::unique("test-cli-nokafka:");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_metrics-consumer"))
        .args([
            "--bootstrap-servers",
            "127.0.0.1:1",
            "--redis-url",
            &s.redis,
            "--group",
            &common::unique("test-cli-nokafka-"),
            "--prefix",
            &prefix,
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .env("METRICS_KAFKA_STARTUP_TIMEOUT_SECS", "2")
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drained on its own thread: a consumer that warns forever must not
    // block on a full pipe before the deadline below ends it.
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let deadline = started + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = reader.join().unwrap();
    common::cleanup_redis(&s, &prefix);
    let head: String = stderr.lines().take(5).collect::<Vec<_>>().join("\n");
    let status =
        status.unwrap_or_else(|| panic!("still running after 20 s; stderr began:\n{head}"));
    assert_eq!(status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("error: no Kafka broker answered at 127.0.0.1:1 within 2 s")
            && lines[0].contains("--bootstrap-servers / KAFKA_BOOTSTRAP_SERVERS"),
        "{stderr}"
    );
}
