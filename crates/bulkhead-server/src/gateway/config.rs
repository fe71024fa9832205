//! `[[upstream]]` entries of the config file: the raw TOML form and its checked form.
//!
//! Everything is checked once at start: a bad entry, or a secret missing from the environment,
//! stops the server with a message naming the upstream and the field, never the secret.

use std::fmt;
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Uri};
use bulkhead_core::{Micros, Scope, Span};
use serde::Deserialize;

/// The default largest request body forwarded to an upstream (contract §3).
pub const REQUEST_BYTES_DEFAULT: u64 = 10 * 1024 * 1024;
/// The default time to connect to an upstream.
pub const CONNECT_TIMEOUT_DEFAULT: &str = "10s";
/// The default longest wait for the upstream's answer headers, and between two body chunks.
pub const READ_TIMEOUT_DEFAULT: &str = "120s";
/// The default longest whole call, streaming included. The hold outlives it by a minute.
pub const MAX_DURATION_DEFAULT: &str = "10m";
/// How much longer than the longest call a hold is kept open, so it never expires unsettled.
pub const HOLD_MARGIN_MS: i64 = 60_000;
/// The longest hold the ledger grants (contract §5).
const HOLD_MS_MAX: i64 = 24 * 3600 * 1000;

/// One `[[upstream]]` table as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    pub name: String,
    pub base_url: String,
    pub scope: String,
    /// The environment variable holding the real credential; none for an upstream without auth.
    pub secret_env: Option<String>,
    pub auth_header: Option<String>,
    pub auth_format: Option<String>,
    pub max_cost_per_request: String,
    pub pricing: PricingSpec,
    /// The largest request body in bytes (default 10 MiB).
    pub max_request_bytes: Option<u64>,
    pub connect_timeout: Option<String>,
    /// The longest wait for the answer's headers, and between two chunks of its body.
    pub read_timeout: Option<String>,
    /// The longest whole call, streaming included.
    pub max_duration: Option<String>,
    /// Whether upstream 5xx answers and connection failures are charged (default: not).
    pub charge_failures: Option<bool>,
    /// The only calls forwarded, as `"METHOD /path"` under the upstream (`*` for any method; a
    /// path ending in `/*` for everything below it). Default: every call.
    pub routes: Option<Vec<String>>,
}

/// `pricing = { kind = "…", … }` as written. Amounts are decimal strings, read exactly.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PricingSpec {
    PerRequest {
        price: String,
    },
    OpenaiUsage {
        input_per_million: String,
        output_per_million: String,
    },
    AnthropicUsage {
        input_per_million: String,
        output_per_million: String,
        /// Price of `cache_creation_input_tokens` (default: the input price).
        cache_write_per_million: Option<String>,
        /// Price of `cache_read_input_tokens` (default: the input price).
        cache_read_per_million: Option<String>,
    },
    /// The upstream states the price of each call in a response header, as a decimal amount.
    ResponseHeader {
        header: String,
    },
}

/// A credential read from the environment. It has no `Display`, and its `Debug` prints nothing
/// of it; it leaves this type only as the (sensitive) header value of a forwarded request.
#[derive(Clone)]
pub struct Secret(Box<str>);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s.into_boxed_str())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The header set on every forwarded request: name and (sensitive) value.
#[derive(Clone)]
pub struct AuthHeader {
    pub name: HeaderName,
    pub value: HeaderValue,
}

impl fmt::Debug for AuthHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthHeader({}: ..)", self.name)
    }
}

/// How the cost of one call is found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pricing {
    PerRequest(Micros),
    Tokens { dialect: Dialect, prices: TokenPrices },
    ResponseHeader(HeaderName),
}

/// Which usage object the answer carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
}

/// Prices per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenPrices {
    pub input: Micros,
    pub output: Micros,
    pub cache_write: Micros,
    pub cache_read: Micros,
}

/// A checked upstream.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub name: String,
    pub scheme: String,
    pub authority: String,
    /// The base path without its trailing slash (`""` for the root).
    pub base_path: String,
    pub scope: Scope,
    pub auth: Option<AuthHeader>,
    pub max_cost: Micros,
    pub pricing: Pricing,
    pub max_request_bytes: u64,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub max_duration: Duration,
    pub charge_failures: bool,
    /// `None`: every call is forwarded.
    pub routes: Option<Vec<RouteRule>>,
}

