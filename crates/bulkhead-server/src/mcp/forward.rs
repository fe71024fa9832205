//! Passing messages through: every message but `tools/call` goes to the server as the agent sent
//! it and its answer comes back as it comes, but for `tools/list`, whose answer is cut down to the
//! tools the key's scopes cover. `send_http` is the request every message (calls too) goes out
//! in to an HTTP server.

use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use bulkhead_core::ScopeSet;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::Value;

use super::call::unavailable;
use super::jsonrpc::{self, Message};
use super::{McpGateway, Server, Upstream, json_response};
use crate::error::ApiError;
use crate::gateway::body::Relay;
use crate::upstream_http::drop_hop_by_hop;
use crate::upstream_http::pool::SendError;

/// The most distinct tool names per server that get a metric label of their own besides the
/// priced ones (names first seen in `tools/list` answers); others are counted as `_other`.
const TOOL_LABELS_MAX: usize = 256;

impl McpGateway {
    /// Passes a message through and its answer back as it comes.
    pub(super) async fn pass(
        &self,
        srv: &Server,
        headers: &HeaderMap,
        msg: &Message,
        started: tokio::time::Instant,
    ) -> Result<Response, ApiError> {
        match &srv.upstream {
            Upstream::Http { .. } => {
                let body = Bytes::from(serde_json::to_vec(&msg.value).unwrap_or_default());
                self.forward_http(srv, headers, Method::POST, body, started).await
            }
            Upstream::Stdio(p) => Ok(match p.call(msg.value.clone()).await {
                Ok(Some(v)) => json_response(StatusCode::OK, serde_json::to_vec(&v).unwrap_or_default()),
                Ok(None) => StatusCode::ACCEPTED.into_response(),
                Err(e) => unavailable(msg, &e),
            }),
        }
    }

    /// Sends one request to an HTTP server and relays its answer.
    pub(super) async fn forward_http(
        &self,
        srv: &Server,
        headers: &HeaderMap,
        method: Method,
        body: Bytes,
        started: tokio::time::Instant,
    ) -> Result<Response, ApiError> {
        match self.send_http(srv, headers, method, body, &AtomicBool::new(false)).await {
            Ok((resp, conn)) => Ok(relay(srv, resp, conn, started)),
            Err((_, e)) => Err(e),
        }
    }

    /// The request as the server gets it: the agent's headers without its credential (nor
    /// hop-by-hop ones), the server's credential set.
    pub(super) async fn send_http(
        &self,
        srv: &Server,
        headers: &HeaderMap,
        method: Method,
        body: Bytes,
        sending: &AtomicBool,
    ) -> Result<(hyper::Response<hyper::body::Incoming>, crate::upstream_http::pool::Conn), (bool, ApiError)> {
        let Upstream::Http { pool, host, path } = &srv.upstream else {
            return Err((false, ApiError::new(500, "internal_error", "Not an HTTP server.")));
        };
        let mut h = headers.clone();
        drop_hop_by_hop(&mut h);
        h.remove(header::AUTHORIZATION);
        h.remove(header::EXPECT);
        h.remove(header::CONTENT_LENGTH);
        h.remove(header::COOKIE);
        if let Some(auth) = &srv.cfg.auth {
            h.remove(&auth.name);
        }
        h.insert(header::HOST, host.clone());
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        if let Some(auth) = &srv.cfg.auth {
            h.insert(auth.name.clone(), auth.value.clone());
        }
        let mut req = hyper::Request::new(Body::from(body));
        *req.method_mut() = method;
        *req.uri_mut() = path.clone();
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = h;
        match tokio::time::timeout(srv.cfg.read_timeout, pool.send(req, sending)).await {
            Ok(Ok(r)) => Ok(r),
            Err(_) => {
                tracing::warn!(server = %srv.name, "MCP server did not answer within read_timeout");
                let sent = sending.load(Ordering::Relaxed);
                Err((sent, ApiError::new(504, "upstream_timeout", "The MCP server did not answer in time.")))
            }
            Ok(Err(e)) => {
                let maybe_sent = matches!(e, SendError::MaybeSent(_));
                tracing::warn!(server = %srv.name, error = %e.into_inner(), "MCP server call failed");
                Err((maybe_sent, ApiError::new(502, "upstream_unavailable", "The MCP server could not be reached.")))
            }
        }
    }

