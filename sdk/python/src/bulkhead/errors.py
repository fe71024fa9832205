"""Exceptions: one class per error code of the API, grouped under a base class per status.

Every non-2xx answer raises a subclass of `BulkheadError` carrying the answer's `status`, `code`
and `message`, the `remaining` budget and `retry_after` when the answer has them, and the raw
body. A code this SDK does not know still maps to the base class of its status.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from ._amounts import parse_optional_amount
from ._time import parse_time

__all__ = [
    "AgentRevoked",
    "AgentSuspended",
    "AncestorCapExceeded",
    "AuthenticationError",
    "BodyTooLarge",
    "BulkheadConnectionError",
    "BulkheadError",
    "CapEscalation",
    "Conflict",
    "CredentialExpired",
    "CredentialRevoked",
    "HandleTaken",
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
    "RateLimited",
    "RouteNotAllowed",
    "ScopeEscalation",
    "ScopeNotGranted",
    "ServerError",
    "SpendingCapExceeded",
    "StoreUnavailable",
    "UnprocessableRequest",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "error_class",
    "error_from_response",
]


class BulkheadError(Exception):
    """An error answer of the Bulkhead API (or, for `BulkheadConnectionError`, no answer at all).

    Attributes:
        status: the HTTP status (`None` when no answer arrived).
        code: the `error.code` of the answer, e.g. `"spending_cap_exceeded"`.
        message: the answer's one human sentence.
        remaining: what is left of the window cap (`Decimal`), when the answer says.
        remaining_lifetime: what is left of the lifetime cap, when the answer says.
        window_resets_at: when the window cap resets, when the answer says.
        retry_after: seconds to wait before retrying (`Retry-After`), when the answer says.
        body: the parsed JSON body (`None` if the body was not JSON).
        raw: the body as text.
    """

    status: int | None
    code: str
    message: str
    remaining: Decimal | None
    remaining_lifetime: Decimal | None
    window_resets_at: datetime | None
    retry_after: float | None
    body: Any
    raw: str

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "error",
        remaining: Decimal | None = None,
        remaining_lifetime: Decimal | None = None,
        window_resets_at: datetime | None = None,
        retry_after: float | None = None,
        body: Any = None,
        raw: str = "",
    ) -> None:
        """Builds an error; `error_from_response` makes them from answers."""
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.remaining = remaining
        self.remaining_lifetime = remaining_lifetime
        self.window_resets_at = window_resets_at
        self.retry_after = retry_after
        self.body = body
        self.raw = raw

    def __str__(self) -> str:
        """`code (status): message`."""
        status = "no answer" if self.status is None else str(self.status)
        return f"{self.code} ({status}): {self.message}"

    def __repr__(self) -> str:
        """The class, status, code and message."""
        return f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, message={self.message!r})"


class BulkheadConnectionError(BulkheadError):
    """The server could not be reached, or its answer was lost, even after the SDK's retries.

    `code` is `"connection_error"` and `status` is `None`. For a money call the outcome is
    unknown: repeat it with the same `idempotency_key` to learn it without paying twice.
    """


# 400


class InvalidRequest(BulkheadError):
    """400: the request is malformed (also the base class of every other 400)."""


class InvalidAmount(InvalidRequest):
    """400 `invalid_amount`: not an amount, zero where a spend is meant, or above what is held."""


class InvalidScope(InvalidRequest):
    """400 `invalid_scope`: a scope is not `resource:action` of the allowed characters."""


class InvalidHandle(InvalidRequest):
    """400 `invalid_handle`: a handle is not 1–64 of `a-z 0-9 . _ -` starting alphanumeric."""


class InvalidWindow(InvalidRequest):
    """400 `invalid_window`: a window or duration is not `<n>s|m|h|d`."""


# 401


class AuthenticationError(BulkheadError):
    """401: the credential was refused (the base class of every 401)."""


class InvalidCredentials(AuthenticationError):
    """401 `invalid_credentials`: a missing, malformed or unknown key, or a call needing the admin token."""


class CredentialRevoked(AuthenticationError):
    """401 `credential_revoked`: the agent, or one of its ancestors, was revoked."""


class CredentialExpired(AuthenticationError):
    """401 `credential_expired`: the agent's key has expired."""


