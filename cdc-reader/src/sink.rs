//! The Kafka side: encode changes, produce them, and tell the source which
//! LSN may be confirmed to Postgres.
//!
//! One [`Sink`] (one idempotent librdkafka producer, `acks=all`) is shared by
//! all sources; each source gets a [`SourceSink`] with its own
//! [`crate::ack::AckTracker`].
//! A transaction's `end_lsn` becomes confirmable only when every record of it
//! and of every earlier transaction of that source has been acknowledged by
//! Kafka, so a crash at any instant loses nothing: Postgres resends every
//! unconfirmed transaction.
//!
//! Ordering per key: keys are hashed like the Java client (`murmur2_random`),
//! so one key always lands in one partition; a truncate (null key) is
//! produced once to every partition of its topic, so each partition carries
//! it in order with its own events; the idempotent producer keeps a
//! partition's records in order across retries, and with
//! `enable.gapless.guarantee` a permanently failed batch can never be skipped
//! by a later one (the producer turns fatal instead).
//!
//! A failed delivery poisons the source's tracker: its confirmed LSN never
//! moves again and [`SourceSink::take_fatal`] returns the error; the source
//! reconnects, takes a fresh [`Sink::source`] and resends from the slot. The
//! fresh tracker's first send waits until the previous tracker's records are
//! all reported, so resent records never queue behind doomed ones. A fatal
//! producer error (idempotence state lost) makes the sink build a new
//! producer for later sends. `message.timeout.ms` is long (300 s), so a broker
//! outage stalls the pipeline instead of failing records.
//!
//! API notes for the replication side: `SourceSink::confirmed()` starts at 0
//! (nothing confirmed by this tracker yet); the metrics hooks are the
//! [`SinkMetrics`] trait (no-op defaults), implemented by
//! `crate::metrics::Metrics`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::Message as _;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::watch;

use crate::ack::AckTracker;
use crate::change::{Change, Lsn};
use crate::envelope::{Encoder, EnvelopeConfig, Record, Route, partitions};
use crate::error::Error;
use crate::exactly_once::{ExactlyOnce, TransactionalSink};
use crate::topic::{TopicSettings, Topics};

/// Producer and encoding settings.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// What the envelope contains.
    pub envelope: EnvelopeConfig,
    /// Creating missing topics.
    pub topics: TopicSettings,
    /// `message.timeout.ms`: how long a record may wait for the brokers
    /// before it fails (long, so an outage stalls instead of failing).
    pub message_timeout: Duration,
    /// `linger.ms`.
    pub linger: Duration,
    /// `queue.buffering.max.kbytes`: bounds memory held by unacknowledged records.
    pub max_queue_kbytes: u32,
    /// Extra librdkafka properties (applied last; tests use them).
    pub extra: Vec<(String, String)>,
    /// Transactional producers and checkpoints (`--exactly-once true`);
    /// `None`: one idempotent producer, at-least-once.
    pub exactly_once: Option<ExactlyOnce>,
}

impl SinkConfig {
    /// Defaults for `bootstrap_servers`.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        SinkConfig {
            bootstrap_servers: bootstrap_servers.into(),
            envelope: EnvelopeConfig::default(),
            topics: TopicSettings::default(),
            message_timeout: Duration::from_secs(300),
            linger: Duration::from_millis(5),
            max_queue_kbytes: 32 * 1024,
            extra: Vec::new(),
            exactly_once: None,
        }
    }
}

/// The producer's `message.max.bytes`: events up to 16 MiB plus the record
/// and batch framing, the same 17 MiB (17825792 bytes) the brokers' and
/// topics' `message.max.bytes` / `max.message.bytes` are set to.
pub const MESSAGE_MAX_BYTES: usize = 17_825_792;

/// Why the idempotent producer's ordering needs few requests in flight.
const IN_FLIGHT_WHY: &str =
    "the idempotent producer keeps a partition in order only with at most 5 requests in flight";
/// Why acknowledgements must come from all in-sync replicas.
const ACKS_WHY: &str = "an event Kafka acknowledged must survive a broker failure before its LSN is confirmed to Postgres";

