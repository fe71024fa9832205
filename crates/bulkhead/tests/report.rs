//! `bulkhead report` reproduces the product brief's blast-radius table for the brief's agents,
//! read straight from the store while the server runs; `--json` and `GET /v1/blast-radius` carry
//! the same figures, with effective caps through ancestors.

mod common;

use common::*;
use serde_json::{Value, json};

/// The table's rows, each split into its cells (columns are separated by two or more spaces).
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('-'))
        .map(|l| l.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect())
        .collect()
}

async fn brief_fleet(b: Backend) {
    let srv = Server::start(&b).await;
    let api = srv.api();
    api.create(
        ADMIN,
        json!({"handle": "data-fetcher", "scopes": ["read:external-apis"], "spending_cap": "2", "window": "24h"}),
    )
    .await;
    api.create(
        ADMIN,
        json!({"handle": "payment-processor", "scopes": ["payments:write", "invoices:read"], "spending_cap": "500", "window": "24h"}),
    )
    .await;
    let orch = api
        .create(ADMIN, json!({"handle": "orchestrator", "scopes": ["spawn:agents", "read:*"], "spending_cap": "50", "window": "24h"}))
        .await;
    api.create(&orch, json!({"handle": "researcher", "scopes": ["read:web"], "spending_cap": "50", "window": "1h"}))
        .await;
    // The orchestrator's cap shrinks below its child's: the child's effective cap follows.
    let r = api
        .try_send(reqwest::Method::PATCH, "/v1/agents/orchestrator", ADMIN, Some(&json!({"spending_cap": "20"})))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // Revoked agents have no blast radius left.
    api.create(ADMIN, root_agent("retired", "1000", &["payments:write"])).await;
    assert_eq!(api.post("/v1/agents/retired/revoke", ADMIN, &json!({})).await.status, 200);

    let out = b.offline(&["report"]).await;
    assert!(out.status.success(), "report failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let table = rows(&text);
    assert_eq!(table[0], ["Agent", "Max spend/period", "Credential scope", "Revocation time", "Flags"]);
    let find =
        |h: &str| table.iter().find(|r| r[0] == h).unwrap_or_else(|| panic!("no row for {h} in\n{text}")).clone();
    assert_eq!(find("data-fetcher")[1..4], ["$2.00 / day", "read:external-apis", "< 1 second"]);
    assert_eq!(find("payment-processor")[1..4], ["$500.00 / day", "payments:write, invoices:read", "< 1 second"]);
    assert_eq!(find("orchestrator")[1..4], ["$20.00 / day", "spawn:agents, read:*", "< 1 second"]);
    assert!(find("orchestrator")[4].contains("wildcard scope"));
    assert_eq!(find("researcher")[1], "$50.00 / hour ($20.00 via ancestors)");
    assert_eq!(find("(a shared service key)")[1..4], ["Unlimited", "everything", "Full rotation required"]);
    assert!(table.iter().all(|r| r[0] != "retired"), "revoked agents are not listed");
    // Roots only: 2 + 500 + 20 a day (the researcher's spend counts against the orchestrator).
    assert!(text.contains("Fleet maximum per day: $522.00 across 4 live agents"), "{text}");

    let out = b.offline(&["report", "--json"]).await;
    let doc: Value = serde_json::from_slice(&out.stdout).expect("report --json is JSON");
    let api_doc = api.get("/v1/blast-radius", ADMIN).await;
    assert_eq!(api_doc.status, 200);
    for d in [&doc, &api_doc.body] {
        assert_eq!(d["fleet_max_spend_per_day"], "522.00");
        let agents = d["agents"].as_array().unwrap();
        let r = agents.iter().find(|a| a["handle"] == "researcher").unwrap();
        assert_eq!(r["max_spend_per_period"], "50.00");
        assert_eq!(r["effective_max_spend_per_period"], "20.00");
        assert_eq!(r["effective_max_spend_per_day"], "20.00");
        assert_eq!(r["window"], "60m");
        let o = agents.iter().find(|a| a["handle"] == "orchestrator").unwrap();
        assert_eq!(o["children"], 1);
        assert_eq!(o["wildcard_scopes"], true);
        assert!(o["revocation_ms"].as_f64().unwrap() > 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_report_reproduces_the_brief() {
    brief_fleet(Backend::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_report_reproduces_the_brief() {
    let Some(b) = Backend::pg().await else { return };
    brief_fleet(b).await;
}
