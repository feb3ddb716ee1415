//! The generator's errors, grouped by what the caller does next.

use crate::model::IdsExhausted;

/// Everything that stops the generator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Configuration or environment: a database cannot be reached at start.
    /// Fix the URL or start the stack (`scripts/up`), then run again.
    #[error(
        "cannot connect to database {database} at {url} (start the stack with scripts/up, or set {var})"
    )]
    Connect {
        /// Database name.
        database: &'static str,
        /// URL with the password hidden.
        url: String,
        /// Environment variable holding the URL.
        var: &'static str,
        /// Driver error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// Configuration: a URL that does not parse.
    #[error("the URL of database {database} is invalid: {url} (set {var})")]
    BadUrl {
        /// Database name.
        database: &'static str,
        /// URL with the password hidden.
        url: String,
        /// Environment variable holding the URL.
        var: &'static str,
        /// Driver error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// Configuration: the metrics endpoint cannot listen.
    #[error(
        "cannot serve metrics on {addr} (pick another --metrics-addr, or an empty one to turn it off)"
    )]
    Metrics {
        /// Address asked for.
        addr: std::net::SocketAddr,
        /// Bind error.
        #[source]
        source: std::io::Error,
    },

    /// Bad data or bad schema: the database refused SQL that is not about
    /// connectivity. Retrying would fail the same way.
    #[error(
        "database {database} rejected the generator's {what} (was the schema changed by hand? compare with sql/{database}.sql)"
    )]
    Rejected {
        /// Database name.
        database: &'static str,
        /// What was being done.
        what: &'static str,
        /// Server error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// Stopped (Ctrl-C) while a database was down: the batch in hand was not written.
    #[error("stopped while database {database} was unavailable; its last batch was not written")]
    StoppedWhileUnavailable {
        /// Database name.
        database: &'static str,
    },

    /// A bug: the id pool was sized too small.
    #[error("internal error, please report it")]
    Ids(#[from] IdsExhausted),

    /// A bug: a writer task ended unexpectedly.
    #[error("internal error: the {0} writer stopped unexpectedly")]
    WriterGone(&'static str),
}
