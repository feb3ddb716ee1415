//! The Kafka loop: two threads around the pure decode and the atomic apply.
//!
//! * The poll thread fetches messages, decodes them (`fold::decode`) and cuts
//!   batches: everything already fetched, up to `batch_size`, so batches grow
//!   with load and stay small (low latency) when idle.
//! * The plan thread copies bad messages to the dead-letter topic (waiting
//!   for delivery), then reads the Redis values the batch depends on and
//!   folds it into a plan (`plan.rs`), as if the batch before it, whose
//!   script may still be running, had been applied.
//! * The apply thread runs the plan's compare-and-write script; if its inputs
//!   changed it re-reads and re-plans; it retries until Redis takes the batch
//!   and hands the applied offsets back for an advisory group commit.
//!
//! So decoding batch N+2, planning N+1 and applying N overlap.
//!
//! Where a partition resumes is decided by Redis, not by the group's commits:
//! on every assignment the rebalance callback reads the offsets the script
//! stored with the metrics and seeks there. A batch still in flight for a
//! partition that moved to another process is harmless: the script skips
//! offsets below the stored ones, so whichever process applies first wins and
//! the other's copy counts as duplicates.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers as _, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use tokio_util::sync::CancellationToken;

use crate::dead_letter::{DeadLetter, DeadLetters};
use crate::fold::{self, BadInput};
use crate::plan::Plan;
use crate::store::{Batch, Planner, Store};
use crate::telemetry::Telemetry;
use crate::{Config, Error};

/// Next offset per topic/partition.
type Offsets = HashMap<(String, i32), i64>;

/// How often a consume error that keeps coming back is logged: during a
/// broker outage librdkafka reports one on nearly every poll.
const CONSUME_ERROR_EVERY: Duration = Duration::from_secs(5);

/// What to change when the brokers refuse the group membership for good;
/// `None` for a consume error that may pass (an outage, a rebalance).
fn membership_fix(error: &KafkaError) -> Option<&'static str> {
    match error.rdkafka_error_code()? {
        RDKafkaErrorCode::InvalidSessionTimeout => Some(
            "--session-timeout-ms must lie between the brokers' group.min.session.timeout.ms and group.max.session.timeout.ms (6000 and 1800000 ms by default)",
        ),
        RDKafkaErrorCode::GroupAuthorizationFailed => {
            Some("grant the consumer's principal Read on the group (--group)")
        }
        _ => None,
    }
}

/// Lets a repeated warning through at most once per interval and counts
/// the occurrences held back in between.
#[derive(Debug)]
struct Throttle {
    every: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: None,
            held_back: 0,
        }
    }

    /// `Some(held back since the last one let through)` when this
    /// occurrence at `now` is to be logged, else `None` (counted).
    fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

/// How the threads learn to stop. `shutdown` asks for a clean stop: polling
/// ends and the batch in hand is still applied (also cancelled by a thread
/// that met a definite error, so the others wind down). `abandon` is
/// cancelled once the shutdown timeout has passed: every retry gives up.
#[derive(Debug, Clone)]
pub struct Stop {
    /// A clean stop was asked for.
    pub shutdown: CancellationToken,
    /// The shutdown timeout passed: give up.
    pub abandon: CancellationToken,
    /// `--shutdown-timeout-secs`.
    pub timeout_secs: u64,
}

impl Stop {
    /// A stop signalled by `shutdown`, abandoned by whoever runs the timer.
    pub fn new(shutdown: CancellationToken, timeout_secs: u64) -> Stop {
        Stop {
            shutdown,
            abandon: CancellationToken::new(),
            timeout_secs,
        }
    }

    /// Waits `delay` before a retry; `Err` at once when abandoned.
    pub(crate) fn backoff(&self, delay: Duration) -> Result<(), Error> {
        let until = Instant::now() + delay;
        loop {
            if self.abandon.is_cancelled() {
                return Err(self.timed_out());
            }
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            std::thread::sleep((until - now).min(Duration::from_millis(20)));
        }
    }

    fn timed_out(&self) -> Error {
        Error::ShutdownTimeout {
            secs: self.timeout_secs,
        }
    }

