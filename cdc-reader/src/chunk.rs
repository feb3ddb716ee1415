//! The IO around [`crate::incremental`]: reading chunks between watermarks
//! on an ordinary SQL session, and the source loop's side of it (signals,
//! emitting the rows a high watermark lets out, persisting progress).
//!
//! Why a task of its own: a chunk read (watermark, keyset query, watermark)
//! takes a few round trips; the stream loop must never wait on it. The loop
//! only hands a request over, and the rows come back through a channel
//! *before* the high watermark is written, so when the loop meets that
//! watermark in the stream the rows are already waiting for it.
//!
//! Why no exported snapshot is held: each chunk is read in its own short
//! REPEATABLE READ transaction, so neither WAL nor the xmin horizon is held
//! for longer than one chunk query.
//!
//! Where progress lives, and why there: in one row of the signal table,
//! `id = 'progress:<slot>'`, type `snapshot-progress`, data = the
//! [`Plan`] as JSON. It is written after Kafka acknowledged the chunk's rows
//! (the next chunk is requested only then), and after every signal before
//! the signal's transaction becomes confirmable. It sits next to the
//! signals it derives from, in the database being captured, so it shares
//! their fate (a restored database restores both) and needs no Kafka
//! transaction or extra store; the CDC role needs INSERT and UPDATE on that
//! one table. A kill -9 between the acknowledgement and the write re-reads
//! one chunk: its rows are sent again, newer or equal, never older.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::Client;

use crate::change::{Change, Column, Datum, Lsn, Op, Row, SnapshotMarker, Source, TableName};
use crate::config::SourceConfig;
use crate::error::Error;
use crate::incremental::{
    Applied, ChunkRead, Job, Key, Plan, Visibility, WATERMARK_PREFIX, Window,
};
use crate::metrics::Metrics;
use crate::replication::{quote_ident, quote_literal};
use crate::signal::{Collection, Signal};
use crate::sink::SourceSink;
use crate::slot::connect_sql;
use crate::snapshot::{parse_copy_line, table_columns};

/// How many recent changes of the table being snapshotted are remembered
/// with their xids (see [`Window`]).
const RECENT_CHANGES: usize = 65_536;

/// Chunks sent ahead of Kafka's acknowledgements.
const MAX_UNACKED: usize = 4;

/// How long a failed chunk read waits before the next attempt.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Low or high watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Before the chunk query.
    Low,
    /// After it.
    High,
}

/// The content of a watermark message: `<slot> low|high <chunk id>`; the
/// slot keeps two readers of one database apart.
pub fn watermark_content(slot: &str, mark: Mark, id: u64) -> String {
    let m = match mark {
        Mark::Low => "low",
        Mark::High => "high",
    };
    format!("{slot} {m} {id}")
}

/// Parses [`watermark_content`]; `None` when it is not one.
pub fn parse_watermark(content: &str) -> Option<(&str, Mark, u64)> {
    let mut parts = content.split(' ');
    let slot = parts.next()?;
    let mark = match parts.next()? {
        "low" => Mark::Low,
        "high" => Mark::High,
        _ => return None,
    };
    let id = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((slot, mark, id))
}

/// The primary key of a row: the key columns' text in column order
/// (`None` if one of them is not a plain value).
pub fn key_of(columns: &[Column], row: &Row) -> Option<Key> {
    let mut key = Vec::new();
    for (c, d) in columns.iter().zip(row) {
        if c.is_key {
            match d {
                Datum::Text(b) => key.push(String::from_utf8_lossy(b).into_owned()),
                _ => return None,
            }
        }
    }
    (!key.is_empty()).then_some(key)
}

/// The keys a streamed change touches (an update that moves a row: both).
pub fn keys_of(change: &Change) -> Vec<Key> {
    let mut keys = Vec::with_capacity(1);
    for row in [&change.before, &change.after].into_iter().flatten() {
        if let Some(k) = key_of(&change.columns, row)
            && !keys.contains(&k)
        {
            keys.push(k);
        }
    }
    keys
}

