//! PostgreSQL stopped and started again under load: requests fail fast and cleanly with 503 `store_unavailable`,
//! the server recovers by itself when the database is back, no acknowledged spend is lost, the
//! ledger equals the audit trail, and the audit chain verifies.
//!
//! This binary holds a single test because it restarts the machine's PostgreSQL server
//! (`pg_ctlcluster stop|start`, as root); other test binaries run before or after it, never during.
//! It runs only where it can: with `BULKHEAD_TEST_DATABASE_URL` set, as root, with a Debian
//! cluster in `/etc/postgresql` and the test database on this machine. Elsewhere it says that it
//! was skipped, and why.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;

fn pg_ctl(action: &str) {
    let versions = std::fs::read_dir("/etc/postgresql").expect("a Debian PostgreSQL cluster in /etc/postgresql");
    let version = versions
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .max()
        .expect("a PostgreSQL version");
    let out = std::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", "-m", "fast", &version, "main", action])
        .output()
        .expect("run pg_ctlcluster");
    assert!(out.status.success(), "pg_ctlcluster {action} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Why this machine cannot restart the test database's cluster (the server `url` names), if it
/// cannot.
fn cannot_restart(url: &str) -> Option<String> {
    let uid = std::process::Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not running as root".into());
    }
    if std::fs::read_dir("/etc/postgresql").is_err() {
        return Some("no Debian PostgreSQL cluster in /etc/postgresql".into());
    }
    if std::process::Command::new("pg_ctlcluster").arg("--help").output().is_err() {
        return Some("no pg_ctlcluster".into());
    }
    if !(url.contains("@127.0.0.1")
        || url.contains("@localhost")
        || url.contains("://127.0.0.1")
        || url.contains("://localhost"))
    {
        return Some("the test database is not on this machine".into());
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_load() {
    let Some(url) = bulkhead_testkit::pg_admin_url() else { return };
    if let Some(why) = cannot_restart(&url) {
        eprintln!("SKIPPED postgres_restart_under_load: {why} (it stops and starts the PostgreSQL cluster)");
        println!("SKIPPED postgres_restart_under_load: {why}");
        return;
    }
    let Some(b) = Backend::pg().await else { return };
    let srv = Server::start(&b).await;
    let api = srv.api();
    let key = api.create(ADMIN, root_agent("steady", "1000000", &[SCOPE])).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..16 {
        let (api, key, stop) = (srv.api(), key.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            // (status, code, id, amount in micros)
            let mut seen: Vec<(u16, String, String, i64)> = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) && i < 100_000 {
                i += 1;
                let amount = amount(1_000 + c * 10 + (i % 7));
                match api.try_spend(&key, &amount).await {
                    Ok(r) => {
                        let id = r.body["id"].as_str().unwrap_or_default().to_owned();
                        seen.push((r.status, r.code().to_owned(), id, micros(&amount)));
                    }
                    Err(e) => panic!("the server itself must stay up: {e}"),
                }
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Stop the database, keep it down until the server has answered 503 (so the outage is
    // certainly seen), then start it again.
    pg_ctl("stop");
    let mut saw_503 = false;
    for _ in 0..200 {
        if api.try_spend(&key, "0.001").await.map(|r| r.status == 503).unwrap_or(false) {
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pg_ctl("start");
    assert!(saw_503, "with PostgreSQL down, a spend answers 503");
    // Wait (bounded) until the server answers spends again, then let the load run a little.
    let mut recovered = false;
    for _ in 0..400 {
        if api.try_spend(&key, "0.001").await.map(|r| r.status == 200).unwrap_or(false) {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "the server did not recover after PostgreSQL came back");
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::SeqCst);

    let mut acknowledged: HashMap<String, i64> = HashMap::new();
    for c in clients {
        for (status, code, id, m) in c.await.expect("client task") {
            match status {
                200 => {
                    assert!(acknowledged.insert(id, m).is_none(), "spend ids are unique");
                }
                503 => {
                    assert_eq!(code, "store_unavailable", "outages answer 503 store_unavailable");
                }
                other => panic!("unexpected status {other} ({code}) during the restart"),
            }
        }
    }
    assert!(acknowledged.len() > 100, "spends went through before and after the restart");

    // No acknowledged spend was lost, and the ledger equals the audit trail exactly.
    let events = api.audit(ADMIN, "steady").await;
    let mut audited: HashMap<String, i64> = HashMap::new();
    for e in events.iter().filter(|e| e["action"] == "spend" && e["outcome"] == "allowed") {
        audited.insert(e["ref"].as_str().unwrap().to_owned(), micros(e["amount"].as_str().unwrap()));
    }
    for (id, m) in &acknowledged {
        assert_eq!(audited.get(id), Some(m), "acknowledged spend {id} is in the audit trail");
    }
    let agent = api.agent(ADMIN, "steady").await;
    let audited_sum: i64 = audited.values().sum();
    assert_eq!(usage(&agent, "window_spent"), audited_sum, "the ledger equals the audit trail");
    assert_eq!(agent["usage"]["tx_count"].as_i64().unwrap() as usize, audited.len());
    b.assert_audit_intact().await;
}
