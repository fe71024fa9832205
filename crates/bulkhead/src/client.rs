//! `bulkhead agent …`: manage agents on a running server over its HTTP API.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

#[derive(Args, Clone)]
pub(crate) struct Conn {
    /// Base URL of the server.
    #[arg(long, env = "BULKHEAD_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Data directory whose admin-token file to use when BULKHEAD_ADMIN_TOKEN is unset.
    #[arg(long, env = "BULKHEAD_DATA", default_value = "./bulkhead-data")]
    data: PathBuf,
    /// Print the raw JSON answer instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub(crate) enum AgentCmd {
    /// Create an agent; prints its key once.
    Create {
        #[command(flatten)]
        conn: Conn,
        handle: String,
        /// Scopes, comma-separated (e.g. payments:write,invoices:read).
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// Spending cap per window, e.g. 50.00.
        #[arg(long)]
        cap: String,
        /// Reset window, e.g. 24h.
        #[arg(long)]
        window: Option<String>,
        /// Per-transaction limit (defaults to the cap).
        #[arg(long)]
        per_tx: Option<String>,
        /// Lifetime cap.
        #[arg(long)]
        lifetime: Option<String>,
        /// Key expiry, e.g. 30d.
        #[arg(long)]
        expires_in: Option<String>,
    },
    /// List agents.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Show one agent.
    Show {
        #[command(flatten)]
        conn: Conn,
        handle: String,
    },
    /// Revoke an agent and all its descendants.
    Revoke {
        #[command(flatten)]
        conn: Conn,
        handle: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Issue a new key; the old one stops working at once.
    Rotate {
        #[command(flatten)]
        conn: Conn,
        handle: String,
    },
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    fn new(conn: &Conn) -> anyhow::Result<Client> {
        let token = match std::env::var("BULKHEAD_ADMIN_TOKEN") {
            Ok(t) if !t.is_empty() => t,
            _ => {
                let p = conn.data.join("admin-token");
                std::fs::read_to_string(&p)
                    .with_context(|| {
                        format!(
                            "set BULKHEAD_ADMIN_TOKEN or point --data at the server's data dir ({} not readable)",
                            p.display()
                        )
                    })?
                    .trim()
                    .to_owned()
            }
        };
        Ok(Client { http: reqwest::Client::new(), base: conn.url.trim_end_matches('/').to_owned(), token })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("cannot reach {}", self.base))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let code = v["error"]["code"].as_str().unwrap_or("error");
            let msg = v["error"]["message"].as_str().unwrap_or("");
            anyhow::bail!("{} {code}: {msg}", status.as_u16());
        }
        Ok(v)
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// Prints rows as an aligned text table.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for r in rows {
        line(r.clone());
    }
}

pub(crate) fn agent_row(a: &Value) -> Vec<String> {
    vec![
        s(&a["handle"]),
        s(&a["status"]),
        format!("{} / {}", s(&a["spending_cap"]), s(&a["window"])),
        s(&a["usage"]["window_spent"]),
        format!("{:.0}%", a["usage"]["utilization"].as_f64().unwrap_or(0.0) * 100.0),
        s(&a["scopes"]),
        s(&a["parent"]),
    ]
}

pub(crate) const AGENT_HEADERS: [&str; 7] = ["AGENT", "STATUS", "CAP", "SPENT", "USED", "SCOPES", "PARENT"];

/// Runs one `bulkhead agent` subcommand against a server. One arm per subcommand, each a request
/// and how its answer is printed, so the function is as long as the list of subcommands.
pub(crate) async fn run(cmd: AgentCmd) -> anyhow::Result<ExitCode> {
    use reqwest::Method;
    match cmd {
        AgentCmd::Create { conn, handle, scopes, cap, window, per_tx, lifetime, expires_in } => {
            let c = Client::new(&conn)?;
            let mut body = json!({"handle": handle, "scopes": scopes, "spending_cap": cap});
            for (k, v) in
                [("window", window), ("per_tx_limit", per_tx), ("lifetime_cap", lifetime), ("expires_in", expires_in)]
            {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            let v = c.call(Method::POST, "/v1/agents", Some(body)).await?;
            if conn.json {
                println!("{v}");
            } else {
                table(&AGENT_HEADERS, &[agent_row(&v)]);
                println!("\nkey (shown once, store it now): {}", s(&v["key"]));
            }
        }
        AgentCmd::List { conn } => {
            let c = Client::new(&conn)?;
            let mut all = Vec::new();
            let mut after = String::new();
            loop {
                let v = c.call(Method::GET, &format!("/v1/agents?limit=1000&after={after}"), None).await?;
                let page = v["agents"].as_array().cloned().unwrap_or_default();
                let Some(last) = page.last() else { break };
                after = s(&last["handle"]);
                all.extend(page);
            }
            if conn.json {
                println!("{}", json!({"agents": all}));
            } else {
                table(&AGENT_HEADERS, &all.iter().map(agent_row).collect::<Vec<_>>());
            }
        }
        AgentCmd::Show { conn, handle } => {
            let c = Client::new(&conn)?;
            let v = c.call(Method::GET, &format!("/v1/agents/{handle}"), None).await?;
            if conn.json {
                println!("{v}");
            } else {
                table(&AGENT_HEADERS, &[agent_row(&v)]);
                println!(
                    "\nwindow: {} .. {}   held: {}   lifetime spent: {}   allowed: {}   denied: {}",
                    s(&v["usage"]["window_started_at"]),
                    s(&v["usage"]["window_resets_at"]),
                    s(&v["usage"]["window_held"]),
                    s(&v["usage"]["lifetime_spent"]),
                    s(&v["usage"]["tx_count"]),
                    s(&v["usage"]["denied_count"]),
                );
            }
        }
        AgentCmd::Revoke { conn, handle, reason } => {
            let c = Client::new(&conn)?;
            let v =
                c.call(Method::POST, &format!("/v1/agents/{handle}/revoke"), Some(json!({"reason": reason}))).await?;
            if conn.json {
                println!("{v}");
            } else {
                println!("revoked at {}: {}", s(&v["revoked_at"]), s(&v["revoked"]));
            }
        }
        AgentCmd::Rotate { conn, handle } => {
            let c = Client::new(&conn)?;
            let v = c.call(Method::POST, &format!("/v1/agents/{handle}/keys"), None).await?;
            if conn.json {
                println!("{v}");
            } else {
                println!("new key for {handle} (shown once; the old key no longer works): {}", s(&v["key"]));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
