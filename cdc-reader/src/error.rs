//! The reader's one error type, grouped by what the caller does next.
//!
//! - retry (reconnect with backoff, resume from the slot):
//!   [`Error::Connect`], [`Error::Network`], [`Error::Replication`], [`Error::Kafka`],
//!   [`Error::KafkaFatal`] (re-create the producer and resend from the last
//!   confirmed LSN), and [`Error::Postgres`] / [`Error::Server`] whose
//!   SQLSTATE is transient (connection loss, shutdown, too many clients);
//! - definite (one clear line, exit non-zero; retrying cannot help):
//!   [`Error::Config`], [`Error::Setup`], [`Error::BadData`],
//!   [`Error::MissingKey`], [`Error::TooLarge`], [`Error::Io`],
//!   [`Error::Fenced`] (another reader took over the slot's Kafka transactions),
//!   [`Error::KafkaProbe`] (at startup only: once running, a broker
//!   outage is [`Error::Kafka`] and retried), and
//!   [`Error::Postgres`] / [`Error::Server`] with a definite SQLSTATE (see
//!   [`sqlstate_is_definite`]: missing privilege 42501, missing table 42P01,
//!   authentication, ...).
//!
//! Causes are kept as `#[source]`, never formatted into the message, never
//! passwords or row values (a key is named only where the user must find
//! the row, as in [`Error::TooLarge`]).

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

    /// Reading from or writing to the server's socket failed; retryable.
    #[error("{context}")]
    Network {
        /// What was being done, and with which server.
        context: String,
        /// Cause.
        #[source]
        source: io::Error,
    },

    /// Kafka unavailable or a delivery failed; retryable.
    #[error("kafka: {0}")]
    Kafka(String),

    /// The Kafka producer hit a fatal error; re-create it and resend.
    #[error("kafka (fatal): {0}")]
    KafkaFatal(String),

    /// A query on an ordinary SQL session failed; retried or not by its SQLSTATE.
    #[error("postgres: {context}")]
    Postgres {
        /// What was being done.
        context: String,
        /// Cause (carries the SQLSTATE).
        #[source]
        source: tokio_postgres::Error,
    },

    /// The server refused a replication command or ended the stream with an
    /// ErrorResponse; retried or not by its SQLSTATE.
    #[error("{context}")]
    Server {
        /// What was being done.
        context: String,
        /// The server's error.
        #[source]
        source: crate::replication::ServerError,
    },

    /// A change of a table whose key columns are unknown: the table was
    /// dropped (or its key changed) before its changes were decoded and this
    /// process never saw its key. Sending it without a key would break per-key order.
    #[error(
        "table {table} (oid {oid}) was dropped, or its primary key changed, before its remaining changes were decoded, and this reader never saw the primary key they were written with, so those events cannot be keyed: drop slot \"{slot}\" and start the reader again to take a new snapshot"
    )]
    MissingKey {
        /// `schema.table` as the Relation message named it.
        table: String,
        /// Relation OID.
        oid: u32,
        /// The source's slot.
        slot: String,
    },

    /// An event larger than Kafka accepts: it can never be delivered.
    #[error(
        "event of {table} with key {key} is {bytes} bytes, more than Kafka accepts ({limit}): raise the brokers' message.max.bytes and the topic's max.message.bytes, and the reader's producer message.max.bytes (--kafka-property message.max.bytes=N)"
    )]
    TooLarge {
        /// Topic (`<prefix>.<schema>.<table>`).
        table: String,
        /// Key JSON (`null` when the record has none).
        key: String,
        /// Size of key plus value.
        bytes: usize,
        /// The limit that refused it.
        limit: String,
    },

    /// Another reader took over this source's `transactional.id` (the same
    /// slot): this one was fenced by Kafka and must stop, or both would write.
    #[error(
        "source {source_name}: another reader on slot \"{slot}\" took over its kafka transactions (transactional.id \"{transactional_id}\") and fenced this one; this reader stops: run one reader per slot"
    )]
    Fenced {
        /// The source.
        source_name: String,
        /// Its slot.
        slot: String,
        /// The fenced `transactional.id`.
        transactional_id: String,
    },

    /// The startup check found no Kafka broker answering, or the Kafka
    /// settings make no client. Checked before any other work, never
    /// retried; once running, an outage is transient.
    #[error(transparent)]
    KafkaProbe(#[from] Box<kafka_probe::ProbeError>),

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
        match self {
            Error::Connect { .. }
            | Error::Network { .. }
            | Error::Replication(_)
            | Error::Kafka(_)
            | Error::KafkaFatal(_) => true,
            Error::Postgres { source, .. } => source
                .code()
                .is_none_or(|code| !sqlstate_is_definite(code.code())),
            Error::Server { source, .. } => !sqlstate_is_definite(&source.code),
            Error::Config(_)
            | Error::Setup(_)
            | Error::BadData(_)
            | Error::MissingKey { .. }
            | Error::TooLarge { .. }
            | Error::Fenced { .. }
            | Error::KafkaProbe(_)
            | Error::Io { .. } => false,
        }
    }

    /// A Postgres error with what was being done.
    pub fn postgres(context: impl Into<String>, source: tokio_postgres::Error) -> Self {
        Error::Postgres {
            context: context.into(),
            source,
        }
    }
}

