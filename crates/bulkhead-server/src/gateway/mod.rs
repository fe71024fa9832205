//! The agent gateway (contract §8): `ANY /proxy/{upstream}/{path…}`.
//!
//! An agent calls an upstream API through Bulkhead with its own key; Bulkhead holds the real
//! secret. Each call:
//!
//! 1. finds the upstream (404), checks the key's form (401) and the path (400: no dot segments,
//!    encoded separators or bad escapes), and the declared body size (413);
//! 2. takes a slot of `max_cost_per_request` from the key's lease (see [`lease`]): key,
//!    revocation, suspension, scope, rate limit and every cap are checked by the ledger when the
//!    lease is granted, in the contract's order, and a denial is answered with the ledger's
//!    status and body; the upstream never sees it;
//! 3. checks the `routes` allow-list (403) and forwards the call (see `request.rs`): path and
//!    query kept, the agent's `Authorization` (and any header named like the upstream's auth
//!    header) removed, hop-by-hop headers dropped, the real secret set; the request body streams
//!    (only a token-priced JSON body is read first, to bound its worst case and, for OpenAI, to
//!    ask for streamed usage);
//! 4. streams the answer back (SSE chunk by chunk) and bills the call: the price
//!    (`per_request`), the price header, or the metered token usage, at most the slot; the rest
//!    is released when the flusher settles it, about 25 ms later. Usage that cannot be
//!    read is charged as the whole slot, never as free.
//!
//! A call that left is paid for (contract §12): once the request started out to the upstream,
//! a timeout, a connection that broke, or an answer cut off or past `max_duration` is charged
//! its metered usage or, when none could be read, the whole slot. A call that never left (no
//! connection) and an upstream 5xx capture nothing unless the upstream sets
//! `charge_failures = true`.

pub mod bill;
pub mod body;
pub mod bound;
pub mod config;
pub mod lease;
pub mod meter;
pub mod path;
mod request;
mod settle;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, Uri, header};
use axum::response::{IntoResponse, Response};
use bulkhead_core::{KeyHash, Micros};
use bulkhead_store::Ledger;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::time::Instant;

use self::bill::Bill;
use self::body::{Metering, Relay};
use self::config::Pricing;
pub use self::config::{PricingSpec, Secret, Upstream, UpstreamSpec, check_upstreams};
use self::lease::{Acquired, Leases};
use self::meter::Meter;
pub use self::request::ask_for_stream_usage;
use crate::error::ApiError;
use crate::metrics::{GATEWAY_CALLS, RouteTimers};
use crate::upstream_http::pool::{self, Conn, Pool};
use crate::upstream_http::{connector_for, drop_hop_by_hop, host_header, too_large};

/// The path prefix of proxied calls.
pub const PREFIX: &str = "/proxy/";

/// An upstream's answer as it arrives.
type Answer = hyper::Response<hyper::body::Incoming>;

/// One configured upstream, its connection pool and its counters.
struct Route {
    up: Upstream,
    name: Arc<str>,
    /// The `Host` the upstream is called with.
    host: HeaderValue,
    pool: Arc<Pool>,
    calls: Calls,
}

/// `bulkhead_gateway_calls_total` of one upstream, one counter per result.
struct Calls {
    forwarded: metrics::Counter,
    denied: metrics::Counter,
    timeout: metrics::Counter,
    upstream_error: metrics::Counter,
    too_large: metrics::Counter,
}

impl Calls {
    fn new(upstream: &str) -> Calls {
        let c = |result: &'static str| metrics::counter!(GATEWAY_CALLS, "upstream" => upstream.to_owned(), "result" => result);
        Calls {
            forwarded: c("forwarded"),
            denied: c("denied"),
            timeout: c("timeout"),
            upstream_error: c("upstream_error"),
            too_large: c("too_large"),
        }
    }
}

/// The gateway: its leases (and through them the ledger), and the upstreams. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    leases: Leases,
    routes: HashMap<String, Route>,
    timers: RouteTimers,
}

impl Gateway {
    /// Builds the gateway, one connection pool per upstream, and starts the lease flusher (so it
    /// must be called inside the runtime, after the metrics recorder is installed). Fails when an
    /// `https` upstream finds no root certificates on the system.
    pub fn new(ledger: Ledger, upstreams: Vec<Upstream>) -> Result<Gateway, String> {
        Gateway::build(Leases::start(ledger, bulkhead_store::LeaseAudit::Settlement), upstreams.iter())
    }

