//! The public contract through HTTP: agents, children, spending, holds, idempotency, audit and
//! metrics, with a manual clock for windows and expiries. Every answer also passes the harness's
//! global checks (error shape, amounts with at least two decimals).

mod common;

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::Request;
use bulkhead_core::ApiKey;
use common::*;
use serde_json::{Value, json};
use tower::ServiceExt;

fn handles(list: &Value, field: &str) -> Vec<String> {
    list[field].as_array().unwrap().iter().map(|a| a["handle"].as_str().unwrap().to_owned()).collect()
}

fn span_secs(s: &str) -> i64 {
    bulkhead_core::Span::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}")).secs()
}

fn set(v: &Value) -> BTreeSet<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_owned()).collect()
}

fn strs(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

async fn idem_spend(s: &Srv, key: &str, idem: &str, body: &Value) -> Resp {
    s.call("POST", "/v1/spend", &Auth::key(key), &[("idempotency-key", idem.as_bytes())], body.to_string()).await
}

#[tokio::test]
async fn create_shows_the_key_once_and_applies_defaults() {
    let s = Srv::new().await;
    let r = s
        .json(
            "POST",
            "/v1/agents",
            &Auth::Admin,
            json!({"handle": "invoice-processor-prod-01", "scopes": ["payments:write", "invoices:read"],
                   "spending_cap": "50", "labels": {"team": "billing"}}),
        )
        .await;
    r.expect(201, None);
    let a = &r.json;
    let key = a["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("bk_"), "{key}");
    // bk_ + at least 32 base62 characters (190 bits) + checksum.
    assert!(key.len() > 3 + 32 && key[3..].bytes().all(|b| b.is_ascii_alphanumeric()), "{key}");
    assert!(ApiKey::parse(&key).is_some());

    let fields: BTreeSet<&str> = a.as_object().unwrap().keys().map(String::as_str).collect();
    for f in [
        "handle",
        "parent",
        "status",
        "scopes",
        "spending_cap",
        "window",
        "per_tx_limit",
        "lifetime_cap",
        "rate_limit",
        "created_at",
        "revoked_at",
        "usage",
        "key",
    ] {
        assert!(fields.contains(f), "agent object lacks {f}: {}", r.text);
    }
    assert_eq!(a["handle"], "invoice-processor-prod-01");
    assert_eq!(a["parent"], Value::Null);
    assert_eq!(a["status"], "active");
    assert_eq!(set(&a["scopes"]), strs(&["payments:write", "invoices:read"]));
    assert_eq!(a["spending_cap"], "50.00");
    assert_eq!(a["window"], "24h");
    assert_eq!(a["per_tx_limit"], "50.00", "per_tx_limit defaults to the cap");
    assert_eq!(a["lifetime_cap"], Value::Null);
    assert_eq!(a["rate_limit"], Value::Null);
    assert_eq!(a["revoked_at"], Value::Null);
    assert_eq!(a["created_at"], rfc3339(T0));
    assert_eq!(a["labels"], json!({"team": "billing"}));
    let u = &a["usage"];
    assert_eq!(u["window_spent"], "0.00");
    assert_eq!(u["window_held"], "0.00");
    assert_eq!(u["lifetime_spent"], "0.00");
    assert_eq!(u["window_started_at"], rfc3339(T0));
    assert_eq!(u["window_resets_at"], rfc3339(T0 + 24 * HOUR));
    assert_eq!(u["utilization"].as_f64(), Some(0.0));
    assert_eq!(u["tx_count"], 0);
    assert_eq!(u["denied_count"], 0);

    // Never again: not in GET, list, /v1/me or the audit trail.
    let g = s.get("/v1/agents/invoice-processor-prod-01", &Auth::Admin).await;
    g.expect(200, None);
    assert!(g.json.get("key").is_none() && !g.text.contains(&key));
    let mut view = a.clone();
    view.as_object_mut().unwrap().remove("key");
    assert_eq!(g.json, view, "GET answers the same agent object as the 201, minus the key");
    let l = s.get("/v1/agents", &Auth::Admin).await;
    assert!(!l.text.contains(&key) && l.json["agents"][0].get("key").is_none());
    let me = s.get("/v1/me", &Auth::key(&key)).await;
    me.expect(200, None);
    assert!(me.json.get("key").is_none() && !me.text.contains(&key));
    assert_eq!(me.json["handle"], "invoice-processor-prod-01");
    let audit = s.get("/v1/agents/invoice-processor-prod-01/audit", &Auth::Admin).await;
    assert!(!audit.text.contains(&key));

    // The key works, a second agent gets a different key, and a taken handle is refused.
    s.spend(&key, "payments:write", "1").await.expect(200, None);
    let other = s.agent("other", &["a:b"], "1").await;
    assert_ne!(other, key);
    let dup = s
        .json("POST", "/v1/agents", &Auth::Admin, json!({"handle": "other", "scopes": ["a:b"], "spending_cap": "9"}))
        .await;
    dup.err(409, "handle_taken");
    assert_eq!(s.agent_view("other").await["spending_cap"], "1.00", "the failed create changed nothing");
}

#[tokio::test]
async fn list_pages_by_handle_and_clamps_the_limit() {
    let s = Srv::new().await;
    for h in ["a-3", "a-1", "a-5", "a-2", "a-4"] {
        s.agent(h, &["a:b"], "1").await;
    }
    let all = s.get("/v1/agents", &Auth::Admin).await;
    all.expect(200, None);
    assert_eq!(handles(&all.json, "agents"), ["a-1", "a-2", "a-3", "a-4", "a-5"]);
    let p1 = s.get("/v1/agents?limit=2", &Auth::Admin).await;
    assert_eq!(handles(&p1.json, "agents"), ["a-1", "a-2"]);
    let p2 = s.get("/v1/agents?limit=2&after=a-2", &Auth::Admin).await;
    assert_eq!(handles(&p2.json, "agents"), ["a-3", "a-4"]);
    let p3 = s.get("/v1/agents?after=a-4&limit=2", &Auth::Admin).await;
    assert_eq!(handles(&p3.json, "agents"), ["a-5"]);
    let p4 = s.get("/v1/agents?after=a-5", &Auth::Admin).await;
    assert_eq!(handles(&p4.json, "agents"), Vec::<String>::new());
    assert!(all.json["agents"].as_array().unwrap().iter().all(|a| a.get("key").is_none()));

    // 1001 more agents, created concurrently (the ledger commits them in groups).
    let mut set = tokio::task::JoinSet::new();
    for i in 0..1001 {
        let router = s.router.clone();
        set.spawn(async move {
            let body = json!({"handle": format!("b-{i:04}"), "scopes": ["a:b"], "spending_cap": "1"}).to_string();
            let req = Request::post("/v1/agents")
                .header("authorization", format!("Bearer {ADMIN}"))
                .body(Body::from(body))
                .unwrap();
            router.oneshot(req).await.unwrap().status().as_u16()
        });
    }
    while let Some(st) = set.join_next().await {
        assert_eq!(st.unwrap(), 201);
    }
    let d = s.get("/v1/agents", &Auth::Admin).await;
    assert_eq!(d.json["agents"].as_array().unwrap().len(), 100, "the default page is 100");
    let big = s.get("/v1/agents?limit=999999", &Auth::Admin).await;
    big.expect(200, None);
    let n = big.json["agents"].as_array().unwrap().len();
    assert!(n >= 1000, "a huge limit is clamped to a maximum of at least 1000, got {n}");
    let hs = handles(&big.json, "agents");
    assert!(hs.windows(2).all(|w| w[0] < w[1]), "pages are in handle order");
}

#[tokio::test]
async fn patch_changes_limits_scopes_and_clears_the_lifetime_cap() {
    let s = Srv::new().await;
    let (a, key) =
        s.create(json!({"handle": "p", "scopes": ["pay:x"], "spending_cap": "10", "lifetime_cap": "100"})).await;
    assert_eq!(a["lifetime_cap"], "100.00");
    let r = s
        .json(
            "PATCH",
            "/v1/agents/p",
            &Auth::Admin,
            json!({"spending_cap": "20", "per_tx_limit": "5", "scopes": ["pay:x", "pay:y"],
                   "rate_limit": {"requests": 10, "per": "1m"}, "labels": {"env": "prod"}, "window": "1h"}),
        )
        .await;
    r.expect(200, None);
    let p = &r.json;
    assert_eq!(p["spending_cap"], "20.00");
    assert_eq!(p["per_tx_limit"], "5.00");
    assert_eq!(set(&p["scopes"]), strs(&["pay:x", "pay:y"]));
    assert_eq!(p["rate_limit"]["requests"], 10);
    assert_eq!(span_secs(p["rate_limit"]["per"].as_str().unwrap()), 60);
    assert_eq!(span_secs(p["window"].as_str().unwrap()), 3600);
    assert_eq!(p["labels"], json!({"env": "prod"}));
    assert_eq!(p["lifetime_cap"], "100.00", "fields not named are left alone");
    assert_eq!(p["usage"]["window_resets_at"], rfc3339(T0 + HOUR));
    let mut g = s.agent_view("p").await;
    assert_eq!(&g, p, "GET shows the patched agent");

    s.spend(&key, "pay:x", "5.01").await.err(402, "per_tx_limit_exceeded");
    s.spend(&key, "pay:y", "5").await.expect(200, None);

    let cleared = s.json("PATCH", "/v1/agents/p", &Auth::Admin, json!({"lifetime_cap": null})).await;
    cleared.expect(200, None);
    assert_eq!(cleared.json["lifetime_cap"], Value::Null);
    assert_eq!(cleared.json["spending_cap"], "20.00");
    let same = s.json("PATCH", "/v1/agents/p", &Auth::Admin, json!({})).await;
    same.expect(200, None);
    g = s.agent_view("p").await;
    assert_eq!(g["lifetime_cap"], Value::Null);
    assert_eq!(g["usage"]["window_spent"], "5.00");

    let narrowed = s.json("PATCH", "/v1/agents/p", &Auth::Admin, json!({"scopes": ["pay:y"]})).await;
    narrowed.expect(200, None);
    s.spend(&key, "pay:x", "1").await.err(403, "scope_not_granted");
    s.json("PATCH", "/v1/agents/nobody", &Auth::Admin, json!({"spending_cap": "1"})).await.err(404, "not_found");
    s.json("PATCH", "/v1/agents/p", &Auth::key(&key), json!({"spending_cap": "1000"}))
        .await
        .err(401, "invalid_credentials");
    assert_eq!(s.agent_view("p").await["spending_cap"], "20.00");

    let updates: Vec<Value> = s.audit("p").await.into_iter().filter(|e| e["action"] == "agent.update").collect();
    assert_eq!(updates.len(), 4, "every PATCH is one audit event");
}

#[tokio::test]
async fn checks_run_in_contract_order() {
    let s = Srv::new().await;
    let (_, key) = s
        .create(json!({"handle": "order", "scopes": ["pay:x"], "spending_cap": "10", "per_tx_limit": "5",
                       "rate_limit": {"requests": 1, "per": "1h"}}))
        .await;
    let unknown = ApiKey::generate(&mut rand::rng()).expose().to_owned();
    // Out of scope, rate limited and over every limit at once: each check answers in turn.
    s.spend(&unknown, "other:x", "100").await.err(401, "invalid_credentials");
    s.spend(&key, "other:x", "100").await.err(403, "scope_not_granted");
    // In scope: the rate limiter admits this one, then the limits refuse it.
    s.spend(&key, "pay:x", "100").await.err(402, "per_tx_limit_exceeded");
    // Now the limiter is spent: 429 wins over 402, and 403 over 429.
    let r = s.spend(&key, "pay:x", "100").await;
    r.err(429, "rate_limited");
    assert!(r.headers.contains_key("retry-after"));
    s.spend(&key, "other:x", "100").await.err(403, "scope_not_granted");
    s.spend(&key, "pay:x", "1").await.err(429, "rate_limited");
    s.hold(&key, "pay:x", "100", None).await.err(429, "rate_limited");
    s.advance(HOUR);
    s.spend(&key, "pay:x", "5.01").await.err(402, "per_tx_limit_exceeded");
    s.advance(HOUR);
    s.spend(&key, "pay:x", "5").await.expect(200, None);
    let u = s.usage("order").await;
    assert_eq!(u["window_spent"], "5.00");
    assert_eq!(u["tx_count"], 1);

    // Suspension answers before scope, rate limit and limits.
    let (_, sk) = s
        .create(json!({"handle": "sus", "scopes": ["pay:x"], "spending_cap": "10",
                       "rate_limit": {"requests": 1, "per": "1h"}, "breaker": {"denials": 2, "window": "60s"}}))
        .await;
    s.spend(&sk, "pay:x", "11").await.err(402, "per_tx_limit_exceeded");
    s.spend(&sk, "pay:x", "11").await.err(429, "rate_limited");
    assert_eq!(s.agent_view("sus").await["status"], "suspended");
    s.spend(&sk, "other:x", "100").await.err(403, "agent_suspended");
    s.spend(&sk, "pay:x", "1").await.err(403, "agent_suspended");
    s.hold(&sk, "pay:x", "1", None).await.err(403, "agent_suspended");
    let resumed = s.call("POST", "/v1/agents/sus/resume", &Auth::Admin, &[], "").await;
    resumed.expect(200, None);
    assert_eq!(resumed.json["status"], "active");
    s.advance(HOUR);
    s.spend(&sk, "pay:x", "1").await.expect(200, None);

    // Credentials answer before everything: revoked, then expired.
    s.call("POST", "/v1/agents/sus/revoke", &Auth::Admin, &[], "").await.expect(200, None);
    s.spend(&sk, "other:x", "100").await.err(401, "credential_revoked");
    let (_, ek) =
        s.create(json!({"handle": "exp", "scopes": ["pay:x"], "spending_cap": "10", "expires_in": "1h"})).await;
    s.advance(HOUR - 1);
    s.spend(&ek, "pay:x", "1").await.expect(200, None);
    s.advance(1);
    s.spend(&ek, "other:x", "100").await.err(401, "credential_expired");
    s.spend(&ek, "pay:x", "1").await.err(401, "credential_expired");
    s.get("/v1/me", &Auth::key(&ek)).await.err(401, "credential_expired");
    assert_eq!(s.usage("exp").await["window_spent"], "1.00");
}

#[tokio::test]
async fn scope_wildcards() {
    let s = Srv::new().await;
    let k = s.agent("w", &["read:*", "*:list"], "100").await;
    for (scope, ok) in [
        ("read:external-apis", true),
        ("read:x", true),
        ("users:list", true),
        ("read:list", true),
        ("write:x", false),
        ("users:read", false),
        ("reader:x", false),
        ("users:listing", false),
    ] {
        let r = s.spend(&k, scope, "1").await;
        if ok {
            r.expect(200, None);
        } else {
            r.err(403, "scope_not_granted");
        }
    }
    let all = s.agent("all", &["*"], "100").await;
    s.spend(&all, "anything:at-all", "1").await.expect(200, None);
    let exact = s.agent("exact", &["pay:x"], "100").await;
    s.spend(&exact, "pay:x", "1").await.expect(200, None);
    s.spend(&exact, "pay:y", "1").await.err(403, "scope_not_granted");
    assert_eq!(s.usage("w").await["tx_count"], 4);
}

#[tokio::test]
async fn children_are_bounded_by_their_parents() {
    let s = Srv::new().await;
    let (_, pkey) = s
        .create(json!({"handle": "parent", "scopes": ["spawn:agents", "pay:*"], "spending_cap": "30",
                       "lifetime_cap": "500"}))
        .await;
    let pk = Auth::key(&pkey);
    let child = |h: &str, scopes: Value, cap: &str, extra: Value| {
        let mut v = json!({"handle": h, "scopes": scopes, "spending_cap": cap, "lifetime_cap": "500"});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    for scopes in [json!(["read:x"]), json!(["pay:*", "other:y"]), json!(["*"]), json!(["*:x"]), json!(["spawn:*"])] {
        let r = s.json("POST", "/v1/agents", &pk, child("c-bad", scopes.clone(), "1", json!({}))).await;
        r.err(403, "scope_escalation");
    }
    for (cap, extra) in [
        ("30.000001", json!({})),
        ("10", json!({"per_tx_limit": "30.01"})),
        ("10", json!({"lifetime_cap": "500.000001"})),
        ("10", json!({"lifetime_cap": null})),
    ] {
        let r = s.json("POST", "/v1/agents", &pk, child("c-bad", json!(["pay:x"]), cap, extra.clone())).await;
        r.err(403, "cap_escalation");
    }
    s.get("/v1/agents/c-bad", &Auth::Admin).await.err(404, "not_found");

    // Equal caps are fine, whatever the window; the child's parent is the caller.
    let r = s
        .json(
            "POST",
            "/v1/agents",
            &pk,
            child("child", json!(["pay:x", "spawn:agents"]), "30", json!({"window": "1h"})),
        )
        .await;
    r.expect(201, None);
    assert_eq!(r.json["parent"], "parent");
    assert_eq!(r.json["per_tx_limit"], "30.00");
    let ckey = r.json["key"].as_str().unwrap().to_owned();
    assert!(ckey.starts_with("bk_") && ckey != pkey);
    assert_eq!(s.agent_view("child").await["parent"], "parent");
    let g = s
        .json(
            "POST",
            "/v1/agents",
            &Auth::key(&ckey),
            child("grandchild", json!(["pay:x"]), "10", json!({"lifetime_cap": "5"})),
        )
        .await;
    g.expect(201, None);
    assert_eq!(g.json["parent"], "child");
    let gkey = g.json["key"].as_str().unwrap().to_owned();
    // A grandchild may not exceed its own parent's scopes either, even if the root has them.
    let r = s.json("POST", "/v1/agents", &Auth::key(&ckey), child("c2", json!(["pay:y"]), "1", json!({}))).await;
    r.err(403, "scope_escalation");

    // Without spawn:agents there is no spawning.
    let lkey = s.agent("loner", &["pay:x"], "100").await;
    let r = s.json("POST", "/v1/agents", &Auth::key(&lkey), child("c3", json!(["pay:x"]), "1", json!({}))).await;
    r.err(403, "scope_not_granted");

    // Usage rolls up; every ancestor's cap binds.
    s.spend(&gkey, "pay:x", "5").await.expect(200, None);
    assert_eq!(s.usage("child").await["window_spent"], "5.00");
    assert_eq!(s.usage("parent").await["window_spent"], "5.00");
    assert_eq!(s.usage("parent").await["lifetime_spent"], "5.00");
    s.spend(&gkey, "pay:x", "0.01").await.err(402, "lifetime_cap_exceeded");
    s.spend(&pkey, "pay:z", "20").await.expect(200, None);
    s.spend(&ckey, "pay:x", "5.01").await.err(402, "ancestor_cap_exceeded");
    s.hold(&ckey, "pay:x", "5.01", None).await.err(402, "ancestor_cap_exceeded");
    s.spend(&ckey, "pay:x", "5").await.expect(200, None);
    let pu = s.usage("parent").await;
    assert_eq!(pu["window_spent"], "30.00");
    assert_eq!(pu["utilization"].as_f64(), Some(1.0));
    assert_eq!(s.usage("child").await["window_spent"], "10.00");

    // A parent revokes its own descendants and nobody else's.
    let stranger = s.agent("stranger", &["pay:x"], "1").await;
    for (key, target) in [
        (&pkey, "stranger"),
        (&pkey, "loner"),
        (&pkey, "parent"),
        (&ckey, "parent"),
        (&ckey, "child"),
        (&gkey, "child"),
        (&lkey, "child"),
        (&stranger, "grandchild"),
    ] {
        let r = s.call("POST", &format!("/v1/agents/{target}/revoke"), &Auth::key(key), &[], "").await;
        r.err(404, "not_found");
        assert_eq!(s.agent_view(target).await["status"], "active", "{target} was not revoked");
    }
    s.call("POST", "/v1/agents/nobody/revoke", &pk, &[], "").await.err(404, "not_found");
    let r = s.json("POST", "/v1/agents/grandchild/revoke", &pk, json!({"reason": "done"})).await;
    r.expect(200, None);
    assert_eq!(r.json["revoked"], json!(["grandchild"]));
    let r = s.call("POST", "/v1/agents/child/revoke", &pk, &[], "").await;
    r.expect(200, None);
    assert_eq!(r.json["revoked"], json!(["child", "grandchild"]));
    s.spend(&ckey, "pay:x", "1").await.err(401, "credential_revoked");
    s.spend(&gkey, "pay:x", "1").await.err(401, "credential_revoked");
    s.spend(&pkey, "pay:x", "0.01").await.err(402, "spending_cap_exceeded");
    s.spend(&stranger, "pay:x", "1").await.expect(200, None);
    s.spend(&lkey, "pay:x", "1").await.expect(200, None);
    // A revoked parent can neither spawn nor revoke.
    let r = s.json("POST", "/v1/agents", &Auth::key(&ckey), child("c4", json!(["pay:x"]), "1", json!({}))).await;
    r.err(401, "credential_revoked");
    s.call("POST", "/v1/agents/grandchild/revoke", &Auth::key(&ckey), &[], "").await.err(401, "credential_revoked");
}

#[tokio::test]
async fn revoke_is_idempotent_covers_descendants_and_releases_holds() {
    let s = Srv::new().await;
    let (_, rkey) =
        s.create(json!({"handle": "root", "scopes": ["spawn:agents", "pay:x"], "spending_cap": "100"})).await;
    let mk = |h: &str| json!({"handle": h, "scopes": ["spawn:agents", "pay:x"], "spending_cap": "10"});
    let akey = s.json("POST", "/v1/agents", &Auth::key(&rkey), mk("a")).await.json["key"].as_str().unwrap().to_owned();
    let bkey = s.json("POST", "/v1/agents", &Auth::key(&akey), mk("b")).await.json["key"].as_str().unwrap().to_owned();
    let a2key =
        s.json("POST", "/v1/agents", &Auth::key(&rkey), mk("a2")).await.json["key"].as_str().unwrap().to_owned();
    let other = s.agent("other", &["pay:x"], "10").await;
    let hold = s.hold(&bkey, "pay:x", "4", Some("1h")).await;
    hold.expect(201, None);
    let hold_id = hold.json["id"].as_str().unwrap().to_owned();
    assert_eq!(s.usage("root").await["window_held"], "4.00");

    s.advance(1234);
    let r = s.json("POST", "/v1/agents/root/revoke", &Auth::Admin, json!({"reason": "compromised"})).await;
    r.expect(200, None);
    let revoked = set(&r.json["revoked"]);
    assert_eq!(revoked, strs(&["root", "a", "b", "a2"]));
    assert_eq!(r.json["revoked"][0], "root", "the target comes first");
    assert_eq!(r.json["revoked_at"], rfc3339(T0 + 1234));
    s.advance(5000);
    let again = s.call("POST", "/v1/agents/root/revoke", &Auth::Admin, &[], "").await;
    again.expect(200, None);
    assert_eq!(set(&again.json["revoked"]), revoked, "idempotent: same set");
    assert_eq!(again.json["revoked_at"], rfc3339(T0 + 1234), "idempotent: same time");

    for k in [&rkey, &akey, &bkey, &a2key] {
        s.spend(k, "pay:x", "1").await.err(401, "credential_revoked");
        s.hold(k, "pay:x", "1", None).await.err(401, "credential_revoked");
        s.get("/v1/me", &Auth::key(k)).await.err(401, "credential_revoked");
        s.get("/v1/me/audit", &Auth::key(k)).await.err(401, "credential_revoked");
    }
    let cap = s.json("POST", &format!("/v1/holds/{hold_id}/capture"), &Auth::key(&bkey), json!({"amount": "1"})).await;
    cap.err(401, "credential_revoked");
    s.spend(&other, "pay:x", "1").await.expect(200, None);

    let root = s.agent_view("root").await;
    assert_eq!(root["status"], "revoked");
    assert_eq!(root["revoked_at"], rfc3339(T0 + 1234));
    assert_eq!(root["usage"]["window_held"], "0.00", "open holds of revoked agents are released");
    assert_eq!(s.usage("b").await["window_held"], "0.00");
    let b_events = s.audit("b").await;
    assert!(
        b_events.iter().any(|e| e["action"] == "release" && e["reason"] == "agent_revoked" && e["amount"] == "4.00"),
        "{b_events:?}"
    );
    assert!(s.audit("root").await.iter().any(|e| e["action"] == "agent.revoke" && e["reason"] == "compromised"));

    s.call("POST", "/v1/agents/root/keys", &Auth::Admin, &[], "").await.err(409, "agent_revoked");
    s.call("POST", "/v1/agents/root/resume", &Auth::Admin, &[], "").await.err(409, "agent_revoked");
    s.call("POST", "/v1/agents/nobody/revoke", &Auth::Admin, &[], "").await.err(404, "not_found");
    // Revoking a subtree leaves the rest of the tree alone.
    let s2 = Srv::new().await;
    let (_, rk) = s2.create(json!({"handle": "r", "scopes": ["spawn:agents", "pay:x"], "spending_cap": "100"})).await;
    let ck = s2.json("POST", "/v1/agents", &Auth::key(&rk), mk("c")).await.json["key"].as_str().unwrap().to_owned();
    let r = s2.call("POST", "/v1/agents/c/revoke", &Auth::Admin, &[], "").await;
    assert_eq!(r.json["revoked"], json!(["c"]));
    s2.spend(&ck, "pay:x", "1").await.err(401, "credential_revoked");
    s2.spend(&rk, "pay:x", "1").await.expect(200, None);
}

#[tokio::test]
async fn rotating_a_key_kills_the_old_one_at_once() {
    let s = Srv::new().await;
    let old = s.agent("rot", &["pay:x"], "10").await;
    s.spend(&old, "pay:x", "1").await.expect(200, None);
    let r = s.call("POST", "/v1/agents/rot/keys", &Auth::Admin, &[], "").await;
    r.expect(201, None);
    assert_eq!(r.json.as_object().unwrap().len(), 1, "only the key: {}", r.text);
    let new = r.json["key"].as_str().unwrap().to_owned();
    assert!(new.starts_with("bk_") && ApiKey::parse(&new).is_some() && new != old);
    s.spend(&old, "pay:x", "1").await.err(401, "invalid_credentials");
    s.get("/v1/me", &Auth::key(&old)).await.err(401, "invalid_credentials");
    s.spend(&new, "pay:x", "1").await.expect(200, None);
    let u = s.usage("rot").await;
    assert_eq!(u["window_spent"], "2.00", "the agent keeps its usage");
    assert!(!s.agent_view("rot").await.to_string().contains(&new));
    let newer = s.call("POST", "/v1/agents/rot/keys", &Auth::Admin, &[], "{}").await;
    newer.expect(201, None);
    s.spend(&new, "pay:x", "1").await.err(401, "invalid_credentials");
    // Only the admin rotates keys.
    s.call("POST", "/v1/agents/rot/keys", &Auth::key(newer.json["key"].as_str().unwrap()), &[], "")
        .await
        .err(401, "invalid_credentials");
    assert_eq!(s.audit("rot").await.iter().filter(|e| e["action"] == "agent.rotate_key").count(), 2);
}

#[tokio::test]
async fn holds_capture_release_and_their_shapes() {
    let s = Srv::new().await;
    let key = s.agent("h", &["pay:x"], "10").await;
    let a = s.hold(&key, "pay:x", "1.00", Some("5m")).await;
    a.expect(201, None);
    let a_id = a.json["id"].as_str().unwrap().to_owned();
    assert_eq!(a.json["amount"], "1.00");
    assert_eq!(a.json["expires_at"], rfc3339(T0 + 5 * 60_000));
    let b = s.hold(&key, "pay:x", "2", None).await;
    b.expect(201, None);
    let b_id = b.json["id"].as_str().unwrap().to_owned();
    assert_eq!(b.json["expires_at"], rfc3339(T0 + 300_000), "default expiry is 5m");
    assert_ne!(a_id, b_id);
    let u = s.usage("h").await;
    assert_eq!(u["window_held"], "3.00");
    assert_eq!(u["utilization"].as_f64(), Some(0.3));

    // A hold counts against the cap from the moment it is granted.
    s.spend(&key, "pay:x", "7.01").await.err(402, "spending_cap_exceeded");
    let sp = s.spend(&key, "pay:x", "7").await;
    sp.expect(200, None);
    assert_eq!(sp.json["remaining"]["window"], "0.00");

    let c = s.json("POST", &format!("/v1/holds/{a_id}/capture"), &Auth::key(&key), json!({"amount": "0.40"})).await;
    c.expect(200, None);
    assert_eq!(c.json, json!({"id": a_id, "captured": "0.40", "released": "0.60"}));
    let again = s.json("POST", &format!("/v1/holds/{a_id}/capture"), &Auth::key(&key), json!({"amount": "0.10"})).await;
    again.err(409, "hold_closed");
    s.call("POST", &format!("/v1/holds/{a_id}/release"), &Auth::key(&key), &[], "").await.err(409, "hold_closed");

    let over =
        s.json("POST", &format!("/v1/holds/{b_id}/capture"), &Auth::key(&key), json!({"amount": "2.000001"})).await;
    over.err(400, "invalid_amount");
    assert_eq!(s.usage("h").await["window_held"], "2.00", "a refused capture leaves the hold open");
    let other = s.agent("h2", &["pay:x"], "10").await;
    s.call("POST", &format!("/v1/holds/{b_id}/release"), &Auth::key(&other), &[], "").await.err(404, "not_found");
    let rel = s.call("POST", &format!("/v1/holds/{b_id}/release"), &Auth::key(&key), &[], "").await;
    rel.expect(200, None);
    assert_eq!(rel.json, json!({"id": b_id, "released": "2.00"}));
    s.json("POST", &format!("/v1/holds/{b_id}/capture"), &Auth::key(&key), json!({"amount": "1"}))
        .await
        .err(409, "hold_closed");
    let u = s.usage("h").await;
    assert_eq!(u["window_spent"], "7.40");
    assert_eq!(u["window_held"], "0.00");
    assert_eq!(u["lifetime_spent"], "7.40");

    // Expiry: at most 24h.
    let k2 = s.agent("h3", &["pay:x"], "100").await;
    let long = s.hold(&k2, "pay:x", "1", Some("24h")).await;
    long.expect(201, None);
    assert_eq!(long.json["expires_at"], rfc3339(T0 + 24 * HOUR));
    s.hold(&k2, "pay:x", "1", Some("1d")).await.expect(201, None);
    s.hold(&k2, "pay:x", "1", Some("86400s")).await.expect(201, None);
    s.hold(&k2, "pay:x", "1", Some("25h")).await.err(400, "invalid_request");
    s.hold(&k2, "pay:x", "1", Some("86401s")).await.err(400, "invalid_request");
    s.hold(&k2, "pay:y", "1", None).await.err(403, "scope_not_granted");
    s.hold(&k2, "pay:x", "100.01", None).await.err(402, "per_tx_limit_exceeded");
    let n = s.json("POST", "/v1/holds", &Auth::key(&k2), json!({"scope": "pay:x", "amount": 0.5})).await;
    n.expect(201, None);
    assert_eq!(n.json["amount"], "0.50");
    assert_eq!(s.usage("h3").await["window_held"], "3.50");
}

#[tokio::test]
async fn an_expired_hold_stops_counting_at_exactly_expires_at() {
    let s = Srv::new().await;
    let key = s.agent("e", &["pay:x"], "10").await;
    let a = s.hold(&key, "pay:x", "9", Some("5m")).await.json["id"].as_str().unwrap().to_owned();
    let b = s.hold(&key, "pay:x", "0.5", Some("5m")).await.json["id"].as_str().unwrap().to_owned();
    let expires = T0 + 5 * 60_000;

    s.set_now(expires - 1);
    let u = s.usage("e").await;
    assert_eq!(u["window_held"], "9.50");
    s.spend(&key, "pay:x", "1").await.err(402, "spending_cap_exceeded");
    s.json("POST", &format!("/v1/holds/{b}/capture"), &Auth::key(&key), json!({"amount": "0.5"}))
        .await
        .expect(200, None);

    s.set_now(expires);
    // Reads first (nothing has swept the hold yet), then a decision.
    let u = s.usage("e").await;
    assert_eq!(u["window_held"], "0.00", "the expired hold no longer counts in reads");
    assert_eq!(u["window_spent"], "0.50");
    assert_eq!(u["utilization"].as_f64(), Some(0.05));
    s.spend(&key, "pay:x", "9.5").await.expect(200, None);
    s.json("POST", &format!("/v1/holds/{a}/capture"), &Auth::key(&key), json!({"amount": "1"}))
        .await
        .err(409, "hold_closed");
    s.call("POST", &format!("/v1/holds/{a}/release"), &Auth::key(&key), &[], "").await.err(409, "hold_closed");
    let u = s.usage("e").await;
    assert_eq!(u["window_spent"], "10.00");
    assert_eq!(u["window_held"], "0.00");
    let expired: Vec<Value> = s.audit("e").await.into_iter().filter(|e| e["action"] == "hold.expire").collect();
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0]["amount"], "9.00");
}

#[tokio::test]
async fn windows_reset_on_a_fixed_period_anchored_at_creation() {
    let s = Srv::new().await;
    let key = s.create(json!({"handle": "win", "scopes": ["pay:x"], "spending_cap": "10", "window": "1h"})).await.1;
    s.advance(30 * 60_000);
    let r = s.spend(&key, "pay:x", "10").await;
    r.expect(200, None);
    assert_eq!(r.json["remaining"]["window"], "0.00");
    assert_eq!(r.json["window_resets_at"], rfc3339(T0 + HOUR), "anchored at creation, not at the first spend");
    s.set_now(T0 + HOUR - 1);
    s.spend(&key, "pay:x", "0.01").await.err(402, "spending_cap_exceeded");
    let u = s.usage("win").await;
    assert_eq!(u["window_started_at"], rfc3339(T0));
    assert_eq!(u["window_resets_at"], rfc3339(T0 + HOUR));
    assert_eq!(u["window_spent"], "10.00");

    s.set_now(T0 + HOUR);
    let u = s.usage("win").await;
    assert_eq!(u["window_spent"], "0.00", "a new window starts empty");
    assert_eq!(u["lifetime_spent"], "10.00");
    assert_eq!(u["window_started_at"], rfc3339(T0 + HOUR));
    assert_eq!(u["window_resets_at"], rfc3339(T0 + 2 * HOUR));
    let r = s.spend(&key, "pay:x", "10").await;
    r.expect(200, None);
    assert_eq!(r.json["window_resets_at"], rfc3339(T0 + 2 * HOUR));
    s.spend(&key, "pay:x", "0.01").await.err(402, "spending_cap_exceeded");
    // Several windows later.
    s.set_now(T0 + 5 * HOUR + 59 * 60_000);
    assert_eq!(s.usage("win").await["window_started_at"], rfc3339(T0 + 5 * HOUR));
    s.spend(&key, "pay:x", "10").await.expect(200, None);
    assert_eq!(s.usage("win").await["lifetime_spent"], "30.00");

    // The lifetime cap does not reset.
    let lk = s
        .create(
            json!({"handle": "life", "scopes": ["pay:x"], "spending_cap": "10", "window": "1h", "lifetime_cap": "15"}),
        )
        .await
        .1;
    s.spend(&lk, "pay:x", "10").await.expect(200, None);
    s.advance(HOUR);
    s.spend(&lk, "pay:x", "5.01").await.err(402, "lifetime_cap_exceeded");
    let r = s.spend(&lk, "pay:x", "5").await;
    r.expect(200, None);
    assert_eq!(r.json["remaining"]["lifetime"], "0.00");
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let s = Srv::new().await;
    let key = s
        .create(json!({"handle": "rl", "scopes": ["pay:x"], "spending_cap": "100",
                              "rate_limit": {"requests": 2, "per": "1m"}}))
        .await
        .1;
    assert_eq!(s.agent_view("rl").await["rate_limit"]["requests"], 2);
    s.spend(&key, "pay:x", "1").await.expect(200, None);
    s.spend(&key, "pay:x", "1").await.expect(200, None);
    let r = s.spend(&key, "pay:x", "1").await;
    r.err(429, "rate_limited");
    assert_eq!(r.headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("30"));
    assert_eq!(r.json["error"]["retry_after"], 30);
    s.advance(29_999);
    let r = s.spend(&key, "pay:x", "1").await;
    r.err(429, "rate_limited");
    let ra: i64 = r.headers.get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
    assert!(ra >= 1, "Retry-After is at least one second");
    s.advance(1);
    s.spend(&key, "pay:x", "1").await.expect(200, None);
    let u = s.usage("rl").await;
    assert_eq!(u["window_spent"], "3.00", "a rate-limited request charges nothing");
    assert_eq!(u["tx_count"], 3);
    assert_eq!(u["denied_count"], 2);
}

#[tokio::test]
async fn idempotency_replays_the_first_answer_and_charges_once() {
    let s = Srv::new().await;
    let key = s.agent("idem", &["pay:x"], "10").await;
    let body = json!({"scope": "pay:x", "amount": "2.50"});
    let r1 = idem_spend(&s, &key, "k1", &body).await;
    r1.expect(200, None);
    assert!(r1.headers.get("idempotent-replayed").is_none());
    let r2 = idem_spend(&s, &key, "k1", &body).await;
    r2.expect(200, None);
    assert_eq!(r2.text, r1.text, "the replay is byte-for-byte the first answer");
    assert_eq!(r2.headers.get("idempotent-replayed").map(|v| v.as_bytes()), Some(&b"true"[..]));
    let u = s.usage("idem").await;
    assert_eq!(u["window_spent"], "2.50", "charged once");
    assert_eq!(u["tx_count"], 1);

    let diff = idem_spend(&s, &key, "k1", &json!({"scope": "pay:x", "amount": "2.51"})).await;
    diff.err(422, "idempotency_key_reused");
    let elsewhere =
        s.call("POST", "/v1/holds", &Auth::key(&key), &[("idempotency-key", b"k1")], body.to_string()).await;
    elsewhere.err(422, "idempotency_key_reused");
    assert_eq!(s.usage("idem").await["window_held"], "0.00");

    // A denial is stored and replayed too, even after the cap is raised.
    let big = json!({"scope": "pay:x", "amount": "9"});
    let d1 = idem_spend(&s, &key, "k2", &big).await;
    d1.err(402, "spending_cap_exceeded");
    s.json("PATCH", "/v1/agents/idem", &Auth::Admin, json!({"spending_cap": "100"})).await.expect(200, None);
    let d2 = idem_spend(&s, &key, "k2", &big).await;
    assert_eq!((d2.status, &d2.text), (402, &d1.text));
    idem_spend(&s, &key, "k3", &big).await.expect(200, None);

    // 255 characters is the longest key.
    let long = "x".repeat(255);
    let l1 = idem_spend(&s, &key, &long, &body).await;
    l1.expect(200, None);
    assert_eq!(idem_spend(&s, &key, &long, &body).await.text, l1.text);

    // Keys are per credential: another agent's k1 is its own.
    let k2 = s.agent("idem2", &["pay:x"], "10").await;
    let o = idem_spend(&s, &k2, "k1", &body).await;
    o.expect(200, None);
    assert_ne!(o.json["id"], r1.json["id"]);
    assert_eq!(s.usage("idem2").await["window_spent"], "2.50");

    // Holds and captures replay as well.
    let hb = json!({"scope": "pay:x", "amount": "1"});
    let h1 = s.call("POST", "/v1/holds", &Auth::key(&key), &[("idempotency-key", b"h1")], hb.to_string()).await;
    h1.expect(201, None);
    let h2 = s.call("POST", "/v1/holds", &Auth::key(&key), &[("idempotency-key", b"h1")], hb.to_string()).await;
    assert_eq!((h2.status, &h2.text), (201, &h1.text));
    assert_eq!(s.usage("idem").await["window_held"], "1.00", "held once");
    let hid = h1.json["id"].as_str().unwrap();
    let cpath = format!("/v1/holds/{hid}/capture");
    let c1 = s.call("POST", &cpath, &Auth::key(&key), &[("idempotency-key", b"c1")], r#"{"amount":"0.5"}"#).await;
    c1.expect(200, None);
    let c2 = s.call("POST", &cpath, &Auth::key(&key), &[("idempotency-key", b"c1")], r#"{"amount":"0.5"}"#).await;
    assert_eq!((c2.status, &c2.text), (200, &c1.text));
    s.json("POST", &cpath, &Auth::key(&key), json!({"amount": "0.5"})).await.err(409, "hold_closed");
    assert_eq!(s.usage("idem").await["window_spent"], "14.50");

    // After 24 hours the key is forgotten.
    s.advance(24 * HOUR + 1);
    let fresh = idem_spend(&s, &key, "k1", &json!({"scope": "pay:x", "amount": "1"})).await;
    fresh.expect(200, None);
    assert_eq!(s.usage("idem").await["window_spent"], "1.00");
}

#[tokio::test]
async fn a_revoked_key_gets_no_replay() {
    let s = Srv::new().await;
    let key = s.agent("ri", &["pay:x"], "10").await;
    let body = json!({"scope": "pay:x", "amount": "1"});
    idem_spend(&s, &key, "k1", &body).await.expect(200, None);
    s.call("POST", "/v1/agents/ri/revoke", &Auth::Admin, &[], "").await.expect(200, None);
    idem_spend(&s, &key, "k1", &body).await.err(401, "credential_revoked");
    let (_, ek) =
        s.create(json!({"handle": "ei", "scopes": ["pay:x"], "spending_cap": "10", "expires_in": "1m"})).await;
    idem_spend(&s, &ek, "k1", &body).await.expect(200, None);
    s.advance(60_000);
    idem_spend(&s, &ek, "k1", &body).await.err(401, "credential_expired");
}

#[tokio::test]
async fn me_and_my_audit() {
    let s = Srv::new().await;
    let key = s.agent("me", &["pay:x"], "50").await;
    let other = s.agent("other", &["pay:x"], "50").await;
    s.spend(&other, "pay:x", "3").await.expect(200, None);
    s.json("POST", "/v1/spend", &Auth::key(&key), json!({"scope": "pay:x", "amount": "12.50", "memo": "invoice 7"}))
        .await
        .expect(200, None);
    s.hold(&key, "pay:x", "1.00", None).await.expect(201, None);
    s.spend(&key, "pay:x", "40").await.err(402, "spending_cap_exceeded");
    s.spend(&key, "pay:y", "1").await.err(403, "scope_not_granted");

    let me = s.get("/v1/me", &Auth::key(&key)).await;
    me.expect(200, None);
    assert_eq!(me.json["handle"], "me");
    assert!(me.json.get("key").is_none());
    let u = &me.json["usage"];
    assert_eq!(u["window_spent"], "12.50");
    assert_eq!(u["window_held"], "1.00");
    assert_eq!(u["utilization"].as_f64(), Some(0.27));
    assert_eq!(u["tx_count"], 2);
    assert_eq!(u["denied_count"], 2);
    assert_eq!(me.json, s.agent_view("me").await, "/v1/me is the caller's agent object");

    let a = s.get("/v1/me/audit", &Auth::key(&key)).await;
    a.expect(200, None);
    let events = a.json["events"].as_array().unwrap().clone();
    assert!(events.iter().all(|e| e["agent"] == "me"), "only the caller's events");
    let actions: Vec<(&str, &str)> =
        events.iter().map(|e| (e["action"].as_str().unwrap(), e["outcome"].as_str().unwrap())).collect();
    assert_eq!(
        actions,
        [
            ("agent.create", "allowed"),
            ("spend", "allowed"),
            ("hold", "allowed"),
            ("spend", "denied"),
            ("spend", "denied")
        ]
    );
    assert_eq!(events[1]["amount"], "12.50");
    assert_eq!(events[1]["scope"], "pay:x");
    assert_eq!(events[3]["reason"], "spending_cap_exceeded");
    assert_eq!(events[3]["amount"], "40.00");
    assert_eq!(events[4]["reason"], "scope_not_granted");
    assert_eq!(events[4]["scope"], "pay:y");

    let p1 = s.get("/v1/me/audit?limit=2", &Auth::key(&key)).await;
    assert_eq!(p1.json["events"].as_array().unwrap().len(), 2);
    let last = p1.json["events"][1]["seq"].as_i64().unwrap();
    let p2 = s.get(&format!("/v1/me/audit?limit=2&after={last}"), &Auth::key(&key)).await;
    let mut paged: Vec<Value> = p1.json["events"].as_array().unwrap().clone();
    paged.extend(p2.json["events"].as_array().unwrap().iter().cloned());
    assert_eq!(paged, events[..4].to_vec());
    s.get("/v1/me/audit", &Auth::Admin).await.err(401, "invalid_credentials");
}

#[tokio::test]
async fn admin_audit_is_hash_chained_and_pages_by_seq() {
    let s = Srv::new().await;
    let key = s.agent("solo", &["pay:x"], "10").await;
    s.spend(&key, "pay:x", "2.5").await.expect(200, None);
    s.advance(1500);
    s.spend(&key, "pay:x", "0.000150").await.expect(200, None);
    s.spend(&key, "pay:x", "100").await.err(402, "per_tx_limit_exceeded");
    s.json("PATCH", "/v1/agents/solo", &Auth::Admin, json!({"spending_cap": "20"})).await.expect(200, None);
    s.call("POST", "/v1/agents/solo/keys", &Auth::Admin, &[], "").await.expect(201, None);

    let events = s.audit("solo").await;
    assert_eq!(events.len(), 6, "{events:?}");
    let mut prev = "0".repeat(64);
    for (i, e) in events.iter().enumerate() {
        for f in ["seq", "at", "agent", "action", "outcome", "reason", "scope", "amount", "hash", "prev_hash"] {
            assert!(e.get(f).is_some(), "event lacks {f}: {e}");
        }
        assert_eq!(e["seq"], i as i64 + 1);
        assert_eq!(e["agent"], "solo");
        assert!(e["outcome"] == "allowed" || e["outcome"] == "denied");
        let h = e["hash"].as_str().unwrap();
        assert!(h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(e["prev_hash"], prev, "event {i} links to the one before");
        prev = h.to_owned();
    }
    assert_eq!(events[0]["action"], "agent.create");
    assert_eq!(events[0]["at"], rfc3339(T0));
    assert_eq!(events[1]["amount"], "2.50");
    assert_eq!(events[2]["amount"], "0.00015");
    assert_eq!(events[2]["at"], rfc3339(T0 + 1500));
    assert_eq!((&events[3]["outcome"], &events[3]["reason"]), (&json!("denied"), &json!("per_tx_limit_exceeded")));
    assert_eq!(events[4]["action"], "agent.update");
    assert_eq!(events[5]["action"], "agent.rotate_key");

    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let r = s.get(&format!("/v1/agents/solo/audit?limit=2&after={after}"), &Auth::Admin).await;
        r.expect(200, None);
        let page = r.json["events"].as_array().unwrap().clone();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        after = page.last().unwrap()["seq"].as_i64().unwrap();
        seen.extend(page);
    }
    assert_eq!(seen, events);
    s.get("/v1/agents/nobody/audit", &Auth::Admin).await.err(404, "not_found");
    s.get("/v1/agents/solo/audit", &Auth::None).await.err(401, "invalid_credentials");
}

#[tokio::test]
async fn amounts_render_with_at_least_two_decimals() {
    let s = Srv::new().await;
    let (a, key) = s
        .create(json!({"handle": "amt", "scopes": ["pay:x"], "spending_cap": "50", "per_tx_limit": 20,
                       "lifetime_cap": "1000.5"}))
        .await;
    assert_eq!(
        (&a["spending_cap"], &a["per_tx_limit"], &a["lifetime_cap"]),
        (&json!("50.00"), &json!("20.00"), &json!("1000.50"))
    );
    let r = s.spend(&key, "pay:x", "2.5").await;
    assert_eq!(r.json["amount"], "2.50");
    assert_eq!(r.json["remaining"], json!({"window": "47.50", "lifetime": "998.00"}));
    let r = s.json("POST", "/v1/spend", &Auth::key(&key), json!({"scope": "pay:x", "amount": 0.000150})).await;
    r.expect(200, None);
    assert_eq!(r.json["amount"], "0.00015");
    // A JSON number is read from its text, never through a float.
    let r = s.call("POST", "/v1/spend", &Auth::key(&key), &[], r#"{"scope":"pay:x","amount":0.100001}"#).await;
    assert_eq!(r.json["amount"], "0.100001");
    let r = s.spend(&key, "pay:x", "007.10").await;
    assert_eq!(r.json["amount"], "7.10");
    let r = s.spend(&key, "pay:x", "1.000000").await;
    assert_eq!(r.json["amount"], "1.00");
    let u = s.usage("amt").await;
    assert_eq!(u["window_spent"], "10.700151");
    let max = s.create(json!({"handle": "max", "scopes": ["pay:x"], "spending_cap": "1000000000000"})).await;
    assert_eq!(max.0["spending_cap"], "1000000000000.00");
    s.spend(&max.1, "pay:x", "1000000000000").await.expect(200, None);
    s.spend(&max.1, "pay:x", "0.000001").await.err(402, "spending_cap_exceeded");
}

#[tokio::test]
async fn body_limit_is_one_mebibyte() {
    let s = Srv::new().await;
    let key = s.agent("big", &["pay:x"], "10").await;
    let mut body = br#"{"scope":"pay:x","amount":"1"}"#.to_vec();
    body.resize(1024 * 1024, b' ');
    s.call("POST", "/v1/spend", &Auth::key(&key), &[], body.clone()).await.expect(200, None);
    body.push(b' ');
    s.call("POST", "/v1/spend", &Auth::key(&key), &[], body).await.err(413, "body_too_large");
    assert_eq!(s.usage("big").await["window_spent"], "1.00");
}

#[tokio::test]
async fn no_answer_audit_event_metric_or_stored_row_carries_a_secret() {
    let s = Srv::new().await;
    let mut keys = Vec::new();
    let (_, root) =
        s.create(json!({"handle": "sec-root", "scopes": ["spawn:agents", "pay:*"], "spending_cap": "100"})).await;
    keys.push(root.clone());
    let c = s
        .json(
            "POST",
            "/v1/agents",
            &Auth::key(&root),
            json!({"handle": "sec-child", "scopes": ["pay:x"], "spending_cap": "10"}),
        )
        .await;
    c.expect(201, None);
    let child = c.json["key"].as_str().unwrap().to_owned();
    keys.push(child.clone());
    s.spend(&child, "pay:x", "1").await.expect(200, None);
    s.spend(&child, "pay:x", "100").await.err(402, "per_tx_limit_exceeded");
    let h = s.hold(&root, "pay:y", "2", None).await;
    s.json(
        "POST",
        &format!("/v1/holds/{}/capture", h.json["id"].as_str().unwrap()),
        &Auth::key(&root),
        json!({"amount": "1"}),
    )
    .await
    .expect(200, None);
    idem_spend(&s, &root, "secret-probe", &json!({"scope": "pay:z", "amount": "1"})).await.expect(200, None);
    idem_spend(&s, &root, "secret-probe", &json!({"scope": "pay:z", "amount": "1"})).await.expect(200, None);
    s.json("PATCH", "/v1/agents/sec-root", &Auth::Admin, json!({"labels": {"x": "y"}})).await.expect(200, None);
    let rot = s.call("POST", "/v1/agents/sec-root/keys", &Auth::Admin, &[], "").await;
    let root2 = rot.json["key"].as_str().unwrap().to_owned();
    keys.push(root2.clone());
    s.spend(&root, "pay:x", "1").await.err(401, "invalid_credentials");
    s.get("/v1/agents", &Auth::Admin).await.expect(200, None);
    s.get("/v1/agents/sec-child", &Auth::Admin).await.expect(200, None);
    s.get("/v1/me", &Auth::key(&root2)).await.expect(200, None);
    s.get("/v1/me/audit", &Auth::key(&child)).await.expect(200, None);
    s.get("/v1/agents/sec-root/audit", &Auth::Admin).await.expect(200, None);
    s.get("/v1/agents/sec-child/audit", &Auth::Admin).await.expect(200, None);
    s.call("POST", "/v1/agents/sec-child/revoke", &Auth::key(&root2), &[], "").await.expect(200, None);
    s.get("/v1/me", &Auth::key(&child)).await.err(401, "credential_revoked");
    s.get("/v1/agents", &Auth::key(&root2)).await.err(401, "invalid_credentials");
    s.get("/v1/agents", &Auth::Raw(format!("Bearer {ADMIN}x").into_bytes())).await.err(401, "invalid_credentials");
    let m = s.get("/metrics", &Auth::None).await;
    assert_eq!(m.status, 200);

    let seen = s.seen.lock().unwrap().clone();
    for body in &seen {
        assert!(!body.contains(ADMIN), "an answer carried the admin token: {body:.200}");
    }
    for k in &keys {
        let n: usize = seen.iter().map(|b| b.matches(k.as_str()).count()).sum();
        assert_eq!(n, 1, "a key must appear in exactly one answer, the one that issued it");
    }
    // Stored only as hashes: neither the database nor its WAL holds a key or the token.
    let db = s.db_bytes();
    assert!(!db.is_empty());
    let contains = |needle: &[u8]| db.windows(needle.len()).any(|w| w == needle);
    for k in &keys {
        assert!(!contains(k.as_bytes()), "a key is stored in clear");
    }
    assert!(!contains(ADMIN.as_bytes()), "the admin token is stored");
    let all_events = [s.audit("sec-root").await, s.audit("sec-child").await].concat();
    assert!(all_events.len() >= 8);
}

#[tokio::test]
async fn metrics_count_decisions_and_time_revocations() {
    let s = Srv::new().await;
    let key = s.agent("metrics-agent", &["pay:x"], "1").await;
    s.spend(&key, "pay:x", "0.5").await.expect(200, None);
    s.spend(&key, "pay:x", "1").await.err(402, "spending_cap_exceeded");
    s.call("POST", "/v1/agents/metrics-agent/revoke", &Auth::Admin, &[], "").await.expect(200, None);
    let m = s.get("/metrics", &Auth::None).await;
    assert_eq!(m.status, 200);
    let ct = m.headers.get("content-type").unwrap().to_str().unwrap();
    assert!(ct.starts_with("text/plain"), "{ct}");
    let line = |pred: &dyn Fn(&str) -> bool| m.text.lines().find(|l| pred(l)).map(str::to_owned);
    let allowed = line(&|l| {
        l.starts_with("bulkhead_decisions_total{")
            && l.contains(r#"agent="metrics-agent""#)
            && l.contains(r#"outcome="allowed""#)
    })
    .unwrap_or_else(|| panic!("no allowed decision metric:\n{}", m.text));
    assert!(allowed.ends_with(" 1"), "{allowed}");
    let denied = line(&|l| {
        l.starts_with("bulkhead_decisions_total{")
            && l.contains(r#"agent="metrics-agent""#)
            && l.contains(r#"outcome="denied""#)
            && l.contains(r#"reason="spending_cap_exceeded""#)
    })
    .unwrap_or_else(|| panic!("no denied decision metric:\n{}", m.text));
    assert!(denied.ends_with(" 1"), "{denied}");
    assert!(m.text.lines().any(|l| l.starts_with("# TYPE bulkhead_revocation_seconds histogram")), "{}", m.text);
    let count = line(&|l| l.starts_with("bulkhead_revocation_seconds_count"))
        .unwrap_or_else(|| panic!("no revocation histogram:\n{}", m.text));
    let n: f64 = count.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 1.0, "{count}");
    assert!(!m.text.contains(&key) && !m.text.contains(ADMIN));
}

#[tokio::test]
async fn the_default_breaker_suspends_after_50_denials_in_60s_and_never_on_allowed_traffic() {
    let s = Srv::new().await;
    let key = s.agent("loop", &["pay:x"], "100").await;
    for _ in 0..200 {
        s.spend(&key, "pay:x", "0.01").await.expect(200, None);
    }
    assert_eq!(s.agent_view("loop").await["status"], "active", "allowed traffic never trips the breaker");
    // 49 denials, then a minute passes: the count starts again.
    for _ in 0..49 {
        s.spend(&key, "pay:x", "101").await.err(402, "per_tx_limit_exceeded");
    }
    s.advance(60_000);
    for _ in 0..49 {
        s.spend(&key, "pay:x", "101").await.err(402, "per_tx_limit_exceeded");
    }
    assert_eq!(s.agent_view("loop").await["status"], "active");
    s.spend(&key, "pay:x", "101").await.err(402, "per_tx_limit_exceeded");
    let v = s.agent_view("loop").await;
    assert_eq!(v["status"], "suspended", "the 50th denial within 60 s suspends");
    s.spend(&key, "pay:x", "0.01").await.err(403, "agent_suspended");
    assert!(s.audit("loop").await.iter().any(|e| e["action"] == "agent.suspend"));
    s.call("POST", "/v1/agents/loop/resume", &Auth::Admin, &[], "").await.expect(200, None);
    s.spend(&key, "pay:x", "0.01").await.expect(200, None);
    assert_eq!(s.usage("loop").await["window_spent"], "2.01");
}
