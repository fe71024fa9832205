//! The agent gateway end to end (contract §8): the real `bulkhead serve` binary in front of a
//! real upstream process (`mock-upstream`, an OpenAI/Anthropic-compatible server), all over
//! loopback.
//!
//! What they hold the gateway to: an agent looping 4,000 calls reaches the upstream exactly as
//! often as its cap allows; a denied call never reaches the upstream; the real secret is set on
//! every forwarded call and appears in no answer, log line, audit event or metric; streamed and
//! non-streamed usage are metered exactly (token prices rounded up); SSE chunks reach the agent
//! before the upstream has finished; a client that hangs up mid-stream is still charged; path
//! tricks never leave the upstream's base; upstream failures and timeouts release the hold.

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{ADMIN, Api, Backend, Server, micros, micros_of, root_agent, start_mock_upstream, usage};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OPENAI_SECRET: &str = "sk-gw-test-openai-5f0c2a9e71d84b3c";
const ANTHROPIC_SECRET: &str = "sk-ant-gw-test-8d21c7e04a9b";
const SEARCH_SECRET: &str = "search-gw-test-3b7e19c0";
const SECRETS: [&str; 3] = [OPENAI_SECRET, ANTHROPIC_SECRET, SEARCH_SECRET];

/// Runs one scenario against the embedded SQLite store and against PostgreSQL.
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name(super::Backend::sqlite()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                if let Some(b) = super::Backend::pg().await {
                    super::$name(b).await;
                }
            }
        }
    )*};
}

both_stores!(
    agent_loop_stops_at_the_cap,
    revocation_is_obeyed_at_once_under_a_lease,
    a_crash_never_makes_calls_free,
    a_graceful_stop_settles_every_call,
    secrets_are_injected_and_never_leak,
    usage_is_metered_exactly,
    upstream_failures_release_the_hold,
    forwarded_calls_that_time_out_are_paid,
    denied_calls_never_reach_the_upstream,
    the_hold_bounds_the_cost_and_routes_bind
);

/// The upstream process. Dropping it kills it.
struct Mock {
    _child: tokio::process::Child,
    base: String,
    http: reqwest::Client,
}

impl Mock {
    async fn start() -> Mock {
        let (child, base) = start_mock_upstream().await;
        Mock { _child: child, base, http: reqwest::Client::builder().no_proxy().build().expect("client") }
    }

    async fn stats(&self) -> Value {
        self.http.get(format!("{}/__stats", self.base)).send().await.expect("stats").json().await.expect("json")
    }

    async fn calls_seen(&self) -> u64 {
        self.stats().await["calls"].as_u64().expect("calls")
    }

    async fn records(&self) -> Vec<Value> {
        let v: Value =
            self.http.get(format!("{}/__calls", self.base)).send().await.expect("calls").json().await.expect("json");
        v["calls"].as_array().expect("calls").clone()
    }

    async fn open(&self, gate: &str) {
        let r = self.http.post(format!("{}/__open/{gate}", self.base)).send().await.expect("open gate");
        assert_eq!(r.status().as_u16(), 204);
    }
}

/// A loopback port with nothing listening.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The upstreams every test's server has, all pointing at `mock`.
fn config(mock: &Mock) -> String {
    let m = &mock.base;
    let dead = closed_port();
    format!(
        r#"
[breaker]
denials = 0

[[upstream]]
name = "openai"
base_url = "{m}/base/"
scope = "llm:openai"
secret_env = "GW_TEST_OPENAI_KEY"
max_cost_per_request = "0.50"
pricing = {{ kind = "openai_usage", input_per_million = "2.50", output_per_million = "10.00" }}
max_request_bytes = 4096

[[upstream]]
name = "anthropic"
base_url = "{m}"
scope = "llm:anthropic"
secret_env = "GW_TEST_ANTHROPIC_KEY"
auth_header = "x-api-key"
auth_format = "{{secret}}"
max_cost_per_request = "1.00"
pricing = {{ kind = "anthropic_usage", input_per_million = "3.00", output_per_million = "15.00", cache_write_per_million = "3.75", cache_read_per_million = "0.30" }}

[[upstream]]
name = "search"
base_url = "{m}/base"
scope = "tools:search"
secret_env = "GW_TEST_SEARCH_KEY"
auth_format = "Token {{secret}}"
max_cost_per_request = "0.01"
pricing = {{ kind = "per_request", price = "0.01" }}
max_request_bytes = 1024

[[upstream]]
name = "search-strict"
base_url = "{m}"
scope = "tools:search"
max_cost_per_request = "0.01"
pricing = {{ kind = "per_request", price = "0.01" }}
charge_failures = true

[[upstream]]
name = "pay"
base_url = "{m}"
scope = "tools:pay"
secret_env = "GW_TEST_SEARCH_KEY"
max_cost_per_request = "2.00"
pricing = {{ kind = "response_header", header = "x-upstream-cost" }}

[[upstream]]
name = "slow"
base_url = "{m}"
scope = "llm:openai"
secret_env = "GW_TEST_OPENAI_KEY"
max_cost_per_request = "0.50"
pricing = {{ kind = "openai_usage", input_per_million = "2.50", output_per_million = "10.00" }}
read_timeout = "1s"

[[upstream]]
name = "slow-strict"
base_url = "{m}"
scope = "tools:search"
max_cost_per_request = "0.01"
pricing = {{ kind = "per_request", price = "0.01" }}
read_timeout = "1s"
charge_failures = true

[[upstream]]
name = "routed"
base_url = "{m}"
scope = "llm:openai"
secret_env = "GW_TEST_OPENAI_KEY"
max_cost_per_request = "0.01"
pricing = {{ kind = "openai_usage", input_per_million = "2.50", output_per_million = "10.00" }}
routes = ["POST /v1/chat/completions", "GET /v1/models/*"]

[[upstream]]
name = "dead"
base_url = "http://127.0.0.1:{dead}"
scope = "tools:search"
max_cost_per_request = "0.01"
pricing = {{ kind = "per_request", price = "0.01" }}
connect_timeout = "2s"
"#
    )
}

/// Points `b` at a config for `mock` with the secrets in the environment.
fn configure(b: &mut Backend, mock: &Mock, rust_log: Option<&str>) {
    let path = b.scratch("gateway.toml");
    std::fs::write(&path, config(mock)).expect("write config");
    b.config = Some(path);
    b.env = vec![
        ("GW_TEST_OPENAI_KEY".into(), OPENAI_SECRET.into()),
        ("GW_TEST_ANTHROPIC_KEY".into(), ANTHROPIC_SECRET.into()),
        ("GW_TEST_SEARCH_KEY".into(), SEARCH_SECRET.into()),
    ];
    if let Some(l) = rust_log {
        b.env.push(("RUST_LOG".into(), l.into()));
    }
}

/// A mock upstream and a gateway in front of it.
async fn setup(mut b: Backend, rust_log: Option<&str>) -> (Backend, Mock, Server) {
    let mock = Mock::start().await;
    configure(&mut b, &mock, rust_log);
    let srv = Server::start(&b).await;
    (b, mock, srv)
}

