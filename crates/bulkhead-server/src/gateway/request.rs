//! A proxied call's request as it goes upstream: its body read and bounded (a token-priced JSON
//! call) or streamed within `max_request_bytes`, an OpenAI stream's usage asked for, and its URI
//! and headers.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, Version, header};
use bytes::{Bytes, BytesMut};
use serde_json::Value;

use super::Route;
use super::body::LimitBody;
use super::bound;
use super::config::{Dialect, Pricing};
use crate::error::ApiError;
use crate::upstream_http::{drop_hop_by_hop, read_limited};

/// The body a call sends upstream, and what reading it found.
pub(super) struct Outgoing {
    body: Body,
    /// Its length when it was read whole (and perhaps rewritten): the `Content-Length` sent.
    length: Option<usize>,
    /// The agent did not ask for the usage chunk the gateway asked for: the answer loses it.
    pub(super) strip: bool,
}

/// Reads and bounds the body. A token-priced JSON call is read whole, within `read_timeout`
/// (408) and `max_request_bytes` (413), to bound its worst case (see `bound`; 402 when its input
/// alone could cost more than the slot); any other body streams, cut off past
/// `max_request_bytes` (which sets `over`). Nothing is sent yet, so every refusal is free.
pub(super) async fn read_body(
    route: &Route,
    method: &Method,
    headers: &HeaderMap,
    rest: &str,
    body: Body,
    over: &Arc<AtomicBool>,
) -> Result<Outgoing, ApiError> {
    let up = &route.up;
    let (dialect, prices) = match &up.pricing {
        Pricing::Tokens { dialect, prices } if *method == Method::POST && is_json(headers) => (*dialect, prices),
        _ => {
            let body = Body::new(LimitBody::new(body, up.max_request_bytes, over.clone()));
            return Ok(Outgoing { body, length: None, strip: false });
        }
    };
    let bytes = match tokio::time::timeout(up.read_timeout, read_limited(body, up.max_request_bytes)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            if e.status == StatusCode::PAYLOAD_TOO_LARGE {
                route.calls.too_large.increment(1);
            }
            return Err(e);
        }
        Err(_) => {
            return Err(ApiError::new(
                408,
                "request_timeout",
                "The request body did not arrive within the upstream's read_timeout; nothing was sent.",
            ));
        }
    };
    let bytes = match bound::bound(bytes, rest, dialect, prices, up.max_cost) {
        Ok(b) => b,
        Err(bound::Unbounded::InputTooDear { bytes }) => {
            route.calls.denied.increment(1);
            return Err(ApiError::new(
                402,
                "max_cost_exceeded",
                format!(
                    "A {bytes}-byte request could use up to {bytes} input tokens, more than this \
                     upstream's max_cost_per_request of {} pays for; nothing was sent or charged.",
                    up.max_cost
                ),
            ));
        }
    };
    // Only the completions APIs take `stream_options`; the Responses API always reports a
    // stream's usage in its `response.completed` event and refuses fields it does not know.
    let (bytes, strip) = if matches!(dialect, Dialect::OpenAi) && rest.ends_with("completions") {
        ask_for_stream_usage(bytes)
    } else {
        (bytes, false)
    };
    Ok(Outgoing { length: Some(bytes.len()), body: Body::from(bytes), strip })
}

