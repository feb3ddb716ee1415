//! The consumer's metrics for `/metrics` and its `/health`, shared by the
//! consumer threads and the HTTP server: `prometheus-client` counters,
//! gauges and histograms (atomics and short locks), encoded by
//! [`local_stack::exposition`].

use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::fold::Table;

/// Upper bounds (s) of the apply-latency histogram buckets.
const LATENCY_BUCKETS: [f64; 11] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Upper bounds (s) of the end-to-end histograms (source commit to polled,
/// to applied): fine below 100 ms, where the latency target is.
const E2E_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Upper bounds of the batch-size histogram (messages).
const BATCH_BUCKETS: [f64; 8] = [1.0, 10.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0, 50000.0];

/// Label of `metrics_consumer_events_applied_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TableLabel {
    table: &'static str,
}

/// Process-wide metrics.
#[derive(Debug)]
pub struct Telemetry {
    applied_family: Family<TableLabel, Counter>,
    /// The family's counters in [`Table::ALL`] order, fetched once.
    events_applied: Vec<Counter>,
    duplicates: Counter,
    bad: Counter,
    dlq: Counter,
    skipped: Counter,
    batches: Counter,
    batch_size: Histogram,
    last_batch_size: Gauge,
    apply_latency: Histogram,
    consumer_lag: Gauge,
    e2e_lag_ms: Gauge,
    e2e: Histogram,
    received: Histogram,
    apply_errors: Counter,
    redis_ok: AtomicBool,
    consuming: AtomicBool,
}

impl Default for Telemetry {
    fn default() -> Telemetry {
        let applied_family = Family::<TableLabel, Counter>::default();
        let events_applied = Table::ALL
            .iter()
            .map(|t| {
                applied_family.get_or_create_owned(&TableLabel {
                    table: t.qualified(),
                })
            })
            .collect();
        Telemetry {
            applied_family,
            events_applied,
            duplicates: Counter::default(),
            bad: Counter::default(),
            dlq: Counter::default(),
            skipped: Counter::default(),
            batches: Counter::default(),
            batch_size: Histogram::new(BATCH_BUCKETS),
            last_batch_size: Gauge::default(),
            apply_latency: Histogram::new(LATENCY_BUCKETS),
            consumer_lag: Gauge::default(),
            e2e_lag_ms: Gauge::default(),
            e2e: Histogram::new(E2E_BUCKETS),
            received: Histogram::new(E2E_BUCKETS),
            apply_errors: Counter::default(),
            redis_ok: AtomicBool::default(),
            consuming: AtomicBool::default(),
        }
    }
}

/// Adds, per commit time, `now_ms - commit` in seconds (clamped at zero:
/// clocks of the source and this host may differ by a little).
fn observe_since(histogram: &Histogram, now_ms: i64, commits_ms: impl Iterator<Item = i64>) {
    for commit in commits_ms {
        histogram.observe((now_ms - commit).max(0) as f64 / 1000.0);
    }
}

impl Telemetry {
    /// Records one applied batch.
    pub fn batch_applied(&self, per_table: &[u64; 9], size: usize, latency: std::time::Duration) {
        for (counter, n) in self.events_applied.iter().zip(per_table) {
            counter.inc_by(*n);
        }
        self.batches.inc();
        self.batch_size.observe(size as f64);
        self.last_batch_size
            .set(i64::try_from(size).unwrap_or(i64::MAX));
        self.apply_latency.observe(latency.as_secs_f64());
        self.redis_ok.store(true, Ordering::Relaxed);
    }

    /// Records the script's counts.
    pub fn counted(&self, duplicates: u64, bad: u64, skipped: u64) {
        self.duplicates.inc_by(duplicates);
        self.bad.inc_by(bad);
        self.skipped.inc_by(skipped);
    }

    /// Records messages copied to the dead-letter topic.
    pub fn dead_lettered(&self, n: u64) {
        self.dlq.inc_by(n);
    }

    /// Records a failed apply (Redis unreachable or erroring).
    pub fn apply_failed(&self) {
        self.apply_errors.inc();
        self.redis_ok.store(false, Ordering::Relaxed);
    }

    /// Sets the consumer lag (messages behind the high watermarks).
    pub fn set_consumer_lag(&self, lag: i64) {
        self.consumer_lag.set(lag);
    }

    /// Records, per event of an applied batch, the time from its source
    /// commit (`source.ts_ms`) to `now_ms`, when the apply returned.
    pub fn end_to_end(&self, now_ms: i64, commits_ms: impl Iterator<Item = i64>) {
        observe_since(&self.e2e, now_ms, commits_ms);
    }

    /// Records, per message polled from Kafka, the time from its source
    /// commit to `now_ms`: the part of the end-to-end time spent before the
    /// consumer (reader, broker, fetch).
    pub fn received(&self, now_ms: i64, commits_ms: impl Iterator<Item = i64>) {
        observe_since(&self.received, now_ms, commits_ms);
    }

    /// Sets the end-to-end lag of the newest applied event (ms).
    pub fn set_e2e_lag_ms(&self, lag: i64) {
        self.e2e_lag_ms.set(lag);
    }

