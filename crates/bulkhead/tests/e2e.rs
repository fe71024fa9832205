//! End-to-end tests: the real `bulkhead` binary, real HTTP on loopback, the SQLite store and a
//! fresh PostgreSQL database per test.
//!
//! What they hold the product to (contract §1, §4, §5, §6): caps are never overspent under
//! concurrency (own caps, ancestor caps, holds); every 2xx survives `kill -9`; a cascade revoke
//! cuts off every request sent after it answered; SIGTERM drains in-flight requests and exits 0;
//! replicas sharing one database agree at once; a generated admin token is never printed.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{ADMIN, Api, Backend, SCOPE, Server, amount, micros, micros_of, refs, root_agent, usage};
use serde_json::{Value, json};
use tokio::sync::Barrier;

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
    cap_race,
    ancestor_cap_race,
    hold_race,
    kill_9_under_load,
    spends_racing_cascade_revoke,
    sigterm_drains_in_flight,
    generated_admin_token,
);

/// One client's view of a spend race.
#[derive(Default)]
struct Seen {
    /// (id, amount, remaining.window) of every spend the client was told was allowed.
    allowed: Vec<(String, i64, i64)>,
    /// The error codes of the denials.
    denied: Vec<String>,
}

/// `clients` clients, each bound to `(api, key)` = `targets[i % targets.len()]`, start together
/// and spend `amt` until their first denial (at most `attempts` spends each).
async fn spend_race(targets: &[(Api, String)], clients: usize, amt: &str, attempts: usize) -> Vec<Seen> {
    let barrier = Arc::new(Barrier::new(clients));
    let mut tasks = Vec::new();
    for i in 0..clients {
        let (api, key) = targets[i % targets.len()].clone();
        let barrier = barrier.clone();
        let amt = amt.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            barrier.wait().await;
            for _ in 0..attempts {
                let r = api.try_spend(&key, &amt).await.expect("spend request");
                match r.status {
                    200 => {
                        assert_eq!(micros_of(&r.body["amount"]), micros(&amt), "allowed spend echoes its amount");
                        seen.allowed.push((
                            r.str("id").to_owned(),
                            micros_of(&r.body["amount"]),
                            micros_of(&r.body["remaining"]["window"]),
                        ));
                    }
                    402 => {
                        seen.denied.push(r.code().to_owned());
                        break;
                    }
                    other => panic!("unexpected answer to a spend: {other} {}", r.body),
                }
            }
            seen
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("client task"));
    }
    out
}

/// Every allowed spend told to a client is in the audit as an allowed `spend` with that `ref`,
/// and nothing else is: the ledger and what clients were told agree exactly.
fn assert_audit_matches(events: &[Value], told: &HashSet<String>) {
    let audited = refs(events, "spend");
    assert_eq!(audited.len(), told.len(), "allowed spend events vs spends clients were told were allowed");
    assert_eq!(&audited, told, "audit refs differ from the ids clients were told");
}

