"""The asyncio twin of the SDK: `AsyncAgentClient`, `AsyncHold` and `AsyncAgentAccount`."""

from __future__ import annotations

from collections.abc import Awaitable, Generator, Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Any

import httpx

from ._amounts import Amount, amount_text, parse_amount, parse_optional_amount
from ._core import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    Call,
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
from ._transport import AsyncTransport
from .errors import BulkheadError, HoldClosed
from .models import Agent, AuditEvent, RateLimit, Receipt, Settlement, Usage

__all__ = ["AsyncAgentAccount", "AsyncAgentClient", "AsyncHold", "AsyncHoldRequest"]


class AsyncHold:
    """An open hold (asyncio): reserved against every cap until captured or released.

    As an async context manager, leaving the block without `capture` or `release` (an
    exception included) releases it.
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

    def __init__(self, client: AsyncAgentClient, data: Mapping[str, Any], *, replayed: bool = False) -> None:
        """A hold from the answer to `POST /v1/holds` (`AsyncAgentClient.hold` makes them)."""
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

    async def capture(self, amount: Amount, *, idempotency_key: str | None = None) -> Settlement:
        """Charges `amount` (at most what is held) and releases the rest."""
        self.settlement = await self._client.capture(self.id, amount, idempotency_key=idempotency_key)
        return self.settlement

    async def release(self, *, idempotency_key: str | None = None) -> Settlement:
        """Releases the whole hold: nothing is charged."""
        self.settlement = await self._client.release(self.id, idempotency_key=idempotency_key)
        return self.settlement

    async def __aenter__(self) -> AsyncHold:
        """The hold itself."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Releases the hold unless it was captured or released in the block."""
        if self.closed:
            return
        try:
            await self.release()
        except HoldClosed:
            pass  # expired, or closed by another holder of the id: nothing is reserved any more
        except BulkheadError:
            if exc_type is None:
                raise

    def __repr__(self) -> str:
        """The hold's id, amount and state."""
        state = "closed" if self.closed else "open"
        return f"AsyncHold(id={self.id!r}, amount={self.amount!r}, {state})"


