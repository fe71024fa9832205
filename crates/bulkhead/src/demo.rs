//! `bulkhead demo`: the product's story in under a minute, on a throwaway data dir.
//!
//! It starts a real embedded server on a loopback port and talks to it over HTTP, exactly as an
//! agent would: nothing here takes a shortcut into the store.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bulkhead_core::Clock;
use bulkhead_server::{AppState, app, install_metrics};
use bulkhead_store::{Ledger, LedgerConfig, Store, VerifyReport};
use clap::Args;
use serde_json::{Value, json};

use crate::client::{AGENT_HEADERS, agent_row, table};
use crate::serve::SystemClock;

#[derive(Args)]
pub(crate) struct DemoArgs {
    /// How many spend attempts the looping agent makes.
    #[arg(long, default_value_t = 4000)]
    attempts: usize,
    /// Keep the demo's data dir instead of deleting it.
    #[arg(long)]
    keep: bool,
}

#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn call(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    async fn create(&self, token: &str, body: Value) -> anyhow::Result<(Value, String)> {
        let (status, v) = self.call(token, reqwest::Method::POST, "/v1/agents", Some(body)).await?;
        anyhow::ensure!(status == 201, "create failed: {status} {v}");
        let key = v["key"].as_str().unwrap_or_default().to_owned();
        Ok((v, key))
    }

    async fn spend(&self, key: &str, scope: &str, amount: &str) -> anyhow::Result<(u16, Value)> {
        self.call(key, reqwest::Method::POST, "/v1/spend", Some(json!({"scope": scope, "amount": amount}))).await
    }
}

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

/// The demo, step by step: an embedded server, the fleet, a runaway agent stopped at its cap,
/// revocations, then usage and the audit trail, and the chain verified after the server stops.
pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let dir: PathBuf = std::env::temp_dir()
        .join(format!("bulkhead-demo-{}", bulkhead_core::key::random_base62(&mut rand::rng(), 8).to_lowercase()));
    println!("Bulkhead demo: a fleet of agents, one of them loops. Data dir: {}", dir.display());
    let demo = Embedded::start(&dir).await?;
    let fleet = fleet(&demo.api, &demo.admin).await?;
    let api = Arc::new(demo.api.clone());
    runaway(&api, &demo.admin, &fleet, args.attempts).await?;
    revocations(&api, &demo.admin, &fleet).await?;
    usage_and_audit(&api, &demo.admin).await?;
    demo.stop().await?;
    if args.keep {
        println!("\nData kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("\nDone in {:.1} s.", started.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(ExitCode::SUCCESS)
}

/// A server on a loopback port over a fresh embedded store, as `serve` would run it.
struct Embedded {
    api: Api,
    admin: String,
    store: Store,
    writer: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Embedded {
    async fn start(dir: &std::path::Path) -> anyhow::Result<Embedded> {
        let store = Store::open_dir(dir).await.context("cannot open the demo store")?;
        // Like `serve`: the chain is keyed, with the key kept in the data dir, outside the database.
        let store = store.with_audit_key(crate::serve::audit_key(dir)?);
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let (ledger, writer) = Ledger::start(store.clone(), clock, LedgerConfig::default());
        let admin = format!("bha_{}", bulkhead_core::key::random_base62(&mut rand::rng(), 40));
        let state =
            AppState { ledger, admin_token: Arc::from(admin.as_str()), metrics: install_metrics(), metrics_open: true };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, app(state))
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await
        });
        let api = Api { http: reqwest::Client::new(), base: format!("http://{addr}") };
        println!("Embedded server on http://{addr} (SQLite, durable group commit).");
        Ok(Embedded { api, admin, store, writer, stop, server })
    }

    /// Stops the server and the writer, then verifies the audit chain they left.
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.server.await??;
        let _ = self.writer.await;
        match self.store.verify_audit(|_| {}).await? {
            VerifyReport::Intact { events, .. } => println!("  audit chain intact: {events} events verified (keyed)"),
            VerifyReport::Broken { seq, problem } => println!("  audit chain BROKEN at {seq}: {problem}"),
            VerifyReport::KeyNeeded { seq } => println!("  audit chain keyed from {seq}, and no key to check it"),
        }
        self.store.close().await;
        Ok(())
    }
}

