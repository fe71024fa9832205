//! The ledger's commands and their checked inputs: what the server hands in, already parsed.
//! Nothing here reads or writes the store.

use bulkhead_core::ratelimit::RateLimit;
use bulkhead_core::runaway::BreakerOverride;
use bulkhead_core::{Handle, KeyHash, Micros, Scope, ScopeSet, Span};

/// Who is making an admin-style call.
#[derive(Clone, Debug)]
pub enum Caller {
    Admin,
    Agent(KeyHash),
}

/// An `Idempotency-Key` and the hash of the request it came with.
#[derive(Clone, Debug)]
pub struct Idem {
    pub key: String,
    pub request_hash: String,
}

/// A checked request to create an agent.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    pub handle: Handle,
    pub scopes: ScopeSet,
    pub spending_cap: Micros,
    pub window: Span,
    pub per_tx_limit: Option<Micros>,
    pub lifetime_cap: Option<Micros>,
    pub rate_limit: Option<RateLimit>,
    pub expires_in: Option<Span>,
    pub labels: serde_json::Map<String, serde_json::Value>,
    pub breaker: Option<BreakerOverride>,
    /// `false`: shadow mode (root agents only).
    pub enforce: bool,
}

/// A checked change to an agent. `None` leaves a field alone; `Some(None)` clears it.
#[derive(Clone, Debug, Default)]
pub struct Patch {
    pub spending_cap: Option<Micros>,
    pub window: Option<Span>,
    pub per_tx_limit: Option<Micros>,
    pub lifetime_cap: Option<Option<Micros>>,
    pub scopes: Option<ScopeSet>,
    pub rate_limit: Option<Option<RateLimit>>,
    pub labels: Option<serde_json::Map<String, serde_json::Value>>,
    pub breaker: Option<Option<BreakerOverride>>,
    pub enforce: Option<bool>,
}

/// How a lease settlement audits the calls it settles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseAudit {
    /// One `capture` event for all of them, each call's cost in its detail (the proxy gateway).
    Settlement,
    /// One `capture` event per call, under the lease's scope, with the call's cost (the MCP
    /// gateway: contract §11 wants an audit event per `tools/call`, naming server and tool).
    EachCall,
}

/// One write for the ledger.
#[derive(Clone, Debug)]
pub enum Command {
    CreateAgent {
        caller: Caller,
        spec: AgentSpec,
        key_hash: KeyHash,
    },
    PatchAgent {
        handle: String,
        patch: Patch,
    },
    Revoke {
        caller: Caller,
        handle: String,
        reason: Option<String>,
    },
    RotateKey {
        handle: String,
        key_hash: KeyHash,
    },
    Resume {
        handle: String,
    },
    /// An operator's suspension: the agent and its subtree are refused until resumed.
    Suspend {
        handle: String,
        reason: Option<String>,
    },
    Spend {
        key: KeyHash,
        scope: Scope,
        amount: Micros,
        memo: Option<String>,
        idem: Option<Idem>,
    },
    Hold {
        key: KeyHash,
        scope: Scope,
        amount: Micros,
        expires_ms: i64,
        idem: Option<Idem>,
    },
    /// The gateway's hold before forwarding a call: like `Hold`, but captured in full if it
    /// expires unsettled, so a call whose settlement never came (a crash) is not free.
    MeteredHold {
        key: KeyHash,
        scope: Scope,
        amount: Micros,
        expires_ms: i64,
    },
    /// The gateway's settlement of its own hold: no key (it may have been rotated mid-call);
    /// `amount` is captured and the rest released (zero releases it all).
    Settle {
        hold_id: String,
        amount: Micros,
    },
    /// The gateway's lease: every check of a `MeteredHold` of `unit` (the first call's hold,
    /// decided and audited like one), then as many more `unit` slots, up to `slots` in all, as
    /// every cap of the chain and the rate limit allow right now. One hold carries them all and
    /// is captured in full if it expires unsettled. Agents in shadow mode, not active, or with a
    /// runaway trigger get one slot: each of their calls is decided on its own.
    Lease {
        key: KeyHash,
        scope: Scope,
        unit: Micros,
        slots: u32,
        expires_ms: i64,
    },
    /// Settles calls made under a lease: each of `costs` (at most `unit`) is captured from one
    /// slot and the rest of that slot released; `release` unused slots are released (and their
    /// rate-limit tokens given back); `close` releases what is left and closes the lease.
    LeaseSettle {
        hold_id: String,
        /// The settlement's number, from 1 up, per lease: one already applied (a retry after a
        /// commit whose outcome was unknown) is answered without being applied again.
        seq: i64,
        unit: Micros,
        costs: Vec<Micros>,
        release: u32,
        close: bool,
        /// How the settled calls are audited.
        audit: LeaseAudit,
    },
    Capture {
        key: KeyHash,
        hold_id: String,
        amount: Micros,
        idem: Option<Idem>,
    },
    Release {
        key: KeyHash,
        hold_id: String,
        idem: Option<Idem>,
    },
    /// Expires holds past their expiry (run periodically).
    SweepExpired,
    /// Audits refusals answered from memory: one event per agent and reason (run periodically).
    RecordRefusals(Vec<super::Tally>),
    /// Audits a call the MCP gateway refused before the ledger could decide it, because no scope
    /// can name its tool (a name outside the scope alphabet): one denied event for the agent
    /// naming the server and the tool (`reason` is the code the agent was answered with), one
    /// more denial in its count, and a step of its breaker. Nothing is held or charged. A key
    /// refused for good or a suspended agent gets that refusal instead, and nothing is written.
    AuditRefusedCall {
        key: KeyHash,
        server: String,
        /// The tool's name as the agent sent it (its event keeps the first `TOOL_NAME_AUDITED_MAX`
        /// characters).
        tool: String,
        reason: String,
    },
}

/// How much of a refused call's tool name its audit event keeps (characters).
pub(super) const TOOL_NAME_AUDITED_MAX: usize = 80;

impl Command {
    pub(super) fn idem(&self) -> Option<&Idem> {
        match self {
            Command::Spend { idem, .. }
            | Command::Hold { idem, .. }
            | Command::Capture { idem, .. }
            | Command::Release { idem, .. } => idem.as_ref(),
            _ => None,
        }
    }

    /// The hold a command names, if any.
    pub(super) fn hold_id(&self) -> Option<&str> {
        match self {
            Command::Capture { hold_id, .. }
            | Command::Release { hold_id, .. }
            | Command::Settle { hold_id, .. }
            | Command::LeaseSettle { hold_id, .. } => Some(hold_id),
            _ => None,
        }
    }

    pub(super) fn key(&self) -> Option<&KeyHash> {
        match self {
            Command::Spend { key, .. }
            | Command::Hold { key, .. }
            | Command::MeteredHold { key, .. }
            | Command::Lease { key, .. }
            | Command::Capture { key, .. }
            | Command::Release { key, .. }
            | Command::AuditRefusedCall { key, .. } => Some(key),
            Command::CreateAgent { caller: Caller::Agent(k), .. }
            | Command::Revoke { caller: Caller::Agent(k), .. } => Some(k),
            _ => None,
        }
    }
}
