//! The MCP gateway (contract §11): `/mcp/{server}` speaks Streamable HTTP to agents, and
//! Streamable HTTP or stdio to the server, so that each agent sees and calls only the tools its
//! key allows, at a price, under its caps.
//!
//! Each request:
//!
//! 1. finds the server (404) and checks the agent's key against the store (401 with
//!    `WWW-Authenticate: Bearer` for a missing, unknown, revoked or expired key) before its body
//!    is read; nothing reaches the server otherwise;
//! 2. reads one JSON-RPC message (400 for anything else: not JSON, a batch, too deep; 413 past
//!    `max_request_bytes`) and checks that its routing headers (`Mcp-Method`, `Mcp-Name`,
//!    `MCP-Protocol-Version`) agree with its body (400 otherwise), see [`jsonrpc`];
//! 3. by method: the handshake, discovery, pings, notifications and answers pass through;
//!    `tools/list` passes and its answer (JSON or SSE) keeps only the tools the key's scopes
//!    cover; `tools/call` is decided by the ledger as a hold of the tool's price under the
//!    tool's scope `mcp.{server}:{tool}` (credentials, suspension, scope, rate limit, caps, in
//!    the contract's order), a denial audited with its reason and answered with a JSON-RPC
//!    error whose `data.code` is the contract's code, and never forwarded; a call to a tool no
//!    scope can name (outside the scope alphabet) is refused as `invalid_scope` and audited as a
//!    denied call all the same; every other method is refused ("method not found"). By default the hold is a slot of the key's lease for that
//!    tool (the gateway's [`Leases`]: one durable, audited grant for many calls, sized to what
//!    fits under every cap); with `leases = false` each call is a `MeteredHold` of its own;
//! 4. forwards with the server's own credential (the agent's `Authorization` is removed), the
//!    `Mcp-Session-Id` and protocol headers passed through, and streams the answer back;
//! 5. settles the call in the background: the price is captured once the call was sent
//!    (contract §12), nothing when it never left (no connection) or the server answered 5xx
//!    (unless `charge_failures`). Either way each call gets one audit event naming server and
//!    tool (contract §11): with leases its own `capture` event, written in the settlement's
//!    transaction under the lease's scope, with its cost; without, its `MeteredHold`'s event.
//!    A lease or hold whose settlement never came (a crash) is captured in full when it
//!    expires: a call that left is never free.
//!
//! Statuses follow contract §3: a refused key is a 401 and a request that cannot be read a 400
//! or 413, both with the contract's error body; a decision about a well-formed JSON-RPC request
//! (a denial, an unknown method, a tool name no scope can name) is a JSON-RPC error in a 200.
//!
//! Here: the gateway, its servers and the request's route (steps 1 and 2, then by method).
//! `keys.rs` checks the key, `forward.rs` passes messages through (`tools/list` too), `call.rs`
//! decides, forwards and settles `tools/call` (steps 3 to 5), `catalog.rs` is what the blast
//! radius reports.

mod call;
mod catalog;
pub mod config;
mod forward;
pub mod jsonrpc;
mod keys;
pub mod session;
pub mod stdio;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bulkhead_core::{DenyReason, KeyHash};
use bulkhead_store::{Command, LeaseAudit, Ledger};
use bytes::Bytes;
use serde_json::{Map, Value};

use self::call::Settler;
pub use self::catalog::McpCatalog;
pub use self::config::{McpServer, McpServerSpec, Transport, check_mcp_servers};
use self::jsonrpc::{Kind, Route, RpcError};
use self::keys::{KeyCache, Known};
use self::session::{MCP_SESSION_ID, SessionSeal};
use self::stdio::Stdio;
use crate::error::ApiError;
use crate::gateway::lease::Leases;
use crate::metrics::RouteTimers;
use crate::upstream_http::pool::Pool;
use crate::upstream_http::{connector_for, host_header, read_limited};

/// The path prefix of MCP servers.
pub const PREFIX: &str = "/mcp/";

enum Upstream {
    Http { pool: Arc<Pool>, host: HeaderValue, path: Uri },
    Stdio(Stdio),
}

struct Server {
    cfg: McpServer,
    name: Arc<str>,
    upstream: Upstream,
    /// Tool names with a metric label of their own.
    labels: Mutex<HashSet<String>>,
}

/// The MCP gateway. Cheap to clone; one per HTTP worker (`for_worker`), sharing local servers.
#[derive(Clone)]
pub struct McpGateway {
    inner: Arc<Inner>,
}

struct Inner {
    ledger: Ledger,
    /// The leases of servers with `leases = true`, the default (shared by every worker); their
    /// settlements audit each call.
    leases: Option<Leases>,
    keys: Arc<KeyCache>,
    /// Binds session ids to the agent that opened the session (see [`session`]).
    sessions: SessionSeal,
    settler: Settler,
    /// The runtime that outlives the HTTP workers: settlements run there.
    rt: tokio::runtime::Handle,
    servers: HashMap<String, Server>,
    timers: RouteTimers,
    stdio: HashMap<String, Stdio>,
}

