//! InstaShop CDC reader: Postgres logical replication (pgoutput) to per-table
//! Kafka topics in Debezium's JSON change-event format.
//!
//! [`run`] starts one pipeline per source database ([`source`]) sharing one
//! Kafka producer ([`sink`]), plus the `/metrics` and `/health` endpoint.
//! A source that fails with a non-retryable (setup) error stops the whole
//! process, so a misconfiguration is one clear line and a non-zero exit.

pub mod ack;
pub mod change;
pub mod checkpoint;
pub mod chunk;
pub mod config;
pub mod decoder;
pub mod error;
pub mod incremental;
pub mod metrics;
pub mod pgoutput;
pub mod relation;
pub mod replication;
pub mod signal;
pub mod slot;
pub mod snapshot;
pub mod source;
// Kafka side: value rendering, envelope, topics, producer.
pub mod envelope;
pub mod exactly_once;
pub mod sink;
pub mod topic;
pub mod value;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::Error;

use crate::envelope::EnvelopeConfig;
use crate::metrics::Metrics;
use crate::sink::{Sink, SinkConfig};
use crate::topic::TopicSettings;

/// Builds the sink settings from the configuration.
pub fn sink_config(config: &Config) -> Result<SinkConfig, Error> {
    let mut cfg = SinkConfig::new(config.kafka_bootstrap_servers.clone());
    cfg.envelope = EnvelopeConfig {
        decimal_mode: config.decimal_mode,
        tombstones: config.tombstones,
        truncate: config.truncate,
        transaction_metadata: config.transaction_metadata,
    };
    if config.topic_partitions < 1 {
        return Err(Error::Config(
            "--topic-partitions must be at least 1".to_owned(),
        ));
    }
    cfg.topics = TopicSettings {
        partitions: config.topic_partitions,
        ..TopicSettings::default()
    };
    cfg.extra = config.kafka_extra()?;
    if config.exactly_once {
        cfg.exactly_once = Some(config.exactly_once_settings()?);
    }
    Ok(cfg)
}

/// Runs every configured source until `shutdown` (then flushes Kafka,
/// confirms and returns `Ok`) or until one fails with a non-retryable error.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let sources = config.source_configs()?;
    let sink_cfg = sink_config(&config)?;
    // A wrong address must end the reader, not retry forever; once a broker
    // has answered, an outage is transient and the sources retry.
    let startup_timeout = Duration::from_secs(config.kafka_startup_timeout_secs);
    let producer_settings = sink::producer_config(&sink_cfg)?;
    match kafka_probe::await_broker(
        &producer_settings,
        startup_timeout,
        &shutdown,
        "--kafka-bootstrap-servers",
    )
    .await
    .map_err(Box::new)?
    {
        kafka_probe::Probe::Answered(brokers) => {
            tracing::info!(brokers, "kafka answered");
        }
        kafka_probe::Probe::Stopped => {
            tracing::info!("cdc-reader stopped before kafka answered");
            return Ok(());
        }
    }
    let metrics = Metrics::new();
    let stop = shutdown.child_token();
    let (addr, server) = metrics::serve(config.metrics_addr, metrics.clone(), stop.clone()).await?;
    tracing::info!(metrics = %addr, sources = sources.len(), "cdc-reader started");
    let sink = Arc::new(Sink::new(&sink_cfg, metrics.clone())?);
    // --shutdown-timeout-secs bounds the whole drain from the moment the
    // stop was asked for: the sources' own flushes, then this final one.
    let shutdown_timeout = Duration::from_secs(config.shutdown_timeout_secs);
    let stopping_since = {
        let stop = stop.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            tokio::time::Instant::now()
        })
    };

    let mut tasks = tokio::task::JoinSet::new();
    for source in sources {
        tracing::info!(source = %source.name, target = %source.params.target(), slot = %source.slot, prefix = %source.prefix, "source configured");
        let (sink, metrics, stop) = (sink.clone(), metrics.clone(), stop.clone());
        tasks.spawn(source::run(Arc::new(source), sink, metrics, stop));
    }
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let result = joined.map_err(|e| Error::Replication(format!("source task: {e}")))?;
        if let Err(e) = result {
            if first_error.is_none() {
                first_error = Some(e);
            }
            stop.cancel();
        }
    }
    stop.cancel();
    let since = stopping_since
        .await
        .unwrap_or_else(|_| tokio::time::Instant::now());
    if let Err(e) = sink
        .flush(shutdown_timeout.saturating_sub(since.elapsed()))
        .await
    {
        tracing::warn!(error = %local_stack::one_line(&e), "final kafka flush failed");
    }
    let _ = server.await;
    match first_error {
        Some(e) => Err(e),
        None => {
            tracing::info!("cdc-reader stopped");
            Ok(())
        }
    }
}