/// One entry of an upstream's `routes` allow-list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteRule {
    /// `None`: any method.
    method: Option<String>,
    /// The path under the upstream, without its leading `/`.
    path: String,
    /// The rule covers every path below `path` (written `…/*`).
    below: bool,
}

impl RouteRule {
    /// Parses `"POST /v1/chat/completions"`, `"GET /v1/models/*"`, `"* /v1/files"`.
    pub fn parse(upstream: &str, text: &str) -> Result<RouteRule, String> {
        let bad = |why: &str| format!("upstream {upstream:?}: routes entry {text:?}: {why}");
        let (method, path) = text.trim().split_once(' ').ok_or_else(|| bad("write it as \"METHOD /path\""))?;
        let path = path.trim();
        let method = match method {
            "*" => None,
            m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => Some(m.to_owned()),
            _ => return Err(bad("the method is an upper-case HTTP method or *")),
        };
        let path = path.strip_prefix('/').ok_or_else(|| bad("the path starts with /"))?;
        let (path, below) = match path.strip_suffix("/*") {
            Some(p) => (p, true),
            None if path == "*" => ("", true),
            None => (path, false),
        };
        if path.contains('*') || path.contains('?') || path.split('/').any(|s| s == "." || s == "..") {
            return Err(bad("the path is a plain path, with at most a final /*"));
        }
        Ok(RouteRule { method, path: path.trim_end_matches('/').to_owned(), below })
    }

    /// Whether a call of `method` to `rest` (the path under the upstream, no leading `/`) is
    /// allowed by this rule.
    pub fn allows(&self, method: &str, rest: &str) -> bool {
        if self.method.as_deref().is_some_and(|m| m != method) {
            return false;
        }
        let rest = rest.trim_end_matches('/');
        rest == self.path
            || (self.below
                && (self.path.is_empty() || rest.strip_prefix(&self.path).is_some_and(|r| r.starts_with('/'))))
    }
}

impl Upstream {
    /// How long the hold of one call stays open: the longest call plus a margin, at most 24 h.
    pub fn hold_ms(&self) -> i64 {
        (self.max_duration.as_millis() as i64).saturating_add(HOLD_MARGIN_MS).min(HOLD_MS_MAX)
    }
}

fn amount(upstream: &str, field: &str, s: &str) -> Result<Micros, String> {
    Micros::parse(s).map_err(|e| format!("upstream {upstream:?}: {field} {s:?}: {e}"))
}

fn duration(upstream: &str, field: &str, s: Option<&str>, default: &str) -> Result<Duration, String> {
    let s = s.unwrap_or(default);
    let span = Span::parse(s).map_err(|e| format!("upstream {upstream:?}: {field}: {e}"))?;
    Ok(Duration::from_millis(span.millis() as u64))
}

