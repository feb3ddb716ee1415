//! Exactly-once delivery (`--exactly-once true`): each source writes through
//! a transactional producer of its own, and every Kafka transaction carries
//! the source's checkpoint ([`crate::checkpoint`]).
//!
//! Session order, and why:
//! 1. the source holds its slot (START_REPLICATION, or the snapshot lock)
//!    before it touches Kafka, so a second reader on the same slot is
//!    refused by Postgres before it could fence the running one;
//! 2. `init_transactions` with the `transactional.id` derived from the slot:
//!    Kafka aborts what a killed predecessor left open and fences it, should
//!    it still be alive ([`Error::Fenced`], one line, the reader stops);
//! 3. the checkpoint is read `read_committed` up to the end of its partition;
//! 4. changes the checkpoint covers are dropped, the rest is written in
//!    Kafka transactions of whole source transactions where they fit
//!    ([`Batching`]); the checkpoint record goes in last, and a transaction's
//!    end LSN is confirmed to Postgres only once `commit_transaction`
//!    returned.
//!
//! Any failure ends the session (retried like any Kafka failure): the next
//! one starts over at step 2 with a fresh producer, so an aborted or unsure
//! commit is settled by Kafka, and the checkpoint decides what is resent.
//!
//! A snapshot is one Kafka transaction (never split): a reader killed during
//! it leaves an aborted transaction, which `read_committed` consumers skip,
//! and the repeated snapshot writes every row once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::change::{Change, Lsn, lsn_to_string};
use crate::checkpoint::{Batching, Checkpoint, Confirm, Ledger, Verdict};
use crate::envelope::{Encoder, Record, Route, partitions};
use crate::error::Error;
use crate::sink::{SinkConfig, SinkMetrics, produce_failure, producer_config};
use crate::topic::Topics;

/// Exactly-once settings shared by the sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExactlyOnce {
    /// The compacted topic holding every source's checkpoint.
    pub checkpoint_topic: String,
    /// When Kafka transactions are committed.
    pub batching: Batching,
    /// Source name -> (slot, `transactional.id`); a source not listed uses
    /// its name for both.
    pub sources: HashMap<String, (String, String)>,
}

impl Default for ExactlyOnce {
    fn default() -> Self {
        ExactlyOnce {
            checkpoint_topic: DEFAULT_CHECKPOINT_TOPIC.to_owned(),
            batching: Batching::default(),
            sources: HashMap::new(),
        }
    }
}

impl ExactlyOnce {
    /// The slot and `transactional.id` of source `name`.
    pub fn identity(&self, name: &str) -> (String, String) {
        self.sources
            .get(name)
            .cloned()
            .unwrap_or_else(|| (name.to_owned(), transactional_id(name, name)))
    }
}

/// Default name of the checkpoint topic.
pub const DEFAULT_CHECKPOINT_TOPIC: &str = "instashop-cdc.checkpoints";

/// The `transactional.id` of a source: one per slot and topic prefix, so a
/// second reader of the same slot fences the first, and two databases with
/// equally named slots never do.
pub fn transactional_id(prefix: &str, slot: &str) -> String {
    format!("instashop-cdc.{prefix}.{slot}")
}

/// A streaming session's Kafka transaction may stay open this long
/// (`transaction.timeout.ms`): the brokers abort it afterwards.
const STREAM_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(120);
/// A snapshot is one Kafka transaction: it must finish within this (the
/// brokers' default `transaction.max.timeout.ms`).
const SNAPSHOT_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(900);
/// A source transaction is split across Kafka transactions once the open one
/// holds this many times the batch limits.
const SPLIT_FACTOR: u64 = 4;

/// The transactional producer's settings (pure): the reader's producer
/// settings plus the transaction's.
pub fn transactional_config(
    cfg: &SinkConfig,
    transactional_id: &str,
    timeout: Duration,
) -> Result<ClientConfig, Error> {
    let mut c = producer_config(cfg)?;
    // librdkafka requires a record's timeout within its transaction's: a
    // broker outage longer than this aborts the transaction and the source
    // starts over from the checkpoint.
    let message_timeout = cfg.message_timeout.min(timeout);
    c.set(
        "message.timeout.ms",
        message_timeout.as_millis().to_string(),
    )
    .set("transactional.id", transactional_id)
    .set("transaction.timeout.ms", timeout.as_millis().to_string());
    Ok(c)
}

