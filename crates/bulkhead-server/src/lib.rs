//! Bulkhead's HTTP server: the admin API, the agent API, the agent gateway, health and metrics.
//!
//! This crate turns HTTP into checked commands (parse, don't validate) and committed replies
//! back into HTTP. It never decides a spend and never writes a balance: the core decides and the
//! store's ledger commits.

pub mod alerts;
mod api;
mod auth;
mod bodies;
mod console;
mod error;
pub mod gateway;
mod history;
pub mod http;
mod input;
pub mod mcp;
mod metrics;
mod openapi;
pub mod reply;
mod upstream_http;

pub use api::{AppState, app};
pub use error::ApiError;
pub use gateway::Gateway;
pub use input::BODY_READ_TIMEOUT;
pub use mcp::{McpCatalog, McpGateway};
pub use metrics::{install_metrics, spawn_metrics_upkeep};
