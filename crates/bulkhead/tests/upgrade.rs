//! Upgrades: a store written by a released schema, loaded from a committed fixture
//! (`tests/fixtures/<schema>/<backend>/`), is migrated and served by the binary of this checkout,
//! on SQLite and on PostgreSQL.
//!
//! What they hold an upgrade to: the audit chain written by the old release verifies, before and
//! after `bulkhead migrate`; `bulkhead migrate` succeeds and a second run changes nothing; every
//! key works as it did (live keys spend and count against every ancestor, revoked keys get
//! `credential_revoked`, a suspended agent stays suspended until resumed); every balance and
//! counter is as the old release left it; stored idempotent answers replay byte for byte (and not
//! to a revoked key); open holds capture and release exactly, closed ones answer `hold_closed`;
//! the gateway lease the old server left unsettled when it was killed is captured in full at its
//! expiry; alerts it could not deliver are delivered; new agents can be created.
//!
//! Fixtures are older than the test run. The loader moves every stored time (Unix ms) that the
//! manifest lists by the fixture's age, as if the old server had stopped a moment ago, so holds
//! are still open and windows still current. Audit events keep their times: `at` is part of
//! each event's hash.

mod common;
#[path = "fixtures/generate.rs"]
mod generate;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{ADMIN, Api, Backend, Server, micros, micros_of, start_mock_upstream, usage};
use serde_json::{Value, json};

/// Where the released schemas' fixtures live.
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
/// The loopback port of a fixture's alert webhook while it was written: closed, so its alerts
/// wait in the outbox.
fn alert_port(backend: &str) -> u16 {
    if backend == "postgres" { 47632 } else { 47631 }
}
const ALERT_SECRET: &str = "whsec-upgrade-7c2e";
const ALERT_SECRET_ENV: &str = "BH_UPGRADE_ALERT_SECRET";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_of_schema_v1_upgrades() {
    upgrade(Backend::sqlite(), "schema-v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_of_schema_v1_upgrades() {
    let Some(b) = Backend::pg().await else { return };
    upgrade(b, "schema-v1").await;
}

/// Writes `tests/fixtures/$BULKHEAD_FIXTURE/{sqlite,postgres}/` with the binary of this checkout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "writes a fixture into the source tree: run once per released schema"]
async fn generate_fixture() {
    let name = std::env::var("BULKHEAD_FIXTURE").expect("BULKHEAD_FIXTURE=schema-vN names the fixture");
    generate::build(&name, Backend::sqlite()).await;
    let pg = Backend::pg().await.expect("a fixture is written on both stores: set BULKHEAD_TEST_DATABASE_URL");
    generate::build(&name, pg).await;
}

fn fixture_dir(schema: &str, backend: &str) -> PathBuf {
    PathBuf::from(FIXTURES).join(schema).join(backend)
}

/// The server config of fixture and test: alerts to the fixture's webhook, and (when writing the
/// fixture) an upstream for the gateway.
fn server_config(port: u16, mock: Option<&str>) -> String {
    let mut cfg = format!(
        "[alerts]\nwebhooks = [\"http://127.0.0.1:{port}/hook\"]\nthresholds = [0.5, 0.8]\nsecret_env = \"{ALERT_SECRET_ENV}\"\n"
    );
    if let Some(m) = mock {
        cfg.push_str(&format!(
            "\n[[upstream]]\nname = \"openai\"\nbase_url = \"{m}\"\nscope = \"llm:openai\"\nsecret_env = \"{}\"\n\
             max_cost_per_request = \"0.50\"\nmax_duration = \"30s\"\n\
             pricing = {{ kind = \"openai_usage\", input_per_million = \"2.50\", output_per_million = \"10.00\" }}\n",
            generate::LLM_SECRET_ENV
        ));
    }
    cfg
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(120)).build().expect("client")
}

/// An answer as it came over the wire.
struct Raw {
    status: u16,
    replayed: bool,
    body: String,
}

impl Raw {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    fn code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or("").to_owned()
    }

    fn str(&self, field: &str) -> String {
        self.json()[field].as_str().unwrap_or_else(|| panic!("no {field} in {}", self.body)).to_owned()
    }
}

