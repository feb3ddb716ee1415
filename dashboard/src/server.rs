//! HTTP routes: the page, its event stream, the JSON API and `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::Stream;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::watch;

use crate::collector::{Stats, now_ms};
use crate::error::chain;
use crate::history::History;
use crate::snapshot;
use crate::store::Store;

/// The page, embedded at build time: no CDN, no external asset.
const PAGE: &str = include_str!("page.html");

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Redis access for `/api/metrics`.
    pub store: Arc<Store>,
    /// The newest frame (`{"metrics":..,"health":..}`).
    pub frames: watch::Receiver<Arc<str>>,
    /// The open-stream gauge among them.
    pub stats: Arc<Stats>,
    /// The dashboard's metrics, for `/metrics`.
    pub registry: Arc<Registry>,
    /// The warehouse, for `/api/history`.
    pub history: Arc<History>,
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/metrics", get(api_metrics))
        .route("/api/health", get(api_health))
        .route("/api/stream", get(api_stream))
        .route("/api/history", get(api_history))
        .route("/metrics", get(own_metrics))
        .with_state(state)
}

fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

/// The metrics read from Redis now (not the last tick), so `curl` can be
/// compared with `redis-cli` directly.
async fn api_metrics(State(state): State<AppState>) -> Response {
    let now = now_ms();
    match state.store.read(now).await {
        Ok(values) => json_response(StatusCode::OK, snapshot::assemble(&values, now).to_string()),
        Err(err) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": chain(&err)}).to_string(),
        ),
    }
}

/// The pipeline state of the last tick.
async fn api_health(State(state): State<AppState>) -> Response {
    let frame = state.frames.borrow().clone();
    let health = serde_json::from_str::<serde_json::Value>(&frame)
        .ok()
        .map(|v| v["health"].clone())
        .filter(|h| !h.is_null());
    match health {
        Some(h) => json_response(StatusCode::OK, h.to_string()),
        None => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"state": "red", "reasons": ["dashboard starting: no reading yet"]}).to_string(),
        ),
    }
}

/// The historical view from the warehouse, read now; `?product=ID` picks
/// the product whose price history is shown. Without a warehouse:
/// `{"error": ...}`.
async fn api_history(State(state): State<AppState>, uri: axum::http::Uri) -> Response {
    let product = uri.query().and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix("product="))
            .and_then(|v| v.parse::<i64>().ok())
    });
    match state.history.read(product).await {
        Ok(value) => json_response(StatusCode::OK, value.to_string()),
        // 200 with the reason: the warehouse is optional, and the page
        // shows "no data" instead of logging a failed load.
        Err(err) => json_response(StatusCode::OK, json!({"error": chain(&err)}).to_string()),
    }
}

/// Decrements the subscriber gauge when a stream ends.
#[derive(Debug)]
struct ClientGuard(Arc<Stats>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.stream_clients.dec();
    }
}

/// Server-sent events: the newest frame at once, then each new one.
async fn api_stream(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    state.stats.stream_clients.inc();
    let guard = ClientGuard(state.stats.clone());
    let mut frames = state.frames;
    frames.mark_changed();
    let stream = futures_util::stream::unfold((frames, guard), |(mut frames, guard)| async move {
        // Ends when the collector stops (shutdown): the sender is dropped.
        // The initial value is empty until the first tick.
        let frame = loop {
            frames.changed().await.ok()?;
            let frame = frames.borrow_and_update().clone();
            if !frame.is_empty() {
                break frame;
            }
        };
        let event = Event::default().event("snapshot").data(&*frame);
        Some((Ok(event), (frames, guard)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Prometheus text about the dashboard itself.
async fn own_metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
        local_stack::exposition::render(&state.registry),
    )
        .into_response()
}