    fn build<'a>(leases: Leases, upstreams: impl Iterator<Item = &'a Upstream>) -> Result<Gateway, String> {
        let mut routes = HashMap::new();
        for up in upstreams {
            let target: Uri = format!("{}://{}/", up.scheme, up.authority)
                .parse()
                .map_err(|e| format!("upstream {:?}: {e}", up.name))?;
            let host = host_header(&target).map_err(|e| format!("upstream {:?}: {e}", up.name))?;
            routes.insert(
                up.name.clone(),
                Route {
                    name: Arc::from(up.name.as_str()),
                    host,
                    pool: Pool::new(connector(up)?, target),
                    calls: Calls::new(&up.name),
                    up: up.clone(),
                },
            );
        }
        Ok(Gateway { inner: Arc::new(Inner { leases, routes, timers: RouteTimers::new("/proxy/{*rest}") }) })
    }

    /// The same gateway (same upstreams, same leases) with connection pools of its own: one per
    /// HTTP worker thread, so that a worker's calls go out on connections its own event loop
    /// drives.
    pub fn for_worker(&self) -> Result<Gateway, String> {
        Gateway::build(self.inner.leases.clone(), self.inner.routes.values().map(|r| &r.up))
    }

    /// Settles every call and gives back every unused slot; call it once the server stopped
    /// answering requests, before the ledger stops.
    pub async fn close(&self) {
        self.inner.leases.close().await;
    }

    /// Answers one proxied call (a request under [`PREFIX`]), timed like every other route.
    pub async fn handle(&self, req: Request) -> Response {
        let started = tokio::time::Instant::now();
        let method = req.method().clone();
        let resp = match self.forward(req, started).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
        self.inner.timers.record(&method, resp.status(), started.elapsed());
        resp
    }
}

fn connector(up: &Upstream) -> Result<HttpsConnector<HttpConnector>, String> {
    connector_for(&format!("upstream {:?}", up.name), up.scheme == "https", up.connect_timeout)
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// A call stopped after its slot was taken and before an answer came: what it is charged, and
/// what the agent is told.
struct Stop {
    charge: Micros,
    error: ApiError,
}

impl Stop {
    /// Stopped before anything was sent: nothing is charged.
    fn free(error: ApiError) -> Stop {
        Stop { charge: Micros::ZERO, error }
    }
}

impl Gateway {
    /// Forwards one call that arrived at `started` (its `max_duration` counts from then), step by
    /// step: upstream, key and path → slot → route check → body read and bounded → request built
    /// → sent → answer relayed and billed.
    async fn forward(&self, req: Request, started: Instant) -> Result<Response, ApiError> {
        let (parts, body) = req.into_parts();
        let Parts { method, uri, headers, .. } = parts;
        let (route, rest, key) = self.admit(&uri, &headers)?;
        // The slot comes before the body is read: a refused key costs no body read.
        let bill = match self.take_slot(route, &key).await? {
            Ok(bill) => bill,
            Err(denied) => return Ok(denied),
        };
        // From here on the slot is held: a call stopped before its answer pays what its `Stop` says.
        let sent = async {
            route.check_route(&method, rest).map_err(Stop::free)?;
            let over = Arc::new(AtomicBool::new(false));
            let out = request::read_body(route, &method, &headers, rest, body, &over).await.map_err(Stop::free)?;
            let strip = out.strip;
            let ureq = request::upstream_request(route, method, headers, rest, uri.query(), out).map_err(Stop::free)?;
            let (resp, conn) = route.send(ureq, &over).await?;
            Ok::<_, Stop>((resp, conn, strip))
        };
        match sent.await {
            Ok((resp, conn, strip)) => Ok(route.relay(resp, conn, bill, strip, started)),
            Err(Stop { charge, error }) => {
                bill.finish(charge);
                Err(error)
            }
        }
    }

    /// The call's upstream (404), its key's form (401), its path (400: dot segments, encoded
    /// separators or bad escapes) and its declared body size (413), before the ledger is asked.
    fn admit<'a>(&self, uri: &'a Uri, headers: &HeaderMap) -> Result<(&Route, &'a str, KeyHash), ApiError> {
        let (name, rest) =
            path::split(uri.path()).map_err(|_| ApiError::not_found("No upstream with that name is configured."))?;
        let route = self
            .inner
            .routes
            .get(name)
            .ok_or_else(|| ApiError::not_found("No upstream with that name is configured."))?;
        let key = crate::auth::agent_key(headers)?;
        path::check_segments(rest, true).map_err(|e| {
            let why = match e {
                path::PathError::Tricky(why) => why,
                path::PathError::NotProxy => "no upstream",
            };
            ApiError::invalid(format!("The proxied path has {why}; it is refused."))
        })?;
        if content_length(headers).is_some_and(|n| n > route.up.max_request_bytes) {
            route.calls.too_large.increment(1);
            return Err(too_large(route.up.max_request_bytes));
        }
        Ok((route, rest, key))
    }

    /// The call's slot: every check of the contract, in its order, decided by a committed lease;
    /// or the ledger's denial, answered as the ledger gives it.
    async fn take_slot(&self, route: &Route, key: &KeyHash) -> Result<Result<Bill, Response>, ApiError> {
        let up = &route.up;
        match self
            .inner
            .leases
            .acquire(key, &route.name, &up.scope, up.max_cost, up.hold_ms(), route.abandoned())
            .await?
        {
            Acquired::Go(bill) => Ok(Ok(bill)),
            Acquired::Denied(reply) => {
                route.calls.denied.increment(1);
                Ok(Err(crate::reply::respond(reply)))
            }
        }
    }
}

