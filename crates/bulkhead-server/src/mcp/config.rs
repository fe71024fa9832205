//! `[[mcp_server]]` entries of the config file (contract §11): the raw TOML form and its checked
//! form. Checked once at start: a bad entry or a missing secret stops the server with a message
//! naming the server and the field, never the secret.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use axum::http::Uri;
use bulkhead_core::{Micros, Span};
use serde::Deserialize;

use super::jsonrpc::tool_scope;
use crate::gateway::config::{AuthHeader, auth_header, valid_name};

/// The default largest request body an agent may send to an MCP server.
pub const REQUEST_BYTES_DEFAULT: u64 = 1024 * 1024;
/// The default largest answer the gateway reads whole (a `tools/list` it filters, a local
/// server's message).
pub const RESPONSE_BYTES_DEFAULT: u64 = 10 * 1024 * 1024;
const CONNECT_TIMEOUT_DEFAULT: &str = "10s";
/// The default longest wait for an answer's headers, and between two chunks of its body.
const READ_TIMEOUT_DEFAULT: &str = "120s";
/// The default longest `tools/call`, streaming included. Its hold outlives it by a minute.
const MAX_DURATION_DEFAULT: &str = "10m";
const HOLD_MARGIN_MS: i64 = 60_000;
/// The most tools one entry may price.
pub const TOOLS_PRICED_MAX: usize = 1024;

/// One `[[mcp_server]]` table as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpServerSpec {
    pub name: String,
    /// The server's Streamable HTTP endpoint; or else `command`.
    pub url: Option<String>,
    /// A local server spoken to over stdio: the program and its arguments.
    pub command: Option<Vec<String>>,
    pub secret_env: Option<String>,
    pub auth_header: Option<String>,
    pub auth_format: Option<String>,
    /// Charged per `tools/call` of a tool without a price of its own (default `"0.00"`).
    pub default_price: Option<String>,
    /// Tool name → price per call.
    #[serde(default)]
    pub tools: BTreeMap<String, String>,
    pub max_request_bytes: Option<u64>,
    pub max_response_bytes: Option<u64>,
    pub connect_timeout: Option<String>,
    pub read_timeout: Option<String>,
    pub max_duration: Option<String>,
    /// Whether a `tools/call` answered with an HTTP 5xx is charged (default: not).
    pub charge_failures: Option<bool>,
    /// `true` (the default): calls take slots of a lease per key and tool, as the proxy
    /// gateway's do (many calls per commit), each call still audited on its own when settled;
    /// `false`: each call is a durable hold of its own before it is forwarded.
    pub leases: Option<bool>,
}

/// Where the server is.
#[derive(Clone, Debug)]
pub enum Transport {
    /// Streamable HTTP at `url` (its path and query kept).
    Http { https: bool, authority: String, path_and_query: String, url: Uri },
    /// A local process spoken to over stdio.
    Stdio { argv: Vec<String> },
}

/// A checked `[[mcp_server]]`.
#[derive(Clone, Debug)]
pub struct McpServer {
    pub name: String,
    pub transport: Transport,
    pub auth: Option<AuthHeader>,
    pub default_price: Micros,
    pub prices: HashMap<String, Micros>,
    pub max_request_bytes: u64,
    pub max_response_bytes: u64,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub max_duration: Duration,
    pub charge_failures: bool,
    pub leases: bool,
}

impl McpServer {
    /// The price of one call of `tool`.
    pub fn price(&self, tool: &str) -> Micros {
        self.prices.get(tool).copied().unwrap_or(self.default_price)
    }

    /// How long the hold of one call stays open: the longest call plus a margin.
    pub fn hold_ms(&self) -> i64 {
        (self.max_duration.as_millis() as i64).saturating_add(HOLD_MARGIN_MS)
    }
}

fn duration(who: &str, field: &str, s: Option<&str>, default: &str) -> Result<Duration, String> {
    let s = s.unwrap_or(default);
    let span = Span::parse(s).map_err(|e| format!("{who}: {field}: {e}"))?;
    Ok(Duration::from_millis(span.millis() as u64))
}

