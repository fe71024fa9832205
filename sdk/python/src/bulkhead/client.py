"""The synchronous client: `AgentClient` (an agent's key) and `AgentAccount` (an agent to manage)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Any

import httpx

from ._amounts import Amount, amount_text, parse_amount, parse_optional_amount
from ._core import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    Retry,
    Timeout,
    agent_body,
    answer,
    call,
    hold_body,
    money_key,
    page_params,
    quote_segment,
    replayed,
    resolve_admin_token,
    resolve_url,
    spend_body,
)
from ._time import optional_time
from ._transport import SyncTransport
from .aio import AsyncAgentClient
from .errors import BulkheadError, HoldClosed
from .models import Agent, AuditEvent, RateLimit, Receipt, Settlement, Usage

__all__ = ["AgentAccount", "AgentClient", "Hold"]


class Hold:
    """An open hold: money reserved against every cap until it is captured or released.

    Use it as a context manager: leaving the block without a `capture` or `release` (an
    exception included) releases it.

    ```python
    with client.hold("1.00", scope="payments:write") as hold:
        hold.capture("0.40")
    ```
    """

    id: str
    """The hold's identifier (`hold_…`)."""
    amount: Decimal
    """The amount held."""
    expires_at: datetime | None
    """When the hold releases itself if it is still open."""
    remaining: Decimal | None
    """What is left of the window cap with this hold counted."""
    replayed: bool
    """Whether the server answered from its idempotency record (the hold was made once, earlier)."""
    settlement: Settlement | None
    """How the hold was closed by this object, once it was."""

    def __init__(self, client: AgentClient, data: Mapping[str, Any], *, replayed: bool = False) -> None:
        """A hold from the answer to `POST /v1/holds` (`AgentClient.hold` makes them)."""
        self._client = client
        self.id = str(data["id"])
        self.amount = parse_amount(data["amount"])
        self.expires_at = optional_time(data.get("expires_at"))
        remaining = data.get("remaining")
        self.remaining = parse_optional_amount(remaining.get("window")) if isinstance(remaining, dict) else None
        self.replayed = replayed
        self.settlement = None
        self.raw: Mapping[str, Any] = data

    @property
    def closed(self) -> bool:
        """Whether this object captured or released the hold."""
        return self.settlement is not None

    def capture(self, amount: Amount, *, idempotency_key: str | None = None) -> Settlement:
        """Charges `amount` (at most what is held) and releases the rest."""
        self.settlement = self._client.capture(self.id, amount, idempotency_key=idempotency_key)
        return self.settlement

    def release(self, *, idempotency_key: str | None = None) -> Settlement:
        """Releases the whole hold: nothing is charged."""
        self.settlement = self._client.release(self.id, idempotency_key=idempotency_key)
        return self.settlement

    def __enter__(self) -> Hold:
        """The hold itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Releases the hold unless it was captured or released in the block."""
        if self.closed:
            return
        try:
            self.release()
        except HoldClosed:
            pass  # expired, or closed by another holder of the id: nothing is reserved any more
        except BulkheadError:
            if exc_type is None:
                raise
            # The block's own exception matters more; the hold expires by itself.

    def __repr__(self) -> str:
        """The hold's id, amount and state."""
        state = "closed" if self.closed else "open"
        return f"Hold(id={self.id!r}, amount={self.amount!r}, {state})"


