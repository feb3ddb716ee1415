//! Counters and gauges of the sink, `/metrics` (Prometheus text) and
//! `/health` over axum.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

/// Upper bounds of the batch-latency histogram, seconds.
const BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The sink's numbers.
#[derive(Debug, Default)]
pub struct Telemetry {
    events: Mutex<BTreeMap<String, u64>>,
    lag: Mutex<BTreeMap<(String, i32), i64>>,
    messages: AtomicU64,
    duplicates: AtomicU64,
    skipped: AtomicU64,
    dead_lettered: AtomicU64,
    batches: AtomicU64,
    write_errors: AtomicU64,
    last_batch_size: AtomicU64,
    batch_buckets: [AtomicU64; 10],
    batch_sum_micros: AtomicU64,
    e2e_lag_ms: AtomicI64,
    consuming: AtomicBool,
    failing: AtomicBool,
}

impl Telemetry {
    /// A batch was written.
    pub fn written(
        &self,
        per_table: &BTreeMap<String, u64>,
        messages: usize,
        duplicates: u64,
        skipped: usize,
        took: Duration,
    ) {
        if let Ok(mut events) = self.events.lock() {
            for (table, n) in per_table {
                *events.entry(table.clone()).or_default() += n;
            }
        }
        self.messages.fetch_add(messages as u64, Ordering::Relaxed);
        self.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        self.skipped.fetch_add(skipped as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.last_batch_size
            .store(messages as u64, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        for (bucket, bound) in self.batch_buckets.iter().zip(BUCKETS) {
            if secs <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.batch_sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.failing.store(false, Ordering::Relaxed);
    }

    /// Bad messages copied to the dead-letter topic.
    pub fn dead_lettered(&self, n: usize) {
        self.dead_lettered.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A write failed (and is retried).
    pub fn write_failed(&self) {
        self.write_errors.fetch_add(1, Ordering::Relaxed);
        self.failing.store(true, Ordering::Relaxed);
    }

    /// Source commit to written, newest event (ms).
    pub fn set_e2e_lag_ms(&self, ms: i64) {
        self.e2e_lag_ms.store(ms, Ordering::Relaxed);
    }

    /// Messages behind the high watermark, per partition.
    pub fn set_lag(&self, lag: BTreeMap<(String, i32), i64>) {
        if let Ok(mut l) = self.lag.lock() {
            *l = lag;
        }
    }

    /// Whether the Kafka loop runs.
    pub fn set_consuming(&self, on: bool) {
        self.consuming.store(on, Ordering::Relaxed);
    }

    /// Consuming and the last write did not fail.
    pub fn healthy(&self) -> bool {
        self.consuming.load(Ordering::Relaxed) && !self.failing.load(Ordering::Relaxed)
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            &mut out,
            "dwh_sink_events_total",
            "counter",
            "Change events written (new or re-sent), per source table; events/s with rate().",
        );
        if let Ok(events) = self.events.lock() {
            for (table, n) in events.iter() {
                let _ = writeln!(out, "dwh_sink_events_total{{table=\"{table}\"}} {n}");
            }
        }
        for (name, help, value) in [
            (
                "dwh_sink_messages_total",
                "Kafka messages consumed and covered by a written batch.",
                &self.messages,
            ),
            (
                "dwh_sink_duplicates_total",
                "Change events already in change_event (re-sent, or a repeated snapshot of an unchanged row).",
                &self.duplicates,
            ),
            (
                "dwh_sink_tombstones_skipped_total",
                "Tombstones and logical messages skipped.",
                &self.skipped,
            ),
            (
                "dwh_sink_dlq_messages_total",
                "Messages that could not be decoded, copied to the dead-letter topic.",
                &self.dead_lettered,
            ),
            (
                "dwh_sink_batches_total",
                "Batches written (one transaction each).",
                &self.batches,
            ),
            (
                "dwh_sink_write_errors_total",
                "Failed batch writes (retried).",
                &self.write_errors,
            ),
        ] {
            head(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        head(
            &mut out,
            "dwh_sink_last_batch_size",
            "gauge",
            "Messages in the last written batch.",
        );
        let _ = writeln!(
            out,
            "dwh_sink_last_batch_size {}",
            self.last_batch_size.load(Ordering::Relaxed)
        );
        head(
            &mut out,
            "dwh_sink_batch_seconds",
            "histogram",
            "Time to write one batch (its transaction).",
        );
        for (bucket, bound) in self.batch_buckets.iter().zip(BUCKETS) {
            let _ = writeln!(
                out,
                "dwh_sink_batch_seconds_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.batches.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "dwh_sink_batch_seconds_bucket{{le=\"+Inf\"}} {count}\ndwh_sink_batch_seconds_sum {}\ndwh_sink_batch_seconds_count {count}",
            self.batch_sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        head(
            &mut out,
            "dwh_sink_lag_messages",
            "gauge",
            "Messages behind the high watermark, per topic partition.",
        );
        if let Ok(lag) = self.lag.lock() {
            for ((topic, partition), n) in lag.iter() {
                let _ = writeln!(
                    out,
                    "dwh_sink_lag_messages{{topic=\"{topic}\",partition=\"{partition}\"}} {n}"
                );
            }
        }
        head(
            &mut out,
            "dwh_sink_end_to_end_lag_ms",
            "gauge",
            "Source commit to written in the warehouse, newest event of the last batch.",
        );
        let _ = writeln!(
            out,
            "dwh_sink_end_to_end_lag_ms {}",
            self.e2e_lag_ms.load(Ordering::Relaxed)
        );
        head(
            &mut out,
            "dwh_sink_up",
            "gauge",
            "1 while consuming and the last write succeeded.",
        );
        let _ = writeln!(out, "dwh_sink_up {}", u8::from(self.healthy()));
        out
    }
}

/// Serves `/metrics` and `/health` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    telemetry: Arc<Telemetry>,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .with_state(telemetry);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "http server stopped");
    }
}

async fn metrics(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        t.render(),
    )
}

async fn health(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    if t.healthy() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy: not consuming or warehouse writes failing\n",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_lag() {
        let t = Telemetry::default();
        t.set_consuming(true);
        let per_table = BTreeMap::from([("instashop.product".to_owned(), 3)]);
        t.written(&per_table, 5, 1, 1, Duration::from_millis(30));
        t.set_lag(BTreeMap::from([(("a".to_owned(), 2), 7)]));
        let text = t.render();
        assert!(text.contains("dwh_sink_events_total{table=\"instashop.product\"} 3"));
        assert!(text.contains("dwh_sink_batch_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("dwh_sink_batch_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("dwh_sink_lag_messages{topic=\"a\",partition=\"2\"} 7"));
        assert!(t.healthy());
        t.write_failed();
        assert!(!t.healthy());
    }
}
