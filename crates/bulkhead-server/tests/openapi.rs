//! `GET /openapi.json` (contract §9): an OpenAPI 3.1 document of every endpoint, generated from
//! the server's own routes and types, so it cannot drift from the code. Three ways it could:
//!
//! 1. a route the router answers that the document lacks, or a documented operation nobody
//!    answers: every documented (method, path) is asked of a real server over loopback HTTP and
//!    must not be 404/405, every other method on those paths must be 405, and no route is
//!    registered outside the one table that documents it;
//! 2. a body on the wire that its schema does not describe: a real flow's every answer (and
//!    request) is validated against the document, with undeclared fields refused;
//! 3. a broken document: not 3.1, a `$ref` that does not resolve, path parameters that do not
//!    match the template, a security requirement naming no scheme.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bulkhead_server::{AppState, app, install_metrics};
use bulkhead_store::{Ledger, Store};
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const METHODS: &[&str] = &["get", "put", "post", "delete", "patch"];
/// Routes outside the JSON API, which the document names in its description instead.
const NOT_THE_JSON_API: &[&str] = &["/console", "/mcp", "/proxy"];

// ----- a real server on loopback, and a minimal HTTP/1.1 client ---------------------------------

/// Serves `app()` on 127.0.0.1 through the production connection path (`http::accept`,
/// `http::serve`); returns the address.
async fn serve_on_loopback(dir: &std::path::Path) -> std::net::SocketAddr {
    let store = Store::open(&bulkhead_testkit::sqlite_url(dir)).await.expect("store");
    let (ledger, _writer) = Ledger::start(store, bulkhead_testkit::manual_clock(), Default::default());
    let router =
        app(AppState { ledger, admin_token: Arc::from(ADMIN), metrics: install_metrics(), metrics_open: true });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    let (queue, conns) = bulkhead_server::http::worker_queue();
    tokio::spawn(bulkhead_server::http::serve(conns, router, None, None, std::future::pending()));
    tokio::spawn(bulkhead_server::http::accept(listener, vec![queue], 64, std::future::pending()));
    addr
}

/// One request, one connection: (status, content-type, body).
async fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let body = if method == "GET" { "" } else { "{}" };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    let ct = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-type")).map(|(_, v)| v.trim()))
        .unwrap_or("")
        .to_owned();
    (status, ct, body.to_owned())
}

async fn fetch_document(addr: std::net::SocketAddr) -> Value {
    let (status, ct, body) = http(addr, "GET", "/openapi.json").await;
    assert_eq!(status, 200, "{body}");
    assert!(ct.starts_with("application/json"), "{ct}");
    serde_json::from_str(&body).expect("the document is JSON")
}

/// A path of the document with its parameters filled in.
fn concrete(template: &str) -> String {
    template.replace("{handle}", "no-such-agent").replace("{id}", "hold_none")
}

/// Every (METHOD, path template) the document describes.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for m in METHODS {
            if item.get(*m).is_some() {
                ops.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    ops
}

// ----- 1. routes and document are one -----------------------------------------------------------

#[tokio::test]
async fn every_documented_operation_is_answered_and_no_other_method_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = serve_on_loopback(dir.path()).await;
    let doc = fetch_document(addr).await;
    let ops = operations(&doc);
    assert!(ops.len() >= 20, "{ops:?}");
    for (method, template) in &ops {
        let path = concrete(template);
        let (status, _, body) = http(addr, method, &path).await;
        assert!(status != 404 && status != 405, "{method} {template} is documented but answered {status}: {body}");
    }
    // The router takes no method on a documented path that the document does not name.
    let paths: BTreeSet<&String> = ops.iter().map(|(_, p)| p).collect();
    for template in paths {
        for m in METHODS {
            let method = m.to_uppercase();
            if ops.contains(&(method.clone(), template.clone())) {
                continue;
            }
            let (status, _, body) = http(addr, &method, &concrete(template)).await;
            assert_eq!(status, 405, "{method} {template} is not documented but answered {status}: {body}");
        }
    }
    // A path nobody registered is the router's 404, so the probes above did tell routes apart.
    assert_eq!(http(addr, "GET", "/v1/no-such-route").await.0, 404);
}