/// Settings the guarantees rest on: a user override of one of them is
/// rejected unless it asks for the same (`None`: any value from 1 to 5).
const PROTECTED: [(&str, Option<&str>, &str); 7] = [
    ("acks", Some("all"), ACKS_WHY),
    ("request.required.acks", Some("all"), ACKS_WHY),
    (
        "enable.idempotence",
        Some("true"),
        "retries must neither duplicate nor reorder a key's events",
    ),
    (
        "enable.gapless.guarantee",
        Some("true"),
        "a failed batch must not be skipped by a later one of the same partition",
    ),
    (
        "partitioner",
        Some("murmur2_random"),
        "all events of a key must land in the partition Java clients and Kafka Streams expect",
    ),
    ("max.in.flight.requests.per.connection", None, IN_FLIGHT_WHY),
    ("max.in.flight", None, IN_FLIGHT_WHY),
];

/// Checks one user-given producer property against the protected settings.
pub fn check_override(key: &str, value: &str) -> Result<(), Error> {
    if key == "transactional.id" {
        return Err(Error::Config(format!(
            "--kafka-property transactional.id={value} is not allowed: with --exactly-once true the reader derives one per slot (so a second reader of the slot is fenced)"
        )));
    }
    let Some((_, required, why)) = PROTECTED.iter().find(|(k, _, _)| *k == key) else {
        return Ok(());
    };
    let allowed = match required {
        Some("all") => matches!(value, "all" | "-1"),
        Some(required) => value == *required,
        None => value.parse::<u32>().is_ok_and(|n| (1..=5).contains(&n)),
    };
    if allowed {
        return Ok(());
    }
    let wanted = required.unwrap_or("1 to 5");
    Err(Error::Config(format!(
        "--kafka-property {key}={value} is not allowed: the reader needs {key}={wanted} because {why}"
    )))
}

/// The librdkafka properties of the producer (pure, for review and tests):
/// the reader's settings, then the user's `extra` properties, of which those
/// the delivery guarantees rest on are rejected ([`check_override`]).
pub fn producer_config(cfg: &SinkConfig) -> Result<ClientConfig, Error> {
    for (k, v) in &cfg.extra {
        check_override(k.trim(), v.trim())?;
    }
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // A permanently failed batch must not leave a gap that later batches
        // of the partition step over (that would reorder a key's events):
        // it becomes a fatal error, the producer is re-created and the
        // source resends from its last confirmed LSN.
        .set("enable.gapless.guarantee", "true")
        .set("max.in.flight.requests.per.connection", "5")
        // Java client's key hashing, so keys land where Kafka Streams etc. expect.
        .set("partitioner", "murmur2_random")
        // lz4: the brokers, not the reader, bound throughput on a small
        // machine, and compressed batches cost them less to write, replicate
        // and serve (an incremental snapshot into the local cluster went
        // from 114,000 to 153,000 rows/s); every Kafka client reads it.
        .set("compression.type", "lz4")
        // Large rows (a 1.4 MB TOASTed value updated under REPLICA IDENTITY
        // FULL is a 2.9 MB event) must go through, not stall the source.
        .set("message.max.bytes", MESSAGE_MAX_BYTES.to_string())
        .set(
            "message.timeout.ms",
            cfg.message_timeout.as_millis().to_string(),
        )
        .set("linger.ms", cfg.linger.as_millis().to_string())
        .set(
            "queue.buffering.max.kbytes",
            cfg.max_queue_kbytes.to_string(),
        )
        .set("queue.buffering.max.messages", "100000")
        .set("allow.auto.create.topics", "false");
    for (k, v) in &cfg.extra {
        c.set(k, v);
    }
    Ok(c)
}

