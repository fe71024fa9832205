//! What the blast radius reports of the MCP gateway: the servers an agent may reach and, of
//! each, the tools its scopes grant.

use std::sync::Arc;

use bulkhead_core::ScopeSet;

use super::config::McpServer;
use super::jsonrpc;

/// The MCP servers an agent may reach through Bulkhead, for the blast radius: each server's
/// name and its priced tools.
#[derive(Clone, Debug, Default)]
pub struct McpCatalog(pub Arc<Vec<(String, Vec<String>)>>);

impl McpCatalog {
    pub fn of(servers: &[McpServer]) -> McpCatalog {
        McpCatalog(Arc::new(
            servers
                .iter()
                .map(|s| {
                    let mut tools: Vec<String> = s.prices.keys().cloned().collect();
                    tools.sort();
                    (s.name.clone(), tools)
                })
                .collect(),
        ))
    }

    /// The tools `scopes` reach, as `server:tool`, or `server:*` for a whole server: the priced
    /// tools a pattern grants, and tools named by the agent's own scopes.
    pub fn reachable(&self, scopes: &[String]) -> Vec<String> {
        let Ok(set) = ScopeSet::parse(scopes) else { return Vec::new() };
        let mut out = Vec::new();
        for (server, tools) in self.0.iter() {
            let all = bulkhead_core::scope::ScopePattern::parse(&format!("mcp.{server}:*"));
            if all.is_ok_and(|all| set.patterns().iter().any(|p| p.covers(&all))) {
                out.push(format!("{server}:*"));
                continue;
            }
            let mut named: Vec<String> = tools
                .iter()
                .filter(|t| jsonrpc::tool_scope(server, t).is_ok_and(|s| set.grants(&s)))
                .cloned()
                .collect();
            let prefix = format!("mcp.{server}:");
            for p in set.patterns() {
                if let Some(tool) = p.as_str().strip_prefix(&prefix)
                    && !p.is_wildcard()
                    && !named.iter().any(|t| t == tool)
                {
                    named.push(tool.to_owned());
                }
            }
            named.sort();
            out.extend(named.into_iter().map(|t| format!("{server}:{t}")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::McpServerSpec;

    fn catalog() -> McpCatalog {
        let spec = |t: &str| -> McpServerSpec { toml::from_str(t).expect("spec") };
        let servers = [
            spec("name = \"tools\"\nurl = \"http://x/mcp\"\ntools = { search = \"0.002\", charge_card = \"1.00\" }"),
            spec("name = \"files\"\ncommand = [\"srv\"]"),
        ]
        .iter()
        .map(|s| s.checked(&|_| None).expect("valid"))
        .collect::<Vec<_>>();
        McpCatalog::of(&servers)
    }

    #[test]
    fn blast_radius_names_the_reachable_tools() {
        let c = catalog();
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert_eq!(c.reachable(&s(&["mcp.tools:search"])), s(&["tools:search"]));
        assert_eq!(c.reachable(&s(&["mcp.tools:*", "mcp.files:read_file"])), s(&["tools:*", "files:read_file"]));
        assert_eq!(c.reachable(&s(&["*"])), s(&["tools:*", "files:*"]));
        assert_eq!(c.reachable(&s(&["*:search"])), s(&["tools:search"]));
        assert_eq!(c.reachable(&s(&["payments:write", "mcp.other:x"])), Vec::<String>::new());
    }
}
