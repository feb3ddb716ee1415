//! InstaShop CDC dashboard: one self-contained page with the shop KPIs, charts
//! and the pipeline's health, pushed live over server-sent events, plus the
//! same numbers as JSON and the dashboard's own Prometheus metrics.
//!
//! Data comes from two places: the metric keys the metrics-consumer keeps in
//! Redis, and the Prometheus endpoints of the cdc-reader and the
//! metrics-consumer (lag, DLQ). Either may be missing or down: the page then
//! says "no data" and turns red, and the dashboard keeps serving.
//!
//! Pure parts (`prometheus`, `snapshot`, `pipeline`, `health`, the HTTP
//! decoding in `scrape`) are unit-tested; `collector`, `store` and `server`
//! are the thin IO around them.

pub mod collector;
pub mod config;
pub mod error;
pub mod health;
pub mod history;
pub mod pipeline;
pub mod prometheus;
pub mod scrape;
pub mod server;
pub mod snapshot;
pub mod store;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::Error;

/// Binds `config.listen` and serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: config.listen,
            source,
        })?;
    serve(listener, config, shutdown).await
}

/// Serves on an already bound listener (tests bind port 0) until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    scrape::target(&config.reader_metrics_url)?;
    scrape::target(&config.consumer_metrics_url)?;
    let store = Arc::new(store::Store::new(&config.redis_url, &config.key_prefix)?);
    let stats = Arc::new(collector::Stats::default());
    let (sender, frames) = watch::channel(Arc::<str>::from(""));
    let config = Arc::new(config);

    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            url = %format!("http://{addr}/"),
            redis = %local_stack::redact::url(&config.redis_url),
            prefix = %config.key_prefix,
            "dashboard listening"
        );
    }
    let collector = tokio::spawn(collector::run(
        config.clone(),
        store.clone(),
        stats.clone(),
        sender,
        shutdown.clone(),
    ));
    let app = server::router(server::AppState {
        history: Arc::new(history::History::new(&config.dwh_url)),
        store,
        frames,
        registry: Arc::new(stats.registry()),
        stats,
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .map_err(Error::Serve);
    shutdown.cancel();
    let _ = collector.await;
    tracing::info!("dashboard stopped");
    served
}