impl Route {
    /// What a call that left is charged when its cost cannot be known: the price of a
    /// fixed-price upstream, else the whole slot.
    fn abandoned(&self) -> Micros {
        match self.up.pricing {
            Pricing::PerRequest(p) => p,
            _ => self.up.max_cost,
        }
    }

    /// Refuses (403) a call the upstream's `routes` allow-list does not name.
    fn check_route(&self, method: &Method, rest: &str) -> Result<(), ApiError> {
        if let Some(rules) = &self.up.routes
            && !rules.iter().any(|r| r.allows(method.as_str(), rest))
        {
            self.calls.denied.increment(1);
            return Err(ApiError::new(
                403,
                "route_not_allowed",
                format!("{method} /{rest} is not among this upstream's routes; it was not forwarded."),
            ));
        }
        Ok(())
    }

    /// Sends the request and waits for the answer's head within `read_timeout`, never past the
    /// call's `max_duration` (which the hold outlives). A call that may have reached the upstream
    /// is charged (`abandoned`); one that never left only with `charge_failures`; one whose body
    /// broke the limit on the way (`over`) never.
    async fn send(&self, ureq: hyper::Request<Body>, over: &AtomicBool) -> Result<(Answer, Conn), Stop> {
        let up = &self.up;
        let abandoned = self.abandoned();
        let wait = up.read_timeout.min(up.max_duration);
        let sending = AtomicBool::new(false);
        let answer = match tokio::time::timeout(wait, self.pool.send(ureq, &sending)).await {
            Err(_) => {
                self.calls.timeout.increment(1);
                tracing::warn!(upstream = %self.name, "upstream did not answer within read_timeout");
                let (charge, message) = if sending.load(Ordering::Relaxed) {
                    // The upstream may be doing the work it was sent: the call is paid for.
                    (abandoned, "The upstream did not answer in time; the call was sent, so it was charged.")
                } else if up.charge_failures {
                    (abandoned, "The upstream could not be reached in time; the call was charged (charge_failures).")
                } else {
                    (Micros::ZERO, "The upstream could not be reached in time; the hold was released.")
                };
                return Err(Stop { charge, error: ApiError::new(504, "upstream_timeout", message) });
            }
            Ok(Err(_)) if over.load(Ordering::SeqCst) => {
                // The agent's body broke the limit mid-way: the upstream never got a whole request.
                self.calls.too_large.increment(1);
                return Err(Stop::free(too_large(up.max_request_bytes)));
            }
            Ok(Err(e)) => {
                self.calls.upstream_error.increment(1);
                let sent = matches!(e, pool::SendError::MaybeSent(_));
                let e = e.into_inner();
                let mut msg = e.to_string();
                let mut src = e.source();
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                tracing::warn!(upstream = %self.name, error = %msg, sent, "upstream call failed");
                let (charge, message) = if sent {
                    (abandoned, "The upstream connection broke after the call was sent; the call was charged.")
                } else {
                    (if up.charge_failures { abandoned } else { Micros::ZERO }, "The upstream could not be reached.")
                };
                return Err(Stop { charge, error: ApiError::new(502, "upstream_unavailable", message) });
            }
            Ok(Ok(r)) => r,
        };
        self.calls.forwarded.increment(1);
        Ok(answer)
    }

    /// The answer back to the agent (hop-by-hop headers dropped, streamed) and the call billed:
    /// nothing for a 5xx (unless `charge_failures`), the price, the price header's amount (the
    /// whole slot without one), or the token usage metered as the answer passes, which [`Relay`]
    /// bills when it ends or is dropped.
    fn relay(&self, resp: Answer, conn: Conn, bill: Bill, strip: bool, started: Instant) -> Response {
        let up = &self.up;
        let (mut rparts, rbody) = resp.into_parts();
        drop_hop_by_hop(&mut rparts.headers);
        let failed = rparts.status.is_server_error() && !up.charge_failures;
        let metering = match &up.pricing {
            _ if failed => {
                bill.finish(Micros::ZERO);
                None
            }
            Pricing::PerRequest(price) => {
                bill.finish(*price);
                None
            }
            Pricing::ResponseHeader(h) => {
                let cost = rparts
                    .headers
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| Micros::parse(v.trim()).ok())
                    .unwrap_or(up.max_cost);
                bill.finish(cost);
                None
            }
            Pricing::Tokens { dialect, prices } => {
                let sse = rparts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
                // The metered body may lose its usage-only chunk: its length is not announced.
                rparts.headers.remove(header::CONTENT_LENGTH);
                Some(Metering { meter: Meter::new(*dialect, sse, strip), prices: *prices, bill })
            }
        };
        let relay =
            Relay::new(rbody, metering, up.read_timeout, started + up.max_duration, self.name.clone(), Some(conn));
        Response::from_parts(rparts, Body::new(relay))
    }
}
