//! The startup check that a Kafka broker answers.
//!
//! librdkafka never fails on an unreachable bootstrap address: it logs
//! `AllBrokersDown` and retries forever, which is the right behaviour for an
//! outage of a cluster that was reachable (the reader stalls and resumes),
//! but turns a mistyped address into an endless stream of warnings. So before
//! any slot or snapshot work the reader asks for the cluster's metadata with
//! its producer's own settings (so `--kafka-property` security settings
//! apply), polling with a deadline, and a cluster that never answers is a
//! definite error naming the address and what to check.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::Error;

/// The longest single metadata request: a stop asked for during the check
/// waits at most this long for the blocking call to return.
const ATTEMPT: Duration = Duration::from_secs(1);

/// Pause between attempts that failed at once (connection refused).
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Client context of the probe: its connection failures are expected while
/// polling and end in one error, so they are logged at debug level only.
struct ProbeContext;

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(error = %error, reason, "kafka startup probe");
    }
}

impl ProducerContext for ProbeContext {
    type DeliveryOpaque = ();

    /// The probe never produces.
    fn delivery(&self, _: &DeliveryResult<'_>, (): ()) {}
}

/// Whether a broker is known to answer, and if so how many brokers the
/// cluster reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// A metadata response listed this many brokers.
    Answered(usize),
    /// A stop was asked for before any broker answered.
    Stopped,
}

/// Polls the cluster of `settings` (the producer's configuration, holding
/// `bootstrap.servers`) with metadata requests until a broker answers,
/// `timeout` passes ([`Error::KafkaUnreachable`]) or `stop` is cancelled.
pub async fn await_broker(
    settings: &ClientConfig,
    timeout: Duration,
    stop: &CancellationToken,
) -> Result<Probe, Error> {
    let servers = settings
        .get("bootstrap.servers")
        .unwrap_or_default()
        .to_owned();
    let probe: BaseProducer<ProbeContext> = settings
        .create_with_context(ProbeContext)
        .map_err(|e| Error::Config(format!("kafka client for {servers}: {e}")))?;
    let probe = std::sync::Arc::new(probe);
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(Error::KafkaUnreachable {
                servers,
                waited: timeout,
                source: last_error,
            });
        }
        let attempt = remaining.min(ATTEMPT);
        let client = probe.clone();
        let fetch = tokio::task::spawn_blocking(move || {
            client
                .client()
                .fetch_metadata(None, attempt)
                .map(|m| m.brokers().len())
        });
        let started = Instant::now();
        let result = tokio::select! {
            () = stop.cancelled() => return Ok(Probe::Stopped),
            joined = fetch => joined.map_err(|e| Error::Kafka(format!("metadata probe task: {e}")))?,
        };
        match result {
            Ok(brokers) if brokers > 0 => return Ok(Probe::Answered(brokers)),
            Ok(_) => {}
            Err(e) => last_error = Some(e),
        }
        // A refused connection fails at once; do not spin on it.
        let pause = RETRY_PAUSE.saturating_sub(started.elapsed());
        tokio::select! {
            () = stop.cancelled() => return Ok(Probe::Stopped),
            () = tokio::time::sleep_until((Instant::now() + pause).min(deadline)) => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rdkafka::mocking::MockCluster;

    use super::*;

    fn settings(servers: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", servers);
        c
    }

    #[tokio::test]
    async fn a_running_cluster_answers() {
        let mock = MockCluster::new(3).unwrap();
        let probe = await_broker(
            &settings(&mock.bootstrap_servers()),
            Duration::from_secs(10),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(probe, Probe::Answered(3));
    }

    #[tokio::test]
    async fn nothing_listening_is_a_definite_error_naming_the_address() {
        let started = Instant::now();
        let error = await_broker(
            &settings("127.0.0.1:1"),
            Duration::from_secs(1),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "bounded wait");
        assert!(matches!(error, Error::KafkaUnreachable { .. }), "{error:?}");
        assert!(!error.is_retryable());
        let line = error.to_string();
        assert!(line.contains("127.0.0.1:1 within 1 s"), "{line}");
    }

    #[tokio::test]
    async fn a_stop_during_the_check_ends_it() {
        let stop = CancellationToken::new();
        stop.cancel();
        let probe = await_broker(&settings("127.0.0.1:1"), Duration::from_secs(60), &stop)
            .await
            .unwrap();
        assert_eq!(probe, Probe::Stopped);
    }
}
