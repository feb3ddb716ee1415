//! Initial snapshot: the rows that existed at the slot's consistent point,
//! emitted as `op: "r"` events before streaming starts.
//!
//! Why a first snapshot is gap- and overlap-free: the pending slot's exported
//! snapshot is exactly the database state at `consistent_point`, and
//! streaming starts from that point. Each copier is an ordinary session that imports the
//! snapshot (`SET TRANSACTION SNAPSHOT`) inside a REPEATABLE READ READ ONLY
//! transaction, so several tables are copied in parallel from the same
//! instant. The replication connection stays idle meanwhile: its next command
//! would end the export.
//!
//! Why COPY text: it produces each type's output-function text, the same text
//! pgoutput sends (the sessions use the same `TimeZone`, `DateStyle`,
//! `IntervalStyle` and `extra_float_digits`), so a snapshot row and a later
//! streamed row of the same value render identically.
//!
//! Why a snapshot ends with a marker per table: a reader restarted from
//! scratch (its slot dropped, a new slot and snapshot) never sees the rows
//! deleted between the old slot's last position and the new snapshot, so no
//! delete is ever sent for them. After the last row the reader sends, to
//! every partition of each table's topic, a record with a null key, a null
//! value and `cdc.*` headers giving the snapshot rows' position (see
//! `crate::envelope::marker`); a consumer retracts every row of that table
//! whose last event committed before the snapshot and that the snapshot did
//! not re-read, exactly as it applies a positioned truncate.
//!
//! Why everything funnels through one channel: the source's sink tracker is
//! single-writer; copiers send batches and the source loop emits them, holding
//! back one row so the very last one can carry `snapshot: "last"`. The
//! consistent point is handed to the tracker once, after the last row, so it
//! is confirmable only when every snapshot row is acknowledged.
//!
//! A snapshot interrupted by a crash is repeated from a new exported snapshot
//! (see `slot`): rows are re-sent with newer values, nothing is missed, and
//! the stream then starts from the *interrupted* attempt's consistent point
//! C1, kept by the pending slot, not from the repeated one's C2. Why: a row
//! the interrupted attempt sent and that was deleted before the repeat has no
//! `r` event in the repeat; only the delete recorded since C1 retracts it.
//!
//! The overlap this leaves, only on that restart-mid-snapshot path: changes
//! committed between C1 and C2 are emitted twice in effect, once folded into
//! the repeated snapshot's `r` rows (`source.lsn` = C2) and once as their own
//! c/u/d events (`source.lsn` < C2) after those rows. Per key, partition
//! order still ends at the latest state (the last change before C2 is
//! followed by nothing older), so a replay equals the table once the stream
//! passed C2; in between a key may briefly show an older value. Consumers
//! that skip events older than a row's last applied LSN (the
//! metrics-consumer does) ignore the re-emitted changes, yet still apply the
//! deletes of rows the repeat no longer has, whose last LSN is the
//! interrupted attempt's C1.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::change::{Change, Column, Datum, Op, Row, SnapshotMarker, Source, TableName};
use crate::config::SourceConfig;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::relation::CatalogKey;
use crate::replication::{quote_ident, quote_literal};
use crate::sink::SourceSink;
use crate::slot::{CreatedSlot, TableInfo, connect_sql};

/// Columns of a table in attribute order, as pgoutput would describe them,
/// with `is_key` = primary-key column.
pub async fn table_columns(client: &Client, oid: u32) -> Result<Vec<Column>, Error> {
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid, a.atttypmod, COALESCE(a.attnum = ANY(i.indkey), false) \
             FROM pg_attribute a \
             LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[&oid],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Column {
            name: r.get(0),
            type_oid: r.get(1),
            type_modifier: r.get(2),
            is_key: r.get(3),
        })
        .collect())
}

/// The relation's primary key as the catalog has it now ([`CatalogKey::Gone`]
/// when no relation has that OID any more).
pub async fn catalog_key(client: &Client, oid: u32) -> Result<CatalogKey, Error> {
    let row = client
        .query_opt(
            "SELECT ARRAY(SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = c.oid AND i.indisprimary) \
             FROM pg_class c WHERE c.oid = $1",
            &[&oid],
        )
        .await?;
    Ok(row.map_or(CatalogKey::Gone, |r| CatalogKey::Columns(r.get(0))))
}

