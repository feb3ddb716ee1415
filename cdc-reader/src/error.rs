//! The reader's one error type, grouped by what the caller does next.
//!
//! - retry: [`Error::Connect`], [`Error::Replication`], [`Error::Kafka`] — the
//!   source pipeline reconnects with backoff and resumes from the slot;
//! - fix and restart: [`Error::Config`], [`Error::Setup`] — the message says
//!   exactly what to change; the process exits non-zero;
//! - [`Error::BadData`]: a value the reader cannot represent; never skipped
//!   silently (stop, so nothing is confirmed past it);
//! - [`Error::KafkaFatal`]: the producer is unusable; re-create it and resend
//!   from the last confirmed LSN.
//!
//! Causes are kept as `#[source]`/`String` details, never passwords.

use std::io;

/// Every failure of the reader.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid configuration (flags, env variables).
    #[error("configuration: {0}")]
    Config(String),

    /// Could not connect or authenticate; retryable unless the message says
    /// the password is wrong.
    #[error("connect to {target}: {message}")]
    Connect {
        /// Where (password redacted).
        target: String,
        /// What went wrong.
        message: String,
    },

    /// The replication connection failed or the server sent an error; retryable.
    #[error("replication: {0}")]
    Replication(String),

    /// The database is not set up for CDC; the message says how to fix it.
    #[error("{0}")]
    Setup(String),

    /// Malformed protocol data or a value that cannot be represented.
    #[error("bad data: {0}")]
    BadData(String),

    /// Kafka unavailable or a delivery failed; retryable.
    #[error("kafka: {0}")]
    Kafka(String),

    /// The Kafka producer hit a fatal error; re-create it and resend.
    #[error("kafka (fatal): {0}")]
    KafkaFatal(String),

    /// Local IO (metrics listener, sockets).
    #[error("io: {context}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Whether the source pipeline should reconnect and try again.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. } | Error::Replication(_) | Error::Kafka(_) | Error::KafkaFatal(_)
        )
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => Error::Replication(format!("{}: {}", db.code().code(), db.message())),
            None => Error::Replication(e.to_string()),
        }
    }
}
