//! Shared harness of the HTTP-surface tests: a real SQLite store in a temp dir (or a fresh
//! PostgreSQL database), a manual clock, and the router driven in-process with
//! `tower::ServiceExt::oneshot` — or, for [`Srv::on_the_wire`], the production connection path
//! (`http::accept`, `http::serve`) on a loopback socket, each request written as raw HTTP/1.1.
//!
//! Every answer that goes through [`Srv::call`] is checked against the contract's global rules:
//! a non-2xx body is exactly `{"error": {"code", "message", …}}`, and every amount is a decimal
//! string with 2 to 6 decimals. Every body is also recorded, so a test can assert that no answer
//! ever carried a secret.

#![allow(dead_code, unused_imports)]

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request};
use bulkhead_core::ManualClock;
use bulkhead_server::{AppState, app, install_metrics};
use bulkhead_store::{Ledger, LedgerConfig, Store};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

/// The admin token of every test server.
pub(crate) const ADMIN: &str = "adm_test_0123456789_abcdefghijklmnopqrstuvwxyz";
pub(crate) use bulkhead_testkit::{HOUR, T0};

/// How a request authenticates.
#[derive(Clone, Debug)]
pub(crate) enum Auth {
    None,
    Admin,
    Bearer(String),
    Raw(Vec<u8>),
}

impl Auth {
    pub(crate) fn key(k: &str) -> Auth {
        Auth::Bearer(k.to_owned())
    }
}

/// One answer.
#[derive(Debug)]
pub(crate) struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
    pub json: Value,
}

impl Resp {
    pub(crate) fn code(&self) -> Option<&str> {
        self.json["error"]["code"].as_str()
    }

    /// Asserts the status (and, for errors, the code), showing the body when it fails.
    #[track_caller]
    pub(crate) fn expect(&self, status: u16, code: Option<&str>) -> &Resp {
        assert_eq!(self.status, status, "unexpected status; body: {}", self.text);
        if let Some(c) = code {
            assert_eq!(self.code(), Some(c), "unexpected code; body: {}", self.text);
        }
        self
    }

    #[track_caller]
    pub(crate) fn ok(&self) -> &Value {
        assert!((200..300).contains(&self.status), "expected 2xx, got {}: {}", self.status, self.text);
        &self.json
    }

    #[track_caller]
    pub(crate) fn err(&self, status: u16, code: &str) {
        self.expect(status, Some(code));
    }
}

pub(crate) struct Srv {
    pub router: Router,
    pub ledger: Ledger,
    pub clock: Arc<ManualClock>,
    pub dir: tempfile::TempDir,
    /// Every response body seen, in order.
    pub seen: Mutex<Vec<String>>,
    /// Requests go over a real socket to this address instead of into the router.
    pub wire: Option<std::net::SocketAddr>,
}

pub(crate) use bulkhead_testkit::Db;

impl Srv {
    /// A server on a SQLite file, its router driven in-process.
    pub(crate) async fn new() -> Srv {
        Srv::build(Db::Sqlite, false).await
    }

    /// A server on `db` answering over a real loopback socket, through the production
    /// connection path.
    pub(crate) async fn on_the_wire(db: Db) -> Srv {
        Srv::build(db, true).await
    }

    async fn build(db: Db, wire: bool) -> Srv {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = match db {
            Db::Sqlite => bulkhead_testkit::sqlite_url(dir.path()),
            Db::Postgres => bulkhead_testkit::fresh_pg_url()
                .await
                .expect("a PostgreSQL test checks `Db::Postgres.available()` before it starts a server"),
        };
        let store = Store::open(&url).await.expect("open store");
        let clock = bulkhead_testkit::manual_clock();
        let cfg = LedgerConfig { seed: Some(bulkhead_testkit::seed()), ..LedgerConfig::default() };
        let (ledger, _writer) = Ledger::start(store, clock.clone(), cfg);
        let router = app(AppState {
            ledger: ledger.clone(),
            admin_token: Arc::from(ADMIN),
            metrics: install_metrics(),
            metrics_open: true,
        });
        let mut addr = None;
        if wire {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
            addr = Some(listener.local_addr().expect("addr"));
            let (queue, conns) = bulkhead_server::http::worker_queue();
            tokio::spawn(bulkhead_server::http::serve(conns, router.clone(), None, None, std::future::pending()));
            tokio::spawn(bulkhead_server::http::accept(listener, vec![queue], 256, std::future::pending()));
        }
        Srv { router, ledger, clock, dir, seen: Mutex::new(Vec::new()), wire: addr }
    }

