//! `dashboards/instashop-cdc.json` stays in step with what the binaries
//! export: every metric a panel queries must be in the `/metrics` text one
//! of them renders.
//!
//! The texts come from the binaries' own registries, encoded as their
//! servers encode them, so the names checked are the exported ones (the
//! encoder adds `_total` to counters and `_bucket`/`_sum`/`_count` to
//! histograms), not whatever the source happens to spell.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The reader's metrics with one series in every family: the encoder
/// leaves out a labelled family that has none yet.
fn reader_metrics() -> std::sync::Arc<cdc_reader::metrics::Metrics> {
    let metrics = cdc_reader::metrics::Metrics::new();
    let topic = "instashop.instashop.transaction";
    metrics.events(topic, cdc_reader::change::Op::Create, 1);
    metrics.record_delivered(topic, 100);
    metrics.record_delivery_error(topic);
    metrics.set_state("instashop", cdc_reader::metrics::SourceState::Streaming);
    metrics.reconnected("instashop");
    metrics.set_progress("instashop", 10, 20, 0.5);
    metrics.snapshot_progress("instashop", "instashop.transaction", 1, 2, false);
    metrics
}

/// The sink's metrics with a series in each labelled family.
fn dwh_sink_metrics() -> dwh_sink::telemetry::Telemetry {
    let telemetry = dwh_sink::telemetry::Telemetry::default();
    let per_table = std::collections::BTreeMap::from([("instashop.product".to_owned(), 1)]);
    telemetry.written(&per_table, 1, 0, 0, std::time::Duration::from_millis(5));
    telemetry.set_lag(std::collections::BTreeMap::from([(
        ("instashop.instashop.product".to_owned(), 0),
        0,
    )]));
    telemetry
}

/// The `/metrics` text of every binary, each family with a series.
fn expositions() -> Vec<(&'static str, String)> {
    use local_stack::exposition::render;
    vec![
        ("cdc-reader", render(&reader_metrics().registry())),
        (
            "metrics-consumer",
            render(&metrics_consumer::telemetry::Telemetry::default().registry()),
        ),
        (
            "generator",
            render(&generator::progress::Counters::default().registry()),
        ),
        (
            "dashboard",
            render(&dashboard::collector::Stats::default().registry()),
        ),
        ("dwh-sink", render(&dwh_sink_metrics().registry())),
    ]
}

/// Names a Prometheus query can select from an exposition: every sample
/// name, and for each `# TYPE` line the family's name and, for histograms
/// and summaries, the series the format derives from it (a family with no
/// label set yet has a `# TYPE` line but no sample).
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            names.insert(name.to_owned());
            if kind == "histogram" || kind == "summary" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        } else if !line.starts_with('#') {
            let end = line
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(line.len());
            if end > 0 {
                names.insert(line[..end].to_owned());
            }
        }
    }
    names
}

/// Metric names in a PromQL expression: identifiers with one of our prefixes.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut current = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' {
            current.push(c);
        } else {
            if [
                "cdc_",
                "metrics_consumer_",
                "generator_",
                "dashboard_",
                "dwh_sink_",
            ]
            .iter()
            .any(|p| current.starts_with(p))
            {
                names.push(current.clone());
            }
            current.clear();
        }
    }
    names
}

#[test]
fn every_queried_metric_is_exported() {
    let root = repo_root();
    let text = std::fs::read_to_string(root.join("dashboards/instashop-cdc.json"))
        .expect("read dashboards/instashop-cdc.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).expect("the Grafana JSON parses");
    let mut exported = BTreeSet::new();
    for (binary, text) in expositions() {
        let names = exported_names(&text);
        assert!(names.len() > 3, "{binary} renders almost nothing:\n{text}");
        exported.extend(names);
    }
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    assert!(exprs.len() > 20, "only {} queries", exprs.len());
    let mut missing: Vec<String> = exprs
        .iter()
        .flat_map(|expr| metric_names(expr))
        .filter(|name| !exported.contains(name))
        .collect();
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "queried but exported by no binary: {missing:?}"
    );
}

#[test]
fn exported_names_cover_unlabelled_families_and_histogram_series() {
    let text = "# HELP a_total A.\n# TYPE a_total counter\n\
        # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 0\n\
        g{x=\"1\"} 2\n";
    let names = exported_names(text);
    for name in ["a_total", "h", "h_bucket", "h_sum", "h_count", "g"] {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
    assert!(!names.contains("a"), "{names:?}");
}