/// `POST path` with exactly these body bytes.
async fn send(c: &reqwest::Client, base: &str, path: &str, bearer: &str, idem: Option<&str>, body: &str) -> Raw {
    let mut rb = c
        .post(format!("{base}{path}"))
        .bearer_auth(bearer)
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(k) = idem {
        rb = rb.header("idempotency-key", k);
    }
    let r = rb.send().await.unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let status = r.status().as_u16();
    let replayed = r.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    let body = r.text().await.expect("body");
    Raw { status, replayed, body }
}

/// The mock upstream process; killed on drop.
struct Mock {
    _child: tokio::process::Child,
    base: String,
}

impl Mock {
    async fn start() -> Mock {
        let (child, base) = start_mock_upstream().await;
        Mock { _child: child, base }
    }
}

/// SQL straight to the store, through the tools a machine with the store has: `psql` for
/// PostgreSQL, Python's `sqlite3` module for SQLite.
enum Sql {
    Sqlite(PathBuf),
    Pg(String),
}

const PY_EXEC: &str =
    "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\nc.executescript(sys.stdin.read())\nc.commit()\n";
const PY_ROWS: &str = "import sqlite3, sys, json\nc = sqlite3.connect(sys.argv[1])\nc.row_factory = sqlite3.Row\n\
print(json.dumps([[{k: (r[k].hex() if isinstance(r[k], bytes) else r[k]) for k in r.keys()} for r in c.execute(q)] \
for q in sys.argv[2:]]))\n";

/// The Python interpreter itself, found once (a version manager's `python3` shim costs ~1 s a
/// start).
fn python() -> &'static str {
    static PYTHON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output().expect("python3");
        assert!(out.status.success(), "python3 runs");
        String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
    })
}

impl Sql {
    fn of(b: &Backend) -> Sql {
        match &b.db {
            Some(url) => Sql::Pg(url.clone()),
            None => Sql::Sqlite(b.data().join("bulkhead.db")),
        }
    }

