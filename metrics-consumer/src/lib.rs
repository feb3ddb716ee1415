//! `metrics-consumer`: turns the Debezium change events of the nine InstaShop
//! tables into exact revenue and count metrics in Redis, with an exactly-once
//! effect through any crash, replay or rebalance.
//!
//! Modules: [`money`] and [`fold`] are pure (decode an event, compute a row's
//! contribution, the retract-and-add rules); [`batch`] holds the decoded
//! messages of one atomic apply; [`cluster`] checks at startup that a Kafka
//! broker answers; [`plan`] folds a batch over the Redis values
//! it depends on into checked writes (pure); [`store`] reads those values and
//! runs the compare-and-write Lua script; [`consumer`] is the Kafka loop;
//! [`dead_letter`] copies bad messages to the dead-letter topic; [`telemetry`] and [`http`]
//! serve `/metrics` and `/health`.

pub mod batch;
pub mod consumer;
pub mod dead_letter;
pub mod fold;
pub mod money;
pub mod plan;
pub mod settings;
pub mod store;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long after the shutdown timeout `run` still waits for the consumer
/// thread to hand its result back before returning without it.
const ABANDON_GRACE: Duration = Duration::from_secs(2);

/// The nine table topics consumed by default.
pub const DEFAULT_TOPICS: &str = "instashop.public.customer,instashop.public.buyer,instashop.public.product,instashop.public.transaction,instashop.public.transactiondetail,crm.public.interaction,erp.public.stock,ecommerce.public.carrier,ecommerce.public.shipment";

