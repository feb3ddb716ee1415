//! The warehouse connection: startup checks, the stored offsets, and the
//! one transaction per batch that writes its rows with its offsets.
//!
//! A batch's transaction: create the day partitions it needs, COPY the
//! events and the typed shop rows into temporary staging tables, move the
//! events into `change_event` (its unique key drops re-sent events), fold
//! the staged rows into the star schema ([`crate::star`]), store the next
//! offsets, commit. Nothing of a batch is visible before the commit, and
//! all of it after: so the offsets in `sink_offset` always say exactly which
//! messages the warehouse holds.
//!
//! One writer per warehouse: the sink holds a session advisory lock, so a
//! second sink started by mistake exits instead of interleaving batches.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use futures_util::SinkExt as _;
use tokio_postgres::{Client, NoTls};

use crate::Error;
use crate::batch::{Batch, EVENT_COLUMNS};
use crate::copy::BinaryRows;
use crate::shop::Entity;
use crate::star;

/// The advisory lock key of the one writer (any constant: it is per
/// database).
const WRITER_LOCK: i64 = 0x6477_685f_7369_6e6b; // "dwh_sink"

/// How long a starting sink waits for the writer lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Tables the sink writes; a missing one means the schema was not applied.
const TABLES: [&str; 11] = [
    "change_event",
    "sink_offset",
    "dim_customer",
    "dim_buyer",
    "dim_product",
    "dim_carrier",
    "dim_date",
    "fact_purchase",
    "sale_line",
    "fact_sale_line",
    "fact_shipment",
];

/// Microseconds per day.
const DAY_US: i64 = 86_400_000_000;

/// What a written batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Change events inserted into `change_event`.
    pub inserted: u64,
    /// Change events already there (re-sent) or repeated snapshot reads.
    pub duplicates: u64,
}

/// A connection to the warehouse.
#[derive(Debug)]
pub struct Warehouse {
    client: Client,
    url: String,
    partitions: BTreeSet<i64>,
    locked: bool,
    /// Rows each staging table held when it was last analyzed on this
    /// session (see [`needs_analyze`]).
    analyzed: [Option<usize>; 7],
}

/// Whether a Postgres error may pass on a new connection: the connection
/// broke, the server is restarting or overloaded, or the transaction lost
/// a serialization or deadlock race.
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => {
            // No SQLSTATE: an IO error of the connection, or a protocol
            // error of ours (definite).
            std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
        }
        Some(code) => {
            let c = code.code();
            c.starts_with("08")
                || c.starts_with("53")
                || matches!(c, "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "55P03")
        }
    }
}

fn classify(what: &'static str, e: tokio_postgres::Error) -> Error {
    if is_transient(&e) {
        Error::DwhUnavailable(e)
    } else {
        Error::DwhRejected { what, source: e }
    }
}

/// `'text'` as a SQL literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The `CREATE TABLE ... PARTITION OF change_event` of a day.
pub fn partition_ddl(day: i64) -> Option<String> {
    let from = jiff::Timestamp::from_second(day.checked_mul(86_400)?).ok()?;
    let to = jiff::Timestamp::from_second((day + 1).checked_mul(86_400)?).ok()?;
    let name = jiff::tz::Offset::UTC
        .to_datetime(from)
        .date()
        .strftime("%Y%m%d")
        .to_string();
    Some(format!(
        "CREATE TABLE IF NOT EXISTS change_event_{name} PARTITION OF change_event FOR VALUES FROM ('{from}') TO ('{to}')"
    ))
}