impl McpServerSpec {
    /// Checks the entry and reads its secret through `env`.
    pub fn checked(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<McpServer, String> {
        let name = &self.name;
        if !valid_name(name) {
            return Err(format!(
                "mcp_server name {name:?} must be 1 to 64 of a-z 0-9 . _ -, starting with a letter or digit"
            ));
        }
        let who = format!("mcp_server {name:?}");
        let transport = self.transport(&who)?;
        let auth = auth_header(
            &who,
            self.secret_env.as_deref(),
            self.auth_header.as_deref(),
            self.auth_format.as_deref(),
            env,
        )?;
        let (default_price, prices) = self.prices(&who)?;
        let max_request_bytes = self.max_request_bytes.unwrap_or(REQUEST_BYTES_DEFAULT);
        let max_response_bytes = self.max_response_bytes.unwrap_or(RESPONSE_BYTES_DEFAULT);
        if max_request_bytes == 0 || max_response_bytes == 0 {
            return Err(format!("{who}: max_request_bytes and max_response_bytes must be above zero"));
        }
        let max_duration = duration(&who, "max_duration", self.max_duration.as_deref(), MAX_DURATION_DEFAULT)?;
        if max_duration > Duration::from_secs(23 * 3600) {
            return Err(format!("{who}: max_duration is at most 23h"));
        }
        Ok(McpServer {
            name: name.clone(),
            transport,
            auth,
            default_price,
            prices,
            max_request_bytes,
            max_response_bytes,
            connect_timeout: duration(
                &who,
                "connect_timeout",
                self.connect_timeout.as_deref(),
                CONNECT_TIMEOUT_DEFAULT,
            )?,
            read_timeout: duration(&who, "read_timeout", self.read_timeout.as_deref(), READ_TIMEOUT_DEFAULT)?,
            max_duration,
            charge_failures: self.charge_failures.unwrap_or(false),
            leases: self.leases.unwrap_or(true),
        })
    }

    /// Where the server is: a URL (http or https, a host, no user info or fragment), or a
    /// command to start (which reads its own environment: no secret settings).
    fn transport(&self, who: &str) -> Result<Transport, String> {
        Ok(match (&self.url, &self.command) {
            (Some(url), None) => {
                let uri: Uri = url.parse().map_err(|_| format!("{who}: url {url:?} is not a URL"))?;
                let https = match uri.scheme_str() {
                    Some("https") => true,
                    Some("http") => false,
                    _ => return Err(format!("{who}: url must start with http:// or https://")),
                };
                let authority = match uri.authority() {
                    Some(a) if !a.as_str().contains('@') && !a.host().is_empty() => a.as_str().to_owned(),
                    _ => return Err(format!("{who}: url needs a host (and no user info)")),
                };
                if url.contains('#') {
                    return Err(format!("{who}: url may not have a fragment"));
                }
                let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
                Transport::Http { https, authority, path_and_query, url: uri }
            }
            (None, Some(argv)) => {
                if argv.is_empty() || argv[0].is_empty() {
                    return Err(format!("{who}: command needs at least the program"));
                }
                if self.secret_env.is_some() || self.auth_header.is_some() || self.auth_format.is_some() {
                    return Err(format!(
                        "{who}: secret_env, auth_header and auth_format are for url servers; a command reads \
                         its own environment"
                    ));
                }
                Transport::Stdio { argv: argv.clone() }
            }
            _ => return Err(format!("{who}: needs exactly one of url and command")),
        })
    }

    /// The default price and each named tool's (every tool name a scope segment).
    fn prices(&self, who: &str) -> Result<(Micros, HashMap<String, Micros>), String> {
        let amount = |field: &str, s: &str| Micros::parse(s).map_err(|e| format!("{who}: {field} {s:?}: {e}"));
        let default_price = match &self.default_price {
            Some(s) => amount("default_price", s)?,
            None => Micros::ZERO,
        };
        if self.tools.len() > TOOLS_PRICED_MAX {
            return Err(format!("{who}: tools prices at most {TOOLS_PRICED_MAX} tools"));
        }
        let mut prices = HashMap::new();
        for (tool, price) in &self.tools {
            tool_scope(&self.name, tool).map_err(|_| {
                format!("{who}: tool {tool:?} is not a scope segment (a-z 0-9 _ - .), so no key could be granted it")
            })?;
            prices.insert(tool.clone(), amount(&format!("tools.{tool}"), price)?);
        }
        Ok((default_price, prices))
    }
}

/// Checks every entry (names must be unique).
pub fn check_mcp_servers(
    specs: &[McpServerSpec],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<McpServer>, String> {
    let mut out: Vec<McpServer> = Vec::with_capacity(specs.len());
    for s in specs {
        let m = s.checked(env)?;
        if out.iter().any(|o| o.name == m.name) {
            return Err(format!("two mcp_server entries are named {:?}", m.name));
        }
        out.push(m);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> McpServerSpec {
        toml::from_str(text).expect("parses")
    }

    fn env(k: &str) -> Option<String> {
        (k == "TOOLS_MCP_TOKEN").then(|| "tok-secret-123".to_owned())
    }

    #[test]
    fn the_contract_example_checks() {
        let s = spec(
            r#"name = "tools"
url = "https://mcp.example.com/mcp"
secret_env = "TOOLS_MCP_TOKEN"
auth_header = "Authorization"
auth_format = "Bearer {secret}"
default_price = "0.00"
tools = { search = "0.002", charge_card = "1.00" }"#,
        );
        let m = s.checked(&env).expect("valid");
        assert_eq!(m.price("search"), Micros::parse("0.002").expect("m"));
        assert_eq!(m.price("charge_card"), Micros::parse("1.00").expect("m"));
        assert_eq!(m.price("other"), Micros::ZERO);
        let Transport::Http { https, authority, path_and_query, .. } = &m.transport else { panic!("http") };
        assert!(*https);
        assert_eq!(authority, "mcp.example.com");
        assert_eq!(path_and_query, "/mcp");
        let auth = m.auth.expect("auth");
        assert_eq!(auth.value.to_str().expect("ascii"), "Bearer tok-secret-123");
        assert!(!format!("{:?}", m.transport).contains("tok-secret"));
    }

    #[test]
    fn stdio_entries_check() {
        let m = spec("name = \"local\"\ncommand = [\"python3\", \"server.py\"]\ndefault_price = \"0.01\"")
            .checked(&env)
            .expect("valid");
        assert!(matches!(&m.transport, Transport::Stdio { argv } if argv.len() == 2));
        assert_eq!(m.price("x"), Micros::parse("0.01").expect("m"));
    }

    #[test]
    fn bad_entries_are_refused() {
        for text in [
            "name = \"t\"",
            "name = \"t\"\nurl = \"http://x/mcp\"\ncommand = [\"a\"]",
            "name = \"t\"\ncommand = []",
            "name = \"t\"\ncommand = [\"a\"]\nsecret_env = \"TOOLS_MCP_TOKEN\"",
            "name = \"T\"\nurl = \"http://x/mcp\"",
            "name = \"t\"\nurl = \"ftp://x/mcp\"",
            "name = \"t\"\nurl = \"http://u:p@x/mcp\"",
            "name = \"t\"\nurl = \"http://x/mcp\"\ntools = { Search = \"0.01\" }",
            "name = \"t\"\nurl = \"http://x/mcp\"\ntools = { \"web search\" = \"0.01\" }",
            "name = \"t\"\nurl = \"http://x/mcp\"\ntools = { search = \"-1\" }",
            "name = \"t\"\nurl = \"http://x/mcp\"\ndefault_price = \"0.0000001\"",
            "name = \"t\"\nurl = \"http://x/mcp\"\nsecret_env = \"MISSING\"",
            "name = \"t\"\nurl = \"http://x/mcp\"\nauth_format = \"Bearer\"",
            "name = \"t\"\nurl = \"http://x/mcp\"\nmax_request_bytes = 0",
            "name = \"t\"\nurl = \"http://x/mcp\"\nmax_duration = \"2d\"",
        ] {
            assert!(spec(text).checked(&env).is_err(), "accepted: {text}");
        }
        assert!(toml::from_str::<McpServerSpec>("name = \"t\"\nurl = \"http://x\"\nbogus = 1").is_err());
        let a = spec("name = \"t\"\nurl = \"http://x/mcp\"");
        assert!(check_mcp_servers(&[a.clone(), a], &env).expect_err("dup").contains("two mcp_server"));
    }
}
