//! What the cdc-reader and the metrics-consumer report on their Prometheus
//! endpoints, reduced to the numbers the health panel shows.
//!
//! Pure. Metric names are matched by their documented suffixes (`..._lag_bytes`,
//! `..._dlq_...`) rather than by full name, and the database is taken from a
//! `database`, `db`, `source` or `slot` label, so a renamed prefix on the other
//! binaries degrades nothing. Everything is optional: an endpoint that is down
//! or a metric that is missing reads as `None` ("no data" on the page).

use std::collections::BTreeMap;

use catalog::Database;
use serde_json::{Value, json};

use crate::prometheus::Sample;

/// Replication progress of one source database, as the reader reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceReading {
    /// WAL bytes between the server's current LSN and the last confirmed one.
    pub lag_bytes: Option<f64>,
    /// Seconds between the newest WAL write and the last confirmed event.
    pub lag_seconds: Option<f64>,
    /// Seconds since the reader last emitted an event of this database.
    pub last_event_age_seconds: Option<f64>,
    /// Last confirmed LSN, as a number (the reader exports it as a gauge).
    pub confirmed_lsn: Option<f64>,
    /// Change events emitted, all tables and operations.
    pub events_total: Option<f64>,
    /// The reader's state of this source (`streaming`, `snapshotting`,
    /// `connecting`, `failed`), from the `state` label of `cdc_source_up`.
    pub state: Option<String>,
    /// Incremental snapshots per table (`schema.table`), from the
    /// `cdc_incremental_*` series.
    pub snapshots: BTreeMap<String, SnapshotReading>,
    /// Tables an incremental snapshot left out, with the reader's reason
    /// (the fix, e.g. the GRANT).
    pub skipped: BTreeMap<String, String>,
}

/// Progress of one table's incremental snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotReading {
    /// Chunks read.
    pub chunks: Option<f64>,
    /// Rows sent.
    pub rows: Option<f64>,
    /// The table's estimated rows when its turn came (`pg_class.reltuples`).
    pub estimated: Option<f64>,
    /// Rows sent per second since the previous tick (filled by
    /// [`Activity::observe`]).
    pub rows_per_second: Option<f64>,
}

/// The reader's endpoint, reduced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReaderReading {
    /// Per database (`instashop`, `crm`, `erp`, `ecommerce`).
    pub sources: BTreeMap<String, SourceReading>,
}

/// The consumer's endpoint, reduced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConsumerReading {
    /// Messages behind the partitions' high watermarks, all partitions.
    pub lag: Option<f64>,
    /// Messages sent to the dead-letter topic.
    pub dlq: Option<f64>,
    /// Change events applied to Redis, all tables.
    pub events_applied: Option<f64>,
    /// Source commit to applied in Redis, newest event, in milliseconds.
    pub end_to_end_lag_ms: Option<f64>,
}

/// The database a sample belongs to, from its labels.
fn database_of(sample: &Sample) -> Option<String> {
    for key in ["database", "db", "source"] {
        if let Some(v) = sample.label(key) {
            return Some(v.to_owned());
        }
    }
    if let Some(slot) = sample.label("slot") {
        return Some(slot.rsplit('_').next().unwrap_or(slot).to_owned());
    }
    // Per-topic series: `<db>.public.<table>`.
    sample
        .label("topic")
        .and_then(|topic| topic.split('.').next())
        .filter(|db| !db.is_empty())
        .map(str::to_owned)
}

fn add(slot: &mut Option<f64>, value: f64) {
    if value.is_finite() {
        *slot = Some(slot.unwrap_or(0.0) + value);
    }
}

fn max(slot: &mut Option<f64>, value: f64) {
    if value.is_finite() {
        *slot = Some(slot.map_or(value, |old| old.max(value)));
    }
}

