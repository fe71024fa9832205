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
//! 3. forwards the call: path and query kept, the agent's `Authorization` (and any header named
//!    like the upstream's auth header) removed, hop-by-hop headers dropped, the real secret set;
//!    the request body streams (only an OpenAI JSON body is read first, to ask for streamed usage);
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
pub mod pool;
mod settle;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, Uri, Version, header};
use axum::response::{IntoResponse, Response};
use bulkhead_core::Micros;
use bulkhead_store::Ledger;
use bytes::{Bytes, BytesMut};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::Value;

use self::body::{LimitBody, Metering, Relay};
use self::config::{Dialect, Pricing};
pub use self::config::{PricingSpec, Secret, Upstream, UpstreamSpec, check_upstreams};
use self::lease::{Acquired, Leases};
use self::meter::Meter;
use self::pool::Pool;
use crate::error::ApiError;
use crate::metrics::{GATEWAY_CALLS, RouteTimers};
use crate::upstream_http::{connector_for, drop_hop_by_hop, host_header, read_limited, too_large};

/// The path prefix of proxied calls.
pub const PREFIX: &str = "/proxy/";

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

fn is_json(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("application/json"))
}

/// An OpenAI request that streams without asking for usage gets
/// `stream_options.include_usage = true`; returns the body to send and whether the agent did
/// not ask for the usage chunk (so the gateway strips it). Other bodies are left as they are.
pub fn ask_for_stream_usage(body: Bytes) -> (Bytes, bool) {
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(&body) else {
        return (body, false);
    };
    if m.get("stream") != Some(&Value::Bool(true)) {
        return (body, false);
    }
    match m.get("stream_options") {
        None => {
            // Insert the field right after the opening brace: every other byte stays as sent.
            let Some(open) = body.iter().position(|&b| b == b'{') else {
                return (body, false);
            };
            let mut out = BytesMut::with_capacity(body.len() + 40);
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
            out.extend_from_slice(&body[open + 1..]);
            (out.freeze(), true)
        }
        Some(Value::Object(o)) if o.get("include_usage") == Some(&Value::Bool(true)) => (body, false),
        Some(Value::Object(_)) => {
            let mut m = m;
            if let Some(Value::Object(o)) = m.get_mut("stream_options") {
                o.insert("include_usage".into(), Value::Bool(true));
            }
            match serde_json::to_vec(&Value::Object(m)) {
                Ok(v) => (Bytes::from(v), true),
                Err(_) => (body, false),
            }
        }
        // Not an object: the upstream answers the agent's mistake itself.
        Some(_) => (body, false),
    }
}