impl Warehouse {
    /// Connects, checks the schema and creates the staging tables.
    pub async fn connect(url: &str) -> Result<Warehouse, Error> {
        let redacted = local_stack::redact::url(url);
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .map_err(|source| Error::DwhUnreachable {
                url: redacted.clone(),
                source,
            })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "warehouse connection ended");
            }
        });
        let missing = client
            .query(
                "SELECT t FROM unnest($1::text[]) AS t WHERE to_regclass(t) IS NULL",
                &[&TABLES.as_slice()],
            )
            .await
            .map_err(|source| Error::DwhUnreachable {
                url: redacted.clone(),
                source,
            })?;
        if let Some(row) = missing.first() {
            return Err(Error::SchemaMissing {
                url: redacted,
                table: row.get(0),
            });
        }
        // JIT off: the batch statements are costed high enough to be
        // compiled, and compiling them took longer (250 ms each, measured)
        // than running them. synchronous_commit off: a commit does not wait
        // for its WAL flush. A server crash can then lose the last batches
        // (at most 3 x wal_writer_delay), but always with the offsets
        // stored in them, so the sink reads those messages again: nothing
        // is lost or written twice, and the batches do not wait on the
        // disk.
        client
            .batch_execute(&format!(
                "SET TIME ZONE 'UTC'; SET jit = off; SET synchronous_commit = off; {}",
                star::staging_ddl().join(";\n")
            ))
            .await
            .map_err(|e| classify("creating the staging tables", e))?;
        let days = client
            .query(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = 'change_event'::regclass",
                &[],
            )
            .await
            .map_err(|e| classify("listing partitions", e))?;
        let partitions = days
            .iter()
            .filter_map(|r| {
                let name: String = r.get(0);
                let date = name.strip_prefix("change_event_")?;
                let date = jiff::civil::Date::strptime("%Y%m%d", date).ok()?;
                let ts = jiff::tz::Offset::UTC
                    .to_timestamp(date.to_datetime(jiff::civil::Time::midnight()))
                    .ok()?;
                Some(ts.as_second().div_euclid(86_400))
            })
            .collect();
        Ok(Warehouse {
            client,
            url: redacted,
            partitions,
            locked: false,
            analyzed: [None; 7],
        })
    }

    /// Takes the one-writer lock, waiting up to [`LOCK_WAIT`] for it: the
    /// session of a sink killed a moment ago lingers until its server
    /// process notices (after the statement it was running). Fails when
    /// another sink still holds it then.
    pub async fn lock(&mut self) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + LOCK_WAIT;
        let mut logged = false;
        loop {
            let row = self
                .client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&WRITER_LOCK])
                .await
                .map_err(|e| classify("taking the writer lock", e))?;
            if row.get::<_, bool>(0) {
                self.locked = true;
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Busy {
                    url: self.url.clone(),
                });
            }
            if !logged {
                tracing::info!(
                    "waiting for the writer lock (held by another or a killed sink's session)"
                );
                logged = true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// A new connection after a transient error, with the lock taken again.
    pub async fn reconnect(&mut self, url: &str) -> Result<(), Error> {
        let mut fresh = match Warehouse::connect(url).await {
            Ok(w) => w,
            Err(Error::DwhUnreachable { source, .. }) => {
                return Err(Error::DwhUnavailable(source));
            }
            Err(e) => return Err(e),
        };
        if self.locked {
            fresh.lock().await?;
        }
        *self = fresh;
        Ok(())
    }

    /// The stored next offset per topic partition.
    pub async fn offsets(&self) -> Result<BTreeMap<(String, i32), i64>, Error> {
        let rows = self
            .client
            .query("SELECT topic, partition, next_offset FROM sink_offset", &[])
            .await
            .map_err(|e| classify("reading sink_offset", e))?;
        Ok(rows
            .iter()
            .map(|r| ((r.get(0), r.get(1)), r.get(2)))
            .collect())
    }

    /// One COPY ... FROM STDIN, its data sent in `chunks`.
    async fn copy_raw(
        tx: &tokio_postgres::Transaction<'_>,
        statement: &str,
        chunks: impl IntoIterator<Item = Bytes>,
    ) -> Result<(), tokio_postgres::Error> {
        let sink = tx.copy_in::<_, Bytes>(statement).await?;
        let mut sink = std::pin::pin!(sink);
        for chunk in chunks {
            sink.send(chunk).await?;
        }
        sink.as_mut().finish().await?;
        Ok(())
    }

    /// COPY of the batch's events in the binary format (`statement` ends
    /// in `FROM STDIN (FORMAT binary)`): header, rows, trailer.
    async fn copy_events(
        tx: &tokio_postgres::Transaction<'_>,
        statement: &str,
        events: &BinaryRows,
    ) -> Result<(), tokio_postgres::Error> {
        let chunks = [
            Bytes::from_static(BinaryRows::HEADER),
            Bytes::copy_from_slice(events.bytes()),
            Bytes::from_static(BinaryRows::TRAILER),
        ];
        Self::copy_raw(tx, statement, chunks).await
    }

    async fn copy(
        tx: &tokio_postgres::Transaction<'_>,
        statement: &str,
        bytes: &[u8],
    ) -> Result<(), Error> {
        Self::copy_raw(tx, statement, [Bytes::copy_from_slice(bytes)])
            .await
            .map_err(|e| classify("copy into staging", e))
    }

    /// Inserts the batch's events into `change_event`. Fast path, for a
    /// batch without snapshot reads: COPY straight into the table; a
    /// re-sent event makes it fail on the unique key, and then (rolled back
    /// to a savepoint) the events go through the staging table and
    /// `ON CONFLICT DO NOTHING`, as every batch with snapshot reads does.
    async fn insert_events(
        tx: &tokio_postgres::Transaction<'_>,
        batch: &Batch,
    ) -> Result<u64, Error> {
        if batch.snapshot_reads == 0 {
            tx.batch_execute("SAVEPOINT direct_copy")
                .await
                .map_err(|e| classify("savepoint", e))?;
            match Self::copy_events(
                tx,
                &format!("COPY change_event ({EVENT_COLUMNS}) FROM STDIN (FORMAT binary)"),
                &batch.events,
            )
            .await
            {
                Ok(()) => {
                    tx.batch_execute("RELEASE SAVEPOINT direct_copy")
                        .await
                        .map_err(|e| classify("savepoint", e))?;
                    return Ok(batch.events.rows() as u64);
                }
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                    tx.batch_execute("ROLLBACK TO SAVEPOINT direct_copy")
                        .await
                        .map_err(|e| classify("savepoint", e))?;
                }
                Err(e) => return Err(classify("copy into change_event", e)),
            }
        }
        Self::copy_events(
            tx,
            &format!("COPY stage_event ({EVENT_COLUMNS}) FROM STDIN (FORMAT binary)"),
            &batch.events,
        )
        .await
        .map_err(|e| classify("copy into staging", e))?;
        tx.execute(star::INSERT_EVENTS, &[])
            .await
            .map_err(|e| classify("insert into change_event", e))
    }

    /// Creates the day partitions `batch` needs that are not `known` yet,
    /// in `tx`; returns them (known once `tx` commits).
    async fn create_partitions(
        known: &BTreeSet<i64>,
        tx: &tokio_postgres::Transaction<'_>,
        batch: &Batch,
    ) -> Result<Vec<i64>, Error> {
        let new_days: Vec<i64> = batch
            .days
            .iter()
            .copied()
            .filter(|d| !known.contains(d))
            .collect();
        if !new_days.is_empty() {
            let ddl: Vec<String> = new_days.iter().filter_map(|d| partition_ddl(*d)).collect();
            tx.batch_execute(&ddl.join(";\n"))
                .await
                .map_err(|e| classify("creating day partitions", e))?;
        }
        Ok(new_days)
    }

    /// Inserts a batch's events into `change_event` in a transaction of
    /// their own (see `consumer`: the next batch's events go in while this
    /// one is folded into the star schema); returns how many were new.
    /// Idempotent: a batch loaded again (its offsets were not stored yet)
    /// adds nothing.
    pub async fn load_events(&mut self, batch: &Batch) -> Result<u64, Error> {
        let tx = self
            .client
            .transaction()
            .await
            .map_err(|e| classify("begin", e))?;
        let new_days = Self::create_partitions(&self.partitions, &tx, batch).await?;
        let inserted = if batch.events.is_empty() {
            0
        } else {
            Self::insert_events(&tx, batch).await?
        };
        tx.commit().await.map_err(|e| classify("commit", e))?;
        self.partitions.extend(new_days);
        Ok(inserted)
    }

    /// Writes one batch and its offsets in one transaction; its events too,
    /// unless `loaded` says how many of them [`Warehouse::load_events`]
    /// inserted already.
    pub async fn write(&mut self, batch: &Batch, loaded: Option<u64>) -> Result<Written, Error> {
        let tx = self
            .client
            .transaction()
            .await
            .map_err(|e| classify("begin", e))?;
        let new_days = if loaded.is_some() {
            Vec::new()
        } else {
            Self::create_partitions(&self.partitions, &tx, batch).await?
        };
        let mut written = Written::default();
        let started = std::time::Instant::now();
        if let Some(inserted) = loaded {
            written.inserted = inserted;
        } else if !batch.events.is_empty() {
            written.inserted = Self::insert_events(&tx, batch).await?;
        }
        written.duplicates = (batch.events.rows() as u64).saturating_sub(written.inserted);
        let events_done = started.elapsed();
        let mut staged = [false; 7];
        for entity in Entity::ALL {
            let rows = &batch.shop[entity.index()];
            if !rows.is_empty() {
                Self::copy(&tx, &star::copy_into_stage(entity), rows.bytes()).await?;
                staged[entity.index()] = true;
            }
        }
        // Temporary tables get no statistics of their own: without them the
        // planner guesses a few hundred staged rows and hashes whole fact
        // tables (a sequential scan of every sale line per batch) instead of
        // probing their indexes with the staged keys. Statistics outlive
        // the rows (ON COMMIT DELETE ROWS), and the planner scales them to
        // the table's current size, so a table is analyzed again only when
        // its batch is of another size.
        let analyze: Vec<&str> = Entity::ALL
            .iter()
            .filter(|e| {
                let rows = batch.shop[e.index()].rows();
                staged[e.index()] && needs_analyze(self.analyzed[e.index()], rows)
            })
            .map(|e| e.stage())
            .collect();
        if !analyze.is_empty() {
            tx.batch_execute(&format!("ANALYZE {}", analyze.join(", ")))
                .await
                .map_err(|e| classify("analyzing the staged rows", e))?;
        }
        let mut analyzed = self.analyzed;
        for e in Entity::ALL {
            if analyze.contains(&e.stage()) {
                analyzed[e.index()] = Some(batch.shop[e.index()].rows());
            }
        }
        let mut statements = star::batch_statements(&staged);
        for t in &batch.truncates {
            statements.extend(star::truncate_statements(
                t.entity,
                t.position,
                t.commit_time_us,
            ));
        }
        for m in &batch.markers {
            statements.extend(star::marker_statements(
                Entity::of(&m.marker.db, &m.marker.table),
                &m.marker,
                (&m.topic, m.partition, m.offset),
                m.time_us,
            ));
        }
        if !batch.next_offsets.is_empty() {
            let values = batch
                .next_offsets
                .iter()
                .map(|((topic, partition), next)| {
                    format!("({}, {partition}, {next})", literal(topic))
                })
                .collect::<Vec<_>>()
                .join(", ");
            statements.push(format!(
                "INSERT INTO sink_offset (topic, partition, next_offset) VALUES {values}
                ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset, updated_at = now()"
            ));
        }
        let staged_done = started.elapsed();
        let mut slowest = (std::time::Duration::ZERO, 0);
        for (i, statement) in statements.iter().enumerate() {
            let at = std::time::Instant::now();
            tx.batch_execute(statement)
                .await
                .map_err(|e| classify("folding the batch into the star schema", e))?;
            slowest = slowest.max((at.elapsed(), i));
        }
        let star_done = started.elapsed();
        tx.commit().await.map_err(|e| classify("commit", e))?;
        tracing::debug!(
            events_ms = events_done.as_millis() as u64,
            shop_copy_ms = (staged_done - events_done).as_millis() as u64,
            star_ms = (star_done - staged_done).as_millis() as u64,
            commit_ms = (started.elapsed() - star_done).as_millis() as u64,
            slowest_ms = slowest.0.as_millis() as u64,
            slowest = statements
                .get(slowest.1)
                .map_or("", |s| s.get(..60).unwrap_or(s)),
            "batch timings"
        );
        self.partitions.extend(new_days);
        self.analyzed = analyzed;
        Ok(written)
    }

    /// The connection, for `verify` and tests.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// Whether a staging table about to hold `rows` needs ANALYZE, given the
