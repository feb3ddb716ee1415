//! `dashboards/instashop-cdc.json` stays in step with what the binaries
//! export: every metric a panel queries must be rendered by one of them.

use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn sources(dir: &Path, out: &mut String) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
        }
    }
}

/// Metric names in a PromQL expression: identifiers with one of our prefixes.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut current = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' {
            current.push(c);
        } else {
            if ["cdc_", "metrics_consumer_", "generator_", "dashboard_"]
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
    let mut code = String::new();
    for krate in ["cdc-reader", "metrics-consumer", "generator", "dashboard"] {
        sources(&root.join(krate).join("src"), &mut code);
    }
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    assert!(exprs.len() > 20, "only {} queries", exprs.len());
    let mut missing = Vec::new();
    for expr in &exprs {
        for name in metric_names(expr) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            if !code.contains(base) {
                missing.push(name);
            }
        }
    }
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "queried but exported by no binary: {missing:?}"
    );
}
