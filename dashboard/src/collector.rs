//! The once-a-second tick: read Redis, scrape the two Prometheus endpoints,
//! judge health, and publish one JSON frame that every open page receives.
//!
//! The frame goes into a `watch` channel: a slow page only ever sees the
//! newest frame, never a backlog. The sender lives in this task alone, so when
//! shutdown stops the loop every event stream ends and the server can drain.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::chain;
use crate::health::{self, Observed, Thresholds};
use crate::pipeline;
use crate::prometheus;
use crate::scrape;
use crate::snapshot;
use crate::store::Store;

/// Timeout of one scrape; shorter than the tick.
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(700);

/// A gauge holding a float (seconds).
type FloatGauge = Gauge<f64, AtomicU64>;

/// The dashboard's own metrics, for its `/metrics`: `prometheus-client`
/// counters and gauges, encoded by [`local_stack::exposition`].
#[derive(Debug, Default)]
pub struct Stats {
    /// Ticks completed.
    pub ticks: Counter,
    /// Ticks whose Redis read failed.
    pub redis_errors: Counter,
    /// Failed scrapes of the reader's endpoint.
    pub reader_errors: Counter,
    /// Failed scrapes of the consumer's endpoint.
    pub consumer_errors: Counter,
    /// Current event-stream subscribers.
    pub stream_clients: Gauge,
    /// Pipeline state of the last tick (0 green, 1 amber, 2 red).
    pub state: Gauge,
    /// Duration of the last tick in seconds.
    pub last_tick_seconds: FloatGauge,
}

impl Stats {
    /// The metrics as a registry for `/metrics` (counters without their
    /// `_total`, which the encoder adds).
    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        let up = Gauge::<i64>::default();
        up.set(1);
        r.register("dashboard_up", "1 while the dashboard serves", up);
        for (name, help, counter) in [
            (
                "dashboard_ticks",
                "Snapshots collected and pushed to pages",
                &self.ticks,
            ),
            (
                "dashboard_redis_errors",
                "Ticks whose Redis read failed",
                &self.redis_errors,
            ),
            (
                "dashboard_reader_scrape_errors",
                "Failed scrapes of the cdc-reader's /metrics",
                &self.reader_errors,
            ),
            (
                "dashboard_consumer_scrape_errors",
                "Failed scrapes of the metrics-consumer's /metrics",
                &self.consumer_errors,
            ),
        ] {
            r.register(name, help, counter.clone());
        }
        r.register(
            "dashboard_stream_clients",
            "Open /api/stream connections (pages showing the dashboard)",
            self.stream_clients.clone(),
        );
        r.register(
            "dashboard_pipeline_state",
            "Pipeline state of the last tick: 0 green, 1 amber, 2 red",
            self.state.clone(),
        );
        r.register(
            "dashboard_tick_duration_seconds",
            "Duration of the last tick (Redis read and both scrapes)",
            self.last_tick_seconds.clone(),
        );
        r
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A previous counter reading, for rates.
#[derive(Debug, Clone, Copy)]
struct Previous {
    value: f64,
    at: Instant,
}

/// Runs ticks until `shutdown`; publishes each frame on `frames`.
pub async fn run(
    config: Arc<Config>,
    store: Arc<Store>,
    stats: Arc<Stats>,
    frames: watch::Sender<Arc<str>>,
    shutdown: CancellationToken,
) {
    let thresholds = Thresholds::default();
    let mut previous: Option<Previous> = None;
    let mut activity = pipeline::Activity::default();
    let mut interval = tokio::time::interval(Duration::from_millis(config.interval_ms));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let started = Instant::now();
        let frame = tick(
            &config,
            &store,
            &stats,
            &thresholds,
            &mut previous,
            &mut activity,
        )
        .await;
        stats.ticks.inc();
        stats.last_tick_seconds.set(started.elapsed().as_secs_f64());
        frames.send_replace(Arc::from(frame.to_string()));
    }
}

async fn tick(
    config: &Config,
    store: &Store,
    stats: &Stats,
    thresholds: &Thresholds,
    previous: &mut Option<Previous>,
    activity: &mut pipeline::Activity,
) -> Value {
    let now = now_ms();
    let (redis, reader, consumer) = tokio::join!(
        store.read(now),
        scrape::get(&config.reader_metrics_url, SCRAPE_TIMEOUT),
        scrape::get(&config.consumer_metrics_url, SCRAPE_TIMEOUT),
    );
    let mut obs = Observed::default();
    let metrics = match redis {
        Ok(values) => snapshot::assemble(&values, now),
        Err(err) => {
            stats.redis_errors.inc();
            tracing::debug!(error = %chain(&err), "redis read failed");
            obs.redis_error = Some(chain(&err));
            Value::Null
        }
    };
    obs.last_event_age_ms = metrics["last_event_age_ms"].as_i64();
    match reader {
        Ok(text) => {
            let mut reading = pipeline::reader(&prometheus::parse(&text), now as f64 / 1000.0);
            activity.observe(&mut reading, now);
            obs.reader = Some(reading);
        }
        Err(err) => {
            stats.reader_errors.inc();
            obs.reader_error = Some(chain(&err));
        }
    }
    match consumer {
        Ok(text) => obs.consumer = Some(pipeline::consumer(&prometheus::parse(&text))),
        Err(err) => {
            stats.consumer_errors.inc();
            obs.consumer_error = Some(chain(&err));
        }
    }

    // Events per second: the consumer's applied counter, else the pipeline
    // hash's count in Redis.
    let applied = obs
        .consumer
        .as_ref()
        .and_then(|c| c.events_applied)
        .or_else(|| {
            metrics["pipeline"]
                .as_object()
                .and_then(|p| p.iter().find(|(k, _)| k.contains("applied")))
                .and_then(|(_, v)| v.as_f64())
        });
    let at = Instant::now();
    let events_per_second = previous.and_then(|p| {
        pipeline::rate(
            Some(p.value),
            applied,
            at.duration_since(p.at).as_secs_f64(),
        )
    });
    *previous = applied.map(|value| Previous { value, at });

    obs.bad_keys = metrics["bad_keys"]
        .as_array()
        .map(|keys| {
            keys.iter()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let verdict = health::evaluate(&obs, thresholds);
    stats.state.set(i64::from(verdict.state.as_number()));
    let health = json!({
        "state": verdict.state.as_str(),
        "reasons": verdict.reasons,
        "generated_at_ms": now,
        "sources": pipeline::sources_json(obs.reader.as_ref()),
        "consumer": pipeline::consumer_json(obs.consumer.as_ref(), events_per_second),
        "last_event_age_ms": obs.last_event_age_ms,
        "endpoints": {
            "redis": {"ok": obs.redis_error.is_none(), "error": obs.redis_error},
            "reader": {"ok": obs.reader.is_some(), "url": config.reader_metrics_url, "error": obs.reader_error},
            "consumer": {"ok": obs.consumer.is_some(), "url": config.consumer_metrics_url, "error": obs.consumer_error},
        },
    });
    json!({"metrics": metrics, "health": health})
}