/// Reduces the reader's samples. `now_seconds` turns a last-event timestamp
/// gauge into an age.
pub fn reader(samples: &[Sample], now_seconds: f64) -> ReaderReading {
    let mut sources: BTreeMap<String, SourceReading> = BTreeMap::new();
    for sample in samples {
        let name = sample.name.as_str();
        let Some(db) = database_of(sample) else {
            continue;
        };
        let entry = sources.entry(db).or_default();
        if name == "cdc_incremental_table_skipped" {
            if let (Some(table), true) = (sample.label("table"), sample.value > 0.0) {
                let reason = sample.label("reason").unwrap_or_default();
                entry.skipped.insert(table.to_owned(), reason.to_owned());
            }
        } else if name.starts_with("cdc_incremental_") {
            let Some(table) = sample.label("table") else {
                continue;
            };
            let snapshot = entry.snapshots.entry(table.to_owned()).or_default();
            if name.starts_with("cdc_incremental_chunks") {
                add(&mut snapshot.chunks, sample.value);
            } else if name.starts_with("cdc_incremental_rows_estimated") {
                max(&mut snapshot.estimated, sample.value);
            } else if name == "cdc_incremental_rows_total" {
                add(&mut snapshot.rows, sample.value);
            }
        } else if name.ends_with("source_up") {
            if let Some(state) = sample.label("state") {
                entry.state = Some(state.to_owned());
            }
        } else if name.ends_with("lag_bytes") {
            max(&mut entry.lag_bytes, sample.value);
        } else if name.ends_with("lag_seconds") {
            max(&mut entry.lag_seconds, sample.value);
        } else if name.contains("last_event") && name.contains("age") {
            max(&mut entry.last_event_age_seconds, sample.value);
        } else if name.contains("last_event") && name.contains("timestamp") {
            let seconds = if name.ends_with("_ms") {
                sample.value / 1000.0
            } else {
                sample.value
            };
            if seconds > 0.0 {
                max(
                    &mut entry.last_event_age_seconds,
                    (now_seconds - seconds).max(0.0),
                );
            }
        } else if name.contains("lsn") {
            max(&mut entry.confirmed_lsn, sample.value);
        } else if name.contains("events") && name.ends_with("_total") && !name.contains("error") {
            add(&mut entry.events_total, sample.value);
        }
    }
    ReaderReading { sources }
}

/// Remembers when each source's event counter last moved, to give an age of
/// the last event to readers that export no timestamp of their own. Ages are
/// only known once a change was seen by this dashboard process.
#[derive(Debug, Default)]
pub struct Activity {
    seen: BTreeMap<String, (f64, Option<i64>)>,
    /// Rows sent per (database, table) incremental snapshot, and when.
    snapshot_rows: BTreeMap<(String, String), (f64, i64)>,
}

impl Activity {
    /// Records this tick's counters and fills `last_event_age_seconds` where
    /// the reader did not provide it.
    pub fn observe(&mut self, reading: &mut ReaderReading, now_ms: i64) {
        for (db, source) in &mut reading.sources {
            for (table, snapshot) in &mut source.snapshots {
                let Some(rows) = snapshot.rows else {
                    continue;
                };
                let key = (db.clone(), table.clone());
                if let Some((old, at)) = self.snapshot_rows.get(&key) {
                    snapshot.rows_per_second =
                        rate(Some(*old), Some(rows), (now_ms - at) as f64 / 1000.0);
                }
                self.snapshot_rows.insert(key, (rows, now_ms));
            }
            let Some(total) = source.events_total else {
                continue;
            };
            let changed_at = match self.seen.get(db) {
                // A counter that went back is a restarted reader: a change too.
                Some((old, at)) if *old == total => *at,
                Some(_) => Some(now_ms),
                None => None,
            };
            self.seen.insert(db.clone(), (total, changed_at));
            if source.last_event_age_seconds.is_none() {
                source.last_event_age_seconds =
                    changed_at.map(|at| (now_ms - at).max(0) as f64 / 1000.0);
            }
        }
    }
}

/// Reduces the consumer's samples.
pub fn consumer(samples: &[Sample]) -> ConsumerReading {
    let mut reading = ConsumerReading::default();
    for sample in samples {
        let name = sample.name.as_str();
        if name.contains("dlq") || name.contains("dead_letter") {
            if !name.ends_with("_created") {
                add(&mut reading.dlq, sample.value);
            }
        } else if name.ends_with("consumer_lag") || name.ends_with("lag_messages") {
            add(&mut reading.lag, sample.value);
        } else if name.contains("events_applied") && !name.ends_with("_created") {
            add(&mut reading.events_applied, sample.value);
        } else if name.ends_with("end_to_end_lag_ms") {
            max(&mut reading.end_to_end_lag_ms, sample.value);
        }
    }
    reading
}

/// Events per second between two readings of a counter; `None` when either
/// is missing, time did not advance, or the counter went back (a restart).
pub fn rate(previous: Option<f64>, current: Option<f64>, elapsed_seconds: f64) -> Option<f64> {
    let (p, c) = (previous?, current?);
    (elapsed_seconds > 0.0 && c >= p).then(|| (c - p) / elapsed_seconds)
}

fn number(value: Option<f64>) -> Value {
    match value {
        Some(v) if v.is_finite() && v.fract() == 0.0 && v.abs() < 9.0e15 => json!(v as i64),
        Some(v) if v.is_finite() => json!(v),
        _ => Value::Null,
    }
}