/// rows it held when last analyzed: never analyzed, or a batch more than
/// twice as large or less than half as large as then.
pub fn needs_analyze(last: Option<usize>, rows: usize) -> bool {
    last.is_none_or(|last| rows > last.saturating_mul(2) || rows.saturating_mul(2) < last)
}

/// Day number (days since the epoch) of microseconds since the epoch.
pub fn day_of(micros: i64) -> i64 {
    micros.div_euclid(DAY_US)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn partition_bounds_are_utc_days() {
        assert_eq!(
            partition_ddl(20_428).unwrap(),
            "CREATE TABLE IF NOT EXISTS change_event_20251206 PARTITION OF change_event FOR VALUES FROM ('2025-12-06T00:00:00Z') TO ('2025-12-07T00:00:00Z')"
        );
        assert_eq!(day_of(-1), -1);
    }

    #[test]
    fn staged_rows_are_analyzed_again_only_at_another_size() {
        assert!(needs_analyze(None, 1));
        assert!(!needs_analyze(Some(20_000), 20_000));
        assert!(!needs_analyze(Some(20_000), 39_000));
        assert!(!needs_analyze(Some(20_000), 10_000));
        assert!(needs_analyze(Some(20_000), 40_001));
        assert!(needs_analyze(Some(20_000), 9_999));
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(literal("a'b"), "'a''b'");
    }
}
