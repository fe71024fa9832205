//! `/metrics` is open only when the server listens on loopback; otherwise it takes the admin token.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use bulkhead_server::{AppState, app, install_metrics};
use bulkhead_store::{Ledger, Store};
use tower::ServiceExt;

async fn router(metrics_open: bool, dir: &std::path::Path) -> axum::Router {
    let store = Store::open(&bulkhead_testkit::sqlite_url(dir)).await.unwrap();
    let (ledger, _) = Ledger::start(store, bulkhead_testkit::manual_clock(), Default::default());
    app(AppState { ledger, admin_token: Arc::from("admin-t"), metrics: install_metrics(), metrics_open })
}

async fn get(r: &axum::Router, auth: Option<&str>) -> StatusCode {
    let mut req = Request::get("/metrics");
    if let Some(a) = auth {
        req = req.header("authorization", format!("Bearer {a}"));
    }
    r.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap().status()
}

#[tokio::test]
async fn metrics_need_the_admin_token_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let closed = router(false, dir.path()).await;
    assert_eq!(get(&closed, None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(get(&closed, Some("wrong")).await, StatusCode::UNAUTHORIZED);
    assert_eq!(get(&closed, Some("admin-t")).await, StatusCode::OK);
    let dir2 = tempfile::tempdir().unwrap();
    let open = router(true, dir2.path()).await;
    assert_eq!(get(&open, None).await, StatusCode::OK);
}