pub(crate) fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && s.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The header carrying an upstream's credential: `auth_format` with `{secret}` replaced by the
/// value of `secret_env`, on `auth_header` (default `Authorization: Bearer {secret}`); none
/// without `secret_env`. Errors start with `who` and never quote the secret.
pub fn auth_header(
    who: &str,
    secret_env: Option<&str>,
    auth_header: Option<&str>,
    auth_format: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<AuthHeader>, String> {
    let Some(var) = secret_env else {
        if auth_header.is_some() || auth_format.is_some() {
            return Err(format!("{who}: auth_header and auth_format need secret_env"));
        }
        return Ok(None);
    };
    let secret = env(var)
        .filter(|s| !s.is_empty())
        .map(Secret::new)
        .ok_or_else(|| format!("{who}: the environment variable {var} (secret_env) is not set"))?;
    let header = auth_header.unwrap_or("Authorization");
    let header = HeaderName::from_bytes(header.as_bytes())
        .map_err(|_| format!("{who}: auth_header {header:?} is not a header name"))?;
    let format = auth_format.unwrap_or("Bearer {secret}");
    if !format.contains("{secret}") {
        return Err(format!("{who}: auth_format must contain {{secret}}"));
    }
    let mut value = HeaderValue::from_str(&format.replace("{secret}", &secret.0))
        .map_err(|_| format!("{who}: the value of {var} (or auth_format) is not a valid header value"))?;
    value.set_sensitive(true);
    Ok(Some(AuthHeader { name: header, value }))
}

impl PricingSpec {
    fn checked(&self, upstream: &str) -> Result<Pricing, String> {
        Ok(match self {
            PricingSpec::PerRequest { price } => Pricing::PerRequest(amount(upstream, "pricing.price", price)?),
            PricingSpec::OpenaiUsage { input_per_million, output_per_million } => {
                let input = amount(upstream, "pricing.input_per_million", input_per_million)?;
                let output = amount(upstream, "pricing.output_per_million", output_per_million)?;
                Pricing::Tokens {
                    dialect: Dialect::OpenAi,
                    prices: TokenPrices { input, output, cache_write: input, cache_read: input },
                }
            }
            PricingSpec::AnthropicUsage {
                input_per_million,
                output_per_million,
                cache_write_per_million,
                cache_read_per_million,
            } => {
                let input = amount(upstream, "pricing.input_per_million", input_per_million)?;
                let output = amount(upstream, "pricing.output_per_million", output_per_million)?;
                let cache_write = match cache_write_per_million {
                    Some(s) => amount(upstream, "pricing.cache_write_per_million", s)?,
                    None => input,
                };
                let cache_read = match cache_read_per_million {
                    Some(s) => amount(upstream, "pricing.cache_read_per_million", s)?,
                    None => input,
                };
                Pricing::Tokens {
                    dialect: Dialect::Anthropic,
                    prices: TokenPrices { input, output, cache_write, cache_read },
                }
            }
            PricingSpec::ResponseHeader { header } => Pricing::ResponseHeader(
                HeaderName::from_bytes(header.as_bytes())
                    .map_err(|_| format!("upstream {upstream:?}: pricing.header {header:?} is not a header name"))?,
            ),
        })
    }
}

impl UpstreamSpec {
    /// Checks the entry and reads its secret through `env` (the process environment in
    /// production).
    pub fn checked(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Upstream, String> {
        let name = &self.name;
        if !valid_name(name) {
            return Err(format!(
                "upstream name {name:?} must be 1 to 64 of a-z 0-9 . _ -, starting with a letter or digit"
            ));
        }
        let (scheme, authority, base_path) = self.base(name)?;
        let scope = Scope::parse(&self.scope).map_err(|e| format!("upstream {name:?}: scope: {e}"))?;
        let max_cost = Micros::parse_positive(&self.max_cost_per_request)
            .map_err(|e| format!("upstream {name:?}: max_cost_per_request {:?}: {e}", self.max_cost_per_request))?;
        let pricing = self.pricing.checked(name)?;
        if let Pricing::PerRequest(p) = pricing
            && p > max_cost
        {
            return Err(format!("upstream {name:?}: pricing.price is more than max_cost_per_request"));
        }
        let auth = auth_header(
            &format!("upstream {name:?}"),
            self.secret_env.as_deref(),
            self.auth_header.as_deref(),
            self.auth_format.as_deref(),
            env,
        )?;
        let max_duration = duration(name, "max_duration", self.max_duration.as_deref(), MAX_DURATION_DEFAULT)?;
        if max_duration.as_millis() as i64 + HOLD_MARGIN_MS > HOLD_MS_MAX {
            return Err(format!("upstream {name:?}: max_duration is at most 23h59m"));
        }
        let max_request_bytes = self.max_request_bytes.unwrap_or(REQUEST_BYTES_DEFAULT);
        if max_request_bytes == 0 {
            return Err(format!("upstream {name:?}: max_request_bytes must be above zero"));
        }
        Ok(Upstream {
            name: name.clone(),
            scheme,
            authority,
            base_path,
            scope,
            auth,
            max_cost,
            pricing,
            max_request_bytes,
            connect_timeout: duration(
                name,
                "connect_timeout",
                self.connect_timeout.as_deref(),
                CONNECT_TIMEOUT_DEFAULT,
            )?,
            read_timeout: duration(name, "read_timeout", self.read_timeout.as_deref(), READ_TIMEOUT_DEFAULT)?,
            max_duration,
            charge_failures: self.charge_failures.unwrap_or(false),
            routes: match &self.routes {
                None => None,
                Some(list) => Some(list.iter().map(|r| RouteRule::parse(name, r)).collect::<Result<Vec<_>, _>>()?),
            },
        })
    }

    /// The base URL's scheme, authority and path: http or https, a host and no user info, no
    /// query or fragment, no dot or encoded segments in the path.
    fn base(&self, name: &str) -> Result<(String, String, String), String> {
        let uri: Uri = self
            .base_url
            .parse()
            .map_err(|_| format!("upstream {name:?}: base_url {:?} is not a URL", self.base_url))?;
        let scheme = match uri.scheme_str() {
            Some(s @ ("http" | "https")) => s.to_owned(),
            _ => return Err(format!("upstream {name:?}: base_url must start with http:// or https://")),
        };
        let authority = match uri.authority() {
            Some(a) if !a.as_str().contains('@') && !a.host().is_empty() => a.as_str().to_owned(),
            _ => return Err(format!("upstream {name:?}: base_url needs a host (and no user info)")),
        };
        if uri.query().is_some() || self.base_url.contains('#') {
            return Err(format!("upstream {name:?}: base_url may not have a query or a fragment"));
        }
        let base_path = uri.path().trim_end_matches('/').to_owned();
        if super::path::check_segments(base_path.trim_start_matches('/'), false).is_err() {
            return Err(format!("upstream {name:?}: base_url has a path with dot or encoded segments"));
        }
        Ok((scheme, authority, base_path))
    }
}

/// Checks every entry (names must be unique).
pub fn check_upstreams(specs: &[UpstreamSpec], env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Upstream>, String> {
    let mut out: Vec<Upstream> = Vec::with_capacity(specs.len());
    for s in specs {
        let u = s.checked(env)?;
        if out.iter().any(|o| o.name == u.name) {
            return Err(format!("two upstreams are named {:?}", u.name));
        }
        out.push(u);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "sk-test-0123456789abcdef";

    fn spec(extra: &str) -> Result<UpstreamSpec, toml::de::Error> {
        toml::from_str(&format!(
            "name = \"openai\"\nbase_url = \"https://api.openai.com/v1/\"\nscope = \"llm:openai\"\n\
             secret_env = \"OPENAI_API_KEY\"\nmax_cost_per_request = \"0.50\"\n{extra}"
        ))
    }

    fn env(k: &str) -> Option<String> {
        (k == "OPENAI_API_KEY").then(|| SECRET.to_owned())
    }

    #[test]
    fn openai_entry_checks() {
        let s =
            spec("pricing = { kind = \"openai_usage\", input_per_million = \"2.50\", output_per_million = \"10.00\" }")
                .expect("parses");
        let u = s.checked(&env).expect("valid");
        assert_eq!(u.authority, "api.openai.com");
        assert_eq!(u.base_path, "/v1");
        assert_eq!(u.max_cost, Micros::parse("0.50").expect("amount"));
        let auth = u.auth.clone().expect("auth");
        assert_eq!(auth.name, "authorization");
        assert_eq!(auth.value.to_str().expect("ascii"), format!("Bearer {SECRET}"));
        assert!(auth.value.is_sensitive());
        assert_eq!(u.max_request_bytes, REQUEST_BYTES_DEFAULT);
        assert!(!u.charge_failures);
        assert_eq!(
            u.pricing,
            Pricing::Tokens {
                dialect: Dialect::OpenAi,
                prices: TokenPrices {
                    input: Micros::from_micros(2_500_000).expect("m"),
                    output: Micros::from_micros(10_000_000).expect("m"),
                    cache_write: Micros::from_micros(2_500_000).expect("m"),
                    cache_read: Micros::from_micros(2_500_000).expect("m"),
                }
            }
        );
    }

    #[test]
    fn secret_never_in_debug_or_errors() {
        let s = spec("pricing = { kind = \"per_request\", price = \"0.01\" }").expect("parses");
        let u = s.checked(&env).expect("valid");
        let dbg = format!("{u:?} {:?}", Secret::new(SECRET.into()));
        assert!(!dbg.contains(SECRET), "Debug leaked the secret: {dbg}");
        // A secret that cannot be a header value is an error that does not quote it.
        let bad = |_: &str| Some("line1\r\nline2-secretvalue".to_owned());
        let e = s.checked(&bad).expect_err("CRLF in a secret is refused");
        assert!(!e.contains("secretvalue") && e.contains("OPENAI_API_KEY"), "{e}");
    }

    #[test]
    fn missing_secret_is_a_clear_error() {
        let s = spec("pricing = { kind = \"per_request\", price = \"0.01\" }").expect("parses");
        let e = s.checked(&|_| None).expect_err("missing env var");
        assert!(e.contains("OPENAI_API_KEY") && e.contains("not set"), "{e}");
        let e = s.checked(&|_| Some(String::new())).expect_err("empty env var");
        assert!(e.contains("OPENAI_API_KEY"), "{e}");
    }

    #[test]
    fn bad_entries_are_refused() {
        assert!(spec("pricing = { kind = \"per_request\", price = \"0.01\" }\nbogus = 1").is_err());
        assert!(spec("pricing = { kind = \"per_token\", price = \"0.01\" }").is_err());
        assert!(spec("pricing = { kind = \"per_request\", price = \"0.01\", extra = \"1\" }").is_err());
        let cases = [
            "pricing = { kind = \"per_request\", price = \"0.51\" }",
            "pricing = { kind = \"per_request\", price = \"1e-2\" }",
            "pricing = { kind = \"per_request\", price = \"0.0000001\" }",
            "pricing = { kind = \"per_request\", price = \"0.01\" }\nread_timeout = \"10ms\"",
            "pricing = { kind = \"per_request\", price = \"0.01\" }\nauth_format = \"Bearer\"",
            "pricing = { kind = \"per_request\", price = \"0.01\" }\nauth_header = \"Bad Header\"",
            "pricing = { kind = \"per_request\", price = \"0.01\" }\nmax_request_bytes = 0",
            "pricing = { kind = \"per_request\", price = \"0.01\" }\nmax_duration = \"24h\"",
            "pricing = { kind = \"response_header\", header = \"bad header\" }",
        ];
        for c in cases {
            let s = spec(c).expect("parses");
            assert!(s.checked(&env).is_err(), "accepted: {c}");
        }
        for (field, value) in [
            ("base_url", "ftp://x"),
            ("base_url", "https://u:p@x"),
            ("base_url", "https://x/a?b=1"),
            ("base_url", "https://x/a/../b"),
            ("base_url", "not a url"),
            ("name", "Open AI"),
            ("scope", "llm:*"),
            ("max_cost_per_request", "0"),
        ] {
            let mut s = spec("pricing = { kind = \"per_request\", price = \"0.01\" }").expect("parses");
            match field {
                "base_url" => s.base_url = value.into(),
                "name" => s.name = value.into(),
                "scope" => s.scope = value.into(),
                _ => s.max_cost_per_request = value.into(),
            }
            assert!(s.checked(&env).is_err(), "accepted {field} = {value:?}");
        }
        let a = spec("pricing = { kind = \"per_request\", price = \"0.01\" }").expect("parses");
        assert!(check_upstreams(&[a.clone(), a], &env).expect_err("duplicate").contains("two upstreams"));
    }

    #[test]
    fn anthropic_cache_prices_default_to_input() {
        let s = spec(
            "pricing = { kind = \"anthropic_usage\", input_per_million = \"3\", output_per_million = \"15\", cache_read_per_million = \"0.30\" }",
        )
        .expect("parses");
        let Pricing::Tokens { dialect, prices } = s.checked(&env).expect("valid").pricing else {
            panic!("token pricing");
        };
        assert_eq!(dialect, Dialect::Anthropic);
        assert_eq!(prices.cache_write, prices.input);
        assert_eq!(prices.cache_read, Micros::from_micros(300_000).expect("m"));
    }

    #[test]
    fn route_rules_allow_only_what_they_name() {
        let r = |t: &str| RouteRule::parse("u", t).unwrap();
        let chat = r("POST /v1/chat/completions");
        assert!(chat.allows("POST", "v1/chat/completions"));
        assert!(chat.allows("POST", "v1/chat/completions/"));
        assert!(!chat.allows("GET", "v1/chat/completions"));
        assert!(!chat.allows("POST", "v1/chat/completions/x"));
        assert!(!chat.allows("POST", "v1/batches"));
        let models = r("GET /v1/models/*");
        assert!(models.allows("GET", "v1/models/gpt-x") && models.allows("GET", "v1/models"));
        assert!(!models.allows("GET", "v1/modelsx"), "a prefix is whole segments");
        assert!(r("* /v1/files").allows("DELETE", "v1/files"));
        assert!(r("GET /*").allows("GET", "anything/at/all"));
        for bad in ["POST", "post /v1/x", "POST v1/x", "POST /v1/*/x", "POST /v1/../x", "POST /v1?x"] {
            assert!(RouteRule::parse("u", bad).is_err(), "{bad}");
        }
    }
}
