//! Gateway leases when the call that asked for one is gone before it could use it.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bulkhead_core::key::ApiKey;
use bulkhead_core::{Micros, Scope};
use bulkhead_server::gateway::bill::{Acquired, Leases};
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

/// The agent hangs up while its first call's lease is being granted, once before the grant
/// commits (the next call comes at once) and once after it committed but before the call took
/// it: either way the lease is on its slot for the next call (no second grant), its unused
/// slots (the dropped call's too) go back, and nothing is charged for a call never made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_granted_for_a_dropped_call_is_given_back() {
    let srv = Srv::new().await;
    let leases = Leases::start(srv.ledger.clone());
    let upstream: Arc<str> = Arc::from("search");
    let scope = Scope::parse("tools:search").expect("scope");
    let unit = Micros::parse("0.01").expect("amount");
    for (handle, after_commit) in [("gone-early", false), ("gone-late", true)] {
        let key = ApiKey::parse(&srv.agent(handle, &["tools:*"], "10.00").await).expect("key").hash();
        let mut call = Box::pin(leases.acquire(&key, &upstream, &scope, unit, 60_000, unit));
        poll_once(&mut call).await;
        if after_commit {
            // The grant committed (its slots are held) and was handed over; nobody takes it.
            for _ in 0..200 {
                if held(&srv, handle).await > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(held(&srv, handle).await > 0, "the lease was granted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(call);
        // The lease is there for the next call, which takes a slot of it without a new grant;
        // one that comes while the grant is still under way waits for it.
        match leases.acquire(&key, &upstream, &scope, unit, 60_000, unit).await.expect("acquire") {
            Acquired::Go(bill) => bill.finish(unit),
            Acquired::Denied(r) => panic!("denied: {}", r.body),
        }
        let grants = srv.audit(handle).await.iter().filter(|e| e["action"] == "hold").count();
        assert_eq!(grants, 1, "{handle}: the second call used the lease granted for the first");
    }
    leases.close().await;
    for handle in ["gone-early", "gone-late"] {
        let u = srv.usage(handle).await;
        assert_eq!(
            (micros_of(&u["window_spent"]), micros_of(&u["window_held"]), u["tx_count"].as_i64()),
            (10_000, 0, Some(1)),
            "{handle}: only the call that was made is charged, every other slot went back: {u}"
        );
    }
}

/// The gateway closes (the server stops) while a lease is being granted for a call that is
/// already gone: closing waits for the grant, then gives the whole lease back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_waits_for_a_grant_under_way() {
    let srv = Srv::new().await;
    let leases = Leases::start(srv.ledger.clone());
    let upstream: Arc<str> = Arc::from("search");
    let scope = Scope::parse("tools:search").expect("scope");
    let unit = Micros::parse("0.01").expect("amount");
    let key = ApiKey::parse(&srv.agent("closing", &["tools:*"], "10.00").await).expect("key").hash();
    // Other work queued in the ledger ahead of the grant, so that the grant is still under way
    // when closing begins.
    let busy = ApiKey::parse(&srv.agent("busy", &["tools:*"], "1000.00").await).expect("key").hash();
    let mut queued = Vec::new();
    for _ in 0..400 {
        let cmd = Command::Spend { key: busy.clone(), scope: scope.clone(), amount: unit, memo: None, idem: None };
        let ledger = srv.ledger.clone();
        queued.push(tokio::spawn(async move { ledger.submit(cmd).await }));
    }
    tokio::task::yield_now().await;
    let mut call = Box::pin(leases.acquire(&key, &upstream, &scope, unit, 60_000, unit));
    poll_once(&mut call).await;
    drop(call);
    leases.close().await;
    for q in queued {
        assert_eq!(q.await.expect("spend").expect("answered").status, 200);
    }
    assert_eq!(srv.audit("closing").await.iter().filter(|e| e["action"] == "hold").count(), 1, "the lease was granted");
    let u = srv.usage("closing").await;
    assert_eq!(
        (micros_of(&u["window_spent"]), micros_of(&u["window_held"]), u["tx_count"].as_i64()),
        (0, 0, Some(0)),
        "the lease went back whole: {u}"
    );
}
