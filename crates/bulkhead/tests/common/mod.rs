//! Harness for the end-to-end tests: runs the real `bulkhead` binary on a loopback port against a
//! throwaway SQLite data dir or PostgreSQL database (`bulkhead_testkit`: only when
//! `BULKHEAD_TEST_DATABASE_URL` is set), and talks to it over real HTTP.
//!
//! Every child process is owned by a [`Server`], whose `Drop` kills it, so a failing assertion
//! never leaves a server behind. Every wait is a bounded loop.

#![allow(dead_code, unused_imports)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

/// The binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_bulkhead");
/// The admin token every server gets through `BULKHEAD_ADMIN_TOKEN` (unless a test removes it).
pub(crate) const ADMIN: &str = "e2e-admin-token-4c1d9f0e7b2a-0123456789";
/// The scope every test agent spends with.
pub(crate) const SCOPE: &str = "payments:write";

/// The OpenAI/Anthropic-compatible upstream the gateway tests forward to, a process of its own
/// (`bulkhead-testkit`'s `mock-upstream`, found or built by the testkit).
pub(crate) use bulkhead_testkit::start_mock_upstream;

/// Upper bound of every wait for a server to come up or go away (a hang guard, not an assertion).
const WAIT_STEPS: u32 = 1200;
const WAIT_STEP: Duration = Duration::from_millis(50);

/// Where a server keeps its state: a data dir, plus a PostgreSQL database when `db` is set.
pub(crate) struct Backend {
    root: tempfile::TempDir,
    pub db: Option<String>,
    /// A `--config` file every server of this backend starts with.
    pub config: Option<PathBuf>,
    /// Extra environment variables every server of this backend gets.
    pub env: Vec<(String, String)>,
    starts: AtomicUsize,
}

impl Backend {
    pub(crate) fn sqlite() -> Backend {
        Backend {
            root: tempfile::tempdir().expect("temp dir"),
            db: None,
            config: None,
            env: Vec::new(),
            starts: AtomicUsize::new(0),
        }
    }

    /// A fresh PostgreSQL database; `None` when the PostgreSQL tests do not run here
    /// (`BULKHEAD_TEST_DATABASE_URL` unset: the testkit said that the test skipped, and the test
    /// returns).
    pub(crate) async fn pg() -> Option<Backend> {
        let url = bulkhead_testkit::fresh_pg_url().await?;
        Some(Backend {
            root: tempfile::tempdir().expect("temp dir"),
            db: Some(url),
            config: None,
            env: Vec::new(),
            starts: AtomicUsize::new(0),
        })
    }

    pub(crate) fn is_pg(&self) -> bool {
        self.db.is_some()
    }

    /// The `--data` dir of the servers.
    pub(crate) fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// A path for test files (outside the data dir).
    pub(crate) fn scratch(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// Where server stdout/stderr go (outside the data dir).
    fn logs(&self) -> PathBuf {
        self.root.path().join("logs")
    }

    /// The store flags of offline commands (`audit verify`, `audit export`).
    pub(crate) fn store_args(&self) -> Vec<String> {
        match &self.db {
            Some(url) => {
                // The servers keep the audit key in their data dir; a store no server has
                // served yet has none.
                let key = self.data().join("audit-key");
                let mut args = vec!["--database-url".into(), url.clone()];
                if key.exists() {
                    args.extend(["--audit-key".into(), key.display().to_string()]);
                }
                args
            }
            None => vec!["--data".into(), self.data().display().to_string()],
        }
    }

    /// Runs an offline command of the binary against this store.
    pub(crate) async fn offline(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.args(args).args(self.store_args());
        scrub_env_tokio(&mut cmd);
        cmd.stdin(Stdio::null()).output().await.expect("run bulkhead offline command")
    }

    /// `bulkhead audit verify` must exit 0.
    pub(crate) async fn assert_audit_intact(&self) {
        let out = self.offline(&["audit", "verify"]).await;
        assert!(
            out.status.success(),
            "audit verify failed ({:?}): stdout={} stderr={}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("intact"), "audit verify did not report an intact chain");
    }

    /// `bulkhead audit export --agent HANDLE`, parsed.
    pub(crate) async fn export(&self, handle: &str) -> Vec<Value> {
        let out = self.offline(&["audit", "export", "--agent", handle]).await;
        assert!(out.status.success(), "audit export failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout)
            .expect("utf-8 export")
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("export line is JSON"))
            .collect()
    }
}

/// Removes every `BULKHEAD_*` variable the test runner may have inherited, so the flags decide.
fn scrub_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BULKHEAD_") {
            cmd.env_remove(&k);
        }
    }
}

fn scrub_env_tokio(cmd: &mut tokio::process::Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BULKHEAD_") {
            cmd.env_remove(&k);
        }
    }
}

/// A free loopback port: bind port 0 and release it (a lost race is retried by `Server::start`).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// A running `bulkhead serve`. Dropping it kills the process.
pub(crate) struct Server {
    child: Child,
    pub base: String,
    pub token: String,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    exited: Option<ExitStatus>,
}

