"""The MCP gateway with the official MCP SDK on both sides: filtered listing, prices, caps,
scopes, revocation, the upstream's secret, over JSON and SSE, stateless and with sessions."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import httpx2
import pytest
from mcp.shared.exceptions import MCPError

from conftest import HELD, HTTP_SERVERS, PRICES, SECRET, Gateway, audit_when, connect, settled

# Each HTTP server with the client's default negotiation; the session server also with the
# 2025 handshake (`initialize`, `Mcp-Session-Id`).
CASES = [(name, "auto") for name in HTTP_SERVERS] + [("tools-sess", "legacy")]
IDS = [f"{n}-{m}" for n, m in CASES]


def names(result: object) -> list[str]:
    return sorted(t.name for t in result.tools)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("server", "mode"), CASES, ids=IDS)
def test_listing_shows_only_the_tools_the_key_covers(gateway: Gateway, server: str, mode: str) -> None:
    one = gateway.account([f"mcp.{server}:search"])
    whole = gateway.account([f"mcp.{server}:*"])
    other = gateway.account(["mcp.elsewhere:*", "payments:write"])

    async def listed(key: str) -> list[str]:
        async with connect(gateway.mcp_url(server), key, mode) as c:
            return names(await c.list_tools())

    assert asyncio.run(listed(one.key)) == ["search"]
    # The whole server, but never a tool whose name no scope can name (`WebSearch`).
    assert asyncio.run(listed(whole.key)) == ["charge_card", "echo", "search"]
    assert asyncio.run(listed(other.key)) == []
    # Listing is free.
    assert settled(whole).lifetime_spent == 0


@pytest.mark.parametrize(("server", "mode"), CASES, ids=IDS)
def test_calls_are_charged_their_price_exactly(gateway: Gateway, server: str, mode: str) -> None:
    agent = gateway.account([f"mcp.{server}:*"])
    marker = uuid.uuid4().hex

    async def run() -> list[str]:
        out = []
        async with connect(gateway.mcp_url(server), agent.key, mode) as c:
            for i in range(3):
                r = await c.call_tool("search", {"query": f"{marker}-{i}"})
                out.append(r.content[0].text)  # type: ignore[union-attr]
            r = await c.call_tool("charge_card", {"amount": "5", "marker": marker})
            out.append(r.content[0].text)  # type: ignore[union-attr]
            r = await c.call_tool("echo", {"text": marker})  # no price of its own: default 0.00
            out.append(r.content[0].text)  # type: ignore[union-attr]
        return out

    out = asyncio.run(run())
    assert out == [f"results for {marker}-0", f"results for {marker}-1", f"results for {marker}-2", "charged 5", marker]
    usage = settled(agent)
    assert usage.window_held == 0
    assert usage.lifetime_spent == 3 * PRICES["search"] + PRICES["charge_card"]
    assert usage.window_spent == Decimal("1.006")
    calls = [(f"mcp.{server}:{t}", PRICES.get(t, Decimal(0))) for t in ["search"] * 3 + ["charge_card", "echo"]]
    # One audit event per call, naming the server and the tool in its scope, with its price:
    # by default each call's capture (written when its lease's calls are settled)...
    per_call = "hold" if server in HELD else "capture"
    events = audit_when(agent, lambda ev: len([e for e in ev if e.action == per_call]) >= len(calls))
    holds = [e for e in events if e.action == "hold"]
    captures = [e for e in events if e.action == "capture"]
    assert all(e.outcome == "allowed" for e in holds + captures)
    audited = [e for e in events if e.action == per_call]
    assert sorted((e.scope, e.amount) for e in audited) == sorted(calls), [e.raw for e in events]
    if server in HELD:
        # ...with `leases = false`, each call's own hold, in call order.
        assert [(e.scope, e.amount) for e in holds] == calls
    else:
        # ...and the grants of the leases the calls took slots of (per key and tool).
        assert {e.scope for e in holds} == {s for s, _ in calls}
    # Nothing of the arguments is in the audit trail.
    assert all(marker not in str(e.raw) for e in events)


@pytest.mark.parametrize(("server", "mode"), CASES, ids=IDS)
def test_a_loop_of_paid_calls_stops_at_the_cap(gateway: Gateway, server: str, mode: str) -> None:
    agent = gateway.account([f"mcp.{server}:search"], cap="0.01")
    marker = uuid.uuid4().hex
    up = gateway.upstreams[server]

    async def loop() -> tuple[int, list[MCPError]]:
        ok, denied = 0, []
        async with connect(gateway.mcp_url(server), agent.key, mode) as c:
            for i in range(12):
                try:
                    await c.call_tool("search", {"query": f"{marker}-{i}"})
                    ok += 1
                except MCPError as e:
                    denied.append(e)
        return ok, denied

    ok, denied = asyncio.run(loop())
    assert ok == 5  # 5 × 0.002 = the cap
    assert len(denied) == 7
    assert {e.error.data["code"] for e in denied} == {"spending_cap_exceeded"}  # type: ignore[index]
    assert {e.error.data["status"] for e in denied} == {402}  # type: ignore[index]
    # Only the allowed calls reached the server.
    reached = [c for c in up.tool_calls("search") if c["args"]["query"].startswith(marker)]
    assert len(reached) == 5
    usage = settled(agent)
    assert usage.window_spent == Decimal("0.01")
    assert usage.window_held == 0
    assert usage.denied_count == 7


@pytest.mark.parametrize(("server", "mode"), CASES, ids=IDS)
def test_a_call_outside_the_scopes_never_reaches_the_server(gateway: Gateway, server: str, mode: str) -> None:
    agent = gateway.account([f"mcp.{server}:search"])
    marker = uuid.uuid4().hex
    up = gateway.upstreams[server]

    async def call() -> MCPError:
        async with connect(gateway.mcp_url(server), agent.key, mode) as c:
            with pytest.raises(MCPError) as e:
                await c.call_tool("charge_card", {"amount": "100", "marker": marker})
            return e.value

    err = asyncio.run(call())
    assert err.error.data["code"] == "scope_not_granted"  # type: ignore[index]
    assert not up.saw(marker)
    usage = settled(agent)
    assert usage.lifetime_spent == 0
    assert usage.denied_count == 1
    denied = [e for e in agent.audit() if e.outcome == "denied"]
    assert [(e.scope, e.reason) for e in denied] == [(f"mcp.{server}:charge_card", "scope_not_granted")]


@pytest.mark.parametrize(("server", "mode"), CASES, ids=IDS)
def test_revocation_mid_session_stops_the_next_call(gateway: Gateway, server: str, mode: str) -> None:
    agent = gateway.account([f"mcp.{server}:*"])
    before, after = uuid.uuid4().hex, uuid.uuid4().hex
    up = gateway.upstreams[server]

    async def run() -> None:
        async with connect(gateway.mcp_url(server), agent.key, mode) as c:
            await c.call_tool("search", {"query": before})
            agent.revoke(reason="test")
            with pytest.raises(MCPError):
                await c.call_tool("search", {"query": after})
            with pytest.raises(MCPError):
                await c.list_tools()

    asyncio.run(run())
    assert up.saw(before)
    assert not up.saw(after)
    # The agent's own key gets a 401 with a Bearer challenge, and nothing is forwarded.
    r = httpx2.post(
        gateway.mcp_url(server),
        headers={"Authorization": f"Bearer {agent.key}", "Accept": "application/json, text/event-stream"},
        json={
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "search", "arguments": {"query": after}},
        },
    )
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "credential_revoked"
    assert not up.saw(after)
    assert settled(agent).lifetime_spent == PRICES["search"]


@pytest.mark.parametrize("server", HTTP_SERVERS)
def test_the_server_gets_its_secret_and_never_the_agents_key(gateway: Gateway, server: str) -> None:
    agent = gateway.account([f"mcp.{server}:*"])
    marker = uuid.uuid4().hex
    up = gateway.upstreams[server]
    start = len(up.requests())

    async def run() -> None:
        async with connect(gateway.mcp_url(server), agent.key) as c:
            await c.list_tools()
            await c.call_tool("search", {"query": marker})

    asyncio.run(run())
    seen = up.requests()[start:]
    assert seen, "nothing reached the server"
    assert all(r["headers"].get("authorization") == f"Bearer {SECRET}" for r in seen)
    assert not up.saw(agent.key)
    # The agent never sees the secret, in answers or errors.
    for body in [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "search", "arguments": {"query": marker}},
        },
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "nope", "arguments": {}}},
    ]:
        r = httpx2.post(
            gateway.mcp_url(server),
            headers={"Authorization": f"Bearer {agent.key}", "Accept": "application/json, text/event-stream"},
            json=body,
        )
        assert SECRET not in r.text
        assert SECRET not in str(r.headers)


@pytest.mark.parametrize("server", HTTP_SERVERS)
def test_routing_headers_that_disagree_with_the_body_are_refused(gateway: Gateway, server: str) -> None:
    agent = gateway.account([f"mcp.{server}:search"])
    marker = uuid.uuid4().hex
    up = gateway.upstreams[server]
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "charge_card", "arguments": {"amount": "9", "marker": marker}, "_meta": meta},
    }
    base = {
        "Authorization": f"Bearer {agent.key}",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28",
    }
    for extra in [
        {"Mcp-Method": "tools/call", "Mcp-Name": "search"},  # the header names an allowed tool
        {"Mcp-Method": "tools/list"},
        {"Mcp-Method": "tools/call"},
    ]:
        r = httpx2.post(gateway.mcp_url(server), headers={**base, **extra}, json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_request"
    assert not up.saw(marker)
    assert settled(agent).lifetime_spent == 0
    # Headers that agree are served (and the call is decided on the body's tool).
    r = httpx2.post(
        gateway.mcp_url(server), headers={**base, "Mcp-Method": "tools/call", "Mcp-Name": "charge_card"}, json=body
    )
    assert r.status_code == 200
    assert "scope_not_granted" in r.text
    assert not up.saw(marker)


def test_blast_radius_lists_the_mcp_tools_an_agent_reaches(gateway: Gateway) -> None:
    a = gateway.account(["mcp.tools:search", "mcp.tools-sse:*", "mcp.local:custom_tool", "payments:write"])
    r = httpx2.get(
        f"{gateway.url}/v1/blast-radius?limit=1000", headers={"Authorization": f"Bearer {gateway.server.admin_token}"}
    )
    assert r.status_code == 200
    row = next(x for x in r.json()["agents"] if x["handle"] == a.handle)
    assert row["mcp_tools"] == ["tools:search", "tools-sse:*", "local:custom_tool"]
    # The existing fields are still there.
    assert row["max_spend_per_period"] == "10.00"
    assert "payments:write" in row["scopes"]


def test_metrics_count_calls_per_agent_and_tool(gateway: Gateway) -> None:
    agent = gateway.account(["mcp.tools:search"])

    async def run() -> None:
        async with connect(gateway.mcp_url("tools"), agent.key) as c:
            await c.call_tool("search", {"query": "m"})
            with pytest.raises(MCPError):
                await c.call_tool("charge_card", {"amount": "1"})

    asyncio.run(run())
    text = httpx2.get(f"{gateway.url}/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("bulkhead_mcp_calls_total") and agent.handle in line]
    assert any('tool="search"' in line and 'outcome="allowed"' in line and line.endswith(" 1") for line in lines), lines
    assert any('tool="charge_card"' in line and 'outcome="denied"' in line for line in lines), lines


def test_a_session_is_bound_to_the_agent_that_opened_it(gateway: Gateway) -> None:
    server = "tools-sess"
    a = gateway.account([f"mcp.{server}:*"])
    b = gateway.account([f"mcp.{server}:*"])
    up = gateway.upstreams[server]
    url = gateway.mcp_url(server)
    accept = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-06-18"}

    def post(key: str, body: dict[str, object], session: str | None = None) -> httpx2.Response:
        headers = {**accept, "Authorization": f"Bearer {key}"}
        if session is not None:
            headers["Mcp-Session-Id"] = session
        return httpx2.post(url, headers=headers, json=body, timeout=30)

    def call(key: str, session: str, marker: str) -> httpx2.Response:
        params = {"name": "search", "arguments": {"query": marker}}
        return post(key, {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": params}, session)

    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    r = post(a.key, init)
    assert r.status_code == 200, r.text
    session = r.headers["mcp-session-id"]
    assert post(a.key, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session).status_code == 202
    # The agent that opened the session uses it.
    mine = uuid.uuid4().hex
    r = call(a.key, session, mine)
    assert r.status_code == 200, r.text
    assert f"results for {mine}" in r.text
    # Another agent's key with that session id: refused as an unknown session, nothing forwarded
    # (and its DELETE does not end the session).
    theirs = uuid.uuid4().hex
    r = call(b.key, session, theirs)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "not_found"
    delete = httpx2.delete(url, headers={**accept, "Authorization": f"Bearer {b.key}", "Mcp-Session-Id": session})
    assert delete.status_code == 404
    # The server's own id, as the server gave it, is no use either.
    raw = session.rsplit(".", 1)[0]
    assert call(a.key, raw, theirs).status_code == 404
    assert call(b.key, raw, theirs).status_code == 404
    assert not up.saw(theirs)
    # The session is still the first agent's, and the server got its own id back.
    again = uuid.uuid4().hex
    assert call(a.key, session, again).status_code == 200
    assert up.saw(again)
    assert any(r["headers"].get("mcp-session-id") == raw for r in up.requests())
    assert not any(r["headers"].get("mcp-session-id") == session for r in up.requests())
    assert settled(a).lifetime_spent == 2 * PRICES["search"]
    assert settled(b).lifetime_spent == 0