# 402


class LimitExceeded(BulkheadError):
    """402: a spend or hold would break a limit; nothing was charged (base class of every 402)."""


class PerTxLimitExceeded(LimitExceeded):
    """402 `per_tx_limit_exceeded`: the amount is above the per-transaction limit."""


class SpendingCapExceeded(LimitExceeded):
    """402 `spending_cap_exceeded`: the amount would exceed the window's spending cap."""


class LifetimeCapExceeded(LimitExceeded):
    """402 `lifetime_cap_exceeded`: the amount would exceed the lifetime cap."""


class AncestorCapExceeded(LimitExceeded):
    """402 `ancestor_cap_exceeded`: the amount would exceed a limit of one of the agent's ancestors."""


# 403


class PermissionDenied(BulkheadError):
    """403: the caller may not do this (base class of every 403)."""


class ScopeNotGranted(PermissionDenied):
    """403 `scope_not_granted`: the key lacks the scope."""


class ScopeEscalation(PermissionDenied):
    """403 `scope_escalation`: a parent tried to give a child a scope it does not hold."""


class CapEscalation(PermissionDenied):
    """403 `cap_escalation`: a parent tried to give a child a larger cap than its own."""


class AgentSuspended(PermissionDenied):
    """403 `agent_suspended`: the agent is suspended (by an operator or the runaway-loop breaker)."""


class RouteNotAllowed(PermissionDenied):
    """403 `route_not_allowed`: the gateway upstream does not allow this method and path."""


# 404, 405


class NotFound(BulkheadError):
    """404 `not_found`: unknown agent, hold, route or upstream."""


class MethodNotAllowed(BulkheadError):
    """405 `method_not_allowed`: the path exists, but not with this method."""


# 409, 413, 422


class Conflict(BulkheadError):
    """409: the request conflicts with the current state (base class of every 409)."""


class HandleTaken(Conflict):
    """409 `handle_taken`: an agent with this handle exists."""


class HoldClosed(Conflict):
    """409 `hold_closed`: the hold was already captured, released or has expired."""


class AgentRevoked(Conflict):
    """409 `agent_revoked`: the agent is revoked, so it cannot be rotated or resumed."""


class IdempotencyInProgress(Conflict):
    """409 `idempotency_in_progress`: a request with the same idempotency key is still running."""


class BodyTooLarge(BulkheadError):
    """413 `body_too_large`: the request body is over the limit."""


class UnprocessableRequest(BulkheadError):
    """422: the request is well-formed but cannot be processed (base class of every 422)."""


class IdempotencyKeyReused(UnprocessableRequest):
    """422 `idempotency_key_reused`: the idempotency key was used before with a different body."""


# 429


class RateLimited(BulkheadError):
    """429 `rate_limited`: the agent's request rate limit; `retry_after` says when to retry."""


# 5xx


class ServerError(BulkheadError):
    """5xx: the server or the upstream failed (base class of every 5xx)."""


class InternalError(ServerError):
    """500 `internal_error`: the server hit an internal error; nothing was charged."""


class UpstreamUnavailable(ServerError):
    """502 `upstream_unavailable`: the gateway could not reach the upstream."""


class StoreUnavailable(ServerError):
    """503 `store_unavailable`: the store is unavailable; retry shortly."""


class UpstreamTimeout(ServerError):
    """504 `upstream_timeout`: the upstream did not answer in time."""


