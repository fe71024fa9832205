//! Concurrent idempotency (contract §5): one `Idempotency-Key` and body sent by many clients at
//! once, to one server (SQLite and PostgreSQL) and alternately to two replicas on one PostgreSQL
//! database.
//!
//! What they hold the store to: for spends, holds, captures and denied spends alike, exactly one
//! decision is made and recorded (usage, counters and audit trail show one charge per key);
//! every answer is the first one, status and body byte for byte, with `Idempotent-Replayed: true`
//! on the replays, or 409 `idempotency_in_progress`; and the race really happened (duplicates
//! were sent before the first answer arrived).

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ADMIN, Backend, SCOPE, Server, micros, refs, root_agent, usage};
use serde_json::{Value, json};
use tokio::sync::Barrier;

/// Clients per race.
const CLIENTS: usize = 32;
/// Races per kind of request (each with its own key).
const ROUNDS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_one_server() {
    let b = Backend::sqlite();
    let srv = Server::start(&b).await;
    races(&b, std::slice::from_ref(&srv.base)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_one_server() {
    let Some(b) = Backend::pg().await else { return };
    let srv = Server::start(&b).await;
    races(&b, std::slice::from_ref(&srv.base)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_replicas() {
    let Some(b) = Backend::pg().await else { return };
    let (sa, sb) = (Server::start(&b).await, Server::start(&b).await);
    races(&b, &[sa.base.clone(), sb.base.clone()]).await;
}

/// One answer, as it came over the wire, and when its request was sent and its answer read.
struct Answer {
    status: u16,
    replayed: bool,
    body: String,
    sent: Instant,
    done: Instant,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    fn in_progress(&self) -> bool {
        self.status == 409 && self.json()["error"]["code"] == "idempotency_in_progress"
    }
}

/// `CLIENTS` clients, each with its own connection (client `i` talks to `bases[i % n]`).
struct Crowd {
    clients: Vec<(reqwest::Client, String)>,
}

impl Crowd {
    fn new(bases: &[String]) -> Crowd {
        let clients = (0..CLIENTS)
            .map(|i| {
                let c =
                    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(120)).build().expect("client");
                (c, bases[i % bases.len()].clone())
            })
            .collect();
        Crowd { clients }
    }

    /// Every client sends `POST path` with the same key and body bytes, released together.
    async fn race(&self, path: &str, bearer: &str, idem: &str, body: &str) -> Vec<Answer> {
        let barrier = Arc::new(Barrier::new(self.clients.len()));
        let mut tasks = Vec::new();
        for (c, base) in &self.clients {
            let (c, url, barrier) = (c.clone(), format!("{base}{path}"), barrier.clone());
            let (bearer, idem, body) = (bearer.to_owned(), idem.to_owned(), body.to_owned());
            tasks.push(tokio::spawn(async move {
                let rb = c
                    .post(url)
                    .bearer_auth(bearer)
                    .header("content-type", "application/json")
                    .header("idempotency-key", idem)
                    .body(body);
                barrier.wait().await;
                let sent = Instant::now();
                let r = rb.send().await.expect("request");
                let status = r.status().as_u16();
                let replayed = r.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
                let body = r.text().await.expect("body");
                Answer { status, replayed, body, sent, done: Instant::now() }
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("client task"));
        }
        out
    }

    /// Warms every client's connection, so that the races start on open connections.
    async fn warm(&self) {
        for (c, base) in &self.clients {
            let r = c.get(format!("{base}/healthz")).send().await.expect("healthz");
            assert_eq!(r.status().as_u16(), 200);
        }
    }
}

/// What a race showed.
#[derive(Default, Debug)]
struct Tally {
    replays: usize,
    in_progress: usize,
    /// Duplicates sent before the first answer had arrived.
    overlapped: usize,
}

/// Checks one race: one first answer, every other one identical to it (and marked replayed) or
/// `idempotency_in_progress`. Returns the first answer's body.
fn check(what: &str, answers: &[Answer], status: u16, tally: &mut Tally) -> Value {
    let firsts: Vec<&Answer> = answers.iter().filter(|a| !a.replayed && !a.in_progress()).collect();
    assert_eq!(firsts.len(), 1, "{what}: exactly one answer is not a replay: {:?}", bodies(answers));
    let first = firsts[0];
    assert_eq!(first.status, status, "{what}: {}", first.body);
    for a in answers.iter().filter(|a| !std::ptr::eq(*a, first)) {
        if a.in_progress() {
            tally.in_progress += 1;
        } else {
            assert_eq!((a.status, a.body.as_str()), (first.status, first.body.as_str()), "{what}: replay differs");
            assert!(a.replayed, "{what}: a replay says so");
            tally.replays += 1;
        }
        if a.sent < first.done {
            tally.overlapped += 1;
        }
    }
    first.json()
}

fn bodies(answers: &[Answer]) -> Vec<(u16, bool, &str)> {
    answers.iter().map(|a| (a.status, a.replayed, a.body.as_str())).collect()
}

async fn races(b: &Backend, bases: &[String]) {
    let admin = common::Api::new(&bases[0]);
    // Breaker off: the denied races must not suspend the agent.
    let mut spec = root_agent("racer", "1000.00", &[SCOPE]);
    spec["per_tx_limit"] = json!("10.00");
    let key = admin.create(ADMIN, spec).await;
    let crowd = Crowd::new(bases);
    crowd.warm().await;
    let mut tally = Tally::default();

    let mut spend_ids = HashSet::new();
    let mut hold_ids = Vec::new();
    for round in 0..ROUNDS {
        let body = json!({"scope": SCOPE, "amount": "1.25", "memo": format!("round {round}")}).to_string();
        let answers = crowd.race("/v1/spend", &key, &format!("spend-{round}"), &body).await;
        let first = check("spend", &answers, 200, &mut tally);
        assert!(spend_ids.insert(first["id"].as_str().expect("spend id").to_owned()));

        let body = json!({"scope": SCOPE, "amount": "2.00", "expires_in": "1h"}).to_string();
        let answers = crowd.race("/v1/holds", &key, &format!("hold-{round}"), &body).await;
        let first = check("hold", &answers, 201, &mut tally);
        hold_ids.push(first["id"].as_str().expect("hold id").to_owned());

        // A denial is stored and replayed like an allowed answer.
        let body = json!({"scope": SCOPE, "amount": "11.00"}).to_string();
        let answers = crowd.race("/v1/spend", &key, &format!("denied-{round}"), &body).await;
        let first = check("denied spend", &answers, 402, &mut tally);
        assert_eq!(first["error"]["code"], "per_tx_limit_exceeded");
    }
    for (round, id) in hold_ids.iter().enumerate() {
        let answers = crowd
            .race(&format!("/v1/holds/{id}/capture"), &key, &format!("capture-{round}"), r#"{"amount": "0.50"}"#)
            .await;
        let first = check("capture", &answers, 200, &mut tally);
        assert_eq!(first["captured"], "0.50");
        assert_eq!(first["released"], "1.50");
    }

    // The race happened: duplicates were in flight with the first request, and were answered.
    eprintln!("{} server(s): {tally:?}", bases.len());
    let races = ROUNDS * 4;
    assert_eq!(tally.replays + tally.in_progress, races * (CLIENTS - 1), "{tally:?}");
    assert!(tally.replays > 0, "duplicates were answered with the stored answer: {tally:?}");
    assert!(tally.overlapped > 0, "duplicates were sent while the first was in flight: {tally:?}");

    // One charge per key: usage, counters and the audit trail.
    let rounds = ROUNDS as i64;
    let agent = admin.agent(ADMIN, "racer").await;
    assert_eq!(usage(&agent, "window_spent"), rounds * (micros("1.25") + micros("0.50")), "{agent}");
    assert_eq!(usage(&agent, "lifetime_spent"), rounds * (micros("1.25") + micros("0.50")));
    assert_eq!(usage(&agent, "window_held"), 0, "every hold was captured once and closed");
    assert_eq!(agent["usage"]["denied_count"], json!(rounds), "one denial per denied key");
    let events = admin.audit(ADMIN, "racer").await;
    assert_eq!(refs(&events, "spend"), spend_ids, "one spend event per key");
    assert_eq!(refs(&events, "hold"), hold_ids.iter().cloned().collect::<HashSet<_>>(), "one hold event per key");
    let captures = events.iter().filter(|e| e["action"] == "capture" && e["outcome"] == "allowed").count();
    assert_eq!(captures, ROUNDS, "one capture event per key");
    let denials = events.iter().filter(|e| e["action"] == "spend" && e["outcome"] == "denied").count();
    assert_eq!(denials, ROUNDS, "one denial event per key");
    b.assert_audit_intact().await;
}
