//! The console's reads: usage over time in buckets, the fleet's audit trail (filtered, both
//! directions) and recent alerts, on SQLite and on PostgreSQL; and the console's own files with
//! their security headers.

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::Request;
use bulkhead_server::{AppState, app, install_metrics};
use bulkhead_store::{AlertRules, Ledger, LedgerConfig, Store};
use common::*;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

/// A server on SQLite or, with `pg`, on a fresh PostgreSQL database (`None` when the PostgreSQL
/// tests do not run here: the test returns); alerts go to an outbox (the webhook is never called:
/// no delivery loop runs in-process).
async fn server(pg: bool) -> Option<Srv> {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = if pg { bulkhead_testkit::fresh_pg_url().await? } else { bulkhead_testkit::sqlite_url(dir.path()) };
    let store = Store::open(&url).await.expect("open store");
    let clock = bulkhead_testkit::manual_clock();
    let config = LedgerConfig {
        alerts: AlertRules { webhooks: vec!["http://127.0.0.1:9/hook".into()], thresholds: vec![0.8] },
        seed: Some(bulkhead_testkit::seed()),
        ..Default::default()
    };
    let (ledger, _writer) = Ledger::start(store, clock.clone(), config);
    let router = app(AppState {
        ledger: ledger.clone(),
        admin_token: Arc::from(ADMIN),
        metrics: install_metrics(),
        metrics_open: true,
    });
    Some(Srv { router, ledger, clock, dir, seen: Mutex::new(Vec::new()), wire: None })
}

fn spent(buckets: &Value) -> Vec<&str> {
    buckets["buckets"].as_array().unwrap().iter().map(|b| b["spent"].as_str().unwrap()).collect()
}

async fn usage_in_buckets(s: &Srv) {
    // T0 is 22:13:20; hour buckets start on the hour.
    let (_, parent) = s
        .create(json!({"handle": "orchestrator", "scopes": ["spawn:agents", "pay:*"], "spending_cap": "100.00",
                       "per_tx_limit": "10.00"}))
        .await;
    let child = s
        .json(
            "POST",
            "/v1/agents",
            &Auth::key(&parent),
            json!({"handle": "worker", "scopes": ["pay:x"], "spending_cap": "20.00", "per_tx_limit": "5.00"}),
        )
        .await;
    child.expect(201, None);
    let child = child.json["key"].as_str().unwrap().to_owned();
    s.spend(&parent, "pay:x", "1.00").await.expect(200, None);
    s.spend(&child, "pay:x", "2.00").await.expect(200, None);
    s.advance(HOUR);
    s.spend(&parent, "pay:x", "0.50").await.expect(200, None);
    s.spend(&parent, "pay:x", "11.00").await.err(402, "per_tx_limit_exceeded");
    let hold = s.hold(&child, "pay:x", "3.00", None).await;
    hold.expect(201, None);
    let id = hold.json["id"].as_str().unwrap();
    s.json("POST", &format!("/v1/holds/{id}/capture"), &Auth::key(&child), json!({"amount": "0.25"}))
        .await
        .expect(200, None);

    let r = s.get("/v1/agents/orchestrator/usage?bucket=1h&limit=3", &Auth::Admin).await;
    let u = r.ok();
    assert_eq!(u["bucket"], "1h");
    let b = u["buckets"].as_array().unwrap();
    assert_eq!(b.len(), 3);
    assert_eq!(b[0]["start"], "2023-11-14T21:00:00Z");
    assert_eq!(b[2]["start"], "2023-11-14T23:00:00Z");
    assert_eq!(b[1]["start"], "2023-11-14T22:00:00Z");
    // The parent's buckets include its child's spends, as its usage figures do; a hold counts
    // only once captured, and only what was captured.
    assert_eq!(spent(u), ["0.00", "3.00", "0.75"]);
    // Allowed spends and holds (not admin actions, not settlements); denials of any request.
    assert_eq!((b[1]["allowed"].as_i64(), b[1]["denied"].as_i64()), (Some(2), Some(0)));
    assert_eq!((b[2]["allowed"].as_i64(), b[2]["denied"].as_i64()), (Some(2), Some(1)));
    let w = s.get("/v1/agents/worker/usage?bucket=1h&limit=2", &Auth::Admin).await;
    assert_eq!(spent(w.ok()), ["2.00", "0.25"]);
    // Ten-minute buckets, up to a given time.
    let w = s.get("/v1/agents/worker/usage?bucket=10m&limit=2&until=2023-11-14T22:19:59Z", &Auth::Admin).await;
    let w = w.ok();
    assert_eq!(w["buckets"][0]["start"], "2023-11-14T22:00:00Z");
    assert_eq!(spent(w), ["0.00", "2.00"]);

    // Bounded: more buckets than the maximum are clamped, never refused.
    let many = s.get("/v1/agents/worker/usage?bucket=1m&limit=999999", &Auth::Admin).await;
    assert_eq!(many.ok()["buckets"].as_array().unwrap().len(), 1000);
    s.get("/v1/agents/worker/usage?bucket=1s", &Auth::Admin).await.err(400, "invalid_request");
    s.get("/v1/agents/worker/usage?bucket=31d", &Auth::Admin).await.err(400, "invalid_request");
    s.get("/v1/agents/worker/usage?bucket=x", &Auth::Admin).await.err(400, "invalid_request");
    s.get("/v1/agents/worker/usage?until=yesterday", &Auth::Admin).await.err(400, "invalid_request");
    s.get("/v1/agents/worker/usage?nope=1", &Auth::Admin).await.err(400, "invalid_request");
    s.get("/v1/agents/nobody/usage", &Auth::Admin).await.err(404, "not_found");
    s.get("/v1/agents/worker/usage", &Auth::key(&child)).await.err(401, "invalid_credentials");
    s.get("/v1/agents/worker/usage", &Auth::None).await.err(401, "invalid_credentials");
}