/// (1a) 64 clients race one agent's cap.
async fn cap_race(b: Backend) {
    let srv = Server::start(&b).await;
    let api = srv.api();
    // 25.00 / 0.25 = exactly 100 allowed spends out of up to 64 × 20 attempts.
    let (cap, amt) = (micros("25.00"), "0.25");
    let key = api.create(ADMIN, root_agent("racer", "25.00", &[SCOPE])).await;

    let seen = spend_race(&[(api.clone(), key)], 64, amt, 20).await;

    let allowed: Vec<&(String, i64, i64)> = seen.iter().flat_map(|s| &s.allowed).collect();
    let denied: Vec<&String> = seen.iter().flat_map(|s| &s.denied).collect();
    let told_sum: i64 = allowed.iter().map(|a| a.1).sum();
    let expected = (cap / micros(amt)) as usize;
    assert_eq!(allowed.len(), expected, "allowed count must be exactly floor(cap / amount)");
    assert!(!denied.is_empty(), "the cap was never hit");
    assert!(denied.iter().all(|c| *c == "spending_cap_exceeded"), "unexpected denial codes: {denied:?}");

    // Each allowed spend saw a distinct remaining balance: cap - k·amount for k = 1..=n, so the
    // decisions were serialised, none was lost and none was double-counted.
    let mut remaining: Vec<i64> = allowed.iter().map(|a| a.2).collect();
    remaining.sort_unstable();
    let want: Vec<i64> = (1..=expected as i64).rev().map(|k| cap - k * micros(amt)).collect();
    assert_eq!(remaining, want, "remaining balances told to clients");

    let agent = api.agent(ADMIN, "racer").await;
    let spent = usage(&agent, "window_spent");
    assert!(spent <= cap, "overspend: spent {spent} > cap {cap}");
    assert_eq!(spent, told_sum, "window_spent must equal the sum clients were told was allowed");
    assert_eq!(usage(&agent, "lifetime_spent"), told_sum);
    assert_eq!(usage(&agent, "window_held"), 0);
    assert_eq!(agent["usage"]["tx_count"], json!(expected));
    assert_eq!(agent["usage"]["denied_count"], json!(denied.len()));

    let told: HashSet<String> = allowed.iter().map(|a| a.0.clone()).collect();
    assert_eq!(told.len(), allowed.len(), "spend ids are unique");
    let events = api.audit(ADMIN, "racer").await;
    assert_audit_matches(&events, &told);
    let audited_denials = events.iter().filter(|e| e["action"] == "spend" && e["outcome"] == "denied").count();
    assert_eq!(audited_denials, denied.len(), "every denial is audited");
    b.assert_audit_intact().await;
}

/// (1b) Clients of eight children race their parent's cap, which is below the sum of theirs.
async fn ancestor_cap_race(b: Backend) {
    let srv = Server::start(&b).await;
    let api = srv.api();
    let (parent_cap, amt) = (micros("10.00"), "0.25");
    let child_cap = micros("4.00");
    let parent = api.create(ADMIN, root_agent("fleet", "10.00", &[SCOPE, "spawn:agents"])).await;
    let mut targets = Vec::new();
    for c in 0..8 {
        // 8 × 4.00 = 32.00 > 10.00: the parent's cap is what must stop them.
        let key = api.create(&parent, root_agent(&format!("fleet-child-{c}"), "4.00", &[SCOPE])).await;
        targets.push((api.clone(), key));
    }
    let keys: Vec<String> = targets.iter().map(|t| t.1.clone()).collect();

    let seen = spend_race(&targets, 64, amt, 30).await;

    let mut per_child = [0i64; 8];
    let mut per_child_ids: Vec<HashSet<String>> = vec![HashSet::new(); 8];
    for (i, s) in seen.iter().enumerate() {
        for a in &s.allowed {
            per_child[i % 8] += a.1;
            per_child_ids[i % 8].insert(a.0.clone());
        }
    }
    let allowed: usize = seen.iter().map(|s| s.allowed.len()).sum();
    let told_sum: i64 = per_child.iter().sum();
    let denied: Vec<&String> = seen.iter().flat_map(|s| &s.denied).collect();
    assert!(
        denied.iter().all(|c| *c == "ancestor_cap_exceeded" || *c == "spending_cap_exceeded"),
        "unexpected denial codes: {denied:?}"
    );
    assert!(denied.iter().any(|c| *c == "ancestor_cap_exceeded"), "the parent's cap was never what denied");
    // Every client stops only at a denial; the children together could take 32.00, so the
    // parent's cap must have been reached exactly.
    assert_eq!(
        allowed,
        (parent_cap / micros(amt)) as usize,
        "allowed count must be exactly floor(parent cap / amount)"
    );

    let p = api.agent(ADMIN, "fleet").await;
    let parent_spent = usage(&p, "window_spent");
    assert!(parent_spent <= parent_cap, "ancestor overspend: {parent_spent} > {parent_cap}");
    assert_eq!(parent_spent, told_sum, "parent's window_spent must equal the sum clients were told");
    assert_eq!(usage(&p, "window_held"), 0);
    for c in 0..8 {
        let h = format!("fleet-child-{c}");
        let a = api.agent(ADMIN, &h).await;
        let spent = usage(&a, "window_spent");
        assert!(spent <= child_cap, "{h} overspent: {spent}");
        assert_eq!(spent, per_child[c], "{h}: window_spent vs what its clients were told");
        assert_eq!(a["parent"], json!("fleet"));
        assert_audit_matches(&api.audit(ADMIN, &h).await, &per_child_ids[c]);
    }
    // Denied spends charged nothing: one more spend by any child is still refused, and the
    // totals did not move.
    let r = api.try_spend(&keys[0], amt).await.expect("spend");
    assert_eq!(r.status, 402, "a full parent must refuse: {}", r.body);
    assert_eq!(usage(&api.agent(ADMIN, "fleet").await, "window_spent"), told_sum);
    b.assert_audit_intact().await;
}

