//! The store's conformance suite: every behaviour is written once, as an `async fn(Db)`, and run
//! against both backends (a real SQLite file and a fresh database on the PostgreSQL server named by
//! `BULKHEAD_TEST_DATABASE_URL`). Test names are `sqlite::<behaviour>` and `postgres::<behaviour>`.

mod common;

use bulkhead_core::ratelimit::RateLimit;
use bulkhead_core::{DenyReason, KeyHash, Micros};
use bulkhead_store::{
    Breaker, BreakerOverride, Caller, Command, EpochReader, Idem, LeaseAudit, Ledger, LedgerConfig, Patch, Store,
    fmt_time,
};
use common::*;

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Db::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    if super::Db::Postgres.available() {
                        super::$name(super::Db::Postgres).await
                    }
                }
            )*
        }
    };
}

conformance! {
    create_agent,
    handle_taken,
    spend_until_window_cap,
    per_tx_limit,
    lifetime_cap,
    window_resets_lifetime_stays,
    holds_count_and_capture_part,
    release_and_closed_holds,
    capture_more_than_held,
    expired_hold_stops_counting,
    child_spend_counts_against_parent,
    ancestor_cap_exceeded,
    scope_and_cap_escalation,
    ancestors_bind_their_subtree,
    children_no_looser_than_parents,
    operator_suspension,
    denials_say_how_to_recover,
    refusals_cost_no_writes,
    limits_bound_growth,
    fleet_total_saturates_once,
    clock_steps_back,
    revoke_cascades,
    parent_revokes_only_descendants,
    revocation_releases_holds,
    revocation_after_a_hold_expired,
    key_rotation,
    credential_expiry,
    idempotency_replay,
    idempotency_rendered_record_replays,
    revoked_key_is_never_replayed,
    denials_counted,
    runaway_breaker,
    breaker_window_and_overrides,
    runaway_rate_and_repeats,
    rate_limit,
    check_order,
    audit_every_decision,
    refused_tool_call_audited,
    schema_refuses_broken_rows,
    shadow_mode,
    gateway_holds,
    lease_takes_what_fits,
    lease_limited_by_ancestors,
    lease_denials_match_metered_hold,
    lease_settle_calls_release_close,
    lease_settle_audits_each_call,
    lease_rate_limit,
    lease_expiry_captures_what_it_holds,
    lease_one_slot_when_decided_call_by_call,
    authz_epoch,
    epoch_reader,
    concurrent_leases_parent_and_child,
    concurrent_spends_one_agent,
    concurrent_spends_parent_and_child,
}

const PARENT_SCOPES: &[&str] = &["payments:write", "invoices:read", "spawn:agents"];

async fn create_agent(db: Db) {
    let e = Env::new(db).await;
    let h = "invoice-processor-prod-01";
    let (r, key) = e.create(Caller::Admin, spec(h, &["payments:write", "invoices:read"], "50.00")).await;
    ok(&r, 201);
    let v = json(&r);
    assert_eq!(v["handle"], h);
    assert!(v["parent"].is_null());
    assert_eq!(v["status"], "active");
    let mut scopes: Vec<&str> = v["scopes"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    scopes.sort_unstable();
    assert_eq!(scopes, ["invoices:read", "payments:write"]);
    assert_eq!(v["spending_cap"], "50.00");
    assert_eq!(v["per_tx_limit"], "50.00", "per_tx_limit defaults to the spending cap");
    assert_eq!(v["window"], "24h");
    assert!(v["lifetime_cap"].is_null() && v["rate_limit"].is_null() && v["revoked_at"].is_null());
    assert_eq!(v["created_at"], fmt_time(T0));
    assert_eq!(v["usage"]["window_spent"], "0.00");
    assert_eq!(v["usage"]["window_resets_at"], fmt_time(T0 + 24 * HOUR));
    assert!(v.get("key").is_none(), "the store never renders the key");

    let a = e.agent(h).await;
    assert_eq!((a.status.as_str(), a.spending_cap, a.per_tx_limit), ("active", m("50"), m("50")));
    assert_eq!(a.usage.tx_count, 0);
    let by_key = e.store.agent_for_key(&key, e.now()).await.unwrap().expect("the new key works");
    assert_eq!(by_key.handle, h);
    assert_eq!(e.store.agent_for_key(&new_key(), e.now()).await.unwrap().unwrap_err(), DenyReason::InvalidCredentials);
    assert!(e.store.get_agent("nobody", e.now()).await.unwrap().is_none());
    let all = e.store.list_agents(None, 100, e.now()).await.unwrap();
    assert_eq!(all.iter().map(|a| a.handle.as_str()).collect::<Vec<_>>(), vec![h]);
    let ev = e.store.audit_page(Some(h), 0, 10).await.unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].action.as_str(), ev[0].outcome.as_str()), ("agent.create", "allowed"));
    assert_eq!(e.intact().await, 1);
    e.finish().await;
}

async fn handle_taken(db: Db) {
    let e = Env::new(db).await;
    let first = e.admin_agent(spec("a1", &[PAY], "10")).await;
    let (r, second) = e.create(Caller::Admin, spec("a1", &[PAY, "x:y"], "99")).await;
    err(&r, 409, "handle_taken");
    // The first agent is untouched and keeps its key; the refused key is unknown.
    let a = e.agent("a1").await;
    assert_eq!((a.spending_cap, a.scopes.clone()), (m("10"), vec![PAY.to_owned()]));
    ok(&e.spend(&first, "1").await, 200);
    err(&e.spend(&second, "1").await, 401, "invalid_credentials");
    e.admin_agent(spec("a2", &[PAY], "10")).await;
    let all = e.store.list_agents(None, 100, e.now()).await.unwrap();
    assert_eq!(all.len(), 2);
    let page = e.store.list_agents(Some("a1"), 100, e.now()).await.unwrap();
    assert_eq!(page.iter().map(|a| a.handle.as_str()).collect::<Vec<_>>(), vec!["a2"]);
    e.finish().await;
}

async fn spend_until_window_cap(db: Db) {
    let e = Env::new(db).await;
    let k = e.admin_agent(spec("capped", &[PAY], "10.00")).await;
    let r = e.spend(&k, "4.00").await;
    ok(&r, 200);
    let v = json(&r);
    assert_eq!(v["amount"], "4.00");
    assert_eq!(v["remaining"]["window"], "6.00");
    assert!(v["remaining"]["lifetime"].is_null());
    assert_eq!(v["window_resets_at"], fmt_time(T0 + 24 * HOUR));
    assert!(v["id"].as_str().is_some_and(|s| !s.is_empty()));
    ok(&e.spend(&k, "4.00").await, 200);
    let before = e.agent("capped").await.usage;
    err(&e.spend(&k, "2.000001").await, 402, "spending_cap_exceeded");
    let after = e.agent("capped").await.usage;
    assert_eq!((after.window_spent, after.lifetime_spent, after.tx_count), (m("8"), m("8"), 2), "nothing charged");
    assert_eq!(after.denied_count, before.denied_count + 1);
    let r = e.spend(&k, "2.00").await;
    ok(&r, 200);
    assert_eq!(json(&r)["remaining"]["window"], "0.00");
    err(&e.spend(&k, "0.000001").await, 402, "spending_cap_exceeded");
    let u = e.agent("capped").await.usage;
    assert_eq!((u.window_spent, u.window_held, u.lifetime_spent), (m("10"), Micros::ZERO, m("10")));
    assert_eq!(u.utilization, 1.0);
    e.finish().await;
}

async fn per_tx_limit(db: Db) {
    let e = Env::new(db).await;
    let mut s = spec("pertx", &[PAY], "10.00");
    s.per_tx_limit = Some(m("3.00"));
    let k = e.admin_agent(s).await;
    err(&e.spend(&k, "3.000001").await, 402, "per_tx_limit_exceeded");
    err(&e.hold(&k, "3.01", 5 * MIN).await, 402, "per_tx_limit_exceeded");
    assert_eq!(e.money("pertx").await, (Micros::ZERO, Micros::ZERO, Micros::ZERO));
    ok(&e.spend(&k, "3.00").await, 200);
    ok(&e.spend(&k, "3.00").await, 200);
    ok(&e.spend(&k, "3.00").await, 200);
    // The per-tx limit is checked before the cap: 4 is refused for per-tx although the cap is also hit.
    err(&e.spend(&k, "4.00").await, 402, "per_tx_limit_exceeded");
    err(&e.spend(&k, "1.01").await, 402, "spending_cap_exceeded");
    assert_eq!(e.money("pertx").await.0, m("9"));
    e.finish().await;
}

async fn lifetime_cap(db: Db) {
    let e = Env::new(db).await;
    let mut s = spec("life", &[PAY], "10.00");
    s.window = span("1h");
    s.lifetime_cap = Some(m("15.00"));
    let k = e.admin_agent(s).await;
    let r = e.spend(&k, "10").await;
    ok(&r, 200);
    assert_eq!(json(&r)["remaining"]["lifetime"], "5.00");
    e.advance(HOUR);
    err(&e.spend(&k, "5.01").await, 402, "lifetime_cap_exceeded");
    assert_eq!(e.money("life").await, (Micros::ZERO, Micros::ZERO, m("10")));
    // A hold counts against the lifetime cap too.
    let hid = e.hold_ok(&k, "4", 5 * MIN).await;
    err(&e.spend(&k, "1.01").await, 402, "lifetime_cap_exceeded");
    ok(&e.release(&k, &hid).await, 200);
    ok(&e.spend(&k, "5").await, 200);
    e.advance(10 * HOUR);
    err(&e.spend(&k, "0.000001").await, 402, "lifetime_cap_exceeded");
    assert_eq!(e.money("life").await, (Micros::ZERO, Micros::ZERO, m("15")));
    e.finish().await;
}

async fn window_resets_lifetime_stays(db: Db) {
    let e = Env::new(db).await;
    let mut s = spec("win", &[PAY], "10.00");
    s.window = span("1h");
    let k = e.admin_agent(s).await;
    e.advance(10 * MIN);
    ok(&e.spend(&k, "10").await, 200);
    err(&e.spend(&k, "1").await, 402, "spending_cap_exceeded");
    // The window is anchored at creation: it ends at T0 + 1h, not at the first spend + 1h.
    e.clock.set_ms(T0 + HOUR - 1);
    err(&e.spend(&k, "1").await, 402, "spending_cap_exceeded");
    assert_eq!(e.money("win").await, (m("10"), Micros::ZERO, m("10")));
    e.clock.set_ms(T0 + HOUR);
    assert_eq!(e.money("win").await, (Micros::ZERO, Micros::ZERO, m("10")), "a read sees the new window");
    let u = e.agent("win").await.usage;
    assert_eq!(u.window_started_at, fmt_time(T0 + HOUR));
    assert_eq!(u.window_resets_at, fmt_time(T0 + 2 * HOUR));
    let r = e.spend(&k, "1").await;
    ok(&r, 200);
    assert_eq!(json(&r)["remaining"]["window"], "9.00");
    assert_eq!(json(&r)["window_resets_at"], fmt_time(T0 + 2 * HOUR));
    assert_eq!(e.money("win").await, (m("1"), Micros::ZERO, m("11")));
    // Skipping several windows at once resets too.
    e.advance(5 * HOUR + 30 * MIN);
    ok(&e.spend(&k, "10").await, 200);
    assert_eq!(e.money("win").await, (m("10"), Micros::ZERO, m("21")));
    e.finish().await;
}

async fn holds_count_and_capture_part(db: Db) {
    let e = Env::new(db).await;
    let k = e.admin_agent(spec("holder", &[PAY], "10.00")).await;
    let r = e.hold(&k, "6.00", 5 * MIN).await;
    ok(&r, 201);
    let v = json(&r);
    assert_eq!(v["amount"], "6.00");
    assert_eq!(v["expires_at"], fmt_time(T0 + 5 * MIN));
    let hid = v["id"].as_str().unwrap().to_owned();
    assert_eq!(e.money("holder").await, (Micros::ZERO, m("6"), Micros::ZERO));
    assert_eq!(e.agent("holder").await.usage.utilization, 0.6);
    err(&e.spend(&k, "4.01").await, 402, "spending_cap_exceeded");
    err(&e.hold(&k, "4.01", 5 * MIN).await, 402, "spending_cap_exceeded");
    let r = e.capture(&k, &hid, "2.50").await;
    ok(&r, 200);
    let v = json(&r);
    assert_eq!(
        (v["id"].as_str(), v["captured"].as_str(), v["released"].as_str()),
        (Some(&*hid), Some("2.50"), Some("3.50"))
    );
    assert_eq!(e.money("holder").await, (m("2.5"), Micros::ZERO, m("2.5")), "captured stays, the rest is released");
    ok(&e.spend(&k, "7.50").await, 200);
    err(&e.spend(&k, "0.01").await, 402, "spending_cap_exceeded");
    e.finish().await;
}

async fn release_and_closed_holds(db: Db) {
    let e = Env::new(db).await;
    let k = e.admin_agent(spec("rel", &[PAY], "10.00")).await;
    let hid = e.hold_ok(&k, "4", 5 * MIN).await;
    let r = e.release(&k, &hid).await;
    ok(&r, 200);
    assert_eq!(json(&r)["released"], "4.00");
    assert_eq!(e.money("rel").await, (Micros::ZERO, Micros::ZERO, Micros::ZERO));
    err(&e.release(&k, &hid).await, 409, "hold_closed");
    err(&e.capture(&k, &hid, "1").await, 409, "hold_closed");
    let hid = e.hold_ok(&k, "4", 5 * MIN).await;
    ok(&e.capture(&k, &hid, "4").await, 200);
    err(&e.capture(&k, &hid, "1").await, 409, "hold_closed");
    err(&e.release(&k, &hid).await, 409, "hold_closed");
    assert_eq!(e.money("rel").await, (m("4"), Micros::ZERO, m("4")), "a closed hold is never settled twice");
    // Unknown holds, and another agent's hold, are not found.
    err(&e.release(&k, "hold_doesnotexist").await, 404, "not_found");
    let other = e.admin_agent(spec("other", &[PAY], "10.00")).await;
    let theirs = e.hold_ok(&other, "1", 5 * MIN).await;
    err(&e.capture(&k, &theirs, "1").await, 404, "not_found");
    err(&e.release(&k, &theirs).await, 404, "not_found");
    assert_eq!(e.money("other").await.1, m("1"));
    e.finish().await;
}

async fn capture_more_than_held(db: Db) {
    let e = Env::new(db).await;
    let k = e.admin_agent(spec("over", &[PAY], "10.00")).await;
    let hid = e.hold_ok(&k, "1.00", 5 * MIN).await;
    err(&e.capture(&k, &hid, "1.000001").await, 400, "invalid_amount");
    assert_eq!(e.money("over").await, (Micros::ZERO, m("1"), Micros::ZERO), "the hold stays open and untouched");
    let r = e.capture(&k, &hid, "1.00").await;
    ok(&r, 200);
    assert_eq!(json(&r)["released"], "0.00");
    assert_eq!(e.money("over").await, (m("1"), Micros::ZERO, m("1")));
    e.finish().await;
}

async fn expired_hold_stops_counting(db: Db) {
    let e = Env::new(db).await;
    let pk = e.admin_agent(spec("exp-parent", PARENT_SCOPES, "10.00")).await;
    let ck = e.child_agent(&pk, spec("exp-child", &[PAY], "10.00")).await;
    let hid = e.hold_ok(&ck, "6", 5 * MIN).await;
    e.advance(5 * MIN - 1);
    assert_eq!(e.money("exp-child").await.1, m("6"));
    assert_eq!(e.money("exp-parent").await.1, m("6"));
    err(&e.spend(&pk, "4.01").await, 402, "spending_cap_exceeded");
    e.advance(1);
    // Reads: nothing has touched the ledger since the expiry instant, yet the hold no longer counts.
    assert_eq!(e.money("exp-child").await, (Micros::ZERO, Micros::ZERO, Micros::ZERO));
    assert_eq!(e.money("exp-parent").await, (Micros::ZERO, Micros::ZERO, Micros::ZERO));
    assert_eq!(e.agent("exp-parent").await.usage.utilization, 0.0);
    // Decisions: the full cap is available again; and capturing the expired hold is refused.
    ok(&e.spend(&pk, "10").await, 200);
    err(&e.capture(&ck, &hid, "1").await, 409, "hold_closed");
    err(&e.release(&ck, &hid).await, 409, "hold_closed");
    assert_eq!(e.money("exp-parent").await, (m("10"), Micros::ZERO, m("10")));
    assert_eq!(e.money("exp-child").await, (Micros::ZERO, Micros::ZERO, Micros::ZERO));

    // A capture that is the first command after the expiry is refused (and charges nothing).
    e.advance(24 * HOUR);
    let hid = e.hold_ok(&ck, "3", 10 * MIN).await;
    e.advance(10 * MIN);
    err(&e.capture(&ck, &hid, "3").await, 409, "hold_closed");
    assert_eq!(e.money("exp-child").await, (Micros::ZERO, Micros::ZERO, Micros::ZERO));
    assert_eq!(e.money("exp-parent").await, (Micros::ZERO, Micros::ZERO, m("10")));
    // The sweep closes what is left, once: each expiry is recorded once in the audit trail, and
    // the figures do not move again.
    for _ in 0..2 {
        ok(&e.submit(Command::SweepExpired).await, 200);
        let ev = e.store.audit_page(Some("exp-child"), 0, 100).await.unwrap();
        assert_eq!(ev.iter().filter(|x| x.action == "hold.expire").count(), 2);
        assert_eq!(e.money("exp-parent").await, (Micros::ZERO, Micros::ZERO, m("10")));
    }
    ok(&e.spend(&ck, "10").await, 200);
    assert_eq!(e.money("exp-parent").await, (m("10"), Micros::ZERO, m("20")));
    e.intact().await;
    e.finish().await;
}

