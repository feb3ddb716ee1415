//! The binary's contract for a definite error: one line on stderr, exit
//! status 1, before anything is read or written.
#![allow(clippy::unwrap_used)]

use std::process::Command;

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
