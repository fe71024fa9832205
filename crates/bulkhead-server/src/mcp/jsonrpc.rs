//! Pure JSON-RPC for the MCP gateway: reading one message an agent sent, checking that its
//! routing headers agree with its body, naming the scope of a tool, filtering a `tools/list`
//! answer (JSON or SSE), and writing JSON-RPC errors. No I/O.

use axum::http::HeaderMap;
use bulkhead_core::Scope;
use serde_json::{Map, Value, json};

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;
/// The MCP code for routing headers that disagree with the body.
pub const HEADER_MISMATCH: i64 = -32020;
/// Bulkhead refused the call (a denial: `error.data.code` says which, as in contract §3).
pub const DENIED: i64 = -32030;
/// The upstream could not be reached or did not answer in time.
pub const UPSTREAM_UNAVAILABLE: i64 = -32031;

const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";

/// What one JSON-RPC message is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Request,
    Notification,
    /// The agent's answer to a request of the server.
    Response,
}

/// One message an agent sent, read and checked.
#[derive(Clone, Debug)]
pub struct Message {
    pub kind: Kind,
    /// A request's id (a string or a number).
    pub id: Option<Value>,
    pub method: Option<String>,
    /// `params.name` of a `tools/call`.
    pub tool: Option<String>,
    /// `params._meta["io.modelcontextprotocol/protocolVersion"]`, the 2026 envelope's version.
    pub envelope_version: Option<Value>,
    /// The whole message, as parsed (what is forwarded is written from it, so the upstream
    /// sees exactly what was checked).
    pub value: Value,
}

/// What the gateway does with a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Passed through as it is (the handshake, pings, notifications, answers).
    Forward,
    /// `tools/list`: forwarded, and its answer filtered to the tools the key covers.
    ListTools,
    /// `tools/call` of this tool: decided like a spend of its price first.
    CallTool(String),
    /// Answered by the gateway with this error; never forwarded.
    Refuse(RpcError),
}

/// A JSON-RPC error object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError { code, message: message.into(), data: None }
    }

    /// A refusal carrying the contract's error code in `data.code`.
    pub fn denied(code: &str, message: impl Into<String>, mut data: Map<String, Value>) -> RpcError {
        data.insert("code".into(), json!(code));
        RpcError { code: DENIED, message: message.into(), data: Some(Value::Object(data)) }
    }

    /// The contract's error code of a refusal made by [`RpcError::denied`].
    pub fn data_code(&self) -> Option<&str> {
        self.data.as_ref()?.get("code")?.as_str()
    }
}

/// The answer carrying `e` for the request `id` (`null` when it had none).
pub fn error_body(id: Option<&Value>, e: &RpcError) -> Vec<u8> {
    let mut error = json!({"code": e.code, "message": e.message});
    if let Some(d) = &e.data {
        error["data"] = d.clone();
    }
    let body = json!({"jsonrpc": "2.0", "id": id.cloned().unwrap_or(Value::Null), "error": error});
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Reads one JSON-RPC message. The error is a sentence for a 400 `invalid_request`: a body that
/// is not JSON (or nests deeper than the parser's limit), a batch, or not a JSON-RPC 2.0 message.
pub fn parse(body: &[u8]) -> Result<Message, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("The body is not a JSON-RPC message (not JSON: {e})."))?;
    let obj = match &value {
        Value::Object(o) => o,
        Value::Array(_) => return Err("Batches are not supported: send one JSON-RPC message per request.".into()),
        _ => return Err("The body is not a JSON-RPC message (not an object).".into()),
    };
    if obj.get("jsonrpc") != Some(&json!("2.0")) {
        return Err("The body is not a JSON-RPC 2.0 message (\"jsonrpc\": \"2.0\" is missing).".into());
    }
    let id = match obj.get("id") {
        None => None,
        Some(v @ (Value::String(_) | Value::Number(_))) => Some(v.clone()),
        Some(_) => return Err("A JSON-RPC id must be a string or a number.".into()),
    };
    let method = match obj.get("method") {
        None => None,
        Some(Value::String(m)) => Some(m.clone()),
        Some(_) => return Err("A JSON-RPC method must be a string.".into()),
    };
    let params = match obj.get("params") {
        None => None,
        Some(Value::Object(p)) => Some(p),
        Some(_) => return Err("MCP params must be an object.".into()),
    };
    let kind = match (&method, &id) {
        (Some(_), Some(_)) => Kind::Request,
        (Some(_), None) => Kind::Notification,
        (None, Some(_)) if obj.contains_key("result") || obj.contains_key("error") => Kind::Response,
        _ => return Err("The body is neither a JSON-RPC request, notification nor response.".into()),
    };
    let tool = match (method.as_deref(), params.and_then(|p| p.get("name"))) {
        (Some("tools/call"), Some(Value::String(n))) => Some(n.clone()),
        _ => None,
    };
    let envelope_version = params.and_then(|p| p.get("_meta")).and_then(|m| m.get(META_PROTOCOL_VERSION)).cloned();
    Ok(Message { kind, id, method, tool, envelope_version, value })
}