/// InstaShop CDC metrics-consumer: Debezium change events from Kafka to exact
/// metrics in Redis.
#[derive(Debug, Clone, clap::Parser)]
#[command(version, about)]
pub struct Config {
    /// Kafka bootstrap servers (comma-separated host:port).
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:19092"
    )]
    pub bootstrap_servers: String,

    /// Seconds to wait at startup for a Kafka broker to answer; when none
    /// does, the consumer exits with an error instead of retrying forever.
    /// Once a broker has answered, an outage is waited out.
    #[arg(
        long,
        env = "METRICS_KAFKA_STARTUP_TIMEOUT_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub kafka_startup_timeout_secs: u64,

    /// Redis URL holding the metrics, row states and consumed offsets.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:63790/0")]
    pub redis_url: String,

    /// Kafka consumer group; processes in one group split the partitions.
    #[arg(long, env = "METRICS_GROUP", default_value = "instashop-metrics")]
    pub group: String,

    /// Prefix of every Redis key written (metrics, row states, offsets).
    #[arg(long, env = "METRICS_PREFIX", default_value = "metrics:")]
    pub prefix: String,

    /// Topics to consume, comma-separated; an entry starting with `^` is a regex.
    #[arg(long, env = "METRICS_TOPICS", default_value = DEFAULT_TOPICS)]
    pub topics: String,

    /// Put before every topic name of `--topics` (not before `^regex`
    /// entries), e.g. `debezium.` to read the topics of a Debezium connector
    /// whose `topic.prefix` is `debezium.<db>`.
    #[arg(long, env = "METRICS_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,

    /// Most messages applied in one atomic Redis script call.
    #[arg(long, env = "METRICS_BATCH_SIZE", default_value_t = 10_000)]
    pub batch_size: usize,

    /// Dead-letter topic for messages that cannot be decoded.
    #[arg(long, env = "METRICS_DLQ_TOPIC", default_value = "metrics.dlq")]
    pub dlq_topic: String,

    /// Address of the `/metrics` and `/health` HTTP server.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9473")]
    pub metrics_addr: SocketAddr,

    /// Static group membership (`group.instance.id`): a process restarted
    /// with the same id takes its partitions back at once instead of waiting
    /// for the old member's session to time out. One id per running process.
    #[arg(long, env = "METRICS_INSTANCE_ID", default_value = "")]
    pub instance_id: String,

    /// Kafka group session timeout (ms): a member killed without leaving
    /// keeps its partitions this long (without `--instance-id`). Brokers
    /// refuse values below their `group.min.session.timeout.ms` (6000 by
    /// default).
    #[arg(long, env = "METRICS_SESSION_TIMEOUT_MS", default_value_t = 6000)]
    pub session_timeout_ms: u64,

    /// Longest time the broker may hold a fetch (ms); lower cuts latency.
    #[arg(long, env = "METRICS_FETCH_WAIT_MAX_MS", default_value_t = 50)]
    pub fetch_wait_max_ms: u64,

    /// Source databases captured under other names, as `LOGICAL=NAME`
    /// comma list (e.g. `instashop=scratch_instashop`): events whose
    /// `source.db` is NAME count as LOGICAL's.
    #[arg(long, env = "METRICS_SOURCE_DBS", default_value = "")]
    pub source_dbs: String,

    /// Extra librdkafka setting KEY=VALUE for every Kafka client
    /// (repeatable; comma-separated in the env variable), e.g. security
    /// settings. Settings the guarantees depend on are refused (see
    /// `settings.rs`); `isolation.level` defaults to `read_committed`.
    #[arg(
        long = "kafka-property",
        env = "METRICS_KAFKA_PROPERTIES",
        value_delimiter = ',',
        value_name = "KEY=VALUE"
    )]
    pub kafka_properties: Vec<String>,

    /// librdkafka debug contexts, e.g. `consumer,fetch` (troubleshooting).
    #[arg(long, env = "KAFKA_DEBUG", default_value = "")]
    pub kafka_debug: String,

    /// Longest a clean stop (SIGTERM, Ctrl-C) may take, in seconds: the batch
    /// in hand is applied and the dead letters delivered within it, or the
    /// process gives up with an error (nothing is lost: a restart reads
    /// again from the offsets stored in Redis).
    #[arg(
        long,
        alias = "shutdown-timeout",
        env = "METRICS_SHUTDOWN_TIMEOUT_SECS",
        default_value_t = 30
    )]
    pub shutdown_timeout_secs: u64,

    /// How often the `dashboard` JSON summary is rewritten (ms).
    #[arg(long, env = "METRICS_DASHBOARD_INTERVAL_MS", default_value_t = 1000)]
    pub dashboard_interval_ms: u64,
}

impl Config {
    /// The topics (or `^regex` patterns) to subscribe to, names with
    /// `--topic-prefix` in front.
    pub fn topic_list(&self) -> Vec<String> {
        self.topics
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| {
                if t.starts_with('^') {
                    t.to_owned()
                } else {
                    format!("{}{t}", self.topic_prefix)
                }
            })
            .collect()
    }

    /// `(captured name, logical database)` pairs from `--source-dbs`.
    pub fn renames(&self) -> Result<Vec<(String, String)>, Error> {
        catalog::alias::parse(&self.source_dbs).map_err(Error::Config)
    }

    fn validate(&self) -> Result<(), Error> {
        self.renames()?;
        settings::translate(self)?;
        if self.topic_list().is_empty() {
            return Err(Error::Config(
                "no topics: set --topics / METRICS_TOPICS".into(),
            ));
        }
        if self.batch_size == 0 || self.batch_size > 50_000 {
            return Err(Error::Config(
                "--batch-size must be between 1 and 50000 (one Redis script call per batch)".into(),
            ));
        }
        if self.prefix.is_empty() {
            return Err(Error::Config("--prefix must not be empty".into()));
        }
        Ok(())
    }
}