/// Delivery reports: metrics, and the first failure (a definite one, such
/// as an event too large, ends the reader instead of retrying the commit).
struct TxContext {
    source: String,
    metrics: Arc<dyn SinkMetrics>,
    failed: Mutex<Option<Error>>,
}

impl ClientContext for TxContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(source = %self.source, error = %error, reason, "kafka transactional producer error");
    }
}

impl ProducerContext for TxContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, bytes: usize) {
        match result {
            Ok(message) => {
                self.metrics.record_delivered(message.topic(), bytes);
                self.metrics
                    .record_acknowledged(message.topic(), message.key(), message.payload());
            }
            Err((error, message)) => {
                self.metrics.record_delivery_error(message.topic());
                let error = produce_failure(
                    &self.source,
                    error,
                    false,
                    message.topic(),
                    message.key(),
                    bytes,
                );
                if let Ok(mut failed) = self.failed.lock()
                    && failed
                        .as_ref()
                        .is_none_or(|first| first.is_retryable() && !error.is_retryable())
                {
                    *failed = Some(error);
                }
            }
        }
    }
}

type TxProducer = ThreadedProducer<TxContext>;

/// What a session needs once Kafka accepted its `transactional.id`.
struct Open {
    producer: Arc<TxProducer>,
    /// A Kafka transaction is open.
    in_transaction: bool,
    /// Records and bytes in the open Kafka transaction.
    records: u64,
    bytes: u64,
    /// When the first source transaction of the open batch ended.
    first_end: Option<Instant>,
    /// Commit before the next change (the batch was full at a transaction end).
    due: bool,
}

/// One source's transactional writer.
pub(crate) struct TransactionalSink {
    name: String,
    slot: String,
    transactional_id: String,
    settings: ExactlyOnce,
    sink: SinkConfig,
    metrics: Arc<dyn SinkMetrics>,
    /// One Kafka transaction per snapshot: never split, never committed early.
    whole: bool,
    /// More WAL waits in the reader: batch by [`Batching::backlog_linger`].
    backlog: bool,
    open: Option<Open>,
    ledger: Ledger,
    confirmed: watch::Sender<Lsn>,
    records: Vec<Record>,
    ensured: Option<Arc<str>>,
}

impl std::fmt::Debug for TransactionalSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalSink")
            .field("source", &self.name)
            .field("transactional_id", &self.transactional_id)
            .finish_non_exhaustive()
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

impl TransactionalSink {
    /// A writer for source `name` (connects on [`TransactionalSink::open`]).
    pub(crate) fn new(
        name: &str,
        slot: &str,
        transactional_id: String,
        settings: ExactlyOnce,
        sink: SinkConfig,
        metrics: Arc<dyn SinkMetrics>,
        whole: bool,
    ) -> Self {
        let (confirmed, _) = watch::channel(0);
        TransactionalSink {
            name: name.to_owned(),
            slot: slot.to_owned(),
            transactional_id,
            settings,
            sink,
            metrics,
            whole,
            backlog: false,
            open: None,
            ledger: Ledger::default(),
            confirmed,
            records: Vec::with_capacity(4),
            ensured: None,
        }
    }

    /// The Kafka error as the source's error: fencing is definite.
    fn failure(&self, what: &str, error: &KafkaError) -> Error {
        let code = error.rdkafka_error_code();
        if matches!(
            code,
            Some(
                RDKafkaErrorCode::Fenced
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
            )
        ) {
            return Error::Fenced {
                source_name: self.name.clone(),
                slot: self.slot.clone(),
                transactional_id: self.transactional_id.clone(),
            };
        }
        if matches!(
            code,
            Some(RDKafkaErrorCode::TransactionalIdAuthorizationFailed)
        ) {
            return Error::Setup(format!(
                "source {}: kafka refused transactional.id \"{}\" ({error}): grant the reader's principal WRITE and DESCRIBE on it, or run with --exactly-once false",
                self.name, self.transactional_id
            ));
        }
        // A delivery that failed for good (an event too large) explains
        // the commit's failure better and must not be retried.
        if let Some(first) = self.delivery_failure()
            && !first.is_retryable()
        {
            return first;
        }
        Error::KafkaFatal(format!(
            "source {}: kafka transaction {what} failed: {error}",
            self.name
        ))
    }

