//! The Kafka loop, three stages in a pipeline: a poll thread that decodes
//! messages into batches, a loader task that inserts each batch's events
//! into `change_event`, and the writer that folds each batch into the star
//! schema with its offsets. Written batches go back to the poll thread to
//! be filled again.
//!
//! Where each partition resumes is decided by the warehouse, never by
//! Kafka's committed offsets: the partitions are assigned (no consumer
//! group rebalances) at the offsets stored in `sink_offset`, so a batch is
//! read again exactly when its transaction did not commit.
//!
//! The poll thread fills a batch while the stages after it work on the
//! earlier ones; a batch is cut when it holds `--batch-size` messages or
//! `--linger-ms` after its first message, so batches grow with load and
//! stay small when idle.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::batch::Batch;
use crate::dead_letter::DeadLetters;
use crate::telemetry::Telemetry;
use crate::warehouse::Warehouse;
use crate::{Config, Error};

/// Next offset per topic partition.
pub type Offsets = BTreeMap<(String, i32), i64>;

/// How often a consume error that keeps coming back is logged.
const CONSUME_ERROR_EVERY: Duration = Duration::from_secs(5);

/// The librdkafka settings of the sink's clients.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// The consumer of the table topics (assigned, not subscribed).
    pub consumer: ClientConfig,
    /// The dead-letter producer (and the admin client creating its topic).
    pub dead_letters: ClientConfig,
    /// The client reading high watermarks (lag) and probing at startup.
    pub watermarks: ClientConfig,
}

/// The settings from the configuration.
pub fn settings(config: &Config) -> KafkaSettings {
    let mut consumer = ClientConfig::new();
    consumer
        .set("bootstrap.servers", &config.bootstrap_servers)
        // Needed by librdkafka for a consumer; never joined nor committed
        // to: the partitions are assigned and the offsets live in the
        // warehouse.
        .set("group.id", "instashop-dwh")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Only reached without a stored offset or past retention.
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "100")
        .set("queued.max.messages.kbytes", "262144");
    let mut dead_letters = ClientConfig::new();
    dead_letters
        .set("bootstrap.servers", &config.bootstrap_servers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "60000")
        .set("message.max.bytes", "17825792");
    let mut watermarks = ClientConfig::new();
    watermarks.set("bootstrap.servers", &config.bootstrap_servers);
    KafkaSettings {
        consumer,
        dead_letters,
        watermarks,
    }
}

/// Routes librdkafka's log lines to tracing.
struct Logging;

impl ClientContext for Logging {
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

impl ConsumerContext for Logging {}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Assigns every partition of `topics` at its stored offset (the beginning
/// when none is stored). Returns the start offsets known.
fn assign(
    consumer: &BaseConsumer<Logging>,
    topics: &[String],
    stored: &Offsets,
) -> Result<Offsets, Error> {
    let mut tpl = TopicPartitionList::new();
    let mut start = Offsets::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(15))
            .map_err(Error::Kafka)?;
        let Some(t) = metadata.topics().first() else {
            return Err(Error::NoTopic {
                topic: topic.clone(),
            });
        };
        if t.error().is_some() || t.partitions().is_empty() {
            return Err(Error::NoTopic {
                topic: topic.clone(),
            });
        }
        for p in t.partitions() {
            let key = (topic.clone(), p.id());
            let offset = match stored.get(&key) {
                Some(next) => {
                    start.insert(key, *next);
                    Offset::Offset(*next)
                }
                None => Offset::Beginning,
            };
            tpl.add_partition_offset(topic, p.id(), offset)
                .map_err(Error::Kafka)?;
        }
    }
    consumer.assign(&tpl).map_err(Error::Kafka)?;
    tracing::info!(
        partitions = tpl.count(),
        resumed = start.len(),
        "partitions assigned at the offsets stored in the warehouse"
    );
    Ok(start)
}

