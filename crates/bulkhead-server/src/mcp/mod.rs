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

pub mod config;
pub mod jsonrpc;
pub mod session;
pub mod stdio;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, Version, header};
use axum::response::{IntoResponse, Response};
use bulkhead_core::{DenyReason, KeyHash, Micros, ScopeSet};
use bulkhead_store::{Answer, Command, EpochReader, LeaseAudit, Ledger, Reply, StoreError};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{Map, Value, json};

pub use self::config::{McpServer, McpServerSpec, Transport, check_mcp_servers};
use self::jsonrpc::{Kind, Message, Route, RpcError};
use self::session::{MCP_SESSION_ID, SessionSeal};
use self::stdio::{Stdio, StdioError};
use crate::error::ApiError;
use crate::gateway::body::Relay;
use crate::gateway::lease::{Acquired, Leases};
use crate::gateway::pool::{Pool, SendError};
use crate::metrics::{MCP_CALLS, RouteTimers};
use crate::upstream_http::{connector_for, drop_hop_by_hop, host_header, read_limited};

/// The path prefix of MCP servers.
pub const PREFIX: &str = "/mcp/";
/// The most distinct tool names per server that get a metric label of their own besides the
/// priced ones (names first seen in `tools/list` answers); others are counted as `_other`.
const TOOL_LABELS_MAX: usize = 256;

/// The most keys whose check is remembered (see [`KeyCache`]); past it the memory starts afresh.
const KEYS_CACHED_MAX: usize = 10_000;

/// What a key check found: the agent behind a good key.
#[derive(Clone)]
struct Known {
    handle: String,
    scopes: ScopeSet,
    suspended: bool,
}

/// Good keys checked under the current authorization epoch, when this process is the store's
/// only writer (SQLite; [`EpochReader::local`]): a revocation, suspension, patch or new key moves
/// the epoch before it is answered, so a check remembered under an older epoch is never used.
/// Keys with an expiry and suspended agents are never remembered (neither moves the epoch when it
/// ends). On a shared store (PostgreSQL) every request reads the store.
struct KeyCache {
    epochs: EpochReader,
    map: Mutex<HashMap<String, (u64, Known)>>,
}

/// The MCP servers an agent may reach through Bulkhead, for the blast radius: each server's
/// name and its priced tools.
#[derive(Clone, Debug, Default)]
pub struct McpCatalog(pub Arc<Vec<(String, Vec<String>)>>);

impl McpCatalog {
    pub fn of(servers: &[McpServer]) -> McpCatalog {
        McpCatalog(Arc::new(
            servers
                .iter()
                .map(|s| {
                    let mut tools: Vec<String> = s.prices.keys().cloned().collect();
                    tools.sort();
                    (s.name.clone(), tools)
                })
                .collect(),
        ))
    }