/// Routes are registered in one table, `api::api_routes`, through `routes!(handler)`: the
/// handler's `#[utoipa::path]` gives both the route and its operation. A bare `.route(…)` would
/// add a route the document cannot see, so none may exist but for what is not the JSON API and
/// is named as such in the document's description: the console, the MCP and agent gateways.
#[test]
fn no_route_is_registered_outside_the_documented_table() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut bare = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read source");
            let lines: Vec<&str> = text.lines().map(|l| l.split("//").next().unwrap_or("")).collect();
            for (i, code) in lines.iter().enumerate() {
                for call in [".route(", ".nest(", ".nest_service(", ".route_service("] {
                    let Some(at) = code.find(call) else { continue };
                    // The path is the call's first string: on this line, or the next.
                    let rest = format!("{}{}", &code[at + call.len()..], lines.get(i + 1).unwrap_or(&""));
                    let route = rest.trim_start().strip_prefix('"').and_then(|r| r.split('"').next()).unwrap_or("?");
                    if !NOT_THE_JSON_API.iter().any(|p| route.starts_with(p)) {
                        bare.push(format!("{}:{}: {}", path.display(), i + 1, code.trim()));
                    }
                }
            }
        }
    }
    assert!(bare.is_empty(), "routes registered without their OpenAPI operation (use `routes!`):\n{}", bare.join("\n"));
    let api = std::fs::read_to_string(src.join("api.rs")).expect("api.rs");
    assert!(api.contains("pub(crate) fn api_routes()"), "the route table moved; update this test");
}

// ----- 3. the document is well-formed OpenAPI 3.1 -----------------------------------------------

