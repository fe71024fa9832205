//! `tools/call`: the ledger's decision (a slot of the key's lease for the tool, or a hold of its
//! own), the call forwarded only when allowed, its price settled as far as the call got, and
//! `bulkhead_mcp_calls_total` counting every outcome.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bulkhead_core::{KeyHash, Micros};
use bulkhead_store::{Answer, Command, Ledger, Reply, StoreError};
use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::jsonrpc::{self, Kind, Message, RpcError};
use super::stdio::StdioError;
use super::{McpGateway, Server, Upstream, json_response, rpc_error, unauthorized};
use crate::error::ApiError;
use crate::gateway::lease::{Acquired, Leases};
use crate::metrics::MCP_CALLS;

impl McpGateway {
    /// `tools/call` on a server with `leases = true` (the default): a slot of the key's lease
    /// for this tool (every check of a hold, decided by the ledger when the lease is granted),
    /// the call forwarded, its price recorded in the lease when the answer's head came (nothing
    /// when it never left or the server answered 5xx), settled by the lease flusher with one
    /// `capture` event per call (its scope names the server and the tool).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn call_leased(
        &self,
        leases: &Leases,
        srv: &Server,
        headers: &HeaderMap,
        msg: &Message,
        key: KeyHash,
        agent: &str,
        tool: &str,
        started: tokio::time::Instant,
    ) -> Result<Response, ApiError> {
        let scope = jsonrpc::tool_scope(&srv.name, tool).map_err(ApiError::invalid)?;
        let price = srv.cfg.price(tool);
        let slot: Arc<str> = Arc::from(format!("mcp.{}:{tool}", srv.name));
        let bill = match leases.acquire(&key, &slot, &scope, price, srv.cfg.hold_ms(), price).await? {
            Acquired::Go(bill) => bill,
            Acquired::Denied(reply) => {
                crate::reply::record_outcome(&reply);
                self.count(srv, tool, agent, "denied");
                return Ok(denied(msg, &reply));
            }
        };
        match &srv.upstream {
            Upstream::Stdio(p) => Ok(match p.call(msg.value.clone()).await {
                Ok(v) => {
                    bill.finish(price);
                    self.count(srv, tool, agent, "allowed");
                    match v {
                        Some(v) => json_response(StatusCode::OK, serde_json::to_vec(&v).unwrap_or_default()),
                        None => StatusCode::ACCEPTED.into_response(),
                    }
                }
                Err(e) => {
                    bill.finish(if matches!(e, StdioError::Lost(_)) { price } else { Micros::ZERO });
                    self.count(srv, tool, agent, "unavailable");
                    unavailable(msg, &e)
                }
            }),
            Upstream::Http { .. } => {
                let body = Bytes::from(serde_json::to_vec(&msg.value).unwrap_or_default());
                let sending = AtomicBool::new(false);
                match self.send_http(srv, headers, Method::POST, body, &sending).await {
                    Ok((resp, conn)) => {
                        let failed = resp.status().is_server_error() && !srv.cfg.charge_failures;
                        bill.finish(if failed { Micros::ZERO } else { price });
                        self.count(srv, tool, agent, if failed { "upstream_error" } else { "allowed" });
                        Ok(super::forward::relay(srv, resp, conn, started))
                    }
                    Err((sent, e)) => {
                        bill.finish(if sent { price } else { Micros::ZERO });
                        self.count(srv, tool, agent, "unavailable");
                        Err(e)
                    }
                }
            }
        }
    }

    /// `tools/call` on a server with `leases = false`: a hold of the tool's price decided by the
    /// ledger (its audit event names the tool), the call forwarded only when allowed, the hold
    /// settled in the background.
    pub(super) async fn call_tool(
        &self,
        srv: &Server,
        headers: &HeaderMap,
        msg: &Message,
        key: KeyHash,
        tool: &str,
        started: tokio::time::Instant,
    ) -> Result<Response, ApiError> {
        let (bill, agent) = match self.hold_call(srv, msg, key, tool).await? {
            Ok(held) => held,
            Err(denial) => return Ok(denial),
        };
        match &srv.upstream {
            Upstream::Stdio(p) => Ok(match p.call(msg.value.clone()).await {
                Ok(v) => {
                    bill.settle(true);
                    self.count(srv, tool, &agent, "allowed");
                    match v {
                        Some(v) => json_response(StatusCode::OK, serde_json::to_vec(&v).unwrap_or_default()),
                        None => StatusCode::ACCEPTED.into_response(),
                    }
                }
                Err(e) => {
                    bill.settle(matches!(e, StdioError::Lost(_)));
                    self.count(srv, tool, &agent, "unavailable");
                    unavailable(msg, &e)
                }
            }),
            Upstream::Http { .. } => {
                let body = Bytes::from(serde_json::to_vec(&msg.value).unwrap_or_default());
                match self.send_http(srv, headers, Method::POST, body, &bill.sending).await {
                    Ok((resp, conn)) => {
                        let failed = resp.status().is_server_error() && !srv.cfg.charge_failures;
                        bill.settle(!failed);
                        self.count(srv, tool, &agent, if failed { "upstream_error" } else { "allowed" });
                        Ok(super::forward::relay(srv, resp, conn, started))
                    }
                    Err((sent, e)) => {
                        bill.settle(sent);
                        self.count(srv, tool, &agent, "unavailable");
                        Err(e)
                    }
                }
            }
        }
    }

    /// The hold of one call's price (`MeteredHold`, its audit event naming the tool), decided by
    /// the ledger: the call's [`Settlement`] and the agent's handle, or the denial to answer with.
    async fn hold_call(
        &self,
        srv: &Server,
        msg: &Message,
        key: KeyHash,
        tool: &str,
    ) -> Result<Result<(Settlement, String), Response>, ApiError> {
        let scope = jsonrpc::tool_scope(&srv.name, tool).map_err(ApiError::invalid)?;
        let price = srv.cfg.price(tool);
        let reply =
            self.hold(Command::MeteredHold { key, scope, amount: price, expires_ms: srv.cfg.hold_ms() }).await?;
        crate::reply::record_outcome(&reply);
        let agent = reply.outcome.as_ref().map(|o| o.agent.clone()).unwrap_or_default();
        let hold_id = match &reply.answer {
            Ok(Answer::Held(h)) => h.id.clone(),
            Ok(other) => {
                tracing::error!(answer = ?other, "a tools/call hold was answered oddly");
                return Err(ApiError::new(
                    500,
                    "internal_error",
                    "The server hit an internal error; nothing was charged.",
                ));
            }
            Err(_) => {
                self.count(srv, tool, &agent, "denied");
                return Ok(Err(denied(msg, &reply)));
            }
        };
        let bill = Settlement {
            settler: self.inner.settler.clone(),
            hold_id,
            price,
            sending: AtomicBool::new(false),
            armed: true,
        };
        Ok(Ok((bill, agent)))
    }

    /// Submits a call's hold in a task of its own: when the agent hangs up before it is answered,
    /// a hold granted meanwhile is released (the call never left) rather than left to expire.
    async fn hold(&self, cmd: Command) -> Result<Reply, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (ledger, settler) = (self.inner.ledger.clone(), self.inner.settler.clone());
        self.inner.rt.spawn(async move {
            let reply = ledger.submit(cmd).await;
            if let Err(Ok(Reply { answer: Ok(Answer::Held(h)), .. })) = tx.send(reply) {
                settler.push(h.id, Micros::ZERO);
            }
        });
        rx.await.unwrap_or(Err(StoreError::ShutDown))
    }

    /// `bulkhead_mcp_calls_total{server, tool, agent, outcome}`, the tool's label bounded.
    pub(super) fn count(&self, srv: &Server, tool: &str, agent: &str, outcome: &'static str) {
        let known = srv.labels.lock().unwrap_or_else(|p| p.into_inner()).contains(tool);
        let tool = if known { tool.to_owned() } else { "_other".to_owned() };
        metrics::counter!(MCP_CALLS, "server" => srv.name.to_string(), "tool" => tool, "agent" => agent.to_owned(), "outcome" => outcome)
            .increment(1);
    }
}

