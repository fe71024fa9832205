//! `mock-upstream`: a small OpenAI- and Anthropic-compatible server for the gateway's tests and
//! benchmark. Not part of the product.
//!
//! It listens on loopback (`--listen`, default an ephemeral port), prints
//! `mock-upstream listening on http://ADDR`, and records every call it serves. Routes:
//!
//! - `POST …/chat/completions` — OpenAI chat: JSON with `usage`, or with `"stream": true` an SSE
//!   stream whose final chunk carries `usage` when `stream_options.include_usage` is set.
//! - `POST …/messages` — Anthropic messages: JSON with `usage`, or an SSE stream with
//!   `message_start` and `message_delta` usage.
//! - `POST …/responses` — OpenAI Responses: JSON with `usage` (`input_tokens`/`output_tokens`),
//!   or an SSE stream whose `response.completed` event carries it.
//! - anything else — echoes method, path and query as JSON.
//! - `GET /__stats` — `{"calls", "finished_streams", "aborted_streams"}`;
//!   `GET /__calls` — every recorded call (method, path, headers, body);
//!   `POST /__open/{gate}` — lets the streams waiting at that gate go on.
//!
//! Request headers steer an answer: `x-mock-usage: IN,OUT[,CACHE_WRITE,CACHE_READ]` (default
//! `1000,500`), `x-mock-status: CODE`, `x-mock-delay-ms: MS` (before the answer's headers),
//! `x-mock-chunks: N` and `x-mock-chunk-delay-ms: MS` (streams), `x-mock-gate: NAME` (a stream
//! sends its first chunk, then waits for `POST /__open/NAME`), `x-mock-price: AMOUNT` (answered
//! in the `x-upstream-cost` header).

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

#[derive(Default)]
struct Mock {
    calls: AtomicU64,
    finished: AtomicU64,
    aborted: AtomicU64,
    records: Mutex<Vec<Value>>,
    gates: Mutex<HashMap<String, Arc<Notify>>>,
    opened: Mutex<std::collections::HashSet<String>>,
}

type M = Arc<Mock>;

impl Mock {
    fn gate(&self, name: &str) -> Arc<Notify> {
        self.gates.lock().expect("gates").entry(name.to_owned()).or_default().clone()
    }

    async fn wait_gate(&self, name: &str) {
        let n = self.gate(name);
        loop {
            let notified = n.notified();
            if self.opened.lock().expect("opened").contains(name) {
                return;
            }
            notified.await;
        }
    }
}

/// A body fed chunk by chunk from a channel: each chunk is sent as soon as it is written.
struct ChanBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(http_body::Frame::data(b))))
    }
}

fn num(h: &HeaderMap, name: &str, default: u64) -> u64 {
    h.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

fn usage(h: &HeaderMap) -> [u64; 4] {
    let mut u = [1000, 500, 0, 0];
    if let Some(v) = h.get("x-mock-usage").and_then(|v| v.to_str().ok()) {
        for (i, p) in v.split(',').take(4).enumerate() {
            if let Ok(n) = p.trim().parse() {
                u[i] = n;
            }
        }
    }
    u
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut listen = "127.0.0.1:0".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().expect("--listen ADDR"),
            other => panic!("unknown argument {other:?}"),
        }
    }
    let mock: M = Arc::default();
    let app = Router::new()
        .route("/__stats", get(stats))
        .route("/__calls", get(calls))
        .route("/__open/{gate}", post(open))
        .fallback(serve)
        .with_state(mock);
    let listener = tokio::net::TcpListener::bind(&listen).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    println!("mock-upstream listening on http://{addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    axum::serve(listener, app).await.expect("serve");
}

async fn stats(State(m): State<M>) -> Response {
    axum::Json(json!({
        "calls": m.calls.load(Ordering::SeqCst),
        "finished_streams": m.finished.load(Ordering::SeqCst),
        "aborted_streams": m.aborted.load(Ordering::SeqCst),
    }))
    .into_response()
}

async fn calls(State(m): State<M>) -> Response {
    let records = m.records.lock().expect("records").clone();
    axum::Json(json!({"calls": records})).into_response()
}

async fn open(State(m): State<M>, Path(gate): Path<String>) -> Response {
    m.opened.lock().expect("opened").insert(gate.clone());
    m.gate(&gate).notify_waiters();
    StatusCode::NO_CONTENT.into_response()
}

async fn serve(State(m): State<M>, req: Request) -> Response {
    m.calls.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, 64 * 1024 * 1024).await {
        Ok(b) => b,
        Err(_) => return (StatusCode::BAD_REQUEST, "unreadable body").into_response(),
    };
    let headers: serde_json::Map<String, Value> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned())))
        .collect();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    m.records.lock().expect("records").push(json!({
        "method": parts.method.as_str(),
        "path": path,
        "query": query,
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    }));
    let h = parts.headers;
    let delay = num(&h, "x-mock-delay-ms", 0);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Some(code) = h.get("x-mock-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u16>().ok()) {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, axum::Json(json!({"error": {"message": "mock failure", "type": "server_error"}})))
            .into_response();
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut resp = if path.ends_with("/chat/completions") {
        openai(&m, &h, &req)
    } else if path.ends_with("/messages") {
        anthropic(&m, &h, &req)
    } else if path.ends_with("/responses") {
        responses(&m, &h, &req)
    } else {
        axum::Json(json!({"method": parts.method.as_str(), "path": path, "query": query, "echo": true})).into_response()
    };
    if let Some(p) = h.get("x-mock-price") {
        resp.headers_mut().insert("x-upstream-cost", p.clone());
    }
    resp
}