/// What a failed enqueue or delivery means for the source (pure): an event
/// too large for Kafka is definite (it would fail again on every resend);
/// anything else is retried, re-creating the producer when it is fatal.
pub fn produce_failure(
    source: &str,
    error: &KafkaError,
    producer_fatal: bool,
    topic: &str,
    key: Option<&[u8]>,
    bytes: usize,
) -> Error {
    let code = error.rdkafka_error_code();
    if matches!(
        code,
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge)
    ) {
        return Error::TooLarge {
            table: topic.to_owned(),
            key: key.map_or_else(
                || "null".to_owned(),
                |k| String::from_utf8_lossy(k).into_owned(),
            ),
            bytes,
            limit: format!(
                "producer message.max.bytes {MESSAGE_MAX_BYTES}, or the topic's max.message.bytes: {error}"
            ),
        };
    }
    let message = format!("source {source}: delivery to {topic} failed: {error}");
    if producer_fatal || matches!(code, Some(RDKafkaErrorCode::Fatal)) {
        Error::KafkaFatal(message)
    } else {
        Error::Kafka(message)
    }
}

/// Counters the sink reports; every method defaults to doing nothing.
pub trait SinkMetrics: Send + Sync + 'static {
    /// A record was acknowledged by Kafka.
    fn record_delivered(&self, _topic: &str, _bytes: usize) {}
    /// A record failed delivery.
    fn record_delivery_error(&self, _topic: &str) {}
    /// Kafka acknowledged this record; called before the record counts as
    /// acknowledged in the source's tracker (tests observe the ordering).
    fn record_acknowledged(&self, _topic: &str, _key: Option<&[u8]>, _payload: Option<&[u8]>) {}
}

/// Metrics that count nothing (tests, tools).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoMetrics;

impl SinkMetrics for NoMetrics {}

/// Shared state of one source's tracker: updated from librdkafka's delivery
/// callbacks (producer thread) and read by the source task.
#[derive(Debug)]
struct SourceShared {
    name: String,
    tracker: Mutex<AckTracker>,
    confirmed: watch::Sender<Lsn>,
    in_flight: AtomicUsize,
    fatal: Mutex<Option<Error>>,
}

impl SourceShared {
    fn publish(&self, moved: Option<Lsn>) {
        if let Some(lsn) = moved {
            self.confirmed.send_if_modified(|current| {
                let changed = lsn > *current;
                if changed {
                    *current = lsn;
                }
                changed
            });
        }
    }

    /// Keeps the first error, unless a later one is definite: after one
    /// permanent failure the rest of the partition's records fail too, and
    /// which report comes first must not decide whether the source retries.
    fn set_fatal(&self, error: Error) {
        if let Ok(mut fatal) = self.fatal.lock()
            && fatal
                .as_ref()
                .is_none_or(|first| first.is_retryable() && !error.is_retryable())
        {
            *fatal = Some(error);
        }
    }

    fn acked(&self, seq: u64) {
        let moved = match self.tracker.lock() {
            Ok(mut t) => t.acked(seq),
            Err(_) => None,
        };
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.publish(moved);
    }

    fn failed(&self, seq: u64, error: Error) {
        if let Ok(mut t) = self.tracker.lock() {
            t.failed(seq);
        }
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.set_fatal(error);
    }
}

/// What a delivery report needs to find its transaction.
#[derive(Debug)]
struct Delivery {
    source: Arc<SourceShared>,
    seq: u64,
    bytes: usize,
}

/// Producer context: routes delivery reports to the source trackers.
struct SinkContext {
    metrics: Arc<dyn SinkMetrics>,
    /// Set when librdkafka reports a fatal error: the producer must be replaced.
    fatal: AtomicBool,
}

impl ClientContext for SinkContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal)) {
            self.fatal.store(true, Ordering::SeqCst);
            tracing::error!(error = %error, reason, "kafka producer fatal error; it will be re-created");
        } else {
            tracing::warn!(error = %error, reason, "kafka client error");
        }
    }
}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = Box<Delivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, delivery: Box<Delivery>) {
        match result {
            Ok(message) => {
                self.metrics
                    .record_delivered(message.topic(), delivery.bytes);
                self.metrics
                    .record_acknowledged(message.topic(), message.key(), message.payload());
                delivery.source.acked(delivery.seq);
            }
            Err((error, message)) => {
                self.metrics.record_delivery_error(message.topic());
                let error = produce_failure(
                    &delivery.source.name,
                    error,
                    self.fatal.load(Ordering::SeqCst),
                    message.topic(),
                    message.key(),
                    delivery.bytes,
                );
                if error.is_retryable() {
                    tracing::warn!(
                        source = %delivery.source.name,
                        topic = message.topic(),
                        error = %error,
                        "kafka delivery failed; the source will resend from its last confirmed lsn"
                    );
                }
                delivery.source.failed(delivery.seq, error);
            }
        }
    }
}