impl McpGateway {
    /// Builds the gateway and starts every local server; call it inside the main runtime.
    pub fn new(ledger: Ledger, servers: Vec<McpServer>) -> Result<McpGateway, String> {
        let rt = tokio::runtime::Handle::current();
        let mut stdio = HashMap::new();
        for s in &servers {
            if let Transport::Stdio { argv } = &s.transport {
                let line_max = usize::try_from(s.max_response_bytes).unwrap_or(usize::MAX);
                stdio.insert(s.name.clone(), Stdio::start(&s.name, argv.clone(), line_max, &rt));
            }
        }
        let keys = Arc::new(KeyCache::new(&ledger));
        let settler = Settler::start(ledger.clone(), &rt);
        let leases = servers.iter().any(|s| s.leases).then(|| Leases::start(ledger.clone(), LeaseAudit::EachCall));
        let sessions = SessionSeal::new(ledger.store().derived_key("mcp-session"));
        McpGateway::build(ledger, leases, keys, sessions, settler, rt, stdio, servers.iter())
    }

    /// Settles every leased call and gives back unused slots; call it once the server stopped
    /// answering requests, before the ledger stops.
    pub async fn close(&self) {
        if let Some(l) = &self.inner.leases {
            l.close().await;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn build<'a>(
        ledger: Ledger,
        leases: Option<Leases>,
        keys: Arc<KeyCache>,
        sessions: SessionSeal,
        settler: Settler,
        rt: tokio::runtime::Handle,
        stdio: HashMap<String, Stdio>,
        servers: impl Iterator<Item = &'a McpServer>,
    ) -> Result<McpGateway, String> {
        let mut map = HashMap::new();
        for s in servers {
            let who = format!("mcp_server {:?}", s.name);
            let upstream = match &s.transport {
                Transport::Http { https, authority, path_and_query, .. } => {
                    let target: Uri = format!("{}://{authority}/", if *https { "https" } else { "http" })
                        .parse()
                        .map_err(|e| format!("{who}: {e}"))?;
                    Upstream::Http {
                        host: host_header(&target).map_err(|e| format!("{who}: {e}"))?,
                        pool: Pool::new(connector_for(&who, *https, s.connect_timeout)?, target),
                        path: path_and_query.parse().map_err(|e| format!("{who}: {e}"))?,
                    }
                }
                Transport::Stdio { .. } => {
                    Upstream::Stdio(stdio.get(&s.name).cloned().ok_or_else(|| format!("{who}: not started"))?)
                }
            };
            map.insert(
                s.name.clone(),
                Server {
                    labels: Mutex::new(s.prices.keys().cloned().collect()),
                    name: Arc::from(s.name.as_str()),
                    cfg: s.clone(),
                    upstream,
                },
            );
        }
        Ok(McpGateway {
            inner: Arc::new(Inner {
                ledger,
                leases,
                keys,
                sessions,
                settler,
                rt,
                servers: map,
                timers: RouteTimers::new("/mcp/{server}"),
                stdio,
            }),
        })
    }

    /// The same gateway with HTTP connection pools of its own, for one HTTP worker.
    pub fn for_worker(&self) -> Result<McpGateway, String> {
        let i = &self.inner;
        McpGateway::build(
            i.ledger.clone(),
            i.leases.clone(),
            i.keys.clone(),
            i.sessions.clone(),
            i.settler.clone(),
            i.rt.clone(),
            i.stdio.clone(),
            i.servers.values().map(|s| &s.cfg),
        )
    }

    /// Answers one request under [`PREFIX`], timed like every other route.
    pub async fn handle(&self, req: Request) -> Response {
        let started = tokio::time::Instant::now();
        let method = req.method().clone();
        let mut resp = match self.serve(req, started).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
        // A request refused before its body was read whole (a bad key, an unknown server, a body
        // over the limit) leaves the rest of that body on the connection: the connection is
        // closed after the answer, and the client is told so rather than finding out when it
        // sends its next request on it.
        if resp.extensions().get::<Unread>().is_some() {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        self.inner.timers.record(&method, resp.status(), started.elapsed());
        resp
    }
}

/// Marks an answer given before the request's body was read whole.
#[derive(Clone, Copy)]
struct Unread;

fn unread(mut r: Response) -> Response {
    r.extensions_mut().insert(Unread);
    r
}

/// A 401 with `WWW-Authenticate: Bearer` (contract §11), given before the body is read.
fn unauthorized(e: ApiError) -> Response {
    let mut r = e.into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    unread(r)
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn rpc_error(id: Option<&Value>, e: &RpcError) -> Response {
    json_response(StatusCode::OK, jsonrpc::error_body(id, e))
}

impl McpGateway {
    async fn serve(&self, req: Request, started: tokio::time::Instant) -> Result<Response, ApiError> {
        let (mut parts, body) = req.into_parts();
        let name = parts.uri.path().strip_prefix(PREFIX).unwrap_or("");
        let name = name.strip_suffix('/').unwrap_or(name);
        let Some(srv) = self.inner.servers.get(name) else {
            return Ok(unread(ApiError::not_found("No MCP server with that name is configured.").into_response()));
        };
        // The key first: nothing is read or forwarded for a refused key.
        let key = match crate::auth::agent_key(&parts.headers) {
            Ok(k) => k,
            Err(e) => return Ok(unauthorized(e)),
        };
        let agent = match self.check_key(&key).await? {
            Ok(a) => a,
            Err(reason) => return Ok(unauthorized(ApiError::deny(reason))),
        };
        // A session is the agent's that opened it: its id must be sealed for this agent, and the
        // server gets its own id back.
        if let Some(sealed) = parts.headers.get(MCP_SESSION_ID) {
            let opened = sealed.to_str().ok().and_then(|v| self.inner.sessions.open(&agent.handle, v));
            let Some(id) = opened.and_then(|id| HeaderValue::from_str(id).ok()) else {
                return Ok(unread(
                    ApiError::not_found("No MCP session with that id was opened by this agent.").into_response(),
                ));
            };
            parts.headers.insert(MCP_SESSION_ID, id);
        }
        let resp = self.serve_agent(srv, parts, body, key, &agent, started).await?;
        Ok(self.seal_session(resp, &agent.handle))
    }

    /// A server's answer with the session id it gives sealed for `agent`.
    fn seal_session(&self, mut resp: Response, agent: &str) -> Response {
        let sealed = resp
            .headers()
            .get(MCP_SESSION_ID)
            .and_then(|v| v.to_str().ok())
            .and_then(|id| HeaderValue::from_str(&self.inner.sessions.seal(agent, id)).ok());
        match sealed {
            Some(v) => {
                resp.headers_mut().insert(MCP_SESSION_ID, v);
            }
            None => {
                resp.headers_mut().remove(MCP_SESSION_ID);
            }
        }
        resp
    }

    /// Serves a request of a known agent to `srv`.
    async fn serve_agent(
        &self,
        srv: &Server,
        parts: axum::http::request::Parts,
        body: Body,
        key: KeyHash,
        agent: &Known,
        started: tokio::time::Instant,
    ) -> Result<Response, ApiError> {
        match parts.method {
            Method::POST => {}
            Method::DELETE if matches!(srv.upstream, Upstream::Http { .. }) => {
                // Ends the agent's session on the server (2025 revisions).
                return self.forward_http(srv, &parts.headers, Method::DELETE, Bytes::new(), started).await;
            }
            _ => {
                let mut r = ApiError::new(405, "method_not_allowed", "MCP servers take POST here.").into_response();
                r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST, DELETE"));
                return Ok(unread(r));
            }
        }
        let bytes = match read_limited(body, srv.cfg.max_request_bytes).await {
            Ok(b) => b,
            Err(e) => return Ok(unread(e.into_response())),
        };
        let msg = jsonrpc::parse(&bytes).map_err(ApiError::invalid)?;
        jsonrpc::check_headers(&parts.headers, &msg).map_err(ApiError::invalid)?;
        match jsonrpc::route(&srv.name, &msg) {
            Route::Refuse(e) => {
                if let Some(tool) = &msg.tool {
                    self.count(srv, tool, &agent.handle, "refused");
                    // A call to a tool no scope can name is still a call: audited as denied.
                    if let Some(code) = e.data_code() {
                        let cmd = Command::AuditRefusedCall {
                            key,
                            server: srv.name.to_string(),
                            tool: tool.clone(),
                            reason: code.to_owned(),
                        };
                        self.inner.ledger.submit(cmd).await.map_err(ApiError::from)?;
                    }
                }
                match msg.kind {
                    Kind::Request => Ok(rpc_error(msg.id.as_ref(), &e)),
                    _ => Err(ApiError::invalid(e.message)),
                }
            }
            Route::Forward => self.pass(srv, &parts.headers, &msg, started).await,
            Route::ListTools => {
                if agent.suspended {
                    let e = ApiError::deny(DenyReason::AgentSuspended);
                    return Ok(rpc_error(msg.id.as_ref(), &RpcError::denied(e.code, e.message, Map::new())));
                }
                self.list_tools(srv, &parts.headers, &msg, &agent.scopes, started).await
            }
            Route::CallTool(tool) => match (&self.inner.leases, srv.cfg.leases) {
                (Some(leases), true) => {
                    self.call_leased(leases, srv, &parts.headers, &msg, key, &agent.handle, &tool, started).await
                }
                _ => self.call_tool(srv, &parts.headers, &msg, key, &tool, started).await,
            },
        }
    }
}
