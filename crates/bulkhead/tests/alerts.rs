//! Alerts through the real binary and a real webhook receiver process (a small Python server
//! that fails its first deliveries): every alert arrives, once per id, signed, also across a
//! `kill -9` of the server while the receiver is down.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const SECRET: &str = "whsec-test-5e1b";

/// The receiver process; killed on drop.
struct Receiver {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Receiver {
    fn start(log: &Path, fail_first: u32, port: u16) -> Receiver {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/webhook_receiver.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(log)
            .arg(SECRET)
            .arg(fail_first.to_string())
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs the webhook receiver");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("receiver prints its port");
        let port = line.trim().parse().expect("a port number");
        Receiver { child, port, log: log.to_owned() }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn deliveries(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("receiver log lines are JSON"))
            .collect()
    }

    /// Waits (bounded) until `n` deliveries were acknowledged. A delivery leased by a server that
    /// was killed mid-attempt is retried only when its lease (8 s) ran out.
    async fn wait_for(&self, n: usize) -> Vec<Value> {
        for _ in 0..1200 {
            let d = self.deliveries();
            if d.len() >= n {
                // Give a duplicate the chance to show up before the caller counts.
                tokio::time::sleep(Duration::from_millis(700)).await;
                return self.deliveries();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("only {} of {n} alerts arrived: {:?}", self.deliveries().len(), self.deliveries());
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn with_alerts(b: &mut Backend, hook: &str) {
    let cfg = b.scratch("bulkhead.toml");
    std::fs::write(
        &cfg,
        format!("[alerts]\nwebhooks = [\"{hook}\"]\nthresholds = [0.5, 0.8]\nsecret_env = \"BH_TEST_ALERT_SECRET\"\n"),
    )
    .expect("write config");
    b.config = Some(cfg);
    b.env.push(("BH_TEST_ALERT_SECRET".into(), SECRET.into()));
}

fn by_type(d: &[Value]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for x in d {
        *m.entry(format!("{}:{}", x["type"].as_str().unwrap(), x["agent"].as_str().unwrap())).or_default() += 1;
    }
    m
}

fn assert_once_each_and_signed(d: &[Value]) {
    let mut ids = HashMap::new();
    for x in d {
        assert_eq!(x["signature_ok"], true, "every delivery is signed with the secret: {x}");
        assert_eq!(x["id"], x["header_id"], "the id header matches the body");
        assert!(x["body"]["at"].is_string(), "alerts carry `at`");
        *ids.entry(x["id"].as_str().unwrap().to_owned()).or_insert(0) += 1;
    }
    assert!(ids.values().all(|n| *n == 1), "each alert id is acknowledged once: {ids:?}");
}

async fn alerts_arrive(mut b: Backend) {
    let rx = Receiver::start(&b.scratch("hook.log"), 3, 0);
    with_alerts(&mut b, &rx.url());
    let srv = Server::start(&b).await;
    let api = srv.api();
    let key = api.create(ADMIN, root_agent("spender", "10.00", &[SCOPE])).await;
    for (amount, status) in [("4", 200), ("2", 200), ("3", 200), ("1", 200), ("1", 402)] {
        assert_eq!(api.try_spend(&key, amount).await.unwrap().status, status, "spend {amount}");
    }
    let loop_key = api
        .create(ADMIN, json!({"handle": "looper", "scopes": [SCOPE], "spending_cap": "1", "breaker": {"denials": 2}}))
        .await;
    for _ in 0..2 {
        assert_eq!(api.try_spend(&loop_key, "5").await.unwrap().status, 402);
    }
    assert_eq!(api.try_spend(&loop_key, "0.5").await.unwrap().code(), "agent_suspended");
    let r = api.post("/v1/agents/spender/revoke", ADMIN, &json!({"reason": "test"})).await;
    assert_eq!(r.status, 200);

    let d = rx.wait_for(5).await;
    assert_once_each_and_signed(&d);
    let want: HashMap<String, usize> = [
        ("threshold_crossed:spender", 2),
        ("cap_reached:spender", 1),
        ("agent_suspended:looper", 1),
        ("agent_revoked:spender", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(by_type(&d), want, "exactly the expected alerts: {d:?}");
    let mut thresholds: Vec<f64> = d
        .iter()
        .filter(|x| x["type"] == "threshold_crossed")
        .map(|x| x["body"]["threshold"].as_f64().unwrap())
        .collect();
    thresholds.sort_by(f64::total_cmp);
    assert_eq!(thresholds, vec![0.5, 0.8]);
}

async fn alerts_survive_kill_9(mut b: Backend) {
    // Reserve a port for the receiver, start it only after the server died.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    with_alerts(&mut b, &format!("http://127.0.0.1:{port}/hook"));
    let mut srv = Server::start(&b).await;
    let api = srv.api();
    api.create(ADMIN, root_agent("doomed", "10.00", &[SCOPE])).await;
    assert_eq!(api.post("/v1/agents/doomed/revoke", ADMIN, &json!({})).await.status, 200);
    // The receiver is down: deliveries fail and stay in the outbox (waited for in the server's
    // log, not guessed). Then the server dies.
    let mut waited = 0;
    while !srv.logs().contains("alert delivery failed") {
        waited += 1;
        assert!(waited < 2_000, "no delivery was attempted\n{}", srv.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    srv.kill9();
    let rx = Receiver::start(&b.scratch("hook.log"), 1, port);
    let _srv = Server::start(&b).await;
    let d = rx.wait_for(1).await;
    assert_once_each_and_signed(&d);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0]["type"], "agent_revoked");
    assert_eq!(d[0]["agent"], "doomed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_alerts_arrive_once_each_signed() {
    alerts_arrive(Backend::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_alerts_arrive_once_each_signed() {
    let Some(b) = Backend::pg().await else { return };
    alerts_arrive(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_alerts_survive_kill_9_before_delivery() {
    alerts_survive_kill_9(Backend::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_alerts_survive_kill_9_before_delivery() {
    let Some(b) = Backend::pg().await else { return };
    alerts_survive_kill_9(b).await;
}

/// Alert delivery writes the outbox beside the ledger's writer. On SQLite a writer transaction
/// that began deferred could not upgrade to a write while a delivery attempt was writing, and
/// answered 503 `store_unavailable`. With a webhook that always fails (every attempt writes its
/// retry) and many agents crossing thresholds at once, every answer must still be a decision.
async fn failing_webhooks_never_fail_a_decision(mut b: Backend) {
    let rx = Receiver::start(&b.scratch("hook.log"), u32::MAX, 0);
    let cfg = b.scratch("bulkhead.toml");
    let thresholds: Vec<String> = (1..10).map(|t| format!("0.{t}")).collect();
    let text = format!("[alerts]\nwebhooks = [\"{}\"]\nthresholds = [{}]\n", rx.url(), thresholds.join(", "));
    std::fs::write(&cfg, text).expect("write config");
    b.config = Some(cfg);
    let srv = Server::start(&b).await;
    let api = srv.api();
    let mut keys = Vec::new();
    for i in 0..48 {
        keys.push(api.create(ADMIN, root_agent(&format!("hot-{i}"), "1.00", &[SCOPE])).await);
    }
    let mut tasks = Vec::new();
    for chunk in keys.chunks(6) {
        let (api, chunk) = (api.clone(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..12 {
                for key in &chunk {
                    statuses.push(api.try_spend(key, "0.10").await.expect("an answer").status);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            statuses
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.extend(t.await.expect("task"));
    }
    let bad: Vec<_> = statuses.iter().filter(|s| !matches!(s, 200 | 402)).collect();
    assert!(bad.is_empty(), "every spend is decided, none fails: {bad:?}\n{}", srv.logs());
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 48 * 10, "ten spends of 0.10 fill each cap");
    assert!(rx.deliveries().is_empty(), "the receiver acknowledged nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_failing_webhooks_never_fail_a_decision() {
    failing_webhooks_never_fail_a_decision(Backend::sqlite()).await;
}