    fn delivery_failure(&self) -> Option<Error> {
        let open = self.open.as_ref()?;
        open.producer.context().failed.lock().ok()?.take()
    }

    /// Holds the `transactional.id` (fencing any earlier holder and settling
    /// its open transaction) and reads the checkpoint. Idempotent.
    pub(crate) async fn open(&mut self, topics: &Topics) -> Result<(), Error> {
        if self.open.is_some() {
            return Ok(());
        }
        ensure_checkpoint_topic(
            &self.sink.bootstrap_servers,
            &self.settings.checkpoint_topic,
            topics,
        )
        .await?;
        let timeout = if self.whole {
            SNAPSHOT_TRANSACTION_TIMEOUT
        } else {
            STREAM_TRANSACTION_TIMEOUT
        };
        let context = TxContext {
            source: self.name.clone(),
            metrics: self.metrics.clone(),
            failed: Mutex::new(None),
        };
        let producer: TxProducer =
            transactional_config(&self.sink, &self.transactional_id, timeout)?
                .create_with_context(context)
                .map_err(|e| Error::Config(format!("kafka transactional producer: {e}")))?;
        let producer = Arc::new(producer);
        let init = producer.clone();
        let started = Instant::now();
        tokio::task::spawn_blocking(move || init.init_transactions(Duration::from_secs(60)))
            .await
            .map_err(|e| Error::Kafka(format!("init_transactions task: {e}")))?
            .map_err(|e| self.failure("init", &e))?;
        let checkpoint = read_checkpoint(
            &self.sink.bootstrap_servers,
            &self.settings.checkpoint_topic,
            &self.transactional_id,
        )
        .await?;
        tracing::info!(
            source = %self.name,
            transactional_id = %self.transactional_id,
            checkpoint = %lsn_to_string(checkpoint.end_lsn),
            split_events = checkpoint.partial.map_or(0, |p| p.events),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "kafka transactions ready"
        );
        self.ledger = Ledger::new(checkpoint);
        self.open = Some(Open {
            producer,
            in_transaction: false,
            records: 0,
            bytes: 0,
            first_end: None,
            due: false,
        });
        Ok(())
    }

    /// Writes one change, or drops it when the checkpoint covers it.
    pub(crate) async fn send(
        &mut self,
        change: &Change,
        encoder: &mut Encoder,
        topics: &Topics,
    ) -> Result<(), Error> {
        self.open(topics).await?;
        if !self.whole && self.open.as_ref().is_some_and(|o| o.due) {
            self.commit().await?;
        }
        let verdict = self.ledger.change(change.source.commit_lsn);
        if verdict == Verdict::DropTransaction {
            return Ok(());
        }
        let mut records = std::mem::take(&mut self.records);
        records.clear();
        let encoded = encoder.encode(change, now_us(), &mut records);
        let result = match (encoded, verdict) {
            (Err(e), _) => Err(e.into()),
            (Ok(()), Verdict::DropSplit | Verdict::DropTransaction) => Ok(()),
            (Ok(()), Verdict::Write) => self.write_all(&records, topics).await,
        };
        records.clear();
        self.records = records;
        result?;
        let split = self.open.as_ref().is_some_and(|o| {
            o.records >= self.settings.batching.max_records * SPLIT_FACTOR
                || o.bytes >= self.settings.batching.max_bytes * SPLIT_FACTOR
        });
        if split && !self.whole {
            self.commit().await?;
        }
        Ok(())
    }

