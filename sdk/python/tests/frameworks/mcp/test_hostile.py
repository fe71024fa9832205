"""Hostile input to the MCP gateway: each gets a clear error, nothing is charged or forwarded,
and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx2
import pytest

from conftest import Gateway, connect, settled

SERVER = "tools"


def post(gateway: Gateway, key: str | None, content: bytes, headers: dict[str, str] | None = None) -> httpx2.Response:
    h = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json", **(headers or {})}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    return httpx2.post(gateway.mcp_url(SERVER), headers=h, content=content, timeout=30)


def still_serving(gateway: Gateway) -> None:
    """A fresh agent can still list and call through the same server."""
    agent = gateway.account([f"mcp.{SERVER}:search"])

    async def run() -> str:
        async with connect(gateway.mcp_url(SERVER), agent.key) as c:
            r = await c.call_tool("search", {"query": "alive"})
            return r.content[0].text  # type: ignore[union-attr]

    assert asyncio.run(run()) == "results for alive"
    assert httpx2.get(f"{gateway.url}/healthz").status_code == 200


def call(name: Any, marker: str, id_: Any = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "tools/call",
        "params": {"name": name, "arguments": {"query": marker}},
    }


@pytest.mark.parametrize(
    "case",
    ["not-json", "batch", "nested", "no-version", "null-id", "params-array", "empty", "bad-utf8"],
)
def test_malformed_messages_are_400_and_free(gateway: Gateway, case: str) -> None:
    agent = gateway.account([f"mcp.{SERVER}:*"])
    marker = uuid.uuid4().hex
    bodies = {
        "not-json": b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", ' + marker.encode(),
        "batch": json.dumps([call("search", marker), call("search", marker, 2)]).encode(),
        "nested": (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","arguments":{"query":"'
            + marker.encode()
            + b'","x":'
            + b"[" * 5000
            + b"]" * 5000
            + b"}}}"
        ),
        "no-version": json.dumps(
            {"id": 1, "method": "tools/call", "params": {"name": "search", "marker": marker}}
        ).encode(),
        "null-id": json.dumps(call("search", marker, None)).encode(),
        "params-array": json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": [marker]}).encode(),
        "empty": b"",
        "bad-utf8": b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        + b'"params":{"name":"search","arguments":{"query":"\xff'
        + marker.encode()
        + b'"}}}',
    }
    r = post(gateway, agent.key, bodies[case])
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert r.json()["error"]["message"]
    assert not gateway.upstreams[SERVER].saw(marker)
    usage = settled(agent)
    assert usage.lifetime_spent == 0
    assert usage.tx_count == 0
    still_serving(gateway)


def test_a_huge_body_is_413_and_never_forwarded(gateway: Gateway) -> None:
    agent = gateway.account([f"mcp.{SERVER}:*"])
    marker = uuid.uuid4().hex
    body = json.dumps(call("search", marker + "x" * (2 * 1024 * 1024))).encode()
    r = post(gateway, agent.key, body)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"
    assert not gateway.upstreams[SERVER].saw(marker)
    assert settled(agent).lifetime_spent == 0
    still_serving(gateway)


def test_unknown_methods_and_unnameable_tools_are_json_rpc_errors(gateway: Gateway) -> None:
    agent = gateway.account([f"mcp.{SERVER}:*", "*"])
    marker = uuid.uuid4().hex
    up = gateway.upstreams[SERVER]
    cases = [
        ({"jsonrpc": "2.0", "id": 1, "method": "bogus/method", "params": {"m": marker}}, -32601, None),
        ({"jsonrpc": "2.0", "id": 2, "method": "resources/read", "params": {"uri": f"file:///{marker}"}}, -32601, None),
        ({"jsonrpc": "2.0", "id": 3, "method": "prompts/get", "params": {"name": marker}}, -32601, None),
        (call("WebSearch", marker, 4), -32030, "invalid_scope"),
        (call("charge:card", marker, 5), -32030, "invalid_scope"),
        (call("*", marker, 6), -32030, "invalid_scope"),
        (call(7, marker, 7), -32602, None),
        ({"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"arguments": {"q": marker}}}, -32602, None),
    ]
    for body, code, data_code in cases:
        r = post(gateway, agent.key, json.dumps(body).encode())
        assert r.status_code == 200, r.text
        reply = r.json()
        assert reply["id"] == body["id"]
        assert reply["error"]["code"] == code, reply
        assert reply["error"]["message"]
        if data_code is not None:
            assert reply["error"]["data"]["code"] == data_code
    assert not up.saw(marker)
    usage = settled(agent)
    assert usage.lifetime_spent == 0
    assert usage.tx_count == 0
    # Each call to a tool no scope can name is audited as a denied call naming server and tool.
    denied = [(e.reason, e.scope, e.detail) for e in agent.audit() if e.outcome == "denied"]
    assert denied == [
        ("invalid_scope", None, {"mcp_server": SERVER, "tool": tool}) for tool in ["WebSearch", "charge:card", "*"]
    ]
    assert usage.denied_count == 3
    still_serving(gateway)


@pytest.mark.parametrize(
    "auth", [None, "Bearer", "Bearer bk_not-a-real-key", "Bearer bk_" + "A" * 40, "Basic Zm9vOmJhcg=="]
)
def test_bad_keys_are_401_with_a_bearer_challenge(gateway: Gateway, auth: str | None) -> None:
    marker = uuid.uuid4().hex
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = auth
    for body in [call("search", marker), {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"m": marker}}]:
        r = httpx2.post(gateway.mcp_url(SERVER), headers=headers, content=json.dumps(body).encode())
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_credentials"
    assert not gateway.upstreams[SERVER].saw(marker)


def test_an_unknown_server_is_404(gateway: Gateway) -> None:
    agent = gateway.account(["mcp.nope:*"])
    r = httpx2.post(
        f"{gateway.url}/mcp/nope", headers={"Authorization": f"Bearer {agent.key}"}, json=call("search", "x")
    )
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