    /// Marks the consume loop as running or stopped.
    pub fn set_consuming(&self, on: bool) {
        self.consuming.store(on, Ordering::Relaxed);
        if on {
            self.redis_ok.store(true, Ordering::Relaxed);
        }
    }

    /// Healthy: the consume loop runs and the last Redis apply succeeded.
    pub fn healthy(&self) -> bool {
        self.consuming.load(Ordering::Relaxed) && self.redis_ok.load(Ordering::Relaxed)
    }

    /// `/health`: status and body.
    pub fn health(&self) -> (bool, String) {
        if self.healthy() {
            (true, "ok\n".to_owned())
        } else {
            (
                false,
                "unhealthy: not consuming or redis failing\n".to_owned(),
            )
        }
    }

    /// The metrics as a registry for `/metrics` (counters without their
    /// `_total`, which the encoder adds).
    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        r.register(
            "metrics_consumer_events_applied",
            "Change events applied, per source table",
            self.applied_family.clone(),
        );
        for (name, help, counter) in [
            (
                "metrics_consumer_duplicates_skipped",
                "Re-delivered or re-sent events that changed nothing",
                &self.duplicates,
            ),
            (
                "metrics_consumer_bad_messages",
                "Messages that could not be decoded",
                &self.bad,
            ),
            (
                "metrics_consumer_dlq_messages",
                "Messages copied to the dead-letter topic",
                &self.dlq,
            ),
            (
                "metrics_consumer_tombstones_skipped",
                "Tombstones and other no-op messages",
                &self.skipped,
            ),
            (
                "metrics_consumer_apply_errors",
                "Failed batch applies (retried)",
                &self.apply_errors,
            ),
            ("metrics_consumer_batches", "Batches applied", &self.batches),
        ] {
            r.register(name, help, counter.clone());
        }
        for (name, help, gauge) in [
            (
                "metrics_consumer_last_batch_size",
                "Messages in the last applied batch",
                &self.last_batch_size,
            ),
            (
                "metrics_consumer_lag_messages",
                "Messages behind the partitions' high watermarks",
                &self.consumer_lag,
            ),
            (
                "metrics_consumer_end_to_end_lag_ms",
                "Source commit to applied, newest event",
                &self.e2e_lag_ms,
            ),
        ] {
            r.register(name, help, gauge.clone());
        }
        for (name, help, histogram) in [
            (
                "metrics_consumer_batch_size",
                "Messages per applied batch",
                &self.batch_size,
            ),
            (
                "metrics_consumer_apply_latency_seconds",
                "Time to apply one batch in Redis",
                &self.apply_latency,
            ),
            (
                "metrics_consumer_end_to_end_seconds",
                "Per applied event: source commit (source.ts_ms) to its batch applied in Redis",
                &self.e2e,
            ),
            (
                "metrics_consumer_received_seconds",
                "Per polled message: source commit (source.ts_ms) to the consumer polling it from Kafka",
                &self.received,
            ),
        ] {
            r.register(name, help, histogram.clone());
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(f64::NAN)
    }

    #[test]
    fn end_to_end_histogram_is_cumulative() {
        let t = Telemetry::default();
        t.end_to_end(10_000, [9_997, 9_940, 4_000].into_iter());
        t.received(10_000, [9_999].into_iter());
        let text = local_stack::exposition::render(&t.registry());
        for line in [
            "metrics_consumer_end_to_end_seconds_bucket{le=\"0.005\"} 1",
            "metrics_consumer_end_to_end_seconds_bucket{le=\"0.05\"} 1",
            "metrics_consumer_end_to_end_seconds_bucket{le=\"0.075\"} 2",
            "metrics_consumer_end_to_end_seconds_bucket{le=\"5\"} 2",
            "metrics_consumer_end_to_end_seconds_bucket{le=\"+Inf\"} 3",
            "metrics_consumer_end_to_end_seconds_count 3",
            "metrics_consumer_received_seconds_bucket{le=\"0.005\"} 1",
            "metrics_consumer_received_seconds_count 1",
            "metrics_consumer_events_applied_total{table=\"instashop.transactiondetail\"} 0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        let sum = sample(&text, "metrics_consumer_end_to_end_seconds_sum");
        assert!((sum - 6.063).abs() < 1e-9, "{sum}");
        t.batch_applied(&[0; 9], 10, std::time::Duration::from_micros(1_500));
        let text = local_stack::exposition::render(&t.registry());
        for line in [
            "metrics_consumer_apply_latency_seconds_bucket{le=\"0.001\"} 0",
            "metrics_consumer_apply_latency_seconds_bucket{le=\"0.002\"} 1",
            "metrics_consumer_apply_latency_seconds_bucket{le=\"+Inf\"} 1",
            "metrics_consumer_apply_latency_seconds_sum 0.0015",
            "metrics_consumer_apply_latency_seconds_count 1",
            "metrics_consumer_batch_size_sum 10",
            "metrics_consumer_batch_size_count 1",
            "metrics_consumer_batches_total 1",
            "metrics_consumer_last_batch_size 10",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