async fn fleet_audit(s: &Srv) {
    let a = s.agent("alpha", &["pay:x"], "5.00").await;
    let b = s.agent("beta", &["pay:x"], "5.00").await;
    s.spend(&a, "pay:x", "1.00").await.expect(200, None);
    s.spend(&b, "pay:x", "9.00").await.err(402, "per_tx_limit_exceeded");
    s.spend(&a, "pay:y", "1.00").await.err(403, "scope_not_granted");
    s.spend(&b, "pay:x", "2.00").await.expect(200, None);

    let all = s.get("/v1/audit?limit=1000", &Auth::Admin).await;
    let all = all.ok();
    let events = all["events"].as_array().unwrap();
    assert_eq!(events.len(), 6);
    let head = all["head"].as_i64().unwrap();
    assert_eq!(events.last().unwrap()["seq"].as_i64(), Some(head));
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "ascending: {seqs:?}");

    // Newest first, two at a time, then the page before.
    let newest = s.get(&format!("/v1/audit?before={}&limit=2", head + 1), &Auth::Admin).await;
    let newest = newest.ok()["events"].as_array().unwrap().clone();
    assert_eq!(newest.iter().map(|e| e["seq"].as_i64().unwrap()).collect::<Vec<_>>(), [head, head - 1]);
    let older = s.get(&format!("/v1/audit?before={}&limit=2", head - 1), &Auth::Admin).await;
    assert_eq!(older.ok()["events"][0]["seq"].as_i64(), Some(head - 2));
    // After the head: nothing new yet; then exactly what came after.
    let none = s.get(&format!("/v1/audit?after={head}"), &Auth::Admin).await;
    assert_eq!(none.ok()["events"].as_array().unwrap().len(), 0);
    s.spend(&a, "pay:x", "0.10").await.expect(200, None);
    let next = s.get(&format!("/v1/audit?after={head}"), &Auth::Admin).await;
    let next = next.ok();
    assert_eq!(next["events"].as_array().unwrap().len(), 1);
    assert_eq!(next["events"][0]["agent"], "alpha");
    assert_eq!(next["head"].as_i64(), Some(head + 1));

    let denied = s.get("/v1/audit?agent=beta&outcome=denied&before=999999999", &Auth::Admin).await;
    let denied = denied.ok()["events"].as_array().unwrap().clone();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["reason"], "per_tx_limit_exceeded");
    let creates = s.get("/v1/audit?action=agent.create", &Auth::Admin).await;
    let creates = creates.ok()["events"].as_array().unwrap().clone();
    assert_eq!(creates.iter().map(|e| e["agent"].as_str().unwrap()).collect::<Vec<_>>(), ["alpha", "beta"]);
    let gw = s.get("/v1/audit?by=gateway", &Auth::Admin).await;
    assert_eq!(gw.ok()["events"].as_array().unwrap().len(), 0);

    for bad in ["outcome=maybe", "agent=Not%20A%20Handle", "action=DROP%20TABLE", "after=-1", "before=x", "by=%22"] {
        s.get(&format!("/v1/audit?{bad}"), &Auth::Admin)
            .await
            .err(400, if bad.starts_with("agent") { "invalid_handle" } else { "invalid_request" });
    }
    s.get("/v1/audit", &Auth::key(&a)).await.err(401, "invalid_credentials");
}

