//! `Mcp-Session-Id` bound to the agent that opened the session.
//!
//! A server's session id reaches the agent sealed, `{id}.{tag}`, the tag an HMAC-SHA-256 (its
//! first 16 bytes, in hex) of the agent's handle and the id. A request's session id must carry
//! the tag of the agent that sends it, else it is refused as an unknown session (404, which MCP
//! clients answer by starting a new session), and the server gets its own id back without the
//! tag. So a session opened with one agent's key cannot be used with another's, though every
//! request reaches the server under Bulkhead's one credential. Nothing is kept per session: the
//! key is derived from the audit key, the same on every replica and after a restart.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header, as sent and as forwarded.
pub const MCP_SESSION_ID: &str = "mcp-session-id";
/// The bytes of the HMAC kept in a tag.
const TAG_BYTES: usize = 16;

/// Seals and opens session ids.
#[derive(Clone)]
pub struct SessionSeal {
    key: [u8; 32],
}

impl SessionSeal {
    /// Seals under `key` (derived from the store's audit key), or under a random key of this
    /// process when the store has none (sessions then do not outlive it).
    pub fn new(key: Option<[u8; 32]>) -> SessionSeal {
        SessionSeal { key: key.unwrap_or_else(rand::random) }
    }

    fn mac(&self, agent: &str, id: &str) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(agent.as_bytes());
        mac.update(&[0]);
        mac.update(id.as_bytes());
        mac
    }

    /// The session id `agent` gets for the server's `id`.
    pub fn seal(&self, agent: &str, id: &str) -> String {
        let tag = self.mac(agent, id).finalize().into_bytes();
        format!("{id}.{}", bulkhead_core::key::hex_lower(&tag[..TAG_BYTES]))
    }

    /// The server's id behind `sealed`, if `agent` is the one it was sealed for.
    pub fn open<'a>(&self, agent: &str, sealed: &'a str) -> Option<&'a str> {
        let (id, tag) = sealed.rsplit_once('.')?;
        if tag.len() != 2 * TAG_BYTES {
            return None;
        }
        let mut bytes = [0u8; TAG_BYTES];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(tag.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        self.mac(agent, id).verify_truncated_left(&bytes).ok().map(|()| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_opens_only_for_the_agent_it_was_sealed_for() {
        let s = SessionSeal::new(Some([7; 32]));
        let sealed = s.seal("agent-a", "3f2a.b");
        assert_eq!(s.open("agent-a", &sealed), Some("3f2a.b"));
        assert_eq!(s.open("agent-b", &sealed), None);
        // Not sealed, tampered, truncated, or sealed under another key: refused.
        assert_eq!(s.open("agent-a", "3f2a.b"), None);
        assert_eq!(s.open("agent-a", &sealed.replace("3f2a", "3f2b")), None);
        assert_eq!(s.open("agent-a", &sealed[..sealed.len() - 2]), None);
        assert_eq!(SessionSeal::new(Some([8; 32])).open("agent-a", &sealed), None);
        // Handles and ids cannot be shifted into each other.
        assert_eq!(s.open("agent-a3f2a", &s.seal("agent-a3f2a", "b")), Some("b"));
        assert_eq!(s.open("agent-", &s.seal("agent-a", "3f2a")), None);
    }
}
