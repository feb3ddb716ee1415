//! Counters for `/metrics` (Prometheus text format) and `/health`, shared by
//! the consumer threads and the HTTP server. Plain atomics: the few series we
//! export do not justify a metrics library.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use crate::fold::Table;

/// Upper bounds (ms) of the apply-latency histogram buckets.
const LATENCY_BUCKETS_MS: &[u64] = &[1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000];

/// Upper bounds (ms) of the end-to-end histograms (source commit to polled,
/// to applied): fine below 100 ms, where the latency target is.
const E2E_BUCKETS_MS: &[u64] = &[5, 10, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000];

/// A cumulative latency histogram in Prometheus' sense, in microseconds.
#[derive(Debug)]
struct Histogram {
    bounds_ms: &'static [u64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    fn new(bounds_ms: &'static [u64]) -> Histogram {
        Histogram {
            bounds_ms,
            buckets: bounds_ms.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::default(),
            sum_us: AtomicU64::default(),
        }
    }

    /// Adds the samples (µs), summed locally first: a batch brings up to
    /// thousands of them and the atomics are shared with the HTTP thread.
    fn observe_us(&self, samples_us: impl Iterator<Item = u64>) {
        let mut counts = vec![0u64; self.bounds_ms.len()];
        let (mut n, mut sum) = (0u64, 0u64);
        for us in samples_us {
            for (c, bound) in counts.iter_mut().zip(self.bounds_ms) {
                if us <= bound * 1000 {
                    *c += 1;
                }
            }
            n += 1;
            sum += us;
        }
        for (bucket, c) in self.buckets.iter().zip(counts) {
            bucket.fetch_add(c, Ordering::Relaxed);
        }
        self.count.fetch_add(n, Ordering::Relaxed);
        self.sum_us.fetch_add(sum, Ordering::Relaxed);
    }

    /// Adds, per commit time, `now_ms - commit` (clamped at zero: clocks of
    /// the source and this host may differ by a little).
    fn observe_since(&self, now_ms: i64, commits_ms: impl Iterator<Item = i64>) {
        self.observe_us(commits_ms.map(|ts| (now_ms - ts).max(0) as u64 * 1000));
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bucket, bound) in self.buckets.iter().zip(self.bounds_ms) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {}",
                *bound as f64 / 1000.0,
                get(bucket)
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            get(&self.count),
            get(&self.sum_us) as f64 / 1e6,
            get(&self.count)
        );
    }
}

/// Process-wide counters.
#[derive(Debug)]
pub struct Telemetry {
    events_applied: [AtomicU64; 9],
    duplicates: AtomicU64,
    bad: AtomicU64,
    dlq: AtomicU64,
    skipped: AtomicU64,
    batches: AtomicU64,
    batch_messages: AtomicU64,
    last_batch_size: AtomicU64,
    apply_latency: Histogram,
    consumer_lag: AtomicI64,
    e2e_lag_ms: AtomicI64,
    e2e: Histogram,
    received: Histogram,
    apply_errors: AtomicU64,
    redis_ok: AtomicBool,
    consuming: AtomicBool,
}

impl Default for Telemetry {
    fn default() -> Telemetry {
        Telemetry {
            events_applied: Default::default(),
            duplicates: AtomicU64::default(),
            bad: AtomicU64::default(),
            dlq: AtomicU64::default(),
            skipped: AtomicU64::default(),
            batches: AtomicU64::default(),
            batch_messages: AtomicU64::default(),
            last_batch_size: AtomicU64::default(),
            apply_latency: Histogram::new(LATENCY_BUCKETS_MS),
            consumer_lag: AtomicI64::default(),
            e2e_lag_ms: AtomicI64::default(),
            e2e: Histogram::new(E2E_BUCKETS_MS),
            received: Histogram::new(E2E_BUCKETS_MS),
            apply_errors: AtomicU64::default(),
            redis_ok: AtomicBool::default(),
            consuming: AtomicBool::default(),
        }
    }
}

impl Telemetry {
    /// Records one applied batch.
    pub fn batch_applied(&self, per_table: &[u64; 9], size: usize, latency: std::time::Duration) {
        for (counter, n) in self.events_applied.iter().zip(per_table) {
            counter.fetch_add(*n, Ordering::Relaxed);
        }
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batch_messages
            .fetch_add(size as u64, Ordering::Relaxed);
        self.last_batch_size.store(size as u64, Ordering::Relaxed);
        self.apply_latency
            .observe_us(std::iter::once(latency.as_micros() as u64));
        self.redis_ok.store(true, Ordering::Relaxed);
    }

    /// Records the script's counts.
    pub fn counted(&self, duplicates: u64, bad: u64, skipped: u64) {
        self.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        self.bad.fetch_add(bad, Ordering::Relaxed);
        self.skipped.fetch_add(skipped, Ordering::Relaxed);
    }

    /// Records messages copied to the dead-letter topic.
    pub fn dead_lettered(&self, n: u64) {
        self.dlq.fetch_add(n, Ordering::Relaxed);
    }

    /// Records a failed apply (Redis unreachable or erroring).
    pub fn apply_failed(&self) {
        self.apply_errors.fetch_add(1, Ordering::Relaxed);
        self.redis_ok.store(false, Ordering::Relaxed);
    }

    /// Sets the consumer lag (messages behind the high watermarks).
    pub fn set_consumer_lag(&self, lag: i64) {
        self.consumer_lag.store(lag, Ordering::Relaxed);
    }

