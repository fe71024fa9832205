//! Credentials as requests carry them: the bearer token, and an agent's key read from it (its
//! form and checksum only; whether the key is good is the ledger's to say). Used by the JSON API
//! and by both gateways.

use axum::http::{HeaderMap, header};
use bulkhead_core::{ApiKey, KeyHash};

use crate::error::ApiError;

/// The bearer token of a request, if the header is well-formed.
pub(crate) fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let bad = || ApiError::new(401, "invalid_credentials", "Send `Authorization: Bearer <key>`.");
    let v = headers.get(header::AUTHORIZATION).ok_or_else(bad)?;
    let v = v.to_str().map_err(|_| bad())?;
    // The scheme is case-insensitive (RFC 7235): `Bearer`, `bearer` and `BEARER` are one.
    let (scheme, token) = v.trim_start().split_once(' ').ok_or_else(bad)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(bad());
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(bad());
    }
    Ok(token)
}

/// The hash of the agent key a request carries, refused (401) when there is none or it is not
/// a well-formed key with a good checksum.
pub(crate) fn agent_key(headers: &HeaderMap) -> Result<KeyHash, ApiError> {
    let token = bearer(headers)?;
    ApiKey::parse(token).map(|k| k.hash()).ok_or_else(|| ApiError::deny(bulkhead_core::DenyReason::InvalidCredentials))
}