/// Errors of the consumer, grouped by what the caller does next.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // Before anything runs: fix the flags or the environment.
    /// Fix the flags or environment variables.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A `--kafka-property` the consumer refuses: remove it.
    #[error("--kafka-property {key}: {why}")]
    Setting {
        /// The librdkafka key.
        key: String,
        /// Why it is refused, and what to do instead.
        why: String,
    },
    // At start: check the services.
    /// Kafka client setup failed: check KAFKA_BOOTSTRAP_SERVERS and the brokers (scripts/up).
    #[error(
        "kafka client setup failed; check KAFKA_BOOTSTRAP_SERVERS and that the brokers run (scripts/up)"
    )]
    Kafka(#[source] rdkafka::error::KafkaError),
    /// The startup check found no Kafka broker answering, or the Kafka
    /// settings make no client. Checked before any other work, never
    /// retried; once running, an outage is transient.
    #[error(transparent)]
    KafkaProbe(#[from] Box<kafka_probe::ProbeError>),
    /// Redis unreachable at start: check REDIS_URL and that Redis runs.
    #[error("redis unavailable; check REDIS_URL and that redis runs (scripts/up)")]
    Redis(#[source] redis::RedisError),
    /// The HTTP address cannot be bound: pick another --metrics-addr.
    #[error("cannot listen on {addr}; pick another --metrics-addr / METRICS_ADDR")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    // Definite, while running: the consumer stops with this one error.
    /// A Redis key the consumer owns holds text it did not write.
    #[error(
        "redis key {key} field {field} holds a value the consumer did not write; delete every key under the prefix to rebuild from the topics"
    )]
    StoredState {
        /// The key, without the prefix.
        key: String,
        /// The hash field.
        field: String,
    },
    /// Concurrent writers changed the batch's inputs on every attempt.
    #[error(
        "a batch's rows kept changing under concurrent writers for {attempts} attempts; is another process writing under the same prefix?"
    )]
    Conflict {
        /// Attempts made.
        attempts: u32,
    },
    /// Redis refused a command for good (wrong key type, out of memory, no
    /// permission, a script error): definite, the consumer stops.
    #[error(
        "redis refused a command of the apply; fix the cause (the prefix's keys must be the consumer's own) and restart"
    )]
    RedisRejected(#[source] redis::RedisError),
    /// The dead-letter topic could not be written: the consumer stops
    /// before applying the offsets of the bad messages it could not copy.
    #[error(
        "cannot write bad messages to the dead-letter topic {topic}; create the topic or fix its permissions (--dlq-topic)"
    )]
    DeadLetter {
        /// The dead-letter topic.
        topic: String,
        /// The delivery error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The brokers refuse the group membership as configured (a session
    /// timeout outside their limits, no permission for the group): no
    /// retry can join, so the consumer stops.
    #[error("the kafka brokers refuse to let the consumer join group {group}; {fix}")]
    GroupRefused {
        /// The consumer group.
        group: String,
        /// What to change.
        fix: &'static str,
        /// The brokers' answer.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    // Transient: retried with backoff until it goes away or the shutdown
    // timeout passes; never returned by `run`.
    /// Redis unreachable or busy while a batch was applied.
    #[error("redis unavailable while applying a batch")]
    RedisUnavailable(#[source] redis::RedisError),
    // Stopping.
    /// The clean stop did not finish within `--shutdown-timeout-secs`.
    #[error(
        "stopped after the shutdown timeout of {secs} s before the batch in hand was applied; it is read again on restart from the offsets stored in redis"
    )]
    ShutdownTimeout {
        /// The timeout.
        secs: u64,
    },
    // The system or a bug.
    /// The system refused a thread (resource limits).
    #[error("cannot start the {thread} thread")]
    Spawn {
        /// Which thread.
        thread: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A bug: a worker thread died.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Whether the failed step is retried (with backoff) rather than ending
    /// the consumer.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::RedisUnavailable(_))
    }
}