/// (1c) 64 clients race one cap with holds, each captured in part.
async fn hold_race(b: Backend) {
    let srv = Server::start(&b).await;
    let api = srv.api();
    let (cap, hold, capture) = (micros("20.00"), micros("1.00"), micros("0.40"));
    let key = api.create(ADMIN, root_agent("holder", "20.00", &[SCOPE])).await;

    // A watcher reads the agent while the race runs: spent + held never exceeds the cap.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (api, done) = (api.clone(), done.clone());
        tokio::spawn(async move {
            let mut reads = 0usize;
            for _ in 0..100_000 {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                let a = api.agent(ADMIN, "holder").await;
                let used = usage(&a, "window_spent") + usage(&a, "window_held");
                assert!(used <= cap, "spent + held = {used} above the cap {cap}: {a}");
                reads += 1;
            }
            reads
        })
    };

    let barrier = Arc::new(Barrier::new(64));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (api, key, barrier) = (api.clone(), key.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut captured: Vec<(String, i64)> = Vec::new();
            for _ in 0..2_000 {
                let r = api
                    .try_post("/v1/holds", &key, &json!({"scope": SCOPE, "amount": amount(hold)}))
                    .await
                    .expect("hold request");
                match r.status {
                    201 => {
                        assert_eq!(micros_of(&r.body["amount"]), hold);
                        let id = r.str("id").to_owned();
                        let c = api
                            .post(&format!("/v1/holds/{id}/capture"), &key, &json!({"amount": amount(capture)}))
                            .await;
                        assert_eq!(c.status, 200, "capture: {}", c.body);
                        assert_eq!(micros_of(&c.body["captured"]), capture);
                        assert_eq!(micros_of(&c.body["released"]), hold - capture);
                        captured.push((id, capture));
                    }
                    402 => {
                        assert_eq!(r.code(), "spending_cap_exceeded", "{}", r.body);
                        // Denied while others' holds are open; stop only once no hold could
                        // ever fit again (spent alone leaves less than one hold of room).
                        let a = api.agent(ADMIN, "holder").await;
                        if usage(&a, "window_spent") + hold > cap {
                            return (captured, true);
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    other => panic!("unexpected answer to a hold: {other} {}", r.body),
                }
            }
            (captured, false)
        }));
    }
    let mut captured = Vec::new();
    let mut finished = 0;
    for t in tasks {
        let (c, done_by_cap) = t.await.expect("client task");
        captured.extend(c);
        finished += usize::from(done_by_cap);
    }
    done.store(true, Ordering::SeqCst);
    let reads = watcher.await.expect("watcher");
    assert!(reads > 0, "the watcher never read the agent");
    assert!(finished > 0, "no client saw the cap reached");

    // A hold fits while spent + held + 1.00 <= 20.00 and every hold becomes 0.40 spent, so
    // exactly floor((20.00 - 1.00) / 0.40) + 1 = 48 holds can ever be granted.
    let expected = ((cap - hold) / capture + 1) as usize;
    assert_eq!(captured.len(), expected, "granted holds");
    let told_sum: i64 = captured.iter().map(|c| c.1).sum();
    let a = api.agent(ADMIN, "holder").await;
    assert_eq!(usage(&a, "window_spent"), told_sum, "window_spent vs captures told to clients");
    assert_eq!(usage(&a, "lifetime_spent"), told_sum);
    assert_eq!(usage(&a, "window_held"), 0, "every hold was closed");
    assert!(told_sum <= cap);

    let events = api.audit(ADMIN, "holder").await;
    let told: HashSet<String> = captured.iter().map(|c| c.0.clone()).collect();
    assert_eq!(refs(&events, "hold"), told, "granted holds in the audit");
    assert_eq!(refs(&events, "capture"), told, "captures in the audit");
    b.assert_audit_intact().await;
}

