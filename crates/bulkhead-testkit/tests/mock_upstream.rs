//! The mock upstream starts as a process of its own, through the launcher the other crates'
//! tests use, and answers like an OpenAI-compatible server.
//!
//! Being an integration test of this crate, it also makes `cargo test` build `mock-upstream`
//! with the other binaries, so the tests of other crates find it ready.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request over a fresh connection; the whole answer as text.
async fn http(base: &str, request: &str) -> String {
    let addr = base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect to the mock");
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test]
async fn mock_upstream_runs_as_a_process_of_its_own() {
    let found = bulkhead_testkit::mock_upstream_bin();
    assert!(found.is_file(), "{} is not a file", found.display());
    let (mut child, base) = bulkhead_testkit::start_mock_upstream().await;
    assert!(child.id().is_some_and(|pid| pid != std::process::id()), "a process of its own");

    let body = r#"{"model":"m","messages":[]}"#;
    let answer = http(
        &base,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
             x-mock-usage: 7,3\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""prompt_tokens":7"#) && answer.contains(r#""completion_tokens":3"#), "{answer}");

    let stats = http(&base, "GET /__stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(stats.contains(r#""calls":1"#), "{stats}");
    child.kill().await.expect("kill the mock");
}