type KafkaProducer = ThreadedProducer<SinkContext>;

struct SinkInner {
    config: SinkConfig,
    metrics: Arc<dyn SinkMetrics>,
    producer: RwLock<Arc<KafkaProducer>>,
    generation: AtomicU64,
    topics: Topics,
    /// Latest tracker per source name.
    sources: Mutex<HashMap<String, Arc<SourceShared>>>,
}

impl SinkInner {
    fn build_producer(
        config: &SinkConfig,
        metrics: Arc<dyn SinkMetrics>,
    ) -> Result<KafkaProducer, Error> {
        let context = SinkContext {
            metrics,
            fatal: AtomicBool::new(false),
        };
        producer_config(config)?
            .create_with_context(context)
            .map_err(|e| Error::Config(format!("kafka producer: {e}")))
    }

    /// The current producer; replaces it first if it hit a fatal error.
    fn producer(&self) -> Result<Arc<KafkaProducer>, Error> {
        let current = self
            .producer
            .read()
            .map_err(|_| Error::KafkaFatal("producer lock poisoned".into()))?
            .clone();
        if !current.context().fatal.load(Ordering::SeqCst)
            && current.client().fatal_error().is_none()
        {
            return Ok(current);
        }
        let mut slot = self
            .producer
            .write()
            .map_err(|_| Error::KafkaFatal("producer lock poisoned".into()))?;
        if Arc::ptr_eq(&slot, &current) {
            let fresh = Self::build_producer(&self.config, self.metrics.clone())?;
            *slot = Arc::new(fresh);
            let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
            tracing::warn!(
                generation,
                "re-created the kafka producer after a fatal error"
            );
        }
        Ok(slot.clone())
    }
}

/// The shared producer.
#[derive(Clone)]
pub struct Sink {
    inner: Arc<SinkInner>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("bootstrap_servers", &self.inner.config.bootstrap_servers)
            .finish_non_exhaustive()
    }
}