/// A root agent (breaker off) with these scopes and cap; returns its key.
async fn agent(api: &Api, handle: &str, cap: &str, scopes: &[&str]) -> String {
    api.create(ADMIN, root_agent(handle, cap, scopes)).await
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(120)).build().expect("client")
}

/// One gateway call: status, headers as text, body text.
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    fn code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or("").to_owned()
    }
}

async fn call(
    c: &reqwest::Client,
    srv: &Server,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Answer {
    let mut rb = c.request(method, format!("{}{path}", srv.base));
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
    let status = r.status().as_u16();
    let headers = format!("{:?}", r.headers());
    let body = r.text().await.expect("body");
    Answer { status, headers, body }
}

/// `(window_spent, window_held)` of an agent, in micro-units.
async fn money(api: &Api, handle: &str) -> (i64, i64) {
    let a = api.agent(ADMIN, handle).await;
    (usage(&a, "window_spent"), usage(&a, "window_held"))
}

/// `(window_spent, window_held)` once every call of the agent is settled: calls are settled a
/// moment after their answer ends, and idle leases give their unused slots back, so nothing is
/// held once the agent is quiet.
async fn settled(api: &Api, handle: &str) -> (i64, i64) {
    for _ in 0..200 {
        let m = money(api, handle).await;
        if m.1 == 0 {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the calls of {handle} were not settled within 10 s: {:?}", money(api, handle).await)
}

/// A token price per million applied to `n` tokens, rounded up to the micro-unit.
fn tokens(n: i64, price_per_million: &str) -> i64 {
    (n * micros(price_per_million) + 999_999) / 1_000_000
}

/// Contract §8 and the product's story: an agent loops 4,000 paid calls; the upstream sees
/// exactly as many as the cap allows, and every other call is denied with the contract's body.
async fn agent_loop_stops_at_the_cap(b: Backend) {
    let (b, mock, srv) = setup(b, None).await;
    let api = srv.api();
    // $10.00 at $0.01 a call: exactly 1,000 calls.
    let key = agent(&api, "looping-agent", "10.00", &["tools:search"]).await;
    let sent = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (sent, key, base) = (sent.clone(), key.clone(), srv.base.clone());
        tasks.push(tokio::spawn(async move {
            let c = http();
            let (mut ok, mut denied) = (0usize, Vec::new());
            while sent.fetch_add(1, Ordering::SeqCst) < 4000 {
                let r = c
                    .get(format!("{base}/proxy/search/v1/search?q=loop"))
                    .bearer_auth(&key)
                    .send()
                    .await
                    .expect("gateway call");
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                match status {
                    200 => {
                        assert_eq!(body["echo"], true, "the upstream's answer is passed on: {body}");
                        ok += 1;
                    }
                    _ => denied.push((status, body["error"]["code"].as_str().unwrap_or("").to_owned(), body)),
                }
            }
            (ok, denied)
        }));
    }
    let (mut ok, mut denied) = (0, Vec::new());
    for t in tasks {
        let (o, d) = t.await.expect("worker");
        ok += o;
        denied.extend(d);
    }
    assert_eq!(ok, 1000, "exactly the cap's worth of calls is allowed");
    assert_eq!(denied.len(), 3000);
    for (status, code, body) in &denied {
        assert_eq!((*status, code.as_str()), (402, "spending_cap_exceeded"), "denial body: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "error message: {body}");
    }
    assert_eq!(mock.calls_seen().await, 1000, "the upstream saw exactly the allowed calls");
    let (spent, held) = settled(&api, "looping-agent").await;
    assert_eq!((spent, held), (micros("10.00"), 0), "spent exactly the cap, nothing left held");
    for r in mock.records().await {
        assert_eq!(r["headers"]["authorization"], format!("Token {SEARCH_SECRET}"), "secret injected: {r}");
        assert_eq!(r["path"], "/base/v1/search");
        assert_eq!(r["query"], "q=loop");
    }
    b.assert_audit_intact().await;
}

/// The secret is injected on every forwarded call (replacing whatever the agent sent) and
/// appears in no answer, log line (at trace level), audit event or metric.
async fn secrets_are_injected_and_never_leak(b: Backend) {
    let (b, mock, srv) = setup(b, Some("trace")).await;
    let api = srv.api();
    let key = agent(&api, "leaky", "100.00", &["llm:*", "tools:*"]).await;
    let c = http();
    let mut answers = Vec::new();
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let post = reqwest::Method::POST;
    let get = reqwest::Method::GET;
    // The agent also sends a fake upstream credential of its own: it must be replaced.
    let fake = [("x-api-key", "agent-fake-key"), ("proxy-authorization", "Basic Zm9vOmJhcg==")];
    answers.push(
        call(&c, &srv, post.clone(), "/proxy/openai/v1/chat/completions", Some(&key), &fake, Some(chat.clone())).await,
    );
    let mut stream = chat.clone();
    stream["stream"] = json!(true);
    answers
        .push(call(&c, &srv, post.clone(), "/proxy/openai/v1/chat/completions", Some(&key), &fake, Some(stream)).await);
    answers.push(
        call(&c, &srv, post.clone(), "/proxy/anthropic/v1/messages", Some(&key), &fake, Some(chat.clone())).await,
    );
    answers.push(call(&c, &srv, get.clone(), "/proxy/search/v1/search", Some(&key), &fake, None).await);
    answers
        .push(call(&c, &srv, get.clone(), "/proxy/pay/v1/charge", Some(&key), &[("x-mock-price", "0.10")], None).await);
    // Failures of every kind.
    let failing = [("x-mock-status", "500")];
    answers.push(
        call(&c, &srv, post.clone(), "/proxy/openai/v1/chat/completions", Some(&key), &failing, Some(chat.clone()))
            .await,
    );
    answers
        .push(call(&c, &srv, get.clone(), "/proxy/slow/v1/x", Some(&key), &[("x-mock-delay-ms", "4000")], None).await);
    answers.push(call(&c, &srv, get.clone(), "/proxy/dead/v1/x", Some(&key), &[], None).await);
    answers.push(call(&c, &srv, get.clone(), "/proxy/search/v1/search", None, &[], None).await);
    answers.push(call(&c, &srv, get.clone(), "/proxy/search/v1%2f..%2fx", Some(&key), &[], None).await);
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 500, 504, 502, 401, 400], "answers");

    let records = mock.records().await;
    assert_eq!(records.len(), 7, "forwarded calls (the dead, unauthenticated and tricky ones never arrive)");
    for r in &records {
        let h = &r["headers"];
        let path = r["path"].as_str().expect("path");
        if path.ends_with("/messages") {
            // The agent's own `x-api-key` (the upstream's auth header) was replaced.
            assert_eq!(h["x-api-key"], ANTHROPIC_SECRET, "anthropic gets the real key: {r}");
            assert!(h.get("authorization").is_none(), "the agent's key is removed: {r}");
        } else if path.starts_with("/base/v1/search") {
            assert_eq!(h["authorization"], format!("Token {SEARCH_SECRET}"));
        } else if path.starts_with("/v1/charge") {
            assert_eq!(h["authorization"], format!("Bearer {SEARCH_SECRET}"));
        } else {
            assert_eq!(h["authorization"], format!("Bearer {OPENAI_SECRET}"), "openai gets the real key: {r}");
        }
        let text = r.to_string();
        assert!(!text.contains("bk_"), "the agent's key reached the upstream: {r}");
        assert!(h.get("proxy-authorization").is_none(), "hop-by-hop header forwarded: {r}");
    }

    let metrics_text =
        c.get(format!("{}/metrics", srv.base)).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics_text.contains("bulkhead_gateway_calls_total"), "gateway metrics exported");
    assert!(metrics_text.contains("bulkhead_gateway_leases_total"), "lease metrics exported");
    assert!(metrics_text.contains("bulkhead_gateway_lease_slots_total"), "lease metrics exported");
    let audit = b.offline(&["audit", "export"]).await;
    assert!(audit.status.success());
    let audit = String::from_utf8_lossy(&audit.stdout).into_owned();
    assert!(audit.contains("hold_"), "the gateway's holds are audited");
    let logs = srv.logs();
    assert!(logs.contains("TRACE") || logs.contains("DEBUG"), "the log ran at trace level");
    for secret in SECRETS {
        for a in &answers {
            assert!(!a.body.contains(secret) && !a.headers.contains(secret), "secret in an answer: {}", a.body);
        }
        assert!(!logs.contains(secret), "secret in the server's log");
        assert!(!audit.contains(secret), "secret in the audit trail");
        assert!(!metrics_text.contains(secret), "secret in /metrics");
    }
}