class AgentClient:
    """An agent's client: it carries that agent's key and nothing else.

    One pooled keep-alive connection set per client; share one client between threads. Money calls
    (`spend`, `hold`, `capture`, `release`) always send an `Idempotency-Key` and are retried with
    it after a connection failure, so a retry never charges twice.
    """

    def __init__(
        self,
        key: str,
        *,
        url: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        limits: httpx.Limits | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        """A client for the agent whose key is `key`.

        Args:
            key: the agent's key (`bk_…`).
            url: the server, else `BULKHEAD_URL`, else `http://127.0.0.1:8080`.
            timeout: seconds per request phase, or an `httpx.Timeout` (default: 5 s to connect,
                30 s for the rest).
            max_retries: how many times a failed request may be repeated (default 4).
            limits: the connection pool's `httpx.Limits`.
            http_client: an `httpx.Client` to use instead of a new one (not closed by `close`).
        """
        if not isinstance(key, str) or not key:
            raise ValueError("key must be the agent's key, a non-empty string")
        self._key = key
        self._url = resolve_url(url)
        self._options: dict[str, Any] = {"timeout": timeout, "max_retries": max_retries, "limits": limits}
        self._t = SyncTransport(
            self._url, timeout=timeout, max_retries=max_retries, limits=limits, http_client=http_client
        )

    @property
    def key(self) -> str:
        """The agent's key: give it to an OpenAI- or Anthropic-compatible client as `api_key`."""
        return self._key

    @property
    def url(self) -> str:
        """The server's base URL."""
        return self._url

    def base_url(self, upstream: str) -> str:
        """The gateway URL of a configured upstream: `{url}/proxy/{upstream}`."""
        return f"{self._url}/proxy/{upstream}"

    def spend(
        self,
        amount: Amount,
        *,
        scope: str,
        memo: str | None = None,
        idempotency_key: str | None = None,
    ) -> Receipt:
        """Spends `amount` under `scope`, or raises (`LimitExceeded`, `ScopeNotGranted`, …).

        Without `idempotency_key` the SDK makes one for this call; pass your own (e.g. an
        invoice number) to make a repeated call, even from another process, charge once.
        """
        c = call(
            "POST",
            "/v1/spend",
            self._key,
            spend_body(amount, scope, memo),
            retry=Retry.MONEY,
            idempotency_key=money_key(idempotency_key),
        )
        response = self._t.send(c)
        return Receipt.from_json(answer(response), replayed=replayed(response))

    def hold(
        self,
        amount: Amount,
        *,
        scope: str,
        expires_in: str | None = None,
        idempotency_key: str | None = None,
    ) -> Hold:
        """Reserves `amount` under `scope` until captured or released (default expiry 5m).

        The hold counts against every cap at once. Use the result as a context manager, so
        that it is released if it is not captured.
        """
        c = call(
            "POST",
            "/v1/holds",
            self._key,
            hold_body(amount, scope, expires_in),
            retry=Retry.MONEY,
            idempotency_key=money_key(idempotency_key),
        )
        response = self._t.send(c)
        return Hold(self, answer(response), replayed=replayed(response))

    def capture(self, hold_id: str, amount: Amount, *, idempotency_key: str | None = None) -> Settlement:
        """Charges `amount` of the hold `hold_id` and releases the rest."""
        c = call(
            "POST",
            f"/v1/holds/{quote_segment(hold_id)}/capture",
            self._key,
            {"amount": amount_text(amount)},
            retry=Retry.MONEY,
            idempotency_key=money_key(idempotency_key),
        )
        response = self._t.send(c)
        return Settlement.from_json(answer(response), replayed=replayed(response))

    def release(self, hold_id: str, *, idempotency_key: str | None = None) -> Settlement:
        """Releases the whole hold `hold_id`."""
        c = call(
            "POST",
            f"/v1/holds/{quote_segment(hold_id)}/release",
            self._key,
            {},
            retry=Retry.MONEY,
            idempotency_key=money_key(idempotency_key),
        )
        response = self._t.send(c)
        return Settlement.from_json(answer(response), replayed=replayed(response))

    def me(self) -> Agent:
        """This agent: its limits, status and usage (`GET /v1/me`)."""
        return Agent.from_json(self._t.json(call("GET", "/v1/me", self._key)))

    def me_audit(self, *, limit: int | None = None, after: int | None = None) -> list[AuditEvent]:
        """This agent's audit trail, oldest first; page with `limit` and `after` (a `seq`)."""
        data = self._t.json(call("GET", "/v1/me/audit", self._key, params=page_params(limit, after)))
        return [AuditEvent.from_json(e) for e in data.get("events", [])]

    def spawn(
        self,
        handle: str,
        scopes: Iterable[str],
        spending_cap: Amount,
        *,
        window: str | None = None,
        per_tx_limit: Amount | None = None,
        lifetime_cap: Amount | None = None,
        rate_limit: RateLimit | Mapping[str, Any] | None = None,
        expires_in: str | None = None,
        labels: Mapping[str, str] | None = None,
        breaker: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> AgentAccount:
        """Creates a child of this agent (its key needs the `spawn:agents` scope).

        The child's scopes must be covered by this agent's and its caps may not exceed them;
        every spend of the child also counts against this agent. The returned account can
        revoke the child with this agent's key.
        """
        body = agent_body(
            handle,
            scopes,
            spending_cap,
            window=window,
            per_tx_limit=per_tx_limit,
            lifetime_cap=lifetime_cap,
            rate_limit=rate_limit,
            expires_in=expires_in,
            labels=labels,
            breaker=breaker,
            enforce=None,
            extra=extra,
        )
        data = self._t.json(call("POST", "/v1/agents", self._key, body, retry=Retry.CONNECT))
        return AgentAccount._from_created(data, url=self._url, parent_key=self._key, options=self._options)

    def revoke(self, handle: str, *, reason: str | None = None) -> list[str]:
        """Revokes a descendant of this agent (and its subtree); returns every revoked handle."""
        return _revoke(self._t, self._key, handle, reason)

    def close(self) -> None:
        """Closes the client's pooled connections."""
        self._t.close()

    def __enter__(self) -> AgentClient:
        """The client itself; it is closed when the block ends."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Closes the client."""
        self.close()

    def __repr__(self) -> str:
        """The URL and a redacted key."""
        return f"AgentClient(url={self._url!r}, key={_redact(self._key)!r})"


def _redact(key: str | None) -> str | None:
    return None if key is None else key[:6] + "…"


def _revoke(t: SyncTransport, token: str | None, handle: str, reason: str | None) -> list[str]:
    body = {} if reason is None else {"reason": reason}
    data = t.json(call("POST", f"/v1/agents/{quote_segment(handle)}/revoke", token, body))
    return [str(h) for h in data.get("revoked", [])]


class AgentAccount:
    """An agent, as its creator sees it: its handle, its key, and the calls that manage it.

    `AgentAccount.create(...)` makes a new agent with the admin token; `AgentAccount.from_key`
    wraps a key a process was given; `AgentClient.spawn` makes a child. Admin calls use `url=`
    and `admin_token=`, else `BULKHEAD_URL` and `BULKHEAD_ADMIN_TOKEN`.
    """

    def __init__(
        self,
        handle: str,
        key: str | None = None,
        *,
        url: str | None = None,
        admin_token: str | None = None,
        parent_key: str | None = None,
        agent: Agent | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        limits: httpx.Limits | None = None,
    ) -> None:
        """An account for the existing agent `handle` (with its `key`, when known)."""
        self.handle = handle
        self._key = key
        self.url = resolve_url(url)
        self._admin_token = resolve_admin_token(admin_token)
        self._parent_key = parent_key
        self._agent = agent
        self._options: dict[str, Any] = {"timeout": timeout, "max_retries": max_retries, "limits": limits}
        self._transport: SyncTransport | None = None

    @classmethod
    def create(
        cls,
        handle: str,
        scopes: Iterable[str],
        spending_cap: Amount,
        *,
        window: str | None = None,
        per_tx_limit: Amount | None = None,
        lifetime_cap: Amount | None = None,
        rate_limit: RateLimit | Mapping[str, Any] | None = None,
        expires_in: str | None = None,
        labels: Mapping[str, str] | None = None,
        breaker: Mapping[str, Any] | None = None,
        enforce: bool | None = None,
        url: str | None = None,
        admin_token: str | None = None,
        extra: Mapping[str, Any] | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> AgentAccount:
        """Creates an agent with its own key (`POST /v1/agents`, with the admin token).

        Args:
            handle: 1–64 of `a-z 0-9 . _ -`, starting with a letter or digit.
            scopes: what the key may do, e.g. `["payments:write", "invoices:read"]`.
            spending_cap: the most it may spend per window.
            window: the cap's reset period (`"24h"` by default), `<n>s|m|h|d`.
            per_tx_limit: the most one spend or hold may be (default: the spending cap).
            lifetime_cap: the most it may ever spend (default: none).
            rate_limit: `RateLimit(60, "1m")` or `{"requests": 60, "per": "1m"}`.
            expires_in: when its key expires, e.g. `"30d"` (default: never).
            labels: free-form string labels.
            breaker: the runaway-loop breaker's settings, e.g. `{"denials": 10, "window": "30s"}`.
            enforce: `False` makes a shadow agent whose limits are only recorded.
            url: the server, else `BULKHEAD_URL`, else `http://127.0.0.1:8080`.
            admin_token: else `BULKHEAD_ADMIN_TOKEN`.
            extra: further fields of `POST /v1/agents`, sent as given.
            timeout: per request phase, seconds or an `httpx.Timeout`.
            max_retries: retries of failed requests.

        Returns:
            The account, with `.key` set: the credential is shown this once.
        """
        token = resolve_admin_token(admin_token)
        if token is None:
            raise ValueError("creating an agent needs the admin token: pass admin_token= or set BULKHEAD_ADMIN_TOKEN")
        body = agent_body(
            handle,
            scopes,
            spending_cap,
            window=window,
            per_tx_limit=per_tx_limit,
            lifetime_cap=lifetime_cap,
            rate_limit=rate_limit,
            expires_in=expires_in,
            labels=labels,
            breaker=breaker,
            enforce=enforce,
            extra=extra,
        )
        options: dict[str, Any] = {"timeout": timeout, "max_retries": max_retries, "limits": None}
        account = cls(handle, url=url, admin_token=token, **options)
        data = account._t().json(call("POST", "/v1/agents", token, body, retry=Retry.CONNECT))
        account._key = str(data["key"])
        account._agent = Agent.from_json(data)
        return account

    @classmethod
    def from_key(cls, key: str, url: str | None = None, *, admin_token: str | None = None) -> AgentAccount:
        """The account of the agent whose key is `key` (its handle read with `GET /v1/me`)."""
        account = cls("", key, url=url, admin_token=admin_token)
        agent = account.refresh()
        account.handle = agent.handle
        return account

    @classmethod
    def _from_created(
        cls, data: Mapping[str, Any], *, url: str, parent_key: str | None, options: Mapping[str, Any]
    ) -> AgentAccount:
        agent = Agent.from_json(data)
        return cls(agent.handle, str(data["key"]), url=url, parent_key=parent_key, agent=agent, **options)

    @property
    def key(self) -> str:
        """The agent's key (`bk_…`)."""
        if self._key is None:
            raise ValueError(f"the key of {self.handle!r} is not known to this account")
        return self._key

    @property
    def agent(self) -> Agent | None:
        """The agent object as last read (at creation, or by `refresh`)."""
        return self._agent

    def client(self, **options: Any) -> AgentClient:
        """A client carrying this agent's key (options as for `AgentClient`)."""
        return AgentClient(self.key, url=self.url, **{**self._options, **options})

    def async_client(self, **options: Any) -> AsyncAgentClient:
        """An asyncio client carrying this agent's key (options as for `AsyncAgentClient`)."""
        return AsyncAgentClient(self.key, url=self.url, **{**self._options, **options})

    def refresh(self) -> Agent:
        """Reads the agent again: with the admin token if there is one, else with its own key."""
        if self._admin_token is not None and self.handle:
            data = self._t().json(call("GET", f"/v1/agents/{quote_segment(self.handle)}", self._admin_token))
        elif self._key is not None:
            data = self._t().json(call("GET", "/v1/me", self._key))
        else:
            data = self._t().json(call("GET", f"/v1/agents/{quote_segment(self.handle)}", self._parent_key))
        self._agent = Agent.from_json(data)
        return self._agent

    def usage(self) -> Usage:
        """The agent's usage now (its descendants' spends and holds included)."""
        usage = self.refresh().usage
        if usage is None:
            raise BulkheadError("the agent object has no usage", code="invalid_response")
        return usage

    def audit(self, *, limit: int | None = None, after: int | None = None) -> list[AuditEvent]:
        """The agent's audit trail (admin token, else its own key), oldest first."""
        if self._admin_token is not None:
            path = f"/v1/agents/{quote_segment(self.handle)}/audit"
            c = call("GET", path, self._admin_token, params=page_params(limit, after))
        else:
            c = call("GET", "/v1/me/audit", self.key, params=page_params(limit, after))
        return [AuditEvent.from_json(e) for e in self._t().json(c).get("events", [])]

    def revoke(self, *, reason: str | None = None) -> list[str]:
        """Revokes the agent and every descendant; returns their handles.

        Uses the admin token, else (for a spawned child) its parent's key. Idempotent.
        """
        return _revoke(self._t(), self._manager(), self.handle, reason)

    def suspend(self, *, reason: str | None = None) -> Agent:
        """Suspends the agent and its subtree (403 `agent_suspended`) until `resume` (admin)."""
        body = {} if reason is None else {"reason": reason}
        path = f"/v1/agents/{quote_segment(self.handle)}/suspend"
        self._agent = Agent.from_json(self._t().json(call("POST", path, self._manager(), body)))
        return self._agent

    def resume(self) -> Agent:
        """Lifts a suspension (admin)."""
        path = f"/v1/agents/{quote_segment(self.handle)}/resume"
        self._agent = Agent.from_json(self._t().json(call("POST", path, self._manager(), {})))
        return self._agent

    def rotate_key(self) -> str:
        """Gives the agent a new key (the old one stops working at once) and returns it (admin)."""
        path = f"/v1/agents/{quote_segment(self.handle)}/keys"
        data = self._t().json(call("POST", path, self._manager(), {}, retry=Retry.CONNECT))
        self._key = str(data["key"])
        return self._key

    def update(self, **fields: Any) -> Agent:
        """Changes caps, window, scopes, rate limit, labels, … (`PATCH`, admin); amounts exact.

        Example: `account.update(spending_cap="75.00", labels={"team": "billing"})`.
        """
        body: dict[str, Any] = {}
        for name, value in fields.items():
            if isinstance(value, RateLimit):
                body[name] = value.to_json()
            elif name in ("spending_cap", "per_tx_limit", "lifetime_cap") and value is not None:
                body[name] = amount_text(value, name=name)
            else:
                body[name] = value
        path = f"/v1/agents/{quote_segment(self.handle)}"
        self._agent = Agent.from_json(self._t().json(call("PATCH", path, self._manager(), body)))
        return self._agent

    def close(self) -> None:
        """Closes the connections of the account's own admin calls."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def __enter__(self) -> AgentAccount:
        """The account itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Closes the account's connections (the agent stays; `revoke` ends it)."""
        self.close()

    def __repr__(self) -> str:
        """The handle, URL and a redacted key."""
        return f"AgentAccount(handle={self.handle!r}, url={self.url!r}, key={_redact(self._key)!r})"

    def _manager(self) -> str | None:
        return self._admin_token or self._parent_key or self._key

    def _t(self) -> SyncTransport:
        if self._transport is None:
            opts = self._options
            self._transport = SyncTransport(
                self.url, timeout=opts["timeout"], max_retries=opts["max_retries"], limits=opts["limits"]
            )
        return self._transport
