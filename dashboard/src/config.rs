//! Command-line flags and environment variables; `--help` is built from these
//! doc comments.

use std::net::SocketAddr;

use clap::Parser;

/// InstaShop CDC dashboard: live KPIs, charts and pipeline health, read from
/// the metrics in Redis and the Prometheus endpoints of cdc-reader and
/// metrics-consumer. Open the printed URL in a browser.
#[derive(Debug, Clone, Parser)]
#[command(name = "dashboard", version, about)]
pub struct Config {
    /// Address to serve the page and the API on.
    #[arg(long, env = "DASHBOARD_LISTEN", default_value = "127.0.0.1:9480")]
    pub listen: SocketAddr,

    /// Redis holding the metrics written by the metrics-consumer.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:63790/0")]
    pub redis_url: String,

    /// Prefix of the metric keys in Redis (the same variable as the
    /// metrics-consumer's `--prefix`).
    #[arg(long, env = "METRICS_PREFIX", default_value = "metrics:")]
    pub key_prefix: String,

    /// Prometheus endpoint of the cdc-reader (replication lag per database).
    #[arg(
        long,
        env = "DASHBOARD_READER_METRICS_URL",
        default_value = "http://127.0.0.1:9472/metrics"
    )]
    pub reader_metrics_url: String,

    /// Prometheus endpoint of the metrics-consumer (consumer lag, DLQ count).
    #[arg(
        long,
        env = "DASHBOARD_CONSUMER_METRICS_URL",
        default_value = "http://127.0.0.1:9473/metrics"
    )]
    pub consumer_metrics_url: String,

    /// The data warehouse written by dwh-sink, for the historical view
    /// (empty turns the view off).
    #[arg(
        long,
        env = "DWH_URL",
        default_value = "postgres://dwh_sink:dwh_sink@127.0.0.1:54329/dwh"
    )]
    pub dwh_url: String,

    /// Milliseconds between two snapshots pushed to open pages.
    #[arg(long, env = "DASHBOARD_INTERVAL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub interval_ms: u64,
}
