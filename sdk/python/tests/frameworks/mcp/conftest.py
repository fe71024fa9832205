"""Fixtures of the MCP gateway's tests: real MCP servers (the official SDK) and a real
`bulkhead serve` in front of them.

Servers (`[[mcp_server]]` names):
- `tools`: Streamable HTTP, JSON answers, stateless (the 2026-07-28 revision);
- `tools-sse`: SSE answers, stateless;
- `tools-sess`: SSE answers with sessions (what 2025 clients use, `Mcp-Session-Id`);
- `tools-held`: like `tools`, with `leases = false` (a durable hold per call before it is
  forwarded; the others take slots of a lease, the default);
- `local`: the same server over stdio, started by Bulkhead.
Each records what reached it (see `upstream.py`).

Every test runs twice: on the embedded SQLite store and on PostgreSQL (a fresh database on the
server `BULKHEAD_TEST_DATABASE_URL` names; the PostgreSQL run is skipped, and reported as
skipped, when it is unset, and fails under `CI` then).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from bulkhead import AgentAccount
from support import server as support_server
from support.util import unique_handle

HERE = Path(__file__).resolve().parent
UPSTREAM = HERE / "upstream.py"
SECRET = "upstream-secret-7f3a9c1e5b2d"
HTTP_SERVERS = ["tools", "tools-sse", "tools-sess", "tools-held"]
HELD = {"tools-held"}
PRICES = {"search": Decimal("0.002"), "charge_card": Decimal("1.00")}


@dataclass
class Upstream:
    name: str
    log: Path

    def events(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def tool_calls(self, tool: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events() if "tool" in e and (tool is None or e["tool"] == tool)]

    def requests(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if "http" in e]

    def saw(self, text: str) -> bool:
        """Whether `text` appears anywhere in what reached this server."""
        return text in (self.log.read_text() if self.log.exists() else "")


@dataclass
class Gateway:
    server: support_server.Server
    upstreams: dict[str, Upstream]

    @property
    def url(self) -> str:
        return self.server.url

    def mcp_url(self, name: str) -> str:
        return f"{self.server.url}/mcp/{name}"

    def account(self, scopes: list[str], cap: str = "10.00", **fields: Any) -> AgentAccount:
        return AgentAccount.create(
            unique_handle("mcp"),
            scopes,
            cap,
            url=self.server.url,
            admin_token=self.server.admin_token,
            **fields,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the MCP test server exited at start")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError("the MCP test server did not start")


@contextlib.contextmanager
def _database(store: str) -> Iterator[str | None]:
    """`None` for the embedded SQLite store; for PostgreSQL, the URL of a fresh database that is
    dropped afterwards."""
    if store == "sqlite":
        yield None
        return
    admin = os.environ.get("BULKHEAD_TEST_DATABASE_URL")
    if not admin:
        if os.environ.get("CI", "").strip() not in ("", "false", "0"):
            pytest.fail("BULKHEAD_TEST_DATABASE_URL is not set: the PostgreSQL runs cannot be skipped under CI")
        pytest.skip("set BULKHEAD_TEST_DATABASE_URL to run the MCP gateway's tests on PostgreSQL")
    name = f"bh_t_mcp_{uuid.uuid4().hex[:12]}"
    subprocess.run(["psql", admin, "-qc", f"CREATE DATABASE {name}"], check=True)
    try:
        yield f"{admin.rsplit('/', 1)[0]}/{name}"
    finally:
        subprocess.run(["psql", admin, "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"], check=False)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def gateway(request: pytest.FixtureRequest) -> Iterator[Gateway]:
    store: str = request.param
    tmp = tempfile.TemporaryDirectory(prefix="bulkhead-mcp-")
    root = Path(tmp.name)
    procs: list[subprocess.Popen[bytes]] = []
    ups: dict[str, Upstream] = {}
    config = []
    modes = {
        "tools": ["--json", "--stateless"],
        "tools-sse": ["--stateless"],
        "tools-sess": [],
        "tools-held": ["--json", "--stateless"],
    }
    try:
        for name, flags in modes.items():
            port = _free_port()
            log = root / f"{name}.log"
            proc = subprocess.Popen(
                [sys.executable, str(UPSTREAM), "--log", str(log), "--port", str(port), *flags],
                stdin=subprocess.DEVNULL,
            )
            procs.append(proc)
            _wait_port(port, proc)
            ups[name] = Upstream(name, log)
            config.append(
                f'[[mcp_server]]\nname = "{name}"\nurl = "http://127.0.0.1:{port}/mcp"\n'
                'secret_env = "TOOLS_MCP_TOKEN"\nauth_header = "Authorization"\nauth_format = "Bearer {secret}"\n'
                'default_price = "0.00"\ntools = { search = "0.002", charge_card = "1.00" }\n'
                + ("leases = false\n" if name in HELD else "")
            )
        local_log = root / "local.log"
        ups["local"] = Upstream("local", local_log)
        command = json.dumps([sys.executable, str(UPSTREAM), "--log", str(local_log), "--stdio"])
        config.append(
            f'[[mcp_server]]\nname = "local"\ncommand = {command}\n'
            'default_price = "0.00"\ntools = { search = "0.002", charge_card = "1.00", crash = "0.50" }\n'
        )
        with (
            _database(store) as database_url,
            support_server.start(
                config="\n".join(config), env={"TOOLS_MCP_TOKEN": SECRET}, database_url=database_url
            ) as s,
        ):
            yield Gateway(s, ups)
    finally:
        for p in procs:
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        tmp.cleanup()


@contextlib.asynccontextmanager
async def connect(url: str, key: str, mode: str = "auto") -> AsyncIterator[Client]:
    """An MCP client (the official SDK) that sends this agent's key and nothing else."""
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as client,
    ):
        yield client


def audit_when(account: AgentAccount, done: Any) -> list[Any]:
    """The agent's audit trail once `done(events)` holds (or after 15 s): a free call's settlement
    holds nothing, so its event is waited for rather than the agent's held money."""
    deadline = time.monotonic() + 15
    while True:
        events = account.audit()
        if done(events) or time.monotonic() > deadline:
            return events
        time.sleep(0.02)


def settled(account: AgentAccount) -> Any:
    """The agent's usage once no call of it is still being settled (holds back to zero)."""
    deadline = time.monotonic() + 15
    while True:
        usage = account.usage()
        if usage.window_held == 0 or time.monotonic() > deadline:
            return usage
        time.sleep(0.02)
