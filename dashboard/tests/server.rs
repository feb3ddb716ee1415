//! The dashboard with nothing behind it: Redis and both metrics endpoints
//! unreachable. It must keep serving, say red with reasons, and never crash.
//! Needs no local stack (the addresses are closed ports on loopback).

use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// A loopback port with nothing listening: bound, then released.
async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr").port()
}

async fn get(url: &str) -> Result<String, dashboard::Error> {
    dashboard::scrape::get(url, Duration::from_secs(5)).await
}

#[tokio::test]
async fn serves_red_state_and_no_data_when_everything_is_down() {
    let redis_port = closed_port().await;
    let reader_port = closed_port().await;
    let consumer_port = closed_port().await;
    let config = dashboard::Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        redis_url: format!("redis://127.0.0.1:{redis_port}/0"),
        key_prefix: "metrics:".into(),
        reader_metrics_url: format!("http://127.0.0.1:{reader_port}/metrics"),
        consumer_metrics_url: format!("http://127.0.0.1:{consumer_port}/metrics"),
        interval_ms: 200,
        dwh_url: String::new(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let shutdown = CancellationToken::new();
    let (done_tx, done_rx) = oneshot::channel();
    let token = shutdown.clone();
    tokio::spawn(async move {
        let _ = done_tx.send(dashboard::serve(listener, config, token).await);
    });

    // The page itself: self-contained, nothing fetched from elsewhere.
    let page = get(&format!("{base}/")).await.expect("GET /");
    assert!(page.contains("<title>InstaShop CDC"), "not the page");
    assert!(page.contains("/api/stream"));
    // (SVG namespace URIs are names, not fetches, and are allowed.)
    for external in [
        "src=\"http",
        "href=\"http",
        "src=\"//",
        "href=\"//",
        "url(http",
        "url(\"http",
        "url(//",
        "@import",
        "fetch(\"http",
    ] {
        assert!(!page.contains(external), "page references {external}");
    }

    // Health turns red with one reason per unreachable part.
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        if let Ok(body) = get(&format!("{base}/api/health")).await {
            let v: serde_json::Value = serde_json::from_str(&body).expect("health JSON");
            if v["endpoints"]["redis"]["ok"] == false {
                break v;
            }
        }
        assert!(Instant::now() < deadline, "no health reading in 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(health["state"], "red", "{health}");
    let reasons = health["reasons"].to_string();
    for part in [
        "redis",
        "is cdc-reader running?",
        "is metrics-consumer running?",
    ] {
        assert!(reasons.contains(part), "no reason about {part}: {reasons}");
    }
    assert_eq!(health["sources"].as_array().map(Vec::len), Some(4));

    // /api/metrics says why it has nothing, with a 503.
    let err = get(&format!("{base}/api/metrics")).await;
    assert!(
        matches!(
            err,
            Err(dashboard::Error::ScrapeResponse {
                status: Some(503),
                ..
            })
        ),
        "{err:?}"
    );

    // Its own /metrics parses and counts the failures.
    let text = get(&format!("{base}/metrics")).await.expect("GET /metrics");
    let samples = dashboard::prometheus::parse(&text);
    let value = |name: &str| {
        samples
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.value)
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
    };
    assert_eq!(value("dashboard_up"), 1.0);
    assert_eq!(value("dashboard_pipeline_state"), 2.0);
    assert!(value("dashboard_redis_errors_total") >= 1.0);
    assert!(value("dashboard_reader_scrape_errors_total") >= 1.0);

    // The event stream answers with a snapshot frame.
    let (open_stream, stream) = tokio::time::timeout(Duration::from_secs(5), async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = base.trim_start_matches("http://");
        let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
        sock.write_all(b"GET /api/stream HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
            .await
            .expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("event: snapshot") {
            let n = sock.read(&mut buf).await.expect("read");
            assert!(n > 0, "stream closed");
            got.extend_from_slice(&buf[..n]);
        }
        (sock, String::from_utf8_lossy(&got).into_owned())
    })
    .await
    .expect("a snapshot event within 5 s");
    assert!(stream.contains("text/event-stream"), "{stream}");
    assert!(stream.contains("\"state\":\"red\""), "{stream}");

    // Shutdown ends the server even with a page still connected.
    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), done_rx)
        .await
        .expect("the dashboard stopped within 10 s")
        .expect("serve task finished");
    assert!(result.is_ok(), "{result:?}");
    drop(open_stream);
}

#[tokio::test]
async fn a_taken_port_is_a_clear_config_error() {
    let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config = dashboard::Config {
        listen: taken.local_addr().expect("addr"),
        redis_url: "redis://127.0.0.1:1/0".into(),
        key_prefix: "metrics:".into(),
        reader_metrics_url: "http://127.0.0.1:1/metrics".into(),
        consumer_metrics_url: "http://127.0.0.1:1/metrics".into(),
        interval_ms: 1000,
        dwh_url: String::new(),
    };
    let err = dashboard::run(config, CancellationToken::new())
        .await
        .expect_err("the port is taken");
    assert!(err.to_string().contains("--listen"), "{err}");
}
