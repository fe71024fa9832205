//! The agent gateway (contract §8): `ANY /proxy/{upstream}/{path…}`.
//!
//! An agent calls an upstream API through Bulkhead with its own key; Bulkhead holds the real
//! secret. Each call:
//!
//! 1. finds the upstream (404), checks the key's form (401) and the path (400: no dot segments,
//!    encoded separators or bad escapes), and the declared body size (413);
//! 2. takes a slot of `max_cost_per_request` from the key's lease (see [`bill`]): key,
//!    revocation, suspension, scope, rate limit and every cap are checked by the ledger when the
//!    lease is granted, in the contract's order, and a denial is answered with the ledger's
//!    status and body; the upstream never sees it;
//! 3. forwards the call: path and query kept, the agent's `Authorization` (and any header named
//!    like the upstream's auth header) removed, hop-by-hop headers dropped, the real secret set;
//!    the request body streams (only an OpenAI JSON body is read first, to ask for streamed usage);
//! 4. streams the answer back (SSE chunk by chunk) and bills the call: the price
//!    (`per_request`), the price header, or the metered token usage, at most the slot; the rest
//!    is released when the flusher settles it, about 10 ms later. Usage that cannot be
//!    read is charged as the whole slot, never as free.
//!
//! Upstream connection failures, timeouts before the answer, and 5xx answers capture nothing
//! unless the upstream sets `charge_failures = true`.

pub mod bill;
pub mod body;
pub mod config;
pub mod meter;
pub mod path;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, Version, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use bulkhead_core::Micros;
use bulkhead_store::Ledger;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::Value;

use self::bill::{Acquired, Leases};
use self::body::{LimitBody, Metering, Relay};
use self::config::{Dialect, Pricing};
pub use self::config::{PricingSpec, Secret, Upstream, UpstreamSpec, check_upstreams};
use self::meter::Meter;
use crate::error::ApiError;
use crate::metrics::GATEWAY_CALLS;

type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

/// One configured upstream and its connection pool.
struct Route {
    up: Upstream,
    name: Arc<str>,
    client: HttpClient,
}

/// The gateway: its leases (and through them the ledger), and the upstreams. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    leases: Leases,
    routes: HashMap<String, Route>,
}

impl Gateway {
    /// Builds the gateway, one connection pool per upstream, and starts the lease flusher (so it
    /// must be called inside the runtime). Fails when an `https` upstream finds no root
    /// certificates on the system.
    pub fn new(ledger: Ledger, upstreams: Vec<Upstream>) -> Result<Gateway, String> {
        let mut routes = HashMap::new();
        for up in upstreams {
            let client = client(&up)?;
            routes.insert(up.name.clone(), Route { name: Arc::from(up.name.as_str()), up, client });
        }
        Ok(Gateway { inner: Arc::new(Inner { leases: Leases::start(ledger), routes }) })
    }

    /// The same gateway (same upstreams, same leases) with connection pools of its own: one per
    /// HTTP worker thread, so that a worker's calls go out on connections its own event loop
    /// drives.
    pub fn for_worker(&self) -> Result<Gateway, String> {
        let mut routes = HashMap::new();
        for (name, r) in &self.inner.routes {
            routes.insert(name.clone(), Route { name: r.name.clone(), up: r.up.clone(), client: client(&r.up)? });
        }
        Ok(Gateway { inner: Arc::new(Inner { leases: self.inner.leases.clone(), routes }) })
    }

    /// Settles every call and gives back every unused slot; call it once the server stopped
    /// answering requests, before the ledger stops.
    pub async fn close(&self) {
        self.inner.leases.close().await;
    }
}

fn client(up: &Upstream) -> Result<HttpClient, String> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(up.connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    let provider = rustls::crypto::ring::default_provider();
    let tls = if up.scheme == "https" {
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider)
            .map_err(|e| format!("upstream {:?}: no usable root certificates on this system: {e}", up.name))?
    } else {
        // Plain HTTP: TLS is never used, but the connector type is shared.
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
    };
    let https = tls.https_or_http().enable_http1().wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(std::time::Duration::from_secs(60))
        .build(https))
}

/// The gateway's routes, to merge into `app(state)`.
pub fn gateway_router(gw: Gateway) -> Router {
    Router::new()
        .route("/proxy/{*rest}", any(proxy))
        .layer(axum::middleware::from_fn(crate::metrics::track_requests))
        .with_state(gw)
}

async fn proxy(State(gw): State<Gateway>, req: Request) -> Response {
    match gw.forward(req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn count(upstream: &Arc<str>, result: &'static str) {
    metrics::counter!(GATEWAY_CALLS, "upstream" => metrics::SharedString::from(upstream.clone()), "result" => result)
        .increment(1);
}

/// Headers never forwarded in either direction (RFC 9110 §7.6.1), besides those the
/// `Connection` header names.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers and those listed in `Connection`.
fn drop_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        413,
        "body_too_large",
        format!("The request body is larger than this upstream's limit of {limit} bytes."),
    )
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

/// Reads a whole body of at most `limit` bytes.
async fn read_limited(body: Body, limit: u64) -> Result<Bytes, ApiError> {
    let over = Arc::new(AtomicBool::new(false));
    let mut b = LimitBody::new(body, limit, over.clone());
    let mut out = BytesMut::new();
    while let Some(frame) = b.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    out.extend_from_slice(&d);
                }
            }
            Err(_) if over.load(Ordering::SeqCst) => return Err(too_large(limit)),
            Err(e) => return Err(ApiError::invalid(format!("The request body could not be read: {e}"))),
        }
    }
    Ok(out.freeze())
}

