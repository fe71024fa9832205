//! Prometheus metrics: the recorder, its buckets, and the names used across the server.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const DECISIONS: &str = "bulkhead_decisions_total";
pub const SPENT: &str = "bulkhead_spent_micros_total";
pub const REVOCATION: &str = "bulkhead_revocation_seconds";
pub const REQUEST_DURATION: &str = "bulkhead_request_duration_seconds";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns its handle.
pub fn install_metrics() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(REVOCATION.into()), &buckets)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), &buckets))
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests embedding several servers);
            // then this handle still renders what is recorded through it.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
