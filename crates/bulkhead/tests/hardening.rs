//! Regression tests for the hardening review's findings, through the real binary on loopback.
//! Each test is named after the finding it pins.

mod common;

use std::time::Duration;

use common::{ADMIN, Backend, Server};
use serde_json::json;
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

/// Finding 8: the data dir was 0755 and the database 0644, so any local user could read the
/// audit trail, memos and key hashes. The dir is 0700 and every file in it 0600, also the
/// SQLite journal files; a looser dir left by an older version is tightened at start.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_is_0700_and_its_files_0600() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    let b = Backend::sqlite();
    let mut srv = Server::start_with(&b, None).await;
    srv.token = std::fs::read_to_string(b.data().join("admin-token")).expect("generated token").trim().to_owned();
    let api = srv.api();
    let key = api.create(&srv.token, common::root_agent("private", "10.00", &[common::SCOPE])).await;
    assert_eq!(api.try_spend(&key, "1.00").await.expect("spend").status, 200);
    assert_eq!(mode(&b.data()), 0o700, "data dir");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(b.data()).expect("read dir") {
        let path = entry.expect("entry").path();
        files.push(path.file_name().expect("name").to_string_lossy().into_owned());
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    for name in ["bulkhead.db", "bulkhead.db-wal", "admin-token", "serve.lock"] {
        assert!(files.iter().any(|f| f == name), "{name} is in the data dir: {files:?}");
    }
    srv.sigterm();
    srv.wait_exit().await;

    // A dir and database left world-readable are tightened at the next start.
    std::fs::set_permissions(b.data(), std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    std::fs::set_permissions(b.data().join("bulkhead.db"), std::fs::Permissions::from_mode(0o644)).expect("chmod db");
    let _srv = Server::start(&b).await;
    assert_eq!(mode(&b.data()), 0o700, "data dir tightened");
    assert_eq!(mode(&b.data().join("bulkhead.db")), 0o600, "database tightened");
}

/// Finding 8: an admin token of any length was accepted. It needs at least 32 characters and
/// may not look like an agent key (`bk_`); the refusal names the rule, never the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_tokens_shorter_than_32_chars_or_key_shaped_are_refused() {
    for (token, says) in [
        ("short-token", "at least 32 characters"),
        ("0123456789012345678901234567890", "at least 32 characters"),
        ("bk_0123456789012345678901234567890123456789", "bk_"),
        ("has spaces 0123456789012345678901234567890", "printable ASCII"),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = tokio::process::Command::new(common::BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path().join("data"))
            .env("BULKHEAD_ADMIN_TOKEN", token)
            .env_remove("BULKHEAD_DATABASE_URL")
            .env_remove("BULKHEAD_CONFIG")
            .stdin(std::process::Stdio::null())
            .output();
        let out = tokio::time::timeout(Duration::from_secs(60), out).await.expect("exits in time").expect("run");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{token:?} was accepted: {text}");
        assert!(text.contains(says), "{token:?}: {text}");
        assert!(!text.contains(token), "the refusal does not print the token: {text}");
    }
}

/// Finding 10: log lines carried ANSI colour codes when stderr was a file or a pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_have_no_colour_codes_off_a_terminal() {
    let b = Backend::sqlite();
    let srv = Server::start(&b).await;
    let api = srv.api();
    api.create(ADMIN, common::root_agent("quiet-logs", "1.00", &[common::SCOPE])).await;
    let logs = srv.logs();
    assert!(logs.contains("INFO"), "the server logged at info level: {logs}");
    assert!(!logs.contains('\u{1b}'), "no escape character in logs written to a file: {logs}");
}

/// Finding 4: connections were unlimited, so idle connections could pile up without bound. With
/// `--max-connections` open, a new connection is closed at once; once one goes away, new ones
/// are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let mut b = Backend::sqlite();
    b.env.push(("BULKHEAD_MAX_CONNECTIONS".into(), "4".into()));
    let srv = Server::start(&b).await;
    let addr = srv.base.trim_start_matches("http://").to_owned();
    // Four idle connections that never send a request (the server keeps them until its header
    // read timeout).
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.expect("connect"));
    }
    let healthz = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let try_healthz = |addr: String| async move {
        let mut s = tokio::net::TcpStream::connect(&addr).await.expect("connect");
        let _ = s.write_all(healthz.as_bytes()).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200")
    };
    // The acceptor counts a connection as soon as it hands it over; poll until the fifth is refused.
    // Each round first adds one more idle connection: a slot that frees up meanwhile (the start-up
    // health checks' own connection closing) is taken by it, not by the probe.
    let mut refused = false;
    for _ in 0..100 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.expect("connect"));
        if !try_healthz(addr.clone()).await {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "a connection beyond the limit of 4 was served");
    drop(idle);
    let mut served = false;
    for _ in 0..250 {
        if try_healthz(addr.clone()).await {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "once the idle connections went away, new ones were served again");
    assert!(srv.logs().contains("connection limit reached"), "the refusal is logged: {}", srv.logs());
}