    /// One request written as raw HTTP/1.1 on a new connection: (status, headers, body).
    async fn raw_http(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
        auth: &Auth,
        headers: &[(&str, &[u8])],
        body: &[u8],
    ) -> (u16, HeaderMap, Vec<u8>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut req: Vec<u8> =
            format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n").into_bytes();
        let mut header = |name: &str, value: &[u8]| {
            req.extend_from_slice(name.as_bytes());
            req.extend_from_slice(b": ");
            req.extend_from_slice(value);
            req.extend_from_slice(b"\r\n");
        };
        match auth {
            Auth::None => {}
            Auth::Admin => header("authorization", format!("Bearer {ADMIN}").as_bytes()),
            Auth::Bearer(k) => header("authorization", format!("Bearer {k}").as_bytes()),
            Auth::Raw(b) => header("authorization", b),
        }
        for (name, value) in headers {
            header(name, value);
        }
        header("content-type", b"application/json");
        if !body.is_empty() || !matches!(method, "GET" | "HEAD") {
            header("content-length", body.len().to_string().as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(body);
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(&req).await.expect("write request");
        let mut out = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(60), tcp.read_to_end(&mut out))
            .await
            .expect("an answer in time")
            .expect("read answer");
        let end = out.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete answer head");
        let head = String::from_utf8_lossy(&out[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status: u16 = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("status");
        let mut map = HeaderMap::new();
        for l in lines {
            if let Some((n, v)) = l.split_once(':')
                && let (Ok(n), Ok(v)) =
                    (axum::http::HeaderName::from_bytes(n.trim().as_bytes()), HeaderValue::from_str(v.trim()))
            {
                map.append(n, v);
            }
        }
        let mut rest = out[end + 4..].to_vec();
        if map.get("transfer-encoding").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked")) {
            let mut body = Vec::new();
            loop {
                let nl = rest.windows(2).position(|w| w == b"\r\n").expect("a chunk size line");
                let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..nl]).trim(), 16).expect("chunk size");
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
                rest.drain(..nl + 2 + size + 2);
            }
            rest = body;
        }
        (status, map, rest)
    }

    pub(crate) fn now(&self) -> i64 {
        use bulkhead_core::Clock;
        self.clock.now_ms()
    }

    pub(crate) fn set_now(&self, ms: i64) {
        self.clock.set_ms(ms);
    }

    pub(crate) fn advance(&self, ms: i64) {
        self.clock.advance_ms(ms);
    }

    /// Sends one request and checks the answer against the contract's global rules.
    pub(crate) async fn call(
        &self,
        method: &str,
        path: &str,
        auth: &Auth,
        headers: &[(&str, &[u8])],
        body: impl Into<Body>,
    ) -> Resp {
        let mut req = Request::builder().method(Method::from_bytes(method.as_bytes()).unwrap()).uri(path);
        match auth {
            Auth::None => {}
            Auth::Admin => req = req.header("authorization", format!("Bearer {ADMIN}")),
            Auth::Bearer(k) => req = req.header("authorization", format!("Bearer {k}")),
            Auth::Raw(b) => req = req.header("authorization", HeaderValue::from_bytes(b).expect("header bytes")),
        }
        for (name, value) in headers {
            req = req.header(*name, HeaderValue::from_bytes(value).expect("header bytes"));
        }
        let body: Body = body.into();
        let (status, headers, bytes) = match self.wire {
            Some(addr) => {
                let body = body.collect().await.expect("request body").to_bytes();
                let (status, headers, bytes) = Srv::raw_http(addr, method, path, auth, headers, &body).await;
                (status, headers, axum::body::Bytes::from(bytes))
            }
            None => {
                let req = req.header("content-type", "application/json").body(body).unwrap();
                let resp = self.router.clone().oneshot(req).await.expect("router is infallible");
                let status = resp.status().as_u16();
                let headers = resp.headers().clone();
                (status, headers, resp.into_body().collect().await.expect("body").to_bytes())
            }
        };
        let text = String::from_utf8(bytes.to_vec()).expect("answers are UTF-8");
        self.seen.lock().unwrap().push(text.clone());
        let json = if path == "/metrics" { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::Null) };
        let r = Resp { status, headers, text, json };
        if path != "/metrics" {
            assert!(r.json.is_object(), "{method} {path}: answer is not a JSON object: {:?}", r.text);
            // The OpenAPI document names amount fields, with schemas for values.
            if path != "/openapi.json" {
                check_amounts(&r.json, "");
            }
        }
        if !(200..300).contains(&status) {
            assert_error_shape(&r);
        }
        assert!(status < 500, "{method} {path}: server error {status}: {}", r.text);
        r
    }

    pub(crate) async fn json(&self, method: &str, path: &str, auth: &Auth, body: Value) -> Resp {
        self.call(method, path, auth, &[], body.to_string()).await
    }

    pub(crate) async fn get(&self, path: &str, auth: &Auth) -> Resp {
        self.call("GET", path, auth, &[], Body::empty()).await
    }

    /// Creates an agent as admin; returns (agent object, key).
    pub(crate) async fn create(&self, spec: Value) -> (Value, String) {
        let r = self.json("POST", "/v1/agents", &Auth::Admin, spec).await;
        r.expect(201, None);
        let key = r.json["key"].as_str().expect("key in 201").to_owned();
        (r.json, key)
    }

    /// Creates a simple agent: scopes, cap.
    pub(crate) async fn agent(&self, handle: &str, scopes: &[&str], cap: &str) -> String {
        self.create(json!({"handle": handle, "scopes": scopes, "spending_cap": cap})).await.1
    }

    pub(crate) async fn spend(&self, key: &str, scope: &str, amount: &str) -> Resp {
        self.json("POST", "/v1/spend", &Auth::key(key), json!({"scope": scope, "amount": amount})).await
    }

    pub(crate) async fn hold(&self, key: &str, scope: &str, amount: &str, expires_in: Option<&str>) -> Resp {
        let mut b = json!({"scope": scope, "amount": amount});
        if let Some(e) = expires_in {
            b["expires_in"] = json!(e);
        }
        self.json("POST", "/v1/holds", &Auth::key(key), b).await
    }

    /// GET /v1/agents/{handle} as admin, asserting 200.
    pub(crate) async fn agent_view(&self, handle: &str) -> Value {
        let r = self.get(&format!("/v1/agents/{handle}"), &Auth::Admin).await;
        r.expect(200, None);
        r.json.clone()
    }

    pub(crate) async fn usage(&self, handle: &str) -> Value {
        self.agent_view(handle).await["usage"].clone()
    }

    pub(crate) async fn audit(&self, handle: &str) -> Vec<Value> {
        let r = self.get(&format!("/v1/agents/{handle}/audit?limit=1000"), &Auth::Admin).await;
        r.expect(200, None);
        r.json["events"].as_array().expect("events").clone()
    }

    pub(crate) async fn healthy(&self) {
        let r = self.get("/healthz", &Auth::None).await;
        assert_eq!(r.status, 200, "healthz: {}", r.text);
    }

    /// The SQLite files' bytes (database and WAL).
    pub(crate) fn db_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for f in ["bulkhead.db", "bulkhead.db-wal"] {
            if let Ok(b) = std::fs::read(self.dir.path().join(f)) {
                out.extend(b);
            }
        }
        out
    }
}