/// The chunk query: the next `limit` rows after `after` in key order.
/// `key_types` are the key columns' SQL types, in column order.
pub fn chunk_query(
    table: &str,
    columns: &[Column],
    key_types: &[String],
    filter: Option<&str>,
    after: Option<&Key>,
    limit: usize,
) -> String {
    let list: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
    let keys: Vec<String> = columns
        .iter()
        .filter(|c| c.is_key)
        .map(|c| quote_ident(&c.name))
        .collect();
    let mut conditions = Vec::new();
    if let Some(f) = filter {
        conditions.push(format!("({f})"));
    }
    if let Some(after) = after {
        let values: Vec<String> = after
            .iter()
            .zip(key_types)
            .map(|(v, t)| format!("{}::{t}", quote_literal(v)))
            .collect();
        conditions.push(format!("({}) > ({})", keys.join(", "), values.join(", ")));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    format!(
        "COPY (SELECT {} FROM {table}{filter} ORDER BY {} LIMIT {limit}) TO STDOUT",
        list.join(", "),
        keys.join(", ")
    )
}

/// What the loop asks the reader task for.
#[derive(Debug)]
struct Request {
    id: u64,
    job: Job,
    limit: usize,
}

/// What the reader task answers.
enum Answer {
    /// The chunk was read; its high watermark follows in the stream.
    Read {
        table: Arc<TableName>,
        columns: Arc<[Column]>,
        chunk: ChunkRead<Row>,
        estimated: u64,
    },
    /// The attempt failed; try again later.
    Failed { id: u64, error: Error },
    /// The table cannot be snapshotted; the message says why and what to do.
    Unreadable { id: u64, reason: String },
}

/// Why a chunk read stopped.
enum ReadError {
    Unreadable(String),
    Failed(Error),
}

impl From<Error> for ReadError {
    fn from(e: Error) -> Self {
        ReadError::Failed(e)
    }
}

impl From<tokio_postgres::Error> for ReadError {
    fn from(e: tokio_postgres::Error) -> Self {
        if e.as_db_error().is_some_and(|d| d.code().code() == "42501") {
            return ReadError::Unreadable(format!(
                "permission denied ({}); GRANT SELECT on it TO the CDC role",
                e.as_db_error().map_or("", |d| d.message())
            ));
        }
        ReadError::Failed(Error::postgres("incremental snapshot chunk", e))
    }
}

/// What a chunk read needs to know about its table, looked up once per
/// table (and again after any failure: the table may have changed).
#[derive(Clone)]
struct TableMeta {
    quoted: String,
    columns: Arc<[Column]>,
    key_types: Vec<String>,
    name: Arc<TableName>,
    /// `pg_class.reltuples` when the table's turn came (an estimate).
    estimated: u64,
}

async fn reader_task(
    cfg: Arc<SourceConfig>,
    mut requests: mpsc::Receiver<Request>,
    answers: mpsc::Sender<Answer>,
) {
    let mut client: Option<Client> = None;
    let mut meta: Option<(String, TableMeta)> = None;
    while let Some(req) = requests.recv().await {
        let id = req.id;
        if client.as_ref().is_none_or(Client::is_closed) {
            match connect_sql(&cfg).await {
                Ok(c) => client = Some(c),
                Err(error) => {
                    let _ = answers.send(Answer::Failed { id, error }).await;
                    continue;
                }
            }
        }
        let Some(c) = client.as_ref() else { continue };
        let answer = match read_chunk(&cfg, c, req, &mut meta, &answers).await {
            Ok(()) => continue,
            Err(ReadError::Unreadable(reason)) => {
                meta = None;
                Answer::Unreadable { id, reason }
            }
            Err(ReadError::Failed(error)) => {
                client = None;
                meta = None;
                Answer::Failed { id, error }
            }
        };
        if answers.send(answer).await.is_err() {
            return;
        }
    }
}

async fn emit(client: &Client, slot: &str, mark: Mark, id: u64) -> Result<(), ReadError> {
    let content = watermark_content(slot, mark, id);
    match mark {
        Mark::Low => {
            client
                .execute(
                    "SELECT pg_logical_emit_message(false, $1, $2)",
                    &[&WATERMARK_PREFIX, &content],
                )
                .await?;
        }
        // A non-transactional message is not flushed: the walsender would
        // send it only when someone's commit (or the WAL writer, up to
        // wal_writer_delay later) flushed it, which on a quiet database
        // made every chunk wait ~200 ms. A transactional message in the
        // same implicit transaction takes an xid, so its commit flushes
        // the WAL up to and including the high watermark.
        Mark::High => {
            client
                .batch_execute(&format!(
                    "SELECT pg_logical_emit_message(false, {p}, {c}); \
                     SELECT pg_logical_emit_message(true, {p}, 'flush')",
                    p = quote_literal(WATERMARK_PREFIX),
                    c = quote_literal(&content)
                ))
                .await?;
        }
    }
    Ok(())
}

async fn table_meta(
    cfg: &SourceConfig,
    client: &Client,
    table: &str,
) -> Result<TableMeta, ReadError> {
    let name = Collection::parse(table)
        .ok_or_else(|| ReadError::Unreadable("not a schema.table name".to_owned()))?;
    let row = client
        .query_opt(
            "SELECT c.oid, \
             EXISTS (SELECT FROM pg_publication_tables p WHERE p.pubname = $3 AND p.schemaname = $1 AND p.tablename = $2), \
             has_table_privilege(c.oid, 'SELECT'), greatest(c.reltuples, 0)::int8 \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&name.schema, &name.table, &cfg.publication],
        )
        .await?;
    let Some(row) = row else {
        return Err(ReadError::Unreadable(
            "the table does not exist; check the name in data-collections".to_owned(),
        ));
    };
    let (oid, published, readable, estimated): (u32, bool, bool, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if !published || !cfg.includes(&name.schema, &name.table) {
        return Err(ReadError::Unreadable(format!(
            "the table is not captured: ALTER PUBLICATION {} ADD TABLE {} (and check --include-tables/--exclude-tables)",
            quote_ident(&cfg.publication),
            quote_ident(&name.table)
        )));
    }
    if !readable {
        return Err(ReadError::Unreadable(format!(
            "the CDC role cannot read it: GRANT SELECT ON {}.{} TO {}",
            quote_ident(&name.schema),
            quote_ident(&name.table),
            quote_ident(&cfg.params.user)
        )));
    }
    let columns: Arc<[Column]> = table_columns(client, oid).await?.into();
    let key_names: Vec<String> = columns
        .iter()
        .filter(|c| c.is_key)
        .map(|c| c.name.clone())
        .collect();
    if key_names.is_empty() {
        return Err(ReadError::Unreadable(
            "the table has no primary key, which chunks are read by".to_owned(),
        ));
    }
    let mut key_types = Vec::with_capacity(key_names.len());
    for k in &key_names {
        let t: String = client
            .query_one(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = $1 AND attname = $2",
                &[&oid, k],
            )
            .await?
            .get(0);
        key_types.push(t);
    }
    let quoted = format!("{}.{}", quote_ident(&name.schema), quote_ident(&name.table));
    Ok(TableMeta {
        quoted,
        columns,
        key_types,
        estimated: u64::try_from(estimated).unwrap_or(0),
        name: Arc::new(TableName {
            prefix: cfg.prefix.clone(),
            database: cfg.params.dbname.clone(),
            schema: name.schema.clone(),
            table: name.table.clone(),
        }),
    })
}

async fn read_chunk(
    cfg: &SourceConfig,
    client: &Client,
    req: Request,
    cache: &mut Option<(String, TableMeta)>,
    answers: &mpsc::Sender<Answer>,
) -> Result<(), ReadError> {
    let meta = match cache {
        Some((table, meta)) if *table == req.job.table => meta.clone(),
        _ => {
            let meta = table_meta(cfg, client, &req.job.table).await?;
            *cache = Some((req.job.table.clone(), meta.clone()));
            meta
        }
    };
    let sql = chunk_query(
        &meta.quoted,
        &meta.columns,
        &meta.key_types,
        req.job.filter.as_deref(),
        req.job.after.as_ref(),
        req.limit,
    );
    let columns = meta.columns.clone();

    emit(client, &cfg.slot, Mark::Low, req.id).await?;
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let result = async {
        let snapshot: String = client
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await?
            .get(0);
        let visibility = Visibility::parse(&snapshot).ok_or_else(|| {
            ReadError::Failed(Error::BadData(format!(
                "pg_current_snapshot() returned {snapshot:?}"
            )))
        })?;
        let rows = copy_rows(client, &sql, &columns).await?;
        Ok::<_, ReadError>((visibility, rows))
    }
    .await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    let (visibility, rows) = match result {
        Ok(r) => {
            client.batch_execute(end).await?;
            r
        }
        Err(e) => {
            let _ = client.batch_execute(end).await;
            return Err(e);
        }
    };
    let table = meta.name.clone();
    // The rows go first, the high watermark after: the loop meets the
    // watermark only once the rows wait in its channel.
    let read = Answer::Read {
        table,
        estimated: meta.estimated,
        columns,
        chunk: ChunkRead {
            id: req.id,
            rows,
            visibility,
        },
    };
    if answers.send(read).await.is_err() {
        return Ok(());
    }
    emit(client, &cfg.slot, Mark::High, req.id).await
}

async fn copy_rows(
    client: &Client,
    sql: &str,
    columns: &[Column],
) -> Result<Vec<(Key, Row)>, ReadError> {
    let stream = client.copy_out(sql).await?;
    futures_util::pin_mut!(stream);
    let mut carry = BytesMut::new();
    let mut rows = Vec::new();
    let push = |line: Bytes, rows: &mut Vec<(Key, Row)>| -> Result<(), ReadError> {
        let row = parse_copy_line(&line, columns.len())?;
        let key = key_of(columns, &row).ok_or_else(|| {
            ReadError::Failed(Error::BadData("a chunk row has a NULL key".to_owned()))
        })?;
        rows.push((key, row));
        Ok(())
    };
    while let Some(data) = stream.next().await {
        carry.extend_from_slice(&data?);
        while let Some(nl) = carry.iter().position(|&b| b == b'\n') {
            let line = carry.split_to(nl + 1).freeze();
            push(line.slice(..nl), &mut rows)?;
        }
    }
    if !carry.is_empty() {
        push(carry.freeze(), &mut rows)?;
    }
    Ok(rows)
}

/// Aborts the reader task when dropped.
struct TaskGuard(tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A chunk read and waiting for its high watermark: table, columns, rows.
type ReadyChunk = (Arc<TableName>, Arc<[Column]>, ChunkRead<Row>);

/// The source loop's side of incremental snapshots.
#[allow(missing_debug_implementations)]
pub struct Incremental {
    cfg: Arc<SourceConfig>,
    plan: Plan,
    window: Window,
    requests: mpsc::Sender<Request>,
    answers: mpsc::Receiver<Answer>,
    /// The chunk requested and not yet emitted, with its table.
    in_flight: Option<(u64, String)>,
    /// Its rows, once read.
    ready: Option<ReadyChunk>,
    /// Where its low watermark came through the stream.
    low_at: Option<Lsn>,
    /// Chunks sent and not yet acknowledged by Kafka: their high
    /// watermark and the plan as it stood after each. Reads go on while
    /// Kafka catches up; the progress written is only ever an
    /// acknowledged one.
    unacked: VecDeque<(Lsn, Plan)>,
    /// The plan as last written (acknowledged progress, every signal).
    saved: Plan,
    retry_at: Option<Instant>,
    next_id: u64,
    progress_warned: bool,
    _task: TaskGuard,
}

impl Incremental {
    /// Loads the persisted plan and starts the chunk reader.
    pub async fn start(cfg: Arc<SourceConfig>, client: &Client) -> Result<Self, Error> {
        let plan = load_plan(&cfg, client).await?;
        if let Some(job) = plan.queue.front() {
            tracing::info!(source = %cfg.name, table = %job.table, chunks_done = job.chunks, queued = plan.queue.len(), paused = plan.paused, "resuming incremental snapshot");
        }
        let (requests, req_rx) = mpsc::channel(1);
        let (ans_tx, answers) = mpsc::channel(4);
        let task = tokio::spawn(reader_task(cfg.clone(), req_rx, ans_tx));
        // Ids unique across restarts: a watermark of an earlier session
        // still in the stream never matches a new chunk.
        let next_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        Ok(Incremental {
            cfg,
            saved: plan.clone(),
            plan,
            window: Window::new(RECENT_CHANGES),
            requests,
            answers,
            in_flight: None,
            ready: None,
            low_at: None,
            unacked: VecDeque::new(),
            retry_at: None,
            next_id,
            progress_warned: false,
            _task: TaskGuard(task),
        })
    }

    /// Whether a chunk's acknowledgement is awaited.
    pub fn awaiting(&self) -> Option<Lsn> {
        self.unacked.front().map(|(lsn, _)| *lsn)
    }

    /// Applies a change of the queue to the live plan, the saved one and
    /// every unacknowledged one, so a later write keeps it.
    fn each_plan(&mut self, mut f: impl FnMut(&mut Plan)) {
        f(&mut self.plan);
        f(&mut self.saved);
        for (_, p) in &mut self.unacked {
            f(p);
        }
    }

    /// The next answer of the chunk reader.
    pub async fn answer(&mut self) -> Option<AnswerEvent> {
        self.answers.recv().await.map(AnswerEvent)
    }

    /// A streamed change: the window learns its keys.
    pub fn observe(&mut self, change: &Change) {
        if self.in_flight.is_none() && self.plan.queue.is_empty() {
            return;
        }
        let table = Collection {
            schema: change.table.schema.clone(),
            table: change.table.table.clone(),
        };
        match change.op {
            Op::Truncate => self.window.truncated(&table),
            _ => {
                let xid = change.source.tx_id.unwrap_or(0);
                self.window
                    .streamed(&table, xid, &keys_of(change), change.source.commit_lsn);
            }
        }
    }

    /// Requests the next chunk when nothing is in flight.
    pub fn poll(&mut self) {
        if let Some(table) = self.plan.queue.front().and_then(Job::collection) {
            self.window.follow(&table);
        }
        if self.in_flight.is_some()
            || self.unacked.len() >= MAX_UNACKED
            || self.retry_at.is_some_and(|t| Instant::now() < t)
        {
            return;
        }
        let Some(job) = self.plan.next() else { return };
        let Some(table) = job.collection() else {
            return;
        };
        self.next_id += 1;
        let id = self.next_id;
        let req = Request {
            id,
            job: job.clone(),
            limit: self.cfg.chunk_size,
        };
        if self.requests.try_send(req).is_ok() {
            self.window.requested(id, &table);
            self.in_flight = Some((id, job.table.clone()));
            self.retry_at = None;
        }
    }

    /// Whether the loop should call [`Incremental::poll`] again later
    /// (a retry is due).
    pub fn retry_due(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Carries out an answer of the chunk reader.
    pub async fn on_answer(
        &mut self,
        AnswerEvent(answer): AnswerEvent,
        client: &Client,
        metrics: &Metrics,
    ) -> Result<(), Error> {
        match answer {
            Answer::Read {
                table,
                columns,
                chunk,
                estimated,
            } => {
                metrics.incremental_estimated(&self.cfg.name, &table.topic(), estimated);
                if self
                    .in_flight
                    .as_ref()
                    .is_some_and(|(id, _)| *id == chunk.id)
                {
                    self.ready = Some((table, columns, chunk));
                }
            }
            Answer::Failed { id, error } => {
                if self.in_flight.as_ref().is_some_and(|(i, _)| *i == id) {
                    tracing::warn!(source = %self.cfg.name, error = %local_stack::one_line(&error), "incremental snapshot chunk failed; retrying");
                    self.abandon();
                    self.retry_at = Some(Instant::now() + RETRY_AFTER);
                }
            }
            Answer::Unreadable { id, reason } => {
                if let Some((i, table)) = self.in_flight.clone()
                    && i == id
                {
                    tracing::warn!(source = %self.cfg.name, table = %table, "incremental snapshot of {table} skipped: {reason}");
                    metrics.signal_ignored(&self.cfg.name);
                    metrics.table_skipped(&self.cfg.name, &table, &reason);
                    self.abandon();
                    self.each_plan(|p| p.queue.retain(|j| j.table != table));
                    self.persist(client).await?;
                }
            }
        }
        Ok(())
    }

    fn abandon(&mut self) {
        self.in_flight = None;
        self.ready = None;
        self.low_at = None;
        self.window.abandon();
    }

    /// A signal row was streamed.
    pub async fn on_signal(
        &mut self,
        id: &str,
        kind: &str,
        data: Option<&str>,
        client: &Client,
        metrics: &Metrics,
    ) -> Result<(), Error> {
        let signal = match Signal::parse(id, kind, data) {
            Ok(Signal::Progress) => return Ok(()),
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(source = %self.cfg.name, "{e}");
                metrics.signal_ignored(&self.cfg.name);
                return Ok(());
            }
        };
        if !self.plan.first_time(id) {
            tracing::info!(source = %self.cfg.name, signal = %id, "signal already acted on (re-sent after a restart)");
            return Ok(());
        }
        let applied = self.plan.apply(&signal);
        self.saved.first_time(id);
        self.saved.apply(&signal);
        for (_, p) in &mut self.unacked {
            p.first_time(id);
            p.apply(&signal);
        }
        match &applied {
            Applied::Queued(t) => {
                tracing::info!(source = %self.cfg.name, signal = %id, tables = %t.join(","), "incremental snapshot queued");
            }
            Applied::Stopped(t) => {
                tracing::info!(source = %self.cfg.name, signal = %id, tables = %t.join(","), "incremental snapshot stopped");
                if let Some((_, table)) = &self.in_flight
                    && t.contains(table)
                {
                    self.abandon();
                }
                if self.plan.queue.is_empty() {
                    self.window.idle();
                }
            }
            Applied::Paused => {
                tracing::info!(source = %self.cfg.name, signal = %id, "incremental snapshot paused");
            }
            Applied::Resumed => {
                tracing::info!(source = %self.cfg.name, signal = %id, "incremental snapshot resumed");
            }
            Applied::Nothing => {
                tracing::info!(source = %self.cfg.name, signal = %id, kind = %kind, "signal changed nothing");
            }
        }
        self.persist(client).await
    }

    /// A watermark of ours came through the stream at `lsn`; returns the
    /// position handed to the sink as a transaction end, if any.
    pub async fn on_watermark(
        &mut self,
        lsn: Lsn,
        content: &str,
        out: &mut SourceSink,
        metrics: &Metrics,
    ) -> Result<Option<Lsn>, Error> {
        let Some((slot, mark, id)) = parse_watermark(content) else {
            return Ok(None);
        };
        if slot != self.cfg.slot || self.in_flight.as_ref().is_none_or(|(i, _)| *i != id) {
            return Ok(None);
        }
        match mark {
            Mark::Low => {
                if self.window.low(id).is_ok() {
                    self.low_at = Some(lsn);
                }
                Ok(None)
            }
            Mark::High => {
                // The rows were queued before the watermark was written.
                while self.ready.is_none() {
                    match self.answers.recv().await {
                        Some(Answer::Read {
                            table,
                            columns,
                            chunk,
                            estimated,
                        }) if chunk.id == id => {
                            metrics.incremental_estimated(
                                &self.cfg.name,
                                &table.topic(),
                                estimated,
                            );
                            self.ready = Some((table, columns, chunk));
                        }
                        Some(_) => {}
                        None => {
                            return Err(Error::Replication(
                                "incremental snapshot reader ended".to_owned(),
                            ));
                        }
                    }
                }
                let Some((table, columns, chunk)) = self.ready.take() else {
                    return Ok(None);
                };
                let Ok(emit) = self.window.high(chunk) else {
                    self.abandon();
                    return Ok(None);
                };
                let taken_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                let sent = emit.rows.len();
                let name = self.in_flight.take().map(|(_, t)| t).unwrap_or_default();
                // Below the low watermark, and below the commit of any
                // streamed change that kept rows out of the chunk (one less:
                // such a change's own events sort after the marker then).
                let low = self.low_at.take().unwrap_or(lsn);
                let since = emit
                    .earliest_kept_out
                    .map_or(low, |at| low.min(at.saturating_sub(1)));
                let finished = self.plan.chunk_done(
                    &name,
                    emit.read,
                    self.cfg.chunk_size,
                    emit.last_key.clone(),
                    since,
                );
                for row in emit.rows {
                    out.send(&Change {
                        table: table.clone(),
                        columns: columns.clone(),
                        op: Op::Read,
                        before: None,
                        after: Some(row),
                        source: Source {
                            commit_ts_us: taken_ms.saturating_mul(1000),
                            snapshot: SnapshotMarker::Incremental,
                            tx_id: None,
                            lsn,
                            last_commit_lsn: None,
                            commit_lsn: lsn,
                        },
                    })
                    .await?;
                }
                if let Some(job) = &finished {
                    self.send_marker(job, &table, taken_ms, out).await?;
                }
                out.end_transaction(lsn);
                metrics.incremental_chunk(
                    &self.cfg.name,
                    &table.topic(),
                    sent as u64,
                    emit.dropped as u64,
                );
                events_metric(metrics, &table, sent);
                tracing::debug!(source = %self.cfg.name, table = %name, read = emit.read, sent, superseded = emit.dropped, "incremental snapshot chunk");
                if finished.is_some() {
                    tracing::info!(source = %self.cfg.name, table = %name, "incremental snapshot of table finished");
                    metrics.table_snapshotted(&self.cfg.name, &name);
                    if self.plan.queue.is_empty() {
                        self.window.idle();
                    }
                }
                self.unacked.push_back((lsn, self.plan.clone()));
                Ok(Some(lsn))
            }
        }
    }

    /// The snapshot-complete marker of a finished table, at the job's
    /// [`Job::since`]: consumers retract the rows whose last event is older
    /// and that no chunk re-read (deleted while no slot recorded it). Not
    /// for a filtered snapshot (the rows it left out are not gone), nor for
    /// a job whose first chunks predate `since` being recorded.
    async fn send_marker(
        &self,
        job: &Job,
        table: &Arc<TableName>,
        taken_ms: i64,
        out: &mut SourceSink,
    ) -> Result<(), Error> {
        let Some(since) = job.since.filter(|_| job.filter.is_none()) else {
            return Ok(());
        };
        let at = Source {
            commit_ts_us: taken_ms.saturating_mul(1000),
            snapshot: SnapshotMarker::Incremental,
            tx_id: None,
            lsn: since,
            last_commit_lsn: None,
            commit_lsn: since,
        };
        out.send(&crate::snapshot::complete_marker(table, &at))
            .await
    }

    /// Kafka confirmed up to `confirmed`: once the last chunk's rows are
    /// in, the progress is written and the next chunk may be requested.
    pub async fn on_confirmed(&mut self, confirmed: Lsn, client: &Client) -> Result<(), Error> {
        let mut acked = None;
        while self.unacked.front().is_some_and(|(l, _)| *l <= confirmed) {
            acked = self.unacked.pop_front().map(|(_, p)| p);
        }
        if let Some(p) = acked {
            self.saved = p;
            self.persist(client).await?;
        }
        Ok(())
    }

    async fn persist(&mut self, client: &Client) -> Result<(), Error> {
        let sql = format!(
            "INSERT INTO {} (id, type, data) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET type = EXCLUDED.type, data = EXCLUDED.data",
            signal_table(&self.cfg)
        );
        let id = progress_id(&self.cfg);
        let data = self.saved.to_json();
        match client
            .execute(&sql, &[&id, &crate::signal::PROGRESS_TYPE, &data])
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = Error::postgres("writing incremental snapshot progress", e);
                if e.is_retryable() {
                    return Err(e);
                }
                if !self.progress_warned {
                    tracing::warn!(source = %self.cfg.name, error = %local_stack::one_line(&e), "incremental snapshot progress cannot be saved (a restart begins the table again): GRANT SELECT, INSERT, UPDATE ON {} TO {}", signal_table(&self.cfg), quote_ident(&self.cfg.params.user));
                    self.progress_warned = true;
                }
                Ok(())
            }
        }
    }
}

/// `--snapshot-mode initial-incremental` on a new slot: every captured
/// table queued for an incremental snapshot, written before the slot is
/// created.
pub async fn queue_tables(
    cfg: &SourceConfig,
    client: &Client,
    tables: &[crate::slot::TableInfo],
) -> Result<(), Error> {
    let plan = Plan {
        queue: tables
            .iter()
            .map(|t| Job {
                table: format!("{}.{}", t.schema, t.name),
                filter: None,
                after: None,
                chunks: 0,
                rows: 0,
                since: None,
            })
            .collect(),
        ..Plan::default()
    };
    let sql = format!(
        "INSERT INTO {} (id, type, data) VALUES ($1, $2, $3) \
         ON CONFLICT (id) DO UPDATE SET type = EXCLUDED.type, data = EXCLUDED.data",
        signal_table(cfg)
    );
    client
        .execute(
            &sql,
            &[&progress_id(cfg), &crate::signal::PROGRESS_TYPE, &plan.to_json()],
        )
        .await
        .map_err(|e| Error::postgres(format!("queueing the initial incremental snapshot in {} (the CDC role needs INSERT and UPDATE on it, see sql/)", signal_table(cfg)), e))?;
    tracing::info!(source = %cfg.name, tables = plan.queue.len(), "initial incremental snapshot queued");
    Ok(())
}

/// `cdc-reader signal`: validates the row as the reader will, then
/// writes it; returns its id.
pub async fn send_signal(cmd: &crate::config::SignalCommand) -> Result<String, Error> {
    let cfg = cmd.source()?;
    let (kind, data) = cmd.row();
    let id = format!(
        "cli-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros())
    );
    Signal::parse(&id, kind, data.as_deref()).map_err(|e| Error::Config(e.reason))?;
    let client = connect_sql(&cfg).await?;
    let sql = format!(
        "INSERT INTO {} (id, type, data) VALUES ($1, $2, $3)",
        signal_table(&cfg)
    );
    client
        .execute(&sql, &[&id, &kind, &data])
        .await
        .map_err(|e| {
            Error::postgres(format!("writing the signal into {}", signal_table(&cfg)), e)
        })?;
    Ok(id)
}

fn events_metric(metrics: &Metrics, table: &TableName, n: usize) {
    if n > 0 {
        metrics.events(&table.topic(), Op::Read, n as u64);
    }
}

/// An answer of the chunk reader, opaque to the loop.
#[allow(missing_debug_implementations)]
pub struct AnswerEvent(Answer);

/// The signal table, quoted.
pub fn signal_table(cfg: &SourceConfig) -> String {
    format!(
        "{}.{}",
        quote_ident(&cfg.signal_table.schema),
        quote_ident(&cfg.signal_table.table)
    )
}

/// The id of this slot's progress row.
pub fn progress_id(cfg: &SourceConfig) -> String {
    format!("progress:{}", cfg.slot)
}

async fn load_plan(cfg: &SourceConfig, client: &Client) -> Result<Plan, Error> {
    let published = client
        .query_opt(
            "SELECT EXISTS (SELECT FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $2 AND c.relname = $3",
            &[&cfg.publication, &cfg.signal_table.schema, &cfg.signal_table.table],
        )
        .await
        .map_err(|e| Error::postgres("looking up the signal table", e))?;
    if let Some(row) = published
        && !row.get::<_, bool>(0)
    {
        tracing::warn!(source = %cfg.name, "signal table {} is not in publication {}: signals are not seen; ALTER PUBLICATION {} ADD TABLE {}", signal_table(cfg), cfg.publication, quote_ident(&cfg.publication), signal_table(cfg));
    }
    let sql = format!("SELECT data FROM {} WHERE id = $1", signal_table(cfg));
    match client.query_opt(&sql, &[&progress_id(cfg)]).await {
        Ok(Some(row)) => {
            let data: Option<String> = row.get(0);
            match data.as_deref().map(Plan::from_json) {
                Some(Ok(plan)) => Ok(plan),
                Some(Err(e)) => {
                    tracing::warn!(source = %cfg.name, error = %e, "the saved incremental snapshot progress is unreadable; starting without it");
                    Ok(Plan::default())
                }
                None => Ok(Plan::default()),
            }
        }
        Ok(None) => Ok(Plan::default()),
        Err(e) => {
            let e = Error::postgres("reading incremental snapshot progress", e);
            if e.is_retryable() {
                return Err(e);
            }
            tracing::info!(source = %cfg.name, error = %local_stack::one_line(&e), "no readable signal table {}: signals are off (see sql/)", signal_table(cfg));
            Ok(Plan::default())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn col(name: &str, key: bool) -> Column {
        Column {
            name: name.into(),
            type_oid: 23,
            type_modifier: -1,
            is_key: key,
        }
    }

    #[test]
    fn watermark_round_trip() {
        let c = watermark_content("slot_a", Mark::High, 42);
        assert_eq!(parse_watermark(&c), Some(("slot_a", Mark::High, 42)));
        assert_eq!(parse_watermark("slot_a mid 1"), None);
        assert_eq!(parse_watermark("slot_a low x"), None);
        assert_eq!(parse_watermark("slot_a low 1 2"), None);
    }

    #[test]
    fn keyset_query() {
        let cols = [col("a", true), col("v", false), col("b", true)];
        let types = ["bigint".to_owned(), "text".to_owned()];
        assert_eq!(
            chunk_query("\"s\".\"t\"", &cols, &types, None, None, 10),
            "COPY (SELECT \"a\", \"v\", \"b\" FROM \"s\".\"t\" ORDER BY \"a\", \"b\" LIMIT 10) TO STDOUT"
        );
        let after = vec!["5".to_owned(), "it's".to_owned()];
        assert_eq!(
            chunk_query("t", &cols, &types, Some("v > 1"), Some(&after), 3),
            "COPY (SELECT \"a\", \"v\", \"b\" FROM t WHERE (v > 1) AND (\"a\", \"b\") > ('5'::bigint, 'it''s'::text) ORDER BY \"a\", \"b\" LIMIT 3) TO STDOUT"
        );
    }

    #[test]
    fn keys_in_column_order() {
        let cols = [col("a", true), col("v", false), col("b", true)];
        let row = vec![
            Datum::Text(Bytes::from_static(b"1")),
            Datum::Null,
            Datum::Text(Bytes::from_static(b"x")),
        ];
        assert_eq!(key_of(&cols, &row), Some(vec!["1".into(), "x".into()]));
        let row = vec![Datum::Null, Datum::Null, Datum::Null];
        assert_eq!(key_of(&cols, &row), None);
    }
}
