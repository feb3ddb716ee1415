//! The dead-letter topic: bad messages are copied there, with the error and
//! their origin in headers, before the batch that skips them is applied.
//!
//! Why every delivery report is awaited (as rust-rdkafka's `at_least_once`
//! example does): applying the batch stores the bad message's offset in
//! Redis, after which it is never read again. A copy that failed (no such
//! topic, no permission, brokers gone past `message.timeout.ms`) would be
//! lost for good, so a failed report stops the consumer with
//! [`Error::DeadLetter`] before that offset is applied; on restart the
//! message is read and copied again (at least once).

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};

use crate::Error;
use crate::consumer::Stop;

/// A message that could not be decoded, kept for the dead-letter topic.
#[derive(Debug)]
pub struct DeadLetter {
    /// Where it was read.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key, as read.
    pub key: Option<Vec<u8>>,
    /// Its value, as read.
    pub payload: Option<Vec<u8>>,
    /// Why it is bad.
    pub error: String,
}

/// Hands each delivery report to the thread waiting for it.
#[derive(Debug)]
struct Reports(Sender<Result<(), KafkaError>>);

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, (): ()) {
        let outcome = result.as_ref().map(|_| ()).map_err(|(e, _)| e.clone());
        // The receiver only goes away with the consumer itself.
        let _ = self.0.send(outcome);
    }
}

/// The dead-letter producer and its delivery reports.
pub struct DeadLetters {
    producer: ThreadedProducer<Reports>,
    reports: Receiver<Result<(), KafkaError>>,
    topic: String,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl DeadLetters {
    /// A producer to `topic` with these librdkafka settings.
    pub fn new(settings: &ClientConfig, topic: &str) -> Result<DeadLetters, Error> {
        let (tx, reports) = channel();
        let producer = settings
            .create_with_context(Reports(tx))
            .map_err(Error::Kafka)?;
        Ok(DeadLetters {
            producer,
            reports,
            topic: topic.to_owned(),
        })
    }

    fn failed(&self, source: KafkaError) -> Error {
        Error::DeadLetter {
            topic: self.topic.clone(),
            source,
        }
    }

    /// Copies `dead` to the topic and returns once the broker has every
    /// copy; the first failed report is the error. Gives up only when the
    /// shutdown timeout passed.
    pub fn deliver(&self, dead: &[DeadLetter], stop: &Stop) -> Result<(), Error> {
        for d in dead {
            let partition = d.partition.to_string();
            let offset = d.offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "error",
                    value: Some(d.error.as_bytes()),
                })
                .insert(Header {
                    key: "source.topic",
                    value: Some(d.topic.as_bytes()),
                })
                .insert(Header {
                    key: "source.partition",
                    value: Some(partition.as_bytes()),
                })
                .insert(Header {
                    key: "source.offset",
                    value: Some(offset.as_bytes()),
                });
            let mut record: BaseRecord<'_, [u8], [u8], ()> =
                BaseRecord::with_opaque_to(&self.topic, ()).headers(headers);
            if let Some(key) = &d.key {
                record = record.key(key.as_slice());
            }
            if let Some(payload) = &d.payload {
                record = record.payload(payload.as_slice());
            }
            let mut delay = Duration::from_millis(10);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        stop.backoff(delay)?;
                        delay = (delay * 2).min(Duration::from_millis(500));
                    }
                    Err((e, _)) => return Err(self.failed(e)),
                }
            }
        }
        let mut pending = dead.len();
        while pending > 0 {
            match self.reports.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(())) => pending -= 1,
                Ok(Err(e)) => return Err(self.failed(e)),
                Err(RecvTimeoutError::Timeout) => stop.backoff(Duration::ZERO)?,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Internal("the dead-letter producer went away".into()));
                }
            }
        }
        Ok(())
    }
}