    /// Runs a script; panics with the tool's stderr when any statement fails.
    fn exec(&self, script: &str) {
        let mut cmd = match self {
            Sql::Sqlite(file) => {
                let mut c = Command::new(python());
                c.arg("-c").arg(PY_EXEC).arg(file);
                c
            }
            Sql::Pg(url) => {
                let mut c = Command::new("psql");
                c.args([url.as_str(), "-X", "-q", "--single-transaction", "-v", "ON_ERROR_STOP=1", "-f", "-"]);
                c
            }
        };
        let mut child =
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run the SQL tool");
        let mut stdin = child.stdin.take().expect("stdin");
        let script = script.to_owned();
        let writer = std::thread::spawn(move || stdin.write_all(script.as_bytes()));
        let out = child.wait_with_output().expect("SQL tool output");
        writer.join().expect("writer").expect("write the script");
        assert!(out.status.success(), "SQL script failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The rows of a query as JSON objects.
    fn rows(&self, query: &str) -> Vec<Value> {
        self.rows_of(&[query]).remove(0)
    }

    /// The rows of several queries, in one run of the tool.
    fn rows_of(&self, queries: &[&str]) -> Vec<Vec<Value>> {
        let out = match self {
            Sql::Sqlite(file) => Command::new(python()).arg("-c").arg(PY_ROWS).arg(file).args(queries).output(),
            Sql::Pg(url) => {
                let parts: Vec<String> = queries
                    .iter()
                    .map(|q| format!("(SELECT coalesce(json_agg(t), '[]'::json) FROM ({q}) t)"))
                    .collect();
                Command::new("psql")
                    .args([url.as_str(), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c"])
                    .arg(format!("SELECT json_build_array({})", parts.join(", ")))
                    .output()
            }
        }
        .expect("run the SQL tool");
        assert!(out.status.success(), "queries {queries:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: Vec<Vec<Value>> = serde_json::from_slice(&out.stdout).expect("rows as JSON");
        assert_eq!(v.len(), queries.len());
        v
    }

    /// The schema and the applied migrations, with the row count of every table: what a second
    /// `bulkhead migrate` must leave exactly as it was.
    fn snapshot(&self) -> Value {
        let (tables, schema) = match self {
            Sql::Sqlite(_) => (
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name",
                vec!["SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"],
            ),
            Sql::Pg(_) => (
                "SELECT table_name AS name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
                vec![
                    "SELECT table_name, column_name, data_type, is_nullable, column_default \
                     FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2",
                    "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
                    "SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint \
                     WHERE connamespace = 'public'::regnamespace ORDER BY 1",
                ],
            ),
        };
        let counts: Vec<String> = self
            .rows(tables)
            .iter()
            .map(|t| {
                let name = t["name"].as_str().expect("table name");
                format!("SELECT '{name}' AS name, COUNT(*) AS n FROM {name}")
            })
            .collect();
        let counts = counts.join(" UNION ALL ");
        let mut queries = schema;
        queries.push(&counts);
        queries.push(self.migrations_query());
        let mut all = self.rows_of(&queries);
        let migrations = all.pop().expect("migrations");
        let rows = all.pop().expect("row counts");
        json!({"schema": all, "migrations": migrations, "rows": rows})
    }

    fn migrations_query(&self) -> &'static str {
        match self {
            Sql::Sqlite(_) => {
                "SELECT version, lower(hex(checksum)) AS checksum, success FROM _sqlx_migrations ORDER BY version"
            }
            Sql::Pg(_) => {
                "SELECT version, encode(checksum, 'hex') AS checksum, success::int AS success FROM _sqlx_migrations ORDER BY version"
            }
        }
    }

    /// `(version, checksum, success)` of every applied migration.
    fn migrations(&self) -> Vec<Value> {
        self.rows(self.migrations_query())
    }
}

/// The real binary runs on the wall clock: fixtures are placed relative to it.
#[allow(clippy::disallowed_methods)]
fn now_ms() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970");
    i64::try_from(d.as_millis()).expect("ms fit i64")
}

/// Loads a fixture's dump into the backend's empty store and moves its times by its age.
fn load(b: &Backend, schema: &str) -> Value {
    let dir = fixture_dir(schema, if b.is_pg() { "postgres" } else { "sqlite" });
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).expect("read manifest"))
            .expect("manifest");
    if !b.is_pg() {
        std::fs::create_dir_all(b.data()).expect("data dir");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(b.data(), std::fs::Permissions::from_mode(0o700)).expect("chmod data dir");
    }
    let sql = Sql::of(b);
    sql.exec(&std::fs::read_to_string(dir.join("dump.sql")).expect("read dump"));
    // Negative only right after the fixture was written (its reference time is a little after
    // the old server stopped).
    let delta = now_ms() - manifest["reference_ms"].as_i64().expect("reference_ms");
    shift(&sql, &manifest["shift"], delta);
    manifest
}

/// Adds `delta` ms to every listed time column (0 and NULL mean "none" and stay).
fn shift(sql: &Sql, spec: &Value, delta: i64) {
    let mut script = String::new();
    for (unit, per) in [("ms", 1), ("us", 1000)] {
        for (table, cols) in spec[unit].as_object().expect("shift spec") {
            for col in cols.as_array().expect("columns") {
                let col = col.as_str().expect("column");
                let d = delta * per;
                script.push_str(&format!(
                    "UPDATE {table} SET {col} = {col} + {d} WHERE {col} IS NOT NULL AND {col} <> 0;\n"
                ));
            }
        }
    }
    for (table, cols) in spec["ms_lists"].as_object().expect("list spec") {
        for col in cols.as_array().expect("columns") {
            let col = col.as_str().expect("column");
            for r in sql.rows(&format!("SELECT id, {col} AS v FROM {table} WHERE {col} <> ''")) {
                let moved: Vec<String> = r["v"]
                    .as_str()
                    .expect("a list of times")
                    .split(',')
                    .map(|t| (t.parse::<i64>().expect("a time") + delta).to_string())
                    .collect();
                script.push_str(&format!("UPDATE {table} SET {col} = '{}' WHERE id = {};\n", moved.join(","), r["id"]));
            }
        }
    }
    sql.exec(&script);
}

/// `bulkhead audit verify` passes and counts `events`.
async fn assert_verified(b: &Backend, events: i64) {
    let out = b.offline(&["audit", "verify"]).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "audit verify failed: {text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("intact: {events} events")), "audit verify: {text}");
}

/// A webhook receiver on the fixture's alert port; killed on drop.
struct Receiver {
    child: Child,
    log: PathBuf,
}

impl Receiver {
    /// Starts a receiver on a free loopback port.
    fn start(log: PathBuf) -> (Receiver, u16) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/webhook_receiver.py");
        let mut child = Command::new(python())
            .arg(script)
            .arg(&log)
            .arg(ALERT_SECRET)
            .arg("0")
            .arg("0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs the webhook receiver");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("receiver prints its port");
        let port = line.trim().parse().expect("a port number");
        (Receiver { child, log }, port)
    }