/// A denied call's answer: a 401 for a refused credential, else a JSON-RPC error.
fn denied(msg: &Message, reply: &Reply) -> Response {
    let (status, e) = refusal_error(reply);
    if status == 401 {
        let code = match e.data.as_ref().and_then(|d| d["code"].as_str()) {
            Some("credential_revoked") => "credential_revoked",
            Some("credential_expired") => "credential_expired",
            _ => "invalid_credentials",
        };
        return unauthorized(ApiError::new(401, code, e.message));
    }
    rpc_error(msg.id.as_ref(), &e)
}

/// A ledger refusal as a JSON-RPC error: the contract's code in `data.code`, with its status
/// and whatever the API's answer adds (`remaining`, `window_resets_at`, `retry_after`).
fn refusal_error(reply: &Reply) -> (u16, RpcError) {
    let r = crate::reply::render(reply);
    let body: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    let mut data = Map::new();
    let (mut code, mut message) = ("denied".to_owned(), "The call was refused.".to_owned());
    if let Value::Object(o) = body {
        for (k, v) in o {
            if k == "error" {
                code = v["code"].as_str().unwrap_or("denied").to_owned();
                message = v["message"].as_str().unwrap_or("The call was refused.").to_owned();
                if let Some(ra) = v.get("retry_after") {
                    data.insert("retry_after".into(), ra.clone());
                }
            } else {
                data.insert(k, v);
            }
        }
    }
    data.insert("status".into(), json!(r.status));
    (r.status, RpcError::denied(&code, message, data))
}