/// Resolves a local `$ref` (`#/components/schemas/Agent`).
fn resolve<'a>(doc: &'a Value, r: &str) -> Option<&'a Value> {
    let pointer = r.strip_prefix('#')?;
    doc.pointer(pointer)
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    out.push(x.as_str().expect("$ref is a string").to_owned());
                } else {
                    collect_refs(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

/// What each operation takes, as the contract says: `admin`, `agent`, `either`, `open`, or
/// `metrics` (open on loopback, else the admin token).
const SECURITY: &[(&str, &str, &str)] = &[
    ("GET", "/healthz", "open"),
    ("GET", "/openapi.json", "open"),
    ("GET", "/metrics", "metrics"),
    ("POST", "/v1/agents", "either"),
    ("GET", "/v1/agents", "admin"),
    ("GET", "/v1/agents/{handle}", "admin"),
    ("PATCH", "/v1/agents/{handle}", "admin"),
    ("POST", "/v1/agents/{handle}/revoke", "either"),
    ("POST", "/v1/agents/{handle}/keys", "admin"),
    ("POST", "/v1/agents/{handle}/suspend", "admin"),
    ("POST", "/v1/agents/{handle}/resume", "admin"),
    ("GET", "/v1/agents/{handle}/audit", "admin"),
    ("GET", "/v1/agents/{handle}/usage", "admin"),
    ("POST", "/v1/spend", "agent"),
    ("POST", "/v1/holds", "agent"),
    ("POST", "/v1/holds/{id}/capture", "agent"),
    ("POST", "/v1/holds/{id}/release", "agent"),
    ("GET", "/v1/me", "agent"),
    ("GET", "/v1/me/audit", "agent"),
    ("GET", "/v1/blast-radius", "admin"),
    ("GET", "/v1/audit", "admin"),
    ("GET", "/v1/alerts", "admin"),
];

#[tokio::test]
async fn the_document_is_openapi_3_1_and_self_consistent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = serve_on_loopback(dir.path()).await;
    let doc = fetch_document(addr).await;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")), "openapi: {}", doc["openapi"]);
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(doc["info"]["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(doc["info"]["description"].as_str().is_some_and(|d| d.contains("/proxy/") && d.contains("/console")));

    // Every $ref resolves.
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(refs.len() > 50, "{} refs", refs.len());
    for r in &refs {
        assert!(resolve(&doc, r).is_some(), "unresolved $ref {r}");
    }

    let schemes = doc["components"]["securitySchemes"].as_object().expect("security schemes");
    for (name, scheme) in schemes {
        assert_eq!(scheme["type"], "http", "{name}");
        assert_eq!(scheme["scheme"], "bearer", "{name}");
    }
    assert_eq!(schemes["agent_key"]["bearerFormat"], "bk_…");

    let mut op_ids = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let template_params: BTreeSet<String> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(str::to_owned)
            .collect();
        for m in METHODS {
            let Some(op) = item.get(*m) else { continue };
            let what = format!("{} {path}", m.to_uppercase());
            assert!(op_ids.insert(op["operationId"].as_str().expect("operationId").to_owned()), "{what}");
            assert!(op["tags"].as_array().is_some_and(|t| !t.is_empty()), "{what}: no tag");
            assert!(op["summary"].as_str().is_some_and(|s| !s.is_empty()), "{what}: no summary");
            // Inputs are never a JSON null: an optional body or header is left out.
            let body = &op["requestBody"]["content"]["application/json"]["schema"];
            assert!(!body.to_string().contains(r#""null""#), "{what}: the request body admits null: {body}");
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            let in_path: BTreeSet<String> = params
                .iter()
                .filter(|p| p["in"] == "path")
                .map(|p| {
                    assert_eq!(p["required"], true, "{what}: path parameters are required");
                    p["name"].as_str().expect("name").to_owned()
                })
                .collect();
            assert_eq!(in_path, template_params, "{what}: path parameters");
            for p in &params {
                assert!(p["schema"].is_object(), "{what}: parameter {} has no schema", p["name"]);
            }
            let responses = op["responses"].as_object().expect("responses");
            assert!(responses.keys().any(|s| s.starts_with('2')), "{what}: no 2xx answer");
            for (status, r) in responses {
                let r = match r.get("$ref") {
                    Some(rf) => resolve(&doc, rf.as_str().expect("ref")).expect("response ref"),
                    None => r,
                };
                assert!(r["description"].as_str().is_some_and(|d| !d.is_empty()), "{what} {status}");
                if !status.starts_with('2') {
                    let schema = &r["content"]["application/json"]["schema"];
                    assert_eq!(schema["$ref"], "#/components/schemas/Error", "{what} {status}: error body");
                }
            }
            // Security: as the contract says, and only schemes that exist.
            let expected = SECURITY
                .iter()
                .find(|(sm, sp, _)| sm.eq_ignore_ascii_case(m) && sp == path)
                .unwrap_or_else(|| panic!("{what}: add it to SECURITY with the credentials the contract gives it"))
                .2;
            let mut reqs: Vec<String> = Vec::new();
            for req in op["security"].as_array().cloned().unwrap_or_default() {
                let names: Vec<&String> = req.as_object().expect("requirement").keys().collect();
                for n in &names {
                    assert!(schemes.contains_key(*n), "{what}: unknown security scheme {n}");
                }
                reqs.push(names.iter().map(|n| n.as_str()).collect::<Vec<_>>().join("+"));
            }
            reqs.sort();
            let want: Vec<&str> = match expected {
                "open" => vec![],
                "metrics" => vec!["", "admin_token"],
                "admin" => vec!["admin_token"],
                "agent" => vec!["agent_key"],
                "either" => vec!["admin_token", "agent_key"],
                other => panic!("{other}"),
            };
            assert_eq!(reqs, want, "{what}: security");
            seen.insert((m.to_uppercase(), path.clone()));
        }
    }
    // Every endpoint the contract names is documented.
    for (m, p, _) in SECURITY {
        assert!(seen.contains(&(m.to_string(), p.to_string())), "{m} {p} is not in the document");
    }
}

// ----- 2. the wire matches the document ---------------------------------------------------------

/// A focused JSON Schema (2020-12 subset, as utoipa emits it) validator. Strict where drift would
/// hide: an object may carry only the properties its schema declares (through `allOf` too), and
/// a validation keyword this checker does not know fails the test rather than pass unchecked.
struct Checker<'a> {
    doc: &'a Value,
    /// Checking an answer: a `null` on the wire must be a required property (it is always sent).
    answer: bool,
}

const ANNOTATIONS: &[&str] = &["description", "examples", "example", "title", "default", "deprecated", "format"];

impl Checker<'_> {
    fn check(&self, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
        self.node(schema, v, at, false)
    }

    /// The property names an object schema declares, through `$ref` and `allOf`; `None` when it
    /// admits any (`additionalProperties` not false, or no object shape at all).
    fn declared(&self, schema: &Value) -> Option<BTreeSet<String>> {
        if let Some(r) = schema.get("$ref") {
            return self.declared(resolve(self.doc, r.as_str()?)?);
        }
        let mut out = BTreeSet::new();
        let mut shaped = false;
        if let Some(p) = schema.get("properties").and_then(Value::as_object) {
            shaped = true;
            out.extend(p.keys().cloned());
        }
        if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
            for s in all {
                shaped = true;
                out.extend(self.declared(s)?);
            }
        }
        match schema.get("additionalProperties") {
            Some(Value::Bool(false)) | None if shaped => Some(out),
            _ => None,
        }
    }

    fn node(&self, schema: &Value, v: &Value, at: &str, in_all_of: bool) -> Result<(), String> {
        let s = schema.as_object().ok_or_else(|| format!("{at}: schema is not an object"))?;
        if let Some(r) = s.get("$ref") {
            let target = resolve(self.doc, r.as_str().unwrap_or("")).ok_or_else(|| format!("{at}: bad $ref {r}"))?;
            return self.node(target, v, at, in_all_of);
        }
        for (k, x) in s {
            match k.as_str() {
                "type" => {
                    let types: Vec<&str> = match x {
                        Value::String(t) => vec![t.as_str()],
                        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                        _ => return Err(format!("{at}: bad type {x}")),
                    };
                    if !types.iter().any(|t| is_type(v, t)) {
                        return Err(format!("{at}: {v} is not of type {x}"));
                    }
                }
                "properties" => {
                    let (Some(props), Some(obj)) = (x.as_object(), v.as_object()) else { continue };
                    let required: Vec<&str> = s
                        .get("required")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    for (name, ps) in props {
                        let Some(field) = obj.get(name) else { continue };
                        // A field the wire sends as `null` is always sent: the document must say so.
                        if self.answer && field.is_null() && !required.contains(&name.as_str()) {
                            return Err(format!("{at}: `{name}` is sent as null but not marked required"));
                        }
                        self.node(ps, field, &format!("{at}.{name}"), false)?;
                    }
                }
                "required" => {
                    let Some(obj) = v.as_object() else { continue };
                    for name in x.as_array().into_iter().flatten().filter_map(Value::as_str) {
                        if !obj.contains_key(name) {
                            return Err(format!("{at}: required property `{name}` is missing"));
                        }
                    }
                }
                "additionalProperties" | "propertyNames" => {
                    let Some(obj) = v.as_object() else { continue };
                    let declared: BTreeSet<&String> =
                        s.get("properties").and_then(Value::as_object).map(|p| p.keys().collect()).unwrap_or_default();
                    for (name, field) in obj {
                        if k == "propertyNames" {
                            self.node(x, &Value::String(name.clone()), &format!("{at}[key {name}]"), false)?;
                        } else if !declared.contains(name) {
                            match x {
                                Value::Bool(false) if !in_all_of => {
                                    return Err(format!("{at}: property `{name}` is not allowed"));
                                }
                                Value::Bool(_) => {}
                                extra => self.node(extra, field, &format!("{at}.{name}"), false)?,
                            }
                        }
                    }
                }
                "items" => {
                    if let Some(a) = v.as_array() {
                        for (i, item) in a.iter().enumerate() {
                            self.node(x, item, &format!("{at}[{i}]"), false)?;
                        }
                    }
                }
                "allOf" => {
                    for sub in x.as_array().into_iter().flatten() {
                        self.node(sub, v, at, true)?;
                    }
                }
                "oneOf" => {
                    let ok =
                        x.as_array().into_iter().flatten().filter(|sub| self.node(sub, v, at, false).is_ok()).count();
                    if ok != 1 {
                        return Err(format!("{at}: {v} matches {ok} of oneOf {x}"));
                    }
                }
                "anyOf" => {
                    if !x.as_array().into_iter().flatten().any(|sub| self.node(sub, v, at, false).is_ok()) {
                        return Err(format!("{at}: {v} matches none of anyOf {x}"));
                    }
                }
                "enum" => {
                    if !x.as_array().is_some_and(|a| a.contains(v)) {
                        return Err(format!("{at}: {v} is not one of {x}"));
                    }
                }
                "minimum" => {
                    if let (Some(n), Some(min)) = (v.as_f64(), x.as_f64())
                        && n < min
                    {
                        return Err(format!("{at}: {n} is below {min}"));
                    }
                }
                "pattern" => {
                    let Some(text) = v.as_str() else { continue };
                    let ok = match x.as_str() {
                        Some(p) if p == bulkhead_core::money::AMOUNT_PATTERN => is_amount(text),
                        other => return Err(format!("{at}: this checker does not know pattern {other:?}")),
                    };
                    if !ok {
                        return Err(format!("{at}: {text:?} does not match {x}"));
                    }
                }
                k if ANNOTATIONS.contains(&k) => {}
                other => return Err(format!("{at}: this checker does not know the keyword `{other}`")),
            }
        }
        if let Some(f) = s.get("format").and_then(Value::as_str)
            && let Some(text) = v.as_str()
            && f == "date-time"
            && time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).is_err()
        {
            return Err(format!("{at}: {text:?} is not an RFC 3339 date-time"));
        }
        // Undeclared properties: the wire may not carry a field the document does not name.
        if !in_all_of
            && let Some(obj) = v.as_object()
            && s.get("additionalProperties").is_none()
            && let Some(declared) = self.declared(schema)
        {
            for name in obj.keys() {
                if !declared.contains(name) {
                    return Err(format!("{at}: property `{name}` is on the wire but not in the document"));
                }
            }
        }
        Ok(())
    }
}

