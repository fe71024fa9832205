//! Health and metrics: `GET /healthz`, and `GET /metrics` with the checks that let a loopback
//! client read it without credentials.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};

use super::{AppState, admin};
use crate::bodies::Health;
use crate::error::ApiError;
use crate::openapi::{InternalError, StoreUnavailable, Unauthorized};

/// Health.
///
/// 200 once the store is open and migrated and answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "monitoring",
    responses(
        (status = 200, description = "The store answers.", body = Health),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(super) async fn healthz(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    state.store().ping().await?;
    Ok(Json(Health { status: "ok" }))
}

/// Prometheus metrics.
///
/// The text exposition format: decisions, spend, cap utilization per agent, revocation times.
/// Without the admin token only to a loopback peer that addressed a loopback host, on a server
/// listening on loopback.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "monitoring",
    security((), ("admin_token" = [])),
    responses(
        (status = 200, description = "Prometheus text exposition.", body = String, content_type = "text/plain; version=0.0.4"),
        (status = 401, response = Unauthorized),
        (status = 500, response = InternalError),
        (status = 503, response = StoreUnavailable),
    )
)]
pub(super) async fn metrics(
    State(state): State<AppState>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !(state.metrics_open && loopback_request(peer.map(|p| p.0.0), &headers)) {
        admin(&state, &headers)?;
    }
    // Utilization is read from the store at scrape time, so it is right for every agent
    // (ancestors included) whichever replica made the decisions.
    for (agent, u) in state.store().utilizations(state.ledger.now_ms()).await? {
        metrics::gauge!(crate::metrics::UTILIZATION, "agent" => agent).set(u);
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response())
}

/// Whether a request without credentials may read `/metrics` on a loopback listener: its peer is
/// on loopback, and it addressed a loopback host (`Host` names `localhost` or a loopback IP), so a
/// web page whose DNS name was rebound to 127.0.0.1 cannot read it through a local browser. A
/// request that came in without a connection (in-process, as embedding tests do) has no peer; it
/// passes if any `Host` it names is a loopback one.
fn loopback_request(peer: Option<std::net::SocketAddr>, headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let host_ok = match host {
        Some(h) => is_loopback_host(h),
        None => peer.is_none(),
    };
    host_ok && peer.is_none_or(|p| p.ip().is_loopback() || p.ip().to_canonical().is_loopback())
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or("", |(ip, _)| ip),
        None => host
            .rsplit_once(':')
            .map_or(host, |(name, port)| if port.bytes().all(|b| b.is_ascii_digit()) { name } else { host }),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback() || ip.to_canonical().is_loopback())
}

#[cfg(test)]
mod tests {
    use super::is_loopback_host;

    #[test]
    fn loopback_hosts() {
        for h in ["localhost", "LOCALHOST:8080", "127.0.0.1", "127.0.0.1:8080", "127.9.9.9:1", "[::1]", "[::1]:8080"] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.1:8080",
            "[::2]:80",
            "",
            "127.0.0.1.nip.io",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }
}