    /// Joins a worker thread, unless the shutdown timeout passes first (a
    /// thread stuck in a blocking call is left behind).
    fn join(
        &self,
        handle: std::thread::JoinHandle<Result<(), Error>>,
        name: &str,
    ) -> Result<(), Error> {
        while !handle.is_finished() {
            if self.abandon.is_cancelled() {
                return Err(self.timed_out());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        handle
            .join()
            .unwrap_or_else(|_| Err(Error::Internal(format!("the {name} thread panicked"))))
    }
}

#[derive(Debug)]
struct Work {
    batch: Batch,
    dead: Vec<DeadLetter>,
}

/// Seeks every newly assigned partition to the offset stored in Redis.
struct Rebalancer {
    store: Mutex<Store>,
    stop: Stop,
    /// A definite error met in the callback, for `run_blocking` to return.
    failed: Mutex<Option<Error>>,
}

impl ClientContext for Rebalancer {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(facility = fac, "librdkafka: {log_message}");
            }
            L::Warning => tracing::warn!(facility = fac, "librdkafka: {log_message}"),
            L::Notice | L::Info => tracing::info!(facility = fac, "librdkafka: {log_message}"),
            L::Debug => tracing::debug!(facility = fac, "librdkafka: {log_message}"),
        }
    }
}

impl ConsumerContext for Rebalancer {
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let tps: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                let stored = self.stored_offsets(&tps);
                for ((topic, partition), offset) in tps.iter().zip(stored) {
                    let offset = offset.map_or(Offset::Beginning, Offset::Offset);
                    if let Err(e) = tpl.set_partition_offset(topic, *partition, offset) {
                        tracing::warn!(topic, partition, error = %e, "cannot set start offset");
                    }
                }
                tracing::info!(
                    partitions = tps.len(),
                    "partitions assigned, resuming at offsets stored in redis"
                );
                if let Err(e) = base_consumer.assign(tpl) {
                    tracing::error!(error = %e, "assign failed");
                }
            }
            _ => {
                tracing::info!(partitions = tpl.count(), "partitions revoked");
                if let Err(e) = base_consumer.unassign() {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
        }
    }
}

