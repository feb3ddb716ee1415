//! The reader's metrics for `/metrics` and its `/health`.
//!
//! `prometheus-client` counters and gauges, encoded and served by
//! [`local_stack::exposition`]; the per-source state behind `/health` and the
//! `state` label of `cdc_source_up` sits in one short mutex. Hot paths (one
//! call per event batch) take the families' read locks only; the sink
//! reports deliveries through [`crate::sink::SinkMetrics`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::change::{Lsn, Op};
use crate::error::Error;

/// State of one source pipeline, for `/health`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SourceState {
    /// Not connected yet / reconnecting.
    #[default]
    Connecting,
    /// Copying the initial snapshot.
    Snapshotting,
    /// Streaming from the slot.
    Streaming,
    /// Stopped by an error that needs a fix.
    Failed,
}

impl SourceState {
    fn as_str(self) -> &'static str {
        match self {
            SourceState::Connecting => "connecting",
            SourceState::Snapshotting => "snapshotting",
            SourceState::Streaming => "streaming",
            SourceState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TopicOp {
    topic: String,
    op: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TopicLabel {
    topic: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceStateLabels {
    source: String,
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceTable {
    source: String,
    table: String,
}

/// What `/health` and the `state` label need per source.
#[derive(Debug, Clone, Copy, Default)]
struct SourceStats {
    state: SourceState,
    lag_bytes: u64,
    server_wal_end: Lsn,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// All reader metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    sources: Mutex<BTreeMap<String, SourceStats>>,
    events: Family<TopicOp, Counter>,
    records_delivered: Family<TopicLabel, Counter>,
    bytes_delivered: Family<TopicLabel, Counter>,
    delivery_errors: Family<TopicLabel, Counter>,
    lag_bytes: Family<SourceLabel, Gauge>,
    lag_seconds: Family<SourceLabel, FloatGauge>,
    confirmed_lsn: Family<SourceLabel, Gauge>,
    source_up: Family<SourceStateLabels, Gauge>,
    reconnects: Family<SourceLabel, Counter>,
    snapshot_copied: Family<SourceTable, Gauge>,
    snapshot_estimated: Family<SourceTable, Gauge>,
    snapshot_done: Family<SourceTable, Gauge>,
    signals_ignored: Family<SourceLabel, Counter>,
    incremental_chunks: Family<SourceTable, Counter>,
    incremental_rows: Family<SourceTable, Counter>,
    incremental_dropped: Family<SourceTable, Counter>,
    incremental_estimated: Family<SourceTable, Gauge>,
    tables_skipped: Family<SkippedTable, Gauge>,
    /// Tables an incremental snapshot left out, per source, with why.
    skipped: Mutex<BTreeMap<(String, String), String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SkippedTable {
    source: String,
    table: String,
    reason: String,
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn source(name: &str) -> SourceLabel {
    SourceLabel {
        source: name.to_owned(),
    }
}

fn topic(name: &str) -> TopicLabel {
    TopicLabel {
        topic: name.to_owned(),
    }
}

impl Metrics {
    /// Empty metrics.
    pub fn new() -> Arc<Self> {
        Arc::new(Metrics::default())
    }

    fn sources(&self) -> MutexGuard<'_, BTreeMap<String, SourceStats>> {
        self.sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts `n` change events of `op` on `topic` handed to the sink.
    pub fn events(&self, topic: &str, op: Op, n: u64) {
        self.events
            .get_or_create(&TopicOp {
                topic: topic.to_owned(),
                op: op.code(),
            })
            .inc_by(n);
    }

    /// A record of `bytes` (key + value) was acknowledged by Kafka.
    pub fn record_delivered(&self, topic_name: &str, bytes: usize) {
        let label = topic(topic_name);
        self.records_delivered.get_or_create(&label).inc();
        self.bytes_delivered
            .get_or_create(&label)
            .inc_by(bytes as u64);
    }

    /// A record failed delivery.
    pub fn record_delivery_error(&self, topic_name: &str) {
        self.delivery_errors.get_or_create(&topic(topic_name)).inc();
    }

    /// Sets a source's state.
    pub fn set_state(&self, name: &str, state: SourceState) {
        let mut sources = self.sources();
        let stats = sources.entry(name.to_owned()).or_default();
        let old = std::mem::replace(&mut stats.state, state);
        if old != state {
            self.source_up.remove(&SourceStateLabels {
                source: name.to_owned(),
                state: old.as_str(),
            });
        }
        let up = matches!(state, SourceState::Streaming | SourceState::Snapshotting);
        self.source_up
            .get_or_create(&SourceStateLabels {
                source: name.to_owned(),
                state: state.as_str(),
            })
            .set(i64::from(up));
        // A source's series exist from its first state on.
        self.reconnects.get_or_create(&source(name)).inc_by(0);
    }

    /// Counts a reconnect of a source.
    pub fn reconnected(&self, name: &str) {
        self.reconnects.get_or_create(&source(name)).inc();
    }

    /// Replication progress of a source: confirmed LSN, server WAL end, and
    /// the age of the oldest unconfirmed commit.
    pub fn set_progress(&self, name: &str, confirmed: Lsn, server_wal_end: Lsn, lag_seconds: f64) {
        let lag_bytes = {
            let mut sources = self.sources();
            let stats = sources.entry(name.to_owned()).or_default();
            stats.server_wal_end = stats.server_wal_end.max(server_wal_end);
            stats.lag_bytes = stats.server_wal_end.saturating_sub(confirmed);
            stats.lag_bytes
        };
        let label = source(name);
        self.confirmed_lsn
            .get_or_create(&label)
            .set(gauge_value(confirmed));
        self.lag_bytes
            .get_or_create(&label)
            .set(gauge_value(lag_bytes));
        self.lag_seconds.get_or_create(&label).set(lag_seconds);
    }

    /// Snapshot progress of one table.
    pub fn snapshot_progress(
        &self,
        name: &str,
        table: &str,
        copied: u64,
        estimated: u64,
        done: bool,
    ) {
        let label = SourceTable {
            source: name.to_owned(),
            table: table.to_owned(),
        };
        self.snapshot_copied
            .get_or_create(&label)
            .set(gauge_value(copied));
        self.snapshot_estimated
            .get_or_create(&label)
            .set(gauge_value(estimated));
        self.snapshot_done
            .get_or_create(&label)
            .set(i64::from(done));
    }

    /// Counts a malformed signal row that was ignored.
    pub fn signal_ignored(&self, name: &str) {
        self.signals_ignored.get_or_create(&source(name)).inc();
    }

    /// Counts one incremental snapshot chunk of `table`: `sent` rows went
    /// out, `dropped` were superseded by streamed changes.
    pub fn incremental_chunk(&self, name: &str, table: &str, sent: u64, dropped: u64) {
        let label = SourceTable {
            source: name.to_owned(),
            table: table.to_owned(),
        };
        self.incremental_chunks.get_or_create(&label).inc();
        self.incremental_rows.get_or_create(&label).inc_by(sent);
        self.incremental_dropped
            .get_or_create(&label)
            .inc_by(dropped);
    }

    /// The estimated row count (`pg_class.reltuples`) of a table whose
    /// incremental snapshot runs.
    pub fn incremental_estimated(&self, name: &str, table: &str, estimated: u64) {
        self.incremental_estimated
            .get_or_create(&SourceTable {
                source: name.to_owned(),
                table: table.to_owned(),
            })
            .set(gauge_value(estimated));
    }

    /// An incremental snapshot left `table` out (`reason` names the fix,
    /// such as the GRANT): shown in `/metrics` and `/health` until a later
    /// snapshot of the table finishes.
    pub fn table_skipped(&self, name: &str, table: &str, reason: &str) {
        if let Ok(mut skipped) = self.skipped.lock() {
            let key = (name.to_owned(), table.to_owned());
            if let Some(old) = skipped.insert(key, reason.to_owned()) {
                self.tables_skipped.remove(&SkippedTable {
                    source: name.to_owned(),
                    table: table.to_owned(),
                    reason: old,
                });
            }
        }
        self.tables_skipped
            .get_or_create(&SkippedTable {
                source: name.to_owned(),
                table: table.to_owned(),
                reason: reason.to_owned(),
            })
            .set(1);
    }

    /// A snapshot of `table` finished: it is no longer reported as skipped.
    pub fn table_snapshotted(&self, name: &str, table: &str) {
        let old = self
            .skipped
            .lock()
            .ok()
            .and_then(|mut s| s.remove(&(name.to_owned(), table.to_owned())));
        if let Some(reason) = old {
            self.tables_skipped.remove(&SkippedTable {
                source: name.to_owned(),
                table: table.to_owned(),
                reason,
            });
        }
    }

    /// Whether every source is streaming or snapshotting.
    pub fn healthy(&self) -> bool {
        let s = self.sources();
        !s.is_empty()
            && s.values()
                .all(|v| matches!(v.state, SourceState::Streaming | SourceState::Snapshotting))
    }

    /// `/health` body: one line per source.
    pub fn health(&self) -> String {
        let s = self.sources();
        let mut out = String::new();
        for (name, v) in s.iter() {
            let _ = writeln!(out, "{name} {} lag_bytes={}", v.state.as_str(), v.lag_bytes);
        }
        if let Ok(skipped) = self.skipped.lock() {
            for ((name, table), reason) in skipped.iter() {
                let _ = writeln!(out, "{name} skipped {table}: {reason}");
            }
        }
        out
    }

    /// The metrics as a registry for `/metrics` (counters without their
    /// `_total`, which the encoder adds).
    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        r.register(
            "cdc_events",
            "Change events handed to the sink, by topic and op",
            self.events.clone(),
        );
        r.register(
            "cdc_kafka_records_delivered",
            "Records acknowledged by Kafka",
            self.records_delivered.clone(),
        );
        r.register(
            "cdc_kafka_bytes_delivered",
            "Key and value bytes acknowledged by Kafka",
            self.bytes_delivered.clone(),
        );
        r.register(
            "cdc_kafka_delivery_errors",
            "Failed deliveries (the source reconnects and resends)",
            self.delivery_errors.clone(),
        );
        r.register(
            "cdc_replication_lag_bytes",
            "Server WAL end minus the confirmed LSN",
            self.lag_bytes.clone(),
        );
        r.register(
            "cdc_replication_lag_seconds",
            "Age of the oldest commit not yet confirmed",
            self.lag_seconds.clone(),
        );
        r.register(
            "cdc_confirmed_lsn",
            "Last LSN confirmed to Postgres (as an integer)",
            self.confirmed_lsn.clone(),
        );
        r.register(
            "cdc_source_up",
            "1 when the source is streaming or snapshotting",
            self.source_up.clone(),
        );
        r.register(
            "cdc_signals_ignored",
            "Malformed signal rows logged and ignored",
            self.signals_ignored.clone(),
        );
        r.register(
            "cdc_incremental_chunks",
            "Incremental snapshot chunks sent, by table",
            self.incremental_chunks.clone(),
        );
        r.register(
            "cdc_incremental_rows",
            "Incremental snapshot rows sent (op r), by table",
            self.incremental_rows.clone(),
        );
        r.register(
            "cdc_incremental_rows_superseded",
            "Incremental snapshot rows not sent because the stream delivered a newer state",
            self.incremental_dropped.clone(),
        );
        r.register(
            "cdc_incremental_table_skipped",
            "1 for a table an incremental snapshot left out (reason: the fix, e.g. the GRANT)",
            self.tables_skipped.clone(),
        );
        r.register(
            "cdc_incremental_rows_estimated",
            "Estimated rows of a table under incremental snapshot (pg_class.reltuples)",
            self.incremental_estimated.clone(),
        );
        r.register(
            "cdc_source_reconnects",
            "Reconnects after a retryable error",
            self.reconnects.clone(),
        );
        r.register(
            "cdc_snapshot_rows_copied",
            "Rows copied by the initial snapshot",
            self.snapshot_copied.clone(),
        );
        r.register(
            "cdc_snapshot_rows_estimated",
            "Estimated rows (pg_class.reltuples) of a snapshot table",
            self.snapshot_estimated.clone(),
        );
        r.register(
            "cdc_snapshot_table_done",
            "1 when the table's snapshot copy finished",
            self.snapshot_done.clone(),
        );
        r
    }
}

/// The sink's delivery hooks (implemented here, next to the counters).
impl crate::sink::SinkMetrics for Metrics {
    fn record_delivered(&self, topic: &str, bytes: usize) {
        Metrics::record_delivered(self, topic, bytes);
    }

    fn record_delivery_error(&self, topic: &str) {
        Metrics::record_delivery_error(self, topic);
    }
}

/// Serves `/metrics` and `/health` on `addr` until `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Io {
            context: format!("bind metrics address {addr} (set --metrics-addr to a free port)"),
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| Error::Io {
        context: "metrics listener address".to_owned(),
        source,
    })?;
    let registry = Arc::new(metrics.registry());
    let health: local_stack::exposition::Health =
        Arc::new(move || (metrics.healthy(), metrics.health()));
    let handle = tokio::spawn(local_stack::exposition::serve(
        listener,
        registry,
        Some(health),
        shutdown,
    ));
    Ok((bound, handle))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn render_has_every_family() {
        let m = Metrics::default();
        m.events("crm.public.interaction", Op::Create, 3);
        m.events("crm.public.interaction", Op::Create, 2);
        m.record_delivered("crm.public.interaction", 100);
        m.record_delivery_error("crm.public.interaction");
        m.set_state("crm", SourceState::Snapshotting);
        m.set_state("crm", SourceState::Streaming);
        m.set_progress("crm", 1000, 1500, 0.25);
        m.snapshot_progress("crm", "public.interaction", 10, 20, false);
        let text = local_stack::exposition::render(&m.registry());
        for line in [
            "cdc_events_total{topic=\"crm.public.interaction\",op=\"c\"} 5\n",
            "cdc_kafka_records_delivered_total{topic=\"crm.public.interaction\"} 1\n",
            "cdc_kafka_bytes_delivered_total{topic=\"crm.public.interaction\"} 100\n",
            "cdc_kafka_delivery_errors_total{topic=\"crm.public.interaction\"} 1\n",
            "cdc_replication_lag_bytes{source=\"crm\"} 500\n",
            "cdc_replication_lag_seconds{source=\"crm\"} 0.25\n",
            "cdc_confirmed_lsn{source=\"crm\"} 1000\n",
            "cdc_source_up{source=\"crm\",state=\"streaming\"} 1\n",
            "cdc_source_reconnects_total{source=\"crm\"} 0\n",
            "cdc_snapshot_rows_copied{source=\"crm\",table=\"public.interaction\"} 10\n",
            "cdc_snapshot_rows_estimated{source=\"crm\",table=\"public.interaction\"} 20\n",
            "cdc_snapshot_table_done{source=\"crm\",table=\"public.interaction\"} 0\n",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        // One state per source: the former one's series is gone.
        assert!(!text.contains("state=\"snapshotting\""), "{text}");
        assert!(m.healthy());
        m.set_state("erp", SourceState::Connecting);
        assert!(!m.healthy());
    }

    #[test]
    fn a_skipped_table_shows_until_a_snapshot_of_it_finishes() {
        let m = Metrics::default();
        m.set_state("shop", SourceState::Streaming);
        m.table_skipped("shop", "public.secret", "GRANT SELECT ON a TO b");
        m.table_skipped(
            "shop",
            "public.secret",
            "GRANT SELECT ON public.secret TO cdc",
        );
        let text = local_stack::exposition::render(&m.registry());
        assert!(
            text.contains("cdc_incremental_table_skipped{source=\"shop\",table=\"public.secret\",reason=\"GRANT SELECT ON public.secret TO cdc\"} 1\n"),
            "{text}"
        );
        assert!(
            !text.contains("ON a TO b"),
            "the former reason is gone: {text}"
        );
        assert!(
            m.health()
                .contains("shop skipped public.secret: GRANT SELECT ON public.secret TO cdc")
        );
        assert!(m.healthy(), "the other tables flow: still healthy");
        m.table_snapshotted("shop", "public.secret");
        let text = local_stack::exposition::render(&m.registry());
        assert!(!text.contains("public.secret"), "{text}");
        assert!(!m.health().contains("skipped"));
    }
}
