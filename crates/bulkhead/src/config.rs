//! The `--config` TOML file.

use std::path::Path;

use anyhow::Context;
use bulkhead_core::Span;
use bulkhead_store::Breaker;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub breaker: Option<BreakerConfig>,
    #[serde(default)]
    pub alerts: Option<toml::Value>,
    #[serde(default)]
    pub upstream: Vec<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    pub denials: Option<i64>,
    pub window: Option<String>,
}

impl Config {
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))
    }

    pub fn breaker(&self) -> anyhow::Result<Breaker> {
        let mut b = Breaker::default();
        if let Some(c) = &self.breaker {
            if let Some(d) = c.denials {
                anyhow::ensure!((0..=10_000).contains(&d), "[breaker] denials must be between 0 (off) and 10000");
                b.denials = d;
            }
            if let Some(w) = &c.window {
                b.window_ms = Span::parse(w).map_err(|e| anyhow::anyhow!("[breaker] window: {e}"))?.millis();
            }
        }
        Ok(b)
    }
}