/// Finding 8: only `Bearer` with that exact capitalisation was accepted; RFC 7235 makes the
/// scheme case-insensitive. Other schemes are still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    let b = Backend::sqlite();
    let srv = Server::start(&b).await;
    let key = srv.api().create(ADMIN, common::root_agent("any-case", "10.00", &[common::SCOPE])).await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let (status, text) =
            raw(&srv, &get("/v1/agents", "127.0.0.1", &format!("Authorization: {scheme} {ADMIN}\r\n"))).await;
        assert_eq!(status, 200, "{scheme} (admin): {text}");
        let (status, text) =
            raw(&srv, &get("/v1/me", "127.0.0.1", &format!("Authorization: {scheme} {key}\r\n"))).await;
        assert_eq!(status, 200, "{scheme} (agent key): {text}");
    }
    for auth in [format!("Basic {ADMIN}"), format!("Bearer{ADMIN}"), "Bearer ".to_owned(), ADMIN.to_owned()] {
        let (status, text) = raw(&srv, &get("/v1/agents", "127.0.0.1", &format!("Authorization: {auth}\r\n"))).await;
        assert_eq!(status, 401, "{auth:?}: {text}");
        assert!(text.contains("invalid_credentials"), "{text}");
    }
}

/// Finding 1: a child escaped its parent — it kept spending after the parent was suspended or
/// lost the scope, and past the parent's rate limit. Through the real binary, on both stores:
/// the operator's `suspend`, a narrowed scope and a rate limit of the parent bind the child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_cannot_escape_its_parent() {
    for b in [Some(Backend::sqlite()), Backend::pg().await].into_iter().flatten() {
        let srv = Server::start(&b).await;
        let api = srv.api();
        let parent = api
            .create(
                ADMIN,
                json!({"handle": "f1-parent", "scopes": [common::SCOPE, "spawn:agents"], "spending_cap": "50"}),
            )
            .await;
        let child =
            api.create(&parent, json!({"handle": "f1-child", "scopes": [common::SCOPE], "spending_cap": "10"})).await;
        assert_eq!(api.try_spend(&child, "1").await.unwrap().status, 200);

        let r = api.post("/v1/agents/f1-parent/suspend", ADMIN, &json!({"reason": "investigating"})).await;
        assert_eq!((r.status, r.str("status")), (200, "suspended"), "{}", r.body);
        let r = api.try_spend(&child, "1").await.unwrap();
        assert_eq!((r.status, r.code()), (403, "agent_suspended"), "{}", r.body);
        let r = api.post("/v1/agents/f1-parent/resume", ADMIN, &json!({})).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(api.try_spend(&child, "1").await.unwrap().status, 200);

        let narrowed = json!({"scopes": ["spawn:agents"]});
        let r = api.try_send(reqwest::Method::PATCH, "/v1/agents/f1-parent", ADMIN, Some(&narrowed)).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let r = api.try_spend(&child, "1").await.unwrap();
        assert_eq!((r.status, r.code()), (403, "scope_not_granted"), "{}", r.body);

        let limited = json!({"scopes": [common::SCOPE, "spawn:agents"], "rate_limit": {"requests": 3, "per": "1m"}});
        let r = api.try_send(reqwest::Method::PATCH, "/v1/agents/f1-parent", ADMIN, Some(&limited)).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        // A child may not be given a looser rate limit than its parent's (the attempt is a
        // request of the parent's, and takes one of its 3 a minute).
        let fast = json!({"handle": "f1-fast", "scopes": [common::SCOPE], "spending_cap": "1",
                          "rate_limit": {"requests": 100, "per": "1m"}});
        let r = api.post("/v1/agents", &parent, &fast).await;
        assert_eq!((r.status, r.code()), (403, "cap_escalation"), "{}", r.body);
        let mut statuses = Vec::new();
        for _ in 0..10 {
            statuses.push(api.try_spend(&child, "0.10").await.unwrap().status);
        }
        assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 2, "the parent's 3 a minute: {statuses:?}");
        assert!(statuses[2..].iter().all(|s| *s == 429), "{statuses:?}");
        let r = api.post("/v1/agents/nobody/suspend", ADMIN, &json!({})).await;
        assert_eq!((r.status, r.code()), (404, "not_found"), "{}", r.body);
        let r = api.post("/v1/agents/f1-parent/suspend", &child, &json!({})).await;
        assert_eq!(r.status, 401, "suspend is the operator's: {}", r.body);
        b.assert_audit_intact().await;
    }
}

