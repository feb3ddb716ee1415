//! `/metrics` and `/health` of every binary: a `prometheus-client` registry
//! encoded in the Prometheus text format (version 0.0.4, what the dashboard
//! and Grafana's Prometheus read), served by axum.
//!
//! Each binary registers its own metrics; this module only encodes and
//! serves them, so there is one exporter and one HTTP server in the tree.
//! Counters are registered without their `_total` suffix: the encoder adds
//! it, so the exported names stay `cdc_events_total` and so on.

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::get;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// A binary's `/health` answer: healthy (200) or not (503), and a body.
pub type Health = Arc<dyn Fn() -> (bool, String) + Send + Sync>;

/// The registry's text exposition.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(4096);
    // Writing into a String cannot fail; an encoder error would only drop
    // the rest of the page.
    if prometheus_text::encode(&mut out, registry).is_err() {
        tracing::warn!("metrics encoding stopped early");
    }
    out
}

/// Serves `GET /metrics` (and `GET /health` when `health` is given) on
/// `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    health: Option<Health>,
    shutdown: CancellationToken,
) {
    let mut app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
                    render(&registry),
                )
            }
        }),
    );
    if let Some(health) = health {
        app = app.route(
            "/health",
            get(move || {
                let health = health.clone();
                async move {
                    let (ok, body) = health();
                    let code = if ok {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (code, body)
                }
            }),
        );
    }
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "metrics server stopped");
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn counters_get_their_total_suffix_once() {
        let mut registry = Registry::default();
        let counter: Counter = Counter::default();
        registry.register("cdc_events", "Change events", counter.clone());
        counter.inc_by(3);
        let text = render(&registry);
        assert!(text.contains("# TYPE cdc_events_total counter\n"), "{text}");
        assert!(text.contains("\ncdc_events_total 3\n"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }
}
