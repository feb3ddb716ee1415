//! `dwh-sink`: every change event of the InstaShop topics, exactly once, into
//! a PostgreSQL data warehouse: the raw history (`change_event`) and a star
//! schema of the shop with slowly changing dimensions of type 2.
//!
//! Exactly once through anything: each batch's rows and the Kafka offsets
//! it covers are written in one Postgres transaction, the offsets in the
//! warehouse itself (`sink_offset`); on start the consumer seeks to them,
//! never to Kafka's committed offsets. A re-sent event (the reader's resend
//! after a crash) meets the unique key of `change_event` and changes
//! nothing; the star schema is derived from event positions, not from
//! arrival order, so replays and out-of-order arrivals change nothing either.
//! The reader's snapshot-complete marker ends, per partition, the rows its
//! snapshot did not read again (deleted while the reader had no slot).
//!
//! Modules: [`event`] decodes a Debezium message and the snapshot-complete
//! marker (pure); [`shop`] extracts
//! the typed rows of the nine shop tables (pure); [`copy`] encodes rows in
//! PostgreSQL's COPY text format (pure); [`batch`] collects one
//! transaction's rows; [`warehouse`] writes a batch with its offsets;
//! [`star`] holds the SQL that folds a batch into the dimensions and facts;
//! [`consumer`] is the Kafka loop; [`dead_letter`] copies bad messages to
//! the dead-letter topic; [`telemetry`] serves `/metrics` and `/health`;
//! [`verify`] compares the warehouse with the source databases.

pub mod batch;
pub mod consumer;
pub mod copy;
pub mod dead_letter;
pub mod event;
pub mod shop;
pub mod star;
pub mod telemetry;
pub mod verify;
pub mod warehouse;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The nine shop tables, as topics without a prefix.
pub const DEFAULT_TOPICS: &str = "instashop.public.customer,instashop.public.buyer,instashop.public.product,instashop.public.transaction,instashop.public.transactiondetail,crm.public.interaction,erp.public.stock,ecommerce.public.carrier,ecommerce.public.shipment";

/// Command line: the sink (no subcommand) or `verify`.
#[derive(Debug, Clone, clap::Parser)]
#[command(version, about, args_conflicts_with_subcommands = false)]
pub struct Cli {
    /// Settings shared by the sink and `verify`.
    #[command(flatten)]
    pub config: Config,
    /// What to do; without one, run the sink.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Compare the warehouse with the source databases at rest; prints each
    /// difference and exits non-zero when there is any.
    Verify(verify::VerifyArgs),
}

/// InstaShop CDC data-warehouse sink: Debezium change events from Kafka,
/// exactly once, into PostgreSQL (raw history and a star schema).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// The warehouse database (owner role: schema from sql/dwh.sql).
    #[arg(
        long,
        env = "DWH_URL",
        default_value = "postgres://dwh_sink:dwh_sink@127.0.0.1:54329/dwh"
    )]
    pub dwh_url: String,

    /// Kafka bootstrap servers (comma-separated host:port).
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:19092"
    )]
    pub bootstrap_servers: String,

    /// Topics to read, comma-separated, before the prefix is added.
    #[arg(long, env = "DWH_TOPICS", default_value = DEFAULT_TOPICS)]
    pub topics: String,

    /// Prefix put before every topic name, e.g. `debezium.` to read the
    /// topics of the Debezium reference service instead of the reader's.
    #[arg(long, env = "DWH_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,

    /// Source databases captured under other names, as `LOGICAL=NAME`
    /// comma list: events whose `source.db` is NAME are stored as LOGICAL's.
    #[arg(long, env = "DWH_SOURCE_DBS", default_value = "")]
    pub source_dbs: String,

    /// Most messages written in one warehouse transaction.
    #[arg(long, env = "DWH_BATCH_SIZE", default_value_t = 20_000)]
    pub batch_size: usize,

    /// Longest a batch waits for more messages before it is written (ms).
    #[arg(long, env = "DWH_LINGER_MS", default_value_t = 200)]
    pub linger_ms: u64,

    /// Dead-letter topic for messages that cannot be decoded (created with
    /// the cluster's defaults when missing).
    #[arg(long, env = "DWH_DLQ_TOPIC", default_value = "dwh.dlq")]
    pub dlq_topic: String,

    /// Address of the `/metrics` and `/health` HTTP server.
    #[arg(long, env = "DWH_METRICS_ADDR", default_value = "127.0.0.1:9474")]
    pub metrics_addr: SocketAddr,

    /// Seconds to wait at startup for a Kafka broker to answer; when none
    /// does, the sink exits with an error instead of retrying forever.
    #[arg(
        long,
        env = "DWH_KAFKA_STARTUP_TIMEOUT_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub kafka_startup_timeout_secs: u64,

    /// Longest a clean stop (SIGTERM, Ctrl-C) may take, in seconds: the
    /// batch in hand is written within it, or the process gives up (nothing
    /// is lost: a restart reads again from the offsets in the warehouse).
    #[arg(long, env = "DWH_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,
}

