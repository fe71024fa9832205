//! The `--config` TOML file.

use std::path::Path;

use anyhow::Context;
use bulkhead_core::Span;
use bulkhead_store::{AlertRules, Breaker};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    #[serde(default)]
    pub breaker: Option<BreakerConfig>,
    #[serde(default)]
    pub alerts: Option<AlertsConfig>,
    /// `[[upstream]]`: the agent gateway's upstreams (contract §8).
    #[serde(default)]
    pub upstream: Vec<bulkhead_server::gateway::UpstreamSpec>,
    /// `[[mcp_server]]`: the MCP gateway's servers (contract §11).
    #[serde(default)]
    pub mcp_server: Vec<bulkhead_server::mcp::McpServerSpec>,
    #[serde(default)]
    pub limits: Option<LimitsConfig>,
}

/// `[limits]`: how far agents may grow (defaults in `bulkhead_store::Limits`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsConfig {
    pub agents_per_tree: Option<i64>,
    pub open_holds_per_agent: Option<i64>,
    pub revoked_holds_chunk: Option<i64>,
}

/// `[alerts]`: where alerts go and when utilization alerts fire.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AlertsConfig {
    #[serde(default)]
    pub webhooks: Vec<String>,
    pub thresholds: Option<Vec<f64>>,
    /// Environment variable holding the HMAC secret that signs every delivery.
    pub secret_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BreakerConfig {
    pub denials: Option<i64>,
    pub window: Option<String>,
    /// More than this many spend/hold requests within `rate_window` suspend (0: off, the default).
    pub max_requests: Option<i64>,
    pub rate_window: Option<String>,
    /// The same request this many times in a row within `repeat_window` suspends (0: off, the default).
    pub repeats: Option<i64>,
    pub repeat_window: Option<String>,
}

impl Config {
    pub(crate) fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))
    }

    /// The checked alert rules and the signing secret (read from its environment variable).
    pub(crate) fn alerts(&self) -> anyhow::Result<(AlertRules, Option<String>)> {
        let Some(a) = &self.alerts else { return Ok((AlertRules::default(), None)) };
        for w in &a.webhooks {
            anyhow::ensure!(
                w.starts_with("http://") || w.starts_with("https://"),
                "[alerts] webhooks: {w:?} is not an http(s) URL"
            );
        }
        let thresholds = a.thresholds.clone().unwrap_or_else(|| vec![0.8]);
        for t in &thresholds {
            anyhow::ensure!(*t > 0.0 && *t <= 1.0, "[alerts] thresholds must be fractions in (0, 1], got {t}");
        }
        let secret =
            match &a.secret_env {
                None => None,
                Some(var) => Some(std::env::var(var).ok().filter(|s| !s.is_empty()).ok_or_else(|| {
                    anyhow::anyhow!("[alerts] secret_env: the environment variable {var} is not set")
                })?),
            };
        Ok((AlertRules { webhooks: a.webhooks.clone(), thresholds }, secret))
    }

    /// The checked upstreams, each secret read from its environment variable. A missing
    /// variable is an error naming it (never the secret).
    pub(crate) fn upstreams(&self) -> anyhow::Result<Vec<bulkhead_server::gateway::Upstream>> {
        bulkhead_server::gateway::check_upstreams(&self.upstream, &|var| std::env::var(var).ok())
            .map_err(|e| anyhow::anyhow!("[[upstream]] {e}"))
    }

    /// The checked MCP servers, each secret read from its environment variable.
    pub(crate) fn mcp_servers(&self) -> anyhow::Result<Vec<bulkhead_server::mcp::McpServer>> {
        bulkhead_server::mcp::check_mcp_servers(&self.mcp_server, &|var| std::env::var(var).ok())
            .map_err(|e| anyhow::anyhow!("[[mcp_server]] {e}"))
    }

    /// `[limits]` over the defaults; each at least 1.
    pub(crate) fn limits(&self) -> anyhow::Result<bulkhead_store::Limits> {
        let mut l = bulkhead_store::Limits::default();
        if let Some(c) = &self.limits {
            for (field, value, slot) in [
                ("agents_per_tree", c.agents_per_tree, &mut l.agents_per_tree),
                ("open_holds_per_agent", c.open_holds_per_agent, &mut l.open_holds_per_agent),
                ("revoked_holds_chunk", c.revoked_holds_chunk, &mut l.revoked_holds_chunk),
            ] {
                if let Some(v) = value {
                    anyhow::ensure!(
                        (1..=1_000_000_000).contains(&v),
                        "[limits] {field} must be between 1 and 1000000000"
                    );
                    *slot = v;
                }
            }
        }
        Ok(l)
    }

    pub(crate) fn breaker(&self) -> anyhow::Result<Breaker> {
        let mut b = Breaker::default();
        if let Some(c) = &self.breaker {
            if let Some(d) = c.denials {
                anyhow::ensure!((0..=10_000).contains(&d), "[breaker] denials must be between 0 (off) and 10000");
                b.denials = d;
            }
            let ms = |w: &Option<String>, field: &str| -> anyhow::Result<Option<i64>> {
                w.as_deref()
                    .map(|w| Span::parse(w).map(|s| s.millis()).map_err(|e| anyhow::anyhow!("[breaker] {field}: {e}")))
                    .transpose()
            };
            b.window_ms = ms(&c.window, "window")?.unwrap_or(b.window_ms);
            bulkhead_core::runaway::check_counts(c.max_requests, c.repeats)
                .map_err(|e| anyhow::anyhow!("[breaker] {e}"))?;
            b.max_requests = c.max_requests.unwrap_or(b.max_requests);
            b.rate_window_ms = ms(&c.rate_window, "rate_window")?.unwrap_or(b.rate_window_ms);
            b.repeats = c.repeats.unwrap_or(b.repeats);
            b.repeat_window_ms = ms(&c.repeat_window, "repeat_window")?.unwrap_or(b.repeat_window_ms);
        }
        Ok(b)
    }
}