impl Server {
    /// Starts a server with the test admin token in the environment.
    pub(crate) async fn start(b: &Backend) -> Server {
        Server::start_with(b, Some(ADMIN)).await
    }

    /// Starts a server; `token: None` leaves `BULKHEAD_ADMIN_TOKEN` unset (the caller reads the
    /// generated token and sets `server.token` itself).
    pub(crate) async fn start_with(b: &Backend, token: Option<&str>) -> Server {
        std::fs::create_dir_all(b.logs()).expect("log dir");
        for _attempt in 0..8 {
            let n = b.starts.fetch_add(1, Ordering::SeqCst);
            let stdout = b.logs().join(format!("serve-{n}.out"));
            let stderr = b.logs().join(format!("serve-{n}.err"));
            let port = free_port();
            let mut cmd = Command::new(BIN);
            cmd.arg("serve").arg("--listen").arg(format!("127.0.0.1:{port}")).arg("--data").arg(b.data());
            if let Some(url) = &b.db {
                cmd.arg("--database-url").arg(url);
            }
            if let Some(c) = &b.config {
                cmd.arg("--config").arg(c);
            }
            scrub_env(&mut cmd);
            cmd.envs(b.env.iter().map(|(k, v)| (k, v)));
            if let Some(t) = token {
                cmd.env("BULKHEAD_ADMIN_TOKEN", t);
            }
            // `RUST_LOG` in the backend's env wins over the default.
            let log = b.env.iter().find(|(k, _)| k == "RUST_LOG").map(|(_, v)| v.as_str());
            cmd.env("RUST_LOG", log.unwrap_or("info,sqlx=warn"))
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&stdout).expect("stdout file"))
                .stderr(std::fs::File::create(&stderr).expect("stderr file"));
            let child = cmd.spawn().expect("spawn bulkhead serve");
            let mut srv = Server {
                child,
                base: format!("http://127.0.0.1:{port}"),
                token: token.unwrap_or_default().to_owned(),
                stdout,
                stderr,
                exited: None,
            };
            match srv.wait_healthy().await {
                Ok(()) => return srv,
                Err(log) if log.contains("cannot listen") => continue, // lost the port race: retry
                Err(log) => panic!("bulkhead serve did not become healthy:\n{log}"),
            }
        }
        panic!("could not find a free port for bulkhead serve");
    }

    async fn wait_healthy(&mut self) -> Result<(), String> {
        let http = http_client();
        for _ in 0..WAIT_STEPS {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(st);
                return Err(format!("exited with {st}\n{}", self.logs()));
            }
            if let Ok(r) = http.get(format!("{}/healthz", self.base)).send().await
                && r.status().as_u16() == 200
            {
                return Ok(());
            }
            tokio::time::sleep(WAIT_STEP).await;
        }
        Err(format!("no healthy /healthz in time\n{}", self.logs()))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn api(&self) -> Api {
        Api::new(&self.base)
    }

    /// What the process wrote to stdout and stderr so far.
    pub(crate) fn logs(&self) -> String {
        let out = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("--- stdout ---\n{out}--- stderr ---\n{err}")
    }

    /// SIGKILL (what `kill -9` sends), then reap.
    pub(crate) fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL the server");
        self.exited = Some(self.child.wait().expect("reap the server"));
    }

    /// SIGTERM through the `kill` utility.
    pub(crate) fn sigterm(&self) {
        let st = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status().expect("run kill");
        assert!(st.success(), "kill -TERM failed");
    }

    /// Waits (bounded) for the process to exit on its own.
    pub(crate) async fn wait_exit(&mut self) -> ExitStatus {
        for _ in 0..WAIT_STEPS {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(st);
                return st;
            }
            tokio::time::sleep(WAIT_STEP).await;
        }
        panic!("the server did not exit in time\n{}", self.logs());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        // A hang guard only: no test asserts on speed.
        .timeout(Duration::from_secs(120))
        .build()
        .expect("HTTP client")
}

/// An answer: status and JSON body (`Null` when the body is not JSON).
#[derive(Clone, Debug)]
pub(crate) struct Resp {
    pub status: u16,
    pub body: Value,
}

impl Resp {
    /// `error.code`, or "" for a success.
    pub(crate) fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    pub(crate) fn str(&self, field: &str) -> &str {
        self.body[field].as_str().unwrap_or_else(|| panic!("no string field {field:?} in {}", self.body))
    }
}

/// A small JSON client for one server.
#[derive(Clone)]
pub(crate) struct Api {
    http: reqwest::Client,
    pub base: String,
}

impl Api {
    pub(crate) fn new(base: &str) -> Api {
        Api { http: http_client(), base: base.to_owned() }
    }