/// (2) kill -9 in the middle of a spend load: every acknowledged spend survives.
async fn kill_9_under_load(b: Backend) {
    let mut srv = Server::start(&b).await;
    let api = srv.api();
    let key = api.create(ADMIN, root_agent("durable", "1000000.00", &[SCOPE])).await;

    let acked = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..32usize {
        let (api, key, acked) = (api.clone(), key.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok: Vec<(String, i64)> = Vec::new();
            let mut other: Vec<String> = Vec::new();
            for n in 0..20_000usize {
                // Varying amounts (0.01 .. 0.97), so sums check more than counts.
                let amt = amount(((c * 31 + n * 7) % 97 + 1) as i64 * 10_000);
                match api.try_spend(&key, &amt).await {
                    Ok(r) if r.status == 200 => {
                        assert_eq!(micros_of(&r.body["amount"]), micros(&amt));
                        ok.push((r.str("id").to_owned(), micros(&amt)));
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => other.push(format!("{} {}", r.status, r.body)),
                    Err(_) => break, // the server is gone; this one's outcome is unknown
                }
            }
            (ok, other)
        }));
    }
    // Let the load run until plenty of spends were acknowledged, then kill -9 mid-stream.
    let mut waited = 0;
    while acked.load(Ordering::SeqCst) < 400 {
        waited += 1;
        assert!(waited < 6_000, "the load never got going\n{}", srv.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    srv.kill9();
    let mut acks: Vec<(String, i64)> = Vec::new();
    for t in tasks {
        let (ok, other) = t.await.expect("client task");
        assert!(other.is_empty(), "non-2xx answers before the kill: {other:?}");
        acks.extend(ok);
    }
    assert!(acks.len() >= 400);
    let acked_sum: i64 = acks.iter().map(|a| a.1).sum();

    // Restart on the same data dir / database.
    let srv = Server::start(&b).await;
    let api = srv.api();
    let a = api.agent(ADMIN, "durable").await;
    let spent = usage(&a, "window_spent");
    assert!(spent >= acked_sum, "acknowledged spends lost: window_spent {spent} < acknowledged {acked_sum}");

    let events = api.audit(ADMIN, "durable").await;
    let mut audited: HashMap<String, i64> = HashMap::new();
    for e in events.iter().filter(|e| e["action"] == "spend" && e["outcome"] == "allowed") {
        audited.insert(e["ref"].as_str().expect("ref").to_owned(), micros_of(&e["amount"]));
    }
    for (id, amt) in &acks {
        assert_eq!(audited.get(id), Some(amt), "acknowledged spend {id} missing from the audit after kill -9");
    }
    // Counters and audit committed together: no half-written spend either way.
    let audited_sum: i64 = audited.values().sum();
    assert_eq!(spent, audited_sum, "window_spent vs the allowed spends in the audit");
    assert_eq!(usage(&a, "lifetime_spent"), audited_sum);
    assert_eq!(a["usage"]["tx_count"], json!(audited.len()));

    b.assert_audit_intact().await;
    // The offline export (read while the server runs) has every acknowledged spend as well.
    let exported = refs(&b.export("durable").await, "spend");
    assert!(acks.iter().all(|(id, _)| exported.contains(id)), "audit export misses acknowledged spends");
    // And the restarted server keeps working.
    let r = api.try_spend(&key, "1.00").await.expect("spend after restart");
    assert_eq!(r.status, 200, "{}", r.body);
}

/// (3) Child keys spend while the admin revokes their parent.
async fn spends_racing_cascade_revoke(b: Backend) {
    let srv = Server::start(&b).await;
    let api = srv.api();
    let parent = api.create(ADMIN, root_agent("boss", "100000.00", &[SCOPE, "spawn:agents"])).await;
    let mut keys = Vec::new();
    for c in 0..4 {
        keys.push(api.create(&parent, root_agent(&format!("boss-kid-{c}"), "10000.00", &[SCOPE])).await);
    }

    let revoked = Arc::new(AtomicBool::new(false));
    let allowed_count = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..32usize {
        let (api, key) = (api.clone(), keys[i % 4].clone());
        let (revoked, allowed_count) = (revoked.clone(), allowed_count.clone());
        tasks.push(tokio::spawn(async move {
            // (sent after the revoke answered?, status, code, spend id)
            let mut log: Vec<(bool, u16, String, Option<String>)> = Vec::new();
            let mut after = 0;
            for _ in 0..20_000 {
                let sent_after = revoked.load(Ordering::SeqCst);
                let r = api.try_spend(&key, "0.01").await.expect("spend request");
                if r.status == 200 {
                    allowed_count.fetch_add(1, Ordering::SeqCst);
                }
                let id = (r.status == 200).then(|| r.str("id").to_owned());
                log.push((sent_after, r.status, r.code().to_owned(), id));
                if sent_after {
                    after += 1;
                    if after >= 8 {
                        break;
                    }
                }
            }
            (i % 4, log)
        }));
    }
    let mut waited = 0;
    while allowed_count.load(Ordering::SeqCst) < 100 {
        waited += 1;
        assert!(waited < 6_000, "the spends never got going\n{}", srv.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = api.post("/v1/agents/boss/revoke", ADMIN, &json!({"reason": "e2e cascade"})).await;
    revoked.store(true, Ordering::SeqCst);
    assert_eq!(r.status, 200, "revoke: {}", r.body);
    let mut list: Vec<String> =
        r.body["revoked"].as_array().expect("revoked list").iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    list.sort();
    assert_eq!(list, ["boss", "boss-kid-0", "boss-kid-1", "boss-kid-2", "boss-kid-3"]);

    let mut told: Vec<HashSet<String>> = vec![HashSet::new(); 4];
    let mut sent_after = 0;
    for t in tasks {
        let (child, log) = t.await.expect("client task");
        for (after, status, code, id) in log {
            if after {
                sent_after += 1;
                assert_eq!(
                    (status, code.as_str()),
                    (401, "credential_revoked"),
                    "a spend sent after the revoke answered"
                );
            } else {
                assert!(
                    status == 200 || (status, code.as_str()) == (401, "credential_revoked"),
                    "unexpected answer {status} {code}"
                );
            }
            if let Some(id) = id {
                told[child].insert(id);
            }
        }
    }
    assert!(sent_after >= 32 * 8, "not every client sent after the revoke");

    let mut told_sum = 0;
    for (c, ids) in told.iter().enumerate() {
        let h = format!("boss-kid-{c}");
        let events = api.audit(ADMIN, &h).await;
        let rev: Vec<&Value> = events.iter().filter(|e| e["action"] == "agent.revoke").collect();
        assert_eq!(rev.len(), 1, "{h} has one revoke event");
        let (rev_seq, rev_at) = (rev[0]["seq"].as_i64().unwrap(), common::at_nanos(rev[0]));
        for e in events.iter().filter(|e| e["action"] == "spend" && e["outcome"] == "allowed") {
            assert!(common::at_nanos(e) <= rev_at, "{h}: allowed spend {e} is later than its revoke {}", rev[0]);
            assert!(e["seq"].as_i64().unwrap() < rev_seq, "{h}: allowed spend {e} after the revoke in the chain");
        }
        for e in events.iter().filter(|e| e["action"] == "spend" && e["outcome"] == "denied") {
            assert_eq!(e["reason"], "credential_revoked", "{e}");
        }
        assert_audit_matches(&events, ids);
        let a = api.agent(ADMIN, &h).await;
        assert_eq!(a["status"], "revoked");
        assert_eq!(usage(&a, "window_spent"), ids.len() as i64 * micros("0.01"));
        told_sum += ids.len() as i64 * micros("0.01");
    }
    assert_eq!(usage(&api.agent(ADMIN, "boss").await, "window_spent"), told_sum);
    // The parent's own key is cut off too.
    let r = api.try_spend(&parent, "0.01").await.expect("spend");
    assert_eq!((r.status, r.code()), (401, "credential_revoked"));
    b.assert_audit_intact().await;
}

/// Reads from `s` until `needle` appears (bounded), returning everything read.
async fn read_until(s: &mut tokio::net::TcpStream, needle: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    for _ in 0..10_000 {
        if buf.windows(needle.len()).any(|w| w == needle) {
            return buf;
        }
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut chunk))
            .await
            .expect("hang guard: the server went silent")
            .expect("read");
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf
}

/// (4) SIGTERM: in-flight requests complete, the process exits 0, acknowledged spends persist.
async fn sigterm_drains_in_flight(b: Backend) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut srv = Server::start(&b).await;
    let api = srv.api();
    let key = api.create(ADMIN, root_agent("graceful", "1000000.00", &[SCOPE])).await;

    // A request that is provably in flight: its headers were read and the handler asked for
    // the body (the server answered `100 Continue`), but the body is only sent after SIGTERM.
    let body = json!({"scope": SCOPE, "amount": "7.77", "memo": "in flight at SIGTERM"}).to_string();
    let addr = srv.base.trim_start_matches("http://").to_owned();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    let head = format!(
        "POST /v1/spend HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.expect("write head");
    let got = read_until(&mut sock, b"\r\n\r\n").await;
    assert!(got.starts_with(b"HTTP/1.1 100"), "expected 100 Continue, got {:?}", String::from_utf8_lossy(&got));

    // Background load, also in flight when the signal lands.
    let acked = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (api, key, acked) = (api.clone(), key.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = Vec::new();
            let mut other = Vec::new();
            for _ in 0..20_000 {
                match api.try_spend(&key, "0.10").await {
                    Ok(r) if r.status == 200 => {
                        ok.push(r.str("id").to_owned());
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => other.push(format!("{} {}", r.status, r.body)),
                    Err(_) => break, // refused or closed: the server stopped accepting
                }
            }
            (ok, other)
        }));
    }
    let mut waited = 0;
    while acked.load(Ordering::SeqCst) < 200 {
        waited += 1;
        assert!(waited < 6_000, "the load never got going\n{}", srv.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    srv.sigterm();
    // Now finish the in-flight request: it must still be served in full.
    sock.write_all(body.as_bytes()).await.expect("write body after SIGTERM");
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), sock.read_to_end(&mut resp))
        .await
        .expect("hang guard: no answer to the in-flight request")
        .expect("read answer");
    let text = String::from_utf8_lossy(&resp).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "the in-flight request was not completed: {text:?}");
    let json_body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let answer: Value = serde_json::from_str(json_body).expect("JSON answer");
    let inflight_id = answer["id"].as_str().expect("spend id").to_owned();
    assert_eq!(answer["amount"], "7.77");

    let status = srv.wait_exit().await;
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM\n{}", srv.logs());

    let mut ids = vec![inflight_id];
    for t in tasks {
        let (ok, other) = t.await.expect("client task");
        assert!(other.is_empty(), "in-flight requests answered with non-2xx during shutdown: {other:?}");
        ids.extend(ok);
    }
    // Flushed: the offline tools see every acknowledged spend with the server down.
    b.assert_audit_intact().await;
    let exported = refs(&b.export("graceful").await, "spend");
    for id in &ids {
        assert!(exported.contains(id), "acknowledged spend {id} missing after SIGTERM");
    }
    // And a restarted server agrees with the audit.
    let srv = Server::start(&b).await;
    let a = srv.api().agent(ADMIN, "graceful").await;
    let expected = micros("7.77") + (ids.len() as i64 - 1) * micros("0.10");
    assert_eq!(exported.len(), ids.len(), "allowed spends in the audit vs acknowledged");
    assert_eq!(usage(&a, "window_spent"), expected);
}