    async fn write_all(&mut self, records: &[Record], topics: &Topics) -> Result<(), Error> {
        for record in records {
            if !self
                .ensured
                .as_ref()
                .is_some_and(|t| Arc::ptr_eq(t, &record.topic))
            {
                topics.ensure(&record.topic).await?;
                self.ensured = Some(record.topic.clone());
            }
            let count = match record.route {
                Route::ByKey => 1,
                Route::EveryPartition => topics.partition_count(&record.topic).await?,
            };
            for partition in partitions(record.route, count) {
                self.write(
                    &record.topic,
                    (record.key.as_deref(), record.value.as_deref()),
                    record.kafka_headers(),
                    partition,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Enqueues one record in the open Kafka transaction (begun if needed),
    /// waiting while the producer queue is full.
    async fn write(
        &mut self,
        topic: &str,
        (key, value): (Option<&[u8]>, Option<&[u8]>),
        headers: Option<rdkafka::message::OwnedHeaders>,
        partition: Option<i32>,
    ) -> Result<(), Error> {
        let Some(open) = self.open.as_mut() else {
            return Err(Error::Kafka(format!(
                "source {}: kafka transactions not open",
                self.name
            )));
        };
        if !open.in_transaction {
            if let Err(e) = open.producer.begin_transaction() {
                return Err(self.failure("begin", &e));
            }
            let Some(open) = self.open.as_mut() else {
                return Ok(());
            };
            open.in_transaction = true;
        }
        let bytes = key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len);
        let mut base: BaseRecord<'_, [u8], [u8], usize> = BaseRecord::with_opaque_to(topic, bytes);
        if let Some(key) = key {
            base = base.key(key);
        }
        if let Some(value) = value {
            base = base.payload(value);
        }
        if let Some(partition) = partition {
            base = base.partition(partition);
        }
        if let Some(headers) = headers {
            base = base.headers(headers);
        }
        loop {
            let Some(open) = self.open.as_mut() else {
                return Ok(());
            };
            match open.producer.send(base) {
                Ok(()) => {
                    open.records += 1;
                    open.bytes += bytes as u64;
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    base = returned;
                    let producer = open.producer.clone();
                    wait_for_room(&producer).await;
                }
                Err((error, _)) => {
                    return Err(match error.rdkafka_error_code() {
                        Some(
                            RDKafkaErrorCode::MessageSizeTooLarge
                            | RDKafkaErrorCode::MessageBatchTooLarge,
                        ) => produce_failure(&self.name, &error, false, topic, key, bytes),
                        _ => self.failure("produce", &error),
                    });
                }
            }
        }
    }

    /// The source transaction ended at `end_lsn` (with its END record, if
    /// transaction metadata is on).
    pub(crate) fn end_transaction(
        &mut self,
        end_lsn: Lsn,
        end: Option<Record>,
    ) -> Result<(), Error> {
        if let Some(end) = end {
            // Enqueued without waiting: END records are rare and small.
            self.write_now(&end)?;
        }
        match self.ledger.end(end_lsn) {
            Confirm::Now(lsn) => self.publish(lsn),
            Confirm::AfterCommit => {
                let (batching, backlog) = (self.settings.batching, self.backlog);
                if let Some(open) = self.open.as_mut() {
                    let first = *open.first_end.get_or_insert_with(Instant::now);
                    open.due = batching.due(open.records, open.bytes, first.elapsed(), backlog);
                }
            }
        }
        Ok(())
    }

    fn write_now(&mut self, record: &Record) -> Result<(), Error> {
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        if !open.in_transaction {
            if let Err(e) = open.producer.begin_transaction() {
                return Err(self.failure("begin", &e));
            }
            let Some(open) = self.open.as_mut() else {
                return Ok(());
            };
            open.in_transaction = true;
        }
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        let bytes = record.value.as_ref().map_or(0, Vec::len);
        let mut base: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&record.topic, bytes);
        if let Some(key) = &record.key {
            base = base.key(key.as_slice());
        }
        if let Some(value) = &record.value {
            base = base.payload(value.as_slice());
        }
        match open.producer.send(base) {
            Ok(()) => {
                open.records += 1;
                self.ledger.wrote();
                Ok(())
            }
            Err((error, _)) => Err(self.failure("produce", &error)),
        }
    }

    fn publish(&self, lsn: Lsn) {
        self.confirmed.send_if_modified(|current| {
            if lsn > *current {
                *current = lsn;
                true
            } else {
                false
            }
        });
    }

    /// When the open Kafka transaction should be committed by the source
    /// loop: `None` while nothing waits or a source transaction is being
    /// decoded (its next change commits when the batch is full).
    pub(crate) fn commit_deadline(&self) -> Option<Instant> {
        if self.whole || self.ledger.in_transaction() {
            return None;
        }
        let open = self.open.as_ref()?;
        if !open.in_transaction {
            return None;
        }
        let first = open.first_end?;
        if open.due {
            return Some(first);
        }
        Some(first + self.settings.batching.wait(self.backlog))
    }

    /// Whether more WAL already waits in the reader (see
    /// [`Batching::backlog_linger`]).
    pub(crate) fn set_backlog(&mut self, backlog: bool) {
        self.backlog = backlog;
    }

    /// Writes the checkpoint and commits the open Kafka transaction; then
    /// the ended source transactions in it are confirmable.
    pub(crate) async fn commit(&mut self) -> Result<(), Error> {
        let Some(open) = self.open.as_ref() else {
            return Ok(());
        };
        if !open.in_transaction {
            return Ok(());
        }
        let checkpoint = self.ledger.pending();
        let topic = self.settings.checkpoint_topic.clone();
        let key = self.transactional_id.clone().into_bytes();
        self.write(
            &topic,
            (Some(&key), Some(&checkpoint.encode())),
            None,
            Some(0),
        )
        .await?;
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        let producer = open.producer.clone();
        let started = Instant::now();
        let records = open.records;
        delivered(&producer, COMMIT_TIMEOUT).await;
        let committed =
            tokio::task::spawn_blocking(move || producer.commit_transaction(COMMIT_TIMEOUT))
                .await
                .map_err(|e| Error::Kafka(format!("commit task: {e}")))?;
        if let Err(e) = committed {
            return Err(self.failure("commit", &e));
        }
        if let Some(open) = self.open.as_mut() {
            open.in_transaction = false;
            open.records = 0;
            open.bytes = 0;
            open.first_end = None;
            open.due = false;
        }
        let confirmable = self.ledger.committed_now();
        tracing::debug!(
            source = %self.name,
            records,
            checkpoint = %lsn_to_string(checkpoint.end_lsn),
            split_events = checkpoint.partial.map_or(0, |p| p.events),
            elapsed_us = started.elapsed().as_micros() as u64,
            "kafka transaction committed"
        );
        if let Some(lsn) = confirmable {
            self.publish(lsn);
        }
        Ok(())
    }

    /// End LSN of the newest source transaction Kafka holds completely.
    pub(crate) fn committed_end(&self) -> Lsn {
        self.ledger.committed().end_lsn
    }

    /// Watch of the highest confirmable LSN.
    pub(crate) fn confirmed(&self) -> watch::Receiver<Lsn> {
        self.confirmed.subscribe()
    }

    /// Records in the open (uncommitted) Kafka transaction.
    pub(crate) fn in_flight(&self) -> usize {
        self.open
            .as_ref()
            .filter(|o| o.in_transaction)
            .map_or(0, |o| o.records.max(1) as usize)
    }

    /// A delivery failed: the session must end (the transaction cannot commit).
    pub(crate) fn take_fatal(&mut self) -> Option<Error> {
        self.delivery_failure()
    }
}

/// How long a commit may wait for its records and the brokers' answer.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(300);

/// Waits until every record handed to `producer` is acknowledged (or
/// failed), at most `timeout`. `commit_transaction` would wait for that
/// itself, but rust-rdkafka's flush for a threaded producer waits for
/// delivery events in slices of up to 100 ms that its polling thread
/// competes for, and so added ~100 ms to every commit (measured: 102 ms per
/// commit, against 1 ms for the commit of a transaction already delivered).
async fn delivered(producer: &TxProducer, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits after a "queue full" until a tenth of the producer queue drained.
async fn wait_for_room(producer: &TxProducer) {
    let full = producer.in_flight_count().max(1);
    let resume_at = full - full / 10;
    loop {
        tokio::time::sleep(Duration::from_millis(2)).await;
        if producer.in_flight_count() <= resume_at {
            return;
        }
    }
}

/// Creates the checkpoint topic when missing: one partition, compacted,
/// the cluster's replication factor, `min.insync.replicas` 2 (1 on a
/// single-broker cluster, where 2 could never be met).
async fn ensure_checkpoint_topic(
    bootstrap: &str,
    topic: &str,
    topics: &Topics,
) -> Result<(), Error> {
    if topics.partition_count(topic).await.is_ok_and(|n| n > 0) {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| Error::Config(format!("kafka admin client: {e}")))?;
    let admin = Arc::new(admin);
    let lookup = admin.clone();
    let brokers = tokio::task::spawn_blocking(move || {
        lookup
            .inner()
            .fetch_metadata(None, Duration::from_secs(30))
            .map(|m| m.brokers().len())
    })
    .await
    .map_err(|e| Error::Kafka(format!("metadata task: {e}")))?
    .map_err(|e| Error::Kafka(format!("metadata: {e}")))?;
    let min_isr = if brokers >= 3 { "2" } else { "1" };
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1))
        .set("cleanup.policy", "compact")
        .set("min.insync.replicas", min_isr);
    let results = admin
        .create_topics([&new], &AdminOptions::new())
        .await
        .map_err(|e| Error::Kafka(format!("create topic {topic}: {e}")))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((
                _,
                RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed,
            )) => {
                return Err(Error::Setup(format!(
                    "the reader may not create its checkpoint topic {topic}: create it (1 partition, cleanup.policy=compact) or grant CREATE"
                )));
            }
            Err((_, code)) => {
                return Err(Error::Kafka(format!("create topic {topic}: {code}")));
            }
        }
    }
    tracing::info!(
        topic,
        min_insync_replicas = min_isr,
        "created the checkpoint topic"
    );
    Ok(())
}

