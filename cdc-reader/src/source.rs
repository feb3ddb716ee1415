//! One pipeline per database: connect, preflight, snapshot, stream, confirm,
//! reconnect.
//!
//! Streaming is a thin IO loop (`StreamLoop`) around the pure
//! [`crate::decoder::Decoder`]: frames are read ahead into a queue,
//! each one is stepped into actions (send a change, end a transaction, an
//! idle position, answer now), and the loop carries them out against the
//! sink and the status task. Which LSN may be confirmed is decided by the
//! [`crate::ack::AckTracker`] behind the sink.
//!
//! Confirmation: the LSN reported to Postgres is the maximum of
//! - the sink's confirmable LSN (commit `end_lsn` of transactions whose every
//!   record, and every earlier transaction's, Kafka acknowledged), and
//! - the `wal_end` of a keepalive received while no transaction is open and
//!   nothing is in flight. Why that is safe: `wal_end` is what the walsender
//!   has decoded so far; every transaction committed before it was already
//!   delivered to us and acknowledged, and a transaction still open on the
//!   server commits after it, so the server will still send it after a
//!   restart. Why it is needed: a database whose tables are quiet would
//!   otherwise pin WAL forever while other databases write.
//!
//! The reported value never goes below the slot's `confirmed_flush_lsn` at
//! start (PostgreSQL ≤ 16 would move it backwards).
//!
//! `source.sequence`: its first element is this transaction's own commit LSN
//! (Begin's `final_lsn`), not the previous commit seen by this process.
//! Why: after a crash the re-sent transaction carries exactly the same
//! `[commit_lsn, change_lsn]` pair, so consumers can drop duplicates by
//! position, and the pair still orders events totally in commit order.
//!
//! Reconnects: any retryable error (connection loss, Postgres restart, Kafka
//! failure) drops the connection and the sink tracker and starts over from
//! the slot with exponential backoff (1 s to 30 s). Unconfirmed transactions
//! are re-sent; nothing is skipped.
//!
//! Two readers on one slot: START_REPLICATION fails with "replication slot
//! ... is active for PID n". Right after a kill -9 the old walsender may hold
//! the slot for a moment, so the error is retried for a short grace period;
//! if the slot stays busy it is a setup error and the process exits.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::change::{Lsn, Op, TableName, lsn_to_string};
use crate::chunk::Incremental;
use crate::config::{SnapshotMode, SourceConfig};
use crate::decoder::{Action, Decoder, Event};
use crate::error::Error;
use crate::metrics::{Metrics, SourceState};
use crate::pgoutput::ReplicationFrame;
use crate::relation::KnownKeys;
use crate::replication::{QueryError, ReplicationConnection, ReplicationStream, StatusWriter};
use crate::sink::{Sink, SourceSink};
use crate::slot::{self, Preflight};
use crate::snapshot::{self, SnapshotOutcome, catalog_key};

/// How long a slot held by another walsender is retried before giving up.
const SLOT_BUSY_GRACE: Duration = Duration::from_secs(10);

/// Runs one source until shutdown or a non-retryable error.
pub async fn run(
    cfg: Arc<SourceConfig>,
    sink: Arc<Sink>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let mut backoff = Duration::from_secs(1);
    metrics.set_state(&cfg.name, SourceState::Connecting);
    // Outlives reconnects: a table dropped while the reader was reconnecting
    // still has its key.
    let mut known_keys = KnownKeys::new();
    loop {
        let mut streamed_ok = false;
        let result = run_once(
            &cfg,
            &sink,
            &metrics,
            &shutdown,
            &mut streamed_ok,
            &mut known_keys,
        )
        .await;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if shutdown.is_cancelled() => {
                tracing::debug!(source = %cfg.name, error = %local_stack::one_line(&e), "error during shutdown");
                return Ok(());
            }
            Err(e) if e.is_retryable() => {
                if streamed_ok {
                    backoff = Duration::from_secs(1);
                }
                metrics.set_state(&cfg.name, SourceState::Connecting);
                metrics.reconnected(&cfg.name);
                tracing::warn!(source = %cfg.name, error = %local_stack::one_line(&e), retry_in_ms = backoff.as_millis() as u64, "source failed, reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(e) => {
                metrics.set_state(&cfg.name, SourceState::Failed);
                return Err(e);
            }
        }
    }
}

