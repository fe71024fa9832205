//! Hardening finding 4: a body trickled at one byte a second kept its connection and memory for
//! as long as the client liked. API bodies must arrive within `BODY_READ_TIMEOUT` (30 s), else
//! 408 `request_timeout`, and nothing is charged. Time is paused, so the deadline passes at once.

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use bulkhead_server::{AppState, app, install_metrics};
use bulkhead_store::{Ledger, Store};
use http_body_util::BodyExt;
use tower::ServiceExt;

/// A request body that sends its first chunk and then nothing more, ever.
struct Trickle(Option<&'static str>);

impl http_body::Body for Trickle {
    type Data = axum::body::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match self.0.take() {
            Some(first) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(first.into())))),
            None => std::task::Poll::Pending,
        }
    }
}

#[tokio::test]
async fn a_trickled_api_body_is_refused_at_its_read_deadline() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&bulkhead_testkit::sqlite_url(dir.path())).await.expect("store");
    let (ledger, _) = Ledger::start(store, bulkhead_testkit::manual_clock(), Default::default());
    let admin = "adm_test_0123456789_abcdefghijklmnopqrstuvwxyz";
    let router =
        app(AppState { ledger, admin_token: Arc::from(admin), metrics: install_metrics(), metrics_open: true });
    tokio::time::pause();
    let started = tokio::time::Instant::now();
    let body = Body::new(Trickle(Some("{\"handle\": \"slow")));
    let req = Request::post("/v1/agents")
        .header("authorization", format!("Bearer {admin}"))
        .header("content-type", "application/json")
        .body(body)
        .expect("request");
    let resp = router.clone().oneshot(req).await.expect("answer");
    assert_eq!(resp.status().as_u16(), 408);
    assert!(started.elapsed() >= bulkhead_server::BODY_READ_TIMEOUT, "not before the deadline");
    let text = String::from_utf8(resp.into_body().collect().await.expect("body").to_bytes().to_vec()).expect("utf-8");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
    tokio::time::resume();
    // Nothing was created.
    let list =
        Request::get("/v1/agents").header("authorization", format!("Bearer {admin}")).body(Body::empty()).expect("req");
    let resp = router.oneshot(list).await.expect("answer");
    let text = String::from_utf8(resp.into_body().collect().await.expect("body").to_bytes().to_vec()).expect("utf-8");
    assert_eq!(text, "{\"agents\":[]}", "no agent was created");
}
