"""Typed results of the API: frozen dataclasses, amounts as `Decimal`, times as aware `datetime`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from ._amounts import parse_amount, parse_optional_amount
from ._time import optional_time

__all__ = ["Agent", "AuditEvent", "RateLimit", "Receipt", "Settlement", "Usage"]


def _frozen_map(value: object) -> Mapping[str, Any]:
    return MappingProxyType(dict(value)) if isinstance(value, dict) else MappingProxyType({})


@dataclass(frozen=True)
class RateLimit:
    """An agent's request rate limit: at most `requests` per `per` (a duration like `"1m"`)."""

    requests: int
    per: str

    def to_json(self) -> dict[str, Any]:
        """The JSON object the API takes."""
        return {"requests": self.requests, "per": self.per}

    @classmethod
    def from_json(cls, value: object) -> RateLimit | None:
        """A rate limit from the API's JSON object (`None` for null)."""
        if not isinstance(value, dict):
            return None
        return cls(requests=int(value["requests"]), per=str(value["per"]))


@dataclass(frozen=True)
class Usage:
    """An agent's usage, its descendants' spends and holds included.

    `utilization` is `(window_spent + window_held) / spending_cap`.
    """

    window_spent: Decimal
    window_held: Decimal
    window_started_at: datetime | None
    window_resets_at: datetime | None
    lifetime_spent: Decimal
    utilization: float
    tx_count: int
    denied_count: int

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Usage:
        """Usage from the agent object's `usage` field."""
        return cls(
            window_spent=parse_amount(value["window_spent"]),
            window_held=parse_amount(value["window_held"]),
            window_started_at=optional_time(value.get("window_started_at")),
            window_resets_at=optional_time(value.get("window_resets_at")),
            lifetime_spent=parse_amount(value["lifetime_spent"]),
            utilization=float(value.get("utilization") or 0.0),
            tx_count=int(value.get("tx_count") or 0),
            denied_count=int(value.get("denied_count") or 0),
        )


@dataclass(frozen=True)
class Agent:
    """An agent as the API describes it (`GET /v1/me`, `GET /v1/agents/{handle}`).

    `raw` keeps the whole JSON object, fields this SDK does not name included.
    """

    handle: str
    parent: str | None
    status: str
    scopes: tuple[str, ...]
    spending_cap: Decimal
    window: str
    per_tx_limit: Decimal | None
    lifetime_cap: Decimal | None
    rate_limit: RateLimit | None
    created_at: datetime | None
    revoked_at: datetime | None
    expires_at: datetime | None
    suspended_at: datetime | None
    labels: Mapping[str, Any]
    enforce: bool
    breaker: Mapping[str, Any] | None
    usage: Usage | None
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Agent:
        """An agent from its JSON object."""
        usage = value.get("usage")
        breaker = value.get("breaker")
        return cls(
            handle=str(value["handle"]),
            parent=value.get("parent"),
            status=str(value.get("status", "active")),
            scopes=tuple(value.get("scopes") or ()),
            spending_cap=parse_amount(value["spending_cap"]),
            window=str(value.get("window", "")),
            per_tx_limit=parse_optional_amount(value.get("per_tx_limit")),
            lifetime_cap=parse_optional_amount(value.get("lifetime_cap")),
            rate_limit=RateLimit.from_json(value.get("rate_limit")),
            created_at=optional_time(value.get("created_at")),
            revoked_at=optional_time(value.get("revoked_at")),
            expires_at=optional_time(value.get("expires_at")),
            suspended_at=optional_time(value.get("suspended_at")),
            labels=_frozen_map(value.get("labels")),
            enforce=bool(value.get("enforce", True)),
            breaker=_frozen_map(breaker) if isinstance(breaker, dict) else None,
            usage=Usage.from_json(usage) if isinstance(usage, dict) else None,
            raw=_frozen_map(value),
        )


@dataclass(frozen=True)
class Receipt:
    """An allowed spend.

    `remaining` is what is left of the window cap after it, `remaining_lifetime` what is left of
    the lifetime cap (`None` without one). `replayed` is true when the server answered from its
    idempotency record (the spend was made once, by an earlier request with the same key).
    `shadow_denied` names the limit a shadow agent's spend would have broken.
    """

    id: str
    amount: Decimal
    remaining: Decimal | None
    remaining_lifetime: Decimal | None
    window_resets_at: datetime | None
    replayed: bool = False
    shadow_denied: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, value: Mapping[str, Any], *, replayed: bool = False) -> Receipt:
        """A receipt from the answer to `POST /v1/spend`."""
        remaining = value.get("remaining")
        rem = remaining if isinstance(remaining, dict) else {}
        return cls(
            id=str(value["id"]),
            amount=parse_amount(value["amount"]),
            remaining=parse_optional_amount(rem.get("window")),
            remaining_lifetime=parse_optional_amount(rem.get("lifetime")),
            window_resets_at=optional_time(value.get("window_resets_at")),
            replayed=replayed,
            shadow_denied=value.get("shadow_denied"),
            raw=_frozen_map(value),
        )


@dataclass(frozen=True)
class Settlement:
    """How a hold was closed: `captured` was charged, `released` went back to the caps."""

    id: str
    captured: Decimal
    released: Decimal
    replayed: bool = False
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, value: Mapping[str, Any], *, replayed: bool = False) -> Settlement:
        """A settlement from the answer to a capture or a release."""
        return cls(
            id=str(value["id"]),
            captured=parse_amount(value.get("captured", "0")),
            released=parse_amount(value.get("released", "0")),
            replayed=replayed,
            raw=_frozen_map(value),
        )


@dataclass(frozen=True)
class AuditEvent:
    """One event of an agent's hash-chained audit trail (a decision or an admin action)."""

    seq: int
    at: datetime | None
    agent: str
    action: str
    outcome: str
    reason: str | None
    scope: str | None
    amount: Decimal | None
    hash: str
    prev_hash: str | None
    raw: Mapping[str, Any] = field(repr=False, compare=False)
    #: The spend, hold or agent the event is about (`ref` in the JSON).
    reference: str | None = None
    #: What else the event records (e.g. `{"by": "gateway"}`, a shadow agent's
    #: `{"shadow": "would_deny"}`, a refused MCP call's `{"mcp_server": …, "tool": …}`).
    detail: Mapping[str, Any] | None = field(default=None, compare=False)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> AuditEvent:
        """An event from the audit trail's JSON."""
        return cls(
            seq=int(value["seq"]),
            at=optional_time(value.get("at")),
            agent=str(value.get("agent", "")),
            action=str(value.get("action", "")),
            outcome=str(value.get("outcome", "")),
            reason=value.get("reason"),
            scope=value.get("scope"),
            amount=parse_optional_amount(value.get("amount")),
            hash=str(value.get("hash", "")),
            prev_hash=value.get("prev_hash"),
            reference=value.get("ref"),
            detail=_frozen_map(value["detail"]) if isinstance(value.get("detail"), dict) else None,
            raw=_frozen_map(value),
        )