/// Splits one COPY text-format line (without its newline) into a row.
pub fn parse_copy_line(line: &Bytes, ncols: usize) -> Result<Row, Error> {
    let mut row = Vec::with_capacity(ncols);
    let mut start = 0;
    let bytes = &line[..];
    loop {
        let end = bytes[start..]
            .iter()
            .position(|&b| b == b'\t')
            .map_or(bytes.len(), |p| start + p);
        let field = &bytes[start..end];
        row.push(if field == b"\\N" {
            Datum::Null
        } else if field.contains(&b'\\') {
            Datum::Text(unescape(field)?)
        } else {
            Datum::Text(line.slice(start..end))
        });
        if end == bytes.len() {
            break;
        }
        start = end + 1;
    }
    if row.len() != ncols {
        return Err(Error::BadData(format!(
            "COPY row has {} fields, expected {ncols}",
            row.len()
        )));
    }
    Ok(row)
}

fn unescape(field: &[u8]) -> Result<Bytes, Error> {
    let mut out = BytesMut::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        if b != b'\\' || i + 1 == field.len() {
            out.extend_from_slice(&[b]);
            i += 1;
            continue;
        }
        let c = field[i + 1];
        i += 2;
        let decoded = match c {
            b'b' => 8,
            b'f' => 12,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 11,
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                let mut n = 1;
                while n < 3 && i < field.len() && (b'0'..=b'7').contains(&field[i]) {
                    v = v * 8 + u32::from(field[i] - b'0');
                    i += 1;
                    n += 1;
                }
                (v & 0xff) as u8
            }
            b'x' if i < field.len() && field[i].is_ascii_hexdigit() => {
                let mut v = 0u32;
                let mut n = 0;
                while n < 2 && i < field.len() && field[i].is_ascii_hexdigit() {
                    v = v * 16 + (field[i] as char).to_digit(16).unwrap_or(0);
                    i += 1;
                    n += 1;
                }
                v as u8
            }
            other => other,
        };
        out.extend_from_slice(&[decoded]);
    }
    Ok(out.freeze())
}

enum Msg {
    Rows(Vec<Change>),
    Done { table: String, rows: u64 },
}

const BATCH: usize = 512;

struct Job {
    info: TableInfo,
    name: Arc<TableName>,
}

async fn copier(
    cfg: Arc<SourceConfig>,
    snapshot_name: String,
    jobs: Arc<Mutex<VecDeque<Job>>>,
    source: Source,
    tx: mpsc::Sender<Result<Msg, Error>>,
) {
    let result = copier_inner(&cfg, &snapshot_name, &jobs, &source, &tx).await;
    if let Err(e) = result {
        let _ = tx.send(Err(e)).await;
    }
}

async fn copier_inner(
    cfg: &SourceConfig,
    snapshot_name: &str,
    jobs: &Mutex<VecDeque<Job>>,
    source: &Source,
    tx: &mpsc::Sender<Result<Msg, Error>>,
) -> Result<(), Error> {
    let client = connect_sql(cfg).await?;
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot_name)
        ))
        .await?;
    loop {
        let job = jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop_front();
        let Some(job) = job else { break };
        let columns: Arc<[Column]> = table_columns(&client, job.info.oid).await?.into();
        let column_list: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
        let sql = format!(
            "COPY {} ({}) TO STDOUT",
            job.info.quoted(),
            column_list.join(", ")
        );
        let stream = client.copy_out(&sql).await?;
        futures_util::pin_mut!(stream);
        let mut carry = BytesMut::new();
        let mut batch = Vec::with_capacity(BATCH);
        let mut rows = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            // The server sends one row per CopyData; keep a carry for safety.
            let mut data = if carry.is_empty() {
                chunk
            } else {
                carry.extend_from_slice(&chunk);
                carry.split().freeze()
            };
            while let Some(pos) = data.iter().position(|&b| b == b'\n') {
                let line = data.split_to(pos + 1).slice(..pos);
                let row = parse_copy_line(&line, columns.len())?;
                batch.push(Change {
                    table: job.name.clone(),
                    columns: columns.clone(),
                    op: Op::Read,
                    before: None,
                    after: Some(row),
                    source: source.clone(),
                });
                rows += 1;
                if batch.len() == BATCH {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                    if tx.send(Ok(Msg::Rows(full))).await.is_err() {
                        return Ok(());
                    }
                }
            }
            if !data.is_empty() {
                carry.extend_from_slice(&data);
            }
        }
        if !batch.is_empty() && tx.send(Ok(Msg::Rows(batch))).await.is_err() {
            return Ok(());
        }
        if tx
            .send(Ok(Msg::Done {
                table: job.info.display(),
                rows,
            }))
            .await
            .is_err()
        {
            return Ok(());
        }
    }
    client.batch_execute("COMMIT").await?;
    Ok(())
}

