//! The agent's key, checked before anything of its request is read: the store's answer, or one
//! remembered under the current authorization epoch ([`KeyCache`]).

use std::collections::HashMap;
use std::sync::Mutex;

use bulkhead_core::{DenyReason, KeyHash, ScopeSet};
use bulkhead_store::{EpochReader, Ledger};

use super::McpGateway;
use crate::error::ApiError;

/// The most keys whose check is remembered (see [`KeyCache`]); past it the memory starts afresh.
const KEYS_CACHED_MAX: usize = 10_000;

/// What a key check found: the agent behind a good key.
#[derive(Clone)]
pub(super) struct Known {
    pub(super) handle: String,
    pub(super) scopes: ScopeSet,
    pub(super) suspended: bool,
}

/// Good keys checked under the current authorization epoch, when this process is the store's
/// only writer (SQLite; [`EpochReader::local`]): a revocation, suspension, patch or new key moves
/// the epoch before it is answered, so a check remembered under an older epoch is never used.
/// Keys with an expiry and suspended agents are never remembered (neither moves the epoch when it
/// ends). On a shared store (PostgreSQL) every request reads the store.
pub(super) struct KeyCache {
    epochs: EpochReader,
    map: Mutex<HashMap<String, (u64, Known)>>,
}

impl KeyCache {
    pub(super) fn new(ledger: &Ledger) -> KeyCache {
        KeyCache { epochs: EpochReader::new(ledger), map: Mutex::new(HashMap::new()) }
    }
}

impl McpGateway {
    /// The agent behind a good key, or why the key is refused (see [`KeyCache`]).
    pub(super) async fn check_key(&self, key: &KeyHash) -> Result<Result<Known, DenyReason>, ApiError> {
        let cache = &self.inner.keys;
        // Read before the store: a change committed after it moves the epoch past it.
        let epoch = cache.epochs.local();
        if let Some(epoch) = epoch
            && let Some((e, known)) = cache.map.lock().unwrap_or_else(|p| p.into_inner()).get(key.as_str())
            && *e == epoch
        {
            return Ok(Ok(known.clone()));
        }
        let now = self.inner.ledger.now_ms();
        let view = match self.inner.ledger.store().agent_for_key(key, now).await? {
            Ok(v) => v,
            Err(reason) => return Ok(Err(reason)),
        };
        let known = Known {
            suspended: view.status == "suspended",
            scopes: ScopeSet::parse(&view.scopes).unwrap_or_default(),
            handle: view.handle,
        };
        if let Some(epoch) = epoch
            && view.expires_at.is_none()
            && !known.suspended
        {
            let mut map = cache.map.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() >= KEYS_CACHED_MAX {
                map.clear();
            }
            map.insert(key.as_str().to_owned(), (epoch, known.clone()));
        }
        Ok(Ok(known))
    }
}