fn is_type(v: &Value, t: &str) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        _ => false,
    }
}

/// The server and its document, checking every exchange against it.
struct Checked {
    srv: Srv,
    doc: Value,
    /// (METHOD, template, status) seen.
    covered: std::sync::Mutex<BTreeSet<(String, String, u16)>>,
}

impl Checked {
    async fn new() -> Checked {
        let srv = Srv::new().await;
        let r = srv.get("/openapi.json", &Auth::None).await;
        r.expect(200, None);
        Checked { doc: r.json.clone(), srv, covered: Default::default() }
    }

    fn operation(&self, method: &str, template: &str) -> &Value {
        let op = &self.doc["paths"][template][method.to_lowercase()];
        assert!(op.is_object(), "{method} {template} is not in the document");
        op
    }

    /// Sends `body` to `path` (an instance of `template`) and checks request and answer against
    /// the document.
    async fn call(
        &self,
        method: &str,
        template: &str,
        path: &str,
        auth: &Auth,
        headers: &[(&str, &[u8])],
        body: Option<Value>,
    ) -> Resp {
        let op = self.operation(method, template).clone();
        let request = Checker { doc: &self.doc, answer: false };
        let checker = Checker { doc: &self.doc, answer: true };
        if let Some(b) = &body {
            let schema = &op["requestBody"]["content"]["application/json"]["schema"];
            assert!(schema.is_object(), "{method} {template} takes no documented body, but one was sent");
            if let Err(e) = request.check(schema, b, "request") {
                panic!("{method} {template}: the request {b} does not match the document: {e}");
            }
        }
        let text = body.map(|b| b.to_string()).unwrap_or_default();
        let r = self.srv.call(method, path, auth, headers, text).await;
        let status = r.status.to_string();
        let mut resp = op["responses"].get(&status).unwrap_or_else(|| {
            panic!("{method} {template} answered {status}, which the document does not list: {}", r.text)
        });
        if let Some(rf) = resp.get("$ref") {
            resp = resolve(&self.doc, rf.as_str().expect("ref")).expect("response ref");
        }
        let content = resp["content"].as_object().expect("documented content");
        let ct = r.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let (media, c) = content
            .iter()
            .find(|(m, _)| ct.starts_with(m.split(';').next().unwrap_or(m)))
            .unwrap_or_else(|| panic!("{method} {template} {status}: content-type {ct} is not documented"));
        if media.starts_with("application/json")
            && let Err(e) = checker.check(&c["schema"], &r.json, "answer")
        {
            panic!("{method} {template} {status}: the answer does not match the document: {e}\n{}", r.text);
        }
        self.covered.lock().unwrap().insert((method.to_owned(), template.to_owned(), r.status));
        r
    }