/// Whether a SQLSTATE means retrying cannot succeed until someone changes
/// something: privileges, objects, authentication, configuration. Everything
/// else (connection exceptions 08, operator intervention 57 such as a
/// server shutdown, insufficient resources 53, serialization failures 40,
/// internal errors) is worth a reconnect.
pub fn sqlstate_is_definite(code: &str) -> bool {
    matches!(
        code.get(..2),
        // 0A feature not supported, 28 invalid authorization, 3D invalid
        // catalog (no such database), 42 syntax or access rule (42501
        // insufficient privilege, 42P01 undefined table, ...).
        Some("0A" | "28" | "3D" | "42")
    ) || matches!(
        code,
        // object not in prerequisite state (e.g. a slot that can no longer
        // be read, wal_level too low), program limit exceeded.
        "55000" | "54000"
    )
}

impl From<tokio_postgres::Error> for Error {
    fn from(source: tokio_postgres::Error) -> Self {
        Error::postgres("query", source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::ServerError;

    fn server(code: &str) -> Error {
        Error::Server {
            context: "replication stream".into(),
            source: ServerError {
                code: code.into(),
                message: "m".into(),
                detail: None,
                hint: None,
            },
        }
    }

    #[test]
    fn definite_sqlstates_end_transient_ones_retry() {
        for code in [
            "42501", "42P01", "42704", "28P01", "28000", "3D000", "0A000", "55000",
        ] {
            assert!(sqlstate_is_definite(code), "{code}");
            assert!(!server(code).is_retryable(), "{code}");
        }
        for code in [
            "57P01", "57P03", "08006", "53300", "40001", "XX000", "58P01",
        ] {
            assert!(!sqlstate_is_definite(code), "{code}");
            assert!(server(code).is_retryable(), "{code}");
        }
    }

    #[test]
    fn grouping_by_what_happens_next() {
        assert!(Error::Replication("x".into()).is_retryable());
        assert!(Error::Kafka("x".into()).is_retryable());
        assert!(!Error::Setup("x".into()).is_retryable());
        let too_large = Error::TooLarge {
            table: "db.public.doc".into(),
            key: "{\"id\":1}".into(),
            bytes: 20_000_000,
            limit: "message.max.bytes 17825792".into(),
        };
        assert!(!too_large.is_retryable());
        let line = too_large.to_string();
        for needle in [
            "db.public.doc",
            "{\"id\":1}",
            "20000000",
            "message.max.bytes",
        ] {
            assert!(line.contains(needle), "{line} lacks {needle}");
        }
    }

    #[test]
    fn the_cause_is_a_source_not_part_of_the_message() {
        let e = server("42501");
        assert_eq!(e.to_string(), "replication stream");
        let cause = std::error::Error::source(&e).map(ToString::to_string);
        assert_eq!(cause.as_deref(), Some("m (42501)"));
    }
}