/// Outcome of [`run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotOutcome {
    /// Every row was handed to the sink and the consistent point closed the snapshot.
    Complete {
        /// Rows emitted.
        rows: u64,
    },
    /// Shutdown was requested first.
    Cancelled,
}

/// Copies `tables` within `created`'s exported snapshot and sends `r` events.
pub async fn run(
    cfg: Arc<SourceConfig>,
    tables: &[TableInfo],
    created: &CreatedSlot,
    sink: &mut SourceSink,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<SnapshotOutcome, Error> {
    let snapshot_name = created.snapshot_name.clone().ok_or_else(|| {
        Error::Replication("CREATE_REPLICATION_SLOT returned no snapshot name".to_owned())
    })?;
    let started = Instant::now();
    let base = Source::snapshot_row(
        created.consistent_point,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
    );
    let estimated: HashMap<String, i64> = tables
        .iter()
        .map(|t| (t.display(), t.estimated_rows.max(0)))
        .collect();
    let mut copied: HashMap<String, u64> = tables.iter().map(|t| (t.display(), 0)).collect();
    for t in tables {
        metrics.snapshot_progress(
            &cfg.name,
            &t.display(),
            0,
            t.estimated_rows.max(0) as u64,
            false,
        );
    }
    tracing::info!(source = %cfg.name, tables = tables.len(), workers = cfg.snapshot_workers, consistent_point = %crate::change::lsn_to_string(created.consistent_point), "snapshot started");

    let jobs: VecDeque<Job> = tables
        .iter()
        .map(|t| Job {
            info: t.clone(),
            name: Arc::new(TableName {
                prefix: cfg.prefix.clone(),
                database: cfg.params.dbname.clone(),
                schema: t.schema.clone(),
                table: t.name.clone(),
            }),
        })
        .collect();
    let table_names: Vec<Arc<TableName>> = jobs.iter().map(|j| j.name.clone()).collect();
    let jobs = Arc::new(Mutex::new(jobs));
    let (tx, mut rx) = mpsc::channel(8);
    let mut handles = Vec::new();
    for _ in 0..cfg.snapshot_workers.min(tables.len()) {
        handles.push(tokio::spawn(copier(
            cfg.clone(),
            snapshot_name.clone(),
            jobs.clone(),
            base.clone(),
            tx.clone(),
        )));
    }
    drop(tx);
    let abort_all = |handles: &Vec<tokio::task::JoinHandle<()>>| {
        handles.iter().for_each(tokio::task::JoinHandle::abort)
    };

    let mut held: Option<Change> = None;
    let mut total = 0u64;
    let mut last_log = Instant::now();
    loop {
        let msg = tokio::select! {
            m = rx.recv() => m,
            () = shutdown.cancelled() => {
                abort_all(&handles);
                return Ok(SnapshotOutcome::Cancelled);
            }
        };
        let Some(msg) = msg else { break };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                abort_all(&handles);
                return Err(e);
            }
        };
        match msg {
            Msg::Rows(rows) => {
                let n = rows.len() as u64;
                let table = rows
                    .first()
                    .map(|c| format!("{}.{}", c.table.schema, c.table.table));
                if let Some(first) = rows.first() {
                    metrics.events(&first.table.topic(), Op::Read, n);
                }
                for mut change in rows {
                    if let Some(mut prev) = held.take() {
                        if total == 1 {
                            prev.source.snapshot = SnapshotMarker::First;
                        }
                        send(sink, &prev, shutdown, &handles).await?;
                    }
                    total += 1;
                    change.source.snapshot = SnapshotMarker::InProgress;
                    held = Some(change);
                }
                if let Some(table) = table {
                    let c = copied.entry(table.clone()).or_default();
                    *c += n;
                    let est = estimated.get(&table).copied().unwrap_or(0) as u64;
                    metrics.snapshot_progress(&cfg.name, &table, *c, est, false);
                }
                if last_log.elapsed() >= Duration::from_secs(5) {
                    last_log = Instant::now();
                    for (table, c) in &copied {
                        let est = estimated.get(table).copied().unwrap_or(0);
                        tracing::info!(source = %cfg.name, table = %table, copied = c, estimated = est, "snapshot progress");
                    }
                }
            }
            Msg::Done { table, rows } => {
                let est = estimated.get(&table).copied().unwrap_or(0);
                metrics.snapshot_progress(&cfg.name, &table, rows, est.max(0) as u64, true);
                tracing::info!(source = %cfg.name, table = %table, copied = rows, estimated = est, "snapshot table done");
            }
        }
    }
    if let Some(mut last) = held.take() {
        last.source.snapshot = SnapshotMarker::Last;
        send(sink, &last, shutdown, &handles).await?;
    }
    // Before the consistent point is handed over: it is confirmed only once
    // the markers too are acknowledged, so a crash cannot lose them.
    for name in &table_names {
        send(sink, &complete_marker(name, &base), shutdown, &handles).await?;
    }
    sink.end_transaction(created.consistent_point);
    tracing::info!(source = %cfg.name, rows = total, elapsed_ms = started.elapsed().as_millis() as u64, "snapshot rows handed to kafka");
    Ok(SnapshotOutcome::Complete { rows: total })
}