async fn child_spend_counts_against_parent(db: Db) {
    let e = Env::new(db).await;
    let pk = e.admin_agent(spec("parent", PARENT_SCOPES, "20.00")).await;
    let (r, ck) = e.create(Caller::Agent(pk.clone()), spec("child", &[PAY], "10.00")).await;
    ok(&r, 201);
    assert_eq!(json(&r)["parent"], "parent");
    assert_eq!(e.agent("child").await.parent.as_deref(), Some("parent"));
    ok(&e.spend(&ck, "5").await, 200);
    let hid = e.hold_ok(&ck, "2", 5 * MIN).await;
    assert_eq!(e.money("child").await, (m("5"), m("2"), m("5")));
    assert_eq!(e.money("parent").await, (m("5"), m("2"), m("5")), "the parent's usage includes the child's");
    ok(&e.spend(&pk, "3").await, 200);
    assert_eq!(e.money("parent").await, (m("8"), m("2"), m("8")));
    assert_eq!(e.money("child").await, (m("5"), m("2"), m("5")), "a parent's own spend is not the child's");
    ok(&e.capture(&ck, &hid, "1.5").await, 200);
    assert_eq!(e.money("child").await, (m("6.5"), Micros::ZERO, m("6.5")));
    assert_eq!(e.money("parent").await, (m("9.5"), Micros::ZERO, m("9.5")));
    e.finish().await;
}

async fn ancestor_cap_exceeded(db: Db) {
    let e = Env::new(db).await;
    let pk = e.admin_agent(spec("p", PARENT_SCOPES, "20.00")).await;
    let mut cs = spec("c", &[PAY, "spawn:agents"], "10.00");
    cs.window = span("1h");
    let ck = e.child_agent(&pk, cs).await;
    let gk = e.child_agent(&ck, spec("g", &[PAY], "10.00")).await;
    ok(&e.spend(&gk, "5").await, 200);
    ok(&e.spend(&pk, "14").await, 200);
    assert_eq!(e.money("p").await.0, m("19"));
    err(&e.spend(&gk, "2").await, 402, "ancestor_cap_exceeded");
    err(&e.hold(&ck, "2", MIN).await, 402, "ancestor_cap_exceeded");
    assert_eq!(e.money("g").await.0, m("5"), "nothing charged");
    assert_eq!(e.money("c").await.0, m("5"));
    assert_eq!(e.money("p").await.0, m("19"));
    ok(&e.spend(&gk, "1").await, 200);
    assert_eq!(e.money("p").await.0, m("20"));
    // Each ancestor in its own window: the middle agent's 1h window resets, the root's 24h does not.
    e.advance(HOUR);
    assert_eq!(e.money("c").await.0, Micros::ZERO);
    assert_eq!(e.money("p").await.0, m("20"));
    err(&e.spend(&gk, "0.01").await, 402, "ancestor_cap_exceeded");
    e.finish().await;
}

async fn scope_and_cap_escalation(db: Db) {
    let e = Env::new(db).await;
    let mut ps = spec("esc-parent", &["payments:write", "spawn:agents"], "20.00");
    ps.per_tx_limit = Some(m("5"));
    ps.lifetime_cap = Some(m("100"));
    let pk = e.admin_agent(ps).await;
    let with_lifetime = |h: &str, scopes: &[&str], cap: &str| {
        let mut s = spec(h, scopes, cap);
        s.per_tx_limit = Some(m("5"));
        s.lifetime_cap = Some(m("100"));
        s
    };
    for scopes in [&["payments:write", "invoices:read"][..], &["*"], &["payments:*"]] {
        let (r, _) = e.create(Caller::Agent(pk.clone()), with_lifetime("esc-child", scopes, "1")).await;
        err(&r, 403, "scope_escalation");
    }
    let (r, _) = e.create(Caller::Agent(pk.clone()), with_lifetime("esc-child", &[PAY], "20.000001")).await;
    err(&r, 403, "cap_escalation");
    let mut s = with_lifetime("esc-child", &[PAY], "1");
    s.per_tx_limit = Some(m("5.01"));
    let (r, _) = e.create(Caller::Agent(pk.clone()), s).await;
    err(&r, 403, "cap_escalation");
    let mut s = with_lifetime("esc-child", &[PAY], "1");
    s.lifetime_cap = None;
    let (r, _) = e.create(Caller::Agent(pk.clone()), s).await;
    err(&r, 403, "cap_escalation");
    let mut s = with_lifetime("esc-child", &[PAY], "1");
    s.lifetime_cap = Some(m("100.01"));
    let (r, _) = e.create(Caller::Agent(pk.clone()), s).await;
    err(&r, 403, "cap_escalation");
    // Default per-tx of a child = its cap, which must not exceed the parent's per-tx either.
    let mut s = with_lifetime("esc-child", &[PAY], "6");
    s.per_tx_limit = None;
    let (r, _) = e.create(Caller::Agent(pk.clone()), s).await;
    err(&r, 403, "cap_escalation");
    // Caps are compared as amounts whatever the windows.
    let mut s = with_lifetime("esc-child", &[PAY], "20.01");
    s.window = span("1h");
    let (r, _) = e.create(Caller::Agent(pk.clone()), s).await;
    err(&r, 403, "cap_escalation");
    assert!(e.store.get_agent("esc-child", e.now()).await.unwrap().is_none(), "nothing was created");
    // Equal is fine, and so is a subset of the scopes.
    let ck = e.child_agent(&pk, with_lifetime("esc-child", &[PAY], "20")).await;
    // A key without spawn:agents cannot create children at all.
    let (r, _) = e.create(Caller::Agent(ck), spec("esc-grandchild", &[PAY], "1")).await;
    err(&r, 403, "scope_not_granted");
    let (r, _) = e.create(Caller::Agent(new_key()), spec("esc-x", &[PAY], "1")).await;
    err(&r, 401, "invalid_credentials");
    // Escalation attempts are decisions: they are in the parent's audit trail.
    let ev = e.store.audit_page(Some("esc-parent"), 0, 100).await.unwrap();
    let denied: Vec<_> = ev.iter().filter(|x| x.outcome == "denied").map(|x| x.reason.clone().unwrap()).collect();
    assert_eq!(denied.iter().filter(|r| *r == "scope_escalation").count(), 3, "{denied:?}");
    assert_eq!(denied.iter().filter(|r| *r == "cap_escalation").count(), 6, "{denied:?}");
    e.intact().await;
    e.finish().await;
}

/// Hardening finding 1: a parent's suspension, narrowed scopes, rate limit and key expiry bind
/// every descendant from the moment the change answers.
async fn ancestors_bind_their_subtree(db: Db) {
    let e = Env::new(db).await;
    let mut ps = spec("sub-root", PARENT_SCOPES, "100");
    ps.expires_in = Some(span("2h"));
    let pk = e.admin_agent(ps).await;
    let mut cs = spec("sub-mid", &[PAY, "spawn:agents"], "50");
    cs.expires_in = Some(span("1h"));
    let ck = e.child_agent(&pk, cs).await;
    let gk = e.child_agent(&ck, spec("sub-leaf", &[PAY], "10")).await;
    ok(&e.spend(&gk, "1").await, 200);
    // Suspension of the root binds the grandchild; resuming frees it.
    ok(&e.submit(Command::Suspend { handle: "sub-root".into(), reason: Some("audit".into()) }).await, 200);
    err(&e.spend(&gk, "1").await, 403, "agent_suspended");
    err(&e.spend(&ck, "1").await, 403, "agent_suspended");
    let (r, _) = e.create(Caller::Agent(ck.clone()), spec("sub-new", &[PAY], "1")).await;
    err(&r, 403, "agent_suspended");
    ok(&e.submit(Command::Resume { handle: "sub-root".into() }).await, 200);
    ok(&e.spend(&gk, "1").await, 200);
    // A scope the middle agent no longer holds, its child may not use.
    let narrow =
        Patch { scopes: Some(bulkhead_core::ScopeSet::parse(&["invoices:read"]).unwrap()), ..Patch::default() };
    ok(&e.submit(Command::PatchAgent { handle: "sub-mid".into(), patch: narrow }).await, 200);
    err(&e.spend(&gk, "1").await, 403, "scope_not_granted");
    let back =
        Patch { scopes: Some(bulkhead_core::ScopeSet::parse(&[PAY, "spawn:agents"]).unwrap()), ..Patch::default() };
    ok(&e.submit(Command::PatchAgent { handle: "sub-mid".into(), patch: back }).await, 200);
    // The root's rate limit of 2 a minute is the whole tree's.
    let limited = Patch { rate_limit: Some(Some(RateLimit { requests: 2, per_ms: 60_000 })), ..Patch::default() };
    ok(&e.submit(Command::PatchAgent { handle: "sub-root".into(), patch: limited }).await, 200);
    ok(&e.spend(&gk, "1").await, 200);
    ok(&e.spend(&ck, "1").await, 200);
    err(&e.spend(&gk, "1").await, 429, "rate_limited");
    let unlimited = Patch { rate_limit: Some(None), ..Patch::default() };
    ok(&e.submit(Command::PatchAgent { handle: "sub-root".into(), patch: unlimited }).await, 200);
    // The middle agent's key expires at 1h: its whole subtree stops with it.
    e.advance(HOUR);
    err(&e.spend(&gk, "1").await, 401, "credential_expired");
    assert_eq!(e.store.agent_for_key(&gk, e.now()).await.unwrap().unwrap_err(), DenyReason::CredentialExpired);
    ok(&e.spend(&pk, "1").await, 200);
    e.advance(HOUR);
    err(&e.spend(&pk, "1").await, 401, "credential_expired");
    e.intact().await;
    e.finish().await;
}

/// Hardening finding 1: a child's rate limit, key expiry and breaker may not be looser than its
/// parent's; what it does not name, it takes from its parent.
async fn children_no_looser_than_parents(db: Db) {
    let e = Env::new(db).await;
    let mut ps = spec("nl-parent", PARENT_SCOPES, "100");
    ps.rate_limit = Some(RateLimit { requests: 10, per_ms: 60_000 });
    ps.expires_in = Some(span("1h"));
    ps.breaker = Some(BreakerOverride { denials: Some(5), ..Default::default() });
    let pk = e.admin_agent(ps).await;
    let child = || spec("nl-child", &[PAY], "1");
    let mut cases = Vec::new();
    let mut s = child();
    s.rate_limit = Some(RateLimit { requests: 11, per_ms: 60_000 });
    cases.push(("rate limit", s));
    let mut s = child();
    s.rate_limit = Some(RateLimit { requests: 10, per_ms: 30_000 });
    cases.push(("rate limit", s));
    let mut s = child();
    s.expires_in = Some(span("2h"));
    cases.push(("key expiry", s));
    let mut s = child();
    s.breaker = Some(BreakerOverride { denials: Some(0), ..Default::default() });
    cases.push(("breaker", s));
    for (what, s) in cases {
        let (r, _) = e.create(Caller::Agent(pk.clone()), s).await;
        err(&r, 403, "cap_escalation");
        assert!(r.body.contains(what), "the message names the {what}: {}", r.body);
    }
    assert!(e.store.get_agent("nl-child", e.now()).await.unwrap().is_none(), "nothing was created");
    // Named and tighter, or not named at all (taken from the parent), both are fine.
    let mut tight = spec("nl-tight", &[PAY], "1");
    tight.rate_limit = Some(RateLimit { requests: 5, per_ms: 60_000 });
    tight.expires_in = Some(span("30m"));
    let (r, _) = e.create(Caller::Agent(pk.clone()), tight).await;
    ok(&r, 201);
    assert_eq!(json(&r)["rate_limit"]["requests"], 5);
    let (r, _) = e.create(Caller::Agent(pk.clone()), spec("nl-plain", &[PAY], "1")).await;
    ok(&r, 201);
    assert_eq!(json(&r)["rate_limit"]["requests"], 10, "the parent's rate limit: {}", r.body);
    let row = e.agent("nl-plain").await;
    assert_eq!(row.rate_limit.map(|r| r.requests), Some(10));
    e.advance(HOUR);
    let plain = e.store.list_agents(None, 100, e.now()).await.unwrap();
    assert!(plain.iter().any(|a| a.handle == "nl-plain"));
    e.finish().await;
}

/// `POST /v1/agents/{handle}/suspend`: suspended until resumed, audited and alerted once; a
/// revoked agent cannot be suspended.
async fn operator_suspension(db: Db) {
    let e = Env::new(db).await;
    let k = e.admin_agent(spec("op-s", &[PAY], "10")).await;
    let hid = e.hold_ok(&k, "1", HOUR).await;
    let r = e.submit(Command::Suspend { handle: "op-s".into(), reason: Some("investigating".into()) }).await;
    ok(&r, 200);
    assert_eq!(json(&r)["status"], "suspended");
    ok(&e.submit(Command::Suspend { handle: "op-s".into(), reason: None }).await, 200);
    err(&e.spend(&k, "1").await, 403, "agent_suspended");
    // Releasing what it holds is still allowed: refusing would keep money reserved longer.
    ok(&e.release(&k, &hid).await, 200);
    let ev = e.store.audit_page(Some("op-s"), 0, 100).await.unwrap();
    let suspends: Vec<_> = ev.iter().filter(|x| x.action == "agent.suspend").collect();
    assert_eq!(suspends.len(), 1, "a second suspension changes nothing");
    assert_eq!(suspends[0].reason.as_deref(), Some("investigating"));
    ok(&e.submit(Command::Resume { handle: "op-s".into() }).await, 200);
    ok(&e.spend(&k, "1").await, 200);
    err(&e.submit(Command::Suspend { handle: "nobody".into(), reason: None }).await, 404, "not_found");
    ok(&e.submit(Command::Revoke { caller: Caller::Admin, handle: "op-s".into(), reason: None }).await, 200);
    err(&e.submit(Command::Suspend { handle: "op-s".into(), reason: None }).await, 409, "agent_revoked");
    e.intact().await;
    e.finish().await;
}

/// Hardening finding 12 (contract §5): a 402 carries `remaining` and `window_resets_at`, and a
/// window cap's denial says how long until the window resets.
async fn denials_say_how_to_recover(db: Db) {
    let e = Env::new(db).await;
    let mut ps = spec("rec-p", PARENT_SCOPES, "5");
    ps.window = span("1h");
    ps.lifetime_cap = Some(m("9"));
    let pk = e.admin_agent(ps).await;
    ok(&e.spend(&pk, "4").await, 200);
    e.advance(10 * 60_000);
    let r = e.spend_with(&pk, PAY, "1.01", idem("rec-1", "h")).await;
    err(&r, 402, "spending_cap_exceeded");
    let v = json(&r);
    assert_eq!(v["remaining"]["window"], "1.00");
    assert_eq!(v["remaining"]["lifetime"], "5.00");
    assert_eq!(v["window_resets_at"], fmt_time(T0 + HOUR));
    assert_eq!(v["error"]["retry_after"], 50 * 60, "seconds until the window resets");
    // A replay answers the same.
    let again = e.spend_with(&pk, PAY, "1.01", idem("rec-1", "h")).await;
    assert_eq!((again.status, again.body.as_str(), again.replayed), (402, r.body.as_str(), true));
    // A child is told what its whole chain leaves it, and a per-tx denial has no wait.
    let mut cs = spec("rec-c", &[PAY], "5");
    cs.per_tx_limit = Some(m("2"));
    cs.lifetime_cap = Some(m("9"));
    let ck = e.child_agent(&pk, cs).await;
    let r = e.spend(&ck, "1.5").await;
    err(&r, 402, "ancestor_cap_exceeded");
    let v = json(&r);
    assert_eq!((v["remaining"]["window"].as_str(), v["remaining"]["lifetime"].as_str()), (Some("1.00"), Some("5.00")));
    assert_eq!(v["window_resets_at"], fmt_time(T0 + 10 * 60_000 + 24 * HOUR), "the child's own window");
    assert!(v["error"].get("retry_after").is_none(), "{v}");
    let r = e.spend(&ck, "2.5").await;
    err(&r, 402, "per_tx_limit_exceeded");
    assert_eq!(json(&r)["remaining"]["window"], "1.00");
    // Other denials carry none of it.
    let r = e.spend_with(&ck, "x:y", "1", None).await;
    err(&r, 403, "scope_not_granted");
    assert!(json(&r).get("remaining").is_none());
    e.finish().await;
}

