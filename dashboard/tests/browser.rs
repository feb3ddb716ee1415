//! The dashboard in a real browser: Debian's headless Chromium, driven over
//! the DevTools protocol by `tests/browser/cdp.mjs` (Node, no npm package).
//!
//! `page_shows_redis_values_and_follows_them_live` needs only Redis from the
//! local stack: it writes the metric keys itself under a unique prefix, serves
//! stand-in reader and consumer `/metrics`, and runs its own dashboard on a
//! free port. `real_pipeline_*` (ignored by default; `scripts/browser-test`
//! runs it with the generator, reader and consumer running) checks the page
//! against the real `metrics:` keys while data flows.
//!
//! Chromium is installed with `apt-get install -y chromium` when missing.
//! Screenshots go to `.local/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio_util::sync::CancellationToken;

/// The KPIs on the page (`data-kpi`), in display order.
const KPIS: [&str; 7] = [
    "purchases",
    "revenue_total_cents",
    "revenue_today_cents",
    "shops",
    "buyers",
    "products",
    "shipments_in_transit",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn redis_url() -> String {
    local_stack::envfile::load();
    std::env::var("REDIS_URL").unwrap_or_else(|_| {
        panic!(
            "REDIS_URL is not set and there is no .local/env: start the local stack with scripts/up"
        )
    })
}

fn now_ms() -> i64 {
    dashboard::collector::now_ms()
}

/// `/usr/bin/chromium` (or `$CHROMIUM`), installed from Debian when missing.
fn chromium() -> PathBuf {
    let path =
        PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    if path.exists() {
        return path;
    }
    eprintln!("chromium missing: apt-get install -y chromium");
    let install = || {
        std::process::Command::new("apt-get")
            .args(["install", "-y", "-qq", "chromium"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = std::process::Command::new("apt-get")
            .args(["update", "-qq"])
            .status();
        install();
    }
    assert!(
        path.exists(),
        "{} is missing and apt-get could not install it: run `apt-get install -y chromium` as root",
        path.display()
    );
    path
}

/// The Node driver around one Chromium.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Browser {
    async fn start() -> Browser {
        let chromium = chromium();
        let script = repo_root().join("dashboard/tests/browser/cdp.mjs");
        // scripts/lib/common.sh (ensure_browser_driver) picks the flags that
        // give this machine's node a WebSocket.
        let flags = std::env::var("INSTASHOP_NODE_FLAGS")
            .unwrap_or_else(|_| "--no-warnings --experimental-websocket".to_owned());
        let mut child = Command::new("node")
            .args(flags.split_whitespace())
            .arg(&script)
            .arg(&chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run node (Node.js 20+ is needed for the browser driver): {e}")
            });
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut browser = Browser {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        };
        let ready = browser.read_reply().await;
        assert_eq!(ready, json!("ready"), "browser driver did not start");
        browser
    }

    async fn read_reply(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
            .await
            .expect("browser driver did not answer within 60 s")
            .expect("reading the browser driver")
            .expect("browser driver exited");
        let reply: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("driver said {line:?}: {e}"));
        assert_eq!(
            reply["ok"],
            json!(true),
            "browser command failed: {}",
            reply["error"]
        );
        reply["value"].clone()
    }

    async fn call(&mut self, cmd: Value) -> Value {
        let mut line = cmd.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .expect("write to the driver");
        self.read_reply().await
    }

    async fn eval(&mut self, expr: &str) -> Value {
        self.call(json!({"cmd": "eval", "expr": expr})).await
    }

    /// `data-value` (the raw integer from Redis) and the text of every KPI.
    async fn kpis(&mut self) -> BTreeMap<String, (String, String)> {
        let raw = self
            .eval(
                "JSON.stringify([...document.querySelectorAll('[data-kpi]')]\
                 .map(e => [e.dataset.kpi, e.dataset.value || '', e.textContent]))",
            )
            .await;
        let rows: Vec<(String, String, String)> =
            serde_json::from_str(raw.as_str().unwrap_or("[]")).expect("KPI JSON from the page");
        rows.into_iter().map(|(k, v, t)| (k, (v, t))).collect()
    }

    async fn errors(&mut self) -> Vec<String> {
        serde_json::from_value(self.call(json!({"cmd": "errors"})).await).unwrap_or_default()
    }

    async fn screenshot(&mut self, name: &str) -> PathBuf {
        let dir = std::env::var_os("INSTASHOP_STATE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join(".local"));
        std::fs::create_dir_all(&dir).expect("create .local");
        let path = dir.join(name);
        self.call(json!({"cmd": "screenshot", "path": path, "full": true}))
            .await;
        eprintln!("screenshot: {}", path.display());
        path
    }

    async fn quit(mut self) {
        let _ = self.call(json!({"cmd": "quit"})).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// `1234567` -> `1,234,567`.
fn group(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// Integer cents as the page shows them: `$1,234.56`.
fn money(cents: i64) -> String {
    format!("${}.{:02}", group(cents / 100), (cents % 100).abs())
}

/// The replies of the KPI read pipeline, in order.
type KpiReads = (
    Option<i64>,
    Option<i64>,
    Option<i64>,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    i64,
);

/// The KPI values as they are in Redis now (`None` when the key is missing).
async fn redis_kpis(
    con: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> BTreeMap<String, Option<i64>> {
    let today = dashboard::snapshot::utc_date(now_ms());
    let (purchases, revenue, today_rev, daily_len, shops, buyers, products, transit, ship_len): KpiReads = redis::pipe()
        .get(format!("{prefix}count:instashop.transaction"))
        .get(format!("{prefix}revenue:total_cents"))
        .hget(format!("{prefix}revenue:daily_cents"), &today)
        .hlen(format!("{prefix}revenue:daily_cents"))
        .get(format!("{prefix}count:instashop.customer"))
        .get(format!("{prefix}count:instashop.buyer"))
        .get(format!("{prefix}count:instashop.product"))
        .hget(format!("{prefix}shipments:status"), "in_transit")
        .hlen(format!("{prefix}shipments:status"))
        .query_async(con)
        .await
        .expect("read the KPI keys from Redis");
    // Same rule as the dashboard: a field absent from an existing hash is 0.
    let today_rev = today_rev.or((daily_len > 0 || revenue.is_some()).then_some(0));
    let transit = transit.or((ship_len > 0).then_some(0));
    [
        ("purchases", purchases),
        ("revenue_total_cents", revenue),
        ("revenue_today_cents", today_rev),
        ("shops", shops),
        ("buyers", buyers),
        ("products", products),
        ("shipments_in_transit", transit),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Differences between the page and the expected values (empty when equal),
/// including the formatted text.
fn differences(
    page: &BTreeMap<String, (String, String)>,
    expected: &BTreeMap<String, Option<i64>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for kpi in KPIS {
        let (value, text) = page.get(kpi).cloned().unwrap_or_default();
        let want = expected.get(kpi).copied().flatten();
        let want_text = match want {
            None => "no data".to_owned(),
            Some(v) if kpi.ends_with("_cents") => money(v),
            Some(v) => group(v),
        };
        let want_value = want.map(|v| v.to_string()).unwrap_or_default();
        if value != want_value || text != want_text {
            out.push(format!(
                "{kpi}: page {value:?} {text:?}, redis {want_value:?} {want_text:?}"
            ));
        }
    }
    out
}

/// Polls until the page shows exactly what Redis holds, or panics at the deadline.
async fn wait_until_equal(
    browser: &mut Browser,
    con: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let expected = redis_kpis(con, prefix).await;
        let diff = differences(&browser.kpis().await, &expected);
        if diff.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the page did not show the Redis values within {within:?}:\n  {}",
            diff.join("\n  ")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Serves a fixed Prometheus body on a free port; returns its URL.
async fn fake_metrics(body: String, shutdown: CancellationToken) -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake /metrics");
    let addr = listener.local_addr().expect("fake /metrics address");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = body.clone();
            async move { body }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    format!("http://{addr}/metrics")
}

/// Starts a dashboard on a free port; returns its base URL.
async fn start_dashboard(config: dashboard::Config, shutdown: CancellationToken) -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind dashboard");
    let addr = listener.local_addr().expect("dashboard address");
    tokio::spawn(async move {
        if let Err(e) = dashboard::serve(listener, config, shutdown).await {
            panic!("dashboard failed: {e}");
        }
    });
    format!("http://{addr}")
}

fn config(redis_url: &str, prefix: &str, reader: &str, consumer: &str) -> dashboard::Config {
    dashboard::Config {
        listen: "127.0.0.1:0".parse().expect("address"),
        redis_url: redis_url.to_owned(),
        key_prefix: prefix.to_owned(),
        reader_metrics_url: reader.to_owned(),
        consumer_metrics_url: consumer.to_owned(),
        interval_ms: 1000,
        dwh_url: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_shows_redis_values_and_follows_them_live() {
    let redis_url = redis_url();
    let client = redis::Client::open(redis_url.as_str()).expect("REDIS_URL parses");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "Redis at {} is not reachable ({e}): start the local stack with scripts/up",
                local_stack::redact::url(&redis_url)
            )
        });
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let prefix = format!("dashboard-test:{}-{nanos}:", std::process::id());
    let now = now_ms();
    let today = dashboard::snapshot::utc_date(now);
    let yesterday = dashboard::snapshot::utc_date(now - 86_400_000);

    // The keys as the metrics-consumer writes them, all with a TTL
    // so an aborted run leaves nothing behind for long.
    let mut pipe = redis::pipe();
    let p = &prefix;
    for (table, n) in [
        ("instashop.customer", 37),
        ("instashop.buyer", 1_204),
        ("instashop.product", 512),
        ("instashop.transaction", 23_456),
        ("instashop.transactiondetail", 61_002),
        ("crm.interaction", 88_120),
        ("erp.stock", 1_024),
        ("ecommerce.carrier", 6),
        ("ecommerce.shipment", 9_870),
    ] {
        pipe.set_ex(format!("{p}count:{table}"), n, 3600);
    }
    pipe.set_ex(format!("{p}revenue:total_cents"), 123_456_789_i64, 3600)
        .hset_multiple(
            format!("{p}revenue:daily_cents"),
            &[
                (yesterday.as_str(), 9_876_543_i64),
                (today.as_str(), 432_109),
            ],
        )
        .hset_multiple(
            format!("{p}gmv:category_cents"),
            &[
                ("Electronics", 5_500_000_i64),
                ("Books", 725_050),
                ("Home & Garden", 2_199_999),
            ],
        )
        .hset_multiple(
            format!("{p}shipments:status"),
            &[
                ("created", 120_i64),
                ("in_transit", 345),
                ("delivered", 9_300),
                ("returned", 105),
            ],
        )
        .hset_multiple(
            format!("{p}interactions:type"),
            &[
                ("view", 50_000_i64),
                ("click", 25_000),
                ("search", 9_000),
                ("cart_add", 3_000),
            ],
        )
        .hset_multiple(
            format!("{p}transactions:status"),
            &[
                ("completed", 20_000_i64),
                ("pending", 3_000),
                ("refunded", 456),
            ],
        )
        .hset_multiple(
            format!("{p}pipeline"),
            &[
                ("last_source_ts_ms", now),
                ("events_applied", 250_000),
                ("lag_ms", 40),
            ],
        );
    for key in [
        "revenue:daily_cents",
        "gmv:category_cents",
        "shipments:status",
        "interactions:type",
        "transactions:status",
        "pipeline",
    ] {
        pipe.expire(format!("{p}{key}"), 3600);
    }
    for (i, start) in dashboard::snapshot::window_starts(now)
        .into_iter()
        .enumerate()
    {
        let key = format!("{p}{}", dashboard::snapshot::window_key(start));
        pipe.hset_multiple(
            &key,
            &[
                ("transactions", 20 + (i as i64 * 7) % 15),
                ("revenue_cents", 150_000 + (i as i64 * 7_919) % 90_000),
            ],
        )
        .expire(&key, 3600);
    }
    let () = pipe
        .query_async(&mut con)
        .await
        .expect("write the test keys");

    // Stand-ins for the reader's and the consumer's /metrics, in their formats.
    let shutdown = CancellationToken::new();
    let mut reader_text = String::new();
    for (i, db) in ["instashop", "crm", "erp", "ecommerce"].iter().enumerate() {
        reader_text.push_str(&format!(
            "cdc_replication_lag_bytes{{source=\"{db}\"}} {}\ncdc_replication_lag_seconds{{source=\"{db}\"}} 0.{i}25\n\
             cdc_confirmed_lsn{{source=\"{db}\"}} {}\ncdc_source_up{{source=\"{db}\",state=\"streaming\"}} 1\n\
             cdc_events_total{{topic=\"{db}.public.t\",op=\"c\"}} {}\n",
            512 * (i + 1),
            23_456_789 + i * 1000,
            10_000 * (i + 1)
        ));
    }
    let consumer_text = "metrics_consumer_lag_messages 12\nmetrics_consumer_dlq_messages_total 0\n\
        metrics_consumer_events_applied_total{table=\"crm.interaction\"} 250000\n\
        metrics_consumer_end_to_end_lag_ms 85\n"
        .to_owned();
    let reader_url = fake_metrics(reader_text, shutdown.clone()).await;
    let consumer_url = fake_metrics(consumer_text, shutdown.clone()).await;
    let base = start_dashboard(
        config(&redis_url, &prefix, &reader_url, &consumer_url),
        shutdown.clone(),
    )
    .await;

    // /api/metrics and /metrics, as curl sees them.
    let api = dashboard::scrape::get(&format!("{base}/api/metrics"), Duration::from_secs(5))
        .await
        .expect("GET /api/metrics");
    let api: Value = serde_json::from_str(&api).expect("/api/metrics is JSON");
    let expected = redis_kpis(&mut con, &prefix).await;
    for kpi in KPIS {
        assert_eq!(
            api["kpi"][kpi].as_i64(),
            expected[kpi],
            "/api/metrics {kpi}"
        );
    }
    assert_eq!(api["counts"]["crm.interaction"], 88_120);
    let own = dashboard::scrape::get(&format!("{base}/metrics"), Duration::from_secs(5))
        .await
        .expect("GET /metrics");
    let own = dashboard::prometheus::parse(&own);
    assert!(
        own.iter()
            .any(|s| s.name == "dashboard_up" && s.value == 1.0),
        "/metrics: {own:?}"
    );

    let mut browser = Browser::start().await;
    browser
        .call(json!({"cmd": "open", "url": format!("{base}/"), "width": 1440, "height": 900, "scheme": "dark"}))
        .await;
    wait_until_equal(&mut browser, &mut con, &prefix, Duration::from_secs(30)).await;

    // Health: every stand-in endpoint answers and the last event is fresh.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pill = browser
            .eval("document.getElementById('state-pill').className")
            .await;
        if pill == json!("pill green") {
            break;
        }
        let reasons = browser
            .eval("document.getElementById('reasons').innerText")
            .await;
        assert!(
            Instant::now() < deadline,
            "state pill {pill}, reasons: {reasons}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let health = dashboard::scrape::get(&format!("{base}/api/health"), Duration::from_secs(5))
        .await
        .expect("GET /api/health");
    let health: Value = serde_json::from_str(&health).expect("/api/health is JSON");
    assert_eq!(health["state"], "green", "{health}");
    assert_eq!(health["sources"][1]["database"], "crm");
    assert_eq!(health["sources"][1]["lag_bytes"], 1024);

    // Live: change Redis, the open page follows without a reload.
    browser.eval("window.__sameDocument = 42").await;
    let frames_before = browser.eval("Number(document.body.dataset.frames)").await;
    let () = redis::pipe()
        .incr(format!("{p}count:instashop.transaction"), 17)
        .incr(format!("{p}revenue:total_cents"), 123_456)
        .hincr(format!("{p}revenue:daily_cents"), &today, 123_456)
        .hincr(format!("{p}shipments:status"), "in_transit", 3)
        .incr(format!("{p}count:instashop.customer"), 1)
        .query_async(&mut con)
        .await
        .expect("update the test keys");
    let changed_at = Instant::now();
    wait_until_equal(&mut browser, &mut con, &prefix, Duration::from_secs(5)).await;
    eprintln!("page followed a Redis change in {:?}", changed_at.elapsed());
    assert_eq!(
        browser.eval("window.__sameDocument").await,
        json!(42),
        "the page reloaded"
    );
    let frames_after = browser.eval("Number(document.body.dataset.frames)").await;
    assert!(
        frames_after.as_i64() > frames_before.as_i64(),
        "no new frame: {frames_before} -> {frames_after}"
    );
    let trend = browser
        .eval("document.querySelector('[data-sub=purchases]').textContent")
        .await;
    eprintln!("purchases trend line: {trend}");

    let shot = browser.screenshot("dashboard-test.png").await;
    assert!(
        std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0) > 20_000,
        "screenshot too small"
    );

    // A key that disappears reads "no data", not a stale number or a crash.
    let () = redis::cmd("DEL")
        .arg(format!("{p}count:instashop.product"))
        .query_async(&mut con)
        .await
        .expect("delete a key");
    wait_until_equal(&mut browser, &mut con, &prefix, Duration::from_secs(5)).await;

    // A phone's width: no horizontal scrolling of the page.
    browser
        .call(json!({"cmd": "viewport", "width": 390, "height": 844, "mobile": true}))
        .await;
    // The new viewport is in effect once the page reports its width; reading
    // scrollWidth then forces a layout at that width.
    let deadline = Instant::now() + Duration::from_secs(10);
    let widths = loop {
        let widths = browser
            .eval("[document.documentElement.scrollWidth, window.innerWidth]")
            .await;
        if widths[1].as_i64() == Some(390) {
            break widths;
        }
        assert!(
            Instant::now() < deadline,
            "viewport never became 390 px wide: {widths}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        widths[0].as_i64() <= widths[1].as_i64(),
        "page wider than the phone: {widths}"
    );
    browser.screenshot("dashboard-test-mobile.png").await;

    let errors = browser.errors().await;
    assert!(errors.is_empty(), "browser console errors: {errors:#?}");
    browser.quit().await;
    shutdown.cancel();

    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{p}*"))
        .query_async(&mut con)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query_async(&mut con).await;
    }
}

/// Nothing behind the dashboard (Redis and both endpoints are closed ports):
/// the page must load, say red with the reasons and "no data", and log no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_with_everything_down_says_so_without_errors() {
    // Ports held by sockets bound but not listening: connecting is refused,
    // and no other test's server can take the port meanwhile (a listener
    // dropped at once freed it, and the consumer's port once answered for
    // another test's server in CI).
    let closed = || {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind");
        let port = socket.local_addr().expect("addr").port();
        (socket, port)
    };
    let ((_redis, redis), (_reader, reader), (_consumer, consumer)) =
        (closed(), closed(), closed());
    let shutdown = CancellationToken::new();
    let base = start_dashboard(
        config(
            &format!("redis://127.0.0.1:{redis}/0"),
            "metrics:",
            &format!("http://127.0.0.1:{reader}/metrics"),
            &format!("http://127.0.0.1:{consumer}/metrics"),
        ),
        shutdown.clone(),
    )
    .await;
    let mut browser = Browser::start().await;
    browser
        .call(json!({"cmd": "open", "url": format!("{base}/"), "width": 1280, "height": 800}))
        .await;
    // Until the page has rendered its first health answer: the red pill and
    // every reason (read together, so a render between two reads cannot
    // fail the test).
    let parts = [
        "redis unreachable",
        "is cdc-reader running?",
        "is metrics-consumer running?",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pill = browser
            .eval("document.getElementById('state-pill').className")
            .await;
        let reasons = browser
            .eval("document.getElementById('reasons').innerText")
            .await;
        let reasons = reasons.as_str().unwrap_or_default().to_owned();
        let missing: Vec<&str> = parts
            .iter()
            .copied()
            .filter(|part| !reasons.contains(part))
            .collect();
        if pill == json!("pill red") && missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "state pill {pill}, no reason about {missing:?}: {reasons}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = browser.kpis().await;
    for kpi in KPIS {
        assert_eq!(page[kpi], (String::new(), "no data".to_owned()), "{kpi}");
    }
    let charts = browser
        .eval("document.getElementById('chart-gmv').innerText")
        .await;
    assert!(
        charts
            .as_str()
            .unwrap_or_default()
            .contains("redis unreachable"),
        "{charts}"
    );
    browser.screenshot("dashboard-test-down.png").await;
    let errors = browser.errors().await;
    assert!(errors.is_empty(), "browser console errors: {errors:#?}");
    browser.quit().await;
    shutdown.cancel();
}

/// Against the real pipeline: needs the generator, cdc-reader and
/// metrics-consumer running (scripts/browser-test starts them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the running pipeline; scripts/browser-test runs it"]
async fn real_pipeline_page_equals_redis_and_moves() {
    let redis_url = redis_url();
    let prefix = std::env::var("METRICS_PREFIX").unwrap_or_else(|_| "metrics:".into());
    let client = redis::Client::open(redis_url.as_str()).expect("REDIS_URL parses");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| {
            panic!("Redis not reachable ({e}): start the local stack with scripts/up")
        });
    let first = redis_kpis(&mut con, &prefix).await;
    assert!(
        first["purchases"].is_some(),
        "no {prefix}count:instashop.transaction in Redis: is the metrics-consumer running? (scripts/demo)"
    );
    let reader = std::env::var("DASHBOARD_READER_METRICS_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:9472/metrics".into());
    let consumer = std::env::var("DASHBOARD_CONSUMER_METRICS_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:9473/metrics".into());
    let shutdown = CancellationToken::new();
    let base = start_dashboard(
        config(&redis_url, &prefix, &reader, &consumer),
        shutdown.clone(),
    )
    .await;
    let mut browser = Browser::start().await;
    browser
        .call(json!({"cmd": "open", "url": format!("{base}/"), "width": 1440, "height": 900, "scheme": "dark"}))
        .await;

    // Under load Redis moves between the page's snapshot and our read, so
    // sample Redis every 50 ms and require, for each KPI, a page value that
    // Redis held at one of the sampled moments.
    let mut seen: BTreeMap<String, BTreeSet<Option<i64>>> = BTreeMap::new();
    let mut matched: BTreeSet<String> = BTreeSet::new();
    let mut last_page = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut next_page_read = Instant::now() + Duration::from_millis(1500);
    while matched.len() < KPIS.len() {
        for (k, v) in redis_kpis(&mut con, &prefix).await {
            seen.entry(k).or_default().insert(v);
        }
        if Instant::now() >= next_page_read {
            next_page_read = Instant::now() + Duration::from_millis(300);
            last_page = browser.kpis().await;
            for kpi in KPIS {
                let (value, _) = last_page.get(kpi).cloned().unwrap_or_default();
                let value = value.parse::<i64>().ok();
                if seen.get(kpi).is_some_and(|s| s.contains(&value)) {
                    matched.insert(kpi.to_owned());
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "page values never equalled Redis for {:?}: page {last_page:?}",
            KPIS.iter()
                .filter(|k| !matched.contains(**k))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // While the generator runs, the numbers move without a reload.
    browser.eval("window.__sameDocument = 42").await;
    let before = browser.kpis().await["purchases"].0.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = browser.kpis().await["purchases"].0.clone();
        if now != before {
            eprintln!("purchases moved on the page: {before} -> {now}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "purchases stayed at {before} for 10 s: is the generator running?"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        browser.eval("window.__sameDocument").await,
        json!(42),
        "the page reloaded"
    );
    // Let the per-minute trend lines and the throughput chart fill a little.
    tokio::time::sleep(Duration::from_secs(6)).await;
    browser.screenshot("dashboard.png").await;
    let state = browser
        .eval("document.getElementById('state-pill').className")
        .await;
    let reasons = browser
        .eval("document.getElementById('reasons').innerText")
        .await;
    eprintln!("pipeline state: {state}; {reasons}");
    let errors = browser.errors().await;
    assert!(errors.is_empty(), "browser console errors: {errors:#?}");
    browser.quit().await;
    shutdown.cancel();
}

/// A scratch warehouse (`sql/dwh.sql`, owner `dwh_sink`) on the local
/// stack; returns its URL and a superuser session to drop it.
async fn scratch_warehouse(name: &str) -> (String, tokio_postgres::Client) {
    local_stack::envfile::load();
    let var = |k: &str| {
        std::env::var(k)
            .unwrap_or_else(|_| panic!("{k} is not set: start the local stack with scripts/up"))
    };
    let connect = |url: String| async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("postgres unreachable ({e}): run scripts/up"));
        tokio::spawn(conn);
        client
    };
    let admin = connect(var("PG_ADMIN_URL")).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name} OWNER dwh_sink"))
        .await
        .expect("create the scratch warehouse");
    let url = format!(
        "{}/{name}",
        var("DWH_URL").rsplit_once('/').expect("DWH_URL").0
    );
    let schema = std::fs::read_to_string(repo_root().join("sql/dwh.sql")).expect("sql/dwh.sql");
    connect(url.clone())
        .await
        .batch_execute(&schema)
        .await
        .expect("apply sql/dwh.sql");
    (url, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_view_shows_the_warehouse_and_follows_it() {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!("dwh_browser_{}x{nanos}", std::process::id());
    let (url, admin) = scratch_warehouse(&name).await;
    let (dwh, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("scratch warehouse");
    tokio::spawn(conn);
    // Two days of purchases; a product at three prices, sold at two of
    // them in two weeks and categories.
    dwh.batch_execute(
        "INSERT INTO dim_date VALUES (20261130, '2026-11-30', 2026, 4, 11, 30, 49, 1), (20261201, '2026-12-01', 2026, 4, 12, 1, 49, 2);
         INSERT INTO fact_purchase VALUES
           (1, 1, 1, 2000, 'USD', 'credit_card', 'completed', '2026-11-30 10:00Z', 20261130, '2026-11-30 10:00Z', 100, 100, NULL, NULL, 100, 100),
           (2, 1, 1, 2400, 'USD', 'paypal', 'completed', '2026-12-01 10:00Z', 20261201, '2026-12-01 10:00Z', 300, 300, NULL, NULL, 300, 300),
           (3, 1, 1, 9999, 'USD', 'paypal', 'pending', '2026-12-01 11:00Z', 20261201, '2026-12-01 11:00Z', 400, 400, NULL, NULL, 400, 400);
         INSERT INTO dim_product (product_id, name, category, price_cents, valid_from, valid_to, valid_from_commit_lsn, valid_from_lsn, valid_to_commit_lsn, valid_to_lsn, is_current)
         OVERRIDING SYSTEM VALUE VALUES
           (7, 'Lamp', 'home', 1000, '2026-11-29 00:00Z', '2026-12-01 00:00Z', 50, 50, 200, 200, false),
           (7, 'Lamp', 'garden', 1200, '2026-12-01 00:00Z', '2026-12-02 00:00Z', 200, 200, 500, 500, false),
           (7, 'Lamp', 'garden', 1500, '2026-12-02 00:00Z', NULL, 500, 500, NULL, NULL, true);
         INSERT INTO sale_line (line_id, purchase_id, product_id, quantity, unit_price_cents, amount_cents, product_key, sold_time, sold_commit_lsn, sold_lsn, commit_time, last_commit_lsn, last_lsn)
         SELECT 1, 1, 7, 2, 1000, 2000, product_key, '2026-11-30 10:00Z'::timestamptz, 100, 100, '2026-11-30 10:00Z'::timestamptz, 100, 100 FROM dim_product WHERE price_cents = 1000
         UNION ALL
         SELECT 2, 2, 7, 2, 1200, 2400, product_key, '2026-12-01 10:00Z'::timestamptz, 300, 300, '2026-12-01 10:00Z'::timestamptz, 300, 300 FROM dim_product WHERE price_cents = 1200;",
    )
    .await
    .expect("seed the warehouse");

    let shutdown = CancellationToken::new();
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let nobody = format!("http://{}/metrics", closed.local_addr().expect("addr"));
    drop(closed);
    let mut cfg = config(&redis_url(), "dashboard-history-test:", &nobody, &nobody);
    cfg.dwh_url = url.clone();
    let base = start_dashboard(cfg, shutdown.clone()).await;
    let mut browser = Browser::start().await;
    browser
        .call(json!({"cmd": "open", "url": format!("{base}/"), "width": 1280, "height": 1400}))
        .await;
    let bars = "JSON.stringify([...document.querySelectorAll('#hist-daily rect[data-day]')].map(r => [r.dataset.day, Number(r.dataset.revenue), Number(r.dataset.purchases)]))";
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Value::Null;
    while Instant::now() < deadline {
        seen = browser.eval(bars).await;
        if seen == json!(r#"[["2026-11-30",2000,1],["2026-12-01",2400,1]]"#) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        seen,
        json!(r#"[["2026-11-30",2000,1],["2026-12-01",2400,1]]"#),
        "revenue per day on the page"
    );
    let weekly = browser
        .eval("JSON.stringify([...document.querySelectorAll('#hist-weekly tr[data-week]')].map(r => [r.dataset.week, r.dataset.category, Number(r.dataset.gmv)]))")
        .await;
    assert_eq!(
        weekly,
        json!(r#"[["2026-11-30","garden",2400],["2026-11-30","home",2000]]"#),
        "GMV per week and category as sold"
    );
    let prices = browser
        .eval("JSON.stringify([...document.querySelectorAll('#hist-price tr[data-price]')].map(r => Number(r.dataset.price)))")
        .await;
    assert_eq!(
        prices,
        json!("[1000,1200,1500]"),
        "price history of product 7"
    );

    // A new day in the warehouse appears without a reload.
    dwh.batch_execute(
        "INSERT INTO dim_date VALUES (20261202, '2026-12-02', 2026, 4, 12, 2, 49, 3);
         INSERT INTO fact_purchase VALUES (4, 1, 1, 3000, 'USD', 'paypal', 'completed', '2026-12-02 09:00Z', 20261202, '2026-12-02 09:00Z', 600, 600, NULL, NULL, 600, 600);",
    )
    .await
    .expect("add a day");
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        seen = browser.eval(bars).await;
        if seen.as_str().unwrap_or_default().contains("2026-12-02") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        seen,
        json!(r#"[["2026-11-30",2000,1],["2026-12-01",2400,1],["2026-12-02",3000,1]]"#),
        "the history did not follow the warehouse"
    );
    browser.screenshot("dashboard-history-test.png").await;
    let errors = browser.errors().await;
    assert!(errors.is_empty(), "browser console errors: {errors:#?}");
    browser.quit().await;
    shutdown.cancel();
    drop(dwh);
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
}
