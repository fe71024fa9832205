//! Serving HTTP/1.1: one acceptor hands each connection to the HTTP worker with the fewest open
//! ones (so that a burst of new connections is not all taken by whichever worker woke first);
//! each worker serves its connections on its own event loop, sending the gateway's calls straight
//! to it, the MCP gateway's to it, and everything else to the router. Stopping closes idle
//! connections and lets in-flight requests finish.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tower::ServiceExt;

use crate::gateway::{self, Gateway};
use crate::mcp::{self, McpGateway};

/// Where the acceptor sends one worker its connections, and how many it has open.
#[derive(Clone)]
pub struct WorkerQueue {
    tx: tokio::sync::mpsc::UnboundedSender<std::net::TcpStream>,
    open: Arc<AtomicUsize>,
}

/// A worker's end of its [`WorkerQueue`].
pub struct Connections {
    rx: tokio::sync::mpsc::UnboundedReceiver<std::net::TcpStream>,
    open: Arc<AtomicUsize>,
}

/// A queue of connections for one worker.
pub fn worker_queue() -> (WorkerQueue, Connections) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let open = Arc::new(AtomicUsize::new(0));
    (WorkerQueue { tx, open: open.clone() }, Connections { rx, open })
}

/// The default most open client connections (`--max-connections`).
pub const CONNECTIONS_MAX_DEFAULT: u32 = 10_000;
/// How long a client may take to send a request's head (hyper's header read timeout).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts connections until `stopped`, giving each to the worker with the fewest open. With
/// `connections_max` open already, a new connection is closed at once: a flood of idle
/// connections cannot exhaust the process's file descriptors or memory.
pub async fn accept(
    listener: tokio::net::TcpListener,
    mut workers: Vec<WorkerQueue>,
    connections_max: usize,
    stopped: impl Future<Output = ()>,
) {
    let mut refused_since_log = 0u64;
    let mut last_log = std::time::Instant::now() - Duration::from_secs(60);
    tokio::pin!(stopped);
    loop {
        let tcp = tokio::select! {
            biased;
            () = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    if !is_connection_error(&e) {
                        // Out of file descriptors or the like: wait, rather than spin.
                        tracing::error!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    continue;
                }
            },
        };
        let open: usize = workers.iter().map(|w| w.open.load(Ordering::Relaxed)).sum();
        if open >= connections_max {
            drop(tcp);
            refused_since_log += 1;
            if last_log.elapsed() >= Duration::from_secs(10) {
                tracing::warn!(open, refused = refused_since_log, "connection limit reached; closing new connections");
                refused_since_log = 0;
                last_log = std::time::Instant::now();
            }
            continue;
        }
        let Ok(mut tcp) = tcp.into_std() else { continue };
        loop {
            let Some((i, w)) = workers.iter().enumerate().min_by_key(|(_, w)| w.open.load(Ordering::Relaxed)) else {
                tracing::error!("no HTTP worker is left to serve connections");
                return;
            };
            w.open.fetch_add(1, Ordering::Relaxed);
            match w.tx.send(tcp) {
                Ok(()) => break,
                Err(back) => {
                    // That worker has stopped: the others take its share.
                    tracing::error!(worker = i, "an HTTP worker stopped; serving with the others");
                    tcp = back.0;
                    workers.swap_remove(i);
                }
            }
        }
    }
}

/// Counts a connection as open for as long as it lives (also when its task unwinds).
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves the connections handed to this worker until `stopped` resolves, then waits for the
/// open requests to finish.
pub async fn serve(
    mut conns: Connections,
    router: Router,
    gateway: Option<Gateway>,
    mcp: Option<McpGateway>,
    stopped: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // The timer bounds how long a client may take to send a request's head.
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    tokio::pin!(stopped);
    loop {
        let tcp = tokio::select! {
            biased;
            () = &mut stopped => break,
            tcp = conns.rx.recv() => match tcp {
                Some(tcp) => tcp,
                None => break,
            },
        };
        let open = Open(conns.open.clone());
        let peer = tcp.peer_addr().ok();
        let tcp = match tcp.set_nonblocking(true).and_then(|()| tokio::net::TcpStream::from_std(tcp)) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "a connection could not be served");
                continue;
            }
        };
        // Streamed answers (SSE) go out chunk by chunk, not held back for coalescing.
        let _ = tcp.set_nodelay(true);
        let (router, gateway, mcp) = (router.clone(), gateway.clone(), mcp.clone());
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let (router, gateway, mcp) = (router.clone(), gateway.clone(), mcp.clone());
            async move {
                let mut req = req.map(Body::new);
                if let Some(peer) = peer {
                    // Who is on the other end: `/metrics` is open only to a loopback peer.
                    req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                }
                Ok::<_, std::convert::Infallible>(match gateway {
                    Some(gw) if req.uri().path().starts_with(gateway::PREFIX) => gw.handle(req).await,
                    _ => match mcp {
                        Some(m) if req.uri().path().starts_with(mcp::PREFIX) => m.handle(req).await,
                        _ => router.oneshot(req).await?,
                    },
                })
            }
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(tcp), service));
        tokio::spawn(async move {
            let _open = open;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    // Connections handed over but not yet taken are closed.
    conns.rx.close();
    while let Ok(tcp) = conns.rx.try_recv() {
        drop(tcp);
        conns.open.fetch_sub(1, Ordering::Relaxed);
    }
    graceful.shutdown().await;
    Ok(())
}

fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