    /// The tools `scopes` reach, as `server:tool`, or `server:*` for a whole server: the priced
    /// tools a pattern grants, and tools named by the agent's own scopes.
    pub fn reachable(&self, scopes: &[String]) -> Vec<String> {
        let Ok(set) = ScopeSet::parse(scopes) else { return Vec::new() };
        let mut out = Vec::new();
        for (server, tools) in self.0.iter() {
            let all = bulkhead_core::scope::ScopePattern::parse(&format!("mcp.{server}:*"));
            if all.is_ok_and(|all| set.patterns().iter().any(|p| p.covers(&all))) {
                out.push(format!("{server}:*"));
                continue;
            }
            let mut named: Vec<String> = tools
                .iter()
                .filter(|t| jsonrpc::tool_scope(server, t).is_ok_and(|s| set.grants(&s)))
                .cloned()
                .collect();
            let prefix = format!("mcp.{server}:");
            for p in set.patterns() {
                if let Some(tool) = p.as_str().strip_prefix(&prefix)
                    && !p.is_wildcard()
                    && !named.iter().any(|t| t == tool)
                {
                    named.push(tool.to_owned());
                }
            }
            named.sort();
            out.extend(named.into_iter().map(|t| format!("{server}:{t}")));
        }
        out
    }
}

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
        let keys = Arc::new(KeyCache { epochs: EpochReader::new(&ledger), map: Mutex::new(HashMap::new()) });
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

    /// The agent behind a good key, or why the key is refused (see [`KeyCache`]).
    async fn check_key(&self, key: &KeyHash) -> Result<Result<Known, DenyReason>, ApiError> {
        let cache = &self.inner.keys;
        // Read before the store: a change committed after it moves the epoch past it.
        let epoch = cache.epochs.local();
        if let Some(epoch) = epoch
            && let Some((e, known)) = cache.map.lock().unwrap_or_else(|p| p.into_inner()).get(key.as_str())
            && *e == epoch
        {
            return Ok(Ok(known.clone()));
        }
        let now = self.inner.ledger.now_ms();
        let view = match self.inner.ledger.store().agent_for_key(key, now).await? {
            Ok(v) => v,
            Err(reason) => return Ok(Err(reason)),
        };
        let known = Known {
            suspended: view.status == "suspended",
            scopes: ScopeSet::parse(&view.scopes).unwrap_or_default(),
            handle: view.handle,
        };
        if let Some(epoch) = epoch
            && view.expires_at.is_none()
            && !known.suspended
        {
            let mut map = cache.map.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() >= KEYS_CACHED_MAX {
                map.clear();
            }
            map.insert(key.as_str().to_owned(), (epoch, known.clone()));
        }
        Ok(Ok(known))
    }

    /// `bulkhead_mcp_calls_total{server, tool, agent, outcome}`, the tool's label bounded.
    fn count(&self, srv: &Server, tool: &str, agent: &str, outcome: &'static str) {
        let known = srv.labels.lock().unwrap_or_else(|p| p.into_inner()).contains(tool);
        let tool = if known { tool.to_owned() } else { "_other".to_owned() };
        metrics::counter!(MCP_CALLS, "server" => srv.name.to_string(), "tool" => tool, "agent" => agent.to_owned(), "outcome" => outcome)
            .increment(1);
    }

    /// Passes a message through and its answer back as it comes.
    async fn pass(
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
    async fn forward_http(
        &self,
        srv: &Server,
        headers: &HeaderMap,
        method: Method,
        body: Bytes,
        started: tokio::time::Instant,
    ) -> Result<Response, ApiError> {
        match self.send_http(srv, headers, method, body, &AtomicBool::new(false)).await {
            Ok((resp, conn)) => {
                let (mut rparts, rbody) = resp.into_parts();
                drop_hop_by_hop(&mut rparts.headers);
                let deadline = started + srv.cfg.max_duration;
                let relay = Relay::new(rbody, None, srv.cfg.read_timeout, deadline, srv.name.clone(), Some(conn));
                Ok(Response::from_parts(rparts, Body::new(relay)))
            }
            Err((_, e)) => Err(e),
        }
    }

    /// The request as the server gets it: the agent's headers without its credential (nor
    /// hop-by-hop ones), the server's credential set.
    async fn send_http(
        &self,
        srv: &Server,
        headers: &HeaderMap,
        method: Method,
        body: Bytes,
        sending: &AtomicBool,
    ) -> Result<(hyper::Response<hyper::body::Incoming>, crate::gateway::pool::Conn), (bool, ApiError)> {
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
    async fn list_tools(
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
                let limit = usize::try_from(srv.cfg.max_response_bytes).unwrap_or(usize::MAX);
                let left = (started + srv.cfg.max_duration).saturating_duration_since(tokio::time::Instant::now());
                let whole = tokio::time::timeout(
                    left.min(srv.cfg.read_timeout),
                    http_body_util::Limited::new(rbody, limit).collect(),
                )
                .await
                .map_err(|_| {
                    ApiError::new(504, "upstream_timeout", "The MCP server's tool list did not come in time.")
                })?
                .map_err(|_| {
                    ApiError::new(
                        502,
                        "upstream_unavailable",
                        "The MCP server's tool list could not be read (or is over max_response_bytes).",
                    )
                })?
                .to_bytes();
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

    /// `tools/call` on a server with `leases = false`: a hold of the tool's price decided by the
    /// ledger (its audit event names the tool), the call forwarded only when allowed, the hold
    /// settled in the background.
    async fn call_tool(
        &self,
        srv: &Server,
        headers: &HeaderMap,
        msg: &Message,
        key: KeyHash,
        tool: &str,
        started: tokio::time::Instant,
    ) -> Result<Response, ApiError> {
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
                return Ok(denied(msg, &reply));
            }
        };
        let bill = Settlement {
            settler: self.inner.settler.clone(),
            hold_id,
            price,
            sending: AtomicBool::new(false),
            armed: true,
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
                        let (mut rparts, rbody) = resp.into_parts();
                        drop_hop_by_hop(&mut rparts.headers);
                        let deadline = started + srv.cfg.max_duration;
                        let relay =
                            Relay::new(rbody, None, srv.cfg.read_timeout, deadline, srv.name.clone(), Some(conn));
                        Ok(Response::from_parts(rparts, Body::new(relay)))
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

impl McpGateway {
    /// `tools/call` on a server with `leases = true` (the default): a slot of the key's lease
    /// for this tool (every check of a hold, decided by the ledger when the lease is granted),
    /// the call forwarded, its price recorded in the lease when the answer's head came (nothing
    /// when it never left or the server answered 5xx), settled by the lease flusher with one
    /// `capture` event per call (its scope names the server and the tool).
    #[allow(clippy::too_many_arguments)]
    async fn call_leased(
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
                        let (mut rparts, rbody) = resp.into_parts();
                        drop_hop_by_hop(&mut rparts.headers);
                        let deadline = started + srv.cfg.max_duration;
                        let relay =
                            Relay::new(rbody, None, srv.cfg.read_timeout, deadline, srv.name.clone(), Some(conn));
                        Ok(Response::from_parts(rparts, Body::new(relay)))
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
}

/// The JSON-RPC error for a local server that did not answer.
fn unavailable(msg: &Message, e: &StdioError) -> Response {
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
struct Settler {
    tx: tokio::sync::mpsc::UnboundedSender<(String, Micros)>,
}

impl Settler {
    /// Starts the settling task; it ends, after settling everything it was given, once every
    /// handle is gone (so the ledger can stop at shutdown).
    fn start(ledger: Ledger, rt: &tokio::runtime::Handle) -> Settler {
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
    use super::*;

    fn catalog() -> McpCatalog {
        let spec = |t: &str| -> McpServerSpec { toml::from_str(t).expect("spec") };
        let servers = [
            spec("name = \"tools\"\nurl = \"http://x/mcp\"\ntools = { search = \"0.002\", charge_card = \"1.00\" }"),
            spec("name = \"files\"\ncommand = [\"srv\"]"),
        ]
        .iter()
        .map(|s| s.checked(&|_| None).expect("valid"))
        .collect::<Vec<_>>();
        McpCatalog::of(&servers)
    }

    #[test]
    fn blast_radius_names_the_reachable_tools() {
        let c = catalog();
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert_eq!(c.reachable(&s(&["mcp.tools:search"])), s(&["tools:search"]));
        assert_eq!(c.reachable(&s(&["mcp.tools:*", "mcp.files:read_file"])), s(&["tools:*", "files:read_file"]));
        assert_eq!(c.reachable(&s(&["*"])), s(&["tools:*", "files:*"]));
        assert_eq!(c.reachable(&s(&["*:search"])), s(&["tools:search"]));
        assert_eq!(c.reachable(&s(&["payments:write", "mcp.other:x"])), Vec::<String>::new());
    }

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