/// The newest committed checkpoint of `transactional_id`: reads the
/// checkpoint partition `read_committed` from the start up to its end
/// (high watermark at the time of the call, which the consumer passes only
/// once every transaction before it is settled).
async fn read_checkpoint(
    bootstrap: &str,
    topic: &str,
    transactional_id: &str,
) -> Result<Checkpoint, Error> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{transactional_id}.checkpoint-reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(|e| Error::Config(format!("kafka checkpoint consumer: {e}")))?;
    // The end to read to is the high watermark: asked `read_committed`,
    // the brokers answer the last stable offset, which stops before this
    // source's newest checkpoint whenever another source sharing the
    // partition has a transaction open below it (the reader then resent
    // what that checkpoint covered).
    let watermarks: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("isolation.level", "read_uncommitted")
        .create()
        .map_err(|e| Error::Config(format!("kafka checkpoint watermark client: {e}")))?;
    let (topic, key) = (topic.to_owned(), transactional_id.to_owned());
    tokio::task::spawn_blocking(move || read_partition(&consumer, &watermarks, &topic, &key))
        .await
        .map_err(|e| Error::Kafka(format!("checkpoint reader task: {e}")))?
}

/// Reads `topic`'s partition `read_committed` up to its high watermark
/// (from `watermarks`, a `read_uncommitted` client); returns the last
/// checkpoint of `key`. Waits while transactions of other sources are open
/// below that end (a consumer cannot pass them), at most 120 s.
fn read_partition(
    consumer: &BaseConsumer,
    watermarks: &BaseConsumer,
    topic: &str,
    key: &str,
) -> Result<Checkpoint, Error> {
    let timeout = Duration::from_secs(30);
    let deadline = Instant::now() + Duration::from_secs(120);
    let (_, end) = watermarks
        .fetch_watermarks(topic, 0, timeout)
        .map_err(|e| Error::Kafka(format!("checkpoint topic {topic} watermarks: {e}")))?;
    let mut found = Checkpoint::default();
    if end <= 0 {
        return Ok(found);
    }
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(|e| Error::Kafka(format!("checkpoint assignment: {e}")))?;
    consumer
        .assign(&assignment)
        .map_err(|e| Error::Kafka(format!("checkpoint assignment: {e}")))?;
    loop {
        let position = consumer
            .position()
            .ok()
            .and_then(|p| p.find_partition(topic, 0).and_then(|p| p.offset().to_raw()))
            .unwrap_or(-1);
        if position >= end {
            return Ok(found);
        }
        if Instant::now() > deadline {
            return Err(Error::Kafka(format!(
                "checkpoint topic {topic}: not read to offset {end} within 120 s (a transaction of another reader open?)"
            )));
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) if message.key() == Some(key.as_bytes()) => {
                if let Some(value) = message.payload() {
                    found = Checkpoint::decode(value).map_err(|e| {
                        Error::Setup(format!(
                            "checkpoint topic {topic} offset {} holds a record for \"{key}\" that is not a checkpoint ({e}): delete that topic's record for this key, or use another --checkpoint-topic",
                            message.offset()
                        ))
                    })?;
                } else {
                    found = Checkpoint::default();
                }
            }
            Some(Ok(_)) | None => {}
            Some(Err(e)) => {
                return Err(Error::Kafka(format!("checkpoint topic {topic}: {e}")));
            }
        }
    }
}