/// Finding 9: the audit chain was unkeyed, so anyone able to write the database could rewrite
/// events and recompute the chain. `serve` now keeps an audit key outside the database
/// (`DIR/audit-key`, 0600), hashes events under it, and `audit verify` needs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_is_keyed_outside_the_database() {
    use std::os::unix::fs::PermissionsExt;
    let b = Backend::sqlite();
    let srv = Server::start(&b).await;
    let api = srv.api();
    let key = api.create(ADMIN, json!({"handle": "f9", "scopes": [common::SCOPE], "spending_cap": "5"})).await;
    assert_eq!(api.try_spend(&key, "1").await.unwrap().status, 200);
    let events = b.export("f9").await;
    assert!(events.iter().all(|e| e["hash"].as_str().unwrap().starts_with("k1:")), "keyed hashes: {events:?}");
    let file = b.data().join("audit-key");
    let mode = std::fs::metadata(&file).expect("the audit key file").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    b.assert_audit_intact().await;
    drop(srv);

    // Without the key a keyed chain cannot be vouched for; with another key it does not verify.
    let kept = b.scratch("audit-key.kept");
    std::fs::rename(&file, &kept).unwrap();
    let out = b.offline(&["audit", "verify"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--audit-key"), "it says how to give the key");
    let other = b.scratch("other-key");
    std::fs::write(&other, "ab".repeat(32)).unwrap();
    let out = b.offline(&["audit", "verify", "--audit-key", other.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    let out = b.offline(&["audit", "verify", "--audit-key", kept.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// Finding 4: a revoked key wrote an audit event and a row update per request (200 requests,
/// 200 events), and bodies were read before the key was checked. Now a key refused for good is
/// answered from memory, before its body is read, and its refusals are audited coalesced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_keys_cost_no_writes_and_no_body_read() {
    let b = Backend::sqlite();
    let srv = Server::start(&b).await;
    let api = srv.api();
    let key = api.create(ADMIN, json!({"handle": "f4", "scopes": [common::SCOPE], "spending_cap": "5"})).await;
    assert_eq!(api.post("/v1/agents/f4/revoke", ADMIN, &json!({})).await.status, 200);
    let before = api.audit(ADMIN, "f4").await.len();
    for _ in 0..200 {
        let r = api.try_spend(&key, "1").await.unwrap();
        assert_eq!((r.status, r.code()), (401, "credential_revoked"));
    }
    let after = api.audit(ADMIN, "f4").await.len();
    assert!(after <= before + 2, "200 refusals wrote {} events", after - before);
    // A request that announces a 900 KiB body and never sends it is answered at once: the key
    // is refused before the body is awaited (else: 408 after the 30 s body deadline).
    let head = format!(
        "POST /v1/spend HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 921600\r\nConnection: close\r\n\r\n"
    );
    let addr = srv.base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answered without waiting for the body")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(text.contains("credential_revoked"), "{text}");
    // The same for a made-up admin token on an admin call.
    let head = "POST /v1/agents HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer not-the-admin-token-at-all-0123456789\r\n\
                Content-Type: application/json\r\nContent-Length: 921600\r\nConnection: close\r\n\r\n";
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("write");
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answered without waiting for the body")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
}

/// Finding 9 on PostgreSQL: events changed in the database behind the server's back are found by
/// `bulkhead audit verify`, which names the first bad event and exits non-zero — also when the
/// forger recomputed a plain hash, since the chain is keyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_audit_tampering_is_caught_by_verify() {
    let Some(b) = Backend::pg().await else { return };
    let url = b.db.clone().expect("a PostgreSQL backend");
    let srv = Server::start(&b).await;
    let api = srv.api();
    let key = api.create(ADMIN, json!({"handle": "pg-tamper", "scopes": [common::SCOPE], "spending_cap": "50"})).await;
    for _ in 0..5 {
        assert_eq!(api.try_spend(&key, "1").await.unwrap().status, 200);
    }
    drop(srv);
    b.assert_audit_intact().await;
    let psql = |sql: &str| {
        let out =
            std::process::Command::new("psql").args([url.as_str(), "-qAt", "-c", sql]).output().expect("psql runs");
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
    };
    // A spend's amount changed, and its hash replaced by the plain SHA-256 a forger can compute.
    psql("UPDATE audit_events SET amount = 1 WHERE seq = 3");
    psql("UPDATE audit_events SET hash = encode(sha256(convert_to('forged', 'UTF8')), 'hex') WHERE seq = 3");
    let out = b.offline(&["audit", "verify"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("BROKEN at event 3"), "{text}");
}
