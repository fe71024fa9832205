//! `bulkhead report`: the blast radius of every live agent, as the brief's table (or JSON).

use std::process::ExitCode;

use clap::Args;

use crate::StoreArgs;
use crate::client::table;

#[derive(Args)]
pub(crate) struct ReportArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Print JSON (the same document as GET /v1/blast-radius).
    #[arg(long)]
    json: bool,
}

/// `24h` → `day`, `60m` → `hour`, `7d` → `week`, else the window itself.
fn period(window: &str) -> String {
    match window {
        "24h" => "day".into(),
        "60m" => "hour".into(),
        "7d" => "week".into(),
        "60s" => "minute".into(),
        w => w.into(),
    }
}

fn revocation(ms: f64) -> String {
    if ms < 1000.0 { "< 1 second".into() } else { format!("{:.1} s", ms / 1000.0) }
}

pub(crate) async fn run(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let store = args.store.open(false).await?;
    let b = store.blast_radius(None).await?;
    store.close().await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&b)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = Vec::new();
    for a in &b.agents {
        let mut spend = format!("${} / {}", a.max_spend_per_period, period(&a.window));
        if a.effective_max_spend_per_period < a.max_spend_per_period {
            spend.push_str(&format!(" (${} via ancestors)", a.effective_max_spend_per_period));
        }
        let mut flags = Vec::new();
        if a.wildcard_scopes {
            flags.push("wildcard scope");
        }
        if a.no_expiry {
            flags.push("no expiry");
        }
        if a.no_lifetime_cap {
            flags.push("no lifetime cap");
        }
        if a.shadow_mode {
            flags.push("SHADOW MODE: caps not enforced");
        }
        if a.status != "active" {
            flags.push(if a.status == "suspended" { "SUSPENDED" } else { "?" });
        }
        rows.push(vec![a.handle.clone(), spend, a.scopes.join(", "), revocation(a.revocation_ms), flags.join(", ")]);
    }
    rows.push(vec![
        "(a shared service key)".into(),
        "Unlimited".into(),
        "everything".into(),
        "Full rotation required".into(),
        "for comparison".into(),
    ]);
    table(&["Agent", "Max spend/period", "Credential scope", "Revocation time", "Flags"], &rows);
    println!(
        "\nFleet maximum per day: ${} across {} live agents. Revocation time: {:.1} ms ({}).",
        b.fleet_max_spend_per_day,
        b.agents.len(),
        b.revocation_ms,
        b.revocation_source
    );
    Ok(ExitCode::SUCCESS)
}