async fn run_once(
    cfg: &Arc<SourceConfig>,
    sink: &Sink,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
    streamed_ok: &mut bool,
    known_keys: &mut KnownKeys,
) -> Result<(), Error> {
    let client = slot::connect_sql(cfg).await?;
    let will_snapshot = cfg.snapshot_mode != SnapshotMode::Never;
    let mut pre: Preflight = slot::preflight(&client, cfg, will_snapshot).await?;

    if let Some(info) = &pre.slot
        && info.wal_status.as_deref() == Some("lost")
    {
        if cfg.snapshot_mode == SnapshotMode::WhenNeeded {
            tracing::warn!(source = %cfg.name, slot = %cfg.slot, "slot lost its WAL; dropping it to snapshot again (when_needed)");
            slot::drop_slot(&client, cfg).await?;
            pre.slot = None;
        } else {
            return Err(Error::Setup(format!(
                "source {}: slot \"{}\" is invalidated (its WAL was removed, changes were lost): restart with --snapshot-mode when_needed to drop it and snapshot again",
                cfg.name, cfg.slot
            )));
        }
    }

    if pre.slot.is_none() {
        // One snapshotting reader per slot (see `slot`); then look again, as
        // the holder may just have finished.
        if !slot::try_lock_snapshot(&client, cfg).await? {
            return Err(Error::Replication(format!(
                "source {}: another reader is taking the snapshot of slot \"{}\"",
                cfg.name, cfg.slot
            )));
        }
        pre.slot = slot::slot_info(&client, cfg).await?;
        pre.pending = slot::pending_slot_info(&client, cfg).await?;
    }
    if let Some(pending) = &pre.pending {
        if pre.slot.is_some() {
            tracing::info!(source = %cfg.name, slot = %slot::snapshot_slot_name(cfg), "dropping the stale pending snapshot slot (the snapshot completed before the last stop)");
            slot::drop_pending_slot(&client, cfg).await?;
            pre.pending = None;
        } else if pending.wal_status.as_deref() == Some("lost") {
            tracing::warn!(source = %cfg.name, slot = %slot::snapshot_slot_name(cfg), "the pending snapshot slot lost its WAL; dropping it and snapshotting from scratch (rows deleted since the interrupted snapshot keep its r events)");
            slot::drop_pending_slot(&client, cfg).await?;
            pre.pending = None;
        }
    }

    if pre.slot.is_none() {
        let mut repl = ReplicationConnection::connect(&cfg.params, true).await?;
        let restart = pre.pending.is_some();
        // Exactly-once: a reader killed after the snapshot's Kafka commit
        // but before the slot was persisted must not snapshot again (a
        // read_committed consumer would see every row twice).
        let committed = match &pre.pending {
            Some(p) if cfg.snapshot_mode != SnapshotMode::Never => {
                sink.checkpoint_reached(&cfg.name, p.confirmed_flush)
                    .await?
            }
            _ => false,
        };
        match cfg.snapshot_mode {
            _ if committed => {
                slot::persist_snapshot_slot(&client, cfg).await?;
                drop(repl);
                slot::drop_pending_slot(&client, cfg).await?;
                tracing::info!(source = %cfg.name, slot = %cfg.slot, "the interrupted snapshot was already committed to kafka (checkpoint); slot taken over from the pending snapshot slot");
            }
            SnapshotMode::Never if restart => {
                slot::persist_snapshot_slot(&client, cfg).await?;
                drop(repl);
                slot::drop_pending_slot(&client, cfg).await?;
                tracing::info!(source = %cfg.name, slot = %cfg.slot, "interrupted snapshot not repeated (never); slot taken over from the pending snapshot slot");
            }
            SnapshotMode::InitialIncremental => {
                // The queue first, the slot after: a reader killed in
                // between finds no slot and queues again.
                crate::chunk::queue_tables(cfg, &client, &pre.tables).await?;
                if restart {
                    slot::persist_snapshot_slot(&client, cfg).await?;
                    drop(repl);
                    slot::drop_pending_slot(&client, cfg).await?;
                } else {
                    let created = slot::create_permanent_slot(&mut repl, cfg).await?;
                    drop(repl);
                    tracing::info!(source = %cfg.name, slot = %cfg.slot, consistent_point = %lsn_to_string(created.consistent_point), "created slot; existing rows follow as an incremental snapshot");
                }
            }
            SnapshotMode::Never => {
                let created = slot::create_permanent_slot(&mut repl, cfg).await?;
                drop(repl);
                tracing::info!(source = %cfg.name, slot = %cfg.slot, consistent_point = %lsn_to_string(created.consistent_point), "created slot without snapshot");
            }
            SnapshotMode::Initial | SnapshotMode::WhenNeeded => {
                metrics.set_state(&cfg.name, SourceState::Snapshotting);
                let created = if restart {
                    tracing::info!(source = %cfg.name, slot = %slot::snapshot_slot_name(cfg), "an earlier snapshot was interrupted; snapshotting again, then streaming from the interrupted snapshot's consistent point");
                    slot::create_resnapshot_slot(&mut repl, cfg).await?
                } else {
                    slot::create_pending_slot(&mut repl, cfg).await?
                };
                let mut snap_sink = sink.snapshot_source(&cfg.name);
                snap_sink.open().await?;
                let outcome = snapshot::run(
                    cfg.clone(),
                    &pre.tables,
                    &created,
                    &mut snap_sink,
                    metrics,
                    shutdown,
                )
                .await?;
                if outcome == SnapshotOutcome::Cancelled {
                    tracing::info!(source = %cfg.name, "shutdown during snapshot; it starts over on the next start");
                    return Ok(());
                }
                snap_sink.commit().await?;
                wait_confirmed(&snap_sink, created.consistent_point, shutdown).await?;
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                // Copy the pending slot (the first attempt's consistent point),
                // then drop it and, with the connection, a restart's temporary slot.
                slot::persist_snapshot_slot(&client, cfg).await?;
                drop(repl);
                slot::drop_pending_slot(&client, cfg).await?;
                tracing::info!(source = %cfg.name, slot = %cfg.slot, consistent_point = %lsn_to_string(created.consistent_point), "snapshot acknowledged by kafka; slot created");
            }
        }
        slot::unlock_snapshot(&client, cfg).await?;
        pre.slot = slot::slot_info(&client, cfg).await?;
    }
    let start = pre.slot.as_ref().map_or(0, |s| s.confirmed_flush);
    let session = Session {
        cfg,
        client: &client,
        sink,
        metrics,
        shutdown,
    };
    stream(&session, start, streamed_ok, known_keys).await
}

