//! `bulkhead serve`: open the store, start the ledger, serve HTTP, shut down gracefully.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bulkhead_core::Clock;
use bulkhead_server::{AppState, Gateway, McpCatalog, McpGateway, app, install_metrics, spawn_metrics_upkeep};
use bulkhead_store::{AuditKey, Ledger, LedgerConfig, Store};

use crate::ServeArgs;
use crate::config::Config;

/// The wall clock, read only here and handed to everything else.
pub struct SystemClock;

impl Clock for SystemClock {
    // The one place the wall clock is read (`clippy.toml` bans it everywhere else).
    #[allow(clippy::disallowed_methods)]
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
    }
}

/// The shortest admin token accepted (contract §12).
pub const ADMIN_TOKEN_CHARS_MIN: usize = 32;

/// Refuses an admin token that is short enough to guess or shaped like an agent key (a `bk_`
/// token would be read as an agent's credential). The message never contains the token.
fn check_admin_token(token: &str, from: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        token.chars().count() >= ADMIN_TOKEN_CHARS_MIN,
        "the admin token from {from} is too short: it needs at least {ADMIN_TOKEN_CHARS_MIN} characters \
         (unset it to have one generated)"
    );
    anyhow::ensure!(!token.starts_with("bk_"), "the admin token from {from} starts with `bk_`, which marks agent keys");
    anyhow::ensure!(
        token.bytes().all(|b| b.is_ascii_graphic()),
        "the admin token from {from} must be printable ASCII without spaces"
    );
    Ok(())
}

/// The admin token: from the environment, else from `DIR/admin-token`, generated on first start.
pub fn admin_token(data: &Path) -> anyhow::Result<String> {
    if let Ok(t) = std::env::var("BULKHEAD_ADMIN_TOKEN")
        && !t.is_empty()
    {
        check_admin_token(&t, "BULKHEAD_ADMIN_TOKEN")?;
        return Ok(t);
    }
    let path = data.join("admin-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        anyhow::ensure!(!t.is_empty(), "{} is empty", path.display());
        check_admin_token(&t, &path.display().to_string())?;
        return Ok(t);
    }
    let token = format!("bha_{}", bulkhead_core::key::random_base62(&mut rand::rng(), 40));
    write_secret(&path, &token)?;
    eprintln!("generated an admin token; it is in {} (mode 0600)", path.display());
    Ok(token)
}

/// The audit key (contract §12): from `BULKHEAD_AUDIT_KEY`, else from `DIR/audit-key`, generated
/// on first start. Servers sharing a PostgreSQL store must share it (the same variable, or a copy
/// of the file).
pub fn audit_key(data: &Path) -> anyhow::Result<AuditKey> {
    if let Some(k) = env_audit_key()? {
        return Ok(k);
    }
    let path = data.join("audit-key");
    if let Some(k) = read_audit_key(&path)? {
        return Ok(k);
    }
    let key = AuditKey::generate();
    write_secret(&path, &format!("{}\n", key.to_hex()))?;
    eprintln!("generated an audit key; it is in {} (mode 0600): keep a copy, `audit verify` needs it", path.display());
    Ok(key)
}

/// `BULKHEAD_AUDIT_KEY`, when set.
pub fn env_audit_key() -> anyhow::Result<Option<AuditKey>> {
    match std::env::var("BULKHEAD_AUDIT_KEY") {
        Ok(t) if !t.is_empty() => {
            AuditKey::from_hex(&t).map(Some).map_err(|e| anyhow::anyhow!("BULKHEAD_AUDIT_KEY: {e}"))
        }
        _ => Ok(None),
    }
}