/// The keys of the demo's fleet.
struct Fleet {
    fetcher: String,
    payments: String,
    child: String,
}

/// Step 1: the brief's fleet, each agent with its own key, caps and scopes.
async fn fleet(api: &Api, admin: &str) -> anyhow::Result<Fleet> {
    step(1, "Every agent gets its own key, caps and scopes (the brief's fleet):");
    let (_, fetcher) = api
        .create(admin, json!({"handle": "data-fetcher", "scopes": ["read:external-apis"], "spending_cap": "2.00", "window": "24h", "per_tx_limit": "0.05"}))
        .await?;
    let (_, payments) = api
        .create(admin, json!({"handle": "payment-processor", "scopes": ["payments:write", "invoices:read"], "spending_cap": "500.00", "window": "24h", "per_tx_limit": "50.00"}))
        .await?;
    let (_, orch) = api
        .create(admin, json!({"handle": "orchestrator", "scopes": ["spawn:agents", "read:*"], "spending_cap": "50.00", "window": "24h"}))
        .await?;
    let (_, child) = api
        .create(
            &orch,
            json!({"handle": "research-child", "scopes": ["read:web"], "spending_cap": "5.00", "window": "24h"}),
        )
        .await?;
    let (status, v) = api
        .call(
            &orch,
            reqwest::Method::POST,
            "/v1/agents",
            Some(json!({"handle": "greedy-child", "scopes": ["payments:write"], "spending_cap": "1.00"})),
        )
        .await?;
    println!("  created data-fetcher ($2/day), payment-processor ($500/day), orchestrator ($50/day)");
    println!("  orchestrator spawned research-child ($5/day, read:web) with its own key");
    println!(
        "  orchestrator tried to give a child payments:write -> {status} {}",
        v["error"]["code"].as_str().unwrap_or("?")
    );
    Ok(Fleet { fetcher, payments, child })
}

/// Step 2: data-fetcher loops, 16 requests at a time, and is stopped at its cap; the rest of
/// the fleet carries on meanwhile.
async fn runaway(api: &Arc<Api>, admin: &str, fleet: &Fleet, attempts: usize) -> anyhow::Result<()> {
    let (fetcher, payments, child) = (&fleet.fetcher, &fleet.payments, &fleet.child);
    step(2, &format!("data-fetcher goes into a loop: {} spend attempts of $0.01, 16 at a time", attempts));
    let outcomes: Arc<std::sync::Mutex<BTreeMap<String, usize>>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (api, key, next, outcomes) = (api.clone(), fetcher.clone(), next.clone(), outcomes.clone());
        let total = attempts;
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    break;
                }
                let label = match api.spend(&key, "read:external-apis", "0.01").await {
                    Ok((200, _)) => "allowed".to_owned(),
                    Ok((_, v)) => v["error"]["code"].as_str().unwrap_or("error").to_owned(),
                    Err(_) => "transport_error".to_owned(),
                };
                *outcomes.lock().expect("no poisoning").entry(label).or_default() += 1;
                if (i + 1) % 500 == 0 {
                    println!("  ... {} attempts", i + 1);
                }
            }
        }));
    }
    // Meanwhile the rest of the fleet works normally.
    let mut others_ok = 0;
    for _ in 0..10 {
        if api.spend(payments, "payments:write", "12.00").await?.0 == 200 {
            others_ok += 1;
        }
        if api.spend(child, "read:web", "0.10").await?.0 == 200 {
            others_ok += 1;
        }
    }
    for w in workers {
        w.await?;
    }
    let outcomes = outcomes.lock().expect("no poisoning").clone();
    for (label, n) in &outcomes {
        println!("  {label:>24}: {n}");
    }
    let (_, f) = api.call(admin, reqwest::Method::GET, "/v1/agents/data-fetcher", None).await?;
    println!(
        "  data-fetcher spent {} of its $2.00 cap: stopped at the cap, not a cent over; status: {}",
        f["usage"]["window_spent"].as_str().unwrap_or("?"),
        f["status"].as_str().unwrap_or("?")
    );
    if f["status"] == "suspended" {
        println!(
            "  after 50 denials within 60 s the runaway-loop breaker suspended it: the rest were refused up front"
        );
    }
    println!("  meanwhile payment-processor and research-child made {others_ok}/20 payments without noticing");

    Ok(())
}