/// Runs the poll thread and the writer until `shutdown`, then writes the
/// batch in hand.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: &Config,
    kafka: &KafkaSettings,
    renames: Vec<(String, String)>,
    stored: Offsets,
    mut dwh: Warehouse,
    dead_letters: DeadLetters,
    telemetry: &Arc<Telemetry>,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let consumer: BaseConsumer<Logging> = kafka
        .consumer
        .create_with_context(Logging)
        .map_err(Error::Kafka)?;
    let topics = config.topic_list();
    let start = tokio::task::block_in_place(|| assign(&consumer, &topics, &stored))?;
    let positions = Arc::new(Mutex::new(start));

    let (tx, rx) = mpsc::channel::<Batch>(1);
    // Written batches go back to the poll thread to be filled again.
    let (recycle, recycled) = std::sync::mpsc::channel::<Batch>();
    let poll = {
        let shutdown = shutdown.clone();
        let (batch_size, linger) = (config.batch_size, Duration::from_millis(config.linger_ms));
        std::thread::Builder::new()
            .name("poll".into())
            .spawn(move || {
                poll_loop(
                    &consumer, &tx, &recycled, &renames, batch_size, linger, &shutdown,
                )
            })
            .map_err(|source| Error::Spawn {
                thread: "poll",
                source,
            })?
    };
    let lag = spawn_lag(kafka, &positions, telemetry, shutdown)?;

    // After a clean stop was asked for, the writer has the shutdown
    // timeout to write the batch in hand; then every retry gives up.
    let abandon = CancellationToken::new();
    let timer = {
        let (shutdown, abandon) = (shutdown.clone(), abandon.clone());
        let secs = config.shutdown_timeout_secs;
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(Duration::from_secs(secs)).await;
            abandon.cancel();
        })
    };
    telemetry.set_consuming(true);
    let mut result = Ok(());
    // Two warehouse sessions in a pipeline: while `dwh` folds batch N into
    // the star schema (and stores its offsets), the loader task inserts the
    // events of the batches after it into change_event, in transactions of
    // their own, so the server works on both at once and neither waits for
    // the other's slower batches. A batch whose events were committed but
    // whose offsets were not is read again after a restart, and its events
    // then add nothing (change_event's unique key). A batch the loader
    // could not load (it failed, or could not connect) has its events
    // inserted by its own transaction, as a single session would.
    let (loaded_tx, mut loaded_rx) = mpsc::channel::<(Batch, Option<u64>)>(1);
    let (folded_tx, folded_rx) = watch::channel(0u64);
    let loader = tokio::spawn(load_ahead(rx, loaded_tx, folded_rx, config.dwh_url.clone()));
    let mut idle = Instant::now();
    while let Some((batch, loaded)) = loaded_rx.recv().await {
        // How long the writer waited for this batch: with a backlog, near
        // zero when the fold is the slower stage.
        tracing::debug!(
            waited_ms = idle.elapsed().as_millis() as u64,
            loaded = loaded.is_some(),
            "batch taken by the writer"
        );
        if let Err(e) = write_batch(
            config,
            &mut dwh,
            &dead_letters,
            &batch,
            loaded,
            telemetry,
            &abandon,
        )
        .await
        {
            shutdown.cancel();
            result = Err(e);
            break;
        }
        if let Ok(mut p) = positions.lock() {
            p.extend(batch.next_offsets.iter().map(|(k, v)| (k.clone(), *v)));
        }
        folded_tx.send_modify(|n| *n += 1);
        // The poll thread may have ended (shutdown): then it is dropped.
        let _ = recycle.send(batch);
        idle = Instant::now();
    }
    drop(loaded_rx);
    drop(folded_tx);
    if result.is_err() {
        loader.abort();
    }
    let _ = loader.await;
    telemetry.set_consuming(false);
    shutdown.cancel();
    timer.abort();
    let polled = join(poll, "poll");
    let _ = join(lag, "lag");
    if result.is_ok() {
        tracing::info!("sink stopped after writing the batch in hand");
    }
    result.and(polled)
}

fn join(handle: std::thread::JoinHandle<Result<(), Error>>, name: &str) -> Result<(), Error> {
    handle
        .join()
        .unwrap_or_else(|_| Err(Error::Internal(format!("the {name} thread panicked"))))
}