_BY_CODE: dict[str, type[BulkheadError]] = {
    "invalid_request": InvalidRequest,
    "invalid_amount": InvalidAmount,
    "invalid_scope": InvalidScope,
    "invalid_handle": InvalidHandle,
    "invalid_window": InvalidWindow,
    "invalid_credentials": InvalidCredentials,
    "credential_revoked": CredentialRevoked,
    "credential_expired": CredentialExpired,
    "per_tx_limit_exceeded": PerTxLimitExceeded,
    "spending_cap_exceeded": SpendingCapExceeded,
    "lifetime_cap_exceeded": LifetimeCapExceeded,
    "ancestor_cap_exceeded": AncestorCapExceeded,
    "scope_not_granted": ScopeNotGranted,
    "scope_escalation": ScopeEscalation,
    "cap_escalation": CapEscalation,
    "agent_suspended": AgentSuspended,
    "route_not_allowed": RouteNotAllowed,
    "not_found": NotFound,
    "method_not_allowed": MethodNotAllowed,
    "handle_taken": HandleTaken,
    "hold_closed": HoldClosed,
    "agent_revoked": AgentRevoked,
    "idempotency_in_progress": IdempotencyInProgress,
    "body_too_large": BodyTooLarge,
    "idempotency_key_reused": IdempotencyKeyReused,
    "rate_limited": RateLimited,
    "internal_error": InternalError,
    "upstream_unavailable": UpstreamUnavailable,
    "store_unavailable": StoreUnavailable,
    "upstream_timeout": UpstreamTimeout,
}

_BY_STATUS: dict[int, type[BulkheadError]] = {
    400: InvalidRequest,
    401: AuthenticationError,
    402: LimitExceeded,
    403: PermissionDenied,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    413: BodyTooLarge,
    422: UnprocessableRequest,
    429: RateLimited,
}


def error_class(status: int, code: str | None) -> type[BulkheadError]:
    """The exception class for an answer's status and code: by code, else by status."""
    if code is not None and code in _BY_CODE:
        return _BY_CODE[code]
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status >= 500:
        return ServerError
    return BulkheadError


def _retry_after(headers: Mapping[str, str], error: Mapping[str, Any]) -> float | None:
    text = headers.get("retry-after")
    if text is not None:
        try:
            return max(0.0, float(text))
        except ValueError:
            pass  # an HTTP date: not what this server sends; fall back to the body
    value = error.get("retry_after")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def error_from_response(status: int, headers: Mapping[str, str], content: bytes) -> BulkheadError:
    """The exception for a non-2xx answer: its class by code (else status), its fields from the body."""
    raw = content.decode("utf-8", errors="replace")
    body: Any = None
    try:
        body = json.loads(raw, parse_float=Decimal)
    except ValueError:
        body = None
    error: Mapping[str, Any] = {}
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
    code = error.get("code") if isinstance(error.get("code"), str) else None
    message = error.get("message")
    if not isinstance(message, str):
        message = raw.strip()[:200] or f"HTTP {status}"
    # `remaining` and `window_resets_at` ride beside `error` (or inside it).
    outer: Mapping[str, Any] = body if isinstance(body, dict) else {}
    remaining = outer.get("remaining", error.get("remaining"))
    window: Decimal | None = None
    lifetime: Decimal | None = None
    try:
        if isinstance(remaining, dict):
            window = parse_optional_amount(remaining.get("window"))
            lifetime = parse_optional_amount(remaining.get("lifetime"))
        elif remaining is not None:
            window = parse_optional_amount(remaining)
    except (TypeError, ArithmeticError):
        window = lifetime = None
    resets = outer.get("window_resets_at", error.get("window_resets_at"))
    cls = error_class(status, code)
    return cls(
        message,
        status=status,
        code=code or f"http_{status}",
        remaining=window,
        remaining_lifetime=lifetime,
        window_resets_at=parse_time(resets) if isinstance(resets, str) else None,
        retry_after=_retry_after(headers, error),
        body=body,
        raw=raw,
    )