    fn deliveries(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("receiver log lines are JSON"))
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Expected usage of one agent, in micro-units and counts.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Usage {
    window_spent: i64,
    window_held: i64,
    lifetime_spent: i64,
    tx_count: i64,
    denied_count: i64,
}

impl Usage {
    fn of(agent: &Value) -> Usage {
        Usage {
            window_spent: usage(agent, "window_spent"),
            window_held: usage(agent, "window_held"),
            lifetime_spent: usage(agent, "lifetime_spent"),
            tx_count: agent["usage"]["tx_count"].as_i64().expect("tx_count"),
            denied_count: agent["usage"]["denied_count"].as_i64().expect("denied_count"),
        }
    }
}

/// The fixture's agents: handle → (key, parent, expected usage).
struct Fleet {
    keys: HashMap<String, String>,
    parent: HashMap<String, Option<String>>,
    want: BTreeMap<String, Usage>,
    /// Refusals of a credential or a suspension, which a release may or may not count in
    /// `denied_count` (they are not decisions on the agent's caps).
    refusals: HashMap<String, i64>,
}

impl Fleet {
    fn of(m: &Value) -> Fleet {
        let mut f =
            Fleet { keys: HashMap::new(), parent: HashMap::new(), want: BTreeMap::new(), refusals: HashMap::new() };
        for a in m["agents"].as_array().expect("agents") {
            let h = a["handle"].as_str().expect("handle").to_owned();
            f.keys.insert(h.clone(), a["key"].as_str().expect("key").to_owned());
            f.parent.insert(h.clone(), a["parent"].as_str().map(str::to_owned));
            f.want.insert(h, Usage::of(a));
        }
        f
    }

    /// The agent and its ancestors, nearest first.
    fn chain(&self, handle: &str) -> Vec<String> {
        let mut out = vec![handle.to_owned()];
        while let Some(Some(p)) = self.parent.get(out.last().expect("non-empty")) {
            out.push(p.clone());
        }
        out
    }

    /// A settled movement of `agent`: `captured` spent, `held` no longer held, along the chain.
    fn settle(&mut self, agent: &str, held: i64, captured: i64) {
        for h in self.chain(agent) {
            let u = self.want.get_mut(&h).expect("known agent");
            u.window_held -= held;
            u.window_spent += captured;
            u.lifetime_spent += captured;
        }
    }

