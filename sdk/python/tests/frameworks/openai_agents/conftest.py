"""Fixtures for the OpenAI Agents SDK integration's tests: a scripted LLM behind a real gateway.

`llm_upstream` plays the model; a `bulkhead serve` (one per module) forwards `/proxy/openai/…` to
it with the real secret and meters each call. `harness` makes agents on that server and reads
back what each of them did: its model calls at the upstream, its usage once settled, its audit.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from agents import set_tracing_disabled

from bulkhead import AgentAccount
from support import llm_upstream
from support import server as support_server
from support.util import unique_handle

TOOL_SCOPE = "tools:search"
SCOPES = ["llm:openai", TOOL_SCOPE]


def pytest_configure(config: pytest.Config) -> None:
    """No traces: the Agents SDK would export them to OpenAI's servers with the default key."""
    del config
    set_tracing_disabled(True)


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """The scripted LLM: its URL and the live list of requests it received."""
    url, stop, calls = llm_upstream.start()
    yield url, calls
    stop()


@pytest.fixture(scope="module")
def gateway(upstream: tuple[str, list[dict[str, Any]]]) -> Iterator[support_server.Server]:
    """A `bulkhead serve` whose upstream `openai` is the scripted LLM."""
    url, _ = upstream
    with support_server.start(
        config=llm_upstream.gateway_config(url), env={llm_upstream.SECRET_ENV: llm_upstream.SECRET}
    ) as server:
        yield server


class Harness:
    """Agents on the gateway, and what the server and the upstream saw of each."""

    def __init__(self, server: support_server.Server, calls: list[dict[str, Any]]) -> None:
        self.server = server
        self.calls = calls
        self.accounts: list[AgentAccount] = []

    def account(self, prefix: str, spending_cap: str, scopes: list[str] | None = None) -> AgentAccount:
        """A new agent with its own key (scopes: the model's and the tool's)."""
        account = AgentAccount.create(
            handle=unique_handle(prefix),
            scopes=scopes or SCOPES,
            spending_cap=spending_cap,
            url=self.server.url,
            admin_token=self.server.admin_token,
        )
        self.accounts.append(account)
        return account

    def llm_calls(self, handle: str) -> list[dict[str, Any]]:
        """The upstream requests of the agent whose task names `handle`."""
        return [c for c in list(self.calls) if handle in json.dumps(c["body"])]

    def settled(self, account: AgentAccount, llm_calls: int, tool_spend: Decimal) -> Any:
        """Waits until the agent's usage is exactly its model calls' price plus `tool_spend`.

        Gateway calls settle ~25 ms after their answers, and a lease's unused slots go back
        within a second; until then they count as held.
        """
        expected = llm_calls * llm_upstream.cost_per_call() + tool_spend
        seen: list[Any] = []

        def done() -> bool:
            usage = account.usage()
            seen[:] = [usage]
            return usage.window_held == 0 and usage.window_spent == expected

        deadline = time.monotonic() + 10
        while not done():
            if time.monotonic() > deadline:
                pytest.fail(f"{account.handle}: usage {seen[0]} never settled at {expected}")
            time.sleep(0.02)
        return seen[0]

    def audit(self, handle: str) -> list[dict[str, Any]]:
        """`GET /v1/agents/{handle}/audit` with the admin token: the raw events."""
        request = urllib.request.Request(
            f"{self.server.url}/v1/agents/{handle}/audit?limit=1000",
            headers={"Authorization": f"Bearer {self.server.admin_token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            events: list[dict[str, Any]] = json.load(answer)["events"]
        return events

    def assert_upstream_saw_only_the_secret(self) -> None:
        """Every request reached the upstream with the real secret and no agent key anywhere."""
        assert self.calls, "the upstream saw no request"
        for call in list(self.calls):
            assert call["headers"].get("authorization") == f"Bearer {llm_upstream.SECRET}"
            assert "bk_" not in json.dumps(call), f"an agent key reached the upstream: {call['path']}"

    def close(self) -> None:
        for account in self.accounts:
            account.close()


@pytest.fixture
def harness(gateway: support_server.Server, upstream: tuple[str, list[dict[str, Any]]]) -> Iterator[Harness]:
    """A `Harness` on this module's gateway."""
    h = Harness(gateway, upstream[1])
    yield h
    h.close()
