"""What the sync and async clients share: settings, request bodies, retries and answers."""

from __future__ import annotations

import enum
import json
import os
import random
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import quote

import httpx

from ._amounts import Amount, amount_text
from .errors import BulkheadConnectionError, BulkheadError, error_from_response
from .models import RateLimit

__version__ = "0.1.0"

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
DEFAULT_MAX_RETRIES = 4
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=64, keepalive_expiry=30.0)
BACKOFF_BASE = 0.05
BACKOFF_MAX = 2.0
USER_AGENT = f"bulkhead-python/{__version__}"

Timeout: TypeAlias = float | httpx.Timeout | None
"""A timeout in seconds for each phase of a request, or an `httpx.Timeout`."""


def resolve_url(url: str | None) -> str:
    """`url`, else `BULKHEAD_URL`, else `http://127.0.0.1:8080`, without a trailing slash."""
    value = url or os.environ.get("BULKHEAD_URL") or DEFAULT_URL
    return value.rstrip("/")


def resolve_admin_token(token: str | None) -> str | None:
    """`token`, else `BULKHEAD_ADMIN_TOKEN`, else `None`."""
    return token or os.environ.get("BULKHEAD_ADMIN_TOKEN") or None


def new_idempotency_key() -> str:
    """A fresh idempotency key for one logical money call."""
    return f"bk-py-{uuid.uuid4().hex}"


class Retry(enum.Enum):
    """Which failures a request may be repeated after."""

    # Only when the request surely never left (no connection could be made): a create.
    CONNECT = "connect"
    # After any transport failure or a 503: reads and idempotent calls (revocation).
    SAFE = "safe"
    # A money call carrying an idempotency key: as SAFE, and after `idempotency_in_progress`.
    MONEY = "money"


_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_TRANSPORT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


@dataclass(frozen=True)
class Call:
    """One logical request: the same bytes (and idempotency key) on every attempt."""

    method: str
    path: str
    body: bytes | None
    headers: Mapping[str, str]
    retry: Retry
    params: Mapping[str, str] | None = None


def call(
    method: str,
    path: str,
    token: str | None,
    body: Mapping[str, Any] | None = None,
    *,
    retry: Retry = Retry.SAFE,
    idempotency_key: str | None = None,
    params: Mapping[str, str] | None = None,
) -> Call:
    """A `Call` with its JSON body serialised once."""
    headers: dict[str, str] = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body, separators=(",", ":")).encode()
        headers["Content-Type"] = "application/json"
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return Call(method, path, data, headers, retry, params)


def money_key(idempotency_key: str | None) -> str:
    """The caller's idempotency key, checked, or a fresh one."""
    if idempotency_key is None:
        return new_idempotency_key()
    if not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= 255:
        raise ValueError("idempotency_key must be a string of 1 to 255 characters")
    if not all(0x21 <= ord(c) < 0x7F for c in idempotency_key):
        raise ValueError("idempotency_key must be visible ASCII characters (no spaces)")
    return idempotency_key


def transport_retryable(exc: Exception, retry: Retry) -> bool:
    """Whether a request that failed with `exc` before an answer may be sent again."""
    if retry is Retry.CONNECT:
        return isinstance(exc, _NOT_SENT)
    return isinstance(exc, _TRANSPORT)


def answer_retryable(status: int, content: bytes, retry: Retry) -> bool:
    """Whether an error answer is worth the same request again (same idempotency key)."""
    if retry is Retry.CONNECT:
        return False
    if status == 503:
        return True
    if status == 409 and retry is Retry.MONEY:
        return b"idempotency_in_progress" in content
    return False