/// The JSON-RPC error for a local server that did not answer.
pub(super) fn unavailable(msg: &Message, e: &StdioError) -> Response {
    let why = match e {
        StdioError::NotSent(w) | StdioError::Lost(w) => w.clone(),
    };
    let e = RpcError::new(jsonrpc::UPSTREAM_UNAVAILABLE, format!("The MCP server did not answer: {why}."));
    match msg.kind {
        Kind::Request => rpc_error(msg.id.as_ref(), &e),
        _ => StatusCode::BAD_GATEWAY.into_response(),
    }
}

/// One call's hold, settled once: its price captured when the call was sent, else released.
/// Dropped unsettled (the agent hung up mid-call), it settles as far as the call got.
struct Settlement {
    settler: Settler,
    hold_id: String,
    price: Micros,
    /// Set once the request started out to the server.
    sending: AtomicBool,
    armed: bool,
}

impl Settlement {
    fn settle(mut self, sent: bool) {
        self.armed = false;
        let amount = if sent { self.price } else { Micros::ZERO };
        self.settler.push(std::mem::take(&mut self.hold_id), amount);
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        if self.armed {
            let amount = if self.sending.load(Ordering::Relaxed) { self.price } else { Micros::ZERO };
            self.settler.push(std::mem::take(&mut self.hold_id), amount);
        }
    }
}

/// How long settlements gather before they go to the ledger together (one commit for many).
const SETTLE_GATHER: std::time::Duration = std::time::Duration::from_millis(5);

/// Settles calls' holds in the background, gathered so that the calls that ended within a few
/// milliseconds share one commit; each is still its own `Settle` (its own audit event). A
/// settlement that cannot be committed leaves its hold to be captured in full at expiry: never
/// free, at most the price.
#[derive(Clone)]
pub(super) struct Settler {
    tx: tokio::sync::mpsc::UnboundedSender<(String, Micros)>,
}

impl Settler {
    /// Starts the settling task; it ends, after settling everything it was given, once every
    /// handle is gone (so the ledger can stop at shutdown).
    pub(super) fn start(ledger: Ledger, rt: &tokio::runtime::Handle) -> Settler {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Micros)>();
        rt.spawn(async move {
            while let Some(first) = rx.recv().await {
                tokio::time::sleep(SETTLE_GATHER).await;
                let mut due = vec![first];
                while let Ok(more) = rx.try_recv() {
                    due.push(more);
                }
                for (hold_id, amount) in due {
                    let ledger = ledger.clone();
                    tokio::spawn(async move {
                        for attempt in 0..5u32 {
                            match ledger.submit(Command::Settle { hold_id: hold_id.clone(), amount }).await {
                                Ok(_) => return,
                                Err(e) => {
                                    tracing::warn!(error = %e, attempt, "settling an MCP call failed; retrying");
                                    tokio::time::sleep(std::time::Duration::from_millis(100 << attempt)).await;
                                }
                            }
                        }
                    });
                }
            }
        });
        Settler { tx }
    }

    fn push(&self, hold_id: String, amount: Micros) {
        if self.tx.send((hold_id, amount)).is_err() {
            tracing::warn!("an MCP call could not be settled (shutting down); its hold is captured at expiry");
        }
    }
}

#[cfg(test)]
mod tests {
    use bulkhead_core::DenyReason;

    use super::*;

    #[test]
    fn refusals_carry_the_contract_code_and_status() {
        let reply = Reply {
            answer: Err(bulkhead_store::Refusal::Deny(DenyReason::ScopeNotGranted)),
            replayed: false,
            outcome: None,
        };
        let (status, e) = refusal_error(&reply);
        assert_eq!(status, 403);
        assert_eq!(e.code, jsonrpc::DENIED);
        let data = e.data.expect("data");
        assert_eq!(data["code"], "scope_not_granted");
        assert_eq!(data["status"], 403);
    }
}