impl Gateway {
    async fn forward(&self, req: Request) -> Result<Response, ApiError> {
        let started = tokio::time::Instant::now();
        let (parts, body) = req.into_parts();
        let (name, rest) = path::split(parts.uri.path())
            .map_err(|_| ApiError::not_found("No upstream with that name is configured."))?;
        let route = self
            .inner
            .routes
            .get(name)
            .ok_or_else(|| ApiError::not_found("No upstream with that name is configured."))?;
        let up = &route.up;
        let key = crate::api::agent_key(&parts.headers)?;
        path::check_segments(rest, true).map_err(|e| {
            let why = match e {
                path::PathError::Tricky(why) => why,
                path::PathError::NotProxy => "no upstream",
            };
            ApiError::invalid(format!("The proxied path has {why}; it is refused."))
        })?;
        if content_length(&parts.headers).is_some_and(|n| n > up.max_request_bytes) {
            count(&route.name, "too_large");
            return Err(too_large(up.max_request_bytes));
        }

        let tokens = matches!(up.pricing, Pricing::Tokens { .. });
        let openai = matches!(up.pricing, Pricing::Tokens { dialect: Dialect::OpenAi, .. });
        let over = Arc::new(AtomicBool::new(false));
        let mut strip = false;
        let mut replaced_len = None;
        let body = if openai && parts.method == Method::POST && is_json(&parts.headers) {
            let bytes = read_limited(body, up.max_request_bytes).await.inspect_err(|e| {
                if e.status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    count(&route.name, "too_large");
                }
            })?;
            let (bytes, s) = ask_for_stream_usage(bytes);
            strip = s;
            replaced_len = Some(bytes.len());
            Body::from(bytes)
        } else {
            Body::new(LimitBody::new(body, up.max_request_bytes, over.clone()))
        };

        // The slot: every check of the contract, in its order, decided by a committed lease.
        let abandoned = match up.pricing {
            Pricing::PerRequest(p) => p,
            _ => up.max_cost,
        };
        let acquired =
            self.inner.leases.acquire(&key, &route.name, &up.scope, up.max_cost, up.hold_ms(), abandoned).await?;
        let bill = match acquired {
            Acquired::Go(bill) => bill,
            Acquired::Denied(reply) => {
                count(&route.name, "denied");
                return Ok(crate::api::respond(reply));
            }
        };

        // The forwarded request.
        let path = if rest.is_empty() {
            if up.base_path.is_empty() { "/".to_owned() } else { up.base_path.clone() }
        } else {
            format!("{}/{rest}", up.base_path)
        };
        let target = match parts.uri.query() {
            Some(q) => format!("{}://{}{path}?{q}", up.scheme, up.authority),
            None => format!("{}://{}{path}", up.scheme, up.authority),
        };
        let uri: Uri = match target.parse() {
            Ok(u) => u,
            Err(_) => {
                bill.finish(Micros::ZERO);
                return Err(ApiError::invalid("The proxied path or query is not valid."));
            }
        };
        let mut headers = parts.headers;
        drop_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
        headers.remove(header::AUTHORIZATION);
        headers.remove(header::EXPECT);
        if let Some(auth) = &up.auth {
            headers.remove(&auth.name);
        }
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
        let resp = match tokio::time::timeout(wait, route.client.request(ureq)).await {
            Err(_) => {
                count(&route.name, "timeout");
                tracing::warn!(upstream = %route.name, "upstream did not answer within read_timeout");
                let message = if up.charge_failures {
                    bill.finish(abandoned);
                    "The upstream did not answer in time; the call was charged (charge_failures)."
                } else {
                    bill.finish(Micros::ZERO);
                    "The upstream did not answer in time; the hold was released."
                };
                return Err(ApiError::new(504, "upstream_timeout", message));
            }
            Ok(Err(_)) if over.load(Ordering::SeqCst) => {
                count(&route.name, "too_large");
                bill.finish(Micros::ZERO);
                return Err(too_large(up.max_request_bytes));
            }
            Ok(Err(e)) => {
                count(&route.name, "upstream_error");
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                tracing::warn!(upstream = %route.name, error = %msg, "upstream call failed");
                let cost = if up.charge_failures { abandoned } else { Micros::ZERO };
                bill.finish(cost);
                return Err(ApiError::new(502, "upstream_unavailable", "The upstream could not be reached."));
            }
            Ok(Ok(r)) => r,
        };
        count(&route.name, "forwarded");

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
                Some(Metering {
                    meter: Meter::new(*dialect, sse, strip),
                    prices: *prices,
                    bill,
                    charge_failures: up.charge_failures,
                })
            }
        };
        let relay = Relay::new(rbody, metering, up.read_timeout, started + up.max_duration, route.name.clone());
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

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        drop_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }
}