async fn recent_alerts(s: &Srv) {
    let k = s.agent("hot", &["pay:x"], "10.00").await;
    s.spend(&k, "pay:x", "8.50").await.expect(200, None);
    s.advance(1_000);
    s.spend(&k, "pay:x", "1.50").await.expect(200, None);
    s.advance(1_000);
    s.json("POST", "/v1/agents/hot/revoke", &Auth::Admin, json!({"reason": "test"})).await.expect(200, None);
    let r = s.get("/v1/alerts", &Auth::Admin).await;
    let alerts = r.ok()["alerts"].as_array().unwrap().clone();
    let types: Vec<&str> = alerts.iter().map(|a| a["alert"]["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["agent_revoked", "cap_reached", "threshold_crossed"], "newest first");
    assert!(alerts.iter().all(|a| a["alert"]["agent"] == "hot" && a["delivered"] == false));
    // Paged by the last id seen.
    let first = s.get("/v1/alerts?limit=1", &Auth::Admin).await;
    let id = first.ok()["alerts"][0]["id"].as_str().unwrap().to_owned();
    let rest = s.get(&format!("/v1/alerts?limit=5&after={id}"), &Auth::Admin).await;
    let rest = rest.ok()["alerts"].as_array().unwrap().clone();
    assert_eq!(rest.len(), 2);
    assert_eq!(rest[0]["alert"]["type"], "cap_reached");
    s.get("/v1/alerts", &Auth::key(&k)).await.expect(401, None);
}

#[tokio::test]
async fn usage_buckets_on_sqlite() {
    usage_in_buckets(&server(false).await.expect("a SQLite server")).await;
}

#[tokio::test]
async fn usage_buckets_on_postgres() {
    let Some(s) = server(true).await else { return };
    usage_in_buckets(&s).await;
}

#[tokio::test]
async fn fleet_audit_on_sqlite() {
    fleet_audit(&server(false).await.expect("a SQLite server")).await;
}

#[tokio::test]
async fn fleet_audit_on_postgres() {
    let Some(s) = server(true).await else { return };
    fleet_audit(&s).await;
}

#[tokio::test]
async fn alerts_on_sqlite() {
    recent_alerts(&server(false).await.expect("a SQLite server")).await;
}

#[tokio::test]
async fn alerts_on_postgres() {
    let Some(s) = server(true).await else { return };
    recent_alerts(&s).await;
}

async fn raw(s: &Srv, path: &str, if_none_match: Option<&str>) -> (u16, axum::http::HeaderMap, Vec<u8>) {
    let mut req = Request::builder().uri(path);
    if let Some(t) = if_none_match {
        req = req.header("if-none-match", t);
    }
    let resp = s.router.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.into_body().collect().await.unwrap().to_bytes().to_vec())
}

#[tokio::test]
async fn the_console_is_served_with_a_strict_policy() {
    let s = server(false).await.expect("a SQLite server");
    for path in ["/console", "/console/"] {
        let (status, h, body) = raw(&s, path, None).await;
        assert_eq!(status, 200);
        assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
        let csp = h["content-security-policy"].to_str().unwrap();
        for d in ["default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"] {
            assert!(csp.contains(d), "{csp}");
        }
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["referrer-policy"], "no-referrer");
        let html = String::from_utf8(body).unwrap();
        assert!(html.contains("type=\"password\""), "asks for the token in a password field");
        assert!(html.contains("/console/js/app.js"));
    }
    let (status, h, body) = raw(&s, "/console/js/app.js", None).await;
    assert_eq!(status, 200);
    assert!(h["content-type"].to_str().unwrap().starts_with("text/javascript"));
    assert!(String::from_utf8(body).unwrap().contains("sessionStorage"));
    let etag = h["etag"].to_str().unwrap().to_owned();
    let (status, h, body) = raw(&s, "/console/js/app.js", Some(&etag)).await;
    assert_eq!((status, body.len()), (304, 0));
    assert_eq!(h["etag"].to_str().unwrap(), etag);
    let (status, _, _) = raw(&s, "/console/js/app.js", Some("\"other\"")).await;
    assert_eq!(status, 200);
    for missing in ["/console/nope.js", "/console/../Cargo.toml", "/console/js/../../src/console.rs"] {
        let (status, _, body) = raw(&s, missing, None).await;
        assert_eq!(status, 404, "{missing}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
    }
}