/// The request the upstream gets: its URI in origin form (the upstream's base path, then the
/// rest of the path and the query as sent; 400 when they make no URI), the agent's headers
/// without its credential (nor any header named like the upstream's), hop-by-hop headers or
/// `Expect`, with the upstream's `Host` and secret, and an uncompressed answer asked for when
/// its usage is to be read.
pub(super) fn upstream_request(
    route: &Route,
    method: Method,
    mut headers: HeaderMap,
    rest: &str,
    query: Option<&str>,
    out: Outgoing,
) -> Result<hyper::Request<Body>, ApiError> {
    let up = &route.up;
    let mut target = String::with_capacity(up.base_path.len() + rest.len() + query.map_or(0, |q| q.len() + 1) + 2);
    target.push_str(&up.base_path);
    if !rest.is_empty() || up.base_path.is_empty() {
        target.push('/');
    }
    target.push_str(rest);
    if let Some(q) = query {
        target.push('?');
        target.push_str(q);
    }
    let uri = Uri::try_from(target).map_err(|_| ApiError::invalid("The proxied path or query is not valid."))?;
    drop_hop_by_hop(&mut headers);
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::EXPECT);
    if let Some(auth) = &up.auth {
        headers.remove(&auth.name);
    }
    headers.insert(header::HOST, route.host.clone());
    if matches!(up.pricing, Pricing::Tokens { .. }) {
        // The answer is read for its usage: it must not come compressed.
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    }
    if let Some(n) = out.length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    if let Some(auth) = &up.auth {
        headers.insert(auth.name.clone(), auth.value.clone());
    }
    let mut ureq = hyper::Request::new(out.body);
    *ureq.method_mut() = method;
    *ureq.uri_mut() = uri;
    *ureq.version_mut() = Version::HTTP_11;
    *ureq.headers_mut() = headers;
    Ok(ureq)
}

fn is_json(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("application/json"))
}

/// An OpenAI request that streams without asking for usage gets
/// `stream_options.include_usage = true`; returns the body to send and whether the agent did
/// not ask for the usage chunk (so the gateway strips it). Other bodies are left as they are.
pub fn ask_for_stream_usage(body: Bytes) -> (Bytes, bool) {
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(&body) else {
        return (body, false);
    };
    if m.get("stream") != Some(&Value::Bool(true)) {
        return (body, false);
    }
    match m.get("stream_options") {
        None => {
            // Insert the field right after the opening brace: every other byte stays as sent.
            let Some(open) = body.iter().position(|&b| b == b'{') else {
                return (body, false);
            };
            let mut out = BytesMut::with_capacity(body.len() + 40);
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
            out.extend_from_slice(&body[open + 1..]);
            (out.freeze(), true)
        }
        Some(Value::Object(o)) if o.get("include_usage") == Some(&Value::Bool(true)) => (body, false),
        Some(Value::Object(_)) => {
            let mut m = m;
            if let Some(Value::Object(o)) = m.get_mut("stream_options") {
                o.insert("include_usage".into(), Value::Bool(true));
            }
            match serde_json::to_vec(&Value::Object(m)) {
                Ok(v) => (Bytes::from(v), true),
                Err(_) => (body, false),
            }
        }
        // Not an object: the upstream answers the agent's mistake itself.
        Some(_) => (body, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_for_stream_usage_only_when_missing() {
        let (b, strip) = ask_for_stream_usage(Bytes::from_static(br#" {"model":"m","stream":true,"n":1.50}"#));
        assert!(strip);
        assert_eq!(&b[..], br#" {"stream_options":{"include_usage":true},"model":"m","stream":true,"n":1.50}"#);
        let v: Value = serde_json::from_slice(&b).expect("still JSON");
        assert_eq!(v["stream_options"]["include_usage"], true);

        let (b, strip) =
            ask_for_stream_usage(Bytes::from_static(br#"{"stream":true,"stream_options":{"include_usage":false}}"#));
        assert!(strip);
        let v: Value = serde_json::from_slice(&b).expect("JSON");
        assert_eq!(v["stream_options"]["include_usage"], true);

        for same in [
            &br#"{"stream":true,"stream_options":{"include_usage":true}}"#[..],
            br#"{"stream":false}"#,
            br#"{"model":"m"}"#,
            br#"{"stream":"true"}"#,
            br#"{"stream":true,"stream_options":7}"#,
            b"not json",
            b"[1,2]",
        ] {
            let (b, strip) = ask_for_stream_usage(Bytes::copy_from_slice(same));
            assert!(!strip, "{}", String::from_utf8_lossy(same));
            assert_eq!(&b[..], same);
        }
    }
}