impl Gateway {
    /// Forwards one call that arrived at `started` (its `max_duration` counts from then).
    async fn forward(&self, req: Request, started: tokio::time::Instant) -> Result<Response, ApiError> {
        let (parts, body) = req.into_parts();
        let (name, rest) = path::split(parts.uri.path())
            .map_err(|_| ApiError::not_found("No upstream with that name is configured."))?;
        let route = self
            .inner
            .routes
            .get(name)
            .ok_or_else(|| ApiError::not_found("No upstream with that name is configured."))?;
        let up = &route.up;
        let key = crate::auth::agent_key(&parts.headers)?;
        path::check_segments(rest, true).map_err(|e| {
            let why = match e {
                path::PathError::Tricky(why) => why,
                path::PathError::NotProxy => "no upstream",
            };
            ApiError::invalid(format!("The proxied path has {why}; it is refused."))
        })?;
        if content_length(&parts.headers).is_some_and(|n| n > up.max_request_bytes) {
            route.calls.too_large.increment(1);
            return Err(too_large(up.max_request_bytes));
        }

        let tokens = matches!(up.pricing, Pricing::Tokens { .. });
        let openai = matches!(up.pricing, Pricing::Tokens { dialect: Dialect::OpenAi, .. });

        // The slot: every check of the contract, in its order, decided by a committed lease. It
        // comes before the body is read: a refused key costs no body read.
        let abandoned = match up.pricing {
            Pricing::PerRequest(p) => p,
            _ => up.max_cost,
        };
        let acquired =
            self.inner.leases.acquire(&key, &route.name, &up.scope, up.max_cost, up.hold_ms(), abandoned).await?;
        let bill = match acquired {
            Acquired::Go(bill) => bill,
            Acquired::Denied(reply) => {
                route.calls.denied.increment(1);
                return Ok(crate::reply::respond(reply));
            }
        };
        if let Some(rules) = &up.routes
            && !rules.iter().any(|r| r.allows(parts.method.as_str(), rest))
        {
            bill.finish(Micros::ZERO);
            route.calls.denied.increment(1);
            return Err(ApiError::new(
                403,
                "route_not_allowed",
                format!("{} /{rest} is not among this upstream's routes; it was not forwarded.", parts.method),
            ));
        }

        let over = Arc::new(AtomicBool::new(false));
        let mut strip = false;
        let mut replaced_len = None;
        // A token-priced JSON call is read whole, within read_timeout, to bound its worst case
        // (see `bound`). Only the completions APIs take `stream_options`; the Responses API
        // always reports a stream's usage in its `response.completed` event and refuses fields
        // it does not know.
        let completions = rest.ends_with("completions");
        let body = match &up.pricing {
            Pricing::Tokens { dialect, prices } if parts.method == Method::POST && is_json(&parts.headers) => {
                let read = tokio::time::timeout(up.read_timeout, read_limited(body, up.max_request_bytes)).await;
                let bytes = match read {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => {
                        if e.status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                            route.calls.too_large.increment(1);
                        }
                        bill.finish(Micros::ZERO);
                        return Err(e);
                    }
                    Err(_) => {
                        bill.finish(Micros::ZERO);
                        return Err(ApiError::new(
                            408,
                            "request_timeout",
                            "The request body did not arrive within the upstream's read_timeout; nothing was sent.",
                        ));
                    }
                };
                let bytes = match bound::bound(bytes, rest, *dialect, prices, up.max_cost) {
                    Ok(b) => b,
                    Err(bound::Unbounded::InputTooDear { bytes }) => {
                        bill.finish(Micros::ZERO);
                        route.calls.denied.increment(1);
                        return Err(ApiError::new(
                            402,
                            "max_cost_exceeded",
                            format!(
                                "A {bytes}-byte request could use up to {bytes} input tokens, more than this \
                                 upstream's max_cost_per_request of {} pays for; nothing was sent or charged.",
                                up.max_cost
                            ),
                        ));
                    }
                };
                let bytes = if openai && completions {
                    let (b, s) = ask_for_stream_usage(bytes);
                    strip = s;
                    b
                } else {
                    bytes
                };
                replaced_len = Some(bytes.len());
                Body::from(bytes)
            }
            _ => Body::new(LimitBody::new(body, up.max_request_bytes, over.clone())),
        };