/// A revocation is obeyed by the very next call, even while the key's lease still has unused
/// slots; every call made before it is charged all the same (its lease is settled, not dropped).
async fn revocation_is_obeyed_at_once_under_a_lease(b: Backend) {
    let (b, mock, srv) = setup(b, None).await;
    let api = srv.api();
    let key = agent(&api, "leased", "100.00", &["tools:search"]).await;
    let c = http();
    let calls = 40;
    for _ in 0..calls {
        let a = call(&c, &srv, reqwest::Method::GET, "/proxy/search/v1/search?q=x", Some(&key), &[], None).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let seen = mock.calls_seen().await;
    assert_eq!(seen, calls);
    let r = api.post("/v1/agents/leased/revoke", ADMIN, &json!({"reason": "test"})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let a = call(&c, &srv, reqwest::Method::GET, "/proxy/search/v1/search?q=x", Some(&key), &[], None).await;
    assert_eq!((a.status, a.code().as_str()), (401, "credential_revoked"), "{}", a.body);
    assert_eq!(mock.calls_seen().await, seen, "the upstream never saw the revoked call");
    let (spent, held) = settled(&api, "leased").await;
    assert_eq!((spent, held), (calls as i64 * micros("0.01"), 0), "every call before the revocation is charged");
    let slots: Vec<u64> = api
        .audit(ADMIN, "leased")
        .await
        .iter()
        .filter(|e| e["action"] == "hold")
        .filter_map(|e| e["detail"]["slots"].as_u64())
        .collect();
    assert!(slots.iter().any(|n| *n > 1), "calls shared leases of several slots: {slots:?}");
    b.assert_audit_intact().await;
}

/// Two replicas on one PostgreSQL store: a revocation answered by one stops the very next call
/// through the other, although that one holds a lease with unused slots for the key and, busy
/// with a caller that never pauses, trusts a recent read of the store's authorization epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocation_on_one_replica_stops_the_other_replicas_gateway() {
    let Some(b) = Backend::pg().await else { return };
    let (b, mock, a) = setup(b, None).await;
    let other = Server::start(&b).await;
    let api = a.api();
    let c = http();
    // Three times, as the race it guards against is a matter of milliseconds.
    for handle in ["two-sided-1", "two-sided-2", "two-sided-3"] {
        let key = agent(&api, handle, "100.00", &["tools:search"]).await;
        let before = mock.calls_seen().await;
        for _ in 0..40 {
            let r = call(&c, &a, reqwest::Method::GET, "/proxy/search/v1/search?q=x", Some(&key), &[], None).await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
        // A caller that goes on until it is refused: (when each call was sent, its status, its code).
        let allowed = Arc::new(AtomicUsize::new(0));
        let busy = tokio::spawn({
            let (c, base, key, allowed) = (c.clone(), a.base.clone(), key.clone(), allowed.clone());
            async move {
                let mut seen = Vec::new();
                loop {
                    let sent = std::time::Instant::now();
                    let r = c.get(format!("{base}/proxy/search/v1/search?q=busy")).bearer_auth(&key).send().await;
                    let r = r.expect("gateway call");
                    let status = r.status().as_u16();
                    let v: Value = r.json().await.unwrap_or(Value::Null);
                    seen.push((sent, status, v["error"]["code"].as_str().unwrap_or_default().to_owned()));
                    if status != 200 {
                        return seen;
                    }
                    allowed.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        // The revocation comes once the busy caller is under way (20 calls allowed), not after a
        // guessed delay.
        let mut waited = 0;
        while allowed.load(Ordering::SeqCst) < 20 {
            waited += 1;
            assert!(waited < 6_000, "the busy caller never got going");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let r = other.api().post(&format!("/v1/agents/{handle}/revoke"), ADMIN, &json!({})).await;
        let answered = std::time::Instant::now();
        assert_eq!(r.status, 200, "{:?}", r.body);
        let r = call(&c, &a, reqwest::Method::GET, "/proxy/search/v1/search?q=x", Some(&key), &[], None).await;
        assert_eq!((r.status, r.code().as_str()), (401, "credential_revoked"), "{}", r.body);
        let busy = busy.await.expect("busy caller");
        let ok = busy.iter().filter(|(_, s, _)| *s == 200).count();
        assert!(ok >= 20, "the busy caller kept the gateway busy: {ok} calls");
        let (_, status, code) = busy.last().expect("calls");
        assert_eq!(
            (*status, code.as_str()),
            (401, "credential_revoked"),
            "the busy caller was stopped by the revocation"
        );
        for (sent, status, _) in &busy {
            assert!(*sent < answered || *status == 401, "a call sent after the revocation was answered went through");
        }
        let calls = 40 + ok as u64;
        assert_eq!(mock.calls_seen().await - before, calls, "the upstream saw exactly the allowed calls");
        assert_eq!(settled(&api, handle).await, (calls as i64 * micros("0.01"), 0), "every allowed call is charged");
    }
    b.assert_audit_intact().await;
}

/// `kill -9` right after calls were answered: what was not settled yet is still held by its
/// lease (captured in full when it expires), so no call is free and no cap is broken.
async fn a_crash_never_makes_calls_free(b: Backend) {
    let (b, mock, mut srv) = setup(b, None).await;
    let api = srv.api();
    let key = agent(&api, "crashy", "5.00", &["tools:search"]).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (key, base) = (key.clone(), srv.base.clone());
        tasks.push(tokio::spawn(async move {
            let c = http();
            let mut ok = 0i64;
            for _ in 0..40 {
                let r = c
                    .get(format!("{base}/proxy/search/v1/search?q=crash"))
                    .bearer_auth(&key)
                    .send()
                    .await
                    .expect("gateway call");
                if r.status().as_u16() == 200 {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0i64;
    for t in tasks {
        ok += t.await.expect("worker");
    }
    srv.kill9();
    assert_eq!(mock.calls_seen().await, ok as u64);
    let srv = Server::start(&b).await;
    let (spent, held) = money(&srv.api(), "crashy").await;
    assert!(spent + held >= ok * micros("0.01"), "answered calls are paid or still held: {spent} + {held} for {ok}");
    assert!(spent + held <= micros("5.00"), "the cap holds: {spent} + {held}");
    b.assert_audit_intact().await;
}

/// SIGTERM right after a burst of calls: the server settles every call and gives back every
/// unused slot before it exits, so after a restart the ledger is exact at once (no lease left to
/// expire).
async fn a_graceful_stop_settles_every_call(b: Backend) {
    let (b, _mock, mut srv) = setup(b, None).await;
    let key = agent(&srv.api(), "stopping", "100.00", &["tools:search"]).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (key, base) = (key.clone(), srv.base.clone());
        tasks.push(tokio::spawn(async move {
            let c = http();
            for _ in 0..30 {
                let r = c
                    .get(format!("{base}/proxy/search/v1/search?q=stop"))
                    .bearer_auth(&key)
                    .send()
                    .await
                    .expect("gateway call");
                assert_eq!(r.status().as_u16(), 200);
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
    srv.sigterm();
    assert!(srv.wait_exit().await.success(), "clean exit");
    let srv = Server::start(&b).await;
    assert_eq!(money(&srv.api(), "stopping").await, (240 * micros("0.01"), 0), "settled before the exit");
    b.assert_audit_intact().await;
}

/// Non-streamed and streamed usage, OpenAI and Anthropic, a fixed price and a price header are
/// charged exactly, and the stream's usage-only chunk is stripped unless the agent asked for it.
async fn usage_is_metered_exactly(b: Backend) {
    let (b, mock, srv) = setup(b, None).await;
    let api = srv.api();
    let key = agent(&api, "metered", "100.00", &["llm:*", "tools:*"]).await;
    let c = http();
    let post = reqwest::Method::POST;
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let mut expected = 0i64;

    // OpenAI, not streamed: 1234 in at $2.50/M (0.003085), 567 out at $10/M (0.00567).
    let a = call(
        &c,
        &srv,
        post.clone(),
        "/proxy/openai/v1/chat/completions",
        Some(&key),
        &[("x-mock-usage", "1234,567")],
        Some(chat.clone()),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["usage"]["prompt_tokens"], 1234, "the answer is passed on whole");
    expected += tokens(1234, "2.50") + tokens(567, "10.00");
    assert_eq!(settled(&api, "metered").await, (expected, 0), "non-streamed OpenAI usage");

    // OpenAI, streamed without include_usage: 3001 in (7502.5 micro-units, rounded up), 7 out.
    let mut stream = chat.clone();
    stream["stream"] = json!(true);
    let a = call(
        &c,
        &srv,
        post.clone(),
        "/proxy/openai/v1/chat/completions",
        Some(&key),
        &[("x-mock-usage", "3001,7")],
        Some(stream.clone()),
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(a.headers.contains("text/event-stream"), "{}", a.headers);
    let data: Vec<Value> = a
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("chunk is JSON"))
        .collect();
    assert_eq!(data.len(), 4, "three content chunks and the finish chunk, no usage chunk: {}", a.body);
    assert!(data.iter().all(|d| d["usage"].is_null()), "the usage-only chunk is stripped: {}", a.body);
    assert!(a.body.ends_with("data: [DONE]\n\n"), "the stream ends as the upstream ended it");
    let sent: Value =
        serde_json::from_str(mock.records().await.last().expect("record")["body"].as_str().expect("body"))
            .expect("forwarded body is JSON");
    assert_eq!(sent["stream_options"]["include_usage"], true, "the gateway asked for the usage chunk");
    assert_eq!(sent["messages"], chat["messages"], "the rest of the request is unchanged");
    expected += tokens(3001, "2.50") + tokens(7, "10.00");
    assert_eq!(tokens(3001, "2.50"), 7503, "token prices round up");
    assert_eq!(settled(&api, "metered").await, (expected, 0), "streamed OpenAI usage");

    // OpenAI, streamed with include_usage: the agent gets its usage chunk.
    stream["stream_options"] = json!({"include_usage": true});
    let a = call(
        &c,
        &srv,
        post.clone(),
        "/proxy/openai/v1/chat/completions",
        Some(&key),
        &[("x-mock-usage", "10,20")],
        Some(stream),
    )
    .await;
    assert!(a.body.contains("\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":20"), "{}", a.body);
    expected += tokens(10, "2.50") + tokens(20, "10.00");
    assert_eq!(settled(&api, "metered").await, (expected, 0), "streamed OpenAI usage, asked for");

    // Anthropic, not streamed, with cache tokens at their own prices.
    let a = call(
        &c,
        &srv,
        post.clone(),
        "/proxy/anthropic/v1/messages",
        Some(&key),
        &[("x-mock-usage", "2000,100,50,1000")],
        Some(chat.clone()),
    )
    .await;
    assert_eq!(a.status, 200);
    expected += tokens(2000, "3.00") + tokens(100, "15.00") + tokens(50, "3.75") + tokens(1000, "0.30");
    assert_eq!(settled(&api, "metered").await, (expected, 0), "non-streamed Anthropic usage");

    // Anthropic, streamed: input from message_start, output from message_delta.
    let mut astream = chat.clone();
    astream["stream"] = json!(true);
    let a = call(
        &c,
        &srv,
        post.clone(),
        "/proxy/anthropic/v1/messages",
        Some(&key),
        &[("x-mock-usage", "11,13")],
        Some(astream),
    )
    .await;
    assert!(a.body.contains("event: message_delta"), "{}", a.body);
    expected += tokens(11, "3.00") + tokens(13, "15.00");
    assert_eq!(settled(&api, "metered").await, (expected, 0), "streamed Anthropic usage");

    // A fixed price, and a price header (missing → the whole hold; above the hold → the hold).
    let get = reqwest::Method::GET;
    assert_eq!(call(&c, &srv, get.clone(), "/proxy/search/v1/s", Some(&key), &[], None).await.status, 200);
    expected += micros("0.01");
    assert_eq!(settled(&api, "metered").await, (expected, 0), "per-request price");
    for (price, charged) in [(Some("0.25"), "0.25"), (None, "2.00"), (Some("5.00"), "2.00"), (Some("abc"), "2.00")] {
        let h: Vec<(&str, &str)> = price.map(|p| ("x-mock-price", p)).into_iter().collect();
        let a = call(&c, &srv, get.clone(), "/proxy/pay/v1/charge", Some(&key), &h, None).await;
        assert_eq!(a.status, 200);
        expected += micros(charged);
        assert_eq!(settled(&api, "metered").await, (expected, 0), "price header {price:?}");
    }

    // Usage that cannot be read (an answer without `usage`) is charged as the whole hold.
    let a = call(&c, &srv, get.clone(), "/proxy/openai/v1/models", Some(&key), &[], None).await;
    assert_eq!(a.status, 200);
    expected += micros("0.50");
    assert_eq!(settled(&api, "metered").await, (expected, 0), "unreadable usage costs the hold");

    // Every settlement is in the audit trail: one capture per settlement, amounts summing to the
    // spend, each call's cost in its detail.
    let events = api.audit(ADMIN, "metered").await;
    let captures: Vec<&Value> =
        events.iter().filter(|e| e["action"] == "capture" && e["outcome"] == "allowed").collect();
    let captured: i64 = captures.iter().map(|e| micros_of(&e["amount"])).sum();
    assert_eq!(captured, expected, "captures in the audit trail add up to the spend");
    let calls: u64 = captures.iter().map(|e| e["detail"]["calls"].as_u64().expect("calls")).sum();
    let tx_count = api.agent(ADMIN, "metered").await["usage"]["tx_count"].as_u64().expect("tx_count");
    assert_eq!(calls, tx_count, "every call is in a capture event");
    for e in &captures {
        let d = &e["detail"];
        let sum = match d.get("each") {
            Some(each) => micros_of(each) * d["calls"].as_i64().expect("calls"),
            None => d["costs"].as_array().expect("costs").iter().map(micros_of).sum(),
        };
        assert_eq!(sum, micros_of(&e["amount"]), "{e}");
    }
    b.assert_audit_intact().await;
}

/// The OpenAI Responses API (`POST /v1/responses`, the OpenAI Agents SDK's default): usage is
/// read from the answer's `usage`, and from a stream's `response.completed` event; the gateway
/// adds no `stream_options` (only the completions APIs take it) and passes the stream on whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn responses_api_is_metered_exactly() {
    let (b, mock, srv) = setup(Backend::sqlite(), None).await;
    let api = srv.api();
    let key = agent(&api, "responses", "100.00", &["llm:openai"]).await;
    let c = http();
    let post = reqwest::Method::POST;
    let req = json!({"model": "m", "input": "hi"});
    let mut expected = 0i64;

    let a = call(
        &c,
        &srv,
        post.clone(),
        "/proxy/openai/v1/responses",
        Some(&key),
        &[("x-mock-usage", "1234,567")],
        Some(req.clone()),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["usage"]["input_tokens"], 1234, "the answer is passed on whole");
    expected += tokens(1234, "2.50") + tokens(567, "10.00");
    assert_eq!(settled(&api, "responses").await, (expected, 0), "non-streamed Responses usage");

    let mut stream = req.clone();
    stream["stream"] = json!(true);
    let a = call(
        &c,
        &srv,
        post.clone(),
        "/proxy/openai/v1/responses",
        Some(&key),
        &[("x-mock-usage", "3001,7")],
        Some(stream.clone()),
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(a.headers.contains("text/event-stream"), "{}", a.headers);
    let events: Vec<Value> = a
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).expect("event is JSON"))
        .collect();
    assert_eq!(events.len(), 5, "created, three deltas, completed: {}", a.body);
    assert_eq!(events[4]["type"], "response.completed");
    assert_eq!(events[4]["response"]["usage"]["output_tokens"], 7, "the agent gets the usage event");
    let sent: Value =
        serde_json::from_str(mock.records().await.last().expect("record")["body"].as_str().expect("body"))
            .expect("forwarded body is JSON");
    // Forwarded as sent, without stream_options, its output bounded to what the 0.50 hold leaves
    // after the body's worst-case input (one token a byte at 2.50 per million).
    let body_len = serde_json::to_vec(&stream).unwrap().len() as i64;
    let input_worst = (body_len * 2_500_000 + 999_999) / 1_000_000;
    let allowed = (500_000 - input_worst) * 1_000_000 / 10_000_000;
    let mut want = stream.clone();
    want["max_output_tokens"] = json!(allowed);
    assert_eq!(sent, want, "a Responses request is forwarded as sent, without stream_options, bounded");
    expected += tokens(3001, "2.50") + tokens(7, "10.00");
    assert_eq!(settled(&api, "responses").await, (expected, 0), "streamed Responses usage");
    b.assert_audit_intact().await;
}

/// SSE chunks reach the agent as they arrive: the first chunk is read while the upstream is
/// still held at a gate (it cannot have finished), and the call settles once it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_chunks_arrive_before_the_upstream_finishes() {
    let (_b, mock, srv) = setup(Backend::sqlite(), None).await;
    let api = srv.api();
    let key = agent(&api, "streamer", "10.00", &["llm:openai"]).await;
    let body = json!({"model": "m", "stream": true, "messages": []});
    let mut r = http()
        .post(format!("{}/proxy/openai/v1/chat/completions", srv.base))
        .bearer_auth(&key)
        .header("x-mock-gate", "first-chunk")
        .header("x-mock-usage", "400,100")
        .json(&body)
        .send()
        .await
        .expect("stream call");
    assert_eq!(r.status().as_u16(), 200);
    let first = r.chunk().await.expect("first chunk").expect("a chunk before the end");
    assert!(String::from_utf8_lossy(&first).contains("tok0"), "first chunk: {first:?}");
    let s = mock.stats().await;
    assert_eq!(s["finished_streams"], 0, "the upstream has not finished: the chunk was not buffered");
    assert_eq!(money(&api, "streamer").await, (0, micros("0.50")), "the hold is open while streaming");
    mock.open("first-chunk").await;
    let mut rest = Vec::new();
    while let Some(c) = r.chunk().await.expect("chunk") {
        rest.extend_from_slice(&c);
    }
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
    assert_eq!(mock.stats().await["finished_streams"], 1);
    assert_eq!(settled(&api, "streamer").await, (tokens(400, "2.50") + tokens(100, "10.00"), 0));
}

/// An agent that hangs up mid-stream is still charged: its usage was never read, so the whole
/// hold is captured, and the upstream stream is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnect_mid_stream_is_still_charged() {
    let (_b, mock, srv) = setup(Backend::sqlite(), None).await;
    let api = srv.api();
    let key = agent(&api, "quitter", "10.00", &["llm:*"]).await;
    for (path, handle_hold) in [("/proxy/openai/v1/chat/completions", "0.50"), ("/proxy/anthropic/v1/messages", "1.00")]
    {
        let before = money(&api, "quitter").await.0;
        let gate = format!("gate-{}", path.len());
        let c = http();
        let mut r = c
            .post(format!("{}{path}", srv.base))
            .bearer_auth(&key)
            .header("x-mock-gate", &gate)
            .json(&json!({"model": "m", "stream": true, "messages": []}))
            .send()
            .await
            .expect("stream call");
        assert_eq!(r.status().as_u16(), 200);
        let first = r.chunk().await.expect("first chunk").expect("a chunk");
        assert!(!first.is_empty());
        drop(r);
        drop(c);
        // Settlement runs on its own once the gateway notices; wait for it (bounded).
        let mut settled = None;
        for _ in 0..600 {
            let (spent, held) = money(&api, "quitter").await;
            if held == 0 {
                settled = Some(spent);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let spent = settled.unwrap_or_else(|| panic!("the abandoned call on {path} was never settled"));
        assert_eq!(spent - before, micros(handle_hold), "the whole hold is charged for an abandoned {path}");
        mock.open(&gate).await;
    }
    // The gateway dropped the upstream streams: they end as aborted, not finished.
    let mut aborted = 0;
    for _ in 0..600 {
        aborted = mock.stats().await["aborted_streams"].as_u64().expect("aborted");
        if aborted == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(aborted, 2, "the upstream streams were cut when the agent left");
}

/// Sends raw bytes (paths no HTTP client would send as written) and returns the answer text.
async fn raw(srv: &Server, request: &str) -> (u16, String) {
    let addr = srv.base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut out)).await.expect("answer in time").ok();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// Dot segments, encoded dots and separators, empty segments and unknown upstreams are refused
/// before anything is held or forwarded; an ordinary path and query reach the upstream under
/// its base path, exactly as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn path_tricks_never_leave_the_upstream_base() {
    let (_b, mock, srv) = setup(Backend::sqlite(), None).await;
    let api = srv.api();
    let key = agent(&api, "tricky", "10.00", &["tools:search"]).await;
    let req = |target: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n")
    };
    for (target, status, code) in [
        ("/proxy/search/../v1/agents", 400, "invalid_request"),
        ("/proxy/search/v1/../../v1/agents", 400, "invalid_request"),
        ("/proxy/search/%2e%2e/v1/agents", 400, "invalid_request"),
        ("/proxy/search/%2E%2e/%2e%2E/admin", 400, "invalid_request"),
        ("/proxy/search/.%2e/admin", 400, "invalid_request"),
        ("/proxy/search/v1%2f..%2f..%2fadmin", 400, "invalid_request"),
        ("/proxy/search/v1/..%5cadmin", 400, "invalid_request"),
        ("/proxy/search/v1/%252e%252e/admin", 400, "invalid_request"),
        ("/proxy/search/./v1", 400, "invalid_request"),
        ("/proxy/search//etc/passwd", 400, "invalid_request"),
        ("/proxy/search/v1/%0d%0aX-Injected:%201", 400, "invalid_request"),
        ("/proxy/../v1/agents", 404, "not_found"),
        ("/proxy/%2e%2e/v1/agents", 404, "not_found"),
        ("/proxy/nope/v1/chat", 404, "not_found"),
        ("/proxy/", 404, "not_found"),
    ] {
        let (got, text) = raw(&srv, &req(target)).await;
        assert_eq!(got, status, "{target}: {text}");
        assert!(text.contains(&format!("\"code\":\"{code}\"")), "{target}: {text}");
    }
    // A bare CR inside a header value is refused by the HTTP parser.
    let (got, _) =
        raw(&srv, &format!("GET /proxy/search/v1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nX-A: a\rX-B: b\r\nConnection: close\r\n\r\n"))
            .await;
    assert_eq!(got, 400, "bare CR in a header");
    assert_eq!(mock.calls_seen().await, 0, "no trick reached the upstream");
    assert_eq!(settled(&api, "tricky").await, (0, 0), "nothing was held or charged");

    // An ordinary path and query reach the upstream as sent, under its base path.
    let (got, text) = raw(&srv, &req("/proxy/search/v1/files/a%20b.txt?x=1&y=%2e%2e&z")).await;
    assert_eq!(got, 200, "{text}");
    let r = mock.records().await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["path"], "/base/v1/files/a%20b.txt");
    assert_eq!(r[0]["query"], "x=1&y=%2e%2e&z");
}

/// Hardening finding 7: `..;`, `%2e%2e;`, `.;` and overlong UTF-8 escapes (`%C0%AE`) were
/// forwarded as they were, and Tomcat/Spring/Jetty upstreams read `..;` as `..`. They are
/// refused before any hold, and never reach the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn path_parameters_and_overlong_utf8_never_reach_the_upstream() {
    let (_b, mock, srv) = setup(Backend::sqlite(), None).await;
    let api = srv.api();
    let key = agent(&api, "tricky-params", "10.00", &["tools:search"]).await;
    let req = |target: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n")
    };
    for target in [
        "/proxy/search/..;/v1/agents",
        "/proxy/search/v1/..;jsessionid=1/admin",
        "/proxy/search/%2e%2e;/admin",
        "/proxy/search/.;/admin",
        "/proxy/search/v1/;x/admin",
        "/proxy/search/v1/%C0%AE%C0%AE/admin",
        "/proxy/search/v1%C0%AFadmin",
        "/proxy/search/v1/%E0%80%AE%E0%80%AE/admin",
    ] {
        let (got, text) = raw(&srv, &req(target)).await;
        assert_eq!(got, 400, "{target}: {text}");
        assert!(text.contains("\"code\":\"invalid_request\""), "{target}: {text}");
    }
    assert_eq!(mock.calls_seen().await, 0, "no trick reached the upstream");
    assert_eq!(settled(&api, "tricky-params").await, (0, 0), "nothing was held or charged");
    // Path parameters on an ordinary segment are passed on as sent.
    let (got, text) = raw(&srv, &req("/proxy/search/v1/files;v=2")).await;
    assert_eq!(got, 200, "{text}");
    assert_eq!(mock.records().await[0]["path"], "/base/v1/files;v=2");
}

/// Hardening finding 2: with `charge_failures = false`, a call whose answer timed out or passed
/// `max_duration` after it was sent cost nothing, though the upstream did the work, so an agent
/// looping on slow calls never reached its cap. Once sent, a call is paid (contract §12): its
/// metered usage, or the whole hold when none was read.
async fn forwarded_calls_that_time_out_are_paid(b: Backend) {
    let (_b, mock, srv) = setup(b, None).await;
    let api = srv.api();
    let key = agent(&api, "slow-payer", "10.00", &["llm:*", "tools:*"]).await;
    let c = http();
    let post = reqwest::Method::POST;
    let chat = json!({"model": "m", "messages": []});
    let hold = micros("0.50");

    // No answer head within read_timeout (1 s): the call reached the upstream, so it is paid.
    let a = call(
        &c,
        &srv,
        post.clone(),
        "/proxy/slow/v1/chat/completions",
        Some(&key),
        &[("x-mock-delay-ms", "3000")],
        Some(chat.clone()),
    )
    .await;
    assert_eq!((a.status, a.code().as_str()), (504, "upstream_timeout"), "{}", a.body);
    assert_eq!(mock.calls_seen().await, 1, "the call reached the upstream");
    assert_eq!(settled(&api, "slow-payer").await, (hold, 0), "a timed-out call that was sent costs the hold");

    // A stream that stalls past read_timeout after its first chunk: usage never came, the hold.
    let mut stream = chat.clone();
    stream["stream"] = json!(true);
    let r = c
        .post(format!("{}/proxy/slow/v1/chat/completions", srv.base))
        .bearer_auth(&key)
        .header("x-mock-chunk-delay-ms", "3000")
        .json(&stream)
        .send()
        .await
        .expect("answer head");
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err(), "the agent sees a cut stream, not a short one");
    assert_eq!(settled(&api, "slow-payer").await, (2 * hold, 0), "a stalled stream costs the hold");

    // A call that never left (nothing listens) is still free.
    let a = call(&c, &srv, reqwest::Method::GET, "/proxy/dead/v1/x", Some(&key), &[], None).await;
    assert_eq!((a.status, a.code().as_str()), (502, "upstream_unavailable"), "{}", a.body);
    assert_eq!(settled(&api, "slow-payer").await, (2 * hold, 0), "a call that never left is free");
}

/// A denied call never reaches the upstream and gets the contract's status and error body, in
/// the contract's order of checks.
async fn denied_calls_never_reach_the_upstream(b: Backend) {
    let (_b, mock, srv) = setup(b, None).await;
    let api = srv.api();
    let c = http();
    let get = reqwest::Method::GET;
    let path = "/proxy/search/v1/s";
    let good = agent(&api, "good", "10.00", &["tools:search"]).await;
    let wrong_scope = agent(&api, "wrong-scope", "10.00", &["llm:openai"]).await;
    let revoked = agent(&api, "revoked", "10.00", &["tools:search"]).await;
    let r = api.post("/v1/agents/revoked/revoke", ADMIN, &json!({"reason": "test"})).await;
    assert_eq!(r.status, 200);
    let mut limited_body = root_agent("limited", "10.00", &["tools:search"]);
    limited_body["rate_limit"] = json!({"requests": 1, "per": "1h"});
    let limited = api.create(ADMIN, limited_body).await;
    let mut small_body = root_agent("small-tx", "10.00", &["llm:openai"]);
    small_body["per_tx_limit"] = json!("0.10");
    let small = api.create(ADMIN, small_body).await;
    let nearly_broke = agent(&api, "nearly-broke", "0.015", &["tools:search"]).await;
    let r = api.post("/v1/spend", &nearly_broke, &json!({"scope": "tools:search", "amount": "0.01"})).await;
    assert_eq!(r.status, 200, "{}", r.body);

    let cases: Vec<(Option<&str>, &str, u16, &str)> = vec![
        (None, path, 401, "invalid_credentials"),
        (Some("bk_notakey"), path, 401, "invalid_credentials"),
        (Some(ADMIN), path, 401, "invalid_credentials"),
        (Some(&revoked), path, 401, "credential_revoked"),
        (Some(&wrong_scope), path, 403, "scope_not_granted"),
        (Some(&small), "/proxy/openai/v1/models", 402, "per_tx_limit_exceeded"),
        (Some(&nearly_broke), path, 402, "spending_cap_exceeded"),
    ];
    for (key, p, status, code) in cases {
        let a = call(&c, &srv, get.clone(), p, key, &[], None).await;
        assert_eq!((a.status, a.code().as_str()), (status, code), "{p}: {}", a.body);
        assert!(a.json()["error"]["message"].is_string(), "contract error body: {}", a.body);
    }
    assert_eq!(mock.calls_seen().await, 0, "no denied call reached the upstream");

    // Rate limit: the first call goes through, the second is 429 with Retry-After.
    assert_eq!(call(&c, &srv, get.clone(), path, Some(&limited), &[], None).await.status, 200);
    let a = call(&c, &srv, get.clone(), path, Some(&limited), &[], None).await;
    assert_eq!((a.status, a.code().as_str()), (429, "rate_limited"), "{}", a.body);
    assert!(a.headers.contains("retry-after"), "{}", a.headers);
    assert_eq!(call(&c, &srv, get.clone(), path, Some(&good), &[], None).await.status, 200);
    assert_eq!(mock.calls_seen().await, 2, "only the two allowed calls reached the upstream");
    let denials = api.audit(ADMIN, "wrong-scope").await;
    assert!(
        denials
            .iter()
            .any(|e| e["outcome"] == "denied" && e["reason"] == "scope_not_granted" && e["scope"] == "tools:search"),
        "the denial is audited with the upstream's scope: {denials:?}"
    );
}

/// Upstream 5xx and calls that never left (no connection) capture nothing (unless the upstream
/// sets `charge_failures`); bodies over the upstream's limit are 413; in each case the hold is
/// released. (A call that left and then timed out is paid for: see
/// `forwarded_calls_that_time_out_are_paid`.)
async fn upstream_failures_release_the_hold(b: Backend) {
    let (_b, mock, srv) = setup(b, None).await;
    let api = srv.api();
    let key = agent(&api, "unlucky", "10.00", &["llm:*", "tools:*"]).await;
    let c = http();
    let (get, post) = (reqwest::Method::GET, reqwest::Method::POST);
    let chat = json!({"model": "m", "messages": []});

    let a = call(
        &c,
        &srv,
        post.clone(),
        "/proxy/openai/v1/chat/completions",
        Some(&key),
        &[("x-mock-status", "503")],
        Some(chat.clone()),
    )
    .await;
    assert_eq!(a.status, 503, "the upstream's answer is passed on");
    assert_eq!(a.json()["error"]["message"], "mock failure");
    assert_eq!(settled(&api, "unlucky").await, (0, 0), "a 5xx captures nothing");

    let a = call(&c, &srv, get.clone(), "/proxy/dead/v1/x", Some(&key), &[], None).await;
    assert_eq!((a.status, a.code().as_str()), (502, "upstream_unavailable"), "{}", a.body);
    assert_eq!(settled(&api, "unlucky").await, (0, 0), "a connection failure captures nothing");

    let strict = agent(&api, "unlucky-strict", "10.00", &["tools:*"]).await;
    let a = call(&c, &srv, get.clone(), "/proxy/slow-strict/v1/x", Some(&strict), &[("x-mock-delay-ms", "5000")], None)
        .await;
    assert_eq!((a.status, a.code().as_str()), (504, "upstream_timeout"), "{}", a.body);
    assert_eq!(settled(&api, "unlucky-strict").await, (micros("0.01"), 0), "charge_failures charges a timeout");

    // charge_failures = true: the 5xx is charged its price.
    let a =
        call(&c, &srv, get.clone(), "/proxy/search-strict/v1/x", Some(&key), &[("x-mock-status", "500")], None).await;
    assert_eq!(a.status, 500);
    assert_eq!(settled(&api, "unlucky").await, (micros("0.01"), 0), "charge_failures charges the failure");

    // Bodies over the limit: declared (never forwarded) and streamed without a length.
    let calls_before = mock.calls_seen().await;
    let big = "x".repeat(2000);
    let a = call(&c, &srv, post.clone(), "/proxy/search/v1/upload", Some(&key), &[], Some(json!({"data": big}))).await;
    assert_eq!((a.status, a.code().as_str()), (413, "body_too_large"), "{}", a.body);
    let a = call(
        &c,
        &srv,
        post.clone(),
        "/proxy/openai/v1/chat/completions",
        Some(&key),
        &[],
        Some(json!({"data": "y".repeat(5000)})),
    )
    .await;
    assert_eq!((a.status, a.code().as_str()), (413, "body_too_large"), "{}", a.body);
    assert_eq!(mock.calls_seen().await, calls_before, "declared oversized bodies are never forwarded");
    let chunk = format!("258\r\n{}\r\n", "z".repeat(600));
    let (got, text) = raw(
        &srv,
        &format!(
            "POST /proxy/search/v1/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{}0\r\n\r\n",
            chunk.repeat(4)
        ),
    )
    .await;
    assert_eq!(got, 413, "a streamed body over the limit: {text}");
    assert_eq!(settled(&api, "unlucky").await, (micros("0.01"), 0), "413s charge nothing");
    // A body within the limit streams through.
    let a = call(&c, &srv, post.clone(), "/proxy/search/v1/upload", Some(&key), &[], Some(json!({"data": "ok"}))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let last = mock.records().await.pop().expect("record");
    assert_eq!(last["body"], "{\"data\":\"ok\"}");
}

/// A secret missing from the environment stops the server at start with a message naming the
/// variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_secret_env_is_a_startup_error() {
    let mock = Mock::start().await;
    let mut b = Backend::sqlite();
    configure(&mut b, &mock, None);
    let out = tokio::process::Command::new(common::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(b.data())
        .arg("--config")
        .arg(b.config.as_ref().expect("config"))
        .env("BULKHEAD_ADMIN_TOKEN", ADMIN)
        .env("GW_TEST_OPENAI_KEY", OPENAI_SECRET)
        .env_remove("GW_TEST_ANTHROPIC_KEY")
        .env_remove("GW_TEST_SEARCH_KEY")
        .stdin(Stdio::null())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out).await.expect("exits in time").expect("run");
    assert!(!out.status.success(), "the server must not start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("GW_TEST_ANTHROPIC_KEY") && err.contains("not set"), "stderr: {err}");
    assert!(!err.contains(OPENAI_SECRET), "the secrets it did read are not printed");
}

/// A keep-alive upstream that closes a connection once it has been idle for `idle`; counts the
/// connections it accepted and the requests it answered.
/// An upstream that closes connections idle for `idle`: its port, and counters of connections
/// accepted, requests answered and connections it closed.
async fn closing_upstream(idle: Duration) -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (conns, requests, closed) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (c, r, x) = (conns.clone(), requests.clone(), closed.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            c.fetch_add(1, Ordering::SeqCst);
            let (r, x) = (r.clone(), x.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    match tokio::time::timeout(idle, s.read(&mut chunk)).await {
                        Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        // Idle for too long, or the peer left: close.
                        _ => {
                            drop(s);
                            x.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        r.fetch_add(1, Ordering::SeqCst);
                        let answer = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (port, conns, requests, closed)
}

/// Upstream connections are kept open and reused between calls; one the upstream closed while
/// idle is replaced, and the call on it still succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_connections_are_reused_and_closed_ones_replaced() {
    let (port, conns, requests, closed) = closing_upstream(Duration::from_millis(300)).await;
    let mut b = Backend::sqlite();
    let path = b.scratch("gateway.toml");
    let toml = format!(
        "[[upstream]]\nname = \"kept\"\nbase_url = \"http://127.0.0.1:{port}\"\nscope = \"tools:kept\"\n\
         max_cost_per_request = \"0.01\"\npricing = {{ kind = \"per_request\", price = \"0.01\" }}\n"
    );
    std::fs::write(&path, toml).expect("write config");
    b.config = Some(path);
    let srv = Server::start(&b).await;
    let api = srv.api();
    let key = agent(&api, "kept", "10.00", &["tools:*"]).await;
    let c = http();
    for i in 0..5 {
        let a = call(&c, &srv, reqwest::Method::GET, "/proxy/kept/v1/x", Some(&key), &[], None).await;
        assert_eq!((a.status, a.body.as_str()), (200, "ok"), "call {i}");
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1, "five calls in a row share one upstream connection");
    // The upstream closes the idle connection (waited for, not guessed); the next calls open a
    // new one, none fails.
    let mut waited = 0;
    while closed.load(Ordering::SeqCst) < 1 {
        waited += 1;
        assert!(waited < 2_000, "the upstream never closed the idle connection");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for i in 0..3 {
        let a = call(&c, &srv, reqwest::Method::GET, "/proxy/kept/v1/x", Some(&key), &[], None).await;
        assert_eq!((a.status, a.body.as_str()), (200, "ok"), "call {i} after the upstream closed");
    }
    assert_eq!(conns.load(Ordering::SeqCst), 2, "a closed connection is replaced once");
    assert_eq!(requests.load(Ordering::SeqCst), 8, "every call reached the upstream once");
    assert_eq!(settled(&api, "kept").await, (micros("0.08"), 0));
}

/// Hardening finding 3: the hold did not bound the cost (an answer reporting ~$1,250 was charged
/// 0.50) and any method and path was forwarded. Now a token-priced call asks for no more output
/// than its hold pays for after its worst-case input, an input that could cost the whole hold is
/// refused unsent, and an upstream's `routes` forwards nothing else.
async fn the_hold_bounds_the_cost_and_routes_bind(b: Backend) {
    let (_b, mock, srv) = setup(b, None).await;
    let api = srv.api();
    let key = agent(&api, "bounded", "10.00", &["llm:openai"]).await;
    let c = http();
    let post = reqwest::Method::POST;
    for (method, path) in [(post.clone(), "/proxy/routed/v1/batches"), (reqwest::Method::GET, "/proxy/routed/v1/files")]
    {
        let a = call(&c, &srv, method, path, Some(&key), &[], Some(json!({"x": 1}))).await;
        assert_eq!(a.status, 403, "{path}: {}", a.body);
        assert!(a.body.contains("route_not_allowed"), "{}", a.body);
    }
    assert!(mock.records().await.is_empty(), "nothing outside the routes reached the upstream");
    let a = call(&c, &srv, reqwest::Method::GET, "/proxy/routed/v1/models/m1", Some(&key), &[], None).await;
    assert_eq!(a.status, 200, "{}", a.body);

    // The agent asks for 10 million output tokens; the upstream is told what 0.01 pays for.
    let req = json!({"model": "m", "max_tokens": 10_000_000, "messages": [{"role": "user", "content": "hi"}]});
    let a = call(
        &c,
        &srv,
        post.clone(),
        "/proxy/routed/v1/chat/completions",
        Some(&key),
        &[("x-mock-usage", "20,30")],
        Some(req.clone()),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let sent: Value = serde_json::from_str(mock.records().await.last().unwrap()["body"].as_str().unwrap()).unwrap();
    let body_len = serde_json::to_vec(&req).unwrap().len() as i64;
    let input_worst = tokens(body_len, "2.50");
    let allowed = (micros("0.01") - input_worst) * 1_000_000 / micros("10.00");
    assert_eq!(sent["max_tokens"], allowed, "lowered to what the hold affords: {sent}");
    assert!(input_worst + tokens(allowed, "10.00") <= micros("0.01"), "the worst case fits the hold");

    // A body whose input alone could cost more than the hold never leaves.
    let before = mock.records().await.len();
    let big = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(5_000)}]});
    let a = call(&c, &srv, post, "/proxy/routed/v1/chat/completions", Some(&key), &[], Some(big)).await;
    assert_eq!(a.status, 402, "{}", a.body);
    assert!(a.body.contains("max_cost_exceeded"), "{}", a.body);
    assert_eq!(mock.records().await.len(), before, "the refused call was not forwarded");
    // Charged: the models call (0.01, no usage read) and the completion's usage; nothing else.
    let (spent, held) = settled(&api, "bounded").await;
    assert_eq!(held, 0);
    assert!(spent <= 2 * micros("0.01"), "refused calls cost nothing: {spent}");
}
