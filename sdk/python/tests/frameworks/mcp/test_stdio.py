"""A local MCP server over stdio (the official SDK's stdio transport), started by Bulkhead and
served at /mcp/local under the same rules; restarted when it dies."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from mcp.shared.exceptions import MCPError

from conftest import PRICES, Gateway, audit_when, connect, settled

MODES = ["auto", "legacy"]


@pytest.mark.parametrize("mode", MODES)
def test_a_stdio_server_is_listed_called_and_charged(gateway: Gateway, mode: str) -> None:
    agent = gateway.account(["mcp.local:search", "mcp.local:echo"])
    marker = uuid.uuid4().hex
    up = gateway.upstreams["local"]

    async def run() -> tuple[list[str], str, str, MCPError]:
        async with connect(gateway.mcp_url("local"), agent.key, mode) as c:
            listed = sorted(t.name for t in (await c.list_tools()).tools)
            found = (await c.call_tool("search", {"query": marker})).content[0].text  # type: ignore[union-attr]
            echoed = (await c.call_tool("echo", {"text": marker})).content[0].text  # type: ignore[union-attr]
            with pytest.raises(MCPError) as denied:
                await c.call_tool("charge_card", {"amount": "3", "marker": marker})
            return listed, found, echoed, denied.value

    listed, found, echoed, denied = asyncio.run(run())
    assert listed == ["echo", "search"]
    assert found == f"results for {marker}"
    assert echoed == marker
    assert denied.error.data["code"] == "scope_not_granted"  # type: ignore[index]
    assert [c["tool"] for c in up.tool_calls() if marker in str(c["args"])] == ["search", "echo"]
    usage = settled(agent)
    assert usage.lifetime_spent == PRICES["search"]
    assert usage.window_held == 0
    # Each call audited once with its tool and price; the denied one with its reason.
    events = audit_when(agent, lambda ev: len([e for e in ev if e.action == "capture"]) >= 2)
    captured = sorted((e.scope, e.amount) for e in events if e.action == "capture")
    assert captured == [("mcp.local:echo", 0), ("mcp.local:search", PRICES["search"])]
    denied = [(e.scope, e.reason) for e in events if e.outcome == "denied"]
    assert denied == [("mcp.local:charge_card", "scope_not_granted")]


def test_concurrent_agents_share_one_stdio_server(gateway: Gateway) -> None:
    agents = [gateway.account(["mcp.local:search"]) for _ in range(4)]

    async def one(key: str, i: int) -> list[str]:
        async with connect(gateway.mcp_url("local"), key) as c:
            return [
                (await c.call_tool("search", {"query": f"a{i}-{j}"})).content[0].text  # type: ignore[union-attr]
                for j in range(5)
            ]

    async def all_of_them() -> list[list[str]]:
        return await asyncio.gather(*(one(a.key, i) for i, a in enumerate(agents)))

    results = asyncio.run(all_of_them())
    # Every answer went back to the agent that asked.
    assert results == [[f"results for a{i}-{j}" for j in range(5)] for i in range(4)]
    for a in agents:
        assert settled(a).lifetime_spent == 5 * PRICES["search"]


def test_a_stdio_server_that_dies_is_restarted_and_the_call_that_killed_it_is_paid(gateway: Gateway) -> None:
    agent = gateway.account(["mcp.local:*"])
    marker = uuid.uuid4().hex

    async def pid() -> str:
        async with connect(gateway.mcp_url("local"), agent.key) as c:
            return str((await c.call_tool("pid", {})).content[0].text)  # type: ignore[union-attr]

    async def crash() -> None:
        async with connect(gateway.mcp_url("local"), agent.key) as c:
            with pytest.raises(MCPError):
                await c.call_tool("crash", {"marker": marker})

    first = asyncio.run(pid())
    asyncio.run(crash())
    # The process is started again; calls made while it restarts are refused, free.
    deadline = time.monotonic() + 30
    second = None
    while time.monotonic() < deadline:
        try:
            second = asyncio.run(pid())
            break
        except Exception:  # refused while it restarts (the handshake or the call)
            time.sleep(0.1)
    assert second is not None
    assert second != first
    # The crashing call was sent, so it was charged (crash is priced 0.50); pid is free.
    assert settled(agent).lifetime_spent == PRICES["charge_card"] / 2
