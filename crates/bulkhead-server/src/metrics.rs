//! Prometheus metrics: the recorder, its buckets, and the names used across the server.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub(crate) const DECISIONS: &str = "bulkhead_decisions_total";
pub(crate) const SPENT: &str = "bulkhead_spent_micros_total";
pub(crate) const UTILIZATION: &str = "bulkhead_cap_utilization";
pub(crate) const REVOCATION: &str = "bulkhead_revocation_seconds";
pub(crate) const REQUEST_DURATION: &str = "bulkhead_request_duration_seconds";
/// Gateway calls per upstream and result (`forwarded`, `denied`, `timeout`, `upstream_error`,
/// `too_large`).
pub(crate) const GATEWAY_CALLS: &str = "bulkhead_gateway_calls_total";
/// Gateway calls whose metered cost was above the hold (only the hold was captured).
pub(crate) const GATEWAY_COST_CAPPED: &str = "bulkhead_gateway_cost_capped_total";
/// Gateway leases granted, and the call slots they carried (slots / leases: calls per commit).
pub(crate) const GATEWAY_LEASES: &str = "bulkhead_gateway_leases_total";
pub(crate) const GATEWAY_LEASE_SLOTS: &str = "bulkhead_gateway_lease_slots_total";
/// Background settlements of gateway calls by result (`settled`, `refused`, `retried`,
/// `abandoned`: given up at shutdown, the lease is captured when it expires).
pub(crate) const GATEWAY_SETTLEMENTS: &str = "bulkhead_gateway_settlements_total";

/// MCP `tools/call`s per server, tool, agent and outcome (`allowed`, `denied`, `refused`: a tool
/// name no scope can name, `upstream_error`, `unavailable`). Tool names come from a bounded set
/// (the priced tools, and at most 256 more seen in `tools/list` answers; others are `_other`).
pub(crate) const MCP_CALLS: &str = "bulkhead_mcp_calls_total";

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

/// Drains what histograms recorded into their buckets every few seconds, so that an unscraped
/// `/metrics` does not keep every sample in memory.
pub fn spawn_metrics_upkeep(handle: PrometheusHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            handle.run_upkeep();
        }
    })
}

/// Recent revocation latencies in seconds, for the blast radius's measured p99.
static REVOCATIONS: std::sync::Mutex<std::collections::VecDeque<f64>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());
const REVOCATION_SAMPLES_MAX: usize = 1024;

/// Records one revocation's latency (the histogram and the p99 window).
pub(crate) fn record_revocation(secs: f64) {
    metrics::histogram!(REVOCATION).record(secs);
    if let Ok(mut v) = REVOCATIONS.lock() {
        if v.len() == REVOCATION_SAMPLES_MAX {
            v.pop_front();
        }
        v.push_back(secs);
    }
}

/// The p99 of recent revocations in milliseconds, if any were measured by this process.
pub(crate) fn revocation_p99_ms() -> Option<f64> {
    let v = REVOCATIONS.lock().ok()?;
    if v.is_empty() {
        return None;
    }
    let mut s: Vec<f64> = v.iter().copied().collect();
    s.sort_by(f64::total_cmp);
    let idx = ((s.len() as f64) * 0.99).ceil() as usize;
    Some(s[idx.clamp(1, s.len()) - 1] * 1000.0)
}

/// Middleware: counts requests and times them per route and status class.
pub(crate) async fn track_requests(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = method_label(req.method());
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let status = STATUS_CLASSES[status_class(resp.status())];
    metrics::histogram!(REQUEST_DURATION, "route" => route, "method" => method, "status" => status)
        .record(started.elapsed().as_secs_f64());
    resp
}

/// `bulkhead_request_duration_seconds` of one route, its series made once: recording a request
/// costs no lookup (for the gateway, which times every proxied call).
pub(crate) struct RouteTimers {
    route: &'static str,
    /// Per method of [`TIMED_METHODS`], per status class of [`STATUS_CLASSES`].
    cells: Vec<[metrics::Histogram; 4]>,
}

const TIMED_METHODS: [axum::http::Method; 7] = [
    axum::http::Method::GET,
    axum::http::Method::POST,
    axum::http::Method::PUT,
    axum::http::Method::PATCH,
    axum::http::Method::DELETE,
    axum::http::Method::HEAD,
    axum::http::Method::OPTIONS,
];
const STATUS_CLASSES: [&str; 4] = ["2xx", "4xx", "5xx", "other"];

/// A method as a metric label: the standard methods by name, anything else `other`, so that a
/// client cannot create series by inventing methods (labels come only from bounded sets).
pub(crate) fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

fn status_class(status: axum::http::StatusCode) -> usize {
    match status.as_u16() {
        200..=299 => 0,
        400..=499 => 1,
        500..=599 => 2,
        _ => 3,
    }
}

impl RouteTimers {
    pub(crate) fn new(route: &'static str) -> RouteTimers {
        let cells = TIMED_METHODS
            .iter()
            .map(|m| {
                STATUS_CLASSES.map(|s| {
                    metrics::histogram!(REQUEST_DURATION, "route" => route, "method" => m.as_str().to_owned(), "status" => s)
                })
            })
            .collect();
        RouteTimers { route, cells }
    }

    pub(crate) fn record(
        &self,
        method: &axum::http::Method,
        status: axum::http::StatusCode,
        took: std::time::Duration,
    ) {
        let class = status_class(status);
        match TIMED_METHODS.iter().position(|m| m == method) {
            Some(i) => self.cells[i][class].record(took.as_secs_f64()),
            None => metrics::histogram!(REQUEST_DURATION, "route" => self.route, "method" => method_label(method), "status" => STATUS_CLASSES[class])
                .record(took.as_secs_f64()),
        }
    }
}
