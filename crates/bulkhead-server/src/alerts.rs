//! Alert delivery: takes due rows from the store's outbox and POSTs them to their webhooks.
//!
//! At least once: a row is marked delivered only after a 2xx; failures are retried with
//! exponential backoff (0.5 s, 1 s, 2 s … at most 30 s apart). Each body is signed like Stripe's
//! webhooks: `Bulkhead-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
//! Replicas lease a row before sending it, so normally only one of them delivers it.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_core::Clock;
use bulkhead_store::{OutboxRow, Store};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;

type WebhookClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTP(S) client for webhooks: rustls on the ring provider, the system's root certificates.
fn webhook_client() -> Result<WebhookClient, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
        .or_else(|_| {
            // No system roots (a minimal container): plain-HTTP webhooks still work.
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map(|b| {
                    hyper_rustls::HttpsConnectorBuilder::new()
                        .with_tls_config(b.with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth())
                })
        })
        .map_err(|e| format!("TLS setup: {e}"))?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// How long a replica keeps a delivery to itself: longer than one attempt may take, short enough
/// that a delivery leased by a replica that died is retried soon after.
const LEASE_MS: i64 = 8_000;
/// The longest a webhook may take to answer.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the outbox is polled.
const POLL: Duration = Duration::from_millis(200);
/// Deliveries in flight at once.
const CONCURRENCY: usize = 8;

/// The webhook signing secret. Never printed.
#[derive(Clone)]
pub struct SigningSecret(Arc<str>);

impl SigningSecret {
    pub fn new(s: String) -> SigningSecret {
        SigningSecret(Arc::from(s))
    }
}

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecret(..)")
    }
}

/// `t=<secs>,v1=<hex>` for `body` at `secs`.
pub fn signature(secret: &SigningSecret, secs: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.0.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("{secs}.{body}").as_bytes());
    format!("t={secs},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Starts the delivery loop; it runs until the task is aborted.
pub fn spawn_alert_delivery(
    store: Store,
    clock: Arc<dyn Clock>,
    secret: Option<SigningSecret>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = match webhook_client() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the webhook client; alerts stay in the outbox");
                return;
            }
        };
        let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
        loop {
            tokio::time::sleep(POLL).await;
            let now = clock.now_ms();
            let due = match store.due_alerts(now, 100).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the alert outbox");
                    continue;
                }
            };
            for row in due {
                match store.claim_alert(&row.id, &row.webhook, now, LEASE_MS).await {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot claim an alert");
                        continue;
                    }
                }
                let Ok(permit) = slots.clone().acquire_owned().await else { return };
                let (store, clock, http, secret) = (store.clone(), clock.clone(), http.clone(), secret.clone());
                tokio::spawn(async move {
                    let result = deliver(&http, &row, secret.as_ref(), clock.now_ms()).await;
                    if let Err(e) = &result {
                        tracing::info!(alert = %row.id, attempt = row.attempts + 1, error = %e, "alert delivery failed; will retry");
                    }
                    if let Err(e) = store.finish_alert(&row.id, &row.webhook, clock.now_ms(), result).await {
                        tracing::warn!(error = %e, "cannot record an alert delivery");
                    }
                    drop(permit);
                });
            }
        }
    })
}

async fn deliver(
    http: &WebhookClient,
    row: &OutboxRow,
    secret: Option<&SigningSecret>,
    now_ms: i64,
) -> Result<(), String> {
    let mut req = hyper::Request::post(&row.webhook)
        .header("content-type", "application/json")
        .header("user-agent", concat!("bulkhead/", env!("CARGO_PKG_VERSION")))
        .header("bulkhead-alert-id", &row.id);
    if let Some(secret) = secret {
        req = req.header("bulkhead-signature", signature(secret, now_ms / 1000, &row.body));
    }
    let req = req.body(Full::new(Bytes::from(row.body.clone()))).map_err(|e| format!("bad webhook URL: {e}"))?;
    let resp = tokio::time::timeout(DELIVERY_TIMEOUT, http.request(req))
        .await
        .map_err(|_| "the webhook did not answer in time".to_owned())?
        .map_err(|e| format!("request failed: {e}"))?;
    if resp.status().is_success() { Ok(()) } else { Err(format!("webhook answered {}", resp.status().as_u16())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_vector() {
        // HMAC-SHA256("whsec", "1700000000.{}"), computed independently with Python's hmac module.
        let s = signature(&SigningSecret::new("whsec".into()), 1_700_000_000, "{}");
        assert_eq!(s, "t=1700000000,v1=7d44587dddbaf4c7f70fef20f48cd594834ffea1641e3ac227b84408298738af");
        assert_eq!(format!("{:?}", SigningSecret::new("x".into())), "SigningSecret(..)");
    }
}
