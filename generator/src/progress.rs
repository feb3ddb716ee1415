//! Counters of what was written, the progress line, and `/metrics`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::op::{Change, Database, Table};

/// Labels of `generator_rows_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RowLabels {
    database: &'static str,
    table: &'static str,
    op: &'static str,
}

/// Counters shared by the writers, the progress line and `/metrics`.
#[derive(Debug)]
pub struct Counters {
    rows_family: Family<RowLabels, Counter>,
    /// The family's counters by table and change, fetched once.
    rows: Vec<[Counter; 3]>,
    /// Events whose instashop batch committed.
    pub events: Counter,
    /// Purchases whose instashop batch committed.
    pub purchases: Counter,
    /// Database transactions committed, all databases.
    pub batches: Counter,
    /// Guarded updates and deletes that found the row changed or still
    /// referenced (another writer on the same databases), and skipped it.
    pub skipped: Counter,
    /// Times a database was found unavailable.
    pub unavailable: Counter,
}

impl Default for Counters {
    fn default() -> Counters {
        let rows_family = Family::<RowLabels, Counter>::default();
        let rows = Table::ALL
            .iter()
            .map(|t| {
                Change::ALL.map(|c| {
                    rows_family.get_or_create_owned(&RowLabels {
                        database: t.database().name(),
                        table: t.name(),
                        op: c.name(),
                    })
                })
            })
            .collect();
        Counters {
            rows_family,
            rows,
            events: Counter::default(),
            purchases: Counter::default(),
            batches: Counter::default(),
            skipped: Counter::default(),
            unavailable: Counter::default(),
        }
    }
}

impl Counters {
    /// Adds rows written.
    pub fn add_rows(&self, table: Table, change: Change, n: u64) {
        self.rows[table.index()][change.index()].inc_by(n);
    }

    /// Rows written to a table by one kind of change.
    pub fn rows(&self, table: Table, change: Change) -> u64 {
        self.rows[table.index()][change.index()].get()
    }

    /// Rows written to a database, all changes.
    pub fn database_rows(&self, db: Database) -> u64 {
        Table::ALL
            .iter()
            .filter(|t| t.database() == db)
            .flat_map(|t| Change::ALL.iter().map(|c| self.rows(*t, *c)))
            .sum()
    }

    /// The counters as a registry for `/metrics`.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::default();
        registry.register(
            "generator_rows",
            "Rows written, by table and change",
            self.rows_family.clone(),
        );
        for (name, help, counter) in [
            ("generator_events", "Events written", &self.events),
            ("generator_purchases", "Purchases written", &self.purchases),
            (
                "generator_batches",
                "Database transactions committed",
                &self.batches,
            ),
            (
                "generator_skipped_updates",
                "Guarded updates and deletes skipped because the row had changed",
                &self.skipped,
            ),
            (
                "generator_errors",
                "Times a database was unavailable (then retried)",
                &self.unavailable,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        registry
    }
}

/// Serves `GET /metrics` until shutdown.
pub async fn serve(
    listener: tokio::net::TcpListener,
    counters: &Counters,
    shutdown: CancellationToken,
) {
    let registry = Arc::new(counters.registry());
    local_stack::exposition::serve(listener, registry, None, shutdown).await;
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
        let events = counters.events.get();
        let now = Instant::now();
        let rate = (events - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
        last = (now, events);
        tracing::info!(
            elapsed_s = start.elapsed().as_secs(),
            events_per_s = format!("{rate:.0}"),
            events,
            purchases = counters.purchases.get(),
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
        c.purchases.inc_by(2);
        let text = local_stack::exposition::render(&c.registry());
        assert!(text.contains(
            "generator_rows_total{database=\"ecommerce\",table=\"shipment\",op=\"update\"} 3\n"
        ));
        assert!(text.contains("generator_purchases_total 2\n"));
        assert_eq!(c.database_rows(Database::Ecommerce), 3);
    }
}