    async fn post(&self, template: &str, path: &str, auth: &Auth, body: Value) -> Resp {
        self.call("POST", template, path, auth, &[], Some(body)).await
    }

    async fn get(&self, template: &str, path: &str, auth: &Auth) -> Resp {
        self.call("GET", template, path, auth, &[], None).await
    }
}

#[tokio::test]
async fn a_real_flow_answers_as_the_document_says() {
    let c = Checked::new().await;
    let admin = &Auth::Admin;

    c.get("/healthz", "/healthz", &Auth::None).await.expect(200, None);
    c.get("/openapi.json", "/openapi.json", &Auth::None).await.expect(200, None);
    c.get("/metrics", "/metrics", &Auth::None).await.expect(200, None);

    // Agents: a root with every option, a plain one, a shadow one, a child.
    let root = c
        .post(
            "/v1/agents",
            "/v1/agents",
            admin,
            json!({"handle": "root-1", "scopes": ["payments:write", "spawn:agents", "read:*"],
                   "spending_cap": "50.00", "window": "24h", "per_tx_limit": 5, "lifetime_cap": "500",
                   "rate_limit": {"requests": 100, "per": "1m"}, "expires_in": "30d",
                   "labels": {"team": "billing"}, "breaker": {"denials": 20, "window": "60s"}}),
        )
        .await;
    root.expect(201, None);
    let root_key = root.json["key"].as_str().expect("key").to_owned();
    let rk = &Auth::key(&root_key);
    let plain = c
        .post("/v1/agents", "/v1/agents", admin, json!({"handle": "plain", "scopes": ["pay:x"], "spending_cap": "10"}))
        .await;
    let plain_key = plain.json["key"].as_str().expect("key").to_owned();
    let pk = &Auth::key(&plain_key);
    let shadow = c
        .post(
            "/v1/agents",
            "/v1/agents",
            admin,
            json!({"handle": "shadow", "scopes": ["pay:x"], "spending_cap": "1", "enforce": false}),
        )
        .await;
    let shadow_key = shadow.json["key"].as_str().expect("key").to_owned();
    let child = c
        .post(
            "/v1/agents",
            "/v1/agents",
            rk,
            json!({"handle": "child-1", "scopes": ["payments:write"], "spending_cap": "5", "lifetime_cap": "5",
                   "rate_limit": {"requests": 10, "per": "1m"}, "expires_in": "1d"}),
        )
        .await;
    child.expect(201, None);
    assert_eq!(child.json["parent"], "root-1");
    c.post("/v1/agents", "/v1/agents", admin, json!({"handle": "plain", "scopes": ["pay:x"], "spending_cap": "1"}))
        .await
        .err(409, "handle_taken");
    c.post("/v1/agents", "/v1/agents", rk, json!({"handle": "child-2", "scopes": ["admin:*"], "spending_cap": "1"}))
        .await
        .err(403, "scope_escalation");
    c.post("/v1/agents", "/v1/agents", admin, json!({"handle": "Bad Handle", "scopes": [], "spending_cap": "1"}))
        .await
        .err(400, "invalid_handle");
    c.post("/v1/agents", "/v1/agents", &Auth::None, json!({"handle": "x", "scopes": [], "spending_cap": "1"}))
        .await
        .err(401, "invalid_credentials");

    // Reads.
    c.get("/v1/agents", "/v1/agents?limit=2", admin).await.expect(200, None);
    c.get("/v1/agents", "/v1/agents?after=plain", admin).await.expect(200, None);
    c.get("/v1/agents", "/v1/agents?limit=x", admin).await.err(400, "invalid_request");
    c.get("/v1/agents/{handle}", "/v1/agents/root-1", admin).await.expect(200, None);
    c.get("/v1/agents/{handle}", "/v1/agents/nobody", admin).await.err(404, "not_found");
    c.get("/v1/agents/{handle}", "/v1/agents/root-1", rk).await.err(401, "invalid_credentials");
    c.call(
        "PATCH",
        "/v1/agents/{handle}",
        "/v1/agents/plain",
        admin,
        &[],
        Some(json!({"spending_cap": "20.00", "lifetime_cap": null, "labels": {"env": "test"}})),
    )
    .await
    .expect(200, None);

    // Money.
    let idem: &[(&str, &[u8])] = &[("idempotency-key", b"spend-1")];
    let spend = json!({"scope": "pay:x", "amount": "2.50", "memo": "first"});
    c.call("POST", "/v1/spend", "/v1/spend", pk, idem, Some(spend.clone())).await.expect(200, None);
    let replay = c.call("POST", "/v1/spend", "/v1/spend", pk, idem, Some(spend)).await;
    replay.expect(200, None);
    assert_eq!(replay.headers.get("idempotent-replayed").map(|v| v.as_bytes()), Some(&b"true"[..]));
    c.call("POST", "/v1/spend", "/v1/spend", pk, idem, Some(json!({"scope": "pay:x", "amount": "3"})))
        .await
        .err(422, "idempotency_key_reused");
    c.post("/v1/spend", "/v1/spend", pk, json!({"scope": "pay:x", "amount": "100"}))
        .await
        .err(402, "per_tx_limit_exceeded");
    c.post("/v1/spend", "/v1/spend", pk, json!({"scope": "pay:y", "amount": "1"})).await.err(403, "scope_not_granted");
    c.post("/v1/spend", "/v1/spend", pk, json!({"scope": "pay:x", "amount": "1.0000001"}))
        .await
        .err(400, "invalid_amount");
    c.post("/v1/spend", "/v1/spend", &Auth::key("bk_nonsense"), json!({"scope": "pay:x", "amount": "1"}))
        .await
        .err(401, "invalid_credentials");
    let sh = c.post("/v1/spend", "/v1/spend", &Auth::key(&shadow_key), json!({"scope": "pay:x", "amount": "2"})).await;
    sh.expect(200, None);
    assert!(sh.json["shadow_denied"].is_string(), "{}", sh.text);

    let hold =
        c.post("/v1/holds", "/v1/holds", pk, json!({"scope": "pay:x", "amount": "1.00", "expires_in": "5m"})).await;
    hold.expect(201, None);
    let id = hold.json["id"].as_str().expect("hold id").to_owned();
    c.post("/v1/holds/{id}/capture", &format!("/v1/holds/{id}/capture"), pk, json!({"amount": "0.40"}))
        .await
        .expect(200, None);
    c.post("/v1/holds/{id}/capture", &format!("/v1/holds/{id}/capture"), pk, json!({"amount": "0.40"}))
        .await
        .err(409, "hold_closed");
    let hold = c.post("/v1/holds", "/v1/holds", pk, json!({"scope": "pay:x", "amount": "1"})).await;
    let id = hold.json["id"].as_str().expect("hold id").to_owned();
    c.post("/v1/holds/{id}/capture", &format!("/v1/holds/{id}/capture"), pk, json!({"amount": "2"}))
        .await
        .err(400, "invalid_amount");
    c.call("POST", "/v1/holds/{id}/release", &format!("/v1/holds/{id}/release"), pk, &[], None).await.expect(200, None);
    c.call("POST", "/v1/holds/{id}/release", "/v1/holds/hold_none/release", pk, &[], None).await.err(404, "not_found");
    // The window cap.
    c.post("/v1/spend", "/v1/spend", pk, json!({"scope": "pay:x", "amount": "19"}))
        .await
        .err(402, "per_tx_limit_exceeded");
    for _ in 0..3 {
        c.post("/v1/spend", "/v1/spend", pk, json!({"scope": "pay:x", "amount": "5"})).await;
    }
    let over = c.post("/v1/spend", "/v1/spend", pk, json!({"scope": "pay:x", "amount": "5"})).await;
    over.err(402, "spending_cap_exceeded");
    assert!(over.json["remaining"]["window"].is_string() && over.json["window_resets_at"].is_string(), "{}", over.text);
    assert!(over.headers.contains_key("retry-after"), "a window cap's 402 says when to retry");

    // Rate limit.
    let (_, limited) = c
        .srv
        .create(json!({"handle": "limited", "scopes": ["pay:x"], "spending_cap": "10",
                       "rate_limit": {"requests": 1, "per": "1h"}}))
        .await;
    let lk = &Auth::key(&limited);
    c.post("/v1/spend", "/v1/spend", lk, json!({"scope": "pay:x", "amount": "1"})).await.expect(200, None);
    let r = c.post("/v1/spend", "/v1/spend", lk, json!({"scope": "pay:x", "amount": "1"})).await;
    r.err(429, "rate_limited");
    assert!(r.headers.contains_key("retry-after"));

    // Suspension by the breaker, and resume.
    let (_, tripped) = c
        .srv
        .create(json!({"handle": "tripped", "scopes": ["pay:x"], "spending_cap": "1", "breaker": {"denials": 2}}))
        .await;
    let tk = &Auth::key(&tripped);
    for _ in 0..2 {
        c.post("/v1/spend", "/v1/spend", tk, json!({"scope": "pay:x", "amount": "2"}))
            .await
            .err(402, "per_tx_limit_exceeded");
    }
    c.post("/v1/holds", "/v1/holds", tk, json!({"scope": "pay:x", "amount": "1"})).await.err(403, "agent_suspended");
    let resumed = c.call("POST", "/v1/agents/{handle}/resume", "/v1/agents/tripped/resume", admin, &[], None).await;
    resumed.expect(200, None);
    assert_eq!(resumed.json["status"], "active");

    // Suspension by an operator.
    let suspended =
        c.post("/v1/agents/{handle}/suspend", "/v1/agents/tripped/suspend", admin, json!({"reason": "audit"})).await;
    suspended.expect(200, None);
    assert_eq!(suspended.json["status"], "suspended");
    c.post("/v1/spend", "/v1/spend", tk, json!({"scope": "pay:x", "amount": "0.5"})).await.err(403, "agent_suspended");
    c.post("/v1/agents/{handle}/suspend", "/v1/agents/nobody/suspend", admin, json!({})).await.err(404, "not_found");
    c.call("POST", "/v1/agents/{handle}/resume", "/v1/agents/tripped/resume", admin, &[], None).await.expect(200, None);

    // The caller's own view and every history read.
    c.get("/v1/me", "/v1/me", pk).await.expect(200, None);
    c.get("/v1/me", "/v1/me", &Auth::None).await.err(401, "invalid_credentials");
    c.get("/v1/me/audit", "/v1/me/audit?limit=5", pk).await.expect(200, None);
    let audit = c.get("/v1/agents/{handle}/audit", "/v1/agents/plain/audit", admin).await;
    audit.expect(200, None);
    assert!(audit.json["events"].as_array().is_some_and(|e| e.len() > 5));
    c.get("/v1/agents/{handle}/audit", "/v1/agents/plain/audit?after=x", admin).await.err(400, "invalid_request");
    c.get("/v1/agents/{handle}/audit", "/v1/agents/nobody/audit", admin).await.err(404, "not_found");
    c.get("/v1/agents/{handle}/usage", "/v1/agents/plain/usage?bucket=1h&limit=3", admin).await.expect(200, None);
    c.get("/v1/agents/{handle}/usage", "/v1/agents/nobody/usage", admin).await.err(404, "not_found");
    c.get("/v1/audit", "/v1/audit?agent=plain&outcome=denied", admin).await.expect(200, None);
    c.get("/v1/audit", "/v1/audit?before=1000000", admin).await.expect(200, None);
    c.get("/v1/audit", "/v1/audit?outcome=maybe", admin).await.err(400, "invalid_request");
    c.get("/v1/alerts", "/v1/alerts", admin).await.expect(200, None);
    c.get("/v1/blast-radius", "/v1/blast-radius", admin).await.expect(200, None);
    c.get("/v1/blast-radius", "/v1/blast-radius", pk).await.err(401, "invalid_credentials");

    // Keys and revocation.
    let rotated = c.call("POST", "/v1/agents/{handle}/keys", "/v1/agents/plain/keys", admin, &[], None).await;
    rotated.expect(201, None);
    c.get("/v1/me", "/v1/me", pk).await.err(401, "invalid_credentials");
    c.post("/v1/agents/{handle}/revoke", "/v1/agents/child-1/revoke", rk, json!({"reason": "done"}))
        .await
        .expect(200, None);
    let revoked =
        c.post("/v1/agents/{handle}/revoke", "/v1/agents/root-1/revoke", admin, json!({"reason": "done"})).await;
    revoked.expect(200, None);
    c.post("/v1/spend", "/v1/spend", rk, json!({"scope": "payments:write", "amount": "1"}))
        .await
        .err(401, "credential_revoked");
    c.call("POST", "/v1/agents/{handle}/resume", "/v1/agents/root-1/resume", admin, &[], None)
        .await
        .err(409, "agent_revoked");
    c.call("POST", "/v1/agents/{handle}/keys", "/v1/agents/nobody/keys", admin, &[], None).await.err(404, "not_found");
    c.post("/v1/agents/{handle}/revoke", "/v1/agents/nobody/revoke", admin, json!({})).await.err(404, "not_found");
    c.get("/v1/agents/{handle}", "/v1/agents/root-1", admin).await.expect(200, None);

    // Every operation of the document was exercised, with a 2xx answer.
    let covered = c.covered.lock().unwrap().clone();
    for (method, template) in operations(&c.doc) {
        assert!(
            covered.iter().any(|(m, t, s)| *m == method && *t == template && (200..300).contains(s)),
            "{method} {template} was not exercised"
        );
    }
    let statuses: BTreeMap<u16, usize> = covered.iter().fold(BTreeMap::new(), |mut m, (_, _, s)| {
        *m.entry(*s).or_default() += 1;
        m
    });
    for s in [200, 201, 400, 401, 402, 403, 404, 409, 422, 429] {
        assert!(statuses.contains_key(&s), "no answer {s} was checked: {statuses:?}");
    }
}