    /// Records, per event of an applied batch, the time from its source
    /// commit (`source.ts_ms`) to `now_ms`, when the apply returned.
    pub fn end_to_end(&self, now_ms: i64, commits_ms: impl Iterator<Item = i64>) {
        self.e2e.observe_since(now_ms, commits_ms);
    }

    /// Records, per message polled from Kafka, the time from its source
    /// commit to `now_ms`: the part of the end-to-end time spent before the
    /// consumer (reader, broker, fetch).
    pub fn received(&self, now_ms: i64, commits_ms: impl Iterator<Item = i64>) {
        self.received.observe_since(now_ms, commits_ms);
    }

    /// Sets the end-to-end lag of the newest applied event (ms).
    pub fn set_e2e_lag_ms(&self, lag: i64) {
        self.e2e_lag_ms.store(lag, Ordering::Relaxed);
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

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.push_str("# HELP metrics_consumer_events_applied_total Change events applied, per source table.\n");
        out.push_str("# TYPE metrics_consumer_events_applied_total counter\n");
        for (t, c) in Table::ALL.iter().zip(&self.events_applied) {
            let _ = writeln!(
                out,
                "metrics_consumer_events_applied_total{{table=\"{}\"}} {}",
                t.qualified(),
                get(c)
            );
        }
        let simple: [(&str, &str, &str, u64); 7] = [
            (
                "metrics_consumer_duplicates_skipped_total",
                "counter",
                "Re-delivered or re-sent events that changed nothing.",
                get(&self.duplicates),
            ),
            (
                "metrics_consumer_bad_messages_total",
                "counter",
                "Messages that could not be decoded.",
                get(&self.bad),
            ),
            (
                "metrics_consumer_dlq_messages_total",
                "counter",
                "Messages copied to the dead-letter topic.",
                get(&self.dlq),
            ),
            (
                "metrics_consumer_tombstones_skipped_total",
                "counter",
                "Tombstones and other no-op messages.",
                get(&self.skipped),
            ),
            (
                "metrics_consumer_apply_errors_total",
                "counter",
                "Failed batch applies (retried).",
                get(&self.apply_errors),
            ),
            (
                "metrics_consumer_last_batch_size",
                "gauge",
                "Messages in the last applied batch.",
                get(&self.last_batch_size),
            ),
            (
                "metrics_consumer_batches_total",
                "counter",
                "Batches applied.",
                get(&self.batches),
            ),
        ];
        for (name, kind, help, value) in simple {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP metrics_consumer_batch_size Messages per applied batch.\n# TYPE metrics_consumer_batch_size summary\nmetrics_consumer_batch_size_sum {}\nmetrics_consumer_batch_size_count {}",
            get(&self.batch_messages),
            get(&self.batches)
        );
        self.apply_latency.render(
            &mut out,
            "metrics_consumer_apply_latency_seconds",
            "Time to apply one batch in Redis.",
        );
        let _ = writeln!(
            out,
            "# HELP metrics_consumer_lag_messages Messages behind the partitions' high watermarks.\n# TYPE metrics_consumer_lag_messages gauge\nmetrics_consumer_lag_messages {}",
            self.consumer_lag.load(Ordering::Relaxed)
        );
        self.e2e.render(
            &mut out,
            "metrics_consumer_end_to_end_seconds",
            "Per applied event: source commit (source.ts_ms) to its batch applied in Redis.",
        );
        self.received.render(
            &mut out,
            "metrics_consumer_received_seconds",
            "Per polled message: source commit (source.ts_ms) to the consumer polling it from Kafka.",
        );
        let _ = writeln!(
            out,
            "# HELP metrics_consumer_end_to_end_lag_ms Source commit to applied, newest event.\n# TYPE metrics_consumer_end_to_end_lag_ms gauge\nmetrics_consumer_end_to_end_lag_ms {}",
            self.e2e_lag_ms.load(Ordering::Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_to_end_histogram_is_cumulative() {
        let t = Telemetry::default();
        t.end_to_end(10_000, [9_997, 9_940, 4_000].into_iter());
        t.received(10_000, [9_999].into_iter());
        let text = t.render();
        for line in [
            "metrics_consumer_end_to_end_seconds_bucket{le=\"0.005\"} 1",
            "metrics_consumer_end_to_end_seconds_bucket{le=\"0.05\"} 1",
            "metrics_consumer_end_to_end_seconds_bucket{le=\"0.075\"} 2",
            "metrics_consumer_end_to_end_seconds_bucket{le=\"5\"} 2",
            "metrics_consumer_end_to_end_seconds_bucket{le=\"+Inf\"} 3",
            "metrics_consumer_end_to_end_seconds_count 3",
            "metrics_consumer_end_to_end_seconds_sum 6.063",
            "metrics_consumer_received_seconds_bucket{le=\"0.005\"} 1",
            "metrics_consumer_received_seconds_count 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        t.batch_applied(&[0; 9], 10, std::time::Duration::from_micros(1_500));
        let text = t.render();
        for line in [
            "metrics_consumer_apply_latency_seconds_bucket{le=\"0.001\"} 0",
            "metrics_consumer_apply_latency_seconds_bucket{le=\"0.002\"} 1",
            "metrics_consumer_apply_latency_seconds_bucket{le=\"+Inf\"} 1",
            "metrics_consumer_apply_latency_seconds_sum 0.0015",
            "metrics_consumer_apply_latency_seconds_count 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
