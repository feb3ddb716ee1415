//! The sink's metrics for `/metrics` and its `/health`: `prometheus-client`
//! counters, gauges and a histogram, encoded and served by
//! [`local_stack::exposition`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Upper bounds of the batch-latency histogram, seconds.
const BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Label of `dwh_sink_events_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TableLabel {
    table: String,
}

/// Labels of `dwh_sink_lag_messages`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
struct PartitionLabels {
    topic: String,
    partition: i32,
}

/// The sink's numbers.
#[derive(Debug)]
pub struct Telemetry {
    events: Family<TableLabel, Counter>,
    lag: Family<PartitionLabels, Gauge>,
    /// The partitions `lag` has a series for, so a partition no longer
    /// assigned loses its series.
    lag_partitions: Mutex<BTreeSet<PartitionLabels>>,
    messages: Counter,
    duplicates: Counter,
    skipped: Counter,
    dead_lettered: Counter,
    batches: Counter,
    write_errors: Counter,
    last_batch_size: Gauge,
    batch_seconds: Histogram,
    e2e_lag_ms: Gauge,
    up: Gauge,
    consuming: AtomicBool,
    failing: AtomicBool,
}

impl Default for Telemetry {
    fn default() -> Telemetry {
        Telemetry {
            events: Family::default(),
            lag: Family::default(),
            lag_partitions: Mutex::default(),
            messages: Counter::default(),
            duplicates: Counter::default(),
            skipped: Counter::default(),
            dead_lettered: Counter::default(),
            batches: Counter::default(),
            write_errors: Counter::default(),
            last_batch_size: Gauge::default(),
            batch_seconds: Histogram::new(BUCKETS),
            e2e_lag_ms: Gauge::default(),
            up: Gauge::default(),
            consuming: AtomicBool::default(),
            failing: AtomicBool::default(),
        }
    }
}

fn gauge_value(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
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
        for (table, n) in per_table {
            self.events
                .get_or_create(&TableLabel {
                    table: table.clone(),
                })
                .inc_by(*n);
        }
        self.messages.inc_by(messages as u64);
        self.duplicates.inc_by(duplicates);
        self.skipped.inc_by(skipped as u64);
        self.batches.inc();
        self.last_batch_size.set(gauge_value(messages));
        self.batch_seconds.observe(took.as_secs_f64());
        self.failing.store(false, Ordering::Relaxed);
        self.update_up();
    }

    /// Bad messages copied to the dead-letter topic.
    pub fn dead_lettered(&self, n: usize) {
        self.dead_lettered.inc_by(n as u64);
    }

    /// A write failed (and is retried).
    pub fn write_failed(&self) {
        self.write_errors.inc();
        self.failing.store(true, Ordering::Relaxed);
        self.update_up();
    }

    /// Source commit to written, newest event (ms).
    pub fn set_e2e_lag_ms(&self, ms: i64) {
        self.e2e_lag_ms.set(ms);
    }

    /// Messages behind the high watermark, per partition.
    pub fn set_lag(&self, lag: BTreeMap<(String, i32), i64>) {
        let now: BTreeSet<PartitionLabels> = lag
            .into_iter()
            .map(|((topic, partition), n)| {
                let labels = PartitionLabels { topic, partition };
                self.lag.get_or_create(&labels).set(n);
                labels
            })
            .collect();
        let mut known = self
            .lag_partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for gone in known.difference(&now) {
            self.lag.remove(gone);
        }
        *known = now;
    }

    /// Whether the Kafka loop runs.
    pub fn set_consuming(&self, on: bool) {
        self.consuming.store(on, Ordering::Relaxed);
        self.update_up();
    }

    /// Consuming and the last write did not fail.
    pub fn healthy(&self) -> bool {
        self.consuming.load(Ordering::Relaxed) && !self.failing.load(Ordering::Relaxed)
    }

    fn update_up(&self) {
        self.up.set(i64::from(self.healthy()));
    }

    /// `/health`: status and body.
    pub fn health(&self) -> (bool, String) {
        if self.healthy() {
            (true, "ok\n".to_owned())
        } else {
            (
                false,
                "unhealthy: not consuming or warehouse writes failing\n".to_owned(),
            )
        }
    }

    /// The metrics as a registry for `/metrics` (counters without their
    /// `_total`, which the encoder adds).
    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        r.register(
            "dwh_sink_events",
            "Change events written (new or re-sent), per source table; events/s with rate()",
            self.events.clone(),
        );
        for (name, help, counter) in [
            (
                "dwh_sink_messages",
                "Kafka messages consumed and covered by a written batch",
                &self.messages,
            ),
            (
                "dwh_sink_duplicates",
                "Change events already in change_event (re-sent, or a repeated snapshot of an unchanged row)",
                &self.duplicates,
            ),
            (
                "dwh_sink_tombstones_skipped",
                "Tombstones and logical messages skipped",
                &self.skipped,
            ),
            (
                "dwh_sink_dlq_messages",
                "Messages that could not be decoded, copied to the dead-letter topic",
                &self.dead_lettered,
            ),
            (
                "dwh_sink_batches",
                "Batches written (one transaction each)",
                &self.batches,
            ),
            (
                "dwh_sink_write_errors",
                "Failed batch writes (retried)",
                &self.write_errors,
            ),
        ] {
            r.register(name, help, counter.clone());
        }
        r.register(
            "dwh_sink_last_batch_size",
            "Messages in the last written batch",
            self.last_batch_size.clone(),
        );
        r.register(
            "dwh_sink_batch_seconds",
            "Time to write one batch (its transaction)",
            self.batch_seconds.clone(),
        );
        r.register(
            "dwh_sink_lag_messages",
            "Messages behind the high watermark, per topic partition",
            self.lag.clone(),
        );
        r.register(
            "dwh_sink_end_to_end_lag_ms",
            "Source commit to written in the warehouse, newest event of the last batch",
            self.e2e_lag_ms.clone(),
        );
        r.register(
            "dwh_sink_up",
            "1 while consuming and the last write succeeded",
            self.up.clone(),
        );
        r
    }
}

/// Serves `/metrics` and `/health` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    telemetry: Arc<Telemetry>,
    shutdown: CancellationToken,
) {
    let registry = Arc::new(telemetry.registry());
    let health: local_stack::exposition::Health = Arc::new(move || telemetry.health());
    local_stack::exposition::serve(listener, registry, Some(health), shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_lag_and_up() {
        let t = Telemetry::default();
        t.set_consuming(true);
        let per_table = BTreeMap::from([("instashop.product".to_owned(), 3)]);
        t.written(&per_table, 5, 1, 1, Duration::from_millis(30));
        t.set_lag(BTreeMap::from([
            (("a".to_owned(), 2), 7),
            (("b".to_owned(), 0), 1),
        ]));
        t.set_lag(BTreeMap::from([(("a".to_owned(), 2), 8)]));
        let text = local_stack::exposition::render(&t.registry());
        for line in [
            "# TYPE dwh_sink_events_total counter\n",
            "\ndwh_sink_events_total{table=\"instashop.product\"} 3\n",
            "\ndwh_sink_messages_total 5\n",
            "\ndwh_sink_duplicates_total 1\n",
            "\ndwh_sink_tombstones_skipped_total 1\n",
            "\ndwh_sink_batches_total 1\n",
            "\ndwh_sink_last_batch_size 5\n",
            "\ndwh_sink_batch_seconds_bucket{le=\"0.05\"} 1\n",
            "\ndwh_sink_batch_seconds_bucket{le=\"0.025\"} 0\n",
            "\ndwh_sink_batch_seconds_bucket{le=\"+Inf\"} 1\n",
            "\ndwh_sink_batch_seconds_count 1\n",
            "\ndwh_sink_lag_messages{topic=\"a\",partition=\"2\"} 8\n",
            "\ndwh_sink_up 1\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("topic=\"b\""), "a stale partition:\n{text}");
        assert!(t.healthy());
        t.write_failed();
        assert!(!t.healthy());
        let text = local_stack::exposition::render(&t.registry());
        assert!(text.contains("\ndwh_sink_up 0\n"), "{text}");
        assert!(text.contains("\ndwh_sink_write_errors_total 1\n"), "{text}");
    }
}
