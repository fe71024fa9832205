"""A real `bulkhead serve` whose gateway forwards to the scripted LLM upstream, and what tests read from it.

The scripted upstream is the only stand-in: the framework, its OpenAI model client, the SDK and
the server are the real ones, talking real HTTP.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from bulkhead import AgentAccount
from support import llm_upstream
from support import server as support_server
from support.util import unique_handle

UPSTREAM_SECRET = "sk-upstream-secret-0123456789"
INPUT_PER_MILLION = Decimal("1.00")
OUTPUT_PER_MILLION = Decimal("2.00")
PRICE_PER_CALL = (
    llm_upstream.PROMPT_TOKENS * INPUT_PER_MILLION + llm_upstream.COMPLETION_TOKENS * OUTPUT_PER_MILLION
) / 1_000_000
"""What the gateway meters for one scripted answer: 100 tokens in, 20 out."""


def gateway_config(llm_url: str) -> str:
    pricing = (
        f'{{ kind = "openai_usage", input_per_million = "{INPUT_PER_MILLION}", '
        f'output_per_million = "{OUTPUT_PER_MILLION}" }}'
    )
    return f"""
[[upstream]]
name = "openai"
base_url = "{llm_url}"
scope = "llm:openai"
secret_env = "UPSTREAM_OPENAI_SECRET"
max_cost_per_request = "0.05"
pricing = {pricing}
"""


@dataclass
class Gateway:
    """The server, the scripted upstream behind it and what the upstream received."""

    server: support_server.Server
    llm_url: str
    calls: list[dict[str, Any]]

    def account(self, prefix: str, scopes: list[str], spending_cap: str, **fields: Any) -> AgentAccount:
        """A new agent with its own key (a unique handle starting with `prefix`)."""
        return AgentAccount.create(
            unique_handle(prefix),
            scopes,
            spending_cap,
            url=self.server.url,
            admin_token=self.server.admin_token,
            **fields,
        )

    def audit(self, handle: str) -> list[dict[str, Any]]:
        """`GET /v1/agents/{handle}/audit` with the admin token: the agent's events, oldest first."""
        request = urllib.request.Request(
            f"{self.server.url}/v1/agents/{handle}/audit?limit=1000",
            headers={"Authorization": f"Bearer {self.server.admin_token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            events: list[dict[str, Any]] = json.load(response)["events"]
        return events

    def calls_of(self, marker: str) -> list[dict[str, Any]]:
        """The upstream calls whose system text names `marker` (each agent's handle)."""
        return [c for c in list(self.calls) if marker in _system_text(c.get("body"))]


def _system_text(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    texts = [
        json.dumps(m.get("content"))
        for m in body.get("messages") or []
        if isinstance(m, dict) and m.get("role") in ("system", "developer")
    ]
    return "\n".join(texts)


def wait_for(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Polls `condition` until it returns something truthy, which it returns."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)


def spends(events: list[dict[str, Any]], scope: str) -> list[tuple[str, str | None, str | None]]:
    return [(e["outcome"], e["reason"], e["amount"]) for e in events if e["action"] == "spend" and e["scope"] == scope]


def gateway_calls_settled(events: list[dict[str, Any]]) -> int:
    return sum(
        int(e["detail"]["calls"])
        for e in events
        if e["action"] == "capture" and (e.get("detail") or {}).get("by") == "gateway"
    )


def settled(gateway: Gateway, account: AgentAccount, calls: int) -> bool:
    """Whether the gateway has settled `calls` LLM calls of the agent and holds nothing more for it."""
    return gateway_calls_settled(gateway.audit(account.handle)) == calls and account.usage().window_held == 0


def assert_upstream_saw_only_the_secret(calls: list[dict[str, Any]]) -> None:
    assert calls
    for call in calls:
        assert call["headers"]["authorization"] == f"Bearer {UPSTREAM_SECRET}"
        assert "bk_" not in json.dumps(call["headers"]) + json.dumps(call["body"])


def start_gateway(config: Callable[[str], str] = gateway_config) -> Iterator[Gateway]:
    """Runs the scripted upstream and a server whose `openai` upstream forwards to it.

    `config(llm_url)` is the server's TOML; its `secret_env` is `UPSTREAM_OPENAI_SECRET` or
    `OPENAI_API_KEY`, both set to `UPSTREAM_SECRET`.
    """
    llm_url, stop_llm, calls = llm_upstream.start()
    try:
        env = {"UPSTREAM_OPENAI_SECRET": UPSTREAM_SECRET, "OPENAI_API_KEY": UPSTREAM_SECRET}
        with support_server.start(config=config(llm_url), env=env) as server:
            yield Gateway(server, llm_url, calls)
    finally:
        stop_llm()


def example_config(llm_url: str) -> str:
    """The examples' own `examples/python/bulkhead.toml`, its upstream moved to `llm_url`."""
    text = (support_server.REPO / "examples" / "python" / "bulkhead.toml").read_text()
    moved = re.sub(r'(?m)^base_url = "http://127\.0\.0\.1:9100"$', f'base_url = "{llm_url}"', text)
    assert moved != text, "examples/python/bulkhead.toml no longer points at the scripted upstream"
    return moved