    /// `tools/list`: forwarded, and the answer cut down to the tools `scopes` cover.
    pub(super) async fn list_tools(
        &self,
        srv: &Server,
        headers: &HeaderMap,
        msg: &Message,
        scopes: &ScopeSet,
        started: tokio::time::Instant,
    ) -> Result<Response, ApiError> {
        let allowed = |name: &str| jsonrpc::tool_scope(&srv.name, name).is_ok_and(|s| scopes.grants(&s));
        let mut filter = |v: &mut Value| {
            let names = jsonrpc::tool_names(v);
            let mut labels = srv.labels.lock().unwrap_or_else(|p| p.into_inner());
            for n in names {
                if labels.len() >= TOOL_LABELS_MAX + srv.cfg.prices.len() {
                    break;
                }
                if jsonrpc::tool_scope(&srv.name, &n).is_ok() {
                    labels.insert(n);
                }
            }
            drop(labels);
            jsonrpc::filter_tools(v, &allowed);
        };
        match &srv.upstream {
            Upstream::Stdio(p) => Ok(match p.call(msg.value.clone()).await {
                Ok(Some(mut v)) => {
                    filter(&mut v);
                    json_response(StatusCode::OK, serde_json::to_vec(&v).unwrap_or_default())
                }
                Ok(None) => StatusCode::ACCEPTED.into_response(),
                Err(e) => unavailable(msg, &e),
            }),
            Upstream::Http { .. } => {
                let body = Bytes::from(serde_json::to_vec(&msg.value).unwrap_or_default());
                let (resp, _conn) = self
                    .send_http(srv, headers, Method::POST, body, &AtomicBool::new(false))
                    .await
                    .map_err(|(_, e)| e)?;
                let (mut rparts, rbody) = resp.into_parts();
                drop_hop_by_hop(&mut rparts.headers);
                let whole = read_tool_list(srv, rbody, started).await?;
                let ctype = rparts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
                let out = if ctype.starts_with("text/event-stream") {
                    jsonrpc::filter_sse(&whole, &mut filter)
                } else {
                    match serde_json::from_slice::<Value>(&whole) {
                        Ok(mut v) => {
                            filter(&mut v);
                            serde_json::to_vec(&v).unwrap_or_default()
                        }
                        // Not JSON-RPC (an error page): passed on as it came.
                        Err(_) => whole.to_vec(),
                    }
                };
                rparts.headers.remove(header::CONTENT_LENGTH);
                Ok(Response::from_parts(rparts, Body::from(out)))
            }
        }
    }
}

/// A `tools/list` answer's body, read whole: at most `max_response_bytes`, within the call's
/// `max_duration` and the server's `read_timeout`.
async fn read_tool_list(
    srv: &Server,
    body: hyper::body::Incoming,
    started: tokio::time::Instant,
) -> Result<Bytes, ApiError> {
    let limit = usize::try_from(srv.cfg.max_response_bytes).unwrap_or(usize::MAX);
    let left = (started + srv.cfg.max_duration).saturating_duration_since(tokio::time::Instant::now());
    let whole =
        tokio::time::timeout(left.min(srv.cfg.read_timeout), http_body_util::Limited::new(body, limit).collect())
            .await
            .map_err(|_| ApiError::new(504, "upstream_timeout", "The MCP server's tool list did not come in time."))?
            .map_err(|_| {
                ApiError::new(
                    502,
                    "upstream_unavailable",
                    "The MCP server's tool list could not be read (or is over max_response_bytes).",
                )
            })?;
    Ok(whole.to_bytes())
}

/// The server's answer passed on as it comes: hop-by-hop headers dropped, the body relayed
/// within the server's read timeout and the call's deadline (`max_duration` from `started`), the
/// connection given back to the pool once the body ended.
pub(super) fn relay(
    srv: &Server,
    resp: hyper::Response<hyper::body::Incoming>,
    conn: crate::upstream_http::pool::Conn,
    started: tokio::time::Instant,
) -> Response {
    let (mut parts, body) = resp.into_parts();
    drop_hop_by_hop(&mut parts.headers);
    let deadline = started + srv.cfg.max_duration;
    let relay = Relay::new(body, None, srv.cfg.read_timeout, deadline, srv.name.clone(), Some(conn));
    Response::from_parts(parts, Body::new(relay))
}
