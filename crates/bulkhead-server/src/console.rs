//! The operator's web console (contract §10): static files embedded in the binary and served
//! under `/console`, with a strict Content-Security-Policy.
//!
//! The console is plain HTML, CSS and ES modules (no build step): the browser talks to the same
//! public JSON API as every other client, with the admin token the operator types in, kept in
//! `sessionStorage`. This module only serves files; it never sees the token and holds no state.
//! Nothing here loads from another host, and the policy forbids it.

use std::sync::OnceLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Every page and script may load only from this server; no inline script or style, no
/// framing, no form posts, no `<base>`.
pub(crate) const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

macro_rules! asset {
    ($path:literal, $type:literal) => {
        ($path, $type, include_bytes!(concat!("../console/", $path)) as &[u8])
    };
}

/// The embedded files: path under `/console/`, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("console.css", "text/css; charset=utf-8"),
    asset!("js/app.js", "text/javascript; charset=utf-8"),
    asset!("js/api.js", "text/javascript; charset=utf-8"),
    asset!("js/ui.js", "text/javascript; charset=utf-8"),
    asset!("js/fleet.js", "text/javascript; charset=utf-8"),
    asset!("js/agent.js", "text/javascript; charset=utf-8"),
    asset!("js/chart.js", "text/javascript; charset=utf-8"),
    asset!("js/blast.js", "text/javascript; charset=utf-8"),
    asset!("js/alerts.js", "text/javascript; charset=utf-8"),
    asset!("js/actions.js", "text/javascript; charset=utf-8"),
    asset!("js/live.js", "text/javascript; charset=utf-8"),
];

/// Strong validators, one per asset, computed once.
fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS.iter().map(|(_, _, body)| format!("\"{}\"", &hex::encode(Sha256::digest(body))[..32])).collect()
    })
}

/// `/console`, `/console/` and `/console/{file}`.
pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/console", get(index)).route("/console/", get(index)).route("/console/{*file}", get(file))
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn file(Path(file): Path<String>, headers: HeaderMap) -> Response {
    serve(&file, &headers)
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    let Some(i) = ASSETS.iter().position(|(p, _, _)| *p == path) else {
        return ApiError::not_found("No such file in the console.").into_response();
    };
    let (_, content_type, body) = ASSETS[i];
    let etag = &etags()[i];
    let fresh = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.split(',').any(|t| {
            let t = t.trim();
            t == etag || t == "*"
        })
    });
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, HeaderValue::from_static(content_type))], body).into_response()
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    // Revalidated on every load (a 304 when unchanged), so a new binary's console is never
    // mixed with an old one's cached modules.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_listed_once_and_no_page_loads_from_elsewhere() {
        let mut paths: Vec<&str> = ASSETS.iter().map(|(p, _, _)| *p).collect();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), ASSETS.len());
        for (path, _, body) in ASSETS {
            // The SVG namespace is a name, not a request.
            let text = std::str::from_utf8(body).expect("assets are UTF-8").replace("http://www.w3.org/2000/svg", "");
            for bad in ["http://", "https://", "//cdn", "<script>", "style=\"", "onclick=", "eval("] {
                assert!(!text.contains(bad), "{path} contains {bad:?}");
            }
        }
    }
}