/// Hardening finding 4: a revoked, expired, suspended or unknown key wrote an audit event and a
/// row update per request (200 requests, 200 events). Once refused, such a key is answered from
/// memory, and its refusals are audited coalesced: one event per agent and reason, with a count.
async fn refusals_cost_no_writes(db: Db) {
    let e = Env::new(db).await;
    let events = |h: &'static str| {
        let store = e.store.clone();
        async move { store.audit_page(Some(h), 0, 10_000).await.unwrap() }
    };
    let k = e.admin_agent(spec("rf-revoked", &[PAY], "10")).await;
    ok(&e.revoke(Caller::Admin, "rf-revoked").await, 200);
    let before = events("rf-revoked").await.len();
    for _ in 0..200 {
        err(&e.spend(&k, "1").await, 401, "credential_revoked");
    }
    err(&e.hold(&k, "1", MIN).await, 401, "credential_revoked");
    let after = events("rf-revoked").await.len();
    assert_eq!(after, before + 1, "only the first refusal was written");
    assert_eq!(e.agent("rf-revoked").await.usage.denied_count, 1);
    e.ledger.audit_refusals().await;
    let ev = events("rf-revoked").await;
    let last = ev.last().unwrap();
    assert_eq!(
        (last.action.as_str(), last.outcome.as_str(), last.reason.as_deref()),
        ("refused", "denied", Some("credential_revoked"))
    );
    let detail = last.detail.clone().expect("a detail");
    assert_eq!(detail["count"], 200, "the 200 refusals answered from memory, in one event: {detail}");
    assert_eq!(e.agent("rf-revoked").await.usage.denied_count, 201);
    e.ledger.audit_refusals().await;
    assert_eq!(events("rf-revoked").await.len(), ev.len(), "nothing new to audit");

    // An unknown key: refused, nothing written anywhere.
    let total = e.intact().await;
    let stranger = new_key();
    for _ in 0..100 {
        err(&e.spend(&stranger, "1").await, 401, "invalid_credentials");
    }
    e.ledger.audit_refusals().await;
    assert_eq!(e.intact().await, total);

    // A suspended agent: spends refused from memory, but it may still settle what it holds,
    // and a resume is obeyed at once.
    let sk = e.admin_agent(spec("rf-susp", &[PAY], "10")).await;
    let hid = e.hold_ok(&sk, "1", HOUR).await;
    ok(&e.submit(Command::Suspend { handle: "rf-susp".into(), reason: None }).await, 200);
    for _ in 0..20 {
        err(&e.spend(&sk, "1").await, 403, "agent_suspended");
    }
    assert_eq!(e.agent("rf-susp").await.usage.denied_count, 1, "one refusal written, the rest from memory");
    ok(&e.capture(&sk, &hid, "0.5").await, 200);
    ok(&e.submit(Command::Resume { handle: "rf-susp".into() }).await, 200);
    ok(&e.spend(&sk, "1").await, 200);
    // The memory of a suspension lasts a second at most: a suspension made elsewhere (another
    // replica) and lifted is not refused for longer than that.
    ok(&e.submit(Command::Suspend { handle: "rf-susp".into(), reason: None }).await, 200);
    err(&e.spend(&sk, "1").await, 403, "agent_suspended");
    e.advance(1_000);
    err(&e.spend(&sk, "1").await, 403, "agent_suspended");
    assert_eq!(e.agent("rf-susp").await.usage.denied_count, 3, "decided afresh after a second");

    // An expired key, likewise.
    let mut xs = spec("rf-exp", &[PAY], "10");
    xs.expires_in = Some(span("1m"));
    let xk = e.admin_agent(xs).await;
    e.advance(MIN);
    for _ in 0..50 {
        err(&e.spend(&xk, "1").await, 401, "credential_expired");
    }
    assert_eq!(e.agent("rf-exp").await.usage.denied_count, 1);
    e.intact().await;
    e.finish().await;
}

/// Hardening finding 5: a tree could grow without limit, an agent could keep unlimited holds
/// open, and a revocation closed them all in one transaction. Now a tree has at most
/// `agents_per_tree` agents, an agent at most `open_holds_per_agent` open holds (gateway leases
/// aside), and a revocation releases a chunk of holds, the sweeper the rest.
async fn limits_bound_growth(db: Db) {
    let limits = bulkhead_store::Limits { agents_per_tree: 4, open_holds_per_agent: 3, revoked_holds_chunk: 2 };
    let e = Env::with_config(db, LedgerConfig { limits, ..LedgerConfig::default() }).await;
    let pk = e.admin_agent(spec("lim-root", PARENT_SCOPES, "100")).await;
    let ck = e.child_agent(&pk, spec("lim-a", &[PAY, "spawn:agents"], "50")).await;
    let bk = e.child_agent(&ck, spec("lim-b", &[PAY], "10")).await;
    e.child_agent(&pk, spec("lim-c", &[PAY], "10")).await;
    let (r, _) = e.create(Caller::Agent(ck.clone()), spec("lim-d", &[PAY], "1")).await;
    err(&r, 400, "invalid_request");
    assert!(r.body.contains("at most 4 agents"), "{}", r.body);
    // Another tree is not affected.
    e.admin_agent(spec("lim-other", &[PAY], "1")).await;

    let holds: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(e.hold_ok(&ck, "1", HOUR).await);
        }
        v
    };
    let r = e.hold(&ck, "1", HOUR).await;
    err(&r, 409, "too_many_open_holds");
    assert_eq!(e.money("lim-a").await.1, m("3"), "the refused hold holds nothing");
    e.lease_ok(&ck, "1", 1, MIN).await;
    ok(&e.release(&ck, &holds[0]).await, 200);
    let h4 = e.hold_ok(&ck, "1", HOUR).await;
    assert!(!h4.is_empty());
    let ev = e.store.audit_page(Some("lim-a"), 0, 100).await.unwrap();
    assert!(ev.iter().any(|x| x.reason.as_deref() == Some("too_many_open_holds")), "the refusal is audited");

    // lim-a's subtree holds four API holds (three of lim-a, one of lim-b) and a lease. Its
    // revocation releases two of them, the sweeper two more a sweep; the lease stays for its
    // gateway. Meanwhile the root counts what is still held, never less.
    e.hold_ok(&bk, "1", HOUR).await;
    assert_eq!(e.money("lim-root").await.1, m("5"));
    ok(&e.revoke(Caller::Admin, "lim-a").await, 200);
    assert_eq!(e.money("lim-root").await.1, m("3"), "a chunk of two released by the revocation");
    ok(&e.submit(Command::SweepExpired).await, 200);
    assert_eq!(e.money("lim-root").await.1, m("1"), "the rest by the sweeper, a chunk at a time");
    ok(&e.submit(Command::SweepExpired).await, 200);
    assert_eq!(e.money("lim-root").await.1, m("1"), "the lease is left to its gateway");
    e.intact().await;
    e.finish().await;
}

/// Hardening finding 10: the fleet's per-day total was clamped on the way, so once it overflowed
/// it could come out below one agent's own figure. It is summed exactly and saturated once.
async fn fleet_total_saturates_once(db: Db) {
    let e = Env::new(db).await;
    for h in ["huge-1", "huge-2", "huge-3"] {
        let mut s = spec(h, &[PAY], "1000000000000");
        s.window = span("1s");
        e.admin_agent(s).await;
    }
    e.admin_agent(spec("small", &[PAY], "1")).await;
    let b = e.store.blast_radius(None).await.unwrap();
    for a in &b.agents {
        assert!(a.effective_max_spend_per_day <= Micros::MAX, "{}: never above the largest amount", a.handle);
        assert!(b.fleet_max_spend_per_day >= a.effective_max_spend_per_day, "the fleet is at least each agent");
    }
    assert_eq!(b.fleet_max_spend_per_day, Micros::MAX);
    e.finish().await;
}

/// The wall clock stepping back (an NTP correction, a replica behind the others): what was spent
/// in the latest window is never forgiven, holds and idempotent answers only live longer, and
/// audit events keep their order (ARCHITECTURE.md, "Clocks").
async fn clock_steps_back(db: Db) {
    let e = Env::new(db).await;
    let mut s = spec("clk", &[PAY], "10");
    s.window = span("1h");
    let k = e.admin_agent(s).await;
    e.advance(HOUR + MIN);
    ok(&e.spend_with(&k, PAY, "9", idem("clk-1", "h")).await, 200);
    let hid = e.hold_ok(&k, "1", 2 * MIN).await;
    // Back into the first window: the spend of the second still counts.
    e.advance(-2 * MIN);
    err(&e.spend(&k, "0.01").await, 402, "spending_cap_exceeded");
    assert_eq!(e.money("clk").await, (m("9"), m("1"), m("9")));
    // The same idempotent answer is replayed.
    let r = e.spend_with(&k, PAY, "9", idem("clk-1", "h")).await;
    assert!(r.replayed && r.status == 200, "{}", r.body);
    // The hold did not expire early: at its expiry time measured on the stepped-back clock it
    // still counts, and it expires once the clock passes its expiry.
    e.advance(2 * MIN + MIN);
    assert_eq!(e.money("clk").await.1, m("1"));
    e.advance(2 * MIN);
    assert_eq!(e.money("clk").await.1, Micros::ZERO);
    err(&e.capture(&k, &hid, "1").await, 409, "hold_closed");
    // Forward into the next window: a new window, as ever.
    e.advance(HOUR);
    ok(&e.spend(&k, "10").await, 200);
    let ev = e.store.audit_page(Some("clk"), 0, 100).await.unwrap();
    assert!(ev.windows(2).all(|w| w[0].seq < w[1].seq), "the chain's order is its own, not the clock's");
    e.intact().await;
    e.finish().await;
}

async fn revoke_cascades(db: Db) {
    let e = Env::new(db).await;
    let pk = e.admin_agent(spec("rv-p", PARENT_SCOPES, "20")).await;
    let ck = e.child_agent(&pk, spec("rv-c", &[PAY, "spawn:agents"], "10")).await;
    let gk = e.child_agent(&ck, spec("rv-g", &[PAY], "5")).await;
    let ok_k = e.admin_agent(spec("rv-other", &[PAY], "5")).await;
    e.advance(SEC);
    let r = e.revoke(Caller::Admin, "rv-p").await;
    ok(&r, 200);
    let v = json(&r);
    assert_eq!(v["revoked"], serde_json::json!(["rv-p", "rv-c", "rv-g"]));
    assert_eq!(v["revoked_at"], fmt_time(T0 + SEC));
    for (k, h) in [(&pk, "rv-p"), (&ck, "rv-c"), (&gk, "rv-g")] {
        err(&e.spend(k, "1").await, 401, "credential_revoked");
        err(&e.hold(k, "1", MIN).await, 401, "credential_revoked");
        assert_eq!(e.store.agent_for_key(k, e.now()).await.unwrap().unwrap_err(), DenyReason::CredentialRevoked);
        let a = e.agent(h).await;
        assert_eq!((a.status.as_str(), a.revoked_at.clone()), ("revoked", Some(fmt_time(T0 + SEC))));
    }
    let (r, _) = e.create(Caller::Agent(ck.clone()), spec("rv-new", &[PAY], "1")).await;
    err(&r, 401, "credential_revoked");
    ok(&e.spend(&ok_k, "1").await, 200);
    // Idempotent: a second revoke answers the same and keeps the first time.
    e.advance(SEC);
    let again = e.revoke(Caller::Admin, "rv-p").await;
    ok(&again, 200);
    assert_eq!(json(&again), v);
    err(&e.revoke(Caller::Admin, "nobody").await, 404, "not_found");
    // A revoked agent cannot be resumed or given a new key.
    assert_eq!(e.submit(Command::Resume { handle: "rv-c".into() }).await.status, 409);
    assert_eq!(e.submit(Command::RotateKey { handle: "rv-c".into(), key_hash: new_key() }).await.status, 409);
    err(&e.spend(&ck, "1").await, 401, "credential_revoked");
    e.finish().await;
}

async fn parent_revokes_only_descendants(db: Db) {
    let e = Env::new(db).await;
    let pk = e.admin_agent(spec("pr-p", PARENT_SCOPES, "20")).await;
    let ck = e.child_agent(&pk, spec("pr-c", &[PAY, "spawn:agents"], "10")).await;
    let gk = e.child_agent(&ck, spec("pr-g", &[PAY], "5")).await;
    let sk = e.child_agent(&pk, spec("pr-s", &[PAY], "5")).await;
    let xk = e.admin_agent(spec("pr-x", &[PAY], "5")).await;
    err(&e.revoke(Caller::Agent(ck.clone()), "pr-p").await, 404, "not_found");
    err(&e.revoke(Caller::Agent(ck.clone()), "pr-s").await, 404, "not_found");
    err(&e.revoke(Caller::Agent(ck.clone()), "pr-x").await, 404, "not_found");
    err(&e.revoke(Caller::Agent(ck.clone()), "pr-c").await, 404, "not_found");
    // Hardening finding 10: an outside handle that exists and one that does not are answered
    // alike, so an agent cannot probe for other agents.
    let outside = e.revoke(Caller::Agent(ck.clone()), "pr-x").await;
    let unknown = e.revoke(Caller::Agent(ck.clone()), "pr-nobody").await;
    assert_eq!((outside.status, &outside.body), (unknown.status, &unknown.body));
    err(&e.revoke(Caller::Agent(new_key()), "pr-g").await, 401, "invalid_credentials");
    for k in [&pk, &ck, &gk, &sk, &xk] {
        ok(&e.spend(k, "1").await, 200);
    }
    let r = e.revoke(Caller::Agent(pk.clone()), "pr-c").await;
    ok(&r, 200);
    assert_eq!(json(&r)["revoked"], serde_json::json!(["pr-c", "pr-g"]));
    err(&e.spend(&ck, "1").await, 401, "credential_revoked");
    err(&e.spend(&gk, "1").await, 401, "credential_revoked");
    for k in [&pk, &sk, &xk] {
        ok(&e.spend(k, "1").await, 200);
    }
    // The revoked child can no longer revoke anything.
    err(&e.revoke(Caller::Agent(ck), "pr-g").await, 401, "credential_revoked");
    e.finish().await;
}

async fn revocation_releases_holds(db: Db) {
    let e = Env::new(db).await;
    let pk = e.admin_agent(spec("rh-p", PARENT_SCOPES, "20")).await;
    let ck = e.child_agent(&pk, spec("rh-c", &[PAY, "spawn:agents"], "10")).await;
    let gk = e.child_agent(&ck, spec("rh-g", &[PAY], "10")).await;
    e.hold_ok(&gk, "2", HOUR).await;
    let ch = e.hold_ok(&ck, "3", HOUR).await;
    e.hold_ok(&pk, "4", HOUR).await;
    ok(&e.spend(&gk, "1").await, 200);
    assert_eq!(e.money("rh-p").await, (m("1"), m("9"), m("1")));
    // Revoking the middle agent releases its subtree's holds, in every ancestor's figures.
    ok(&e.revoke(Caller::Admin, "rh-c").await, 200);
    assert_eq!(e.money("rh-g").await, (m("1"), Micros::ZERO, m("1")));
    assert_eq!(e.money("rh-c").await, (m("1"), Micros::ZERO, m("1")));
    assert_eq!(e.money("rh-p").await, (m("1"), m("4"), m("1")), "the parent's own hold stays");
    err(&e.capture(&ck, &ch, "1").await, 401, "credential_revoked");
    let ev = e.store.audit_page(None, 0, 1000).await.unwrap();
    let released: Vec<_> = ev.iter().filter(|x| x.reason.as_deref() == Some("agent_revoked")).collect();
    assert_eq!(released.len(), 2);
    assert!(released.iter().all(|x| x.action == "release" && x.outcome == "allowed"));
    // The parent can use the room that was released.
    ok(&e.spend(&pk, "15").await, 200);
    err(&e.spend(&pk, "0.01").await, 402, "spending_cap_exceeded");
    ok(&e.revoke(Caller::Admin, "rh-p").await, 200);
    assert_eq!(e.money("rh-p").await, (m("16"), Micros::ZERO, m("16")));
    e.intact().await;
    e.finish().await;
}

async fn revocation_after_a_hold_expired(db: Db) {
    let e = Env::new(db).await;
    let pk = e.admin_agent(spec("rx-p", PARENT_SCOPES, "20")).await;
    let ck = e.child_agent(&pk, spec("rx-c", &[PAY], "10")).await;
    let expired = e.hold_ok(&ck, "2", MIN).await;
    let open = e.hold_ok(&ck, "3", HOUR).await;
    e.advance(MIN);
    // Nothing swept the expired hold before the revocation: it is recorded as expired (at its
    // expiry), not as released by the revocation; only the open one is released.
    ok(&e.revoke(Caller::Admin, "rx-c").await, 200);
    assert_eq!(e.money("rx-p").await, (Micros::ZERO, Micros::ZERO, Micros::ZERO));
    let ev = e.store.audit_page(Some("rx-c"), 0, 100).await.unwrap();
    let about =
        |id: &str| ev.iter().filter(|x| x.reference.as_deref() == Some(id) && x.action != "hold").collect::<Vec<_>>();
    let x = about(&expired);
    assert_eq!(x.len(), 1, "{x:?}");
    assert_eq!((x[0].action.as_str(), x[0].amount.as_deref()), ("hold.expire", Some("2.00")));
    let x = about(&open);
    assert_eq!(x.len(), 1, "{x:?}");
    assert_eq!((x[0].action.as_str(), x[0].reason.as_deref()), ("release", Some("agent_revoked")));
    e.intact().await;
    e.finish().await;
}

