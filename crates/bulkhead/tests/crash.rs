//! kill -9 under a mixed load — spends, holds with their captures and releases, a revocation and
//! gateway calls — on both stores, through the real binary and a real upstream process. After
//! the restart every acknowledged movement is there, no hold is lost or doubled, the counters
//! equal the audit trail, and the gateway lease the crash left open is captured in full when it
//! expires (waited for: `max_duration` plus the hold's one-minute margin).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// What each client saw acknowledged.
#[derive(Default)]
struct Acked {
    spends: Vec<(String, i64)>,
    /// hold id → amount
    holds: HashMap<String, i64>,
    /// hold id → captured amount
    captures: HashMap<String, i64>,
    releases: HashSet<String>,
    gateway_calls: usize,
}

async fn mixed_kill_9(mut b: Backend) {
    let (_mock, mock) = start_mock_upstream().await;
    let cfg = b.scratch("crash.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[upstream]]\nname = \"tool\"\nbase_url = \"{mock}\"\nscope = \"tools:x\"\n\
             max_cost_per_request = \"0.01\"\npricing = {{ kind = \"per_request\", price = \"0.01\" }}\n\
             max_duration = \"5s\"\n"
        ),
    )
    .expect("write config");
    b.config = Some(cfg);
    let mut srv = Server::start(&b).await;
    let api = srv.api();
    let spender = api.create(ADMIN, root_agent("cr-spend", "1000000", &[SCOPE])).await;
    let holder = api.create(ADMIN, root_agent("cr-hold", "1000000", &[SCOPE])).await;
    let caller = api.create(ADMIN, root_agent("cr-gw", "1000000", &["tools:x"])).await;
    let doomed = api.create(ADMIN, root_agent("cr-doomed", "1000", &[SCOPE])).await;

    let progress = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..24usize {
        let (api, progress) = (api.clone(), progress.clone());
        let (spender, holder, caller) = (spender.clone(), holder.clone(), caller.clone());
        let http = reqwest::Client::builder().no_proxy().build().expect("client");
        tasks.push(tokio::spawn(async move {
            let mut acked = Acked::default();
            for n in 0..100_000usize {
                let amt = ((c * 31 + n * 7) % 97 + 1) as i64 * 10_000;
                let gone = match c % 3 {
                    0 => match api.try_spend(&spender, &amount(amt)).await {
                        Ok(r) if r.status == 200 => {
                            acked.spends.push((r.str("id").to_owned(), amt));
                            false
                        }
                        Ok(r) => panic!("spend: {} {}", r.status, r.body),
                        Err(_) => true,
                    },
                    1 => {
                        let r =
                            api.try_post("/v1/holds", &holder, &json!({"scope": SCOPE, "amount": amount(amt)})).await;
                        match r {
                            Ok(r) if r.status == 201 => {
                                let id = r.str("id").to_owned();
                                acked.holds.insert(id.clone(), amt);
                                // Every other hold is captured in part, the rest released.
                                let (path, body) = if n % 2 == 0 {
                                    (format!("/v1/holds/{id}/capture"), json!({"amount": amount(amt / 2)}))
                                } else {
                                    (format!("/v1/holds/{id}/release"), json!({}))
                                };
                                match api.try_post(&path, &holder, &body).await {
                                    Ok(r) if r.status == 200 && n % 2 == 0 => {
                                        acked.captures.insert(id, amt / 2);
                                        false
                                    }
                                    Ok(r) if r.status == 200 => {
                                        acked.releases.insert(id);
                                        false
                                    }
                                    Ok(r) => panic!("settle: {} {}", r.status, r.body),
                                    Err(_) => true,
                                }
                            }
                            Ok(r) => panic!("hold: {} {}", r.status, r.body),
                            Err(_) => true,
                        }
                    }
                    _ => {
                        let r = http.get(format!("{}/proxy/tool/v1/ping", api.base)).bearer_auth(&caller).send().await;
                        match r {
                            Ok(r) if r.status().is_success() => match r.bytes().await {
                                Ok(_) => {
                                    acked.gateway_calls += 1;
                                    false
                                }
                                Err(_) => true,
                            },
                            Ok(r) => panic!("gateway: {}", r.status()),
                            Err(_) => true,
                        }
                    }
                };
                if gone {
                    break; // the server died; this request's outcome is unknown
                }
                progress.fetch_add(1, Ordering::SeqCst);
            }
            acked
        }));
    }
    let mut waited = 0;
    while progress.load(Ordering::SeqCst) < 600 {
        waited += 1;
        assert!(waited < 6_000, "the load never got going\n{}", srv.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = api.post("/v1/agents/cr-doomed/revoke", ADMIN, &json!({"reason": "mid-load"})).await;
    assert_eq!(r.status, 200);
    while progress.load(Ordering::SeqCst) < 1_200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One more gateway call that the upstream holds for a minute: once the upstream has it, its
    // slot is out, so a lease is certainly open when the server dies.
    let seen = || async {
        let v: Value = reqwest::get(format!("{mock}/__stats")).await.unwrap().json().await.unwrap();
        v["calls"].as_u64().unwrap()
    };
    let before = seen().await;
    let slow = tokio::spawn({
        let (base, caller) = (api.base.clone(), caller.clone());
        async move {
            let c = reqwest::Client::builder().no_proxy().build().expect("client");
            let _ = c
                .get(format!("{base}/proxy/tool/v1/slow"))
                .bearer_auth(&caller)
                .header("x-mock-delay-ms", "60000")
                .send()
                .await;
        }
    });
    let mut waited = 0;
    while seen().await <= before {
        waited += 1;
        assert!(waited < 2_000, "the slow call never reached the upstream");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    srv.kill9();
    slow.abort();
    let mut all = Acked::default();
    for t in tasks {
        let a = t.await.expect("client task");
        all.spends.extend(a.spends);
        all.holds.extend(a.holds);
        all.captures.extend(a.captures);
        all.releases.extend(a.releases);
        all.gateway_calls += a.gateway_calls;
    }
    assert!(!all.spends.is_empty() && !all.captures.is_empty() && !all.releases.is_empty() && all.gateway_calls > 0);

    let srv = Server::start(&b).await;
    let api = srv.api();

    // Spends: every acknowledged one is audited, and the counters equal the audit.
    let events = api.audit(ADMIN, "cr-spend").await;
    let spent: HashMap<String, i64> = events
        .iter()
        .filter(|e| e["action"] == "spend" && e["outcome"] == "allowed")
        .map(|e| (e["ref"].as_str().unwrap().to_owned(), micros_of(&e["amount"])))
        .collect();
    for (id, amt) in &all.spends {
        assert_eq!(spent.get(id), Some(amt), "acknowledged spend {id}");
    }
    let a = api.agent(ADMIN, "cr-spend").await;
    assert_eq!(usage(&a, "window_spent"), spent.values().sum::<i64>());

    // Holds: every acknowledged hold, capture and release is there; each hold closed at most
    // once; what is still held is exactly the holds neither captured nor released.
    let events = api.audit(ADMIN, "cr-hold").await;
    let granted: HashMap<String, i64> = events
        .iter()
        .filter(|e| e["action"] == "hold" && e["outcome"] == "allowed")
        .map(|e| (e["ref"].as_str().unwrap().to_owned(), micros_of(&e["amount"])))
        .collect();
    let mut closed: HashMap<String, usize> = HashMap::new();
    let mut captured = 0i64;
    for e in events.iter().filter(|e| e["outcome"] == "allowed") {
        if e["action"] == "capture" || e["action"] == "release" {
            *closed.entry(e["ref"].as_str().unwrap().to_owned()).or_default() += 1;
        }
        if e["action"] == "capture" {
            captured += micros_of(&e["amount"]);
        }
    }
    for (id, amt) in &all.holds {
        assert_eq!(granted.get(id), Some(amt), "acknowledged hold {id}");
    }
    for (id, amt) in &all.captures {
        assert_eq!(closed.get(id), Some(&1), "acknowledged capture {id}");
        let ev = events.iter().find(|e| e["action"] == "capture" && e["ref"] == id.as_str()).unwrap();
        assert_eq!(micros_of(&ev["amount"]), *amt);
    }
    for id in &all.releases {
        assert_eq!(closed.get(id), Some(&1), "acknowledged release {id}");
    }
    assert!(closed.values().all(|n| *n == 1), "no hold closed twice");
    let open: i64 = granted.iter().filter(|(id, _)| !closed.contains_key(*id)).map(|(_, a)| a).sum();
    let a = api.agent(ADMIN, "cr-hold").await;
    assert_eq!(usage(&a, "window_held"), open, "held = the holds neither captured nor released");
    assert_eq!(usage(&a, "window_spent"), captured);

    // The revocation acknowledged before the crash holds.
    assert_eq!(api.agent(ADMIN, "cr-doomed").await["status"], "revoked");
    assert_eq!(api.try_spend(&doomed, "1").await.unwrap().status, 401);

    // The gateway: its lease was left open by the crash; at its expiry it is captured in full,
    // so every call that was made is paid for.
    let price = micros("0.01");
    // Reads count an expired lease as spent at once; the sweeper then captures it for good.
    let mut settled = None;
    for _ in 0..1_500 {
        let a = api.agent(ADMIN, "cr-gw").await;
        if usage(&a, "window_held") == 0 && api.audit(ADMIN, "cr-gw").await.iter().any(|e| e["action"] == "hold.expire")
        {
            settled = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = settled.expect("the crashed lease expired and was captured");
    let spent = usage(&a, "window_spent");
    let mock_calls: u64 =
        reqwest::get(format!("{mock}/__stats")).await.unwrap().json::<Value>().await.unwrap()["calls"]
            .as_u64()
            .unwrap();
    let events = api.audit(ADMIN, "cr-gw").await;
    assert!(
        spent >= all.gateway_calls as i64 * price,
        "every acknowledged call paid: spent {spent}, {} calls acknowledged, {mock_calls} reached the upstream\n{}",
        all.gateway_calls,
        events
            .iter()
            .map(|e| format!("{} {} {} {}", e["action"], e["outcome"], e["amount"], e["detail"]))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        events.iter().any(|e| e["action"] == "hold.expire" && e["detail"].to_string().contains("captured")),
        "the lease was captured at its expiry: {:?}",
        events.iter().map(|e| e["action"].clone()).collect::<Vec<Value>>()
    );
    b.assert_audit_intact().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_kill_9_under_a_mixed_load() {
    mixed_kill_9(Backend::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_kill_9_under_a_mixed_load() {
    let Some(b) = Backend::pg().await else { return };
    mixed_kill_9(b).await;
}