/// Renders Unix milliseconds the way the API does (RFC 3339, UTC).
pub(crate) fn rfc3339(ms: i64) -> String {
    bulkhead_store::fmt_time(ms)
}

pub(crate) fn is_snake_case(s: &str) -> bool {
    !s.is_empty()
        && s.as_bytes()[0].is_ascii_lowercase()
        && !s.ends_with('_')
        && !s.contains("__")
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A non-2xx body is exactly `{"error": {"code": <snake_case>, "message": <non-empty>, …}}`.
#[track_caller]
pub(crate) fn assert_error_shape(r: &Resp) {
    let top = r.json.as_object().unwrap_or_else(|| panic!("error body is not a JSON object: {:?}", r.text));
    // A 402 adds what the agent needs to recover, beside `error` (contract §5).
    let extra: &[&str] = if r.status == 402 { &["remaining", "window_resets_at"] } else { &[] };
    let others: Vec<&String> = top.keys().filter(|k| *k != "error").collect();
    assert!(others.iter().all(|k| extra.contains(&k.as_str())), "error body has keys besides `error`: {}", r.text);
    if r.status == 402 {
        assert_eq!(others.len(), 2, "a 402 says how to recover: {}", r.text);
    }
    let e = top.get("error").and_then(Value::as_object).unwrap_or_else(|| panic!("no error object: {}", r.text));
    let code = e.get("code").and_then(Value::as_str).unwrap_or_else(|| panic!("no error.code: {}", r.text));
    assert!(is_snake_case(code), "error.code is not snake_case: {code:?}");
    let msg = e.get("message").and_then(Value::as_str).unwrap_or_else(|| panic!("no error.message: {}", r.text));
    assert!(!msg.trim().is_empty(), "empty error.message: {}", r.text);
    let ct = r.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    assert!(ct.starts_with("application/json"), "error content-type is {ct:?}");
}

/// A money string: digits, a point, 2 to 6 decimals.
pub(crate) fn is_amount(s: &str) -> bool {
    let Some((i, f)) = s.split_once('.') else { return false };
    !i.is_empty()
        && i.bytes().all(|b| b.is_ascii_digit())
        && (2..=6).contains(&f.len())
        && f.bytes().all(|b| b.is_ascii_digit())
        && (f.len() == 2 || !f.ends_with('0'))
}

const AMOUNT_KEYS: &[&str] = &[
    "amount",
    "spending_cap",
    "per_tx_limit",
    "lifetime_cap",
    "window_spent",
    "window_held",
    "lifetime_spent",
    "captured",
    "released",
];

/// Every amount anywhere in an answer is a decimal string with at least 2 decimals.
#[track_caller]
pub(crate) fn check_amounts(v: &Value, parent: &str) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let money = AMOUNT_KEYS.contains(&k.as_str()) || (parent == "remaining" && k != "id");
                if money && !x.is_null() {
                    let s = x.as_str().unwrap_or_else(|| panic!("amount `{k}` is not a string: {x}"));
                    assert!(is_amount(s), "amount `{k}` is not rendered with 2..6 decimals: {s:?}");
                }
                check_amounts(x, k);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| check_amounts(x, parent)),
        _ => {}
    }
}

/// `n` nested arrays.
pub(crate) fn nested(n: usize) -> String {
    format!("{}{}", "[".repeat(n), "]".repeat(n))
}
