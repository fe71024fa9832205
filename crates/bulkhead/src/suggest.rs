//! `bulkhead suggest HANDLE`: least-privilege advice from the recorded history, next to what is
//! granted (reads the store directly). The arithmetic and its rules live in
//! `bulkhead_core::advice`.

use std::process::ExitCode;

use bulkhead_core::advice::ScopeAction;
use bulkhead_store::AgentAdvice;
use clap::Args;
use serde_json::{Map, Value, json};

use crate::StoreArgs;
use crate::client::table;

#[derive(Args)]
pub(crate) struct SuggestArgs {
    /// The agent to advise on.
    handle: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// The `PATCH /v1/agents/{handle}` body that applies the advice: only what changes.
fn patch(a: &AgentAdvice) -> Map<String, Value> {
    let (s, sp) = (&a.advice.scopes, &a.advice.spend);
    let mut p = Map::new();
    if !s.proposed.is_empty() && s.proposed != s.granted {
        p.insert("scopes".into(), json!(s.proposed));
    }
    if let Some(cap) = sp.proposed_cap.filter(|c| *c != sp.granted_cap) {
        p.insert("spending_cap".into(), json!(cap));
    }
    if let Some(tx) = sp.proposed_per_tx_limit.filter(|t| *t != sp.granted_per_tx_limit) {
        p.insert("per_tx_limit".into(), json!(tx));
    }
    p
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The report for a person: history, scopes, spending, denials, and the patch to apply.
fn print_text(a: &AgentAdvice) {
    let sp = &a.advice.spend;
    println!("Least-privilege advice for {} ({})", a.handle, a.status);
    println!(
        "History: {} from {} to {}, {} of {}{}.",
        plural(a.advice.events, "event", "events"),
        a.created_at,
        a.observed_until,
        plural(sp.windows, "window", "windows"),
        a.window,
        if a.descendants > 0 {
            format!(", spending of {} included", plural(a.descendants, "descendant", "descendants"))
        } else {
            String::new()
        }
    );
    print_scopes(a);
    print_spending(a);
    let d = &a.advice.denials;
    println!("\nDenials: {}", d.total);
    if !d.by_reason.is_empty() {
        let rows: Vec<Vec<String>> = d.by_reason.iter().map(|r| vec![r.reason.clone(), r.count.to_string()]).collect();
        table(&["Reason", "Count"], &rows);
    }
    let p = patch(a);
    if p.is_empty() {
        println!("\nNothing to tighten: the grant already matches the recorded use.");
    } else {
        println!("\nTo apply: PATCH /v1/agents/{} {}", a.handle, Value::Object(p));
    }
}

/// Each granted scope pattern with the scopes used under it and the advice; what was asked for
/// and not granted; the proposed scopes.
fn print_scopes(a: &AgentAdvice) {
    let s = &a.advice.scopes;
    println!("\nScopes");
    let used_under = |pattern: &str| -> String {
        let Ok(p) = bulkhead_core::ScopePattern::parse(pattern) else { return "-".into() };
        let v: Vec<String> = s
            .used
            .iter()
            .filter(|u| bulkhead_core::Scope::parse(&u.scope).is_ok_and(|sc| p.matches(&sc)))
            .map(|u| format!("{} ({})", u.scope, u.allowed + u.denied))
            .collect();
        if v.is_empty() { "never".into() } else { v.join(", ") }
    };
    let rows: Vec<Vec<String>> = s
        .changes
        .iter()
        .map(|c| {
            let advice = match c.action {
                ScopeAction::Keep => "keep".to_owned(),
                ScopeAction::Narrow => format!("narrow to {}", c.to.join(", ")),
                ScopeAction::Remove => "remove (unused)".to_owned(),
            };
            vec![c.pattern.clone(), used_under(&c.pattern), advice]
        })
        .collect();
    table(&["Granted", "Used (requests)", "Advice"], &rows);
    if !s.asked_not_granted.is_empty() {
        let v: Vec<String> = s
            .asked_not_granted
            .iter()
            .map(|x| format!("{} ({})", x.scope, plural(x.requests, "request", "requests")))
            .collect();
        println!("Asked for but not granted: {}", v.join(", "));
    }
    println!(
        "Proposed scopes: {}",
        if s.proposed.is_empty() { "none (no scope was used)".to_owned() } else { s.proposed.join(", ") }
    );
}

/// Spending per window as observed, and the limits proposed from it.
fn print_spending(a: &AgentAdvice) {
    let sp = &a.advice.spend;
    println!("\nSpending per {} window", a.window);
    println!(
        "Observed: p50 {}  p99 {}  max {}  (total {} in {}; {} with spend); largest single spend or hold {}",
        sp.per_window.p50,
        sp.per_window.p99,
        sp.per_window.max,
        sp.total,
        plural(sp.money_events, "spend or capture", "spends and captures"),
        plural(sp.windows_with_spend, "window", "windows"),
        sp.largest_single,
    );
    let proposed = |p: Option<bulkhead_core::Micros>| p.map_or("- (no spend recorded)".to_owned(), |m| m.to_string());
    table(
        &["Limit", "Granted", "Proposed"],
        &[
            vec!["Spending cap".into(), sp.granted_cap.to_string(), proposed(sp.proposed_cap)],
            vec![
                "Per-transaction limit".into(),
                sp.granted_per_tx_limit.to_string(),
                proposed(sp.proposed_per_tx_limit),
            ],
        ],
    );
    println!("Rule: {}.", sp.rule);
}

pub(crate) async fn run(args: SuggestArgs) -> anyhow::Result<ExitCode> {
    let store = args.store.open(false).await?;
    let now_ms = bulkhead_core::Clock::now_ms(&crate::serve::SystemClock);
    let advice = store.advice(&args.handle, now_ms).await;
    store.close().await;
    let Some(advice) = advice? else {
        anyhow::bail!("no agent with handle {:?} in this store", args.handle);
    };
    if args.json {
        let mut v = serde_json::to_value(&advice)?;
        if let Value::Object(o) = &mut v {
            o.insert("patch".into(), Value::Object(patch(&advice)));
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_text(&advice);
    }
    Ok(ExitCode::SUCCESS)
}