/// The methods passed through untouched: the handshake (2025 revisions), discovery (2026),
/// and pings. Notifications pass too. Everything else but `tools/list` and `tools/call` is
/// refused: the gateway exposes tools, each under its own scope, and nothing else.
const FORWARDED: [&str; 3] = ["initialize", "server/discover", "ping"];

/// What to do with a checked message.
pub fn route(server: &str, m: &Message) -> Route {
    let Some(method) = m.method.as_deref() else { return Route::Forward };
    if m.kind == Kind::Notification {
        return if method.starts_with("notifications/") {
            Route::Forward
        } else {
            Route::Refuse(RpcError::new(METHOD_NOT_FOUND, format!("Unknown notification {method:?}.")))
        };
    }
    match method {
        "tools/list" => Route::ListTools,
        "tools/call" => match &m.tool {
            None => Route::Refuse(RpcError::new(INVALID_PARAMS, "tools/call needs params.name, a string.")),
            Some(tool) => match tool_scope(server, tool) {
                Ok(_) => Route::CallTool(tool.clone()),
                Err(_) => Route::Refuse(RpcError::denied(
                    "invalid_scope",
                    format!(
                        "The tool name {:?} is outside the scope alphabet (a-z 0-9 _ - ., at most {} characters \
                         in the scope), so no key can be granted it: Bulkhead refuses calls to it.",
                        truncate(tool, 80),
                        bulkhead_core::scope::SCOPE_LEN_MAX
                    ),
                    Map::new(),
                )),
            },
        },
        m if FORWARDED.contains(&m) => Route::Forward,
        other => Route::Refuse(RpcError::new(
            METHOD_NOT_FOUND,
            format!(
                "Method {:?} is not served through Bulkhead's MCP gateway (it serves tools/list and tools/call).",
                truncate(other, 80)
            ),
        )),
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The scope of one tool: `mcp.{server}:{tool}`. An error when the tool's name is outside the
/// scope alphabet (or too long), so that no pattern could grant it.
pub fn tool_scope(server: &str, tool: &str) -> Result<Scope, String> {
    if tool.contains(':') || tool == "*" {
        return Err(format!("{tool:?} is not a scope segment"));
    }
    Scope::parse(&format!("mcp.{server}:{tool}"))
}

/// Checks that the routing headers agree with the body (the 2026 revision has clients repeat the
/// method, the tool's name and the protocol version in headers, and proxies may route by them):
/// each at most once; `Mcp-Method` equal to the body's method; `Mcp-Name` (plain or
/// `=?base64?…?=`) equal to the tool's name of a `tools/call`; `MCP-Protocol-Version` equal to the
/// envelope's version when the body has one. A 2025 request without these headers passes.
pub fn check_headers(headers: &HeaderMap, m: &Message) -> Result<(), String> {
    for name in ["mcp-method", "mcp-name", "mcp-protocol-version"] {
        if headers.get_all(name).iter().count() > 1 {
            return Err(format!("The {name} header appears more than once."));
        }
    }
    let text = |name: &str| -> Result<Option<&str>, String> {
        match headers.get(name) {
            None => Ok(None),
            Some(v) => v.to_str().map(Some).map_err(|_| format!("The {name} header is not visible ASCII.")),
        }
    };
    let method_header = text("mcp-method")?;
    if let Some(h) = method_header
        && Some(h) != m.method.as_deref()
    {
        return Err("The Mcp-Method header does not match the body's method.".into());
    }
    let name_header = text("mcp-name")?;
    let is_call = m.method.as_deref() == Some("tools/call");
    if is_call && (name_header.is_some() || method_header.is_some()) {
        let decoded = name_header.and_then(decode_header_value);
        if decoded.as_deref() != m.tool.as_deref() {
            return Err("The Mcp-Name header does not match the tool named in the body.".into());
        }
    } else if name_header.is_some() && !is_call && method_header.is_some_and(|h| h == "tools/list") {
        return Err("An Mcp-Name header makes no sense on tools/list.".into());
    }
    if let (Some(h), Some(v)) = (text("mcp-protocol-version")?, &m.envelope_version)
        && v.as_str() != Some(h)
    {
        return Err("The MCP-Protocol-Version header does not match the body's protocol version.".into());
    }
    Ok(())
}

/// The inverse of MCP's header encoding: plain visible ASCII as it is, or `=?base64?…?=` decoded
/// as UTF-8 (canonical base64 only); `None` for a malformed value, which then matches nothing.
pub fn decode_header_value(v: &str) -> Option<String> {
    let Some(payload) = v.strip_prefix("=?base64?").and_then(|p| p.strip_suffix("?=")) else {
        return Some(v.to_owned());
    };
    let bytes = base64_decode(payload)?;
    if base64_encode(&bytes) != payload {
        return None;
    }
    String::from_utf8(bytes).ok()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for chunk in s.as_bytes().chunks(4) {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || chunk[..4 - pad].contains(&b'=') {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | B64.iter().position(|&x| x == c)? as u32;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

/// Keeps in a `tools/list` result only the tools `allowed` says the key covers; returns how many
/// were removed. A tool without a string name is removed. Anything else is left as it is.
pub fn filter_tools(message: &mut Value, allowed: &dyn Fn(&str) -> bool) -> usize {
    let Some(tools) = message.get_mut("result").and_then(|r| r.get_mut("tools")).and_then(Value::as_array_mut) else {
        return 0;
    };
    let before = tools.len();
    tools.retain(|t| t.get("name").and_then(Value::as_str).is_some_and(allowed));
    before - tools.len()
}

/// The names of the tools a `tools/list` result lists.
pub fn tool_names(message: &Value) -> Vec<String> {
    message
        .get("result")
        .and_then(|r| r.get("tools"))
        .and_then(Value::as_array)
        .map(|ts| ts.iter().filter_map(|t| t.get("name").and_then(Value::as_str).map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// Filters every JSON-RPC message in an SSE body (each event's `data`) with `f`; other fields
/// (`id`, `event`, `retry`, comments) are kept. Events whose data is not JSON are kept as they
/// are. Lines may end in `\n` or `\r\n`.
pub fn filter_sse(body: &[u8], f: &mut dyn FnMut(&mut Value)) -> Vec<u8> {
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    let mut out = String::with_capacity(text.len());
    for (i, event) in text.split("\n\n").enumerate() {
        if i > 0 {
            out.push_str("\n\n");
        }
        let mut data: Vec<&str> = Vec::new();
        let mut others: Vec<&str> = Vec::new();
        for line in event.split('\n') {
            if let Some(d) = line.strip_prefix("data:") {
                data.push(d.strip_prefix(' ').unwrap_or(d));
            } else {
                others.push(line);
            }
        }
        let parsed = if data.is_empty() { None } else { serde_json::from_str::<Value>(&data.join("\n")).ok() };
        match parsed {
            None => out.push_str(event),
            Some(mut v) => {
                f(&mut v);
                for o in others.iter().filter(|o| !o.is_empty()) {
                    out.push_str(o);
                    out.push('\n');
                }
                out.push_str("data: ");
                out.push_str(&v.to_string());
            }
        }
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn msg(s: &str) -> Message {
        parse(s.as_bytes()).expect("parses")
    }

    #[test]
    fn reads_requests_notifications_and_responses() {
        let m = msg(r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search","arguments":{}}}"#);
        assert_eq!(m.kind, Kind::Request);
        assert_eq!(m.id, Some(json!(7)));
        assert_eq!(m.tool.as_deref(), Some("search"));
        assert_eq!(route("tools", &m), Route::CallTool("search".into()));
        let n = msg(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        assert_eq!(n.kind, Kind::Notification);
        assert_eq!(route("tools", &n), Route::Forward);
        let r = msg(r#"{"jsonrpc":"2.0","id":"a","result":{}}"#);
        assert_eq!(r.kind, Kind::Response);
        assert_eq!(route("tools", &r), Route::Forward);
        let l = msg(
            r#"{"jsonrpc":"2.0","id":"x","method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#,
        );
        assert_eq!(route("tools", &l), Route::ListTools);
        assert_eq!(l.envelope_version, Some(json!("2026-07-28")));
    }

    #[test]
    fn malformed_messages_are_refused() {
        for bad in [
            "",
            "not json",
            "[]",
            r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#,
            "7",
            r#"{"id":1,"method":"ping"}"#,
            r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":{},"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":7}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":[1]}"#,
            r#"{"jsonrpc":"2.0"}"#,
            r#"{"jsonrpc":"2.0","id":1}"#,
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "accepted {bad:?}");
        }
        let deep = format!(
            "{}{}{}}}}}",
            r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":{"a":"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(parse(deep.as_bytes()).is_err());
        assert!(parse(b"[1]").expect_err("batch").contains("Batches"));
    }

    #[test]
    fn routes_refuse_what_is_not_tools() {
        for (body, code) in [
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///etc/passwd"}}"#,
                METHOD_NOT_FOUND,
            ),
            (r#"{"jsonrpc":"2.0","id":1,"method":"bogus"}"#, METHOD_NOT_FOUND),
            (r#"{"jsonrpc":"2.0","method":"tools/call"}"#, METHOD_NOT_FOUND),
            (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}"#, INVALID_PARAMS),
            (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}"#, INVALID_PARAMS),
            (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"Search"}}"#, DENIED),
            (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a:b"}}"#, DENIED),
            (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"*"}}"#, DENIED),
            (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":""}}"#, DENIED),
        ] {
            match route("tools", &msg(body)) {
                Route::Refuse(e) => assert_eq!(e.code, code, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        let Route::Refuse(e) =
            route("tools", &msg(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"Web Search"}}"#))
        else {
            panic!("refused")
        };
        assert_eq!(e.data.expect("data")["code"], "invalid_scope");
    }

    #[test]
    fn tool_scopes() {
        assert_eq!(tool_scope("tools", "search").expect("ok").as_str(), "mcp.tools:search");
        assert_eq!(tool_scope("my-srv.v2", "get_v1.x-y").expect("ok").as_str(), "mcp.my-srv.v2:get_v1.x-y");
        for bad in ["Search", "a b", "a:b", "*", "", "é", &"x".repeat(130)] {
            assert!(tool_scope("tools", bad).is_err(), "{bad:?}");
        }
        let set = bulkhead_core::ScopeSet::parse(&["mcp.tools:*"]).expect("set");
        assert!(set.grants(&tool_scope("tools", "search").expect("ok")));
        assert!(!set.grants(&tool_scope("other", "search").expect("ok")));
        let one = bulkhead_core::ScopeSet::parse(&["mcp.tools:search"]).expect("set");
        assert!(one.grants(&tool_scope("tools", "search").expect("ok")));
        assert!(!one.grants(&tool_scope("tools", "charge_card").expect("ok")));
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn headers_must_agree_with_the_body() {
        let call = msg(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#,
        );
        // A 2025 request without routing headers passes.
        assert!(check_headers(&HeaderMap::new(), &call).is_ok());
        let good = [("mcp-method", "tools/call"), ("mcp-name", "search"), ("mcp-protocol-version", "2026-07-28")];
        assert!(check_headers(&headers(&good), &call).is_ok());
        let b64 = [("mcp-method", "tools/call"), ("mcp-name", "=?base64?c2VhcmNo?=")];
        assert!(check_headers(&headers(&b64), &call).is_ok());
        for bad in [
            &[("mcp-method", "tools/list")][..],
            &[("mcp-method", "tools/call"), ("mcp-name", "charge_card")],
            &[("mcp-method", "tools/call")],
            &[("mcp-name", "charge_card")],
            &[("mcp-method", "tools/call"), ("mcp-name", "search"), ("mcp-name", "search")],
            &[("mcp-method", "tools/call"), ("mcp-name", "=?base64?c2VhcmNo=?=")],
            &[("mcp-method", "tools/call"), ("mcp-name", "search"), ("mcp-protocol-version", "2025-06-18")],
        ] {
            assert!(check_headers(&headers(bad), &call).is_err(), "accepted {bad:?}");
        }
        let list = msg(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#);
        assert!(check_headers(&headers(&[("mcp-method", "tools/list")]), &list).is_ok());
        assert!(check_headers(&headers(&[("mcp-method", "tools/call")]), &list).is_err());
    }

    #[test]
    fn header_values_decode_like_the_sdk() {
        assert_eq!(decode_header_value("search").as_deref(), Some("search"));
        assert_eq!(decode_header_value("=?base64?w6lsw6g=?=").as_deref(), Some("élè"));
        assert_eq!(decode_header_value("=?base64?!!!!?="), None);
        assert_eq!(decode_header_value("=?base64?YQ?="), None);
        for s in ["", "a", "ab", "abc", "abcd", "héllo wörld"] {
            assert_eq!(base64_decode(&base64_encode(s.as_bytes())).as_deref(), Some(s.as_bytes()));
        }
        assert_eq!(base64_encode(b"search"), "c2VhcmNo");
    }

    #[test]
    fn tools_lists_are_filtered() {
        let mut v = json!({"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"charge_card"},{"name":"Bad Name"},{"x":1}],"nextCursor":"c"}});
        let removed = filter_tools(&mut v, &|n| n == "search" || n == "Bad Name");
        assert_eq!(removed, 2);
        assert_eq!(tool_names(&v), vec!["search", "Bad Name"]);
        assert_eq!(v["result"]["nextCursor"], "c");
        let mut err = json!({"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"m"}});
        assert_eq!(filter_tools(&mut err, &|_| false), 0);
    }

    #[test]
    fn sse_bodies_are_filtered_event_by_event() {
        let body = b"event: message\r\nid: 1\r\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"a\"},{\"name\":\"b\"}]}}\r\n\r\n: comment\n\n";
        let out = filter_sse(body, &mut |v| {
            filter_tools(v, &|n| n == "a");
        });
        let out = String::from_utf8(out).expect("utf8");
        assert!(out.starts_with("event: message\nid: 1\ndata: "), "{out}");
        assert!(out.contains(r#"{"name":"a"}"#) && !out.contains(r#"{"name":"b"}"#), "{out}");
        assert!(out.contains(": comment"), "{out}");
    }

    #[test]
    fn errors_are_json_rpc() {
        let e = RpcError::denied("scope_not_granted", "no", Map::new());
        let v: Value = serde_json::from_slice(&error_body(Some(&json!(3)), &e)).expect("json");
        assert_eq!(v["id"], 3);
        assert_eq!(v["error"]["code"], DENIED);
        assert_eq!(v["error"]["data"]["code"], "scope_not_granted");
        let v: Value = serde_json::from_slice(&error_body(None, &RpcError::new(PARSE_ERROR, "x"))).expect("json");
        assert!(v["id"].is_null() && v["error"].get("data").is_none());
    }
}
