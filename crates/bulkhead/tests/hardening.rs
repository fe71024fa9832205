//! Regression tests for the hardening review's findings, through the real binary on loopback.
//! Each test is named after the finding it pins.

mod common;

use std::time::Duration;

use common::{ADMIN, Backend, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends one raw HTTP/1.1 request and returns (status, whole answer as text).
async fn raw(srv: &Server, request: &str) -> (u16, String) {
    let addr = srv.base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

fn get(path: &str, host: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n")
}

/// Finding 6: the raw HTTP method became a metric label, so any client without credentials
/// could create unlimited series. Methods outside the standard set are labelled `other`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_method_labels_come_from_a_bounded_set() {
    let b = Backend::sqlite();
    let srv = Server::start(&b).await;
    let port = srv.base.rsplit(':').next().expect("port");
    for i in 0..40 {
        let (status, text) =
            raw(&srv, &format!("XMETHOD{i} /v1/agents HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")).await;
        assert!((400..500).contains(&status), "an invented method gets a 4xx: {text}");
    }
    let (status, text) = raw(&srv, &get("/metrics", &format!("127.0.0.1:{port}"), "")).await;
    assert_eq!(status, 200, "{text}");
    let methods: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("bulkhead_request_duration_seconds"))
        .filter_map(|l| l.split("method=\"").nth(1)?.split('"').next())
        .collect();
    assert!(methods.contains("other"), "invented methods are counted as `other`: {methods:?}");
    assert!(!methods.iter().any(|m| m.starts_with("XMETHOD")), "no invented method is a label: {methods:?}");
    assert!(methods.len() <= 10, "{methods:?}");
}

/// Finding 6: `/metrics` trusted any loopback peer whatever `Host` it named, so a web page whose
/// DNS name was rebound to 127.0.0.1 could read it through a local browser. Without the admin
/// token, only a request that addressed a loopback host is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_refuse_a_rebound_host_without_the_admin_token() {
    let b = Backend::sqlite();
    let srv = Server::start(&b).await;
    let port = srv.base.rsplit(':').next().expect("port").to_owned();
    for host in ["evil.example", &format!("evil.example:{port}"), "localhost.evil.example", "10.1.2.3"] {
        let (status, text) = raw(&srv, &get("/metrics", host, "")).await;
        assert_eq!(status, 401, "Host {host}: {text}");
        assert!(text.contains("invalid_credentials"), "{text}");
        let (status, text) = raw(&srv, &get("/metrics", host, &format!("Authorization: Bearer {ADMIN}\r\n"))).await;
        assert_eq!(status, 200, "the admin token opens it whatever the Host: {text}");
    }
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), "127.0.0.1".to_owned()] {
        let (status, text) = raw(&srv, &get("/metrics", &host, "")).await;
        assert_eq!(status, 200, "Host {host}: {text}");
        assert!(text.contains("bulkhead_"), "{text}");
    }
    // HTTP/1.1 without a Host header: not a request that addressed a loopback host.
    let (status, _) = raw(&srv, "GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(status == 401 || status == 400, "no Host: {status}");
}
