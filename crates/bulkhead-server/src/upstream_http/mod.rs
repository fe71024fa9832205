//! HTTP to and from upstreams, shared by the agent gateway and the MCP gateway: the connector
//! (TLS with the system's roots), the `Host` an upstream is called with, hop-by-hop headers
//! dropped in both directions, a request body read whole within a limit (413 past it), and
//! [`pool`], a worker's idle connections to one upstream.

pub(crate) mod pool;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri, header};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::error::ApiError;
use crate::gateway::body::LimitBody;

/// The `Host` for calls to `target`: its host, with the port only when it is not the scheme's
/// default (as clients send it; some hosts and request signatures compare it exactly).
pub(crate) fn host_header(target: &Uri) -> Result<HeaderValue, String> {
    let auth = target.authority().ok_or("no host")?;
    let default = match target.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let host = match auth.port_u16() {
        Some(p) if p != default => format!("{}:{p}", auth.host()),
        _ => auth.host().to_owned(),
    };
    HeaderValue::from_str(&host).map_err(|e| e.to_string())
}

/// A connector for one upstream (`who` names it in errors): TLS by rustls with the system's
/// root certificates when `https`, plain HTTP otherwise.
pub(crate) fn connector_for(
    who: &str,
    https: bool,
    connect_timeout: std::time::Duration,
) -> Result<HttpsConnector<HttpConnector>, String> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    let provider = rustls::crypto::ring::default_provider();
    let tls = if https {
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider)
            .map_err(|e| format!("{who}: no usable root certificates on this system: {e}"))?
    } else {
        // Plain HTTP: TLS is never used, but the connector type is shared.
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
    };
    Ok(tls.https_or_http().enable_http1().wrap_connector(http))
}

/// Headers never forwarded in either direction (RFC 9110 §7.6.1), besides those the
/// `Connection` header names.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers and those listed in `Connection`.
pub(crate) fn drop_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for n in listed {
            h.remove(n);
        }
    }
    // Most messages carry none of them: look before removing.
    if h.keys().any(|k| HOP_BY_HOP.contains(k)) {
        for n in &HOP_BY_HOP {
            h.remove(n);
        }
    }
}

/// The 413 for a request body over an upstream's `max_request_bytes`.
pub(crate) fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        413,
        "body_too_large",
        format!("The request body is larger than this upstream's limit of {limit} bytes."),
    )
}

/// Reads a whole body of at most `limit` bytes.
pub(crate) async fn read_limited(body: Body, limit: u64) -> Result<Bytes, ApiError> {
    let over = Arc::new(AtomicBool::new(false));
    let mut b = LimitBody::new(body, limit, over.clone());
    let mut out = BytesMut::new();
    while let Some(frame) = b.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    out.extend_from_slice(&d);
                }
            }
            Err(_) if over.load(Ordering::SeqCst) => return Err(too_large(limit)),
            Err(e) => return Err(ApiError::invalid(format!("The request body could not be read: {e}"))),
        }
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_leaves_out_the_default_port() {
        for (target, host) in [
            ("https://api.example.com:443/", "api.example.com"),
            ("https://api.example.com/", "api.example.com"),
            ("https://api.example.com:8443/", "api.example.com:8443"),
            ("http://127.0.0.1:80/", "127.0.0.1"),
            ("http://127.0.0.1:8080/", "127.0.0.1:8080"),
            ("http://[::1]:9000/", "[::1]:9000"),
        ] {
            let uri: Uri = target.parse().expect("uri");
            assert_eq!(host_header(&uri).expect("host"), host, "{target}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        drop_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }
}
