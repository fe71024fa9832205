//! Offline commands: read the store directly (they work while a server runs).

use std::io::Write;
use std::process::ExitCode;

use bulkhead_store::VerifyReport;
use clap::Subcommand;

use crate::StoreArgs;

#[derive(Subcommand)]
pub(crate) enum AuditCmd {
    /// Check the hash chain of every stored event; exits non-zero at the first bad one.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write events as JSON lines to stdout.
    Export {
        #[command(flatten)]
        store: StoreArgs,
        /// Only this agent's events.
        #[arg(long)]
        agent: Option<String>,
    },
}

pub(crate) async fn run(cmd: AuditCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCmd::Verify { store } => {
            let store = store.open(false).await?;
            let report = store
                .verify_audit(|seq| {
                    if seq % 100_000 == 0 {
                        eprintln!("checked {seq} events…");
                    }
                })
                .await?;
            match report {
                VerifyReport::Intact { events, unkeyed } => {
                    println!("audit chain intact: {events} events verified");
                    if unkeyed > 0 && unkeyed < events {
                        println!(
                            "  the first {unkeyed} were written before the audit key and are checked by plain hash"
                        );
                    } else if unkeyed > 0 {
                        println!("  none is keyed: they were written without an audit key");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                VerifyReport::KeyNeeded { seq } => {
                    println!(
                        "audit chain keyed from event {seq}: give its key with --audit-key FILE or BULKHEAD_AUDIT_KEY"
                    );
                    Ok(ExitCode::from(2))
                }
                VerifyReport::Broken { seq, problem } => {
                    println!("audit chain BROKEN at event {seq}: {problem}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        AuditCmd::Export { store, agent } => {
            let store = store.open(false).await?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut after = 0;
            loop {
                let page = store.audit_page(agent.as_deref(), after, 5_000).await?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                for e in &page {
                    serde_json::to_writer(&mut out, e)?;
                    out.write_all(b"\n")?;
                }
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
