//! The dead-letter topic: a message that cannot be decoded is copied there
//! (with the error and its origin in headers) and counted, before the batch
//! that skips it is written. Every delivery is awaited: once the batch's
//! offsets are stored the message is never read again, so a copy that
//! failed stops the sink instead ([`Error::DeadLetter`]).

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::Error;
use crate::batch::DeadLetter;

/// The dead-letter producer.
pub struct DeadLetters {
    producer: FutureProducer,
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
    /// A producer to `topic`.
    pub fn new(settings: &ClientConfig, topic: &str) -> Result<DeadLetters, Error> {
        Ok(DeadLetters {
            producer: settings.create().map_err(Error::Kafka)?,
            topic: topic.to_owned(),
        })
    }

    /// Creates the topic with the cluster's defaults when it is missing.
    pub async fn ensure_topic(&self, settings: &ClientConfig) -> Result<(), Error> {
        let admin: AdminClient<DefaultClientContext> = settings.create().map_err(Error::Kafka)?;
        let topic = NewTopic::new(&self.topic, 3, TopicReplication::Fixed(-1));
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
        let results = admin
            .create_topics([&topic], &options)
            .await
            .map_err(|source| Error::DeadLetter {
                topic: self.topic.clone(),
                source,
            })?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(Error::DeadLetter {
                        topic: self.topic.clone(),
                        source: rdkafka::error::KafkaError::AdminOp(code),
                    });
                }
            }
        }
        Ok(())
    }

    /// Copies the bad messages and waits until Kafka has them all.
    pub async fn deliver(&self, dead: &[DeadLetter]) -> Result<(), Error> {
        let mut pending = Vec::with_capacity(dead.len());
        for d in dead {
            let partition = d.partition.to_string();
            let offset = d.offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "dwh.error",
                    value: Some(d.error.as_bytes()),
                })
                .insert(Header {
                    key: "dwh.topic",
                    value: Some(d.topic.as_bytes()),
                })
                .insert(Header {
                    key: "dwh.partition",
                    value: Some(partition.as_bytes()),
                })
                .insert(Header {
                    key: "dwh.offset",
                    value: Some(offset.as_bytes()),
                });
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(headers);
            if let Some(k) = &d.key {
                record = record.key(k.as_slice());
            }
            if let Some(v) = &d.payload {
                record = record.payload(v.as_slice());
            }
            pending.push(self.producer.send(record, Duration::from_secs(60)));
        }
        for p in pending {
            p.await.map_err(|(source, _)| Error::DeadLetter {
                topic: self.topic.clone(),
                source,
            })?;
        }
        Ok(())
    }
}
