//! Gateway leases when the call that asked for one is gone before it could use it.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bulkhead_core::key::ApiKey;
use bulkhead_core::{Micros, Scope};
use bulkhead_server::gateway::lease::{Acquired, Leases};
use bulkhead_store::Command;
use common::Srv;

/// Polls `fut` exactly once; it must not be ready (it waits for the ledger).
async fn poll_once<F: Future + Unpin>(fut: &mut F) {
    let pending = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *fut).poll(cx).is_pending())).await;
    assert!(pending, "a new lease needs a commit first");
}

fn micros_of(v: &serde_json::Value) -> i64 {
    Micros::parse(v.as_str().expect("an amount")).expect("amount").micros()
}

async fn held(srv: &Srv, handle: &str) -> i64 {
    micros_of(&srv.usage(handle).await["window_held"])
}

/// (spent, held, tx_count) of an agent.
async fn money(srv: &Srv, handle: &str) -> (i64, i64, Option<i64>) {
    let u = srv.usage(handle).await;
    (micros_of(&u["window_spent"]), micros_of(&u["window_held"]), u["tx_count"].as_i64())
}

/// The number of leases granted to an agent.
async fn grants(srv: &Srv, handle: &str) -> usize {
    srv.audit(handle).await.iter().filter(|e| e["action"] == "hold").count()
}

/// A server's ledger with the gateway's leases, and one upstream's terms.
struct Fixture {
    srv: Srv,
    leases: Leases,
    upstream: Arc<str>,
    scope: Scope,
    unit: Micros,
}

impl Fixture {
    async fn new() -> Fixture {
        let srv = Srv::new().await;
        let leases = Leases::start(srv.ledger.clone(), bulkhead_store::LeaseAudit::Settlement);
        let scope = Scope::parse("tools:search").expect("scope");
        Fixture { srv, leases, upstream: Arc::from("search"), scope, unit: Micros::parse("0.01").expect("amount") }
    }

    /// A new agent's key hash.
    async fn agent(&self, handle: &str, cap: &str) -> bulkhead_core::KeyHash {
        ApiKey::parse(&self.srv.agent(handle, &["tools:*"], cap).await).expect("key").hash()
    }

    /// One call's slot.
    async fn acquire(&self, key: &bulkhead_core::KeyHash) -> Result<Acquired, bulkhead_store::StoreError> {
        self.leases.acquire(key, &self.upstream, &self.scope, self.unit, 60_000, self.unit).await
    }
}

/// The agent hangs up while its first call's lease is being granted, once before the grant
/// commits (the next call comes at once) and once after it committed but before the call took
/// it: either way the lease is on its slot for the next call (no second grant), its unused
/// slots (the dropped call's too) go back, and nothing is charged for a call never made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_granted_for_a_dropped_call_is_given_back() {
    let f = Fixture::new().await;
    let srv = &f.srv;
    for (handle, after_commit) in [("gone-early", false), ("gone-late", true)] {
        let key = f.agent(handle, "10.00").await;
        let mut call = Box::pin(f.acquire(&key));
        poll_once(&mut call).await;
        if after_commit {
            // The grant committed (its slots are held) and was handed over; nobody takes it.
            for _ in 0..200 {
                if held(srv, handle).await > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(held(srv, handle).await > 0, "the lease was granted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(call);
        // The lease is there for the next call, which takes a slot of it without a new grant;
        // one that comes while the grant is still under way waits for it.
        match f.acquire(&key).await.expect("acquire") {
            Acquired::Go(bill) => bill.finish(f.unit),
            Acquired::Denied(r) => panic!("denied: {:?}", r.answer),
        }
        assert_eq!(grants(srv, handle).await, 1, "{handle}: the second call used the lease granted for the first");
    }
    f.leases.close().await;
    for handle in ["gone-early", "gone-late"] {
        assert_eq!(
            money(srv, handle).await,
            (10_000, 0, Some(1)),
            "{handle}: only the call that was made is charged, every other slot went back: {:?}",
            srv.usage(handle).await
        );
    }
}

/// The gateway closes (the server stops) while a lease is being granted for a call that is
/// already gone: closing waits for the grant, then gives the whole lease back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_waits_for_a_grant_under_way() {
    let f = Fixture::new().await;
    let srv = &f.srv;
    let key = f.agent("closing", "10.00").await;
    // Other work queued in the ledger ahead of the grant, so that the grant is still under way
    // when closing begins.
    let busy = f.agent("busy", "1000.00").await;
    let mut queued = Vec::new();
    for _ in 0..400 {
        let cmd = Command::Spend { key: busy.clone(), scope: f.scope.clone(), amount: f.unit, memo: None, idem: None };
        let ledger = srv.ledger.clone();
        queued.push(tokio::spawn(async move { ledger.submit(cmd).await }));
    }
    tokio::task::yield_now().await;
    let mut call = Box::pin(f.acquire(&key));
    poll_once(&mut call).await;
    drop(call);
    f.leases.close().await;
    for q in queued {
        assert_eq!(bulkhead_server::reply::render(&q.await.expect("spend").expect("answered")).status, 200);
    }
    assert_eq!(grants(srv, "closing").await, 1, "the lease was granted");
    assert_eq!(money(srv, "closing").await, (0, 0, Some(0)), "the lease went back whole");
}
