//! Shared harness of the store's integration tests: a real SQLite file or a fresh PostgreSQL
//! database (`bulkhead_testkit`: PostgreSQL tests run when `BULKHEAD_TEST_DATABASE_URL` is set), a
//! `Ledger` on a `ManualClock` with a printed seed, and small helpers to submit commands.

#![allow(dead_code, unused_imports)]

use std::sync::Arc;

use bulkhead_core::{ApiKey, Handle, KeyHash, ManualClock, Micros, Scope, ScopeSet, Span};
use bulkhead_store::{
    AgentSpec, AgentView, Answer, Caller, Command, Idem, Ledger, LedgerConfig, Refusal, Store, StoreError, VerifyReport,
};
pub(crate) use bulkhead_testkit::{HOUR, MIN, SEC, T0};

/// The scope every helper spends under.
pub(crate) const PAY: &str = "payments:write";

pub(crate) use bulkhead_testkit::Db;

pub(crate) fn m(s: &str) -> Micros {
    Micros::parse(s).unwrap_or_else(|e| panic!("bad amount {s:?}: {e}"))
}

pub(crate) fn span(s: &str) -> Span {
    Span::parse(s).unwrap()
}

pub(crate) fn scope(s: &str) -> Scope {
    Scope::parse(s).unwrap()
}

pub(crate) fn new_key() -> KeyHash {
    ApiKey::generate(&mut rand::rng()).hash()
}

/// A spec with the contract's defaults: window 24h, per-tx = cap, nothing else.
pub(crate) fn spec(handle: &str, scopes: &[&str], cap: &str) -> AgentSpec {
    AgentSpec {
        enforce: true,
        handle: Handle::parse(handle).unwrap(),
        scopes: ScopeSet::parse(scopes).unwrap(),
        spending_cap: m(cap),
        window: span("24h"),
        per_tx_limit: None,
        lifetime_cap: None,
        rate_limit: None,
        expires_in: None,
        labels: Default::default(),
        breaker: None,
    }
}

/// A ledger answer as the API sends it, rendered by the server's own mapping (so these tests
/// assert the contract's statuses and codes), with the typed answer beside it.
#[derive(Clone, Debug)]
pub(crate) struct Reply {
    pub status: u16,
    pub body: String,
    pub replayed: bool,
    pub answer: Result<Answer, Refusal>,
}

impl Reply {
    /// The `error.code` of an error reply.
    pub(crate) fn code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        v.get("error")?.get("code")?.as_str().map(str::to_owned)
    }
}

/// Renders a ledger reply as the server would send it.
pub(crate) fn rendered(r: bulkhead_store::Reply) -> Reply {
    let out = bulkhead_server::reply::render(&r);
    Reply { status: out.status, body: out.body, replayed: out.replayed, answer: r.answer }
}

/// Submits a command to `ledger` and renders its answer.
pub(crate) async fn submit_to(ledger: &Ledger, cmd: Command) -> Result<Reply, StoreError> {
    ledger.submit(cmd).await.map(rendered)
}

pub(crate) fn json(r: &Reply) -> serde_json::Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("reply body is not JSON ({e}): {}", r.body))
}

/// Asserts a success status.
#[track_caller]
pub(crate) fn ok(r: &Reply, status: u16) {
    assert_eq!(r.status, status, "expected {status}, got {}: {}", r.status, r.body);
    assert!(r.code().is_none(), "a success carries no error: {}", r.body);
}

/// Asserts an error status and code.
#[track_caller]
pub(crate) fn err(r: &Reply, status: u16, code: &str) {
    assert_eq!((r.status, r.code().as_deref()), (status, Some(code)), "body: {}", r.body);
}

pub(crate) struct Env {
    pub db: Db,
    pub store: Store,
    pub ledger: Ledger,
    pub clock: Arc<ManualClock>,
    pub url: String,
    writer: tokio::task::JoinHandle<()>,
    pg_name: Option<String>,
    dir: Option<tempfile::TempDir>,
}

impl Env {
    pub(crate) async fn new(db: Db) -> Env {
        Env::with_config(db, LedgerConfig::default()).await
    }