impl Config {
    /// The topics to read, prefix included.
    pub fn topic_list(&self) -> Vec<String> {
        self.topics
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| format!("{}{t}", self.topic_prefix))
            .collect()
    }

    /// `(captured name, logical database)` pairs from `--source-dbs`.
    pub fn renames(&self) -> Result<Vec<(String, String)>, Error> {
        catalog::alias::parse(&self.source_dbs).map_err(Error::Config)
    }

    fn validate(&self) -> Result<(), Error> {
        self.renames()?;
        if self.topic_list().is_empty() {
            return Err(Error::Config("no topics: set --topics / DWH_TOPICS".into()));
        }
        if self.batch_size == 0 || self.batch_size > 200_000 {
            return Err(Error::Config(
                "--batch-size must be between 1 and 200000 (one transaction per batch)".into(),
            ));
        }
        Ok(())
    }
}

/// Errors of the sink, grouped by what the caller does next.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // Before anything runs: fix the flags or the environment.
    /// Fix the flags or environment variables.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The HTTP address cannot be bound: pick another one.
    #[error("cannot listen on {addr}; pick another --metrics-addr / DWH_METRICS_ADDR")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    // At start: check the services.
    /// The warehouse does not answer.
    #[error(
        "the warehouse at {url} is unreachable; check DWH_URL / --dwh-url and that postgres runs (scripts/up)"
    )]
    DwhUnreachable {
        /// The URL, password hidden.
        url: String,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The warehouse database lacks the schema.
    #[error(
        "the warehouse at {url} has no table {table}: apply sql/dwh.sql to it as its owner (scripts/up does)"
    )]
    SchemaMissing {
        /// The URL, password hidden.
        url: String,
        /// The first missing table.
        table: String,
    },
    /// Another sink holds the warehouse.
    #[error(
        "another dwh-sink is writing to the warehouse at {url} (its advisory lock is held); stop it first"
    )]
    Busy {
        /// The URL, password hidden.
        url: String,
    },
    /// A topic to read does not exist.
    #[error(
        "topic {topic} does not exist on the cluster; check --topics / --topic-prefix (is the reader running?)"
    )]
    NoTopic {
        /// The topic.
        topic: String,
    },
    /// Kafka client setup failed.
    #[error("kafka client setup failed; check KAFKA_BOOTSTRAP_SERVERS and that the brokers run")]
    Kafka(#[source] rdkafka::error::KafkaError),
    /// The startup check found no Kafka broker answering.
    #[error(transparent)]
    KafkaProbe(#[from] Box<kafka_probe::ProbeError>),
    // Definite, while running: the sink stops with this one error.
    /// The warehouse refused a statement for good (a permission, a schema
    /// that does not match this binary).
    #[error(
        "the warehouse refused {what}; fix the cause (schema from sql/dwh.sql, the owner role) and restart"
    )]
    DwhRejected {
        /// Which step.
        what: &'static str,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The dead-letter topic could not be written: the sink stops before
    /// the offsets of the bad messages are stored.
    #[error(
        "cannot write bad messages to the dead-letter topic {topic}; create the topic or fix its permissions (--dlq-topic)"
    )]
    DeadLetter {
        /// The topic.
        topic: String,
        /// The cause.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    // Transient: retried with backoff; never returned by `run` unless the
    // shutdown timeout passes.
    /// The warehouse connection failed while writing a batch.
    #[error("the warehouse connection failed while writing a batch")]
    DwhUnavailable(#[source] tokio_postgres::Error),
    // Stopping.
    /// The clean stop did not finish within the shutdown timeout.
    #[error(
        "stopped after the shutdown timeout of {secs} s before the batch in hand was written; it is read again on restart from the offsets stored in the warehouse"
    )]
    ShutdownTimeout {
        /// The timeout.
        secs: u64,
    },
    /// `verify` found differences (printed above).
    #[error("verify found {0} difference(s) between the warehouse and the sources")]
    Differences(usize),
    /// A source database for `verify` is unreachable.
    #[error("cannot query the source database {db}; check its URL ({var})")]
    Source {
        /// The logical database.
        db: &'static str,
        /// The variable naming it.
        var: &'static str,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
    // The system or a bug.
    /// The system refused a thread.
    #[error("cannot start the {thread} thread")]
    Spawn {
        /// Which thread.
        thread: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A bug: a worker stopped unexpectedly.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Runs the sink until `shutdown` is cancelled, then writes the batch in
/// hand and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    config.validate()?;
    let renames = config.renames()?;
    let mut dwh = warehouse::Warehouse::connect(&config.dwh_url).await?;
    dwh.lock().await?;
    let kafka = consumer::settings(&config);
    match kafka_probe::await_broker(
        &kafka.watermarks,
        Duration::from_secs(config.kafka_startup_timeout_secs),
        &shutdown,
        "--bootstrap-servers",
    )
    .await
    .map_err(Box::new)?
    {
        kafka_probe::Probe::Answered(brokers) => tracing::info!(brokers, "kafka answered"),
        kafka_probe::Probe::Stopped => return Ok(()),
    }
    let dead_letters = dead_letter::DeadLetters::new(&kafka.dead_letters, &config.dlq_topic)?;
    dead_letters.ensure_topic(&kafka.dead_letters).await?;

    let telemetry = Arc::new(telemetry::Telemetry::default());
    let listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|source| Error::Listen {
            addr: config.metrics_addr,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| Error::Listen {
        addr: config.metrics_addr,
        source,
    })?;
    tracing::info!(addr = %local, dwh = %local_stack::redact::url(&config.dwh_url), "dwh-sink starting");
    let server = tokio::spawn(telemetry::serve(
        listener,
        Arc::clone(&telemetry),
        shutdown.clone(),
    ));

    let stored = dwh.offsets().await?;
    let result = consumer::run(
        &config,
        &kafka,
        renames,
        stored,
        dwh,
        dead_letters,
        &telemetry,
        &shutdown,
    )
    .await;
    shutdown.cancel();
    let _ = server.await;
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn prefix_applies_to_every_topic() {
        let cli = Cli::try_parse_from(["dwh-sink", "--topic-prefix", "debezium."]).unwrap();
        let topics = cli.config.topic_list();
        assert_eq!(topics.len(), 9);
        assert!(topics.iter().all(|t| t.starts_with("debezium.")));
        assert!(topics.contains(&"debezium.instashop.public.product".to_owned()));
    }

    #[test]
    fn verify_is_a_subcommand_and_renames_are_checked() {
        let cli = Cli::try_parse_from(["dwh-sink", "verify"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Verify(_))));
        let bad = Cli::try_parse_from(["dwh-sink", "--source-dbs", "instashop"]).unwrap();
        assert!(bad.config.validate().is_err());
    }
}