/// The snapshot-complete marker of one table, at the snapshot rows'
/// position: a consumer retracts every row of the table whose last event
/// committed before the snapshot and that the snapshot did not re-read
/// (deleted while no slot recorded it, as after a restart from scratch).
pub fn complete_marker(table: &Arc<TableName>, rows: &Source) -> Change {
    Change {
        table: table.clone(),
        columns: Arc::from(Vec::new()),
        op: Op::SnapshotComplete,
        before: None,
        after: None,
        source: rows.clone(),
    }
}

async fn send(
    sink: &mut SourceSink,
    change: &Change,
    shutdown: &CancellationToken,
    handles: &[tokio::task::JoinHandle<()>],
) -> Result<(), Error> {
    tokio::select! {
        r = sink.send(change) => {
            if r.is_err() {
                handles.iter().for_each(tokio::task::JoinHandle::abort);
            }
            r
        }
        () = shutdown.cancelled() => {
            handles.iter().for_each(tokio::task::JoinHandle::abort);
            Err(Error::Replication("shutdown during snapshot".to_owned()))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn copy_lines() {
        let line = Bytes::from_static(b"42\t\\N\thello world\t{a,\"b c\"}");
        assert_eq!(
            parse_copy_line(&line, 4).unwrap(),
            vec![
                text("42"),
                Datum::Null,
                text("hello world"),
                text("{a,\"b c\"}")
            ]
        );
        let esc = Bytes::from_static(b"a\\tb\\nc\\\\d\t\\x41\\101");
        assert_eq!(
            parse_copy_line(&esc, 2).unwrap(),
            vec![text("a\tb\nc\\d"), text("AA")]
        );
        let empty = Bytes::from_static(b"\t");
        assert_eq!(
            parse_copy_line(&empty, 2).unwrap(),
            vec![text(""), text("")]
        );
        assert!(parse_copy_line(&line, 3).is_err());
    }

    #[test]
    fn bytea_hex_survives() {
        // bytea text is `\x...`; COPY doubles the backslash.
        let line = Bytes::from_static(b"\\\\xdeadbeef");
        assert_eq!(
            parse_copy_line(&line, 1).unwrap(),
            vec![text("\\xdeadbeef")]
        );
    }
}