/// Steps 3 and 4: revoking one agent stops only it; revoking a parent stops its subtree.
async fn revocations(api: &Api, admin: &str, fleet: &Fleet) -> anyhow::Result<()> {
    let (fetcher, payments, child) = (&fleet.fetcher, &fleet.payments, &fleet.child);
    step(3, "Surgical revocation: kill data-fetcher, everything else keeps running");
    let t = Instant::now();
    let (_, r) = api
        .call(admin, reqwest::Method::POST, "/v1/agents/data-fetcher/revoke", Some(json!({"reason": "runaway loop"})))
        .await?;
    println!("  revoked {} in {:.1} ms", r["revoked"], t.elapsed().as_secs_f64() * 1000.0);
    let (s1, v1) = api.spend(fetcher, "read:external-apis", "0.01").await?;
    println!("  data-fetcher's next request -> {s1} {}", v1["error"]["code"].as_str().unwrap_or(""));
    let (s2, _) = api.spend(payments, "payments:write", "1.00").await?;
    println!("  payment-processor's next request -> {s2}");

    step(4, "Revoking the orchestrator revokes everything it spawned");
    let (_, r) = api
        .call(admin, reqwest::Method::POST, "/v1/agents/orchestrator/revoke", Some(json!({"reason": "demo"})))
        .await?;
    println!("  revoked {}", r["revoked"]);
    let (s3, v3) = api.spend(child, "read:web", "0.10").await?;
    println!("  research-child's next request -> {s3} {}", v3["error"]["code"].as_str().unwrap_or(""));

    Ok(())
}

/// Steps 5 and 6: per-agent usage, and each agent's audit events.
async fn usage_and_audit(api: &Api, admin: &str) -> anyhow::Result<()> {
    step(5, "Per-agent usage");
    let (_, list) = api.call(admin, reqwest::Method::GET, "/v1/agents", None).await?;
    let agents = list["agents"].as_array().cloned().unwrap_or_default();
    table(&AGENT_HEADERS, &agents.iter().map(agent_row).collect::<Vec<_>>());

    step(6, "Audit trail: every decision, allowed or denied, hash-chained");
    let mut rows = Vec::new();
    for a in &agents {
        let h = a["handle"].as_str().unwrap_or_default();
        let (mut allowed, mut denied, mut after) = (0, 0, 0);
        loop {
            let (_, v) = api
                .call(admin, reqwest::Method::GET, &format!("/v1/agents/{h}/audit?limit=1000&after={after}"), None)
                .await?;
            let events = v["events"].as_array().cloned().unwrap_or_default();
            let Some(last) = events.last() else { break };
            after = last["seq"].as_i64().unwrap_or(after);
            for e in &events {
                match e["outcome"].as_str() {
                    Some("denied") => denied += 1,
                    _ => allowed += 1,
                }
            }
        }
        rows.push(vec![h.to_owned(), allowed.to_string(), denied.to_string()]);
    }
    table(&["AGENT", "ALLOWED EVENTS", "DENIED EVENTS"], &rows);
    Ok(())
}