class AsyncHoldRequest(Awaitable[AsyncHold]):
    """A hold being requested: `await` it for the `AsyncHold`, or use it with `async with`.

    The request is made once, with one idempotency key, however it is awaited.
    """

    def __init__(self, client: AsyncAgentClient, c: Call) -> None:
        """A request for a hold (`AsyncAgentClient.hold` makes them)."""
        self._client = client
        self._call = c
        self._hold: AsyncHold | None = None

    async def _get(self) -> AsyncHold:
        if self._hold is None:
            response = await self._client._t.send(self._call)
            self._hold = AsyncHold(self._client, answer(response), replayed=replayed(response))
        return self._hold

    def __await__(self) -> Generator[Any, None, AsyncHold]:
        """Makes the hold and returns it."""
        return self._get().__await__()

    async def __aenter__(self) -> AsyncHold:
        """Makes the hold and returns it."""
        return await self._get()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Releases the hold unless it was captured or released in the block."""
        if self._hold is not None:
            await self._hold.__aexit__(exc_type, exc, tb)


class AsyncAgentClient:
    """An agent's asyncio client: it carries that agent's key and nothing else.

    The twin of `AgentClient`: the same calls, awaited. Money calls always send an
    `Idempotency-Key` and are retried with it after a connection failure.
    """

    def __init__(
        self,
        key: str,
        *,
        url: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        limits: httpx.Limits | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        """A client for the agent whose key is `key` (arguments as for `AgentClient`)."""
        if not isinstance(key, str) or not key:
            raise ValueError("key must be the agent's key, a non-empty string")
        self._key = key
        self._url = resolve_url(url)
        self._options: dict[str, Any] = {"timeout": timeout, "max_retries": max_retries, "limits": limits}
        self._t = AsyncTransport(
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

    async def spend(
        self,
        amount: Amount,
        *,
        scope: str,
        memo: str | None = None,
        idempotency_key: str | None = None,
    ) -> Receipt:
        """Spends `amount` under `scope`, or raises (`LimitExceeded`, `ScopeNotGranted`, …)."""
        c = call(
            "POST",
            "/v1/spend",
            self._key,
            spend_body(amount, scope, memo),
            retry=Retry.MONEY,
            idempotency_key=money_key(idempotency_key),
        )
        response = await self._t.send(c)
        return Receipt.from_json(answer(response), replayed=replayed(response))

    def hold(
        self,
        amount: Amount,
        *,
        scope: str,
        expires_in: str | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncHoldRequest:
        """Reserves `amount` under `scope`: `hold = await client.hold(...)` or `async with client.hold(...)`.

        The amount is checked at once (a `ValueError` before anything is sent).
        """
        c = call(
            "POST",
            "/v1/holds",
            self._key,
            hold_body(amount, scope, expires_in),
            retry=Retry.MONEY,
            idempotency_key=money_key(idempotency_key),
        )
        return AsyncHoldRequest(self, c)

    async def capture(self, hold_id: str, amount: Amount, *, idempotency_key: str | None = None) -> Settlement:
        """Charges `amount` of the hold `hold_id` and releases the rest."""
        c = call(
            "POST",
            f"/v1/holds/{quote_segment(hold_id)}/capture",
            self._key,
            {"amount": amount_text(amount)},
            retry=Retry.MONEY,
            idempotency_key=money_key(idempotency_key),
        )
        response = await self._t.send(c)
        return Settlement.from_json(answer(response), replayed=replayed(response))

    async def release(self, hold_id: str, *, idempotency_key: str | None = None) -> Settlement:
        """Releases the whole hold `hold_id`."""
        c = call(
            "POST",
            f"/v1/holds/{quote_segment(hold_id)}/release",
            self._key,
            {},
            retry=Retry.MONEY,
            idempotency_key=money_key(idempotency_key),
        )
        response = await self._t.send(c)
        return Settlement.from_json(answer(response), replayed=replayed(response))

    async def me(self) -> Agent:
        """This agent: its limits, status and usage (`GET /v1/me`)."""
        return Agent.from_json(await self._t.json(call("GET", "/v1/me", self._key)))

    async def me_audit(self, *, limit: int | None = None, after: int | None = None) -> list[AuditEvent]:
        """This agent's audit trail, oldest first; page with `limit` and `after` (a `seq`)."""
        data = await self._t.json(call("GET", "/v1/me/audit", self._key, params=page_params(limit, after)))
        return [AuditEvent.from_json(e) for e in data.get("events", [])]

    async def spawn(
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
    ) -> AsyncAgentAccount:
        """Creates a child of this agent (its key needs `spawn:agents`); see `AgentClient.spawn`."""
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
        data = await self._t.json(call("POST", "/v1/agents", self._key, body, retry=Retry.CONNECT))
        agent = Agent.from_json(data)
        return AsyncAgentAccount(
            agent.handle, str(data["key"]), url=self._url, parent_key=self._key, agent=agent, **self._options
        )

    async def revoke(self, handle: str, *, reason: str | None = None) -> list[str]:
        """Revokes a descendant of this agent (and its subtree); returns every revoked handle."""
        return await _revoke(self._t, self._key, handle, reason)

    async def aclose(self) -> None:
        """Closes the client's pooled connections."""
        await self._t.aclose()

    async def close(self) -> None:
        """Closes the client's pooled connections (the same as `aclose`)."""
        await self._t.aclose()

    async def __aenter__(self) -> AsyncAgentClient:
        """The client itself; it is closed when the block ends."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Closes the client."""
        await self.aclose()

    def __repr__(self) -> str:
        """The URL and a redacted key."""
        return f"AsyncAgentClient(url={self._url!r}, key={self._key[:6] + '…'!r})"


async def _revoke(t: AsyncTransport, token: str | None, handle: str, reason: str | None) -> list[str]:
    body = {} if reason is None else {"reason": reason}
    data = await t.json(call("POST", f"/v1/agents/{quote_segment(handle)}/revoke", token, body))
    return [str(h) for h in data.get("revoked", [])]