impl Rebalancer {
    /// Reads the stored offsets, retrying while Redis is unreachable. Gives
    /// up on shutdown or a definite error (recorded, and the consumer
    /// stops); the partitions then start from the beginning, which is still
    /// safe: the apply skips every offset below the stored ones.
    fn stored_offsets(&self, tps: &[(String, i32)]) -> Vec<Option<i64>> {
        let mut delay = Duration::from_millis(100);
        loop {
            let result = match self.store.lock() {
                Ok(mut store) => store.offsets(tps),
                Err(_) => return vec![None; tps.len()],
            };
            match result {
                Ok(offsets) => return offsets,
                Err(e) if crate::store::is_transient(&e) => {
                    tracing::warn!(error = %e, "cannot read stored offsets from redis, retrying");
                    if self.stop.shutdown.is_cancelled() || self.stop.backoff(delay).is_err() {
                        return vec![None; tps.len()];
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    if let Ok(mut failed) = self.failed.lock() {
                        failed.get_or_insert(Error::RedisRejected(e));
                    }
                    self.stop.shutdown.cancel();
                    return vec![None; tps.len()];
                }
            }
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Runs the consumer until `stop.shutdown`; blocking (call from a thread
/// of its own). Returns the first definite error any of its threads met.
pub fn run_blocking(config: &Config, telemetry: &Arc<Telemetry>, stop: &Stop) -> Result<(), Error> {
    let settings = crate::settings::translate(config)?;
    let consumer = subscribe(config, &settings, stop)?;
    let dead_letters = DeadLetters::new(&settings.dead_letters, &config.dlq_topic)?;
    let pipeline = Pipeline::spawn(config, dead_letters, telemetry, stop)?;
    let positions = Arc::new(Mutex::new(HashMap::new()));
    let lag = spawn_lag(&settings, &positions, telemetry, &stop.shutdown)?;

    telemetry.set_consuming(true);
    let polled = poll_loop(
        config,
        &consumer,
        &pipeline.work_tx,
        &pipeline.done_rx,
        &positions,
        telemetry,
        &stop.shutdown,
    );
    let (result, done_rx) = pipeline.finish(polled, &consumer, stop);
    stop.shutdown.cancel();
    telemetry.set_consuming(false);
    // The error itself is the one line the binary prints.
    if result.is_err() && stop.abandon.is_cancelled() {
        return result;
    }
    // Final advisory commit of everything applied.
    let mut applied = HashMap::new();
    while let Ok(offsets) = done_rx.try_recv() {
        applied.extend(offsets);
    }
    commit(&consumer, &applied, CommitMode::Sync);
    let _ = stop.join(lag, "lag");
    if result.is_ok() {
        tracing::info!("consumer stopped after applying the batch in hand");
    }
    result
}

/// The group consumer, subscribed; its rebalance callback seeks to the
/// offsets stored in Redis.
fn subscribe(
    config: &Config,
    settings: &crate::settings::KafkaSettings,
    stop: &Stop,
) -> Result<BaseConsumer<Rebalancer>, Error> {
    let rebalancer = Rebalancer {
        store: Mutex::new(Store::new(&config.redis_url, &config.prefix).map_err(Error::Redis)?),
        stop: stop.clone(),
        failed: Mutex::new(None),
    };
    let consumer: BaseConsumer<Rebalancer> = settings
        .consumer
        .create_with_context(rebalancer)
        .map_err(Error::Kafka)?;
    let topics = config.topic_list();
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(Error::Kafka)?;
    tracing::info!(topics = topics.len(), group = %config.group, "subscribed");
    Ok(consumer)
}

/// The plan and apply threads and the channels around them.
struct Pipeline {
    work_tx: SyncSender<Work>,
    done_rx: Receiver<Offsets>,
    plans: std::thread::JoinHandle<Result<(), Error>>,
    applier: std::thread::JoinHandle<Result<(), Error>>,
}

impl Pipeline {
    fn spawn(
        config: &Config,
        dead_letters: DeadLetters,
        telemetry: &Arc<Telemetry>,
        stop: &Stop,
    ) -> Result<Pipeline, Error> {
        let (work_tx, work_rx) = sync_channel::<Work>(1);
        // Rendezvous: the planner hands batch N+1 over only once the apply
        // thread has finished N, so at most one script runs while it plans.
        let (plan_tx, plan_rx) = sync_channel::<(Batch, Option<Plan>)>(0);
        let (done_tx, done_rx) = std::sync::mpsc::channel::<Offsets>();
        let mut store = Store::new(&config.redis_url, &config.prefix).map_err(Error::Redis)?;
        let mut planner = Planner::new(&config.redis_url, &config.prefix).map_err(Error::Redis)?;
        let (plan_telemetry, plan_stop) = (Arc::clone(telemetry), stop.clone());
        let plans = std::thread::Builder::new()
            .name("plan".into())
            .spawn(move || {
                plan_loop(
                    &work_rx,
                    &plan_tx,
                    &mut planner,
                    &dead_letters,
                    &plan_telemetry,
                    &plan_stop,
                )
            })
            .map_err(|source| Error::Spawn {
                thread: "plan",
                source,
            })?;
        let (apply_telemetry, apply_stop) = (Arc::clone(telemetry), stop.clone());
        let dashboard_every = Duration::from_millis(config.dashboard_interval_ms);
        let applier = std::thread::Builder::new()
            .name("apply".into())
            .spawn(move || {
                apply_loop(
                    &plan_rx,
                    &done_tx,
                    &mut store,
                    &apply_telemetry,
                    dashboard_every,
                    &apply_stop,
                )
            })
            .map_err(|source| Error::Spawn {
                thread: "apply",
                source,
            })?;
        Ok(Pipeline {
            work_tx,
            done_rx,
            plans,
            applier,
        })
    }

    /// Lets the threads finish the work handed over and returns the
    /// consumer's result: the definite cause first (the poll loop only sees
    /// the threads it feeds stop), then the poll loop's own.
    fn finish(
        self,
        polled: Result<(), Error>,
        consumer: &BaseConsumer<Rebalancer>,
        stop: &Stop,
    ) -> (Result<(), Error>, Receiver<Offsets>) {
        drop(self.work_tx);
        let planned = stop.join(self.plans, "plan");
        let applied = stop.join(self.applier, "apply");
        let failed = consumer
            .context()
            .failed
            .lock()
            .ok()
            .and_then(|mut f| f.take());
        let result = match (failed, planned, applied, polled) {
            (Some(e), ..) | (None, Err(e), ..) | (None, Ok(()), Err(e), _) => Err(e),
            (None, Ok(()), Ok(()), polled) => polled,
        };
        (result, self.done_rx)
    }
}

/// The thread that keeps the lag gauge (the sum over the partitions of how
/// far the applied offsets are behind the high watermarks), on a client of
/// its own: watermark queries can be slow on a busy broker and must not
/// stall the poll loop.
fn spawn_lag(
    settings: &crate::settings::KafkaSettings,
    positions: &Arc<Mutex<Offsets>>,
    telemetry: &Arc<Telemetry>,
    shutdown: &CancellationToken,
) -> Result<std::thread::JoinHandle<Result<(), Error>>, Error> {
    let watermarks: BaseConsumer = settings.watermarks.create().map_err(Error::Kafka)?;
    let (positions, telemetry, shutdown) = (
        Arc::clone(positions),
        Arc::clone(telemetry),
        shutdown.clone(),
    );
    std::thread::Builder::new()
        .name("lag".into())
        .spawn(move || {
            kafka_probe::lag::watch(
                &watermarks,
                || {
                    positions
                        .lock()
                        .ok()
                        .map(|p| p.iter().map(|(k, v)| (k.clone(), *v)).collect())
                },
                |lag| telemetry.set_consumer_lag(lag.values().sum()),
                &shutdown,
            );
            Ok(())
        })
        .map_err(|source| Error::Spawn {
            thread: "lag",
            source,
        })
}

fn poll_loop(
    config: &Config,
    consumer: &BaseConsumer<Rebalancer>,
    work_tx: &SyncSender<Work>,
    done_rx: &Receiver<Offsets>,
    positions: &Mutex<Offsets>,
    telemetry: &Telemetry,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let mut batch = Batch::default();
    let mut dead = Vec::new();
    let mut logged_kinds: HashSet<&'static str> = HashSet::new();
    let mut consume_errors = Throttle::new(CONSUME_ERROR_EVERY);
    let renames = config.renames()?;
    let send = |batch: &mut Batch, dead: &mut Vec<DeadLetter>| -> Result<(), Error> {
        if batch.is_empty() {
            return Ok(());
        }
        let work = Work {
            batch: std::mem::take(batch),
            dead: std::mem::take(dead),
        };
        work_tx
            .send(work)
            .map_err(|_| Error::Internal("the apply thread stopped".into()))
    };
    while !shutdown.is_cancelled() {
        let mut applied = HashMap::new();
        while let Ok(offsets) = done_rx.try_recv() {
            applied.extend(offsets);
        }
        if !applied.is_empty() {
            commit(consumer, &applied, CommitMode::Async);
            if let Ok(mut p) = positions.lock() {
                p.extend(applied);
            }
        }
        let timeout = if batch.is_empty() {
            Duration::from_millis(100)
        } else {
            Duration::ZERO
        };
        match consumer.poll(timeout) {
            None => send(&mut batch, &mut dead)?,
            Some(Err(e)) => {
                if let Some(fix) = membership_fix(&e) {
                    send(&mut batch, &mut dead)?;
                    return Err(Error::GroupRefused {
                        group: config.group.clone(),
                        fix,
                        source: e,
                    });
                }
                if let Some(held_back) = consume_errors.admit(Instant::now()) {
                    tracing::warn!(error = %e, held_back, "kafka consume error (repeats within 5 s are only counted, in held_back)");
                }
                send(&mut batch, &mut dead)?;
            }
            Some(Ok(message)) => {
                let topic = message.topic();
                let partition = message.partition();
                let offset = message.offset();
                let marker = match (message.payload(), message.headers()) {
                    (None, Some(headers)) => {
                        fold::decode_marker(headers.iter().map(|h| (h.key, h.value)), &renames)
                    }
                    _ => None,
                };
                let decoded = marker.unwrap_or_else(|| {
                    fold::decode_renamed(message.key(), message.payload(), &renames)
                });
                match decoded {
                    Ok(change) => {
                        telemetry.received(now_ms(), change.ts_ms().into_iter());
                        batch.push(topic, partition, offset, Some(change));
                    }
                    Err(bad) => {
                        log_bad(&mut logged_kinds, &bad, topic, partition, offset);
                        dead.push(DeadLetter {
                            topic: topic.to_owned(),
                            partition,
                            offset,
                            key: message.key().map(<[u8]>::to_vec),
                            payload: message.payload().map(<[u8]>::to_vec),
                            error: bad.to_string(),
                        });
                        batch.push(topic, partition, offset, None);
                    }
                }
                if batch.len >= config.batch_size {
                    send(&mut batch, &mut dead)?;
                }
            }
        }
    }
    send(&mut batch, &mut dead)
}

fn log_bad(
    logged: &mut HashSet<&'static str>,
    bad: &BadInput,
    topic: &str,
    partition: i32,
    offset: i64,
) {
    if logged.insert(bad.kind()) {
        tracing::warn!(
            kind = bad.kind(),
            topic,
            partition,
            offset,
            error = %bad,
            "bad message: counted, sent to the dead-letter topic and skipped (logged once per kind)"
        );
    }
}

fn commit(consumer: &BaseConsumer<Rebalancer>, offsets: &Offsets, mode: CommitMode) {
    if offsets.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in offsets {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
            tracing::debug!(error = %e, "cannot add commit offset");
        }
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        // Advisory only: Redis holds the offsets that count.
        tracing::debug!(error = %e, "group offset commit failed");
    }
}

/// Dead-letters the batch's bad messages, then plans it (as after the batch
/// before it). A failed read leaves the plan to the apply thread.
fn plan_loop(
    work_rx: &Receiver<Work>,
    plan_tx: &SyncSender<(Batch, Option<Plan>)>,
    planner: &mut Planner,
    dead_letters: &DeadLetters,
    telemetry: &Telemetry,
    stop: &Stop,
) -> Result<(), Error> {
    for work in work_rx {
        if !work.dead.is_empty() {
            if let Err(e) = dead_letters.deliver(&work.dead, stop) {
                stop.shutdown.cancel();
                return Err(e);
            }
            telemetry.dead_lettered(work.dead.len() as u64);
        }
        let plan = match planner.plan(&work.batch, now_ms()) {
            Ok(plan) => Some(plan),
            Err(e) => {
                tracing::debug!(error = %e, "planning ahead failed; the apply thread re-plans");
                None
            }
        };
        if plan_tx.send((work.batch, plan)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

fn apply_loop(
    plan_rx: &Receiver<(Batch, Option<Plan>)>,
    done_tx: &std::sync::mpsc::Sender<Offsets>,
    store: &mut Store,
    telemetry: &Telemetry,
    dashboard_every: Duration,
    stop: &Stop,
) -> Result<(), Error> {
    let mut last_dashboard: Option<Instant> = None;
    let mut dashboard_stale = false;
    loop {
        let (batch, plan) = match plan_rx.recv_timeout(dashboard_every) {
            Ok(work) => work,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                // Idle: bring the summary up to date with the last batch.
                if dashboard_stale {
                    dashboard_stale = store.write_dashboard(now_ms()).is_err();
                    last_dashboard = Some(Instant::now());
                }
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let started = Instant::now();
        let mut delay = Duration::from_millis(50);
        let mut plan = plan;
        let applied = loop {
            match store.apply_planned(&batch, plan.take().as_ref(), now_ms()) {
                Ok(applied) => break applied,
                Err(e) if e.is_transient() => {
                    telemetry.apply_failed();
                    tracing::warn!(error = %local_stack::one_line(&e), messages = batch.len, "applying batch to redis failed, retrying");
                    stop.backoff(delay)?;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    telemetry.apply_failed();
                    stop.shutdown.cancel();
                    return Err(e);
                }
            }
        };
        let now = now_ms();
        telemetry.batch_applied(&batch.per_table, batch.len, started.elapsed());
        telemetry.counted(applied.duplicates, applied.bad, applied.skipped);
        telemetry.end_to_end(
            now,
            batch
                .entries()
                .iter()
                .filter_map(|e| e.change.as_ref()?.ts_ms()),
        );
        if let Some(ts) = batch.max_ts_ms {
            telemetry.set_e2e_lag_ms(now - ts);
        }
        tracing::debug!(
            messages = batch.len,
            applied = applied.applied,
            duplicates = applied.duplicates,
            "batch applied"
        );
        let _ = done_tx.send(batch.next_offsets);
        dashboard_stale = true;
        if last_dashboard.is_none_or(|t| t.elapsed() >= dashboard_every) {
            last_dashboard = Some(Instant::now());
            match store.write_dashboard(now) {
                Ok(()) => dashboard_stale = false,
                Err(e) => tracing::warn!(error = %e, "cannot write the dashboard summary"),
            }
        }
    }
    if let Err(e) = store.write_dashboard(now_ms()) {
        tracing::warn!(error = %e, "cannot write the dashboard summary");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_memberships_are_definite_and_outages_are_not() {
        let consume = KafkaError::MessageConsumption;
        let fix = membership_fix(&consume(RDKafkaErrorCode::InvalidSessionTimeout));
        assert!(fix.is_some_and(|f| f.contains("--session-timeout-ms")));
        assert!(membership_fix(&consume(RDKafkaErrorCode::GroupAuthorizationFailed)).is_some());
        for transient in [
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ] {
            assert_eq!(membership_fix(&consume(transient)), None, "{transient:?}");
        }
    }

    #[test]
    fn a_repeated_warning_is_let_through_once_per_interval_with_a_count() {
        let mut throttle = Throttle::new(Duration::from_secs(5));
        let start = Instant::now();
        assert_eq!(throttle.admit(start), Some(0));
        // An outage: an error on every 50 ms poll.
        let mut logged = Vec::new();
        for i in 1..=200u32 {
            let at = start + Duration::from_millis(50) * i;
            if let Some(held_back) = throttle.admit(at) {
                logged.push((at - start, held_back));
            }
        }
        assert_eq!(
            logged,
            vec![(Duration::from_secs(5), 99), (Duration::from_secs(10), 99)]
        );
        // After a quiet spell the next one is logged at once.
        assert_eq!(throttle.admit(start + Duration::from_secs(60)), Some(0));
    }
}