def backoff(attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait before retry number `attempt` (0-based): exponential with jitter, bounded."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), BACKOFF_MAX)
    delay: float = min(BACKOFF_MAX, BACKOFF_BASE * (2**attempt))
    return delay * (0.5 + random.random() / 2)


def retry_after_of(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds, if the answer has one."""
    text = response.headers.get("retry-after")
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def connection_error(exc: Exception, c: Call, attempts: int) -> BulkheadConnectionError:
    """The error raised when no answer arrived after `attempts` tries."""
    what = "the outcome is unknown" if c.retry is Retry.MONEY else "nothing was answered"
    message = f"{c.method} {c.path}: no answer after {attempts} attempt(s) ({type(exc).__name__}: {exc}); {what}"
    return BulkheadConnectionError(message, status=None, code="connection_error")


def answer(response: httpx.Response) -> Any:
    """The JSON of a 2xx answer; raises the matching `BulkheadError` for any other."""
    if response.is_success:
        if not response.content:
            return {}
        try:
            return json.loads(response.content)
        except ValueError:
            raise BulkheadError(
                f"the server answered {response.status_code} with a body that is not JSON",
                status=response.status_code,
                code="invalid_response",
                raw=response.text,
            ) from None
    raise error_from_response(response.status_code, response.headers, response.content)


def replayed(response: httpx.Response) -> bool:
    """Whether the server replayed a stored answer for this idempotency key."""
    value: str = response.headers.get("idempotent-replayed", "")
    return value.lower() == "true"


def http_options(url: str, timeout: Timeout, limits: httpx.Limits | None) -> dict[str, Any]:
    """Keyword arguments for the `httpx` client of one SDK client."""
    return {
        "base_url": url,
        "timeout": timeout,
        "limits": limits or DEFAULT_LIMITS,
        "headers": {"User-Agent": USER_AGENT, "Accept": "application/json"},
    }


def agent_body(
    handle: str,
    scopes: Iterable[str],
    spending_cap: Amount,
    *,
    window: str | None,
    per_tx_limit: Amount | None,
    lifetime_cap: Amount | None,
    rate_limit: RateLimit | Mapping[str, Any] | None,
    expires_in: str | None,
    labels: Mapping[str, str] | None,
    breaker: Mapping[str, Any] | None,
    enforce: bool | None,
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The body of `POST /v1/agents`, amounts as exact decimal strings; unset fields left out."""
    if isinstance(scopes, str):
        raise TypeError("scopes must be a list of strings, not one string")
    body: dict[str, Any] = {
        "handle": handle,
        "scopes": list(scopes),
        "spending_cap": amount_text(spending_cap, name="spending_cap"),
    }
    if window is not None:
        body["window"] = window
    if per_tx_limit is not None:
        body["per_tx_limit"] = amount_text(per_tx_limit, name="per_tx_limit")
    if lifetime_cap is not None:
        body["lifetime_cap"] = amount_text(lifetime_cap, name="lifetime_cap")
    if rate_limit is not None:
        body["rate_limit"] = rate_limit.to_json() if isinstance(rate_limit, RateLimit) else dict(rate_limit)
    if expires_in is not None:
        body["expires_in"] = expires_in
    if labels is not None:
        body["labels"] = dict(labels)
    if breaker is not None:
        body["breaker"] = dict(breaker)
    if enforce is not None:
        body["enforce"] = enforce
    if extra:
        body.update(extra)
    return body


def spend_body(amount: Amount, scope: str, memo: str | None) -> dict[str, Any]:
    """The body of `POST /v1/spend`."""
    body: dict[str, Any] = {"scope": scope, "amount": amount_text(amount)}
    if memo is not None:
        body["memo"] = memo
    return body


def hold_body(amount: Amount, scope: str, expires_in: str | None) -> dict[str, Any]:
    """The body of `POST /v1/holds`."""
    body: dict[str, Any] = {"scope": scope, "amount": amount_text(amount)}
    if expires_in is not None:
        body["expires_in"] = expires_in
    return body


def page_params(limit: int | None, after: str | int | None) -> dict[str, str] | None:
    """`limit`/`after` query parameters of a list call."""
    params: dict[str, str] = {}
    if limit is not None:
        params["limit"] = str(limit)
    if after is not None:
        params["after"] = str(after)
    return params or None


def quote_segment(value: str) -> str:
    """A path segment, percent-encoded."""
    return quote(value, safe="")
