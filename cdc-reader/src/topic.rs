//! Topic names and creating missing topics.
//!
//! Names follow Debezium: `<prefix>.<schema>.<table>` for tables (see
//! [`TableName::topic`](crate::change::TableName::topic)) and
//! `<prefix>.transaction` for transaction metadata. The sink never relies on
//! broker-side auto-creation (often disabled in production): it makes sure
//! each topic exists before its first record, with a metadata lookup, then
//! CreateTopics with the configured partition count when it is missing. The
//! replication factor and `min.insync.replicas` are left to the cluster's
//! defaults (`-1`), so a three-broker cluster gives RF 3 without a flag here.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::error::Error;

/// Topic of the transaction metadata of one source.
pub fn transaction_topic(prefix: &str) -> String {
    format!("{prefix}.transaction")
}

/// How missing topics are created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSettings {
    /// Create missing topics (otherwise a missing topic is a setup error).
    pub create: bool,
    /// Partitions of created topics.
    pub partitions: i32,
    /// Replication factor of created topics (-1: the broker's
    /// `default.replication.factor`).
    pub replication_factor: i32,
    /// How long metadata lookups and creation may take.
    pub timeout: Duration,
}

impl Default for TopicSettings {
    fn default() -> Self {
        TopicSettings {
            create: true,
            partitions: 3,
            replication_factor: -1,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Remembers which topics are known to exist and creates missing ones.
pub struct Topics {
    admin: Arc<AdminClient<DefaultClientContext>>,
    known: Mutex<HashSet<String>>,
    settings: TopicSettings,
}

impl std::fmt::Debug for Topics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topics")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Whether a topic exists (has partitions) according to a metadata lookup.
enum Lookup {
    Exists,
    Missing,
}

impl Topics {
    /// An admin client on `bootstrap_servers`.
    pub fn new(bootstrap_servers: &str, settings: TopicSettings) -> Result<Self, Error> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap_servers)
            .set("allow.auto.create.topics", "false")
            .create()
            .map_err(|e| Error::Config(format!("kafka admin client: {e}")))?;
        Ok(Topics {
            admin: Arc::new(admin),
            known: Mutex::new(HashSet::new()),
            settings,
        })
    }

    fn is_known(&self, topic: &str) -> bool {
        self.known
            .lock()
            .map(|k| k.contains(topic))
            .unwrap_or(false)
    }

    fn remember(&self, topic: &str) {
        if let Ok(mut known) = self.known.lock() {
            known.insert(topic.to_owned());
        }
    }

    /// Partitions of `topic` in a fresh metadata lookup (0: missing).
    async fn fetch_partitions(&self, topic: &str) -> Result<usize, Error> {
        let admin = self.admin.clone();
        let name = topic.to_owned();
        let timeout = self.settings.timeout;
        let metadata =
            tokio::task::spawn_blocking(move || admin.inner().fetch_metadata(Some(&name), timeout))
                .await
                .map_err(|e| Error::Kafka(format!("metadata lookup task: {e}")))?
                .map_err(|e| Error::Kafka(format!("metadata for topic {topic}: {e}")))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len()))
    }

    async fn lookup(&self, topic: &str) -> Result<Lookup, Error> {
        Ok(if self.fetch_partitions(topic).await? > 0 {
            Lookup::Exists
        } else {
            Lookup::Missing
        })
    }

    /// The number of partitions of `topic` (fresh metadata, not cached).
    pub async fn partition_count(&self, topic: &str) -> Result<i32, Error> {
        let count = self.fetch_partitions(topic).await?;
        if count == 0 {
            return Err(Error::Kafka(format!(
                "metadata for topic {topic}: no partitions"
            )));
        }
        i32::try_from(count).map_err(|_| Error::Kafka(format!("topic {topic}: {count} partitions")))
    }

    /// Makes sure `topic` exists, creating it when missing and allowed.
    pub async fn ensure(&self, topic: &str) -> Result<(), Error> {
        if self.is_known(topic) {
            return Ok(());
        }
        if let Lookup::Exists = self.lookup(topic).await? {
            self.remember(topic);
            return Ok(());
        }
        if !self.settings.create {
            return Err(Error::Setup(format!(
                "kafka topic {topic} does not exist: create it ({} partitions) or allow the reader to create topics",
                self.settings.partitions
            )));
        }
        self.create(topic).await?;
        // Creation is asynchronous on some brokers: wait until metadata shows it.
        let deadline = Instant::now() + self.settings.timeout;
        loop {
            if let Lookup::Exists = self.lookup(topic).await? {
                self.remember(topic);
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Kafka(format!(
                    "kafka topic {topic} was created but does not show up in metadata"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// CreateTopics for one topic; an "already exists" answer is success.
    async fn create(&self, topic: &str) -> Result<(), Error> {
        let new = NewTopic::new(
            topic,
            self.settings.partitions,
            TopicReplication::Fixed(self.settings.replication_factor),
        );
        let options = AdminOptions::new().operation_timeout(Some(self.settings.timeout));
        let results = self
            .admin
            .create_topics([&new], &options)
            .await
            .map_err(|e| Error::Kafka(format!("create topic {topic}: {e}")))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(Error::Kafka(format!(
                        "create topic {topic}: {}",
                        KafkaError::AdminOp(code)
                    )));
                }
            }
        }
        tracing::info!(
            topic,
            partitions = self.settings.partitions,
            "created kafka topic"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_topic_name() {
        assert_eq!(transaction_topic("crm"), "crm.transaction");
    }

    #[test]
    fn defaults_match_the_local_stack() {
        let s = TopicSettings::default();
        assert_eq!(s.partitions, 3);
        assert!(s.create);
    }
}
