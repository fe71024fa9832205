//! Connections to one upstream, kept open between calls: one pool per upstream per HTTP worker.
//!
//! A call checks out an idle connection (the most recently used first) or opens one, sends its
//! request on it, and gives it back when the answer's body is dropped (see [`Conn`]). A request
//! that a reused connection gave back unsent (the upstream closed it as the call began) is sent
//! again on another connection; nothing that reached the upstream is ever sent twice.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::time::Instant;
use tower::Service;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Idle connections kept per pool; more are closed when given back.
const IDLE_MAX: usize = 256;
/// An idle connection unused for this long is closed rather than reused.
const IDLE_FOR: Duration = Duration::from_secs(60);

pub(crate) struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// Where connections go (scheme and authority; the path is not used).
    target: Uri,
    /// Oldest first; calls take the most recently used.
    idle: Mutex<VecDeque<(SendRequest<Body>, Instant)>>,
}

/// A checked-out connection; dropping it gives it back to its pool (once its answer is over).
pub struct Conn {
    tx: Option<SendRequest<Body>>,
    pool: Arc<Pool>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(mut tx) = self.tx.take() else { return };
        if tx.is_closed() {
            return;
        }
        if tx.is_ready() {
            self.pool.put(tx);
            return;
        }
        // The connection still finishes the answer (its end is read by its own task): give it
        // back once it can take the next request, if it survives.
        let pool = self.pool.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if tokio::time::timeout(Duration::from_secs(5), tx.ready()).await.is_ok_and(|r| r.is_ok()) {
                    pool.put(tx);
                }
            });
        }
    }
}

impl Pool {
    pub(crate) fn new(connector: HttpsConnector<HttpConnector>, target: Uri) -> Arc<Pool> {
        Arc::new(Pool { connector, target, idle: Mutex::new(VecDeque::new()) })
    }

    fn put(&self, tx: SendRequest<Body>) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Connections left over from a busier moment are closed once idle for IDLE_FOR.
        while idle.front().is_some_and(|(tx, since)| tx.is_closed() || now.duration_since(*since) >= IDLE_FOR) {
            idle.pop_front();
        }
        if idle.len() < IDLE_MAX {
            idle.push_back((tx, now));
        }
    }

    fn checkout(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((tx, since)) = idle.pop_back() {
            if tx.is_ready() && since.elapsed() < IDLE_FOR {
                return Some(tx);
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<Body>, BoxError> {
        let io = self.connector.clone().call(self.target.clone()).await?;
        let (tx, conn) = hyper::client::conn::http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(tx)
    }

    /// Sends `req` (its URI in origin form, its `Host` set) and returns the answer's head, its
    /// body, and the connection to give back when the body is done.
    ///
    /// `sending` is set once the request starts out on a connection: from then on the upstream
    /// may have received it, also when the caller stops waiting (its deadline) before this ends.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
        sending: &AtomicBool,
    ) -> Result<(Response<Incoming>, Conn), SendError> {
        loop {
            let (mut tx, reused) = match self.checkout() {
                Some(tx) => (tx, true),
                None => (self.connect().await.map_err(SendError::NotSent)?, false),
            };
            sending.store(true, Ordering::Relaxed);
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Conn { tx: Some(tx), pool: self.clone() })),
                Err(mut e) => match e.take_message() {
                    // Never sent: the idle connection was closed under it. Another one.
                    Some(r) if reused => {
                        sending.store(false, Ordering::Relaxed);
                        req = r;
                    }
                    Some(_) => {
                        sending.store(false, Ordering::Relaxed);
                        return Err(SendError::NotSent(Box::new(e.into_error())));
                    }
                    None => return Err(SendError::MaybeSent(Box::new(e.into_error()))),
                },
            }
        }
    }
}

/// Why a call got no answer, split by what matters for its bill: whether it may have reached
/// the upstream (contract §12: a call that left is paid for; one that never left is free).
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection could be made, or the request was handed back unsent.
    NotSent(BoxError),
    /// The request was (at least partly) written: the upstream may have received it.
    MaybeSent(BoxError),
}

impl SendError {
    pub(crate) fn into_inner(self) -> BoxError {
        match self {
            SendError::NotSent(e) | SendError::MaybeSent(e) => e,
        }
    }
}