class AsyncAgentAccount:
    """An agent, as its creator sees it (asyncio): the twin of `AgentAccount`.

    `await AsyncAgentAccount.create(...)`, `await AsyncAgentAccount.from_key(key)`, or
    `await client.spawn(...)`.
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
        self._transport: AsyncTransport | None = None

    @classmethod
    async def create(
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
    ) -> AsyncAgentAccount:
        """Creates an agent with its own key; the arguments are those of `AgentAccount.create`."""
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
        account = cls(handle, url=url, admin_token=token, timeout=timeout, max_retries=max_retries)
        data = await account._t().json(call("POST", "/v1/agents", token, body, retry=Retry.CONNECT))
        account._key = str(data["key"])
        account._agent = Agent.from_json(data)
        return account

    @classmethod
    async def from_key(cls, key: str, url: str | None = None, *, admin_token: str | None = None) -> AsyncAgentAccount:
        """The account of the agent whose key is `key` (its handle read with `GET /v1/me`)."""
        account = cls("", key, url=url, admin_token=admin_token)
        agent = await account.refresh()
        account.handle = agent.handle
        return account

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

    def client(self, **options: Any) -> AsyncAgentClient:
        """An asyncio client carrying this agent's key (options as for `AsyncAgentClient`)."""
        return AsyncAgentClient(self.key, url=self.url, **{**self._options, **options})

    def async_client(self, **options: Any) -> AsyncAgentClient:
        """The same as `client`: an asyncio client carrying this agent's key."""
        return self.client(**options)

    async def refresh(self) -> Agent:
        """Reads the agent again: with the admin token if there is one, else with its own key."""
        if self._admin_token is not None and self.handle:
            c = call("GET", f"/v1/agents/{quote_segment(self.handle)}", self._admin_token)
        elif self._key is not None:
            c = call("GET", "/v1/me", self._key)
        else:
            c = call("GET", f"/v1/agents/{quote_segment(self.handle)}", self._parent_key)
        self._agent = Agent.from_json(await self._t().json(c))
        return self._agent

    async def usage(self) -> Usage:
        """The agent's usage now (its descendants' spends and holds included)."""
        usage = (await self.refresh()).usage
        if usage is None:
            raise BulkheadError("the agent object has no usage", code="invalid_response")
        return usage

    async def audit(self, *, limit: int | None = None, after: int | None = None) -> list[AuditEvent]:
        """The agent's audit trail (admin token, else its own key), oldest first."""
        if self._admin_token is not None:
            path = f"/v1/agents/{quote_segment(self.handle)}/audit"
            c = call("GET", path, self._admin_token, params=page_params(limit, after))
        else:
            c = call("GET", "/v1/me/audit", self.key, params=page_params(limit, after))
        return [AuditEvent.from_json(e) for e in (await self._t().json(c)).get("events", [])]

    async def revoke(self, *, reason: str | None = None) -> list[str]:
        """Revokes the agent and every descendant; returns their handles (see `AgentAccount.revoke`)."""
        return await _revoke(self._t(), self._manager(), self.handle, reason)

    async def suspend(self, *, reason: str | None = None) -> Agent:
        """Suspends the agent and its subtree until `resume` (admin)."""
        body = {} if reason is None else {"reason": reason}
        path = f"/v1/agents/{quote_segment(self.handle)}/suspend"
        self._agent = Agent.from_json(await self._t().json(call("POST", path, self._manager(), body)))
        return self._agent

    async def resume(self) -> Agent:
        """Lifts a suspension (admin)."""
        path = f"/v1/agents/{quote_segment(self.handle)}/resume"
        self._agent = Agent.from_json(await self._t().json(call("POST", path, self._manager(), {})))
        return self._agent

    async def rotate_key(self) -> str:
        """Gives the agent a new key (the old one stops working at once) and returns it (admin)."""
        path = f"/v1/agents/{quote_segment(self.handle)}/keys"
        data = await self._t().json(call("POST", path, self._manager(), {}, retry=Retry.CONNECT))
        self._key = str(data["key"])
        return self._key

    async def update(self, **fields: Any) -> Agent:
        """Changes caps, window, scopes, rate limit, labels, … (`PATCH`, admin); amounts exact."""
        body: dict[str, Any] = {}
        for name, value in fields.items():
            if isinstance(value, RateLimit):
                body[name] = value.to_json()
            elif name in ("spending_cap", "per_tx_limit", "lifetime_cap") and value is not None:
                body[name] = amount_text(value, name=name)
            else:
                body[name] = value
        path = f"/v1/agents/{quote_segment(self.handle)}"
        self._agent = Agent.from_json(await self._t().json(call("PATCH", path, self._manager(), body)))
        return self._agent

    async def aclose(self) -> None:
        """Closes the connections of the account's own admin calls."""
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None

    async def __aenter__(self) -> AsyncAgentAccount:
        """The account itself."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Closes the account's connections (the agent stays; `revoke` ends it)."""
        await self.aclose()

    def __repr__(self) -> str:
        """The handle, URL and a redacted key."""
        key = None if self._key is None else self._key[:6] + "…"
        return f"AsyncAgentAccount(handle={self.handle!r}, url={self.url!r}, key={key!r})"

    def _manager(self) -> str | None:
        return self._admin_token or self._parent_key or self._key

    def _t(self) -> AsyncTransport:
        if self._transport is None:
            opts = self._options
            self._transport = AsyncTransport(
                self.url, timeout=opts["timeout"], max_retries=opts["max_retries"], limits=opts["limits"]
            )
        return self._transport