    /// A store and its ledger. A PostgreSQL test checks [`Db::available`] first.
    pub(crate) async fn with_config(db: Db, cfg: LedgerConfig) -> Env {
        let (url, dir, pg_name) = match db {
            Db::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                (bulkhead_testkit::sqlite_url(dir.path()), Some(dir), None)
            }
            Db::Postgres => {
                let pg = bulkhead_testkit::fresh_pg()
                    .await
                    .expect("a PostgreSQL test checks `Db::Postgres.available()` before it makes a store");
                (pg.url, None, Some(pg.name))
            }
        };
        let store = Store::open(&url).await.expect("open and migrate the store");
        let clock = bulkhead_testkit::manual_clock();
        let cfg = LedgerConfig { seed: cfg.seed.or_else(|| Some(bulkhead_testkit::seed())), ..cfg };
        let (ledger, writer) = Ledger::start(store.clone(), clock.clone(), cfg);
        Env { db, store, ledger, clock, url, writer, pg_name, dir }
    }

    /// A pool of its own on this store, for tests that write rows directly.
    pub(crate) async fn store_pool(&self) -> sqlx::AnyPool {
        sqlx::any::install_default_drivers();
        sqlx::AnyPool::connect(&self.url).await.expect("connect to the test store")
    }

    /// The SQLite file of this store (SQLite only).
    pub(crate) fn sqlite_file(&self) -> std::path::PathBuf {
        self.dir.as_ref().expect("a SQLite store").path().join("bulkhead.db")
    }

    /// Stops the writer, closes the pool and drops a PostgreSQL database.
    pub(crate) async fn finish(self) {
        let Env { store, ledger, writer, pg_name, dir, .. } = self;
        drop(ledger);
        writer.await.expect("the ledger writer ended cleanly");
        store.close().await;
        if let Some(name) = pg_name {
            bulkhead_testkit::drop_pg(&name).await;
        }
        drop(dir);
    }

    pub(crate) fn now(&self) -> i64 {
        use bulkhead_core::Clock;
        self.clock.now_ms()
    }

    pub(crate) fn advance(&self, ms: i64) {
        self.clock.advance_ms(ms);
    }

    pub(crate) async fn submit(&self, cmd: Command) -> Reply {
        submit_to(&self.ledger, cmd).await.expect("the ledger answered")
    }

    pub(crate) async fn create(&self, caller: Caller, spec: AgentSpec) -> (Reply, KeyHash) {
        let key = new_key();
        let r = self.submit(Command::CreateAgent { caller, spec, key_hash: key.clone() }).await;
        (r, key)
    }

    /// Creates an agent as the admin and returns its key hash.
    pub(crate) async fn admin_agent(&self, spec: AgentSpec) -> KeyHash {
        let (r, key) = self.create(Caller::Admin, spec).await;
        ok(&r, 201);
        key
    }

    /// Creates a child of `parent` with the parent's key; asserts 201.
    pub(crate) async fn child_agent(&self, parent: &KeyHash, spec: AgentSpec) -> KeyHash {
        let (r, key) = self.create(Caller::Agent(parent.clone()), spec).await;
        ok(&r, 201);
        key
    }

    pub(crate) async fn spend(&self, key: &KeyHash, amount: &str) -> Reply {
        self.spend_with(key, PAY, amount, None).await
    }

    pub(crate) async fn spend_with(&self, key: &KeyHash, sc: &str, amount: &str, idem: Option<Idem>) -> Reply {
        self.submit(Command::Spend { key: key.clone(), scope: scope(sc), amount: m(amount), memo: None, idem }).await
    }

    pub(crate) async fn hold(&self, key: &KeyHash, amount: &str, expires_ms: i64) -> Reply {
        self.submit(Command::Hold { key: key.clone(), scope: scope(PAY), amount: m(amount), expires_ms, idem: None })
            .await
    }

    /// Places a hold that must be granted; returns its id.
    pub(crate) async fn hold_ok(&self, key: &KeyHash, amount: &str, expires_ms: i64) -> String {
        let r = self.hold(key, amount, expires_ms).await;
        ok(&r, 201);
        json(&r)["id"].as_str().expect("hold id").to_owned()
    }

    pub(crate) async fn capture(&self, key: &KeyHash, hold: &str, amount: &str) -> Reply {
        self.submit(Command::Capture { key: key.clone(), hold_id: hold.to_owned(), amount: m(amount), idem: None })
            .await
    }

    pub(crate) async fn release(&self, key: &KeyHash, hold: &str) -> Reply {
        self.submit(Command::Release { key: key.clone(), hold_id: hold.to_owned(), idem: None }).await
    }

    pub(crate) async fn revoke(&self, caller: Caller, handle: &str) -> Reply {
        self.submit(Command::Revoke { caller, handle: handle.to_owned(), reason: Some("test".into()) }).await
    }

    /// The agent as a read sees it now.
    pub(crate) async fn agent(&self, handle: &str) -> AgentView {
        self.store.get_agent(handle, self.now()).await.expect("read").unwrap_or_else(|| panic!("no agent {handle}"))
    }

    /// (window_spent, window_held, lifetime_spent) as a read sees them now.
    pub(crate) async fn money(&self, handle: &str) -> (Micros, Micros, Micros) {
        let u = self.agent(handle).await.usage;
        (u.window_spent, u.window_held, u.lifetime_spent)
    }

    /// Asserts the audit chain is intact; returns its length.
    pub(crate) async fn intact(&self) -> i64 {
        match self.store.verify_audit(|_| {}).await.expect("verify") {
            VerifyReport::Intact { events, .. } => events,
            broken => panic!("audit chain broken: {broken:?}"),
        }
    }
}