    async fn assert_usage(&self, api: &Api, except: &[&str]) {
        for (h, want) in &self.want {
            if except.contains(&h.as_str()) {
                continue;
            }
            let got = Usage::of(&api.agent(ADMIN, h).await);
            let slack = self.refusals.get(h).copied().unwrap_or(0);
            assert!(
                (want.denied_count..=want.denied_count + slack).contains(&got.denied_count),
                "denied_count of {h}: {got:?}, expected {want:?} (+{slack} refusals)"
            );
            assert_eq!(Usage { denied_count: want.denied_count, ..got }, *want, "usage of {h}");
        }
    }
}

async fn upgrade(mut b: Backend, schema: &str) {
    let m = load(&b, schema);
    let sql = Sql::of(&b);
    let events = m["audit"]["events"].as_i64().expect("audit events");

    // The chain the old release wrote verifies as it is, and after the migrations.
    assert_verified(&b, events).await;
    let migrated_by_fixture = sql.migrations();
    let out = b.offline(&["migrate"]).await;
    assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
    let once = sql.snapshot();
    let out = b.offline(&["migrate"]).await;
    assert!(out.status.success(), "second migrate: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sql.snapshot(), once, "a second `bulkhead migrate` changes nothing");
    let applied = sql.migrations();
    for mig in &migrated_by_fixture {
        assert!(applied.contains(mig), "released migration {mig} is still applied, unchanged: {applied:?}");
    }
    assert!(applied.iter().all(|m| m["success"] == json!(1) || m["success"] == json!(true)), "{applied:?}");
    assert_verified(&b, events).await;

    // The outbox rows name the fixture's webhook; they are pointed at this test's receiver (a
    // free port, so that test runs never compete for one), as an operator moving it would.
    let (rx, port) = Receiver::start(b.scratch("hook.log"));
    let hook = format!("http://127.0.0.1:{port}/hook");
    for a in m["alerts"]["undelivered"].as_array().expect("alerts") {
        let (id, old) = (a["id"].as_str().expect("id"), a["webhook"].as_str().expect("webhook"));
        sql.exec(&format!("UPDATE alert_outbox SET webhook = '{hook}' WHERE id = '{id}' AND webhook = '{old}';"));
    }
    let cfg = b.scratch("bulkhead.toml");
    std::fs::write(&cfg, server_config(port, None)).expect("write config");
    b.config = Some(cfg);
    b.env.push((ALERT_SECRET_ENV.into(), ALERT_SECRET.into()));
    let mut srv = Server::start(&b).await;
    let api = srv.api();
    let c = http();
    let base = srv.base.clone();
    let mut fleet = Fleet::of(&m);
    let lease_agent = m["lease"]["agent"].as_str().expect("lease agent").to_owned();
    let lease_amount = micros(m["lease"]["amount"].as_str().expect("lease amount"));

    // Alerts the old server could not deliver arrive, each once. (Waited for before anything
    // else: on SQLite a delivery's write beside a ledger batch can fail that batch with 503.)
    let want: Vec<&str> =
        m["alerts"]["undelivered"].as_array().expect("alerts").iter().map(|a| a["id"].as_str().expect("id")).collect();
    let mut delivered = Vec::new();
    for _ in 0..600 {
        delivered = rx.deliveries();
        if want.iter().all(|id| delivered.iter().any(|d| d["id"] == *id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in &want {
        let n = delivered.iter().filter(|d| d["id"] == *id).count();
        assert_eq!(n, 1, "alert {id} delivered once: {delivered:?}");
    }
    assert!(delivered.iter().all(|d| d["signature_ok"] == true), "deliveries are signed");

    // Agents, their places in the tree and their audit trails are as the old release left them.
    for a in m["agents"].as_array().expect("agents") {
        let h = a["handle"].as_str().expect("handle");
        let got = api.agent(ADMIN, h).await;
        for field in ["parent", "status", "spending_cap", "scopes"] {
            assert_eq!(got[field], a[field], "{field} of {h}");
        }
        let trail = api.audit(ADMIN, h).await.len() as i64;
        let want = m["audit"]["per_agent"][h].as_i64().expect("per-agent count");
        if h == lease_agent {
            // Its lease may already have expired, which adds an event.
            assert!((want..=want + 1).contains(&trail), "audit trail of {h}: {trail} events, fixture {want}");
        } else {
            assert_eq!(trail, want, "audit trail of {h}");
        }
    }

    // Stored answers replay byte for byte, and charge nothing; a revoked key gets no replay.
    for r in m["idempotency"].as_array().expect("idempotency") {
        let agent = r["agent"].as_str().expect("agent");
        let path = r["path"].as_str().expect("path");
        let got =
            send(&c, &base, path, &fleet.keys[agent], r["idempotency_key"].as_str(), r["body"].as_str().expect("body"))
                .await;
        match r["replay"].as_str().expect("replay") {
            "stored" => {
                assert_eq!(got.status as i64, r["status"].as_i64().expect("status"), "replay of {path}: {}", got.body);
                assert_eq!(got.body, r["response"].as_str().expect("response"), "replay of {path} is byte for byte");
                assert!(got.replayed, "Idempotent-Replayed on the replay of {path}");
            }
            "credential_revoked" => {
                assert_eq!((got.status, got.code().as_str()), (401, "credential_revoked"), "{path}: {}", got.body);
                assert!(!got.replayed);
                *fleet.refusals.entry(agent.to_owned()).or_default() += 1;
            }
            other => panic!("unknown replay expectation {other}"),
        }
    }
    fleet.assert_usage(&api, &[&lease_agent]).await;

    // Every key works as recorded.
    for a in m["agents"].as_array().expect("agents") {
        let h = a["handle"].as_str().expect("handle");
        let p = &a["probe"];
        let amt = p["amount"].as_str().expect("amount");
        let body = json!({"scope": p["scope"], "amount": amt}).to_string();
        let got = send(&c, &base, "/v1/spend", &fleet.keys[h], None, &body).await;
        match p["expect"].as_str().expect("expect") {
            "allowed" => {
                assert_eq!(got.status, 200, "spend of {h}: {}", got.body);
                assert_eq!(micros_of(&got.json()["amount"]), micros(amt));
                for x in fleet.chain(h) {
                    let u = fleet.want.get_mut(&x).expect("agent");
                    u.window_spent += micros(amt);
                    u.lifetime_spent += micros(amt);
                }
                fleet.want.get_mut(h).expect("agent").tx_count += 1;
            }
            code => {
                assert_eq!(got.code(), code, "spend of {h}: {}", got.body);
                if code.ends_with("_exceeded") {
                    fleet.want.get_mut(h).expect("agent").denied_count += 1;
                } else {
                    *fleet.refusals.entry(h.to_owned()).or_default() += 1;
                }
            }
        }
    }
    // A suspended agent works again once resumed.
    for a in m["agents"].as_array().expect("agents").iter().filter(|a| a["status"] == "suspended") {
        let h = a["handle"].as_str().expect("handle");
        let r = api.post(&format!("/v1/agents/{h}/resume"), ADMIN, &json!({})).await;
        assert_eq!(r.status, 200, "resume {h}: {}", r.body);
        let got = send(
            &c,
            &base,
            "/v1/spend",
            &fleet.keys[h],
            None,
            &json!({"scope": "payments:write", "amount": "0.10"}).to_string(),
        )
        .await;
        assert_eq!(got.status, 200, "{h} spends after resume: {}", got.body);
        for x in fleet.chain(h) {
            let u = fleet.want.get_mut(&x).expect("agent");
            u.window_spent += micros("0.10");
            u.lifetime_spent += micros("0.10");
        }
        fleet.want.get_mut(h).expect("agent").tx_count += 1;
    }

    // Open holds settle exactly; closed ones stay closed.
    for hold in m["holds"].as_array().expect("holds") {
        let (id, agent) = (hold["id"].as_str().expect("id"), hold["agent"].as_str().expect("agent"));
        let held = micros(hold["amount"].as_str().expect("amount"));
        let key = &fleet.keys[agent];
        match hold["then"].as_str().expect("then") {
            "capture" => {
                let cap = hold["capture"].as_str().expect("capture");
                let body = json!({"amount": cap}).to_string();
                let got = send(&c, &base, &format!("/v1/holds/{id}/capture"), key, None, &body).await;
                assert_eq!(got.status, 200, "capture {id}: {}", got.body);
                assert_eq!(micros_of(&got.json()["captured"]), micros(cap));
                assert_eq!(micros_of(&got.json()["released"]), held - micros(cap));
                fleet.settle(agent, held, micros(cap));
            }
            "release" => {
                let got = send(&c, &base, &format!("/v1/holds/{id}/release"), key, None, "{}").await;
                assert_eq!(got.status, 200, "release {id}: {}", got.body);
                assert_eq!(micros_of(&got.json()["released"]), held);
                fleet.settle(agent, held, 0);
            }
            "closed" => {
                let got = send(&c, &base, &format!("/v1/holds/{id}/capture"), key, None, r#"{"amount": "0.01"}"#).await;
                assert_eq!((got.status, got.code().as_str()), (409, "hold_closed"), "{id}: {}", got.body);
            }
            "revoked" => {
                let got = send(&c, &base, &format!("/v1/holds/{id}/release"), key, None, "{}").await;
                assert_eq!(got.code(), "credential_revoked", "{id}: {}", got.body);
                *fleet.refusals.entry(agent.to_owned()).or_default() += 1;
            }
            other => panic!("unknown hold expectation {other}"),
        }
    }
    fleet.assert_usage(&api, &[&lease_agent]).await;

    // The lease the old server left unsettled is captured in full at its expiry. Reads stop
    // counting an expired hold at its `expires_at`, before the sweeper captures it, so the
    // condition waited for is the capture itself: its `hold.expire` event.
    let lease_id = m["lease"]["id"].as_str().expect("lease id");
    let mut expiry = None;
    for _ in 0..600 {
        let trail = api.audit(ADMIN, &lease_agent).await;
        expiry = trail.into_iter().find(|e| e["action"] == "hold.expire" && e["ref"] == lease_id);
        if expiry.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expiry = expiry.unwrap_or_else(|| panic!("the unsettled lease {lease_id} was not captured in time"));
    assert_eq!(usage(&api.agent(ADMIN, &lease_agent).await, "window_held"), 0, "nothing is held after the capture");
    fleet.settle(&lease_agent, lease_amount, lease_amount);
    fleet.assert_usage(&api, &[]).await;
    assert_eq!(micros_of(&expiry["detail"]["captured"]), lease_amount, "captured in full: {expiry}");

    // New agents join the old tree and the old fleet.
    let root_key = &fleet.keys["acme"];
    let child = api
        .create(
            root_key,
            json!({"handle": "after-upgrade-child", "scopes": ["payments:write"], "spending_cap": "1.00",
                   "lifetime_cap": "1.00"}),
        )
        .await;
    let fresh = api
        .create(ADMIN, json!({"handle": "after-upgrade", "scopes": ["payments:write"], "spending_cap": "5.00"}))
        .await;
    // (Amounts below every alert threshold: no delivery runs beside the writes that follow.)
    for key in [&child, &fresh] {
        let got =
            send(&c, &base, "/v1/spend", key, None, &json!({"scope": "payments:write", "amount": "0.10"}).to_string())
                .await;
        assert_eq!(got.status, 200, "a new agent spends: {}", got.body);
    }
    let acme = api.agent(ADMIN, "acme").await;
    assert_eq!(usage(&acme, "lifetime_spent"), fleet.want["acme"].lifetime_spent + micros("0.10"));
    let r = api.post("/v1/agents/acme-worker-2/revoke", ADMIN, &json!({"reason": "after upgrade"})).await;
    assert_eq!(r.status, 200, "revoke: {}", r.body);
    let mut alerted = false;
    for _ in 0..600 {
        if rx.deliveries().iter().any(|d| d["type"] == "agent_revoked" && d["agent"] == "acme-worker-2") {
            alerted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(alerted, "the revocation of an agent from the old store raises its alert");
    let got = send(
        &c,
        &base,
        "/v1/spend",
        &fleet.keys["acme-worker-2"],
        None,
        &json!({"scope": "payments:write", "amount": "0.01"}).to_string(),
    )
    .await;
    assert_eq!(got.code(), "credential_revoked");

    srv.sigterm();
    assert!(srv.wait_exit().await.success(), "clean exit");
    let head = sql.rows("SELECT seq FROM audit_head WHERE id = 1");
    let now_events = head[0]["seq"].as_i64().expect("seq");
    assert!(now_events > events, "the chain grew: {now_events}");
    assert_verified(&b, now_events).await;
}