    /// One request; `Err` only for transport failures (refused, reset, timed out).
    pub(crate) async fn try_send(
        &self,
        method: reqwest::Method,
        path: &str,
        bearer: &str,
        body: Option<&Value>,
    ) -> Result<Resp, reqwest::Error> {
        let mut rb = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(bearer);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let r = rb.send().await?;
        let status = r.status().as_u16();
        let bytes = r.bytes().await?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Resp { status, body })
    }

    pub(crate) async fn try_post(&self, path: &str, bearer: &str, body: &Value) -> Result<Resp, reqwest::Error> {
        self.try_send(reqwest::Method::POST, path, bearer, Some(body)).await
    }

    pub(crate) async fn post(&self, path: &str, bearer: &str, body: &Value) -> Resp {
        self.try_post(path, bearer, body).await.unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    pub(crate) async fn get(&self, path: &str, bearer: &str) -> Resp {
        self.try_send(reqwest::Method::GET, path, bearer, None).await.unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// `POST /v1/spend` with the test scope.
    pub(crate) async fn try_spend(&self, key: &str, amount: &str) -> Result<Resp, reqwest::Error> {
        self.try_post("/v1/spend", key, &json!({"scope": SCOPE, "amount": amount})).await
    }

    /// Creates an agent (admin token → root agent; agent key → child of that agent); returns its key.
    pub(crate) async fn create(&self, bearer: &str, body: Value) -> String {
        let r = self.post("/v1/agents", bearer, &body).await;
        assert_eq!(r.status, 201, "create agent {body}: {}", r.body);
        let key = r.str("key").to_owned();
        assert!(key.starts_with("bk_"), "agent keys start with bk_");
        key
    }

    /// `GET /v1/agents/{h}` (admin).
    pub(crate) async fn agent(&self, admin: &str, handle: &str) -> Value {
        let r = self.get(&format!("/v1/agents/{handle}"), admin).await;
        assert_eq!(r.status, 200, "get agent {handle}: {}", r.body);
        r.body
    }

    /// The agent's whole audit trail, paged with `limit` and `after`.
    pub(crate) async fn audit(&self, admin: &str, handle: &str) -> Vec<Value> {
        let mut out: Vec<Value> = Vec::new();
        let mut after = 0i64;
        for _ in 0..10_000 {
            let r = self.get(&format!("/v1/agents/{handle}/audit?limit=1000&after={after}"), admin).await;
            assert_eq!(r.status, 200, "audit of {handle}: {}", r.body);
            let page = r.body["events"].as_array().expect("events array").clone();
            let Some(last) = page.last() else { return out };
            let seq = last["seq"].as_i64().expect("seq");
            assert!(seq > after, "audit pages move forward");
            after = seq;
            out.extend(page);
        }
        panic!("audit of {handle} did not end");
    }
}

/// Parses a decimal amount string ("12.50", "0.000150") into micro-units, independently of the
/// code under test.
pub(crate) fn micros(s: &str) -> i64 {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    assert!(
        !int.is_empty()
            && int.bytes().all(|b| b.is_ascii_digit())
            && frac.len() <= 6
            && frac.bytes().all(|b| b.is_ascii_digit()),
        "not a decimal amount: {s:?}"
    );
    let mut f = frac.to_owned();
    while f.len() < 6 {
        f.push('0');
    }
    int.parse::<i64>().expect("integer part") * 1_000_000 + f.parse::<i64>().expect("fraction")
}

/// An amount field of a JSON object, in micro-units.
pub(crate) fn micros_of(v: &Value) -> i64 {
    micros(v.as_str().unwrap_or_else(|| panic!("amount is not a string: {v}")))
}

/// Renders micro-units as a decimal string with six decimals.
pub(crate) fn amount(m: i64) -> String {
    format!("{}.{:06}", m / 1_000_000, m % 1_000_000)
}

/// `usage.window_spent` etc. of an agent object, in micro-units.
pub(crate) fn usage(agent: &Value, field: &str) -> i64 {
    micros_of(&agent["usage"][field])
}

/// The `ref`s of allowed events with this action.
pub(crate) fn refs(events: &[Value], action: &str) -> HashSet<String> {
    events
        .iter()
        .filter(|e| e["action"] == action && e["outcome"] == "allowed")
        .map(|e| e["ref"].as_str().expect("allowed money event has a ref").to_owned())
        .collect()
}

/// Parses an RFC 3339 `at` into Unix nanoseconds.
pub(crate) fn at_nanos(e: &Value) -> i128 {
    let s = e["at"].as_str().expect("at is a string");
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|err| panic!("bad RFC 3339 time {s:?}: {err}"))
        .unix_timestamp_nanos()
}

/// The body of a root agent for the race tests: breaker off (so denials never suspend it).
pub(crate) fn root_agent(handle: &str, cap: &str, scopes: &[&str]) -> Value {
    json!({"handle": handle, "scopes": scopes, "spending_cap": cap, "breaker": {"denials": 0}})
}

pub(crate) fn path_str(p: &Path) -> String {
    p.display().to_string()
}
