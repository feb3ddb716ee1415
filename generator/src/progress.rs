//! Counters of what was written, the progress line, and `/metrics`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::op::{Change, Database, Table};

/// Counters shared by the writers, the progress line and `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    rows: [[AtomicU64; 3]; 9],
    /// Events whose instashop batch committed.
    pub events: AtomicU64,
    /// Purchases whose instashop batch committed.
    pub purchases: AtomicU64,
    /// Database transactions committed, all databases.
    pub batches: AtomicU64,
    /// Guarded updates and deletes that found the row changed or still
    /// referenced (another writer on the same databases), and skipped it.
    pub skipped: AtomicU64,
    /// Times a database was found unavailable.
    pub unavailable: AtomicU64,
}

impl Counters {
    /// Adds rows written.
    pub fn add_rows(&self, table: Table, change: Change, n: u64) {
        self.rows[table.index()][change.index()].fetch_add(n, Ordering::Relaxed);
    }

    /// Rows written to a table by one kind of change.
    pub fn rows(&self, table: Table, change: Change) -> u64 {
        self.rows[table.index()][change.index()].load(Ordering::Relaxed)
    }

    /// Rows written to a database, all changes.
    pub fn database_rows(&self, db: Database) -> u64 {
        Table::ALL
            .iter()
            .filter(|t| t.database() == db)
            .flat_map(|t| Change::ALL.iter().map(|c| self.rows(*t, *c)))
            .sum()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str("# HELP generator_rows_total Rows written, by table and change.\n");
        s.push_str("# TYPE generator_rows_total counter\n");
        for t in Table::ALL {
            for c in Change::ALL {
                let _ = writeln!(
                    s,
                    "generator_rows_total{{database=\"{}\",table=\"{}\",op=\"{}\"}} {}",
                    t.database().name(),
                    t.name(),
                    c.name(),
                    self.rows(t, c)
                );
            }
        }
        for (name, help, v) in [
            ("generator_events_total", "Events written.", &self.events),
            (
                "generator_purchases_total",
                "Purchases written.",
                &self.purchases,
            ),
            (
                "generator_batches_total",
                "Database transactions committed.",
                &self.batches,
            ),
            (
                "generator_skipped_updates_total",
                "Guarded updates and deletes skipped because the row had changed.",
                &self.skipped,
            ),
            (
                "generator_errors_total",
                "Times a database was unavailable (then retried).",
                &self.unavailable,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(s, "{name} {}", v.load(Ordering::Relaxed));
        }
        s
    }
}

/// Serves `GET /metrics` until shutdown.
pub async fn serve(
    listener: tokio::net::TcpListener,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let c = counters.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    c.render(),
                )
            }
        }),
    );
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "metrics endpoint stopped");
    }
}

/// Logs a progress line every `every` until shutdown.
pub async fn report(counters: Arc<Counters>, every: Duration, shutdown: CancellationToken) {
    let start = Instant::now();
    let mut last = (Instant::now(), 0u64);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let events = counters.events.load(Ordering::Relaxed);
        let now = Instant::now();
        let rate = (events - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
        last = (now, events);
        tracing::info!(
            elapsed_s = start.elapsed().as_secs(),
            events_per_s = format!("{rate:.0}"),
            events,
            purchases = counters.purchases.load(Ordering::Relaxed),
            instashop_rows = counters.database_rows(Database::Instashop),
            crm_rows = counters.database_rows(Database::Crm),
            erp_rows = counters.database_rows(Database::Erp),
            ecommerce_rows = counters.database_rows(Database::Ecommerce),
            "progress"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let c = Counters::default();
        c.add_rows(Table::Shipment, Change::Update, 3);
        c.purchases.fetch_add(2, Ordering::Relaxed);
        let text = c.render();
        assert!(text.contains(
            "generator_rows_total{database=\"ecommerce\",table=\"shipment\",op=\"update\"} 3\n"
        ));
        assert!(text.contains("generator_purchases_total 2\n"));
        assert_eq!(c.database_rows(Database::Ecommerce), 3);
    }
}