/// Runs the consumer until `shutdown` is cancelled, then finishes the batch
/// in hand, commits and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    config.validate()?;
    // Fail fast with a clear message when Redis is not there at all.
    let mut store = store::Store::new(&config.redis_url, &config.prefix).map_err(Error::Redis)?;
    tokio::task::block_in_place(|| store.offsets(&[("ping".to_owned(), 0)]))
        .map_err(Error::Redis)?;
    drop(store);
    // A wrong Kafka address must end the consumer, not warn forever; once a
    // broker has answered, an outage is transient and waited out.
    let kafka = settings::translate(&config)?;
    let startup_timeout = Duration::from_secs(config.kafka_startup_timeout_secs);
    match kafka_probe::await_broker(
        &kafka.watermarks,
        startup_timeout,
        &shutdown,
        "--bootstrap-servers",
    )
    .await
    .map_err(Box::new)?
    {
        kafka_probe::Probe::Answered(brokers) => tracing::info!(brokers, "kafka answered"),
        kafka_probe::Probe::Stopped => return Ok(()),
    }

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
    tracing::info!(addr = %local, redis = %local_stack::redact::url(&config.redis_url), prefix = %config.prefix, "metrics-consumer starting");
    let health: local_stack::exposition::Health = {
        let telemetry = Arc::clone(&telemetry);
        Arc::new(move || telemetry.health())
    };
    let server = tokio::spawn(local_stack::exposition::serve(
        listener,
        Arc::new(telemetry.registry()),
        Some(health),
        shutdown.clone(),
    ));

    // Once a clean stop was asked for, the threads have the shutdown
    // timeout to finish the batch in hand; then every retry gives up.
    let stop = consumer::Stop::new(shutdown.clone(), config.shutdown_timeout_secs);
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            stop.shutdown.cancelled().await;
            tokio::time::sleep(Duration::from_secs(stop.timeout_secs)).await;
            stop.abandon.cancel();
        })
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let consumer_stop = stop.clone();
    let consumer_telemetry = Arc::clone(&telemetry);
    // A thread of its own, not the runtime's blocking pool: a call stuck
    // past the timeout (a Redis read, a broker close) must not hold the
    // process, which exits when `run` returns.
    std::thread::Builder::new()
        .name("consumer".into())
        .spawn(move || {
            let _ = done_tx.send(consumer::run_blocking(
                &config,
                &consumer_telemetry,
                &consumer_stop,
            ));
        })
        .map_err(|source| Error::Spawn {
            thread: "consumer",
            source,
        })?;
    let result = tokio::select! {
        done = done_rx => done.unwrap_or_else(|_| Err(Error::Internal("the consumer thread panicked".into()))),
        () = async {
            stop.abandon.cancelled().await;
            tokio::time::sleep(ABANDON_GRACE).await;
        } => Err(Error::ShutdownTimeout { secs: stop.timeout_secs }),
    };
    timer.abort();
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
    fn kafka_startup_timeout_defaults_to_30_s_and_is_at_least_1() {
        let d = Config::try_parse_from(["metrics-consumer"]).unwrap();
        assert_eq!(d.kafka_startup_timeout_secs, 30);
        let c = Config::try_parse_from(["metrics-consumer", "--kafka-startup-timeout-secs", "2"])
            .unwrap();
        assert_eq!(c.kafka_startup_timeout_secs, 2);
        assert!(
            Config::try_parse_from(["metrics-consumer", "--kafka-startup-timeout-secs", "0"])
                .is_err()
        );
    }

    #[test]
    fn topic_prefix_goes_before_names_but_not_before_patterns() {
        let c = Config::try_parse_from([
            "metrics-consumer",
            "--topics",
            "instashop.public.buyer, ^crm\\..*",
            "--topic-prefix",
            "debezium.",
        ])
        .unwrap();
        assert_eq!(
            c.topic_list(),
            ["debezium.instashop.public.buyer", "^crm\\..*"]
        );
        let d = Config::try_parse_from(["metrics-consumer"]).unwrap();
        assert_eq!(d.topic_list()[0], "instashop.public.customer");
    }
}