        // The forwarded request, its URI in origin form.
        let query = parts.uri.query();
        let mut target = String::with_capacity(up.base_path.len() + rest.len() + query.map_or(0, |q| q.len() + 1) + 2);
        target.push_str(&up.base_path);
        if !rest.is_empty() || up.base_path.is_empty() {
            target.push('/');
        }
        target.push_str(rest);
        if let Some(q) = query {
            target.push('?');
            target.push_str(q);
        }
        let uri = match Uri::try_from(target) {
            Ok(u) => u,
            Err(_) => {
                bill.finish(Micros::ZERO);
                return Err(ApiError::invalid("The proxied path or query is not valid."));
            }
        };
        let mut headers = parts.headers;
        drop_hop_by_hop(&mut headers);
        headers.remove(header::AUTHORIZATION);
        headers.remove(header::EXPECT);
        if let Some(auth) = &up.auth {
            headers.remove(&auth.name);
        }
        headers.insert(header::HOST, route.host.clone());
        if tokens {
            // The answer is read for its usage: it must not come compressed.
            headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        }
        if let Some(n) = replaced_len {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        if let Some(auth) = &up.auth {
            headers.insert(auth.name.clone(), auth.value.clone());
        }
        let mut ureq = hyper::Request::new(body);
        *ureq.method_mut() = parts.method;
        *ureq.uri_mut() = uri;
        *ureq.version_mut() = Version::HTTP_11;
        *ureq.headers_mut() = headers;

        // The answer's headers within read_timeout, and never past the call's max_duration (which
        // the hold outlives).
        let wait = up.read_timeout.min(up.max_duration);
        let sending = AtomicBool::new(false);
        let (resp, conn) = match tokio::time::timeout(wait, route.pool.send(ureq, &sending)).await {
            Err(_) => {
                route.calls.timeout.increment(1);
                tracing::warn!(upstream = %route.name, "upstream did not answer within read_timeout");
                let message = if sending.load(Ordering::Relaxed) {
                    // The upstream may be doing the work it was sent: the call is paid for.
                    bill.finish(abandoned);
                    "The upstream did not answer in time; the call was sent, so it was charged."
                } else if up.charge_failures {
                    bill.finish(abandoned);
                    "The upstream could not be reached in time; the call was charged (charge_failures)."
                } else {
                    bill.finish(Micros::ZERO);
                    "The upstream could not be reached in time; the hold was released."
                };
                return Err(ApiError::new(504, "upstream_timeout", message));
            }
            Ok(Err(_)) if over.load(Ordering::SeqCst) => {
                // The agent's body broke the limit mid-way: the upstream never got a whole request.
                route.calls.too_large.increment(1);
                bill.finish(Micros::ZERO);
                return Err(too_large(up.max_request_bytes));
            }
            Ok(Err(e)) => {
                route.calls.upstream_error.increment(1);
                let sent = matches!(e, pool::SendError::MaybeSent(_));
                let e = e.into_inner();
                let mut msg = e.to_string();
                let mut src = e.source();
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                tracing::warn!(upstream = %route.name, error = %msg, sent, "upstream call failed");
                let message = if sent {
                    bill.finish(abandoned);
                    "The upstream connection broke after the call was sent; the call was charged."
                } else {
                    bill.finish(if up.charge_failures { abandoned } else { Micros::ZERO });
                    "The upstream could not be reached."
                };
                return Err(ApiError::new(502, "upstream_unavailable", message));
            }
            Ok(Ok(r)) => r,
        };
        route.calls.forwarded.increment(1);

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
            Relay::new(rbody, metering, up.read_timeout, started + up.max_duration, route.name.clone(), Some(conn));
        Ok(Response::from_parts(rparts, Body::new(relay)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_for_stream_usage_only_when_missing() {
        let (b, strip) = ask_for_stream_usage(Bytes::from_static(br#" {"model":"m","stream":true,"n":1.50}"#));
        assert!(strip);
        assert_eq!(&b[..], br#" {"stream_options":{"include_usage":true},"model":"m","stream":true,"n":1.50}"#);
        let v: Value = serde_json::from_slice(&b).expect("still JSON");
        assert_eq!(v["stream_options"]["include_usage"], true);

        let (b, strip) =
            ask_for_stream_usage(Bytes::from_static(br#"{"stream":true,"stream_options":{"include_usage":false}}"#));
        assert!(strip);
        let v: Value = serde_json::from_slice(&b).expect("JSON");
        assert_eq!(v["stream_options"]["include_usage"], true);

        for same in [
            &br#"{"stream":true,"stream_options":{"include_usage":true}}"#[..],
            br#"{"stream":false}"#,
            br#"{"model":"m"}"#,
            br#"{"stream":"true"}"#,
            br#"{"stream":true,"stream_options":7}"#,
            b"not json",
            b"[1,2]",
        ] {
            let (b, strip) = ask_for_stream_usage(Bytes::copy_from_slice(same));
            assert!(!strip, "{}", String::from_utf8_lossy(same));
            assert_eq!(&b[..], same);
        }
    }
}
