//! Local MCP servers spoken to over stdio (`command = [...]`): Bulkhead starts the process,
//! holds its one MCP session, multiplexes every agent's requests onto it and restarts it when it
//! dies.
//!
//! A stdio server has one client, so the agents never see its session: Bulkhead does the
//! handshake itself (`initialize` at a 2025 revision, then `notifications/initialized`) and
//! answers each agent's `initialize` with the result it got; `server/discover` is answered
//! "method not found", which makes 2026 clients fall back to that handshake. Each forwarded
//! request gets an id of Bulkhead's (the agents' own ids could collide) and its answer goes back
//! with the agent's id. Agents' notifications are not passed on (their ids would not match), and
//! requests the server makes of its client are answered "method not found".

use std::collections::HashMap;
use std::process::Stdio as Piped;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};

use super::jsonrpc::METHOD_NOT_FOUND;

/// The revision Bulkhead's handshake with a local server asks for.
const HANDSHAKE_VERSION: &str = "2025-11-25";
/// How long a starting server has to answer the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Waits between restarts: doubling from the first to the last.
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Requests waiting for the process, at most (more are refused as not sent).
const QUEUE_MAX: usize = 1024;

/// Why a request got no answer, split by what matters for its bill.
#[derive(Debug)]
pub enum StdioError {
    /// It never reached the process (it was down or restarting, or the queue was full).
    NotSent(String),
    /// It was written to the process, which then died.
    Lost(String),
}

type Answer = Result<Option<Value>, StdioError>;

struct Job {
    message: Value,
    answer: oneshot::Sender<Answer>,
}

/// A supervised local server. Cheap to clone; the process lives as long as a clone does.
#[derive(Clone)]
pub struct Stdio {
    tx: mpsc::Sender<Job>,
}

impl Stdio {
    /// Starts the supervisor on `rt`: it starts the process and keeps it running.
    pub fn start(name: &str, argv: Vec<String>, line_bytes_max: usize, rt: &tokio::runtime::Handle) -> Stdio {
        let (tx, rx) = mpsc::channel(QUEUE_MAX);
        rt.spawn(supervise(Arc::from(name), argv, line_bytes_max, rx));
        Stdio { tx }
    }

    /// Sends one agent message; a request's answer comes back with the agent's id, a
    /// notification or response gets `None`.
    pub async fn call(&self, message: Value) -> Answer {
        let (answer, rx) = oneshot::channel();
        self.tx
            .try_send(Job { message, answer })
            .map_err(|_| StdioError::NotSent("the local server is busy or stopped".into()))?;
        rx.await.unwrap_or_else(|_| Err(StdioError::Lost("the local server stopped".into())))
    }
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Vec<u8>>,
    init: Value,
}

async fn supervise(name: Arc<str>, argv: Vec<String>, line_bytes_max: usize, mut jobs: mpsc::Receiver<Job>) {
    let mut backoff = RESTART_BACKOFF_MIN;
    loop {
        match start(&name, &argv, line_bytes_max).await {
            Ok(run) => {
                tracing::info!(server = %name, "local MCP server started");
                backoff = RESTART_BACKOFF_MIN;
                if serve(&name, run, &mut jobs).await.is_break() {
                    return;
                }
                tracing::warn!(server = %name, "local MCP server exited; restarting");
            }
            Err(e) => tracing::warn!(server = %name, error = %e, "local MCP server did not start"),
        }
        // While down, requests are refused at once rather than queued behind the restart.
        let until = tokio::time::Instant::now() + backoff;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => break,
                job = jobs.recv() => match job {
                    Some(j) => { let _ = j.answer.send(Err(StdioError::NotSent("the local server is restarting".into()))); }
                    None => return,
                },
            }
        }
        backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
    }
}

async fn write_line(stdin: &mut ChildStdin, v: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stdin.write_all(&line).await?;
    stdin.flush().await
}

/// Starts the process and does the handshake.
async fn start(name: &str, argv: &[String], line_bytes_max: usize) -> std::io::Result<Running> {
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Piped::piped())
        .stdout(Piped::piped())
        .stderr(Piped::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(std::io::Error::other("no pipes to the process"));
    };
    let (line_tx, mut lines) = mpsc::channel(256);
    let who: Arc<str> = Arc::from(name);
    tokio::spawn(async move {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match read_line(&mut r, &mut buf, line_bytes_max).await {
                Ok(Some(true)) => {
                    if line_tx.send(std::mem::take(&mut buf)).await.is_err() {
                        return;
                    }
                }
                Ok(Some(false)) => {
                    tracing::warn!(server = %who, "a message from the local server was too long; dropped")
                }
                Ok(None) | Err(_) => return,
            }
        }
    });
    let init = json!({"jsonrpc": "2.0", "id": "bulkhead-init", "method": "initialize", "params": {
        "protocolVersion": HANDSHAKE_VERSION, "capabilities": {},
        "clientInfo": {"name": "bulkhead", "version": env!("CARGO_PKG_VERSION")}}});
    write_line(&mut stdin, &init).await?;
    let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        while let Some(line) = lines.recv().await {
            let Ok(v) = serde_json::from_slice::<Value>(&line) else { continue };
            if v.get("id") == Some(&json!("bulkhead-init")) {
                return match v.get("result") {
                    Some(r) => Ok(r.clone()),
                    None => Err(std::io::Error::other(format!("the handshake was refused: {}", v["error"]))),
                };
            }
        }
        Err(std::io::Error::other("the process ended during the handshake"))
    })
    .await
    .map_err(|_| std::io::Error::other("no answer to the handshake"))??;
    write_line(&mut stdin, &json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await?;
    Ok(Running { child, stdin, lines, init: result })
}