/// The checker refuses what it should, so a passing flow means something.
#[test]
fn the_checker_refuses_drift() {
    let doc = json!({"components": {"schemas": {
        "A": {"type": "object", "required": ["x", "n"], "properties": {"x": {"type": "string"}, "n": {"type": ["integer", "null"]}}},
        "B": {"allOf": [{"$ref": "#/components/schemas/A"}, {"type": "object", "properties": {"k": {"type": "string"}}}]}
    }}});
    let c = Checker { doc: &doc, answer: true };
    let a = json!({"$ref": "#/components/schemas/A"});
    let b = json!({"$ref": "#/components/schemas/B"});
    assert!(c.check(&a, &json!({"x": "1", "n": null}), "t").is_ok());
    assert!(c.check(&a, &json!({"n": 1}), "t").is_err(), "missing required");
    assert!(c.check(&a, &json!({"x": 1, "n": 1}), "t").is_err(), "wrong type");
    assert!(c.check(&a, &json!({"x": "1", "n": 1, "extra": 1}), "t").is_err(), "undeclared field");
    let c2 = json!({"type": "object", "properties": {"n": {"type": ["integer", "null"]}}});
    assert!(c.check(&c2, &json!({"n": null}), "t").is_err(), "a null the document calls optional");
    assert!(c.check(&b, &json!({"x": "1", "n": 2, "k": "key"}), "t").is_ok());
    assert!(
        c.check(&b, &json!({"x": "1", "n": 2, "k": "key", "z": 0}), "t").is_err(),
        "undeclared field through allOf"
    );
    let amount = json!({"type": "string", "pattern": bulkhead_core::money::AMOUNT_PATTERN});
    assert!(c.check(&amount, &json!("5.00"), "t").is_ok());
    assert!(c.check(&amount, &json!("5"), "t").is_err());
    let t = json!({"type": "string", "format": "date-time"});
    assert!(c.check(&t, &json!("2023-11-14T22:13:20Z"), "t").is_ok());
    assert!(c.check(&t, &json!("yesterday"), "t").is_err());
    assert!(c.check(&json!({"maxLength": 3}), &json!("abcd"), "t").is_err(), "unknown keywords fail");
}