/// An audit key file, when it exists.
pub fn read_audit_key(path: &Path) -> anyhow::Result<Option<AuditKey>> {
    match std::fs::read_to_string(path) {
        Ok(t) => AuditKey::from_hex(&t).map(Some).map_err(|e| anyhow::anyhow!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

#[cfg(unix)]
fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(secret.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

#[cfg(not(unix))]
fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    std::fs::write(path, secret).with_context(|| format!("cannot write {}", path.display()))
}

/// Takes an exclusive lock on `DIR/serve.lock` for the life of the process.
fn lock_data_dir(data: &Path) -> anyhow::Result<std::fs::File> {
    let path = data.join("serve.lock");
    let mut open = std::fs::OpenOptions::new();
    open.create(true).truncate(false).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
    let f = open.open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {
            anyhow::bail!("another `bulkhead serve` is already using {}", data.display())
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

/// One HTTP worker: a thread with an event loop of its own serving the connections it is handed
/// until `stop`. The returned receiver answers when it has finished its in-flight requests.
fn spawn_worker(
    i: usize,
    conns: bulkhead_server::http::Connections,
    router: axum::Router,
    gateway: Option<Gateway>,
    mcp: Option<McpGateway>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<std::io::Result<()>>> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name(format!("bulkhead-http-{i}")).spawn(move || {
        let served = tokio::runtime::Builder::new_current_thread().enable_all().build().and_then(|rt| {
            rt.block_on(async move {
                let stopped = async move {
                    while !*stop.borrow_and_update() {
                        if stop.changed().await.is_err() {
                            break;
                        }
                    }
                };
                bulkhead_server::http::serve(conns, router, gateway, mcp, stopped).await
            })
        });
        let _ = done_tx.send(served);
    })?;
    Ok(done_rx)
}

/// `bulkhead serve`: check the config, open the store, start the ledger and its background
/// work, serve HTTP until a signal (or until the ledger stops on its own: exit 70), then stop in
/// order — HTTP first, then the gateways' settlements, then the background work, the writer last.
pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    init_tracing();
    let config = Config::load(args.config.as_deref())?;
    let upstreams = config.upstreams()?;
    let mcp_servers = config.mcp_servers()?;
    let breaker = config.breaker()?;
    let limits = config.limits()?;
    let (alert_rules, alert_secret) = config.alerts()?;
    if !alert_rules.webhooks.is_empty() && alert_secret.is_none() {
        tracing::warn!("[alerts] has no secret_env: webhook deliveries are not signed");
    }
    // TLS (https webhooks and upstreams) uses rustls on the ring provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    crate::datadir::make_private(&args.data)?;
    let token = admin_token(&args.data)?;
    let (store, _dir_lock) = open_store(&args).await?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let alerting = !alert_rules.webhooks.is_empty();
    let (ledger, writer) = Ledger::start(
        store.clone(),
        clock.clone(),
        LedgerConfig { breaker, alerts: alert_rules, limits, ..LedgerConfig::default() },
    );
    let sweeper = ledger.spawn_sweeper(Duration::from_secs(1));
    // Deliveries also drain alerts left in the outbox by an earlier run.
    let delivery = alerting.then(|| {
        bulkhead_server::alerts::spawn_alert_delivery(
            store.clone(),
            clock.clone(),
            alert_secret.map(bulkhead_server::alerts::SigningSecret::new),
        )
    });
    // Installed before the gateway, which makes its series when it is built.
    let metrics = install_metrics();
    let upkeep = spawn_metrics_upkeep(metrics.clone());
    let catalog = McpCatalog::of(&mcp_servers);
    let gateways = Gateways::start(&ledger, upstreams, mcp_servers)?;
    let state =
        AppState { ledger, admin_token: Arc::from(token), metrics, metrics_open: args.listen.ip().is_loopback() };
    let router = app(state).layer(axum::Extension(catalog));
    let http = Http::start(&args, router, &gateways).await?;
    tracing::info!(addr = %http.addr, store = ?store.backend(), workers = http.workers, "bulkhead listening");
    println!("bulkhead listening on http://{}", http.addr);
    let mut writer = writer;
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = &mut writer => {
            // The ledger stops on its own only when an invariant broke (a balance assertion).
            // Stop the process rather than keep answering without it.
            tracing::error!("the ledger stopped unexpectedly; exiting");
            return Ok(ExitCode::from(70));
        }
    }
    http.stop().await;
    gateways.close().await;
    sweeper.abort();
    let _ = sweeper.await;
    upkeep.abort();
    if let Some(d) = delivery {
        d.abort();
        let _ = d.await;
    }
    // Every ledger handle is gone now; the writer commits what it has and stops.
    let _ = writer.await;
    store.close().await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info,sqlx=warn`).
fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into a log file or a collector.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The store (PostgreSQL at `--database-url`, else the embedded file in the data dir) with its
/// audit key, and for the embedded store the data dir's lock, held for the life of the process.
async fn open_store(args: &ServeArgs) -> anyhow::Result<(Store, Option<std::fs::File>)> {
    // One server per embedded store: its writer is the file's only writer (it caches what it
    // committed), so a second `serve` on the same data dir must not start.
    let dir_lock = match &args.database_url {
        Some(_) => None,
        None => Some(lock_data_dir(&args.data)?),
    };
    let audit_key = audit_key(&args.data)?;
    let store = match &args.database_url {
        Some(url) => Store::open(url).await.context("cannot open the PostgreSQL store")?,
        None => Store::open_dir(&args.data).await.context("cannot open the embedded store")?,
    };
    Ok((store.with_audit_key(audit_key), dir_lock))
}

/// The agent gateway and the MCP gateway, each when the config has servers for it.
struct Gateways {
    gateway: Option<Gateway>,
    mcp: Option<McpGateway>,
}

impl Gateways {
    fn start(
        ledger: &Ledger,
        upstreams: Vec<bulkhead_server::gateway::Upstream>,
        mcp_servers: Vec<bulkhead_server::mcp::config::McpServer>,
    ) -> anyhow::Result<Gateways> {
        let gateway = if upstreams.is_empty() {
            None
        } else {
            let names: Vec<String> = upstreams.iter().map(|u| u.name.clone()).collect();
            tracing::info!(upstreams = ?names, "agent gateway on /proxy/{{upstream}}/…");
            Some(Gateway::new(ledger.clone(), upstreams).map_err(|e| anyhow::anyhow!("[[upstream]] {e}"))?)
        };
        let mcp = if mcp_servers.is_empty() {
            None
        } else {
            let names: Vec<String> = mcp_servers.iter().map(|s| s.name.clone()).collect();
            tracing::info!(servers = ?names, "MCP gateway on /mcp/{{server}}");
            Some(McpGateway::new(ledger.clone(), mcp_servers).map_err(|e| anyhow::anyhow!("[[mcp_server]] {e}"))?)
        };
        Ok(Gateways { gateway, mcp })
    }

    /// Settles what the gateways still owe: calls answered before the stop are settled and
    /// unused slots given back; local MCP servers stop with the last handle, and settlements
    /// under way hold the ledger open until they are done.
    async fn close(self) {
        if let Some(gw) = self.gateway {
            gw.close().await;
        }
        if let Some(m) = self.mcp {
            m.close().await;
        }
    }
}

/// The HTTP side: the acceptor and `--workers` workers, each with a handle on the one router
/// and its own gateways and upstream connection pools.
struct Http {
    addr: std::net::SocketAddr,
    workers: usize,
    stop: tokio::sync::watch::Sender<bool>,
    acceptor: tokio::task::JoinHandle<()>,
    served: Vec<tokio::sync::oneshot::Receiver<std::io::Result<()>>>,
}

impl Http {
    async fn start(args: &ServeArgs, router: axum::Router, gateways: &Gateways) -> anyhow::Result<Http> {
        let workers = args
            .workers
            .map(usize::from)
            .unwrap_or_else(|| std::thread::available_parallelism().map(std::num::NonZeroUsize::get).unwrap_or(1));
        let workers = workers.max(1);
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut served = Vec::new();
        let mut queues = Vec::new();
        for i in 0..workers {
            let (queue, conns) = bulkhead_server::http::worker_queue();
            queues.push(queue);
            let worker_gateway = match &gateways.gateway {
                Some(gw) => Some(gw.for_worker().map_err(|e| anyhow::anyhow!("[[upstream]] {e}"))?),
                None => None,
            };
            let worker_mcp = match &gateways.mcp {
                Some(m) => Some(m.for_worker().map_err(|e| anyhow::anyhow!("[[mcp_server]] {e}"))?),
                None => None,
            };
            served.push(spawn_worker(i, conns, router.clone(), worker_gateway, worker_mcp, stop_rx.clone())?);
        }
        let max_connections = usize::try_from(args.max_connections).unwrap_or(usize::MAX);
        let acceptor = tokio::spawn(bulkhead_server::http::accept(listener, queues, max_connections, {
            let mut stop = stop_rx.clone();
            async move {
                let _ = stop.wait_for(|s| *s).await;
            }
        }));
        Ok(Http { addr, workers, stop, acceptor, served })
    }

    /// Stops accepting, closes idle connections and waits for requests under way to finish.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.acceptor.await;
        for done in self.served {
            if let Ok(Err(e)) = done.await {
                tracing::error!(error = %e, "an HTTP worker failed");
            }
        }
    }
}