/// Reads one line into `buf`: `Some(true)` a line, `Some(false)` a line over `max` bytes
/// (skipped), `None` the end of the stream.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<bool>> {
    let mut over = false;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(None);
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if !over {
            if buf.len() + take > max.saturating_add(1) {
                over = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&chunk[..take]);
            }
        }
        r.consume(take);
        if done {
            return Ok(Some(!over));
        }
    }
}

/// Serves jobs until the process ends (`Continue`: restart it) or every handle is gone (`Break`).
async fn serve(name: &str, mut run: Running, jobs: &mut mpsc::Receiver<Job>) -> std::ops::ControlFlow<()> {
    let mut pending: HashMap<u64, (Value, oneshot::Sender<Answer>)> = HashMap::new();
    let mut next: u64 = 1;
    let flow = loop {
        tokio::select! {
            job = jobs.recv() => {
                let Some(job) = job else { break std::ops::ControlFlow::Break(()) };
                let msg = job.message;
                let method = msg.get("method").and_then(Value::as_str);
                let id = msg.get("id").cloned();
                match (method, id) {
                    (Some("initialize"), Some(id)) => {
                        let _ = job.answer.send(Ok(Some(json!({"jsonrpc": "2.0", "id": id, "result": run.init}))));
                    }
                    (Some("server/discover"), Some(id)) => {
                        let e = json!({"code": METHOD_NOT_FOUND, "message": "Method not found"});
                        let _ = job.answer.send(Ok(Some(json!({"jsonrpc": "2.0", "id": id, "error": e}))));
                    }
                    (Some(_), Some(id)) => {
                        let mut msg = msg;
                        let n = next;
                        next += 1;
                        msg["id"] = json!(n);
                        if pending.len() >= QUEUE_MAX {
                            pending.retain(|_, (_, tx)| !tx.is_closed());
                        }
                        if let Err(e) = write_line(&mut run.stdin, &msg).await {
                            let _ = job.answer.send(Err(StdioError::Lost(e.to_string())));
                            break std::ops::ControlFlow::Continue(());
                        }
                        pending.insert(n, (id, job.answer));
                    }
                    // Notifications and answers stay here (see the module's comment).
                    _ => { let _ = job.answer.send(Ok(None)); }
                }
            }
            line = run.lines.recv() => {
                let Some(line) = line else { break std::ops::ControlFlow::Continue(()) };
                let Ok(mut v) = serde_json::from_slice::<Value>(&line) else {
                    tracing::debug!(server = %name, "a line from the local server is not JSON; ignored");
                    continue;
                };
                let has_method = v.get("method").is_some();
                match v.get("id").cloned() {
                    Some(id) if has_method => {
                        // The server asks its client something: Bulkhead does not relay it.
                        let e = json!({"code": METHOD_NOT_FOUND, "message": "Bulkhead does not relay requests to agents"});
                        if write_line(&mut run.stdin, &json!({"jsonrpc": "2.0", "id": id, "error": e})).await.is_err() {
                            break std::ops::ControlFlow::Continue(());
                        }
                    }
                    Some(id) => {
                        if let Some((agent_id, tx)) = id.as_u64().and_then(|n| pending.remove(&n)) {
                            v["id"] = agent_id;
                            let _ = tx.send(Ok(Some(v)));
                        }
                    }
                    None => {}
                }
            }
        }
    };
    for (_, (_, tx)) in pending.drain() {
        let _ = tx.send(Err(StdioError::Lost("the local server exited during the call".into())));
    }
    let _ = run.child.start_kill();
    let _ = run.child.wait().await;
    flow
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_read_within_their_limit() {
        let data: &[u8] = b"{\"a\":1}\n0123456789abcdef\n{}\nrest";
        let mut r = BufReader::with_capacity(4, data);
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut r, &mut buf, 10).await.expect("io"), Some(true));
        assert_eq!(buf, b"{\"a\":1}\n");
        buf.clear();
        assert_eq!(read_line(&mut r, &mut buf, 10).await.expect("io"), Some(false));
        buf.clear();
        assert_eq!(read_line(&mut r, &mut buf, 10).await.expect("io"), Some(true));
        assert_eq!(buf, b"{}\n");
        buf.clear();
        assert_eq!(read_line(&mut r, &mut buf, 10).await.expect("io"), None);
    }
}
