//! The dashboard's one error type, grouped by what the caller does next.

/// Everything that can go wrong in the dashboard.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- Configuration: fix the flag or environment variable and restart. ---
    /// The listen address is taken or not ours.
    #[error(
        "cannot listen on {addr}: is another dashboard running? choose another address with --listen or DASHBOARD_LISTEN"
    )]
    Listen {
        /// The address from the config.
        addr: std::net::SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// `REDIS_URL` does not parse.
    #[error(
        "invalid redis url {url}: expected redis://host:port/db (flag --redis-url or REDIS_URL)"
    )]
    RedisUrl {
        /// The URL, password redacted.
        url: String,
        /// The parse error.
        #[source]
        source: redis::RedisError,
    },
    /// A metrics URL that the built-in HTTP GET cannot fetch.
    #[error("invalid metrics url {url}: expected http://host:port/path (https is not supported)")]
    MetricsUrl {
        /// The URL as given.
        url: String,
    },

    // --- Transient: shown as a red state, retried on the next tick. ---
    /// Redis refused, timed out or dropped the connection.
    #[error("redis at {url} unavailable")]
    Redis {
        /// The URL, password redacted.
        url: String,
        /// The client error.
        #[source]
        source: redis::RedisError,
    },
    /// A metrics endpoint could not be reached.
    #[error("cannot fetch {url}")]
    Scrape {
        /// The endpoint.
        url: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// A metrics endpoint did not answer in time.
    #[error("{url} did not answer in time")]
    ScrapeTimeout {
        /// The endpoint.
        url: String,
    },

    // --- Bad data: shown, the rest of the page keeps working. ---
    /// A metrics endpoint answered, but not with a 200 HTTP response.
    #[error("{url} answered {}", status.map_or_else(|| "something that is not HTTP".to_owned(), |s| format!("HTTP {s}")))]
    ScrapeResponse {
        /// The endpoint.
        url: String,
        /// Its status code, when the response parsed.
        status: Option<u16>,
    },
    /// A Redis key holds a value of an unexpected type.
    #[error("redis key {key} holds an unexpected value: was it written by the metrics-consumer?")]
    RedisValue {
        /// The key.
        key: String,
        /// The conversion error.
        #[source]
        source: redis::ParsingError,
    },

    // --- Fatal while serving. ---
    /// The HTTP server stopped with an IO error.
    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),
}

/// The error and its causes on one line (`a: b: c`), for health reasons and
/// JSON error bodies.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