async fn key_rotation(db: Db) {
    let e = Env::new(db).await;
    let old = e.admin_agent(spec("rot", &[PAY], "10")).await;
    let hid = e.hold_ok(&old, "1", HOUR).await;
    let new = new_key();
    let r = e.submit(Command::RotateKey { handle: "rot".into(), key_hash: new.clone() }).await;
    ok(&r, 201);
    err(&e.spend(&old, "1").await, 401, "invalid_credentials");
    err(&e.capture(&old, &hid, "1").await, 401, "invalid_credentials");
    assert_eq!(e.store.agent_for_key(&old, e.now()).await.unwrap().unwrap_err(), DenyReason::InvalidCredentials);
    assert_eq!(e.store.agent_for_key(&new, e.now()).await.unwrap().unwrap().handle, "rot");
    ok(&e.spend(&new, "1").await, 200);
    ok(&e.capture(&new, &hid, "1").await, 200);
    assert_eq!(e.money("rot").await, (m("2"), Micros::ZERO, m("2")));
    err(&e.submit(Command::RotateKey { handle: "nobody".into(), key_hash: new_key() }).await, 404, "not_found");
    // Rotation and a spend with the old key in one batch: the old key is refused.
    let newer = new_key();
    let (a, b) = tokio::join!(
        submit_to(&e.ledger, Command::RotateKey { handle: "rot".into(), key_hash: newer.clone() }),
        submit_to(
            &e.ledger,
            Command::Spend { key: new.clone(), scope: scope(PAY), amount: m("1"), memo: None, idem: None }
        )
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    ok(&a, 201);
    assert!(b.status == 200 || b.code().as_deref() == Some("invalid_credentials"), "{}", b.body);
    // Either the spend ran before the rotation (allowed) or after it (refused); never both keys.
    err(&e.spend(&new, "1").await, 401, "invalid_credentials");
    ok(&e.spend(&newer, "1").await, 200);
    let spent = if b.status == 200 { m("4") } else { m("3") };
    assert_eq!(e.money("rot").await.0, spent);
    e.finish().await;
}

async fn credential_expiry(db: Db) {
    let e = Env::new(db).await;
    let mut s = spec("ttl", &[PAY], "10");
    s.expires_in = Some(span("1h"));
    let k = e.admin_agent(s).await;
    let hid = e.hold_ok(&k, "1", 2 * HOUR).await;
    e.advance(HOUR - 1);
    ok(&e.spend(&k, "1").await, 200);
    e.advance(1);
    err(&e.spend(&k, "1").await, 401, "credential_expired");
    err(&e.capture(&k, &hid, "1").await, 401, "credential_expired");
    assert_eq!(e.store.agent_for_key(&k, e.now()).await.unwrap().unwrap_err(), DenyReason::CredentialExpired);
    assert_eq!(e.money("ttl").await, (m("1"), m("1"), m("1")));
    e.finish().await;
}

fn idem(key: &str, hash: &str) -> Option<Idem> {
    Some(Idem { key: key.into(), request_hash: hash.into() })
}

/// A store written before answers were typed holds rendered answers in its idempotency records
/// (an HTTP status and the JSON sent): they replay exactly as they were, a 429's wait included.
async fn idempotency_rendered_record_replays(db: Db) {
    let e = Env::new(db).await;
    let k = e.admin_agent(spec("old-idem", &[PAY], "50")).await;
    ok(&e.spend_with(&k, PAY, "2.00", idem("old-ok", "h1")).await, 200);
    ok(&e.spend_with(&k, PAY, "2.00", idem("old-429", "h2")).await, 200);
    let ok_body = r#"{"id":"sp_old","amount":"2.00","remaining":{"window":"48.00","lifetime":null},"window_resets_at":"2023-11-15T22:13:20Z"}"#;
    let limited = r#"{"error":{"code":"rate_limited","message":"The agent's request rate limit was reached; retry later.","retry_after":7}}"#;
    for (key, status, body) in [("old-ok", 200, ok_body), ("old-429", 429, limited)] {
        sqlx::query("UPDATE idempotency SET status = $1, body = $2 WHERE key = $3")
            .bind(status)
            .bind(body)
            .bind(key)
            .execute(&e.store_pool().await)
            .await
            .expect("rewrite the record as an older version wrote it");
    }
    let r = e.spend_with(&k, PAY, "2.00", idem("old-ok", "h1")).await;
    assert_eq!((r.status, r.body.as_str(), r.replayed), (200, ok_body, true));
    let r = e.spend_with(&k, PAY, "2.00", idem("old-429", "h2")).await;
    assert_eq!((r.status, r.body.as_str(), r.replayed), (429, limited, true));
    let out = bulkhead_server::reply::render(
        &e.ledger
            .submit(Command::Spend {
                key: k.clone(),
                scope: scope(PAY),
                amount: m("2.00"),
                memo: None,
                idem: idem("old-429", "h2"),
            })
            .await
            .unwrap(),
    );
    assert_eq!(out.retry_after, Some(7));
    assert_eq!(e.money("old-idem").await.0, m("4"), "nothing charged by a replay");
    e.finish().await;
}

async fn idempotency_replay(db: Db) {
    let e = Env::new(db).await;
    let mut s = spec("idem", &[PAY], "50");
    s.per_tx_limit = Some(m("10"));
    let k = e.admin_agent(s).await;
    let first = e.spend_with(&k, PAY, "2.00", idem("k1", "h1")).await;
    ok(&first, 200);
    assert!(!first.replayed);
    let events = e.intact().await;
    e.advance(SEC);
    let second = e.spend_with(&k, PAY, "2.00", idem("k1", "h1")).await;
    assert_eq!((second.status, &second.body, second.replayed), (200, &first.body, true));
    assert_eq!(e.intact().await, events, "a replay is not a new decision");
    let u = e.agent("idem").await.usage;
    assert_eq!((u.window_spent, u.tx_count), (m("2"), 1), "charged once");
    let r = e.spend_with(&k, PAY, "3.00", idem("k1", "h2")).await;
    err(&r, 422, "idempotency_key_reused");
    assert!(!r.replayed);
    assert_eq!(e.agent("idem").await.usage.window_spent, m("2"));

    // A denial is stored and replayed too, and counted once.
    let d1 = e.spend_with(&k, PAY, "11", idem("k2", "h3")).await;
    err(&d1, 402, "per_tx_limit_exceeded");
    let d2 = e.spend_with(&k, PAY, "11", idem("k2", "h3")).await;
    assert_eq!((d2.status, &d2.body, d2.replayed), (402, &d1.body, true));
    assert_eq!(e.agent("idem").await.usage.denied_count, 1);

    // Holds and captures replay their first answer (the same hold; no hold_closed).
    let h1 = e
        .submit(Command::Hold {
            key: k.clone(),
            scope: scope(PAY),
            amount: m("5"),
            expires_ms: HOUR,
            idem: idem("k3", "h4"),
        })
        .await;
    ok(&h1, 201);
    let h2 = e
        .submit(Command::Hold {
            key: k.clone(),
            scope: scope(PAY),
            amount: m("5"),
            expires_ms: HOUR,
            idem: idem("k3", "h4"),
        })
        .await;
    assert_eq!((&h2.body, h2.replayed), (&h1.body, true));
    assert_eq!(e.agent("idem").await.usage.window_held, m("5"), "held once");
    let hid = json(&h1)["id"].as_str().unwrap().to_owned();
    let c1 = e
        .submit(Command::Capture { key: k.clone(), hold_id: hid.clone(), amount: m("1"), idem: idem("k4", "h5") })
        .await;
    ok(&c1, 200);
    let c2 = e
        .submit(Command::Capture { key: k.clone(), hold_id: hid.clone(), amount: m("1"), idem: idem("k4", "h5") })
        .await;
    assert_eq!((c2.status, &c2.body, c2.replayed), (200, &c1.body, true));
    assert_eq!(e.money("idem").await, (m("3"), Micros::ZERO, m("3")));

    // Keys are per credential: another agent's "k1" is its own.
    let k2 = e.admin_agent(spec("idem2", &[PAY], "50")).await;
    let o = e.spend_with(&k2, PAY, "2.00", idem("k1", "h1")).await;
    ok(&o, 200);
    assert!(!o.replayed);
    assert_ne!(o.body, first.body);

    // After 24 h the key is forgotten: the same request runs again.
    e.advance(24 * HOUR);
    let later = e.spend_with(&k, PAY, "2.00", idem("k1", "h1")).await;
    ok(&later, 200);
    assert!(!later.replayed);
    assert_ne!(later.body, first.body);
    assert_eq!(e.agent("idem").await.usage.lifetime_spent, m("5"));
    e.finish().await;
}

async fn revoked_key_is_never_replayed(db: Db) {
    let e = Env::new(db).await;
    let k = e.admin_agent(spec("idem-rv", &[PAY], "50")).await;
    ok(&e.spend_with(&k, PAY, "2.00", idem("k1", "h1")).await, 200);
    let hid = e.hold_ok(&k, "1", HOUR).await;
    let c = Command::Release { key: k.clone(), hold_id: hid, idem: idem("k2", "h2") };
    ok(&e.submit(c.clone()).await, 200);
    ok(&e.revoke(Caller::Admin, "idem-rv").await, 200);
    // Credentials are checked first: once revoked, no request with the key is answered 2xx,
    // not even the replay of an earlier answer.
    let r = e.spend_with(&k, PAY, "2.00", idem("k1", "h1")).await;
    err(&r, 401, "credential_revoked");
    err(&e.submit(c).await, 401, "credential_revoked");
    assert_eq!(e.agent("idem-rv").await.usage.lifetime_spent, m("2"));
    e.finish().await;
}

async fn denials_counted(db: Db) {
    let e = Env::new(db).await;
    let mut s = spec("den", &[PAY], "5");
    s.per_tx_limit = Some(m("2"));
    let k = e.admin_agent(s).await;
    err(&e.spend(&k, "3").await, 402, "per_tx_limit_exceeded");
    err(&e.spend_with(&k, "other:scope", "1", None).await, 403, "scope_not_granted");
    ok(&e.spend(&k, "2").await, 200);
    ok(&e.spend(&k, "2").await, 200);
    err(&e.hold(&k, "2", MIN).await, 402, "spending_cap_exceeded");
    let u = e.agent("den").await.usage;
    assert_eq!((u.denied_count, u.tx_count), (3, 2));
    e.finish().await;
}

async fn runaway_breaker(db: Db) {
    let e = Env::new(db).await;
    let k = e.admin_agent(spec("loop", &[PAY], "1000")).await;
    // Allowed traffic, however fast, never trips the breaker.
    for _ in 0..60 {
        ok(&e.spend(&k, "0.01").await, 200);
    }
    assert_eq!(e.agent("loop").await.status, "active");
    for i in 0..49 {
        err(&e.spend(&k, "1000.01").await, 402, "per_tx_limit_exceeded");
        assert_eq!(e.agent("loop").await.status, "active", "still active after {} denials", i + 1);
    }
    ok(&e.spend(&k, "0.01").await, 200);
    // The 50th denial within 60 s suspends the agent.
    err(&e.spend(&k, "1000.01").await, 402, "per_tx_limit_exceeded");
    let a = e.agent("loop").await;
    assert_eq!((a.status.as_str(), a.suspended_at.clone()), ("suspended", Some(fmt_time(T0))));
    err(&e.spend(&k, "0.01").await, 403, "agent_suspended");
    err(&e.hold(&k, "0.01", MIN).await, 403, "agent_suspended");
    e.advance(HOUR);
    err(&e.spend(&k, "0.01").await, 403, "agent_suspended");
    let ev = e.store.audit_page(Some("loop"), 0, 1000).await.unwrap();
    assert_eq!(ev.iter().filter(|x| x.action == "agent.suspend").count(), 1);
    let r = e.submit(Command::Resume { handle: "loop".into() }).await;
    ok(&r, 200);
    assert_eq!(json(&r)["status"], "active");
    ok(&e.spend(&k, "0.01").await, 200);
    // Resuming starts the count afresh: 49 more denials do not suspend.
    for _ in 0..49 {
        err(&e.spend(&k, "1000.01").await, 402, "per_tx_limit_exceeded");
    }
    assert_eq!(e.agent("loop").await.status, "active");
    ok(&e.spend(&k, "0.01").await, 200);
    err(&e.submit(Command::Resume { handle: "nobody".into() }).await, 404, "not_found");
    e.finish().await;
}

async fn breaker_window_and_overrides(db: Db) {
    let e = Env::with_config(
        db,
        LedgerConfig {
            breaker: Breaker { denials: 5, window_ms: 10 * SEC, ..Default::default() },
            batch_max: 64,
            ..Default::default()
        },
    )
    .await;
    let k = e.admin_agent(spec("bw", &[PAY], "1")).await;
    // 4 denials, then 4 more after the window passed: never 5 within 10 s.
    for _ in 0..4 {
        err(&e.spend(&k, "2").await, 402, "per_tx_limit_exceeded");
    }
    e.advance(11 * SEC);
    for _ in 0..4 {
        err(&e.spend(&k, "2").await, 402, "per_tx_limit_exceeded");
    }
    assert_eq!(e.agent("bw").await.status, "active");
    err(&e.spend(&k, "2").await, 402, "per_tx_limit_exceeded");
    assert_eq!(e.agent("bw").await.status, "suspended");

    // The window slides: 1 denial, 3 more 9 s later, then 1 at 11 s and 1 at 12 s. A window
    // restarted at the first denial would count only 2 by then; within the 10 s before 12 s
    // there are 5 (9 s ×3, 11 s, 12 s), so the breaker trips.
    let k = e.admin_agent(spec("bw-slide", &[PAY], "1")).await;
    err(&e.spend(&k, "2").await, 402, "per_tx_limit_exceeded");
    e.advance(9 * SEC);
    for _ in 0..3 {
        err(&e.spend(&k, "2").await, 402, "per_tx_limit_exceeded");
    }
    e.advance(2 * SEC);
    err(&e.spend(&k, "2").await, 402, "per_tx_limit_exceeded");
    assert_eq!(e.agent("bw-slide").await.status, "active");
    e.advance(SEC);
    err(&e.spend(&k, "2").await, 402, "per_tx_limit_exceeded");
    assert_eq!(e.agent("bw-slide").await.status, "suspended");

    // Per agent: a tighter breaker, and a breaker turned off.
    let mut s = spec("bw-tight", &[PAY], "1");
    s.breaker = Some(BreakerOverride { denials: Some(2), window_ms: Some(60 * SEC), ..Default::default() });
    let t = e.admin_agent(s).await;
    err(&e.spend(&t, "2").await, 402, "per_tx_limit_exceeded");
    assert_eq!(e.agent("bw-tight").await.status, "active");
    err(&e.spend(&t, "2").await, 402, "per_tx_limit_exceeded");
    err(&e.spend(&t, "1").await, 403, "agent_suspended");
    let mut s = spec("bw-off", &[PAY], "1");
    s.breaker = Some(BreakerOverride { denials: Some(0), window_ms: Some(60 * SEC), ..Default::default() });
    let off = e.admin_agent(s).await;
    for _ in 0..20 {
        err(&e.spend(&off, "2").await, 402, "per_tx_limit_exceeded");
    }
    ok(&e.spend(&off, "1").await, 200);
    assert_eq!(e.agent("bw-off").await.usage.denied_count, 20);
    e.finish().await;
}

/// The breaker's optional triggers: request rate and repeats. Both are off by default.
async fn runaway_rate_and_repeats(db: Db) {
    let audit_suspends = |ev: &[bulkhead_store::AuditEvent], reason: &str| {
        ev.iter().filter(|x| x.action == "agent.suspend" && x.reason.as_deref() == Some(reason)).count()
    };
    // Defaults: 500 fast allowed spends, all the same, never trip anything.
    let e = Env::new(db).await;
    let k = e.admin_agent(spec("busy", &[PAY], "1000")).await;
    for _ in 0..500 {
        ok(&e.spend(&k, "0.01").await, 200);
    }
    assert_eq!(e.agent("busy").await.status, "active");
    e.finish().await;

    let e = Env::with_config(
        db,
        LedgerConfig {
            breaker: Breaker { max_requests: 10, rate_window_ms: 10 * SEC, ..Default::default() },
            ..Default::default()
        },
    )
    .await;
    // Rate: 10 per 10 s (allowed and denied alike) is fine; the 11th within them trips, and that
    // request is still answered as usual.
    let k = e.admin_agent(spec("fast", &[PAY], "1000")).await;
    for i in 0..9 {
        let amount = if i % 3 == 0 { "2000" } else { "0.01" };
        let r = e.spend(&k, amount).await;
        assert!(r.status == 200 || r.status == 402, "{}", r.body);
    }
    ok(&e.spend(&k, "0.02").await, 200);
    assert_eq!(e.agent("fast").await.status, "active", "10 requests within 10 s do not trip");
    ok(&e.spend(&k, "0.03").await, 200);
    let a = e.agent("fast").await;
    assert_eq!((a.status.as_str(), a.suspended_at.clone()), ("suspended", Some(fmt_time(T0))));
    err(&e.spend(&k, "0.01").await, 403, "agent_suspended");
    err(&e.hold(&k, "0.01", MIN).await, 403, "agent_suspended");
    let ev = e.store.audit_page(Some("fast"), 0, 1000).await.unwrap();
    assert_eq!(audit_suspends(&ev, "runaway_rate"), 1);
    // Resume clears the bucket: a full 10 again, then the 11th trips.
    ok(&e.submit(Command::Resume { handle: "fast".into() }).await, 200);
    for _ in 0..10 {
        ok(&e.spend(&k, "0.01").await, 200);
    }
    assert_eq!(e.agent("fast").await.status, "active");
    ok(&e.hold(&k, "0.01", MIN).await, 201);
    assert_eq!(e.agent("fast").await.status, "suspended");
    // A steady 1 per second never trips; shadow agents never do.
    let k = e.admin_agent(spec("steady", &[PAY], "1000")).await;
    for _ in 0..50 {
        ok(&e.spend(&k, "0.01").await, 200);
        e.advance(SEC);
    }
    assert_eq!(e.agent("steady").await.status, "active");
    let mut s = spec("shadow", &[PAY], "1000");
    s.enforce = false;
    let k = e.admin_agent(s).await;
    for _ in 0..30 {
        ok(&e.spend(&k, "0.01").await, 200);
    }
    assert_eq!(e.agent("shadow").await.status, "active");
    // Per agent: the trigger turned off.
    let mut s = spec("unlimited", &[PAY], "1000");
    s.breaker = Some(BreakerOverride { max_requests: Some(0), ..Default::default() });
    let k = e.admin_agent(s).await;
    for _ in 0..30 {
        ok(&e.spend(&k, "0.01").await, 200);
    }
    assert_eq!(e.agent("unlimited").await.status, "active");

    // Repeats, per agent: 5 identical requests in a row within 60 s trip; differing ones do not.
    let mut s = spec("echo", &[PAY], "1000");
    s.breaker = Some(BreakerOverride { repeats: Some(5), max_requests: Some(0), ..Default::default() });
    let k = e.admin_agent(s).await;
    let v = e.agent("echo").await;
    let shown = serde_json::to_value(&v.breaker).unwrap();
    assert_eq!(shown, serde_json::json!({"max_requests": 0, "repeats": 5}));
    for i in 0..40 {
        ok(&e.spend(&k, if i % 2 == 0 { "0.01" } else { "0.02" }).await, 200);
    }
    // Four the same, then one different: the run starts over.
    for _ in 0..4 {
        ok(&e.spend(&k, "0.05").await, 200);
    }
    ok(&e.hold(&k, "0.05", MIN).await, 201);
    for _ in 0..4 {
        ok(&e.spend(&k, "0.05").await, 200);
    }
    // The same denied request counts too; a run that outlasts the window starts over.
    e.advance(61 * SEC);
    assert_eq!(e.agent("echo").await.status, "active");
    err(&e.spend(&k, "5000").await, 402, "per_tx_limit_exceeded");
    err(&e.spend(&k, "5000").await, 402, "per_tx_limit_exceeded");
    e.advance(61 * SEC);
    for _ in 0..4 {
        err(&e.spend(&k, "5000").await, 402, "per_tx_limit_exceeded");
    }
    assert_eq!(e.agent("echo").await.status, "active");
    err(&e.spend(&k, "5000").await, 402, "per_tx_limit_exceeded");
    assert_eq!(e.agent("echo").await.status, "suspended");
    err(&e.spend(&k, "0.01").await, 403, "agent_suspended");
    let ev = e.store.audit_page(Some("echo"), 0, 1000).await.unwrap();
    assert_eq!(audit_suspends(&ev, "runaway_repeat"), 1);
    ok(&e.submit(Command::Resume { handle: "echo".into() }).await, 200);
    for _ in 0..4 {
        ok(&e.spend(&k, "0.05").await, 200);
    }
    assert_eq!(e.agent("echo").await.status, "active", "resume starts the run afresh");
    // PATCH turns it off again.
    let p = Patch { breaker: Some(None), ..Default::default() };
    ok(&e.submit(Command::PatchAgent { handle: "echo".into(), patch: p }).await, 200);
    for _ in 0..10 {
        ok(&e.spend(&k, "0.05").await, 200);
    }
    assert_eq!(e.agent("echo").await.status, "active");
    assert!(e.agent("echo").await.breaker.is_none());
    e.intact().await;
    e.finish().await;
}

async fn rate_limit(db: Db) {
    let e = Env::new(db).await;
    let mut s = spec("rl", &[PAY], "100");
    s.per_tx_limit = Some(m("10"));
    s.rate_limit = Some(RateLimit { requests: 2, per_ms: 60 * SEC });
    let k = e.admin_agent(s).await;
    ok(&e.spend(&k, "1").await, 200);
    ok(&e.hold(&k, "1", MIN).await, 201);
    let r = e.spend(&k, "1").await;
    err(&r, 429, "rate_limited");
    assert_eq!(json(&r)["error"]["retry_after"], 30);
    // The rate limit answers before the limits; the scope check answers before the rate limit.
    err(&e.spend(&k, "11").await, 429, "rate_limited");
    err(&e.spend_with(&k, "other:x", "1", None).await, 403, "scope_not_granted");
    assert_eq!(e.money("rl").await, (m("1"), m("1"), m("1")), "nothing charged");
    e.advance(30 * SEC - 1);
    err(&e.spend(&k, "1").await, 429, "rate_limited");
    e.advance(1);
    ok(&e.spend(&k, "1").await, 200);
    err(&e.spend(&k, "1").await, 429, "rate_limited");
    assert_eq!(e.agent("rl").await.usage.denied_count, 5);
    e.finish().await;
}

async fn check_order(db: Db) {
    let e = Env::new(db).await;
    let mut s = spec("ord", &[PAY], "1");
    s.breaker = Some(BreakerOverride { denials: Some(1), window_ms: Some(60 * SEC), ..Default::default() });
    let k = e.admin_agent(s).await;
    err(&e.spend(&k, "2").await, 402, "per_tx_limit_exceeded");
    // Suspended beats scope and limits...
    err(&e.spend_with(&k, "other:x", "2", None).await, 403, "agent_suspended");
    // ...and credentials beat suspension.
    ok(&e.revoke(Caller::Admin, "ord").await, 200);
    err(&e.spend_with(&k, "other:x", "2", None).await, 401, "credential_revoked");
    err(&e.spend(&new_key(), "1").await, 401, "invalid_credentials");
    e.finish().await;
}

/// A tool call the MCP gateway refused before any decision (its tool no scope can name) is one
/// denied event naming the server and the tool, and one more denial; nothing moves.
async fn refused_tool_call_audited(db: Db) {
    let e = Env::new(db).await;
    let k = e.admin_agent(spec("mcp-odd", &["mcp.tools:*"], "10")).await;
    let n = e.intact().await;
    let long = "W".repeat(200);
    for tool in ["WebSearch", long.as_str()] {
        let cmd = Command::AuditRefusedCall {
            key: k.clone(),
            server: "tools".into(),
            tool: tool.into(),
            reason: "invalid_scope".into(),
        };
        ok(&e.submit(cmd).await, 200);
    }
    let ev = e.store.audit_page(Some("mcp-odd"), n, 10).await.unwrap();
    let got: Vec<_> = ev
        .iter()
        .map(|x| (x.action.as_str(), x.outcome.as_str(), x.reason.as_deref(), x.scope.as_deref(), x.detail.clone()))
        .collect();
    assert_eq!(
        got,
        [
            (
                "hold",
                "denied",
                Some("invalid_scope"),
                None,
                Some(serde_json::json!({"mcp_server": "tools", "tool": "WebSearch"}))
            ),
            (
                "hold",
                "denied",
                Some("invalid_scope"),
                None,
                Some(serde_json::json!({"mcp_server": "tools", "tool": "W".repeat(80)}))
            ),
        ]
    );
    let a = e.agent("mcp-odd").await;
    assert_eq!((a.usage.denied_count, a.usage.tx_count), (2, 0));
    assert_eq!(e.money("mcp-odd").await, (Micros::ZERO, Micros::ZERO, Micros::ZERO));
    // An unknown key is refused like any call, and nothing is written.
    let r = e
        .submit(Command::AuditRefusedCall {
            key: new_key(),
            server: "tools".into(),
            tool: "X".into(),
            reason: "invalid_scope".into(),
        })
        .await;
    err(&r, 401, "invalid_credentials");
    assert_eq!(e.intact().await, n + 2);
    // A loop of them trips the breaker like any loop of denials (50 within 60 s by default)...
    let refused = |key: &KeyHash| Command::AuditRefusedCall {
        key: key.clone(),
        server: "tools".into(),
        tool: "WebSearch".into(),
        reason: "invalid_scope".into(),
    };
    for _ in 0..48 {
        ok(&e.submit(refused(&k)).await, 200);
    }
    assert_eq!(e.agent("mcp-odd").await.status, "suspended");
    // ...and then, suspended, the agent's next one is refused as such, and nothing is written.
    let events = e.intact().await;
    err(&e.submit(refused(&k)).await, 403, "agent_suspended");
    assert_eq!(e.intact().await, events);
    assert_eq!(e.agent("mcp-odd").await.usage.denied_count, 50);
    e.finish().await;
}

/// The schema refuses what the ledger never writes (migration 0004): a negative counter or
/// amount, an unknown status, a window's spend above the lifetime's. Each write fails and
/// leaves the row as it was.
async fn schema_refuses_broken_rows(db: Db) {
    let e = Env::new(db).await;
    let k = e.admin_agent(spec("rows", &[PAY], "10")).await;
    ok(&e.spend(&k, "1").await, 200);
    let hid = e.hold_ok(&k, "2", MIN).await;
    let pool = e.store_pool().await;
    let agent = "WHERE handle = 'rows'";
    let hold = format!("WHERE id = '{hid}'");
    for (table, set, filter) in [
        ("agents", "held = -1", agent),
        ("agents", "window_spent = -1", agent),
        ("agents", "lifetime_spent = 0", agent),
        ("agents", "spending_cap = -1", agent),
        ("agents", "per_tx_limit = -5", agent),
        ("agents", "lifetime_cap = -1", agent),
        ("agents", "window_ms = 0", agent),
        ("agents", "tx_count = -1", agent),
        ("agents", "denied_count = -1", agent),
        ("agents", "depth = -1", agent),
        ("agents", "status = 'deleted'", agent),
        ("agents", "enforce = 2", agent),
        ("holds", "amount = -1", hold.as_str()),
        ("holds", "captured = -1", hold.as_str()),
        ("holds", "status = 'lost'", hold.as_str()),
        ("holds", "on_expiry = 'keep'", hold.as_str()),
        ("holds", "settled_seq = -1", hold.as_str()),
    ] {
        let sql = format!("UPDATE {table} SET {set} {filter}");
        let r = sqlx::query(sqlx::AssertSqlSafe(sql.clone())).execute(&pool).await;
        assert!(r.is_err(), "{sql} must be refused by a constraint");
    }
    assert_eq!(e.money("rows").await, (m("1"), m("2"), m("1")));
    let v = e.agent("rows").await;
    assert_eq!((v.status.as_str(), v.usage.tx_count), ("active", 2));
    ok(&e.capture(&k, &hid, "2").await, 200);
    assert_eq!(e.money("rows").await, (m("3"), Micros::ZERO, m("3")));
    // Agents are still made after the rebuild (the upgrade tests check, on a store of the
    // released schema, that new ones are numbered after the copied rows).
    e.admin_agent(spec("rows-2", &[PAY], "10")).await;
    e.intact().await;
    e.finish().await;
}

async fn audit_every_decision(db: Db) {
    let e = Env::new(db).await;
    let pk = e.admin_agent(spec("au", &["payments:write", "spawn:agents"], "10")).await;
    let mut n = e.intact().await;
    assert_eq!(n, 1);
    // (what to do, the event it must append: action, outcome, reason, amount)
    async fn step(e: &Env, n: &mut i64, r: Reply, want: (&str, &str, Option<&str>, Option<&str>)) {
        assert_eq!(r.status < 300, want.1 == "allowed", "{}", r.body);
        let ev = e.store.audit_page(None, *n, 10).await.unwrap();
        assert_eq!(ev.len(), 1, "exactly one event: {ev:?}");
        let x = &ev[0];
        assert_eq!(x.seq, *n + 1);
        assert_eq!((x.action.as_str(), x.outcome.as_str(), x.reason.as_deref(), x.amount.as_deref()), want, "{x:?}");
        assert_eq!(x.at, fmt_time(e.now()));
        *n += 1;
        assert_eq!(e.intact().await, *n);
    }
    let r = e.spend(&pk, "2.50").await;
    step(&e, &mut n, r, ("spend", "allowed", None, Some("2.50"))).await;
    let x = e.store.audit_page(Some("au"), n - 1, 1).await.unwrap();
    assert_eq!(x[0].scope.as_deref(), Some(PAY));
    assert_eq!(x[0].agent, "au");
    e.advance(SEC);
    let r = e.spend(&pk, "9").await;
    step(&e, &mut n, r, ("spend", "denied", Some("spending_cap_exceeded"), Some("9.00"))).await;
    let r = e.spend_with(&pk, "x:y", "1", None).await;
    step(&e, &mut n, r, ("spend", "denied", Some("scope_not_granted"), Some("1.00"))).await;
    let r = e.hold(&pk, "3", MIN).await;
    let hid = json(&r)["id"].as_str().unwrap().to_owned();
    step(&e, &mut n, r, ("hold", "allowed", None, Some("3.00"))).await;
    let r = e.hold(&pk, "5", MIN).await;
    step(&e, &mut n, r, ("hold", "denied", Some("spending_cap_exceeded"), Some("5.00"))).await;
    let r = e.capture(&pk, &hid, "1.25").await;
    step(&e, &mut n, r, ("capture", "allowed", None, Some("1.25"))).await;
    let hid = e.hold_ok(&pk, "1", MIN).await;
    n += 1;
    let r = e.release(&pk, &hid).await;
    step(&e, &mut n, r, ("release", "allowed", None, Some("1.00"))).await;
    let r = e.submit(Command::PatchAgent { handle: "au".into(), patch: Default::default() }).await;
    step(&e, &mut n, r, ("agent.update", "allowed", None, None)).await;
    let (r, _) = e.create(Caller::Agent(pk.clone()), spec("au-c", &["*"], "1")).await;
    step(&e, &mut n, r, ("agent.create", "denied", Some("scope_escalation"), None)).await;
    let (r, ck) = e.create(Caller::Agent(pk.clone()), spec("au-c", &[PAY], "1")).await;
    step(&e, &mut n, r, ("agent.create", "allowed", None, None)).await;
    let r = e.submit(Command::RotateKey { handle: "au-c".into(), key_hash: new_key() }).await;
    step(&e, &mut n, r, ("agent.rotate_key", "allowed", None, None)).await;
    let r = e.spend(&ck, "1").await;
    assert_eq!(e.intact().await, n, "an unknown key is no agent's decision");
    err(&r, 401, "invalid_credentials");
    let r = e.revoke(Caller::Admin, "au").await;
    let ev = e.store.audit_page(None, n, 10).await.unwrap();
    assert_eq!(
        ev.iter().map(|x| (x.agent.as_str(), x.action.as_str())).collect::<Vec<_>>(),
        vec![("au", "agent.revoke"), ("au-c", "agent.revoke")]
    );
    ok(&r, 200);
    n += 2;
    let r = e.spend(&pk, "1").await;
    step(&e, &mut n, r, ("spend", "denied", Some("credential_revoked"), Some("1.00"))).await;
    assert_eq!(e.intact().await, n);
    e.finish().await;
}

async fn concurrent_spends_one_agent(db: Db) {
    let e = Env::new(db).await;
    // The breaker is off for this agent: 95 denials in an instant would otherwise suspend it.
    let mut s = spec("conc", &[PAY], "10.00");
    s.breaker = Some(BreakerOverride { denials: Some(0), window_ms: Some(60 * SEC), ..Default::default() });
    let k = e.admin_agent(s).await;
    let amount = m("0.30");
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let ledger = e.ledger.clone();
        let key = k.clone();
        tasks.push(tokio::spawn(async move {
            let mut allowed = 0i64;
            for _ in 0..2 {
                let r = submit_to(
                    &ledger,
                    Command::Spend { key: key.clone(), scope: scope(PAY), amount, memo: None, idem: None },
                )
                .await
                .expect("the ledger answered");
                match r.status {
                    200 => allowed += 1,
                    402 => assert_eq!(r.code().as_deref(), Some("spending_cap_exceeded")),
                    s => panic!("unexpected {s}: {}", r.body),
                }
            }
            allowed
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.unwrap();
    }
    let u = e.agent("conc").await.usage;
    assert_eq!(allowed, 10_000_000 / 300_000, "exactly floor(cap / amount) spends are allowed");
    assert_eq!(u.window_spent.micros(), allowed * amount.micros(), "the stored total is the sum of allowed spends");
    assert!(u.window_spent <= m("10"));
    assert_eq!((u.tx_count, u.denied_count), (allowed, 128 - allowed));
    assert_eq!(e.intact().await, 1 + 128);
    e.finish().await;
}

async fn concurrent_spends_parent_and_child(db: Db) {
    let e = Env::new(db).await;
    let pk = e.admin_agent(spec("cp", PARENT_SCOPES, "10.00")).await;
    let ck = e.child_agent(&pk, spec("cc", &[PAY], "10.00")).await;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let ledger = e.ledger.clone();
        let key = if i % 2 == 0 { pk.clone() } else { ck.clone() };
        tasks.push(tokio::spawn(async move {
            let hold = i % 4 == 1;
            let cmd = if hold {
                Command::Hold { key, scope: scope(PAY), amount: m("0.30"), expires_ms: HOUR, idem: None }
            } else {
                Command::Spend { key, scope: scope(PAY), amount: m("0.30"), memo: None, idem: None }
            };
            let r = submit_to(&ledger, cmd).await.expect("the ledger answered");
            assert!(matches!(r.status, 200 | 201 | 402), "{}", r.body);
            i64::from(r.status != 402)
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.unwrap();
    }
    assert_eq!(allowed, 33);
    let (spent, held, _) = e.money("cp").await;
    assert_eq!(spent.micros() + held.micros(), allowed * 300_000);
    let (cs, ch, _) = e.money("cc").await;
    assert!(cs <= spent && ch <= held);
    e.intact().await;
    e.finish().await;
}

/// Two replicas (two stores, two ledgers) on one PostgreSQL database enforce one cap between
/// them, and a revocation answered by one is refused by the other at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_replicas_share_caps_and_revocations() {
    if !Db::Postgres.available() {
        return;
    }
    let e = Env::new(Db::Postgres).await;
    let other = Store::open(&e.url).await.expect("second replica");
    let (ledger_b, writer_b) = Ledger::start(other.clone(), e.clock.clone(), LedgerConfig::default());
    let mut s = spec("shared", PARENT_SCOPES, "10.00");
    s.breaker = Some(BreakerOverride { denials: Some(0), window_ms: Some(60 * SEC), ..Default::default() });
    let pk = e.admin_agent(s).await;
    let (r, ck) = {
        let key = new_key();
        let cmd = Command::CreateAgent {
            caller: Caller::Agent(pk.clone()),
            spec: spec("shared-c", &[PAY], "10.00"),
            key_hash: key.clone(),
        };
        (submit_to(&ledger_b, cmd).await.unwrap(), key)
    };
    ok(&r, 201);
    let mut tasks = Vec::new();
    for i in 0..64 {
        let ledger = if i % 2 == 0 { e.ledger.clone() } else { ledger_b.clone() };
        let key = if i % 3 == 0 { ck.clone() } else { pk.clone() };
        tasks.push(tokio::spawn(async move {
            let mut allowed = 0i64;
            for _ in 0..2 {
                let cmd =
                    Command::Spend { key: key.clone(), scope: scope(PAY), amount: m("0.30"), memo: None, idem: None };
                let r = submit_to(&ledger, cmd).await.expect("the ledger answered");
                assert!(matches!(r.status, 200 | 402), "{}", r.body);
                allowed += i64::from(r.status == 200);
            }
            allowed
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.unwrap();
    }
    assert_eq!(allowed, 33, "one cap across both replicas");
    assert_eq!(e.money("shared").await.0.micros(), allowed * 300_000);
    assert_eq!(e.intact().await, 2 + 128);

    // The revocation moves the store's authorization epoch, and its answer waits until every
    // replica's trusted read of the older epoch has gone stale.
    let epoch = other.authz_epoch().await.unwrap();
    let t = std::time::Instant::now();
    ok(&e.revoke(Caller::Admin, "shared").await, 200);
    assert!(t.elapsed() >= bulkhead_store::EPOCH_SETTLE, "answered after {:?}", t.elapsed());
    assert!(other.authz_epoch().await.unwrap() > epoch, "the epoch moved on");
    // Said again (the first may not have answered yet when a retry comes): it waits as well.
    let t = std::time::Instant::now();
    let r =
        submit_to(&ledger_b, Command::Revoke { caller: Caller::Admin, handle: "shared".into(), reason: None }).await;
    ok(&r.unwrap(), 200);
    assert!(t.elapsed() >= bulkhead_store::EPOCH_SETTLE, "answered after {:?}", t.elapsed());
    let r = submit_to(
        &ledger_b,
        Command::Spend { key: ck.clone(), scope: scope(PAY), amount: m("0.01"), memo: None, idem: None },
    )
    .await
    .unwrap();
    err(&r, 401, "credential_revoked");
    assert_eq!(other.agent_for_key(&ck, e.now()).await.unwrap().unwrap_err(), DenyReason::CredentialRevoked);
    drop(ledger_b);
    writer_b.await.unwrap();
    other.close().await;
    e.finish().await;
}

async fn shadow_mode(db: Db) {
    let e = Env::new(db).await;
    let mut s = spec("shadow", &[PAY, "spawn:agents"], "1");
    s.enforce = false;
    let k = e.admin_agent(s).await;
    ok(&e.spend(&k, "0.6").await, 200);
    // Over the cap and out of scope: let through, and marked as what enforcement would do.
    let r = e.spend(&k, "0.6").await;
    ok(&r, 200);
    assert_eq!(json(&r)["shadow_denied"], "spending_cap_exceeded");
    let r = e.spend_with(&k, "other:thing", "0.1", None).await;
    ok(&r, 200);
    assert_eq!(json(&r)["shadow_denied"], "scope_not_granted");
    let a = e.agent("shadow").await;
    assert_eq!(a.usage.window_spent, m("1.3"), "shadow spend is recorded in full");
    assert_eq!(a.usage.denied_count, 0);
    assert!(!a.enforce);
    // Hammering never trips the breaker: nothing was really denied.
    for _ in 0..60 {
        ok(&e.spend(&k, "0.01").await, 200);
    }
    assert_eq!(e.agent("shadow").await.status, "active");
    let events = e.store.audit_page(Some("shadow"), 0, 1000).await.unwrap();
    let marked: Vec<_> =
        events.iter().filter(|ev| ev.detail.as_ref().is_some_and(|d| d["shadow"] == "would_deny")).collect();
    assert_eq!(marked.len(), 62, "every would-be denial is marked in the audit trail");
    assert!(marked.iter().all(|ev| ev.outcome == "allowed" && ev.reason.is_some()));
    // Children cannot be shadow agents.
    let mut c = spec("shadow-child", &[PAY], "0.5");
    c.enforce = false;
    let (r, _) = e.create(Caller::Agent(k.clone()), c).await;
    err(&r, 400, "invalid_request");
    // Enforcement switched on: the over-cap spend is refused for real.
    let r = e
        .submit(Command::PatchAgent {
            handle: "shadow".into(),
            patch: Patch { enforce: Some(true), ..Patch::default() },
        })
        .await;
    ok(&r, 200);
    err(&e.spend(&k, "0.01").await, 402, "spending_cap_exceeded");
    // Revocation is never shadowed.
    ok(&e.revoke(Caller::Admin, "shadow").await, 200);
    err(&e.spend(&k, "0.01").await, 401, "credential_revoked");
    e.finish().await;
}

async fn gateway_holds(db: Db) {
    let e = Env::new(db).await;
    let k = e.admin_agent(spec("gw", &[PAY], "10")).await;
    let metered =
        |amount: &str| Command::MeteredHold { key: k.clone(), scope: scope(PAY), amount: m(amount), expires_ms: MIN };
    let hold_id = |r: &Reply| json(r)["id"].as_str().unwrap().to_owned();

    // Settled by hold id after the key was rotated mid-call: still charged.
    let r = e.submit(metered("2")).await;
    ok(&r, 201);
    let h1 = hold_id(&r);
    ok(&e.submit(Command::RotateKey { handle: "gw".into(), key_hash: new_key() }).await, 201);
    let r = e.submit(Command::Settle { hold_id: h1.clone(), amount: m("0.75") }).await;
    ok(&r, 200);
    assert_eq!(json(&r)["captured"], "0.75");
    assert_eq!(json(&r)["released"], "1.25");
    err(&e.submit(Command::Settle { hold_id: h1, amount: m("0.1") }).await, 409, "hold_closed");
    assert_eq!(e.money("gw").await, (m("0.75"), Micros::ZERO, m("0.75")));

    // A metered hold nobody settles (the server died mid-call) is charged in full at expiry;
    // an API hold is released.
    let k2 = e.admin_agent(spec("gw2", &[PAY], "10")).await;
    let r =
        e.submit(Command::MeteredHold { key: k2.clone(), scope: scope(PAY), amount: m("3"), expires_ms: MIN }).await;
    ok(&r, 201);
    e.hold_ok(&k2, "4", MIN).await;
    assert_eq!(e.agent("gw2").await.usage.window_held, m("7"));
    e.advance(MIN);
    ok(&e.submit(Command::SweepExpired).await, 200);
    assert_eq!(e.money("gw2").await, (m("3"), Micros::ZERO, m("3")));
    let expired: Vec<_> = e
        .store
        .audit_page(Some("gw2"), 0, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|ev| ev.action == "hold.expire")
        .collect();
    assert_eq!(expired.len(), 2);
    assert_eq!(expired.iter().filter(|ev| ev.detail.as_ref().is_some_and(|d| d["captured"] == "3.00")).count(), 1);

    // Zero settles as a release. A revocation leaves a gateway hold open: it pays for a call
    // already forwarded, which is settled all the same.
    let k3 = e.admin_agent(spec("gw3", &[PAY], "10")).await;
    let r =
        e.submit(Command::MeteredHold { key: k3.clone(), scope: scope(PAY), amount: m("1"), expires_ms: MIN }).await;
    let h3 = hold_id(&r);
    let r = e.submit(Command::Settle { hold_id: h3, amount: Micros::ZERO }).await;
    ok(&r, 200);
    assert_eq!(json(&r)["released"], "1.00");
    let r =
        e.submit(Command::MeteredHold { key: k3.clone(), scope: scope(PAY), amount: m("1"), expires_ms: MIN }).await;
    let h4 = hold_id(&r);
    ok(&e.revoke(Caller::Admin, "gw3").await, 200);
    assert_eq!(e.money("gw3").await, (Micros::ZERO, m("1"), Micros::ZERO));
    ok(&e.submit(Command::Settle { hold_id: h4.clone(), amount: m("0.25") }).await, 200);
    assert_eq!(e.money("gw3").await, (m("0.25"), Micros::ZERO, m("0.25")));
    err(&e.submit(Command::Settle { hold_id: h4, amount: m("1") }).await, 409, "hold_closed");
    err(&e.submit(Command::Settle { hold_id: "hold_nope".into(), amount: m("1") }).await, 404, "not_found");
    e.finish().await;
}

// ---------------------------------------------------------------------------------------------
// Gateway leases: `Command::Lease` and `Command::LeaseSettle`, and the authorization epoch.

fn lease_cmd(key: &KeyHash, unit: &str, slots: u32, expires_ms: i64) -> Command {
    Command::Lease { key: key.clone(), scope: scope(PAY), unit: m(unit), slots, expires_ms }
}

fn metered_cmd(key: &KeyHash, amount: &str) -> Command {
    Command::MeteredHold { key: key.clone(), scope: scope(PAY), amount: m(amount), expires_ms: MIN }
}

/// `n × unit`, rendered as the ledger renders amounts.
fn times(unit: &str, n: u64) -> String {
    Micros::from_micros(m(unit).micros() * i64::try_from(n).unwrap()).unwrap().to_string()
}

/// Settlement numbers only grow (as a gateway's do for each lease).
static SETTLE_SEQ: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);

fn lease_settle(hold: &str, unit: &str, costs: &[&str], release: u32, close: bool) -> Command {
    lease_settle_audited(hold, unit, costs, release, close, LeaseAudit::Settlement)
}

fn lease_settle_audited(
    hold: &str,
    unit: &str,
    costs: &[&str],
    release: u32,
    close: bool,
    audit: LeaseAudit,
) -> Command {
    Command::LeaseSettle {
        hold_id: hold.to_owned(),
        seq: SETTLE_SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        unit: m(unit),
        costs: costs.iter().map(|c| m(c)).collect(),
        release,
        close,
        audit,
    }
}

impl Env {
    /// Takes a lease that must be granted; returns (hold id, slots granted, the reply's body).
    async fn lease_ok(
        &self,
        key: &KeyHash,
        unit: &str,
        slots: u32,
        expires_ms: i64,
    ) -> (String, u64, serde_json::Value) {
        let r = self.submit(lease_cmd(key, unit, slots, expires_ms)).await;
        ok(&r, 201);
        let v = json(&r);
        let id = v["id"].as_str().expect("lease id").to_owned();
        let n = v["slots"].as_u64().expect("slots");
        assert_eq!(v["amount"], times(unit, n), "the hold carries every slot: {v}");
        (id, n, v)
    }

    /// The audit events about one hold, oldest first.
    async fn events_of(&self, handle: &str, hold: &str) -> Vec<bulkhead_store::AuditEvent> {
        let ev = self.store.audit_page(Some(handle), 0, 10_000).await.unwrap();
        ev.into_iter().filter(|x| x.reference.as_deref() == Some(hold)).collect()
    }
}

async fn lease_takes_what_fits(db: Db) {
    let e = Env::new(db).await;
    let k = e.admin_agent(spec("ls", &[PAY], "10.00")).await;
    // Fewer slots asked than fit: exactly those.
    let (h0, n, v) = e.lease_ok(&k, "1", 3, MIN).await;
    assert_eq!((n, v["room"].as_str()), (3, Some("7.00")), "{v}");
    assert_eq!(v["expires_at"], fmt_time(T0 + MIN));
    assert!(v["key_expires_at"].is_null());
    assert_eq!(e.money("ls").await, (Micros::ZERO, m("3"), Micros::ZERO));
    ok(&e.submit(lease_settle(&h0, "1", &[], 0, true)).await, 200);
    assert_eq!(e.money("ls").await, (Micros::ZERO, Micros::ZERO, Micros::ZERO));

    // 7.50 of room: floor(7.50 / 0.70) = 10 slots of the 20 asked, and 0.50 left.
    ok(&e.spend(&k, "2.50").await, 200);
    let (hid, n, v) = e.lease_ok(&k, "0.70", 20, MIN).await;
    assert_eq!((n, v["amount"].as_str(), v["room"].as_str()), (10, Some("7.00"), Some("0.50")), "{v}");
    let u = e.agent("ls").await.usage;
    assert_eq!((u.window_spent, u.window_held, u.lifetime_spent), (m("2.5"), m("7"), m("2.5")));
    assert_eq!(u.tx_count, 1, "a lease is no transaction; its calls are, as they are settled");
    assert_eq!(u.utilization, 0.95);

    // Not one more unit fits: denied exactly like a metered hold of the unit.
    let d = e.submit(lease_cmd(&k, "0.70", 5, MIN)).await;
    err(&d, 402, "spending_cap_exceeded");
    let mh = e.submit(metered_cmd(&k, "0.70")).await;
    assert_eq!((d.status, d.code()), (mh.status, mh.code()));
    // A smaller unit still fits twice.
    let (h2, n, v) = e.lease_ok(&k, "0.20", 5, MIN).await;
    assert_eq!((n, v["room"].as_str()), (2, Some("0.10")), "{v}");
    let u = e.agent("ls").await.usage;
    assert_eq!((u.window_spent, u.window_held, u.tx_count, u.denied_count), (m("2.5"), m("7.4"), 1, 2));

    // Audit: one `hold` event per lease, for all of its slots.
    for (h, amount, slots) in [(&hid, "7.00", 10), (&h2, "0.40", 2)] {
        let ev = e.events_of("ls", h).await;
        assert_eq!(ev.len(), 1, "{ev:?}");
        let x = &ev[0];
        assert_eq!(
            (x.action.as_str(), x.outcome.as_str(), x.amount.as_deref(), x.scope.as_deref(), x.reason.as_deref()),
            ("hold", "allowed", Some(amount), Some(PAY), None)
        );
        assert_eq!(x.detail, Some(serde_json::json!({"by": "gateway", "slots": slots})));
    }
    let ev = e.store.audit_page(Some("ls"), 0, 1000).await.unwrap();
    let denied: Vec<_> = ev.iter().filter(|x| x.outcome == "denied").collect();
    assert_eq!(denied.len(), 2);
    assert!(denied.iter().all(|x| x.action == "hold"
        && x.reason.as_deref() == Some("spending_cap_exceeded")
        && x.amount.as_deref() == Some("0.70")));

    // The lifetime cap bounds a lease too.
    let mut s = spec("ls-life", &[PAY], "10.00");
    s.lifetime_cap = Some(m("4.50"));
    let k = e.admin_agent(s).await;
    let (_, n, v) = e.lease_ok(&k, "1", 10, MIN).await;
    assert_eq!((n, v["room"].as_str()), (4, Some("0.50")), "{v}");
    err(&e.submit(lease_cmd(&k, "1", 10, MIN)).await, 402, "lifetime_cap_exceeded");
    // And the reply says when the key expires.
    let mut s = spec("ls-ttl", &[PAY], "10.00");
    s.expires_in = Some(span("1h"));
    let k = e.admin_agent(s).await;
    let (_, _, v) = e.lease_ok(&k, "1", 2, MIN).await;
    assert_eq!(v["key_expires_at"], T0 + HOUR);
    e.intact().await;
    e.finish().await;
}

async fn lease_limited_by_ancestors(db: Db) {
    let e = Env::new(db).await;
    let pk = e.admin_agent(spec("la-p", PARENT_SCOPES, "10")).await;
    let ck = e.child_agent(&pk, spec("la-c", &[PAY, "spawn:agents"], "10")).await;
    let gk = e.child_agent(&ck, spec("la-g", &[PAY], "3")).await;
    // The grandchild's own cap.
    let (g0, n, v) = e.lease_ok(&gk, "1", 10, MIN).await;
    assert_eq!((n, v["room"].as_str()), (3, Some("0.00")), "{v}");
    assert_eq!(e.money("la-p").await, (Micros::ZERO, m("3"), Micros::ZERO));
    ok(&e.submit(lease_settle(&g0, "1", &[], 0, true)).await, 200);

    // The root has 4 left: the child gets floor(4 / 1.50) = 2 slots although its own cap has 10.
    ok(&e.spend(&pk, "6").await, 200);
    let (c1, n, v) = e.lease_ok(&ck, "1.50", 10, MIN).await;
    assert_eq!((n, v["amount"].as_str(), v["room"].as_str()), (2, Some("3.00"), Some("1.00")), "{v}");
    assert_eq!(e.money("la-c").await, (Micros::ZERO, m("3"), Micros::ZERO));
    assert_eq!(e.money("la-p").await, (m("6"), m("3"), m("6")));
    // Two levels down: the root's 1.00 left is what counts.
    let (_, n, v) = e.lease_ok(&gk, "0.60", 10, MIN).await;
    assert_eq!((n, v["room"].as_str()), (1, Some("0.40")), "{v}");
    // Not even one slot fits under an ancestor: denied as a metered hold would be.
    for k in [&gk, &ck] {
        let d = e.submit(lease_cmd(k, "0.50", 10, MIN)).await;
        err(&d, 402, "ancestor_cap_exceeded");
        let mh = e.submit(metered_cmd(k, "0.50")).await;
        assert_eq!((d.status, d.code()), (mh.status, mh.code()));
    }
    assert_eq!(e.money("la-p").await, (m("6"), m("3.6"), m("6")));
    assert_eq!(e.money("la-c").await, (Micros::ZERO, m("3.6"), Micros::ZERO));
    assert_eq!(e.money("la-g").await, (Micros::ZERO, m("0.6"), Micros::ZERO));
    // Settling the child's calls moves every ancestor's figures, and gives room back.
    ok(&e.submit(lease_settle(&c1, "1.50", &["1.50"], 1, false)).await, 200);
    assert_eq!(e.money("la-c").await, (m("1.5"), m("0.6"), m("1.5")));
    assert_eq!(e.money("la-p").await, (m("7.5"), m("0.6"), m("7.5")));
    let (_, n, v) = e.lease_ok(&gk, "0.50", 10, MIN).await;
    assert_eq!((n, v["room"].as_str()), (3, Some("0.40")), "{v}");
    e.intact().await;
    e.finish().await;
}

async fn lease_denials_match_metered_hold(db: Db) {
    let e = Env::new(db).await;
    let mut s = spec("ld", &[PAY], "5");
    s.per_tx_limit = Some(m("2"));
    let k = e.admin_agent(s).await;
    async fn both(e: &Env, lease: Command, metered: Command, status: u16, code: &str) {
        let a = e.submit(lease).await;
        let b = e.submit(metered).await;
        err(&a, status, code);
        err(&b, status, code);
        assert_eq!(json(&a), json(&b), "the same denial");
    }
    let lease_in = |k: &KeyHash, sc: &str, unit: &str| Command::Lease {
        key: k.clone(),
        scope: scope(sc),
        unit: m(unit),
        slots: 10,
        expires_ms: MIN,
    };
    let metered_in = |k: &KeyHash, sc: &str, unit: &str| Command::MeteredHold {
        key: k.clone(),
        scope: scope(sc),
        amount: m(unit),
        expires_ms: MIN,
    };
    both(&e, lease_in(&k, PAY, "2.01"), metered_in(&k, PAY, "2.01"), 402, "per_tx_limit_exceeded").await;
    both(&e, lease_in(&k, "other:x", "1"), metered_in(&k, "other:x", "1"), 403, "scope_not_granted").await;
    let nobody = new_key();
    both(&e, lease_in(&nobody, PAY, "1"), metered_in(&nobody, PAY, "1"), 401, "invalid_credentials").await;
    ok(&e.spend(&k, "2").await, 200);
    ok(&e.spend(&k, "2").await, 200);
    both(&e, lease_in(&k, PAY, "1.01"), metered_in(&k, PAY, "1.01"), 402, "spending_cap_exceeded").await;
    let u = e.agent("ld").await.usage;
    assert_eq!((u.window_spent, u.window_held, u.tx_count, u.denied_count), (m("4"), Micros::ZERO, 2, 6));
    let ev = e.store.audit_page(Some("ld"), 0, 1000).await.unwrap();
    let denied: Vec<_> =
        ev.iter().filter(|x| x.outcome == "denied").map(|x| (x.action.as_str(), x.reason.as_deref())).collect();
    assert_eq!(
        denied,
        [
            ("hold", Some("per_tx_limit_exceeded")),
            ("hold", Some("per_tx_limit_exceeded")),
            ("hold", Some("scope_not_granted")),
            ("hold", Some("scope_not_granted")),
            ("hold", Some("spending_cap_exceeded")),
            ("hold", Some("spending_cap_exceeded")),
        ]
    );

    // Suspended, revoked, expired.
    let mut s = spec("ld-s", &[PAY], "5");
    s.breaker = Some(BreakerOverride { denials: Some(1), window_ms: Some(60 * SEC), ..Default::default() });
    let ks = e.admin_agent(s).await;
    err(&e.spend(&ks, "6").await, 402, "per_tx_limit_exceeded");
    both(&e, lease_in(&ks, PAY, "1"), metered_in(&ks, PAY, "1"), 403, "agent_suspended").await;
    let kr = e.admin_agent(spec("ld-r", &[PAY], "5")).await;
    ok(&e.revoke(Caller::Admin, "ld-r").await, 200);
    both(&e, lease_in(&kr, PAY, "1"), metered_in(&kr, PAY, "1"), 401, "credential_revoked").await;
    let mut s = spec("ld-x", &[PAY], "5");
    s.expires_in = Some(span("1h"));
    let kx = e.admin_agent(s).await;
    e.advance(HOUR);
    both(&e, lease_in(&kx, PAY, "1"), metered_in(&kx, PAY, "1"), 401, "credential_expired").await;
    for h in ["ld-s", "ld-r", "ld-x"] {
        assert_eq!(e.money(h).await, (Micros::ZERO, Micros::ZERO, Micros::ZERO));
    }
    e.intact().await;
    e.finish().await;
}

async fn lease_settle_calls_release_close(db: Db) {
    let e = Env::new(db).await;
    let k = e.admin_agent(spec("lst", &[PAY], "10")).await;
    let (hid, n, _) = e.lease_ok(&k, "1", 6, MIN).await;
    assert_eq!(n, 6);
    let events = e.intact().await;
    // Three calls (one of them free) and one slot never used: 4 slots settled, 2 left.
    let first = lease_settle(&hid, "1", &["0.25", "1.00", "0"], 1, false);
    let Command::LeaseSettle { seq: first_seq, .. } = &first else { unreachable!() };
    let first_seq = *first_seq;
    let r = e.submit(first).await;
    ok(&r, 200);
    let v = json(&r);
    assert_eq!(v, serde_json::json!({"id": hid, "captured": "1.25", "released": "2.75", "closed": false}));
    assert_eq!(e.money("lst").await, (m("1.25"), m("2"), m("1.25")));
    assert_eq!(e.agent("lst").await.usage.tx_count, 3, "one transaction per call");
    let settled = e.intact().await;
    assert!(settled > events);
    // The same settlement again (a retry after a commit whose outcome was unknown): answered,
    // not applied twice.
    let again = Command::LeaseSettle {
        hold_id: hid.clone(),
        seq: first_seq,
        unit: m("1"),
        costs: vec![m("0.25"), m("1.00"), m("0")],
        release: 1,
        close: false,
        audit: LeaseAudit::Settlement,
    };
    let r = e.submit(again).await;
    ok(&r, 200);
    assert_eq!(json(&r)["applied"], "before", "{}", r.body);
    assert_eq!(e.money("lst").await, (m("1.25"), m("2"), m("1.25")), "nothing applied twice");
    assert_eq!(e.agent("lst").await.usage.tx_count, 3);
    assert_eq!(e.intact().await, settled, "nothing audited twice");

    // Refused, and nothing moves: a cost above its slot; more slots than the lease holds
    // (also when closing); unknown holds and an agent's own (API) hold.
    let ka = e.admin_agent(spec("lst-api", &[PAY], "10")).await;
    let api_hold = e.hold_ok(&ka, "1", MIN).await;
    let settled = e.intact().await;
    let refusals = [
        (lease_settle(&hid, "1", &["1.000001"], 0, false), 400, "invalid_amount"),
        (lease_settle(&hid, "1", &["0.5", "1.000001"], 0, true), 400, "invalid_amount"),
        (lease_settle(&hid, "1", &["0.5"], 2, false), 400, "invalid_amount"),
        (lease_settle(&hid, "1", &[], 3, true), 400, "invalid_amount"),
        (lease_settle(&hid, "1", &["0.1", "0.1", "0.1"], 0, false), 400, "invalid_amount"),
        (lease_settle("hold_doesnotexist", "1", &["0.5"], 0, false), 404, "not_found"),
        (lease_settle(&api_hold, "1", &["0.5"], 0, true), 404, "not_found"),
        // The agent cannot release or capture its gateway lease itself: that would make the
        // calls forwarded under it free.
        (Command::Release { key: k.clone(), hold_id: hid.clone(), idem: None }, 404, "not_found"),
        (Command::Capture { key: k.clone(), hold_id: hid.clone(), amount: m("0"), idem: None }, 404, "not_found"),
    ];
    for (cmd, status, code) in refusals {
        let what = format!("{cmd:?}");
        let r = e.submit(cmd).await;
        assert_eq!((r.status, r.code().as_deref()), (status, Some(code)), "{what}: {}", r.body);
        assert_eq!(e.money("lst").await, (m("1.25"), m("2"), m("1.25")), "{what}");
        assert_eq!(e.money("lst-api").await.1, m("1"), "{what}");
        assert_eq!(e.agent("lst").await.usage.tx_count, 3, "{what}");
        assert_eq!(e.intact().await, settled, "{what}: nothing audited");
    }
    ok(&e.release(&ka, &api_hold).await, 200);

    // The last call, and close: the remaining slot is released and the lease is closed.
    let r = e.submit(lease_settle(&hid, "1", &["0.50"], 0, true)).await;
    ok(&r, 200);
    assert_eq!(json(&r), serde_json::json!({"id": hid, "captured": "0.50", "released": "1.50", "closed": true}));
    let u = e.agent("lst").await.usage;
    assert_eq!((u.window_spent, u.window_held, u.lifetime_spent, u.tx_count), (m("1.75"), Micros::ZERO, m("1.75"), 4));
    // Closed: nothing more is settled, through the lease or the hold.
    err(&e.submit(lease_settle(&hid, "1", &["0.10"], 0, false)).await, 409, "hold_closed");
    err(&e.submit(lease_settle(&hid, "1", &[], 0, true)).await, 409, "hold_closed");
    err(&e.submit(Command::Settle { hold_id: hid.clone(), amount: m("0.10") }).await, 409, "hold_closed");
    // An agent's own capture or release never finds a gateway lease.
    err(&e.capture(&k, &hid, "0.10").await, 404, "not_found");
    err(&e.release(&k, &hid).await, 404, "not_found");
    assert_eq!(e.money("lst").await, (m("1.75"), Micros::ZERO, m("1.75")));
    // One capture event per settlement, by the gateway, with each call's cost.
    let ev = e.events_of("lst", &hid).await;
    let captures: Vec<_> = ev.iter().filter(|x| x.action == "capture").collect();
    assert_eq!(captures.iter().map(|x| x.amount.as_deref().unwrap()).collect::<Vec<_>>(), ["1.25", "0.50"]);
    assert!(captures.iter().all(|x| x.outcome == "allowed"));
    assert_eq!(
        captures.iter().map(|x| x.detail.clone().unwrap()).collect::<Vec<_>>(),
        [
            serde_json::json!({"by": "gateway", "calls": 3, "costs": ["0.25", "1.00", "0.00"]}),
            serde_json::json!({"by": "gateway", "calls": 1, "each": "0.50"}),
        ]
    );
    // The full cap is there again, less what the calls cost.
    ok(&e.spend(&k, "8.25").await, 200);
    err(&e.spend(&k, "0.01").await, 402, "spending_cap_exceeded");
    e.intact().await;
    e.finish().await;
}

/// The MCP gateway's settlements: one `capture` event per call, in the settlement's
/// transaction, naming the lease's scope (`mcp.{server}:{tool}`) and the call's cost; the money
/// moves exactly as with one event per settlement.
async fn lease_settle_audits_each_call(db: Db) {
    const SEARCH: &str = "mcp.tools:search";
    const CARD: &str = "mcp.tools:charge_card";
    let e = Env::new(db).await;
    let k = e.admin_agent(spec("lec", &[SEARCH, CARD], "10")).await;
    let lease_in = |sc: &str, unit: &str, slots: u32| Command::Lease {
        key: k.clone(),
        scope: scope(sc),
        unit: m(unit),
        slots,
        expires_ms: MIN,
    };
    let r = e.submit(lease_in(SEARCH, "0.002", 5)).await;
    ok(&r, 201);
    let search = json(&r)["id"].as_str().expect("lease id").to_owned();
    let r = e.submit(lease_in(CARD, "1", 2)).await;
    ok(&r, 201);
    let card = json(&r)["id"].as_str().expect("lease id").to_owned();
    let before = e.intact().await;

    // Three calls of `search` (the last one never left: free) settled together.
    let first = lease_settle_audited(&search, "0.002", &["0.002", "0.002", "0"], 0, false, LeaseAudit::EachCall);
    let Command::LeaseSettle { seq, .. } = &first else { unreachable!() };
    let seq = *seq;
    ok(&e.submit(first).await, 200);
    let after_first = e.intact().await;
    assert_eq!(after_first, before + 3, "one event per call, nothing else");
    // A retry of the same settlement audits nothing again.
    let again = Command::LeaseSettle {
        hold_id: search.clone(),
        seq,
        unit: m("0.002"),
        costs: vec![m("0.002"), m("0.002"), m("0")],
        release: 0,
        close: false,
        audit: LeaseAudit::EachCall,
    };
    let r = e.submit(again).await;
    ok(&r, 200);
    assert_eq!(json(&r)["applied"], "before", "{}", r.body);
    assert_eq!(e.intact().await, after_first, "nothing audited twice");
    // One more call of each tool; both leases closed (the rest of their slots released).
    ok(&e.submit(lease_settle_audited(&search, "0.002", &["0.002"], 0, true, LeaseAudit::EachCall)).await, 200);
    ok(&e.submit(lease_settle_audited(&card, "1", &["1"], 0, true, LeaseAudit::EachCall)).await, 200);

    let calls = |ev: &[bulkhead_store::AuditEvent]| {
        ev.iter()
            .filter(|x| x.action == "capture")
            .map(|x| (x.outcome.clone(), x.scope.clone(), x.amount.clone(), x.detail.clone()))
            .collect::<Vec<_>>()
    };
    let call = |sc: &str, cost: &str| {
        (
            "allowed".to_owned(),
            Some(sc.to_owned()),
            Some(cost.to_owned()),
            Some(serde_json::json!({"by": "gateway", "calls": 1, "each": cost})),
        )
    };
    assert_eq!(
        calls(&e.events_of("lec", &search).await),
        [call(SEARCH, "0.002"), call(SEARCH, "0.002"), call(SEARCH, "0.00"), call(SEARCH, "0.002")]
    );
    assert_eq!(calls(&e.events_of("lec", &card).await), [call(CARD, "1.00")]);
    // The closes released the unused slots, audited once each.
    let released = |ev: &[bulkhead_store::AuditEvent]| {
        ev.iter().filter(|x| x.action == "release").map(|x| x.amount.clone()).collect::<Vec<_>>()
    };
    assert_eq!(released(&e.events_of("lec", &search).await), [Some("0.002".to_owned())]);
    assert_eq!(released(&e.events_of("lec", &card).await), [Some("1.00".to_owned())]);
    // Exact money: what the calls cost, nothing held, one transaction per call.
    let u = e.agent("lec").await.usage;
    assert_eq!(
        (u.window_spent, u.window_held, u.lifetime_spent, u.tx_count),
        (m("1.006"), Micros::ZERO, m("1.006"), 5)
    );
    // The per-call events add up to what was spent, as the usage history reads them.
    let ev = e.store.audit_page(Some("lec"), 0, 1000).await.unwrap();
    let captured: i64 =
        ev.iter().filter(|x| x.action == "capture").map(|x| m(x.amount.as_deref().unwrap()).micros()).sum();
    assert_eq!(captured, m("1.006").micros());
    e.intact().await;
    e.finish().await;
}

async fn lease_rate_limit(db: Db) {
    let e = Env::new(db).await;
    let mut s = spec("lr", &[PAY], "100");
    s.rate_limit = Some(RateLimit { requests: 5, per_ms: 60 * SEC });
    let k = e.admin_agent(s).await;
    // 5 per minute: 10 slots asked, 5 granted (each slot is a call's token).
    let (hid, n, _) = e.lease_ok(&k, "1", 10, MIN).await;
    assert_eq!(n, 5);
    err(&e.spend(&k, "0.01").await, 429, "rate_limited");
    let d = e.submit(lease_cmd(&k, "1", 10, MIN)).await;
    err(&d, 429, "rate_limited");
    let mh = e.submit(metered_cmd(&k, "1")).await;
    assert_eq!(json(&d), json(&mh), "the same 429, retry_after included");
    // Two calls made, three slots never used: their three tokens come back, the calls' do not.
    ok(&e.submit(lease_settle(&hid, "1", &["1", "0.5"], 3, false)).await, 200);
    for _ in 0..3 {
        ok(&e.spend(&k, "0.01").await, 200);
    }
    err(&e.spend(&k, "0.01").await, 429, "rate_limited");
    // And a token comes back every 12 s, as usual.
    e.advance(12 * SEC);
    ok(&e.spend(&k, "0.01").await, 200);
    err(&e.spend(&k, "0.01").await, 429, "rate_limited");
    assert_eq!(e.money("lr").await, (m("1.54"), Micros::ZERO, m("1.54")));
    // A lease takes tokens back for a later lease too.
    e.advance(60 * SEC);
    let (h2, n, _) = e.lease_ok(&k, "1", 10, MIN).await;
    assert_eq!(n, 5);
    ok(&e.submit(lease_settle(&h2, "1", &[], 2, false)).await, 200);
    let (_, n, _) = e.lease_ok(&k, "1", 10, MIN).await;
    assert_eq!(n, 2, "exactly the two tokens given back");

    // The caps are applied before the rate limit: slots that do not fit take no token.
    let mut s = spec("lr-cap", &[PAY], "3");
    s.per_tx_limit = Some(m("1"));
    s.rate_limit = Some(RateLimit { requests: 5, per_ms: 60 * SEC });
    let k = e.admin_agent(s).await;
    let (_, n, v) = e.lease_ok(&k, "1", 10, MIN).await;
    assert_eq!((n, v["room"].as_str()), (3, Some("0.00")), "{v}");
    let p = Patch { spending_cap: Some(m("100")), ..Patch::default() };
    ok(&e.submit(Command::PatchAgent { handle: "lr-cap".into(), patch: p }).await, 200);
    ok(&e.spend(&k, "0.01").await, 200);
    ok(&e.spend(&k, "0.01").await, 200);
    err(&e.spend(&k, "0.01").await, 429, "rate_limited");
    e.intact().await;
    e.finish().await;
}

async fn lease_expiry_captures_what_it_holds(db: Db) {
    let e = Env::new(db).await;
    let k = e.admin_agent(spec("lx", &[PAY], "10")).await;
    let (hid, n, _) = e.lease_ok(&k, "1", 4, MIN).await;
    assert_eq!(n, 4);
    ok(&e.submit(lease_settle(&hid, "1", &["0.30"], 1, false)).await, 200);
    e.advance(MIN - 1);
    assert_eq!(e.money("lx").await, (m("0.3"), m("2"), m("0.3")));
    e.advance(1);
    // Past its expiry, before any sweep or decision, a read already counts what the lease held
    // as spent (it will be captured in full), not as held.
    assert_eq!(e.money("lx").await, (m("2.3"), Micros::ZERO, m("2.3")));
    // Expired: the gateway can no longer settle it (and that charges nothing)...
    err(&e.submit(lease_settle(&hid, "1", &["0.10"], 1, true)).await, 409, "hold_closed");
    // ...and the next decision on the agent finds what the lease still held captured in full.
    ok(&e.spend(&k, "7.70").await, 200);
    err(&e.spend(&k, "0.01").await, 402, "spending_cap_exceeded");
    assert_eq!(e.money("lx").await, (m("10"), Micros::ZERO, m("10")));
    let ev = e.events_of("lx", &hid).await;
    let expired: Vec<_> = ev.iter().filter(|x| x.action == "hold.expire").collect();
    assert_eq!(expired.len(), 1, "{ev:?}");
    assert_eq!(expired[0].amount.as_deref(), Some("2.00"));
    assert_eq!(expired[0].detail, Some(serde_json::json!({"captured": "2.00"})));
    // Its calls' own events never came: the expiry's names what they were for (an MCP tool's).
    assert_eq!(expired[0].scope.as_deref(), Some(PAY));
    err(&e.submit(lease_settle(&hid, "1", &[], 0, true)).await, 409, "hold_closed");

    // A child's lease, expired and swept: every ancestor is charged, once.
    let pk = e.admin_agent(spec("lx-p", PARENT_SCOPES, "10")).await;
    let ck = e.child_agent(&pk, spec("lx-c", &[PAY], "10")).await;
    let (h2, n, _) = e.lease_ok(&ck, "0.50", 6, 10 * MIN).await;
    assert_eq!(n, 6);
    ok(&e.submit(lease_settle(&h2, "0.50", &["0.10", "0.20"], 0, false)).await, 200);
    assert_eq!(e.money("lx-p").await, (m("0.3"), m("2"), m("0.3")));
    e.advance(10 * MIN);
    for _ in 0..2 {
        ok(&e.submit(Command::SweepExpired).await, 200);
        assert_eq!(e.money("lx-c").await, (m("2.3"), Micros::ZERO, m("2.3")));
        assert_eq!(e.money("lx-p").await, (m("2.3"), Micros::ZERO, m("2.3")));
    }
    let ev = e.events_of("lx-c", &h2).await;
    let expired: Vec<_> = ev.iter().filter(|x| x.action == "hold.expire").collect();
    assert_eq!(expired.len(), 1, "{ev:?}");
    assert_eq!(expired[0].amount.as_deref(), Some("2.00"));
    ok(&e.spend(&pk, "7.70").await, 200);
    err(&e.spend(&ck, "0.01").await, 402, "ancestor_cap_exceeded");
    e.intact().await;
    e.finish().await;
}

async fn lease_one_slot_when_decided_call_by_call(db: Db) {
    let e = Env::new(db).await;
    // Without a trigger: every slot asked (the control).
    let k = e.admin_agent(spec("l1-all", &[PAY], "100")).await;
    assert_eq!(e.lease_ok(&k, "1", 5, MIN).await.1, 5);
    // Shadow mode: one slot, also when enforcement would deny it.
    let mut s = spec("l1-shadow", &[PAY], "10");
    s.enforce = false;
    let k = e.admin_agent(s).await;
    let (_, n, v) = e.lease_ok(&k, "1", 5, MIN).await;
    assert_eq!((n, v["amount"].as_str()), (1, Some("1.00")), "{v}");
    ok(&e.spend(&k, "9.5").await, 200);
    let (h, n, v) = e.lease_ok(&k, "1", 5, MIN).await;
    assert_eq!((n, v["shadow_denied"].as_str()), (1, Some("spending_cap_exceeded")), "{v}");
    let ev = e.events_of("l1-shadow", &h).await;
    assert_eq!(ev.len(), 1);
    let d = ev[0].detail.clone().unwrap_or_default();
    assert_eq!((d["shadow"].as_str(), d["slots"].as_u64()), (Some("would_deny"), Some(1)), "{d}");
    assert_eq!(
        (ev[0].outcome.as_str(), ev[0].reason.as_deref()),
        ("allowed", Some("spending_cap_exceeded")),
        "a would-be denial is marked: {ev:?}"
    );
    let u = e.agent("l1-shadow").await.usage;
    assert_eq!((u.window_held, u.tx_count, u.denied_count), (m("2"), 1, 0));
    // The breaker's optional triggers, per agent: each call is seen on its own.
    for (h, b) in [
        ("l1-rate", BreakerOverride { max_requests: Some(100), ..Default::default() }),
        ("l1-repeat", BreakerOverride { repeats: Some(5), ..Default::default() }),
    ] {
        let mut s = spec(h, &[PAY], "100");
        s.breaker = Some(b);
        let k = e.admin_agent(s).await;
        let (_, n, _) = e.lease_ok(&k, "1", 5, MIN).await;
        assert_eq!(n, 1, "{h}");
        assert_eq!(e.money(h).await.1, m("1"), "{h}");
    }
    e.intact().await;
    e.finish().await;

    // The trigger from the config, and an agent that turns it off.
    let e = Env::with_config(
        db,
        LedgerConfig {
            breaker: Breaker { max_requests: 3, rate_window_ms: 60 * SEC, ..Default::default() },
            ..Default::default()
        },
    )
    .await;
    let mut s = spec("l1-off", &[PAY], "100");
    s.breaker = Some(BreakerOverride { max_requests: Some(0), ..Default::default() });
    let k = e.admin_agent(s).await;
    assert_eq!(e.lease_ok(&k, "1", 5, MIN).await.1, 5);
    let k = e.admin_agent(spec("l1-cfg", &[PAY], "100")).await;
    for _ in 0..3 {
        assert_eq!(e.lease_ok(&k, "1", 5, MIN).await.1, 1);
    }
    assert_eq!(e.agent("l1-cfg").await.status, "active");
    // The lease that trips the trigger is answered as usual (one slot); then the agent is suspended.
    assert_eq!(e.lease_ok(&k, "1", 5, MIN).await.1, 1);
    assert_eq!(e.agent("l1-cfg").await.status, "suspended");
    err(&e.submit(lease_cmd(&k, "1", 5, MIN)).await, 403, "agent_suspended");
    assert_eq!(e.money("l1-cfg").await.1, m("4"));
    e.intact().await;
    e.finish().await;
}

async fn authz_epoch(db: Db) {
    let e = Env::new(db).await;
    let pk = e.admin_agent(spec("ep", PARENT_SCOPES, "100")).await;
    let mut cs = spec("ep-c", &[PAY], "10");
    cs.breaker = Some(BreakerOverride { denials: Some(2), window_ms: Some(60 * SEC), ..Default::default() });
    let ck = e.child_agent(&pk, cs).await;
    let start = e.ledger.authz_epoch();
    let store_start = e.store.authz_epoch().await.expect("the store's epoch");
    // Money moves, allowed or denied, are no authorization changes.
    ok(&e.spend(&ck, "1").await, 200);
    err(&e.spend(&ck, "11").await, 402, "per_tx_limit_exceeded");
    let h = e.hold_ok(&ck, "1", MIN).await;
    ok(&e.capture(&ck, &h, "0.5").await, 200);
    let h = e.hold_ok(&pk, "1", MIN).await;
    ok(&e.release(&pk, &h).await, 200);
    let r = e.submit(metered_cmd(&ck, "1")).await;
    ok(&r, 201);
    let h = json(&r)["id"].as_str().unwrap().to_owned();
    ok(&e.submit(Command::Settle { hold_id: h, amount: m("0.5") }).await, 200);
    let (h, _, _) = e.lease_ok(&ck, "1", 3, MIN).await;
    ok(&e.submit(lease_settle(&h, "1", &["0.5"], 1, true)).await, 200);
    e.lease_ok(&pk, "1", 3, MIN).await;
    ok(&e.submit(Command::SweepExpired).await, 200);
    err(&e.submit(Command::PatchAgent { handle: "nobody".into(), patch: Patch::default() }).await, 404, "not_found");
    assert_eq!(e.ledger.authz_epoch(), start, "money moves leave the epoch alone");
    assert_eq!(e.store.authz_epoch().await.expect("epoch"), store_start, "and the store's");

    // Each authorization change moves it on, before its answer is out.
    let mut last = start;
    fn moved(e: &Env, last: &mut u64, why: &str, expect: bool) {
        let now = e.ledger.authz_epoch();
        if expect {
            assert!(now > *last, "the epoch did not move on {why}");
        } else {
            assert_eq!(now, *last, "the epoch moved on {why}");
        }
        *last = now;
    }
    let p = Patch { spending_cap: Some(m("9")), ..Patch::default() };
    ok(&e.submit(Command::PatchAgent { handle: "ep-c".into(), patch: p }).await, 200);
    moved(&e, &mut last, "a patch", true);
    let ck2 = new_key();
    ok(&e.submit(Command::RotateKey { handle: "ep-c".into(), key_hash: ck2.clone() }).await, 201);
    moved(&e, &mut last, "a key rotation", true);
    err(&e.spend(&ck2, "11").await, 402, "per_tx_limit_exceeded");
    assert_eq!(e.agent("ep-c").await.status, "suspended");
    moved(&e, &mut last, "a suspension by the breaker", true);
    ok(&e.submit(Command::Resume { handle: "ep-c".into() }).await, 200);
    // A resume moves it too: refusals of the suspension remembered in memory lapse with it.
    moved(&e, &mut last, "a resume", true);
    ok(&e.spend(&pk, "1").await, 200);
    e.lease_ok(&ck2, "1", 2, MIN).await;
    moved(&e, &mut last, "a spend and a lease", false);
    ok(&e.revoke(Caller::Admin, "ep-c").await, 200);
    moved(&e, &mut last, "a revocation", true);
    // The store's epoch, which other replicas read, moved with every one of them: a patch, a
    // rotation, a suspension, a resume and a revocation.
    assert_eq!(e.store.authz_epoch().await.expect("epoch"), store_start + 5);
    e.intact().await;
    e.finish().await;
}

/// The reader half of the authorization epoch: a change answered by any writer of the store is
/// seen by the next read of every process, even one that read the epoch just before it (on
/// PostgreSQL a second replica makes the change; on SQLite there is one ledger).
async fn epoch_reader(db: Db) {
    let e = Env::new(db).await;
    let replica = match db {
        Db::Sqlite => None,
        Db::Postgres => {
            let other = Store::open(&e.url).await.expect("second replica");
            let (ledger, writer) = Ledger::start(other.clone(), e.clock.clone(), LedgerConfig::default());
            Some((other, ledger, writer))
        }
    };
    let changes = replica.as_ref().map_or(&e.ledger, |(_, ledger, _)| ledger);
    let reader = EpochReader::new(&e.ledger);
    assert_eq!(reader.local(), (db == Db::Sqlite).then(|| e.ledger.authz_epoch()), "known without a read alone");
    e.admin_agent(spec("er", &[PAY], "10")).await;
    for cap in ["9", "8", "7"] {
        let before = reader.current().await.expect("the epoch");
        let patch = Patch { spending_cap: Some(m(cap)), ..Patch::default() };
        let r = submit_to(changes, Command::PatchAgent { handle: "er".into(), patch }).await.expect("patched");
        ok(&r, 200);
        assert!(reader.current().await.expect("the epoch") > before, "the patch to {cap} was not seen");
    }
    if let Some((other, ledger, writer)) = replica {
        drop(ledger);
        writer.await.unwrap();
        other.close().await;
    }
    e.finish().await;
}

async fn concurrent_leases_parent_and_child(db: Db) {
    let e = Env::new(db).await;
    let pk = e.admin_agent(spec("lc-p", PARENT_SCOPES, "10.00")).await;
    let ck = e.child_agent(&pk, spec("lc-c", &[PAY], "10.00")).await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let ledger = e.ledger.clone();
        let key = if i % 2 == 0 { pk.clone() } else { ck.clone() };
        tasks.push(tokio::spawn(async move {
            let r = submit_to(&ledger, lease_cmd(&key, "0.30", 4, HOUR)).await.expect("the ledger answered");
            match r.status {
                201 => {
                    let v = json(&r);
                    Some((v["id"].as_str().unwrap().to_owned(), v["slots"].as_u64().unwrap()))
                }
                402 => None,
                s => panic!("unexpected {s}: {}", r.body),
            }
        }));
    }
    let mut leases = Vec::new();
    for t in tasks {
        leases.extend(t.await.unwrap());
    }
    let slots: u64 = leases.iter().map(|(_, n)| n).sum();
    assert_eq!(slots, 33, "exactly floor(cap / unit) slots in all");
    let (spent, held, _) = e.money("lc-p").await;
    assert_eq!((spent, held), (Micros::ZERO, m("9.9")));
    // Every call costs 0.10: 3.30 spent, nothing held, one transaction each.
    for (id, n) in &leases {
        let costs = vec!["0.10"; usize::try_from(*n).unwrap()];
        ok(&e.submit(lease_settle(id, "0.30", &costs, 0, true)).await, 200);
    }
    assert_eq!(e.money("lc-p").await, (m("3.3"), Micros::ZERO, m("3.3")));
    let tx = e.agent("lc-p").await.usage.tx_count + e.agent("lc-c").await.usage.tx_count;
    assert_eq!(tx, 33);
    e.intact().await;
    e.finish().await;
}
