"""Bulkhead: a bulkhead around every AI agent.

Each agent gets its own key, hard spending caps, explicit scopes, surgical revocation and a
per-agent audit trail. This package is the agent SDK:

```python
from bulkhead import AgentAccount, BulkheadError

account = AgentAccount.create(
    handle="invoice-processor-prod-01",
    spending_cap=50.00,
    per_tx_limit=5.00,
    window="24h",
    scopes=["payments:write", "invoices:read"])
client = account.client()
client.spend("2.50", scope="payments:write")
with client.hold("1.00", scope="payments:write") as hold:
    hold.capture("0.40")
account.revoke()
```
"""

from ._amounts import Amount
from ._core import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, DEFAULT_URL, __version__
from .aio import AsyncAgentAccount, AsyncAgentClient, AsyncHold, AsyncHoldRequest
from .client import AgentAccount, AgentClient, Hold
from .errors import (
    AgentRevoked,
    AgentSuspended,
    AncestorCapExceeded,
    AuthenticationError,
    BodyTooLarge,
    BulkheadConnectionError,
    BulkheadError,
    CapEscalation,
    Conflict,
    CredentialExpired,
    CredentialRevoked,
    HandleTaken,
    HoldClosed,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    InternalError,
    InvalidAmount,
    InvalidCredentials,
    InvalidHandle,
    InvalidRequest,
    InvalidScope,
    InvalidWindow,
    LifetimeCapExceeded,
    LimitExceeded,
    MethodNotAllowed,
    NotFound,
    PermissionDenied,
    PerTxLimitExceeded,
    RateLimited,
    RouteNotAllowed,
    ScopeEscalation,
    ScopeNotGranted,
    ServerError,
    SpendingCapExceeded,
    StoreUnavailable,
    UnprocessableRequest,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_class,
)
from .models import Agent, AuditEvent, RateLimit, Receipt, Settlement, Usage

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "Agent",
    "AgentAccount",
    "AgentClient",
    "AgentRevoked",
    "AgentSuspended",
    "Amount",
    "AncestorCapExceeded",
    "AsyncAgentAccount",
    "AsyncAgentClient",
    "AsyncHold",
    "AsyncHoldRequest",
    "AuditEvent",
    "AuthenticationError",
    "BodyTooLarge",
    "BulkheadConnectionError",
    "BulkheadError",
    "CapEscalation",
    "Conflict",
    "CredentialExpired",
    "CredentialRevoked",
    "HandleTaken",
    "Hold",
    "HoldClosed",
    "IdempotencyInProgress",
    "IdempotencyKeyReused",
    "InternalError",
    "InvalidAmount",
    "InvalidCredentials",
    "InvalidHandle",
    "InvalidRequest",
    "InvalidScope",
    "InvalidWindow",
    "LifetimeCapExceeded",
    "LimitExceeded",
    "MethodNotAllowed",
    "NotFound",
    "PerTxLimitExceeded",
    "PermissionDenied",
    "RateLimit",
    "RateLimited",
    "Receipt",
    "RouteNotAllowed",
    "ScopeEscalation",
    "ScopeNotGranted",
    "ServerError",
    "Settlement",
    "SpendingCapExceeded",
    "StoreUnavailable",
    "UnprocessableRequest",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "Usage",
    "__version__",
    "error_class",
]
