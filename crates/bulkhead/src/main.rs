//! The `bulkhead` binary: a thin CLI over the library crates.
//!
//! Flags are parsed in two stages: clap reads raw flags (with environment fallbacks, flags
//! winning), then each command turns them into checked settings before doing anything.

mod client;
mod config;
mod datadir;
mod demo;
mod offline;
mod report;
pub mod serve;
mod suggest;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bulkhead",
    version,
    about = "A bulkhead around every AI agent: its own key, hard spending caps, scopes, revocation and audit."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (embedded SQLite store by default, PostgreSQL with --database-url).
    Serve(ServeArgs),
    /// Apply store migrations and exit.
    Migrate(StoreArgs),
    /// Manage agents on a running server.
    #[command(subcommand)]
    Agent(client::AgentCmd),
    /// Read or check the audit trail straight from the store.
    #[command(subcommand)]
    Audit(offline::AuditCmd),
    /// Print the blast radius of every live agent (reads the store directly).
    Report(report::ReportArgs),
    /// Propose least-privilege scopes and limits from an agent's recorded history (reads the store directly).
    Suggest(suggest::SuggestArgs),
    /// Tell the product's story in under a minute on a throwaway data dir.
    Demo(demo::DemoArgs),
}

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "BULKHEAD_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Data directory (SQLite store, generated admin token).
    #[arg(long, env = "BULKHEAD_DATA", default_value = "./bulkhead-data")]
    data: PathBuf,
    /// TOML config file ([breaker], [alerts], [[upstream]]).
    #[arg(long, env = "BULKHEAD_CONFIG")]
    config: Option<PathBuf>,
    /// PostgreSQL URL for the shared store (several replicas may use one database).
    #[arg(long, env = "BULKHEAD_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// HTTP worker threads, each with its own event loop, accepting from one socket
    /// [default: the number of CPUs].
    #[arg(long, env = "BULKHEAD_WORKERS", value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: Option<u16>,
    /// Open client connections at most; a connection beyond it is closed at once.
    #[arg(long, env = "BULKHEAD_MAX_CONNECTIONS", default_value_t = bulkhead_server::http::CONNECTIONS_MAX_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
}

/// Where an offline command finds the store: `--data DIR` or `--database-url URL`.
#[derive(Args, Clone, Debug)]
pub struct StoreArgs {
    /// Data directory of an embedded store.
    #[arg(long)]
    data: Option<PathBuf>,
    /// PostgreSQL URL of a shared store.
    #[arg(long)]
    database_url: Option<String>,
    /// The audit key file (default: `BULKHEAD_AUDIT_KEY`, else `DIR/audit-key` of an embedded
    /// store). A keyed chain cannot be verified without it.
    #[arg(long, value_name = "FILE")]
    audit_key: Option<PathBuf>,
}

impl StoreArgs {
    /// Flags win over the environment; both flags at once is an error.
    pub async fn open(&self, migrate: bool) -> anyhow::Result<bulkhead_store::Store> {
        if self.data.is_some() && self.database_url.is_some() {
            anyhow::bail!("give either --data or --database-url, not both");
        }
        let url = self.database_url.clone().or_else(|| {
            if self.data.is_some() {
                None
            } else {
                std::env::var("BULKHEAD_DATABASE_URL").ok().filter(|s| !s.is_empty())
            }
        });
        let mut key = match &self.audit_key {
            Some(file) => Some(
                serve::read_audit_key(file)?.ok_or_else(|| anyhow::anyhow!("no audit key at {}", file.display()))?,
            ),
            None => serve::env_audit_key()?,
        };
        let store = match url {
            Some(url) => bulkhead_store::Store::connect(&url).await?,
            None => {
                let dir = self
                    .data
                    .clone()
                    .or_else(|| std::env::var_os("BULKHEAD_DATA").map(PathBuf::from))
                    .unwrap_or_else(|| PathBuf::from("./bulkhead-data"));
                if key.is_none() {
                    key = serve::read_audit_key(&dir.join("audit-key"))?;
                }
                if migrate {
                    datadir::make_private(&dir)?;
                    bulkhead_store::Store::open_dir(&dir).await?
                } else {
                    bulkhead_store::Store::open_existing_dir(&dir).await?
                }
            }
        };
        if migrate {
            store.migrate().await?;
        }
        Ok(match key {
            Some(k) => store.with_audit_key(k),
            None => store,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Cmd::Serve(args) => serve::run(args).await,
            Cmd::Migrate(args) => {
                args.open(true).await?;
                println!("migrations applied");
                Ok(ExitCode::SUCCESS)
            }
            Cmd::Agent(cmd) => client::run(cmd).await,
            Cmd::Audit(cmd) => offline::run(cmd).await,
            Cmd::Demo(args) => demo::run(args).await,
            Cmd::Report(args) => report::run(args).await,
            Cmd::Suggest(args) => suggest::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
