//! Prometheus text `/metrics` and `/health`.
//!
//! A plain struct of mutex'd maps rather than a metrics framework: the reader
//! has a handful of series, and `render()` as a pure function of the state is
//! easy to test. Hot paths (one call per event) take one short uncontended
//! lock; the sink reports deliveries through [`crate::sink::SinkMetrics`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
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

#[derive(Debug, Clone, Default)]
struct SourceStats {
    state: SourceState,
    lag_bytes: u64,
    lag_seconds: f64,
    confirmed_lsn: Lsn,
    server_wal_end: Lsn,
    reconnects: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct SnapshotStats {
    copied: u64,
    estimated: u64,
    done: bool,
}

#[derive(Debug, Default)]
struct State {
    events: BTreeMap<(String, &'static str), u64>,
    delivered: BTreeMap<String, (u64, u64)>,
    delivery_errors: BTreeMap<String, u64>,
    sources: BTreeMap<String, SourceStats>,
    snapshot: BTreeMap<(String, String), SnapshotStats>,
}

/// All reader metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    state: Mutex<State>,
}

impl Metrics {
    /// Empty metrics.
    pub fn new() -> Arc<Self> {
        Arc::new(Metrics::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts `n` change events of `op` on `topic` handed to the sink.
    pub fn events(&self, topic: &str, op: Op, n: u64) {
        let mut s = self.lock();
        match s.events.get_mut(&(topic.to_owned(), op.code())) {
            Some(v) => *v += n,
            None => {
                s.events.insert((topic.to_owned(), op.code()), n);
            }
        }
    }

    /// A record of `bytes` (key + value) was acknowledged by Kafka.
    pub fn record_delivered(&self, topic: &str, bytes: usize) {
        let mut s = self.lock();
        if let Some(v) = s.delivered.get_mut(topic) {
            v.0 += 1;
            v.1 += bytes as u64;
        } else {
            s.delivered.insert(topic.to_owned(), (1, bytes as u64));
        }
    }

    /// A record failed delivery.
    pub fn record_delivery_error(&self, topic: &str) {
        *self
            .lock()
            .delivery_errors
            .entry(topic.to_owned())
            .or_default() += 1;
    }

    /// Sets a source's state.
    pub fn set_state(&self, source: &str, state: SourceState) {
        self.lock()
            .sources
            .entry(source.to_owned())
            .or_default()
            .state = state;
    }

    /// Counts a reconnect of a source.
    pub fn reconnected(&self, source: &str) {
        self.lock()
            .sources
            .entry(source.to_owned())
            .or_default()
            .reconnects += 1;
    }

    /// Replication progress of a source: confirmed LSN, server WAL end, and
    /// the age of the oldest unconfirmed commit.
    pub fn set_progress(
        &self,
        source: &str,
        confirmed: Lsn,
        server_wal_end: Lsn,
        lag_seconds: f64,
    ) {
        let mut s = self.lock();
        let st = s.sources.entry(source.to_owned()).or_default();
        st.confirmed_lsn = confirmed;
        st.server_wal_end = st.server_wal_end.max(server_wal_end);
        st.lag_bytes = st.server_wal_end.saturating_sub(confirmed);
        st.lag_seconds = lag_seconds;
    }

    /// Snapshot progress of one table.
    pub fn snapshot_progress(
        &self,
        source: &str,
        table: &str,
        copied: u64,
        estimated: u64,
        done: bool,
    ) {
        self.lock().snapshot.insert(
            (source.to_owned(), table.to_owned()),
            SnapshotStats {
                copied,
                estimated,
                done,
            },
        );
    }

    /// Whether every source is streaming or snapshotting.
    pub fn healthy(&self) -> bool {
        let s = self.lock();
        !s.sources.is_empty()
            && s.sources
                .values()
                .all(|v| matches!(v.state, SourceState::Streaming | SourceState::Snapshotting))
    }

    /// `/health` body: one line per source.
    pub fn health(&self) -> String {
        let s = self.lock();
        let mut out = String::new();
        for (name, v) in &s.sources {
            let _ = writeln!(out, "{name} {} lag_bytes={}", v.state.as_str(), v.lag_bytes);
        }
        out
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let s = self.lock();
        let mut o = String::with_capacity(4096);
        o.push_str("# HELP cdc_events_total Change events handed to the sink, by topic and op.\n# TYPE cdc_events_total counter\n");
        for ((topic, op), v) in &s.events {
            let _ = writeln!(
                o,
                "cdc_events_total{{topic=\"{}\",op=\"{op}\"}} {v}",
                esc(topic)
            );
        }
        o.push_str("# HELP cdc_kafka_records_delivered_total Records acknowledged by Kafka.\n# TYPE cdc_kafka_records_delivered_total counter\n");
        for (topic, (n, _)) in &s.delivered {
            let _ = writeln!(
                o,
                "cdc_kafka_records_delivered_total{{topic=\"{}\"}} {n}",
                esc(topic)
            );
        }
        o.push_str("# HELP cdc_kafka_bytes_delivered_total Key and value bytes acknowledged by Kafka.\n# TYPE cdc_kafka_bytes_delivered_total counter\n");
        for (topic, (_, b)) in &s.delivered {
            let _ = writeln!(
                o,
                "cdc_kafka_bytes_delivered_total{{topic=\"{}\"}} {b}",
                esc(topic)
            );
        }
        o.push_str("# HELP cdc_kafka_delivery_errors_total Failed deliveries (the source reconnects and resends).\n# TYPE cdc_kafka_delivery_errors_total counter\n");
        for (topic, v) in &s.delivery_errors {
            let _ = writeln!(
                o,
                "cdc_kafka_delivery_errors_total{{topic=\"{}\"}} {v}",
                esc(topic)
            );
        }
        o.push_str("# HELP cdc_replication_lag_bytes Server WAL end minus the confirmed LSN.\n# TYPE cdc_replication_lag_bytes gauge\n");
        for (name, v) in &s.sources {
            let _ = writeln!(
                o,
                "cdc_replication_lag_bytes{{source=\"{}\"}} {}",
                esc(name),
                v.lag_bytes
            );
        }
        o.push_str("# HELP cdc_replication_lag_seconds Age of the oldest commit not yet confirmed.\n# TYPE cdc_replication_lag_seconds gauge\n");
        for (name, v) in &s.sources {
            let _ = writeln!(
                o,
                "cdc_replication_lag_seconds{{source=\"{}\"}} {:.3}",
                esc(name),
                v.lag_seconds
            );
        }
        o.push_str("# HELP cdc_confirmed_lsn Last LSN confirmed to Postgres (as an integer).\n# TYPE cdc_confirmed_lsn gauge\n");
        for (name, v) in &s.sources {
            let _ = writeln!(
                o,
                "cdc_confirmed_lsn{{source=\"{}\"}} {}",
                esc(name),
                v.confirmed_lsn
            );
        }
        o.push_str("# HELP cdc_source_up 1 when the source is streaming or snapshotting.\n# TYPE cdc_source_up gauge\n");
        for (name, v) in &s.sources {
            let up = u8::from(matches!(
                v.state,
                SourceState::Streaming | SourceState::Snapshotting
            ));
            let _ = writeln!(
                o,
                "cdc_source_up{{source=\"{}\",state=\"{}\"}} {up}",
                esc(name),
                v.state.as_str()
            );
        }
        o.push_str("# HELP cdc_source_reconnects_total Reconnects after a retryable error.\n# TYPE cdc_source_reconnects_total counter\n");
        for (name, v) in &s.sources {
            let _ = writeln!(
                o,
                "cdc_source_reconnects_total{{source=\"{}\"}} {}",
                esc(name),
                v.reconnects
            );
        }
        o.push_str("# HELP cdc_snapshot_rows_copied Rows copied by the initial snapshot.\n# TYPE cdc_snapshot_rows_copied gauge\n");
        for ((src, table), v) in &s.snapshot {
            let _ = writeln!(
                o,
                "cdc_snapshot_rows_copied{{source=\"{}\",table=\"{}\"}} {}",
                esc(src),
                esc(table),
                v.copied
            );
        }
        o.push_str("# HELP cdc_snapshot_rows_estimated Estimated rows (pg_class.reltuples) of a snapshot table.\n# TYPE cdc_snapshot_rows_estimated gauge\n");
        for ((src, table), v) in &s.snapshot {
            let _ = writeln!(
                o,
                "cdc_snapshot_rows_estimated{{source=\"{}\",table=\"{}\"}} {}",
                esc(src),
                esc(table),
                v.estimated
            );
        }
        o.push_str("# HELP cdc_snapshot_table_done 1 when the table's snapshot copy finished.\n# TYPE cdc_snapshot_table_done gauge\n");
        for ((src, table), v) in &s.snapshot {
            let _ = writeln!(
                o,
                "cdc_snapshot_table_done{{source=\"{}\",table=\"{}\"}} {}",
                esc(src),
                esc(table),
                u8::from(v.done)
            );
        }
        o
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

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
    let m1 = metrics.clone();
    let m2 = metrics;
    let app = Router::new()
        .route("/metrics", get(move || async move { m1.render() }))
        .route(
            "/health",
            get(move || async move {
                let code = if m2.healthy() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (code, m2.health())
            }),
        );
    let handle = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
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
        m.set_state("crm", SourceState::Streaming);
        m.set_progress("crm", 1000, 1500, 0.25);
        m.snapshot_progress("crm", "public.interaction", 10, 20, false);
        let text = m.render();
        assert!(text.contains("cdc_events_total{topic=\"crm.public.interaction\",op=\"c\"} 5"));
        assert!(
            text.contains("cdc_kafka_bytes_delivered_total{topic=\"crm.public.interaction\"} 100")
        );
        assert!(
            text.contains("cdc_kafka_delivery_errors_total{topic=\"crm.public.interaction\"} 1")
        );
        assert!(text.contains("cdc_replication_lag_bytes{source=\"crm\"} 500"));
        assert!(text.contains("cdc_replication_lag_seconds{source=\"crm\"} 0.250"));
        assert!(text.contains("cdc_confirmed_lsn{source=\"crm\"} 1000"));
        assert!(
            text.contains(
                "cdc_snapshot_rows_copied{source=\"crm\",table=\"public.interaction\"} 10"
            )
        );
        assert!(m.healthy());
        m.set_state("erp", SourceState::Connecting);
        assert!(!m.healthy());
    }
}