/// The per-database rows of the health panel, in the fixed database order
/// (plus any other database the reader names).
pub fn sources_json(reader: Option<&ReaderReading>) -> Value {
    let known = Database::ALL.map(Database::name);
    let mut names: Vec<String> = known.iter().map(|d| (*d).to_owned()).collect();
    if let Some(r) = reader {
        names.extend(
            r.sources
                .keys()
                .filter(|k| !known.contains(&k.as_str()))
                .cloned(),
        );
    }
    let rows: Vec<Value> = names
        .iter()
        .map(|db| {
            let s = reader
                .and_then(|r| r.sources.get(db))
                .cloned()
                .unwrap_or_default();
            json!({
                "database": db,
                "lag_bytes": number(s.lag_bytes),
                "lag_seconds": number(s.lag_seconds),
                "last_event_age_seconds": number(s.last_event_age_seconds),
                "confirmed_lsn": number(s.confirmed_lsn),
                "events_total": number(s.events_total),
                "state": s.state,
                "skipped": s.skipped.iter().map(|(table, reason)| json!({
                    "table": table,
                    "reason": reason,
                })).collect::<Vec<_>>(),
                "snapshots": s.snapshots.iter().map(|(table, p)| json!({
                    "table": table,
                    "chunks": number(p.chunks),
                    "rows": number(p.rows),
                    "estimated": number(p.estimated),
                    "rows_per_second": p.rows_per_second.map_or(Value::Null, |v| json!(v.round())),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Value::Array(rows)
}

/// The consumer part of the health JSON.
pub fn consumer_json(reading: Option<&ConsumerReading>, events_per_second: Option<f64>) -> Value {
    let r = reading.cloned().unwrap_or_default();
    json!({
        "lag": number(r.lag),
        "dlq": number(r.dlq),
        "events_applied": number(r.events_applied),
        "end_to_end_lag_ms": number(r.end_to_end_lag_ms),
        "events_per_second": events_per_second.map_or(Value::Null, |v| json!((v * 10.0).round() / 10.0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prometheus::parse;

    #[test]
    fn reader_samples_reduce_per_database() {
        let samples = parse(
            "cdc_reader_replication_lag_bytes{database=\"crm\"} 4096\n\
             cdc_reader_replication_lag_seconds{database=\"crm\"} 1.5\n\
             cdc_reader_confirmed_flush_lsn{database=\"crm\"} 23456789\n\
             cdc_reader_last_event_timestamp_seconds{database=\"crm\"} 990\n\
             cdc_reader_events_total{database=\"instashop\",table=\"transaction\",op=\"c\"} 10\n\
             cdc_reader_events_total{database=\"instashop\",table=\"product\",op=\"u\"} 5\n\
             cdc_reader_replication_lag_bytes{slot=\"instashop_cdc_erp\"} 12\n\
             process_start_time_seconds 1\n",
        );
        let r = reader(&samples, 1000.0);
        let crm = &r.sources["crm"];
        assert_eq!(crm.lag_bytes, Some(4096.0));
        assert_eq!(crm.lag_seconds, Some(1.5));
        assert_eq!(crm.confirmed_lsn, Some(23_456_789.0));
        assert_eq!(crm.last_event_age_seconds, Some(10.0));
        assert_eq!(r.sources["instashop"].events_total, Some(15.0));
        assert_eq!(r.sources["erp"].lag_bytes, Some(12.0));
        assert_eq!(r.sources.len(), 3);
    }

    #[test]
    fn incremental_snapshot_progress_per_table_with_its_rate() {
        let text = |rows: u64| {
            format!(
                "cdc_incremental_chunks_total{{source=\"instashop\",table=\"public.product\"}} 3\n\
                 cdc_incremental_rows_total{{source=\"instashop\",table=\"public.product\"}} {rows}\n\
                 cdc_incremental_rows_superseded_total{{source=\"instashop\",table=\"public.product\"}} 7\n\
                 cdc_incremental_rows_estimated{{source=\"instashop\",table=\"public.product\"}} 10000\n\
                 cdc_source_up{{source=\"instashop\",state=\"streaming\"}} 1\n"
            )
        };
        let mut activity = Activity::default();
        let mut first = reader(&parse(&text(4096)), 0.0);
        activity.observe(&mut first, 1_000);
        let p = &first.sources["instashop"].snapshots["public.product"];
        assert_eq!(
            (p.chunks, p.rows, p.estimated, p.rows_per_second),
            (Some(3.0), Some(4096.0), Some(10000.0), None)
        );
        let mut second = reader(&parse(&text(8192)), 0.0);
        activity.observe(&mut second, 3_000);
        let p = &second.sources["instashop"].snapshots["public.product"];
        assert_eq!(p.rows_per_second, Some(2048.0));
        assert_eq!(
            second.sources["instashop"].state.as_deref(),
            Some("streaming")
        );
        let json = sources_json(Some(&second));
        let row = json
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["database"] == "instashop"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(row["snapshots"][0]["table"], "public.product");
        assert_eq!(row["snapshots"][0]["rows"], 8192);
        assert_eq!(row["snapshots"][0]["estimated"], 10000);
        assert_eq!(row["snapshots"][0]["rows_per_second"], 2048.0);
        let skipped = reader(
            &parse(
                "cdc_incremental_table_skipped{source=\"crm\",table=\"public.secret\",reason=\"GRANT SELECT ON public.secret TO cdc\"} 1\n",
            ),
            0.0,
        );
        assert_eq!(
            skipped.sources["crm"].skipped["public.secret"],
            "GRANT SELECT ON public.secret TO cdc"
        );
    }

    #[test]
    fn reader_as_exported_by_cdc_reader() {
        // The series cdc-reader/src/metrics.rs renders.
        let samples = parse(
            "cdc_events_total{topic=\"instashop.public.transaction\",op=\"c\"} 40\n\
             cdc_events_total{topic=\"instashop.public.product\",op=\"u\"} 2\n\
             cdc_kafka_delivery_errors_total{topic=\"crm.public.interaction\"} 1\n\
             cdc_replication_lag_bytes{source=\"crm\"} 500\n\
             cdc_replication_lag_seconds{source=\"crm\"} 0.250\n\
             cdc_confirmed_lsn{source=\"crm\"} 1000\n\
             cdc_source_up{source=\"crm\",state=\"streaming\"} 1\n\
             cdc_source_reconnects_total{source=\"crm\"} 3\n\
             cdc_snapshot_rows_copied{source=\"crm\",table=\"public.interaction\"} 10\n",
        );
        let r = reader(&samples, 0.0);
        assert_eq!(r.sources["instashop"].events_total, Some(42.0));
        let crm = &r.sources["crm"];
        assert_eq!(crm.lag_bytes, Some(500.0));
        assert_eq!(crm.lag_seconds, Some(0.25));
        assert_eq!(crm.confirmed_lsn, Some(1000.0));
        assert_eq!(crm.state.as_deref(), Some("streaming"));
        assert_eq!(crm.events_total, None);
    }

    #[test]
    fn activity_ages_start_at_the_first_change_seen() {
        let mut activity = Activity::default();
        let reading = |total: f64| ReaderReading {
            sources: [(
                "crm".to_owned(),
                SourceReading {
                    events_total: Some(total),
                    ..SourceReading::default()
                },
            )]
            .into_iter()
            .collect(),
        };
        let mut r = reading(10.0);
        activity.observe(&mut r, 1_000);
        assert_eq!(r.sources["crm"].last_event_age_seconds, None);
        let mut r = reading(12.0);
        activity.observe(&mut r, 2_000);
        assert_eq!(r.sources["crm"].last_event_age_seconds, Some(0.0));
        let mut r = reading(12.0);
        activity.observe(&mut r, 7_500);
        assert_eq!(r.sources["crm"].last_event_age_seconds, Some(5.5));
        // Restarted reader: counter back to a small value counts as a change.
        let mut r = reading(1.0);
        activity.observe(&mut r, 9_000);
        assert_eq!(r.sources["crm"].last_event_age_seconds, Some(0.0));
    }

    #[test]
    fn consumer_samples_reduce_to_lag_dlq_and_applied() {
        let samples = parse(
            "metrics_consumer_consumer_lag{topic=\"a\",partition=\"0\"} 3\n\
             metrics_consumer_consumer_lag{topic=\"a\",partition=\"1\"} 4\n\
             metrics_consumer_dlq_messages_total 2\n\
             metrics_consumer_events_applied_total{table=\"crm.interaction\"} 100\n\
             metrics_consumer_events_applied_total{table=\"erp.stock\"} 20\n\
             metrics_consumer_apply_latency_seconds_sum 3\n\
             metrics_consumer_end_to_end_lag_ms 42\n",
        );
        let c = consumer(&samples);
        assert_eq!(c.lag, Some(7.0));
        assert_eq!(c.dlq, Some(2.0));
        assert_eq!(c.events_applied, Some(120.0));
        assert_eq!(c.end_to_end_lag_ms, Some(42.0));
        assert_eq!(consumer(&[]), ConsumerReading::default());
    }

    #[test]
    fn rate_needs_two_increasing_readings() {
        assert_eq!(rate(Some(100.0), Some(150.0), 2.0), Some(25.0));
        assert_eq!(rate(None, Some(150.0), 2.0), None);
        assert_eq!(rate(Some(200.0), Some(150.0), 2.0), None);
        assert_eq!(rate(Some(100.0), Some(150.0), 0.0), None);
    }

    #[test]
    fn sources_json_lists_every_database_even_without_data() {
        let rows = sources_json(None);
        let rows = rows.as_array().cloned().unwrap_or_default();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0]["database"], "instashop");
        assert_eq!(rows[0]["lag_bytes"], Value::Null);
    }
}