/// Streams `events` (pre-rendered SSE events): the first at once, the rest after the gate (if
/// any) and `x-mock-chunk-delay-ms` apart.
fn stream(m: &M, h: &HeaderMap, events: Vec<String>) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let gate = h.get("x-mock-gate").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let pause = Duration::from_millis(num(h, "x-mock-chunk-delay-ms", 0));
    let m = m.clone();
    tokio::spawn(async move {
        for (i, ev) in events.into_iter().enumerate() {
            if i == 1
                && let Some(g) = &gate
            {
                m.wait_gate(g).await;
            }
            if i > 0 && !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if tx.send(Bytes::from(ev)).await.is_err() {
                m.aborted.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
        m.finished.fetch_add(1, Ordering::SeqCst);
    });
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::new(ChanBody(rx)))
        .expect("response")
}

fn openai(m: &M, h: &HeaderMap, req: &Value) -> Response {
    let [p, c, _, _] = usage(h);
    let usage = json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c});
    if req["stream"] != true {
        return axum::Json(json!({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": "mock",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the mock."}, "finish_reason": "stop"}],
            "usage": usage,
        }))
        .into_response();
    }
    let include = req["stream_options"]["include_usage"] == true;
    let n = num(h, "x-mock-chunks", 3);
    let chunk = |delta: Value, finish: Value| {
        let mut v = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": "mock",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        if include {
            v["usage"] = Value::Null;
        }
        format!("data: {v}\n\n")
    };
    let mut events: Vec<String> = (0..n).map(|i| chunk(json!({"content": format!("tok{i} ")}), Value::Null)).collect();
    events.push(chunk(json!({}), json!("stop")));
    if include {
        let v = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": "mock",
            "choices": [], "usage": usage});
        events.push(format!("data: {v}\n\n"));
    }
    events.push("data: [DONE]\n\n".into());
    stream(m, h, events)
}

fn anthropic(m: &M, h: &HeaderMap, req: &Value) -> Response {
    let [p, c, cw, cr] = usage(h);
    if req["stream"] != true {
        return axum::Json(json!({
            "id": "msg_mock", "type": "message", "role": "assistant", "model": "mock",
            "content": [{"type": "text", "text": "Hello from the mock."}], "stop_reason": "end_turn",
            "usage": {"input_tokens": p, "output_tokens": c, "cache_creation_input_tokens": cw, "cache_read_input_tokens": cr},
        }))
        .into_response();
    }
    let ev = |name: &str, v: Value| format!("event: {name}\ndata: {v}\n\n");
    let mut events = vec![ev(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant", "content": [], "model": "mock",
            "usage": {"input_tokens": p, "cache_creation_input_tokens": cw, "cache_read_input_tokens": cr, "output_tokens": 1}}}),
    )];
    for i in 0..num(h, "x-mock-chunks", 3) {
        events.push(ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": format!("tok{i} ")}}),
        ));
    }
    events.push(ev(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": c}}),
    ));
    events.push(ev("message_stop", json!({"type": "message_stop"})));
    stream(m, h, events)
}

fn responses(m: &M, h: &HeaderMap, req: &Value) -> Response {
    let [p, c, _, cr] = usage(h);
    let usage = json!({"input_tokens": p, "input_tokens_details": {"cached_tokens": cr},
        "output_tokens": c, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": p + c});
    let message = |text: &str| {
        json!({"type": "message", "id": "msg_mock", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]})
    };
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": "resp_mock", "object": "response", "created_at": 0, "status": status, "model": "mock",
            "output": output, "usage": usage})
    };
    if req["stream"] != true {
        return axum::Json(response("completed", json!([message("Hello from the mock.")]), usage)).into_response();
    }
    let ev = |name: &str, seq: usize, mut v: Value| {
        v["type"] = json!(name);
        v["sequence_number"] = json!(seq);
        format!("event: {name}\ndata: {v}\n\n")
    };
    let mut events =
        vec![ev("response.created", 0, json!({"response": response("in_progress", json!([]), Value::Null)}))];
    let n = num(h, "x-mock-chunks", 3) as usize;
    for i in 0..n {
        events.push(ev(
            "response.output_text.delta",
            i + 1,
            json!({"item_id": "msg_mock", "output_index": 0, "content_index": 0, "delta": format!("tok{i} ")}),
        ));
    }
    let text: String = (0..n).map(|i| format!("tok{i} ")).collect();
    events.push(ev(
        "response.completed",
        n + 1,
        json!({"response": response("completed", json!([message(&text)]), usage)}),
    ));
    stream(m, h, events)
}