/// The loader task: inserts each batch's events on its own session and
/// hands the batch on to the writer. A batch with a snapshot-complete
/// marker or a truncate reads change_event as of its own events, so the
/// batches after it are loaded only once the writer has folded it (`folded`
/// counts the batches folded).
async fn load_ahead(
    mut batches: mpsc::Receiver<Batch>,
    loaded: mpsc::Sender<(Batch, Option<u64>)>,
    mut folded: watch::Receiver<u64>,
    url: String,
) {
    let mut session: Option<Warehouse> = None;
    let mut sent = 0u64;
    while let Some(batch) = batches.recv().await {
        let started = Instant::now();
        let inserted = load_events(&mut session, &url, &batch).await;
        let load_ms = started.elapsed().as_millis() as u64;
        let barrier = !batch.markers.is_empty() || !batch.truncates.is_empty();
        if loaded.send((batch, inserted)).await.is_err() {
            return;
        }
        // With a backlog, the send waits when the fold is the slower stage.
        tracing::debug!(
            load_ms,
            send_ms = (started.elapsed().as_millis() as u64).saturating_sub(load_ms),
            "batch events loaded"
        );
        sent += 1;
        if barrier && folded.wait_for(|n| *n >= sent).await.is_err() {
            return;
        }
    }
}

/// Inserts `batch`'s events on the loader session (connected first if
/// needed); `None` when that failed, and the batch's own transaction
/// inserts them then. A failed loader is dropped and connected afresh for
/// the next batch.
async fn load_events(loader: &mut Option<Warehouse>, url: &str, batch: &Batch) -> Option<u64> {
    if loader.is_none() {
        match Warehouse::connect(url).await {
            Ok(session) => *loader = Some(session),
            Err(e) => {
                tracing::debug!(error = %local_stack::one_line(&e), "event loader session unavailable");
                return None;
            }
        }
    }
    let session = loader.as_mut()?;
    match session.load_events(batch).await {
        Ok(inserted) => Some(inserted),
        Err(e) => {
            tracing::debug!(error = %local_stack::one_line(&e), "loading the batch's events failed; its own transaction inserts them");
            *loader = None;
            None
        }
    }
}