/// (6) A first start without BULKHEAD_ADMIN_TOKEN generates one into DIR/admin-token (0600),
/// prints its path and never the token.
async fn generated_admin_token(b: Backend) {
    use std::os::unix::fs::PermissionsExt;

    let mut srv = Server::start_with(&b, None).await;
    let path = b.data().join("admin-token");
    let meta = std::fs::metadata(&path).expect("DIR/admin-token exists after the first start");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "admin-token mode");
    let token = std::fs::read_to_string(&path).expect("read admin-token").trim().to_owned();
    assert!(token.len() >= 20, "a generated token is long: {token:?}");
    let logs = srv.logs();
    assert!(logs.contains(&common::path_str(&path)), "the token's path is printed:\n{logs}");
    assert!(!logs.contains(&token), "the token itself was printed");

    let api = srv.api();
    let r = api.get("/v1/agents", &token).await;
    assert_eq!(r.status, 200, "the generated token works: {}", r.body);
    let r = api.get("/v1/agents", ADMIN).await;
    assert_eq!((r.status, r.code()), (401, "invalid_credentials"), "another token does not");
    api.create(&token, root_agent("token-user", "1.00", &[SCOPE])).await;

    // A restart keeps the same token and prints it no more than the first start did.
    srv.kill9();
    let srv = Server::start_with(&b, None).await;
    assert_eq!(std::fs::read_to_string(&path).expect("read admin-token").trim(), token);
    assert!(!srv.logs().contains(&token), "the token was printed on restart");
    let r = srv.api().get("/v1/agents/token-user", &token).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// (5) Two replicas on one PostgreSQL database.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_replicas() {
    let Some(b) = Backend::pg().await else { return };
    let sa = Server::start(&b).await;
    let sb = Server::start(&b).await;
    let replicas = [sa.api(), sb.api()];

    // Revoke on one replica; the very next request on the other is refused. Both directions.
    for i in 0..4usize {
        let (here, there) = (&replicas[i % 2], &replicas[(i + 1) % 2]);
        let parent = here.create(ADMIN, root_agent(&format!("rep-{i}"), "100.00", &[SCOPE, "spawn:agents"])).await;
        // The child is created through the other replica.
        let child = there.create(&parent, root_agent(&format!("rep-{i}-kid"), "10.00", &[SCOPE])).await;
        for api in &replicas {
            let r = api.try_spend(&child, "0.50").await.expect("spend");
            assert_eq!(r.status, 200, "{}", r.body);
        }
        let r = here.post(&format!("/v1/agents/rep-{i}/revoke"), ADMIN, &json!({})).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let r = there.try_spend(&child, "0.50").await.expect("spend");
        assert_eq!((r.status, r.code()), (401, "credential_revoked"), "child spend on the other replica: {}", r.body);
        let r = there.try_spend(&parent, "0.50").await.expect("spend");
        assert_eq!((r.status, r.code()), (401, "credential_revoked"), "parent spend on the other replica");
        let r = there.get("/v1/me", &child).await;
        assert_eq!((r.status, r.code()), (401, "credential_revoked"), "GET /v1/me on the other replica");
        let a = there.agent(ADMIN, &format!("rep-{i}-kid")).await;
        assert_eq!(a["status"], "revoked");
        assert_eq!(usage(&a, "window_spent"), micros("1.00"));
    }

    // 48 clients split across both replicas race one cap.
    let (cap, amt) = (micros("10.00"), "0.25");
    let key = replicas[0].create(ADMIN, root_agent("shared", "10.00", &[SCOPE])).await;
    let targets: Vec<(Api, String)> = replicas.iter().map(|a| (a.clone(), key.clone())).collect();
    let seen = spend_race(&targets, 48, amt, 30).await;

    let allowed: Vec<&(String, i64, i64)> = seen.iter().flat_map(|s| &s.allowed).collect();
    let denied: Vec<&String> = seen.iter().flat_map(|s| &s.denied).collect();
    let told_sum: i64 = allowed.iter().map(|a| a.1).sum();
    assert!(!denied.is_empty() && denied.iter().all(|c| *c == "spending_cap_exceeded"), "denials: {denied:?}");
    let expected = (cap / micros(amt)) as usize;
    assert_eq!(allowed.len(), expected, "allowed count across replicas must be exactly floor(cap / amount)");
    let mut remaining: Vec<i64> = allowed.iter().map(|a| a.2).collect();
    remaining.sort_unstable();
    let want: Vec<i64> = (1..=expected as i64).rev().map(|k| cap - k * micros(amt)).collect();
    assert_eq!(remaining, want, "remaining balances told to clients across replicas");
    for api in &replicas {
        let a = api.agent(ADMIN, "shared").await;
        let spent = usage(&a, "window_spent");
        assert!(spent <= cap, "overspend across replicas: {spent}");
        assert_eq!(spent, told_sum, "ledger vs what clients were told");
    }
    let told: HashSet<String> = allowed.iter().map(|a| a.0.clone()).collect();
    assert_audit_matches(&replicas[1].audit(ADMIN, "shared").await, &told);
    b.assert_audit_intact().await;
}