impl Sink {
    /// Creates the producer and the topic admin client (connects lazily).
    pub fn new(cfg: &SinkConfig, metrics: Arc<dyn SinkMetrics>) -> Result<Self, Error> {
        let producer = SinkInner::build_producer(cfg, metrics.clone())?;
        let topics = Topics::new(&cfg.bootstrap_servers, cfg.topics.clone())?;
        Ok(Sink {
            inner: Arc::new(SinkInner {
                config: cfg.clone(),
                metrics,
                producer: RwLock::new(Arc::new(producer)),
                generation: AtomicU64::new(0),
                topics,
                sources: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// A fresh tracker for one source (database). Take a new one after
    /// [`SourceSink::take_fatal`] returned an error.
    ///
    /// The first `send` of the new tracker waits until every record of the
    /// previous tracker of the same name has been reported (delivered or
    /// failed): after a permanent failure librdkafka fails the rest of that
    /// partition's in-flight records too, and resent records must not be
    /// queued behind them.
    pub fn source(&self, name: &str) -> SourceSink {
        self.source_with(name, false)
    }

    /// A tracker for a snapshot: with `--exactly-once true` the whole
    /// snapshot is one Kafka transaction (a reader killed during it leaves
    /// nothing a `read_committed` consumer sees).
    pub fn snapshot_source(&self, name: &str) -> SourceSink {
        self.source_with(name, true)
    }

    fn source_with(&self, name: &str, whole: bool) -> SourceSink {
        let (confirmed, _) = watch::channel(0);
        let shared = Arc::new(SourceShared {
            name: name.to_owned(),
            tracker: Mutex::new(AckTracker::new()),
            confirmed,
            in_flight: AtomicUsize::new(0),
            fatal: Mutex::new(None),
        });
        let predecessor = self
            .inner
            .sources
            .lock()
            .ok()
            .and_then(|mut m| m.insert(name.to_owned(), shared.clone()));
        SourceSink {
            sink: self.inner.clone(),
            shared,
            predecessor,
            encoder: Encoder::new(self.inner.config.envelope),
            records: Vec::with_capacity(4),
            ensured: None,
            producer: None,
            exactly_once: self.inner.config.exactly_once.as_ref().map(|eos| {
                let (slot, id) = eos.identity(name);
                Box::new(TransactionalSink::new(
                    name,
                    &slot,
                    id,
                    eos.clone(),
                    self.inner.config.clone(),
                    self.inner.metrics.clone(),
                    whole,
                ))
            }),
        }
    }

    /// With `--exactly-once true`: whether source `name`'s checkpoint in
    /// Kafka is at or past `lsn` (takes over its `transactional.id` to read
    /// it). Always `false` otherwise.
    pub async fn checkpoint_reached(&self, name: &str, lsn: Lsn) -> Result<bool, Error> {
        if self.inner.config.exactly_once.is_none() {
            // No tracker either: a new one would pose as the predecessor of the next.
            return Ok(false);
        }
        let mut probe = self.snapshot_source(name);
        probe.open().await?;
        Ok(probe
            .exactly_once
            .as_ref()
            .is_some_and(|eos| eos.committed_end() >= lsn))
    }

    /// Waits until every enqueued record is acknowledged (or failed).
    pub async fn flush(&self, timeout: Duration) -> Result<(), Error> {
        let producer = self.inner.producer()?;
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| Error::Kafka(format!("flush task: {e}")))?
            .map_err(|e| Error::Kafka(format!("flush: {e}")))
    }

    /// How many times the producer was re-created after a fatal error.
    pub fn producer_generation(&self) -> u64 {
        self.inner.generation.load(Ordering::SeqCst)
    }
}

/// One source's view of the sink: encoder plus ordered acknowledgement.
pub struct SourceSink {
    sink: Arc<SinkInner>,
    shared: Arc<SourceShared>,
    /// The previous tracker of this source, until its records are all reported.
    predecessor: Option<Arc<SourceShared>>,
    encoder: Encoder,
    records: Vec<Record>,
    /// Last topic known to exist (skips the topic-set lookup per record).
    ensured: Option<Arc<str>>,
    /// The producer this tracker enqueued to. Once it is replaced after a
    /// fatal error, this tracker must not switch to the new one: its records
    /// still queued in the old producer fail, and a later record landing
    /// through the new producer would step over them (a key's version N+1
    /// in Kafka before the resent N).
    producer: Option<Arc<KafkaProducer>>,
    /// The transactional writer, with `--exactly-once true`.
    exactly_once: Option<Box<TransactionalSink>>,
}

impl std::fmt::Debug for SourceSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceSink")
            .field("source", &self.shared.name)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

/// Waits after a "queue full" until a tenth of the producer queue drained:
/// resuming after every single delivery report would cost a wake-up per
/// record when the brokers are the bottleneck.
async fn wait_for_room(producer: &KafkaProducer) {
    let full = producer.in_flight_count().max(1);
    let resume_at = full - full / 10;
    loop {
        tokio::time::sleep(Duration::from_millis(2)).await;
        if producer.in_flight_count() <= resume_at {
            return;
        }
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

impl SourceSink {
    /// Encodes and enqueues one change (waits while the producer queue is
    /// full). `Error::BadData` for a value that cannot be encoded (nothing
    /// was enqueued); `Error::Kafka`/`KafkaFatal` when Kafka failed.
    pub async fn send(&mut self, change: &Change) -> Result<(), Error> {
        if let Some(eos) = self.exactly_once.as_mut() {
            return eos.send(change, &mut self.encoder, &self.sink.topics).await;
        }
        self.check_fatal()?;
        if let Some(previous) = self.predecessor.take() {
            self.wait_for_predecessor(&previous).await;
        }
        let mut records = std::mem::take(&mut self.records);
        records.clear();
        let result = match self.encoder.encode(change, now_us(), &mut records) {
            Ok(()) => self.produce_all(&mut records).await,
            Err(e) => Err(e.into()),
        };
        records.clear();
        self.records = records;
        result
    }

    async fn produce_all(&mut self, records: &mut Vec<Record>) -> Result<(), Error> {
        for record in records.iter() {
            self.produce(record).await?;
        }
        records.clear();
        Ok(())
    }

    async fn wait_for_predecessor(&self, previous: &SourceShared) {
        let deadline = tokio::time::Instant::now()
            + self.sink.config.message_timeout
            + Duration::from_secs(10);
        let pending = previous.in_flight.load(Ordering::SeqCst);
        if pending > 0 {
            tracing::info!(
                source = %self.shared.name,
                pending,
                "waiting for the previous attempt's records to be reported before resending"
            );
        }
        while previous.in_flight.load(Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() > deadline {
                tracing::warn!(source = %self.shared.name, "previous attempt's records still unreported; resending anyway");
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn check_fatal(&self) -> Result<(), Error> {
        let poisoned = self
            .shared
            .tracker
            .lock()
            .map(|t| t.is_poisoned())
            .unwrap_or(true);
        if poisoned {
            return Err(Error::Kafka(format!(
                "source {}: an earlier delivery failed; reconnect and resend from the last confirmed lsn",
                self.shared.name
            )));
        }
        Ok(())
    }

    async fn produce(&mut self, record: &Record) -> Result<(), Error> {
        if !self
            .ensured
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(t, &record.topic))
        {
            self.sink.topics.ensure(&record.topic).await?;
            self.ensured = Some(record.topic.clone());
        }
        let count = match record.route {
            Route::ByKey => 1,
            // Looked up each time: truncates are rare and partitions may
            // have been added since the topic was first seen.
            Route::EveryPartition => self.sink.topics.partition_count(&record.topic).await?,
        };
        for partition in partitions(record.route, count) {
            self.produce_to(record, partition).await?;
        }
        Ok(())
    }

    /// Enqueues one copy of `record` (to `partition`, or by key when `None`).
    async fn produce_to(&mut self, record: &Record, partition: Option<i32>) -> Result<(), Error> {
        let seq = match self.shared.tracker.lock() {
            Ok(mut t) => t.sent(),
            Err(_) => return Err(Error::KafkaFatal("tracker lock poisoned".into())),
        };
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let bytes =
            record.key.as_ref().map_or(0, Vec::len) + record.value.as_ref().map_or(0, Vec::len);
        let delivery = Box::new(Delivery {
            source: self.shared.clone(),
            seq,
            bytes,
        });
        let mut base: BaseRecord<'_, [u8], [u8], Box<Delivery>> =
            BaseRecord::with_opaque_to(&record.topic, delivery);
        if let Some(key) = &record.key {
            base = base.key(key.as_slice());
        }
        if let Some(value) = &record.value {
            base = base.payload(value.as_slice());
        }
        if let Some(partition) = partition {
            base = base.partition(partition);
        }
        if let Some(headers) = record.kafka_headers() {
            base = base.headers(headers);
        }
        loop {
            let producer = match self.bound_producer() {
                Ok(p) => p,
                Err(e) => {
                    self.shared.failed(seq, Error::KafkaFatal(e.to_string()));
                    return Err(e);
                }
            };
            match producer.send(base) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    base = returned;
                    wait_for_room(&producer).await;
                }
                Err((error, returned)) => {
                    drop(returned);
                    let failure = || {
                        produce_failure(
                            &self.shared.name,
                            &error,
                            false,
                            &record.topic,
                            record.key.as_deref(),
                            bytes,
                        )
                    };
                    self.shared.failed(seq, failure());
                    return Err(failure());
                }
            }
        }
    }

    /// Closes the current source transaction: once every record enqueued
    /// before this call (and all earlier transactions) is acknowledged,
    /// `end_lsn` becomes confirmable. With transaction metadata on, also
    /// enqueues the END record first (errors surface via `take_fatal`).
    pub fn end_transaction(&mut self, end_lsn: Lsn) {
        if let Some(eos) = self.exactly_once.as_mut() {
            let end = self.encoder.end_transaction(now_us());
            if let Err(e) = eos.end_transaction(end_lsn, end) {
                self.shared.set_fatal(e);
            }
            return;
        }
        if let Some(end) = self.encoder.end_transaction(now_us()) {
            self.enqueue_now(&end);
        }
        let moved = match self.shared.tracker.lock() {
            Ok(mut t) => t.end_transaction(end_lsn),
            Err(_) => None,
        };
        self.shared.publish(moved);
    }

    /// Enqueues without waiting (END records); a full queue or an error
    /// poisons the tracker so nothing past it is confirmed.
    fn enqueue_now(&mut self, record: &Record) {
        let seq = match self.shared.tracker.lock() {
            Ok(mut t) => t.sent(),
            Err(_) => return,
        };
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let delivery = Box::new(Delivery {
            source: self.shared.clone(),
            seq,
            bytes: record.value.as_ref().map_or(0, Vec::len),
        });
        let mut base: BaseRecord<'_, [u8], [u8], Box<Delivery>> =
            BaseRecord::with_opaque_to(&record.topic, delivery);
        if let Some(key) = &record.key {
            base = base.key(key.as_slice());
        }
        if let Some(value) = &record.value {
            base = base.payload(value.as_slice());
        }
        let result = self
            .bound_producer()
            .map(|p| p.send(base).map_err(|(e, _)| e));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.shared.failed(
                seq,
                Error::Kafka(format!("enqueue to {}: {e}", record.topic)),
            ),
            Err(e) => self.shared.failed(seq, e),
        }
    }

    /// The sink's producer, as long as it is the one this tracker started
    /// with; `KafkaFatal` once that one was replaced (the source must resend
    /// from its last confirmed LSN with a new tracker).
    fn bound_producer(&mut self) -> Result<Arc<KafkaProducer>, Error> {
        let current = self.sink.producer()?;
        match &self.producer {
            Some(mine) if !Arc::ptr_eq(mine, &current) => Err(Error::KafkaFatal(format!(
                "source {}: the kafka producer was re-created after a fatal error; resend from the last confirmed lsn",
                self.shared.name
            ))),
            Some(_) => Ok(current),
            None => {
                self.producer = Some(current.clone());
                Ok(current)
            }
        }
    }

    /// Watch of the highest confirmable LSN (monotonic; 0 until the first).
    pub fn confirmed(&self) -> watch::Receiver<Lsn> {
        if let Some(eos) = &self.exactly_once {
            return eos.confirmed();
        }
        self.shared.confirmed.subscribe()
    }

    /// Enqueued-but-unacknowledged records (0: nothing in flight, the source
    /// may acknowledge keepalive positions).
    pub fn in_flight(&self) -> usize {
        if let Some(eos) = &self.exactly_once {
            return eos.in_flight();
        }
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// First failed delivery, if any: the source must stop confirming,
    /// reconnect and resend from the last confirmed LSN (with a new
    /// [`Sink::source`]).
    pub fn take_fatal(&mut self) -> Option<Error> {
        let fatal = self.shared.fatal.lock().ok()?.take();
        match self.exactly_once.as_mut() {
            Some(eos) if fatal.is_none() => eos.take_fatal(),
            _ => fatal,
        }
    }

    /// With `--exactly-once true`: takes the slot's `transactional.id`
    /// (fencing a predecessor) and reads the checkpoint. Call once the slot
    /// is held; without it the first send does it. No-op otherwise.
    pub async fn open(&mut self) -> Result<(), Error> {
        match self.exactly_once.as_mut() {
            Some(eos) => eos.open(&self.sink.topics).await,
            None => Ok(()),
        }
    }

    /// With `--exactly-once true`: commits the open Kafka transaction (with
    /// the checkpoint), making the ended source transactions in it
    /// confirmable. No-op otherwise (acknowledgements confirm by themselves).
    pub async fn commit(&mut self) -> Result<(), Error> {
        match self.exactly_once.as_mut() {
            Some(eos) => eos.commit().await,
            None => Ok(()),
        }
    }

    /// Tells the exactly-once writer whether more WAL already waits in the
    /// reader (a backlog: Kafka transactions fill up before they commit).
    pub fn set_backlog(&mut self, backlog: bool) {
        if let Some(eos) = self.exactly_once.as_mut() {
            eos.set_backlog(backlog);
        }
    }

    /// Resolves when the source loop should call [`SourceSink::commit`]
    /// (never without `--exactly-once`, nor while nothing waits). Owns its
    /// deadline, so it can sit in a `select!` beside other borrows.
    pub fn commit_due(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let deadline = self
            .exactly_once
            .as_ref()
            .and_then(|eos| eos.commit_deadline());
        async move {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producer_settings() {
        let mut cfg = SinkConfig::new("127.0.0.1:9092");
        cfg.extra.push(("linger.ms".into(), "0".into()));
        let c = producer_config(&cfg).expect("allowed");
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("partitioner"), Some("murmur2_random"));
        assert_eq!(c.get("compression.type"), Some("lz4"));
        assert_eq!(c.get("message.timeout.ms"), Some("300000"));
        assert_eq!(c.get("linger.ms"), Some("0"), "extra settings win");
    }

    #[test]
    fn events_up_to_16_mib_fit_the_producer() {
        let c = producer_config(&SinkConfig::new("b:9092")).expect("defaults");
        let max: usize = c
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .expect("set");
        assert!(max >= 16 * 1024 * 1024 + 64 * 1024, "{max}");
        assert_eq!(max, 17_825_792, "the brokers' and topics' limit");
    }

    #[test]
    fn overrides_of_the_guarantees_are_rejected_with_the_reason() {
        for (key, value, why) in [
            ("acks", "1", "survive a broker failure"),
            ("request.required.acks", "0", "survive a broker failure"),
            ("enable.idempotence", "false", "duplicate nor reorder"),
            ("max.in.flight.requests.per.connection", "6", "at most 5"),
            ("max.in.flight", "100", "at most 5"),
            ("partitioner", "random", "the partition Java clients"),
            ("enable.gapless.guarantee", "false", "skipped"),
        ] {
            let mut cfg = SinkConfig::new("b:9092");
            cfg.extra.push((key.into(), value.into()));
            let err = producer_config(&cfg).expect_err(key);
            assert!(!err.is_retryable());
            let line = err.to_string();
            assert!(line.contains(&format!("{key}={value}")), "{line}");
            assert!(line.contains(why), "{line} lacks {why:?}");
            assert!(!line.contains('\n'));
        }
        // Asking for what the reader sets anyway, or fewer requests in flight, is fine.
        for (key, value) in [
            ("acks", "all"),
            ("acks", "-1"),
            ("enable.idempotence", "true"),
            ("max.in.flight.requests.per.connection", "1"),
            ("partitioner", "murmur2_random"),
            ("message.max.bytes", "1000000"),
        ] {
            let mut cfg = SinkConfig::new("b:9092");
            cfg.extra.push((key.into(), value.into()));
            assert!(producer_config(&cfg).is_ok(), "{key}={value}");
        }
    }

    #[test]
    fn a_too_large_event_is_definite_other_failures_retry() {
        let too_large = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        let e = produce_failure(
            "shop",
            &too_large,
            false,
            "shop.public.doc",
            Some(br#"{"id":2}"#),
            20_971_800,
        );
        assert!(!e.is_retryable());
        let line = e.to_string();
        for needle in [
            "shop.public.doc",
            r#"{"id":2}"#,
            "20971800 bytes",
            "message.max.bytes",
        ] {
            assert!(line.contains(needle), "{line} lacks {needle}");
        }
        let batch = KafkaError::MessageProduction(RDKafkaErrorCode::MessageBatchTooLarge);
        assert!(!produce_failure("s", &batch, false, "t", None, 1).is_retryable());
        let timed_out = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(matches!(
            produce_failure("s", &timed_out, false, "t", None, 1),
            Error::Kafka(_)
        ));
        assert!(matches!(
            produce_failure("s", &timed_out, true, "t", None, 1),
            Error::KafkaFatal(_)
        ));
    }
}