/// Writes one batch (its events too unless `loaded`), retrying transient
/// warehouse failures with backoff on a new connection until it succeeds
/// or the shutdown timeout passes.
async fn write_batch(
    config: &Config,
    dwh: &mut Warehouse,
    dead_letters: &DeadLetters,
    batch: &Batch,
    loaded: Option<u64>,
    telemetry: &Telemetry,
    abandon: &CancellationToken,
) -> Result<(), Error> {
    if !batch.dead.is_empty() {
        dead_letters.deliver(&batch.dead).await?;
        telemetry.dead_lettered(batch.dead.len());
    }
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    let written = loop {
        let error = match dwh.write(batch, loaded).await {
            Ok(written) => break written,
            Err(Error::DwhUnavailable(e)) => e,
            Err(e) => return Err(e),
        };
        telemetry.write_failed();
        tracing::warn!(error = %local_stack::one_line(&error), messages = batch.messages, "writing the batch to the warehouse failed, retrying");
        tokio::select! {
            () = abandon.cancelled() => {
                return Err(Error::ShutdownTimeout { secs: config.shutdown_timeout_secs });
            }
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
        match dwh.reconnect(&config.dwh_url).await {
            Ok(()) | Err(Error::DwhUnavailable(_)) => {}
            Err(e) => return Err(e),
        }
    };
    telemetry.written(
        &batch.per_table,
        batch.messages,
        written.duplicates,
        batch.skipped,
        started.elapsed(),
    );
    if let Some(newest) = batch.max_commit_time_us {
        telemetry.set_e2e_lag_ms((now_us() - newest) / 1000);
    }
    tracing::debug!(
        messages = batch.messages,
        inserted = written.inserted,
        duplicates = written.duplicates,
        "batch written"
    );
    Ok(())
}

/// An empty batch: a written one handed back, or a new one.
fn fresh(recycled: &std::sync::mpsc::Receiver<Batch>) -> Batch {
    match recycled.try_recv() {
        Ok(mut batch) => {
            batch.clear();
            batch
        }
        Err(_) => Batch::default(),
    }
}

fn poll_loop(
    consumer: &BaseConsumer<Logging>,
    tx: &mpsc::Sender<Batch>,
    recycled: &std::sync::mpsc::Receiver<Batch>,
    renames: &[(String, String)],
    batch_size: usize,
    linger: Duration,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let mut batch = Batch::default();
    let mut started: Option<Instant> = None;
    let mut logged: HashSet<&'static str> = HashSet::new();
    let mut last_error: Option<Instant> = None;
    let mut held_back = 0u64;
    while !shutdown.is_cancelled() {
        // What is ready is taken without reading the clock: with a backlog
        // that is every message, and two clock reads per message were
        // measurable. The clock decides the wait only when nothing is.
        let mut polled = consumer.poll(Duration::ZERO);
        if polled.is_none() {
            let timeout = started.map_or(Duration::from_millis(100), |t| {
                linger
                    .saturating_sub(t.elapsed())
                    .max(Duration::from_millis(5))
            });
            polled = consumer.poll(timeout);
        }
        let idle = polled.is_none();
        match polled {
            None => {}
            Some(Err(e)) => {
                if last_error.is_none_or(|t| t.elapsed() >= CONSUME_ERROR_EVERY) {
                    tracing::warn!(error = %e, held_back, "kafka consume error (repeats within 5 s are only counted, in held_back)");
                    last_error = Some(Instant::now());
                    held_back = 0;
                } else {
                    held_back += 1;
                }
            }
            Some(Ok(m)) => {
                if batch.is_empty() {
                    started = Some(Instant::now());
                }
                if let Err(bad) = push(&mut batch, &m, renames)
                    && logged.insert(bad.kind())
                {
                    tracing::warn!(
                        kind = bad.kind(),
                        topic = m.topic(),
                        partition = m.partition(),
                        offset = m.offset(),
                        error = %bad,
                        "bad message: counted, sent to the dead-letter topic and skipped (logged once per kind)"
                    );
                }
            }
        }
        // A full batch waits for the writer; a lingering one is handed
        // over only when the writer can take it, else it keeps growing
        // (fewer, larger transactions under load).
        if batch.messages >= batch_size {
            if tx
                .blocking_send(std::mem::replace(&mut batch, fresh(recycled)))
                .is_err()
            {
                return Ok(());
            }
            started = None;
        } else if (idle || batch.messages % 256 == 0)
            && started.is_some_and(|t| t.elapsed() >= linger)
        {
            match tx.try_send(std::mem::take(&mut batch)) {
                Ok(()) => {
                    batch = fresh(recycled);
                    started = None;
                }
                Err(mpsc::error::TrySendError::Full(back)) => batch = back,
                Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(batch);
    }
    Ok(())
}

/// Adds one message to the batch: a snapshot-complete marker (null key
/// and value, `cdc.marker` header) or a change event.
fn push(
    batch: &mut Batch,
    m: &rdkafka::message::BorrowedMessage<'_>,
    renames: &[(String, String)],
) -> Result<(), crate::event::BadInput> {
    use rdkafka::message::Headers as _;
    let headers = m
        .headers()
        .filter(|_| m.key().is_none() && m.payload().is_none());
    let marker = headers
        .and_then(|h| crate::event::decode_marker(h.iter().map(|h| (h.key, h.value)), renames));
    match marker {
        Some(marker) => {
            let time_us = m
                .timestamp()
                .to_millis()
                .and_then(|ms| ms.checked_mul(1000))
                .unwrap_or_else(now_us);
            let raw: Vec<(String, Vec<u8>)> = headers
                .into_iter()
                .flat_map(|h| h.iter())
                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                .collect();
            batch.push_marker(m.topic(), m.partition(), m.offset(), marker, &raw, time_us)
        }
        None => batch.push(
            m.topic(),
            m.partition(),
            m.offset(),
            m.key(),
            m.payload(),
            renames,
        ),
    }
}

/// The thread that keeps the per-partition lag gauge, on a client of its own.
fn spawn_lag(
    kafka: &KafkaSettings,
    positions: &Arc<Mutex<Offsets>>,
    telemetry: &Arc<Telemetry>,
    shutdown: &CancellationToken,
) -> Result<std::thread::JoinHandle<Result<(), Error>>, Error> {
    let watermarks: BaseConsumer = kafka.watermarks.create().map_err(Error::Kafka)?;
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
                |lag| telemetry.set_lag(lag),
                &shutdown,
            );
            Ok(())
        })
        .map_err(|source| Error::Spawn {
            thread: "lag",
            source,
        })
}