/// What one streaming session works with.
struct Session<'a> {
    cfg: &'a Arc<SourceConfig>,
    client: &'a Client,
    sink: &'a Sink,
    metrics: &'a Arc<Metrics>,
    shutdown: &'a CancellationToken,
}

/// Waits until the tracker confirmed `lsn` (every snapshot row acknowledged).
async fn wait_confirmed(
    sink: &SourceSink,
    lsn: Lsn,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let mut rx = sink.confirmed();
    loop {
        if *rx.borrow_and_update() >= lsn {
            return Ok(());
        }
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    return Err(Error::Kafka("sink closed before the snapshot was acknowledged".to_owned()));
                }
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

async fn start_with_grace(
    cfg: &SourceConfig,
    start: Lsn,
) -> Result<(crate::replication::ReplicationStream, StatusWriter), Error> {
    let deadline = Instant::now() + SLOT_BUSY_GRACE;
    loop {
        let repl = ReplicationConnection::connect(&cfg.params, true).await?;
        match repl
            .start_replication(&cfg.slot, start, &cfg.publication)
            .await
        {
            Ok(pair) => return Ok(pair),
            Err(QueryError::Server(e)) if e.code == "55006" => {
                if Instant::now() >= deadline {
                    let pid = e
                        .message
                        .rsplit(' ')
                        .next()
                        .unwrap_or("?")
                        .trim_end_matches('.')
                        .to_owned();
                    return Err(Error::Setup(format!(
                        "source {}: replication slot \"{}\" is in use by another reader (walsender PID {pid}): stop that reader, or give this one its own slot with --slot",
                        cfg.name, cfg.slot
                    )));
                }
                tracing::info!(source = %cfg.name, slot = %cfg.slot, "slot busy, waiting for the previous session to end");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(QueryError::Server(e)) if e.code == "42704" => {
                return Err(Error::Replication(format!(
                    "source {}: slot disappeared: {e}",
                    cfg.name
                )));
            }
            Err(QueryError::Server(e))
                if e.code == "42P01" || e.message.contains("publication") =>
            {
                return Err(Error::Setup(format!(
                    "source {}: START_REPLICATION: {e}",
                    cfg.name
                )));
            }
            Err(e) => return Err(e.into_error("START_REPLICATION")),
        }
    }
}

/// Shared between the source loop and its status task.
#[derive(Debug, Default)]
struct Progress {
    /// LSN to report (max of sink-confirmed and idle keepalive positions).
    ack: AtomicU64,
    /// Latest server WAL end seen.
    server_wal_end: AtomicU64,
    /// Committed, not yet confirmed transactions: (end_lsn, commit time µs since 1970).
    pending: Mutex<VecDeque<(Lsn, i64)>>,
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The task that sends standby status updates, apart from the source loop
/// so a slow Kafka sink cannot starve them.
struct StatusTask {
    name: String,
    /// Where a failed update is reported (it ends the session).
    failed: tokio::sync::mpsc::Sender<Error>,
    writer: StatusWriter,
    progress: Arc<Progress>,
    confirmed: tokio::sync::watch::Receiver<Lsn>,
    interval: Duration,
    metrics: Arc<Metrics>,
    now_requested: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
}

async fn status_task(task: StatusTask) {
    let StatusTask {
        name,
        failed,
        mut writer,
        progress,
        mut confirmed,
        interval,
        metrics,
        now_requested,
        stop,
    } = task;
    let metrics_interval = Duration::from_secs(1);
    // Check often, send when the position moved or `interval` passed: the
    // slot follows Kafka acknowledgements closely without a stream of
    // identical updates.
    let mut tick = tokio::time::interval(
        interval
            .min(metrics_interval)
            .min(Duration::from_millis(100)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sent: Option<(Lsn, Instant)> = None;
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            () = now_requested.notified() => { last_sent = None; false }
            () = stop.cancelled() => true,
        };
        let c = *confirmed.borrow_and_update();
        progress.ack.fetch_max(c, Ordering::SeqCst);
        let ack = progress.ack.load(Ordering::SeqCst);
        let lag_s = {
            let mut pending = progress
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            while pending.front().is_some_and(|(end, _)| *end <= ack) {
                pending.pop_front();
            }
            pending
                .front()
                .map_or(0.0, |(_, ts)| ((now_us() - ts).max(0) as f64) / 1e6)
        };
        metrics.set_progress(
            &name,
            ack,
            progress.server_wal_end.load(Ordering::Relaxed),
            lag_s,
        );
        let due = last_sent.is_none_or(|(lsn, at)| lsn != ack || at.elapsed() >= interval);
        if due || stopping {
            if let Err(e) = writer.send_status(ack).await {
                // Without status updates the server drops the connection at
                // wal_sender_timeout and the slot stops advancing: end the
                // session (retried when transient) rather than stream on.
                if !stopping {
                    tracing::warn!(source = %name, error = %local_stack::one_line(&e), "standby status update failed");
                    let _ = failed.try_send(e);
                }
                return;
            }
            tracing::trace!(source = %name, lsn = %lsn_to_string(ack), "status update");
            last_sent = Some((ack, Instant::now()));
        }
        if stopping {
            return;
        }
    }
}

/// Per-table event counts flushed to metrics now and then (one format per table, not per event).
#[derive(Default)]
struct Counts {
    map: HashMap<(usize, &'static str), (Arc<TableName>, Op, u64)>,
    pending: u64,
    last: Option<Instant>,
}

impl Counts {
    fn add(&mut self, table: &Arc<TableName>, op: Op) {
        let key = (Arc::as_ptr(table) as usize, op.code());
        self.map
            .entry(key)
            .or_insert_with(|| (table.clone(), op, 0))
            .2 += 1;
        self.pending += 1;
    }

    /// Whether enough events accumulated to publish them mid-transaction.
    fn due(&self) -> bool {
        self.pending >= 10_000
    }

    fn flush(&mut self, metrics: &Metrics, force: bool) {
        if self.pending == 0 {
            return;
        }
        if !force
            && self.pending < 10_000
            && self
                .last
                .is_some_and(|l| l.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        for (_, (table, op, n)) in self.map.drain() {
            metrics.events(&table.topic(), op, n);
        }
        self.pending = 0;
        self.last = Some(Instant::now());
    }
}

/// Resolves at `at` (never when `None`; the branch is disabled then).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Aborts a task when dropped (the read-ahead must not outlive its connection).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the read-ahead: a task drains the socket into a bounded queue of
/// frame batches, so the walsender keeps decoding while the loop waits on
/// Kafka. The task ends with its guard.
fn read_ahead(mut stream: ReplicationStream) -> (mpsc::Receiver<FrameBatch>, AbortOnDrop) {
    let (frames_tx, frames_rx) = mpsc::channel::<FrameBatch>(64);
    let task = tokio::spawn(async move {
        loop {
            let batch = stream.next_batch(1024).await;
            let failed = batch.is_err();
            if frames_tx.send(batch).await.is_err() || failed {
                return;
            }
        }
    });
    (frames_rx, AbortOnDrop(task))
}

/// Frames read from the socket in one go.
type FrameBatch = Result<Vec<ReplicationFrame>, Error>;

/// One streaming session: START_REPLICATION, the helper tasks, the loop,
/// and on shutdown a bounded drain of Kafka.
async fn stream(
    session: &Session<'_>,
    start: Lsn,
    streamed_ok: &mut bool,
    known_keys: &mut KnownKeys,
) -> Result<(), Error> {
    let cfg = session.cfg;
    let (replication, writer) = start_with_grace(cfg, start).await?;
    let (mut frames, _read_ahead) = read_ahead(replication);
    tracing::info!(source = %cfg.name, slot = %cfg.slot, start = %lsn_to_string(start), "streaming");
    session.metrics.set_state(&cfg.name, SourceState::Streaming);
    *streamed_ok = true;

    let mut out = session.sink.source(&cfg.name);
    // Exactly-once: only now, with the slot held, take over its Kafka
    // transactions (see `exactly_once`).
    out.open().await?;
    let progress = Arc::new(Progress::default());
    progress.ack.store(start, Ordering::SeqCst);
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let now_requested = Arc::new(tokio::sync::Notify::new());
    // Helper tasks report an error that must end this session here.
    let (failed_tx, mut failed) = mpsc::channel::<Error>(2);
    let status = tokio::spawn(status_task(StatusTask {
        name: cfg.name.clone(),
        failed: failed_tx.clone(),
        writer,
        progress: progress.clone(),
        confirmed: out.confirmed(),
        interval: cfg.status_interval,
        metrics: session.metrics.clone(),
        now_requested: now_requested.clone(),
        stop: stop.clone(),
    }));
    let heartbeat = cfg.heartbeat.map(|every| {
        let (cfg, stop) = (cfg.clone(), stop.clone());
        tokio::spawn(heartbeat_task(cfg, every, failed_tx, stop))
    });

    let incremental = Incremental::start(cfg.clone(), session.client).await?;
    let mut session_loop = StreamLoop {
        session,
        incremental,
        confirmed: out.confirmed(),
        out,
        progress,
        now_requested,
        decoder: Decoder::new(cfg.clone(), known_keys),
        counts: Counts::default(),
        last_end: 0,
    };
    let result = session_loop.run(&mut frames, &mut failed).await;
    session_loop.counts.flush(session.metrics, true);
    if result.is_ok() {
        session_loop.drain_on_shutdown().await;
    }
    stop.cancel();
    let _ = status.await;
    if let Some(h) = heartbeat {
        h.abort();
    }
    result
}

/// The thin IO loop around the [`Decoder`]: frames in, actions carried out.
struct StreamLoop<'s, 'k> {
    session: &'s Session<'s>,
    incremental: Incremental,
    out: SourceSink,
    confirmed: tokio::sync::watch::Receiver<Lsn>,
    progress: Arc<Progress>,
    now_requested: Arc<tokio::sync::Notify>,
    decoder: Decoder<'k>,
    counts: Counts,
    /// End LSN of the last transaction handed to the sink on this connection.
    last_end: Lsn,
}

impl StreamLoop<'_, '_> {
    /// Until shutdown (`Ok`) or an error (the session ends).
    async fn run(
        &mut self,
        frames: &mut mpsc::Receiver<FrameBatch>,
        failed: &mut mpsc::Receiver<Error>,
    ) -> Result<(), Error> {
        let mut actions = Vec::new();
        let mut chunk_confirmed = self.out.confirmed();
        loop {
            self.incremental.poll();
            let retry = self.incremental.retry_due();
            let batch = tokio::select! {
                b = frames.recv() => b.ok_or_else(|| Error::Replication("replication reader task ended".to_owned()))??,
                Some(e) = failed.recv() => return Err(e),
                Some(answer) = self.incremental.answer() => {
                    self.incremental.on_answer(answer, self.session.client, self.session.metrics).await?;
                    continue;
                }
                r = chunk_confirmed.changed(), if self.incremental.awaiting().is_some() => {
                    if r.is_ok() {
                        let c = *chunk_confirmed.borrow_and_update();
                        self.incremental.on_confirmed(c, self.session.client).await?;
                    }
                    continue;
                }
                () = sleep_until(retry), if retry.is_some() => continue,
                () = self.out.commit_due() => {
                    self.out.commit().await?;
                    continue;
                }
                () = self.session.shutdown.cancelled() => return Ok(()),
            };
            self.out.set_backlog(!frames.is_empty());
            for frame in batch {
                if let Some(e) = self.out.take_fatal() {
                    return Err(e);
                }
                let event = Event::of(frame)?;
                let catalog = match self.decoder.catalog_needed(&event) {
                    Some(oid) => Some(catalog_key(self.session.client, oid).await?),
                    None => None,
                };
                self.decoder.step(event, catalog.as_ref(), &mut actions)?;
                for action in actions.drain(..) {
                    self.apply(action).await?;
                }
            }
            self.counts.flush(self.session.metrics, false);
        }
    }

    async fn apply(&mut self, action: Action) -> Result<(), Error> {
        match action {
            Action::ServerWalEnd(lsn) => {
                self.progress
                    .server_wal_end
                    .fetch_max(lsn, Ordering::Relaxed);
            }
            Action::Send(change) => {
                self.incremental.observe(&change);
                self.counts.add(&change.table, change.op);
                self.out.send(&change).await?;
                if self.counts.due() {
                    self.counts.flush(self.session.metrics, true);
                }
            }
            Action::Commit {
                end_lsn,
                commit_time_us,
            } => {
                self.last_end = end_lsn;
                self.out.end_transaction(end_lsn);
                self.progress
                    .pending
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push_back((end_lsn, commit_time_us));
            }
            Action::Idle(wal_end) => {
                // Nothing in flight and every transaction handed over
                // confirmed. The last condition also covers a failed
                // delivery (a poisoned tracker never confirms again),
                // whatever order the sink updates its counters in.
                if self.out.in_flight() == 0 && *self.confirmed.borrow() >= self.last_end {
                    self.progress.ack.fetch_max(wal_end, Ordering::SeqCst);
                }
            }
            Action::ReplyNow => self.now_requested.notify_one(),
            Action::Signal { id, kind, data } => {
                self.incremental
                    .on_signal(
                        &id,
                        &kind,
                        data.as_deref(),
                        self.session.client,
                        self.session.metrics,
                    )
                    .await?;
            }
            Action::Watermark { lsn, content } => {
                if let Some(end) = self
                    .incremental
                    .on_watermark(lsn, &content, &mut self.out, self.session.metrics)
                    .await?
                {
                    self.last_end = self.last_end.max(end);
                }
            }
        }
        Ok(())
    }

    /// Shutdown: flush Kafka and let the tracker catch up, all within
    /// `--shutdown-timeout-secs`; the status task then confirms.
    async fn drain_on_shutdown(&mut self) {
        let cfg = self.session.cfg;
        if let Err(e) = self.out.commit().await {
            tracing::warn!(source = %cfg.name, error = %local_stack::one_line(&e), "kafka transaction commit on shutdown failed");
        }
        let deadline = Instant::now() + cfg.shutdown_timeout;
        if let Err(e) = self.session.sink.flush(cfg.shutdown_timeout).await {
            tracing::warn!(source = %cfg.name, error = %local_stack::one_line(&e), "kafka flush on shutdown failed");
        }
        let mut rx = self.out.confirmed();
        while self.out.in_flight() > 0 && Instant::now() < deadline {
            tokio::select! {
                _ = rx.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let confirmed = self.progress.ack.load(Ordering::SeqCst).max(*rx.borrow());
        tracing::info!(source = %cfg.name, confirmed = %lsn_to_string(confirmed), "stopped");
    }
}

async fn heartbeat_task(
    cfg: Arc<SourceConfig>,
    every: Duration,
    failed: tokio::sync::mpsc::Sender<Error>,
    stop: CancellationToken,
) {
    let mut client: Option<Client> = None;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        if client.as_ref().is_none_or(Client::is_closed) {
            client = slot::connect_sql(&cfg).await.ok();
        }
        if let Some(c) = &client
            && let Err(e) = c
                .execute(
                    "SELECT pg_logical_emit_message(false, 'instashop_cdc_heartbeat', '')",
                    &[],
                )
                .await
        {
            let e = Error::postgres("heartbeat (pg_logical_emit_message)", e);
            if !e.is_retryable() {
                let _ = failed.try_send(e);
                return;
            }
            tracing::warn!(source = %cfg.name, error = %local_stack::one_line(&e), "heartbeat failed");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A status update the server can no longer receive ends the session
    /// (reported on the failure channel), instead of the task quietly
    /// ending while streaming goes on without confirmations.
    #[tokio::test]
    async fn a_failed_status_update_is_reported() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        drop(server);
        let (_read, write) = client.into_split();
        let (failed_tx, mut failed) = mpsc::channel(2);
        let progress = Arc::new(Progress::default());
        let (confirm, confirmed) = tokio::sync::watch::channel(0);
        let stop = CancellationToken::new();
        let task = tokio::spawn(status_task(StatusTask {
            name: "shop".into(),
            failed: failed_tx,
            writer: StatusWriter::new(write, "test server".into()),
            progress,
            confirmed,
            interval: Duration::from_millis(10),
            metrics: Metrics::new(),
            now_requested: Arc::new(tokio::sync::Notify::new()),
            stop: stop.clone(),
        }));
        // New positions to send until the closed peer makes a write fail.
        let mut lsn = 0;
        let error = loop {
            lsn += 8;
            let _ = confirm.send(lsn);
            tokio::select! {
                e = failed.recv() => break e,
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
            assert!(
                lsn < 8 * 2_000,
                "no failure reported after {} updates",
                lsn / 8
            );
        };
        let error = error.expect("an error on the failure channel");
        assert!(
            error.is_retryable(),
            "a lost connection is retried: {error}"
        );
        assert!(
            std::error::Error::source(&error).is_some(),
            "cause kept as source"
        );
        task.await.unwrap();
        stop.cancel();
    }
}
