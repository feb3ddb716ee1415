//! What the binaries ask Kafka itself: the startup check that a broker
//! answers ([`await_broker`]), and how far a consumer is behind the high
//! watermarks ([`lag`]).
//!
//! librdkafka never fails on an unreachable bootstrap address: it reports
//! `AllBrokersDown` and retries forever. That is right for an outage of a
//! cluster that was reachable (the reader and the consumer stall and
//! resume), but it turns a mistyped address into an endless stream of
//! warnings. So before any other work each binary asks for the cluster's
//! metadata with the settings its own clients use (security included),
//! polling until a deadline; a cluster that never answers is a definite
//! error, which each binary words with its own flag names.

pub mod lag;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The longest single metadata request: a stop asked for during the check
/// waits at most this long for the blocking call to return.
const ATTEMPT: Duration = Duration::from_secs(1);

/// Pause between attempts that failed at once (connection refused).
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Client context of the probe: its connection failures are expected while
/// polling and end in one error, and the settings of another client kind
/// (the reader's producer properties) draw librdkafka warnings, so both are
/// logged at debug level only.
struct ProbeContext;

impl ClientContext for ProbeContext {
    fn log(&self, _level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        tracing::debug!(facility = fac, "kafka startup probe: {log_message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(error = %error, reason, "kafka startup probe");
    }
}

impl ConsumerContext for ProbeContext {}

/// What the startup check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// A metadata response listed this many brokers.
    Answered(usize),
    /// A stop was asked for before any broker answered.
    Stopped,
}

/// Why the check failed; both are definite (retrying cannot help).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No broker answered within the timeout: a wrong address or a cluster
    /// that is not running.
    #[error(
        "no Kafka broker answered at {servers} within {} s: check {flag} / KAFKA_BOOTSTRAP_SERVERS (scripts/up writes .local/env) and that the brokers run (scripts/status)",
        waited.as_secs()
    )]
    Unreachable {
        /// The bootstrap servers that were tried.
        servers: String,
        /// The caller's flag that names them, for the hint.
        flag: &'static str,
        /// How long the check waited.
        waited: Duration,
        /// The last failed metadata request, if one failed rather than
        /// timing out.
        #[source]
        source: Option<KafkaError>,
    },
    /// The settings do not make a client (a bad property).
    #[error("kafka client for {servers}: check the Kafka settings ({flag}, --kafka-property)")]
    Client {
        /// The bootstrap servers of the settings.
        servers: String,
        /// The caller's flag that names them, for the hint.
        flag: &'static str,
        /// librdkafka's refusal.
        #[source]
        source: KafkaError,
    },
}

/// Polls the cluster of `settings` (a client configuration holding
/// `bootstrap.servers`) with metadata requests until a broker answers,
/// `timeout` passes ([`ProbeError::Unreachable`]) or `stop` is cancelled.
/// `flag` is the caller's option naming the bootstrap servers, so the error
/// line says what to fix in the caller's own words.
pub async fn await_broker(
    settings: &ClientConfig,
    timeout: Duration,
    stop: &CancellationToken,
    flag: &'static str,
) -> Result<Probe, ProbeError> {
    let servers = settings
        .get("bootstrap.servers")
        .unwrap_or_default()
        .to_owned();
    let probe: BaseConsumer<ProbeContext> =
        settings
            .create_with_context(ProbeContext)
            .map_err(|source| ProbeError::Client {
                servers: servers.clone(),
                flag,
                source,
            })?;
    let probe = Arc::new(probe);
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(ProbeError::Unreachable {
                servers,
                flag,
                waited: timeout,
                source: last_error,
            });
        }
        let attempt = remaining.min(ATTEMPT);
        let client = Arc::clone(&probe);
        let fetch = tokio::task::spawn_blocking(move || {
            client
                .fetch_metadata(None, attempt)
                .map(|m| m.brokers().len())
        });
        let started = Instant::now();
        let result = tokio::select! {
            () = stop.cancelled() => return Ok(Probe::Stopped),
            // A panicked or cancelled blocking task counts as a failed attempt.
            joined = fetch => joined.unwrap_or(Ok(0)),
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

    const FLAG: &str = "--bootstrap-servers";

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
            FLAG,
        )
        .await
        .unwrap();
        assert_eq!(probe, Probe::Answered(3));
    }

    #[tokio::test]
    async fn producer_settings_make_a_probe_too() {
        let mock = MockCluster::new(1).unwrap();
        let mut s = settings(&mock.bootstrap_servers());
        s.set("acks", "all").set("enable.idempotence", "true");
        let probe = await_broker(&s, Duration::from_secs(10), &CancellationToken::new(), FLAG)
            .await
            .unwrap();
        assert_eq!(probe, Probe::Answered(1));
    }

    #[tokio::test]
    async fn nothing_listening_is_an_error_naming_the_address() {
        let started = Instant::now();
        let error = await_broker(
            &settings("127.0.0.1:1"),
            Duration::from_secs(1),
            &CancellationToken::new(),
            FLAG,
        )
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "bounded wait");
        assert!(matches!(error, ProbeError::Unreachable { .. }), "{error:?}");
        let line = error.to_string();
        assert!(line.contains("127.0.0.1:1 within 1 s"), "{line}");
        assert!(line.contains("check --bootstrap-servers"), "{line}");
    }

    #[tokio::test]
    async fn a_stop_during_the_check_ends_it() {
        let stop = CancellationToken::new();
        stop.cancel();
        let probe = await_broker(
            &settings("127.0.0.1:1"),
            Duration::from_secs(60),
            &stop,
            FLAG,
        )
        .await
        .unwrap();
        assert_eq!(probe, Probe::Stopped);
    }
}
