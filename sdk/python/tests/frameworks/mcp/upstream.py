"""An MCP server for the gateway's tests: the official SDK's `MCPServer`, over Streamable HTTP
under uvicorn (JSON or SSE answers, stateless or with sessions) or over stdio.

It records what reached it, one JSON line per event in `--log`: every HTTP request (method,
path, headers, body) and every tool call (tool and arguments), so the tests can tell what the
gateway forwarded and what it never did.

    python upstream.py [--log FILE] --port PORT [--json] [--stateless]
    python upstream.py --log FILE --stdio
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from mcp.server.mcpserver import MCPServer


def _record(path: str, event: dict[str, Any]) -> None:
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")


def build(log: str, stdio: bool) -> MCPServer:
    server = MCPServer("bulkhead-test-upstream")

    @server.tool()
    def search(query: str) -> str:
        """Searches (trivially)."""
        _record(log, {"tool": "search", "args": {"query": query}})
        return f"results for {query}"

    @server.tool()
    def charge_card(amount: str, marker: str = "") -> str:
        """Charges a card (in a test, only a log line)."""
        _record(log, {"tool": "charge_card", "args": {"amount": amount, "marker": marker}})
        return f"charged {amount}"

    @server.tool()
    def echo(text: str) -> str:
        """Echoes its text: a tool without a price of its own."""
        _record(log, {"tool": "echo", "args": {"text": text}})
        return text

    @server.tool(name="WebSearch")
    def web_search(query: str) -> str:
        """A tool named outside Bulkhead's scope alphabet (upper case)."""
        _record(log, {"tool": "WebSearch", "args": {"query": query}})
        return query

    if stdio:

        @server.tool()
        def crash(marker: str) -> str:
            """Ends the server's process in the middle of the call."""
            _record(log, {"tool": "crash", "args": {"marker": marker}, "pid": os.getpid()})
            os._exit(3)

        @server.tool()
        def pid() -> str:
            """The process id, to see a restart."""
            return str(os.getpid())

    return server


class Recorder:
    """ASGI middleware that logs every HTTP request before the app sees it."""

    def __init__(self, app: Any, log: str) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        _record(
            self.log,
            {
                "http": scope["method"],
                "path": scope["path"],
                "headers": headers,
                "body": body.decode("utf-8", "replace"),
            },
        )
        sent = False

        async def replay() -> Any:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--log", default="", help="where to record what arrives (nothing when empty)")
    p.add_argument("--port", type=int)
    p.add_argument("--json", action="store_true", help="answer JSON instead of SSE")
    p.add_argument("--stateless", action="store_true", help="no sessions")
    p.add_argument("--stdio", action="store_true")
    a = p.parse_args()
    server = build(a.log, a.stdio)
    if a.stdio:
        server.run("stdio")
        return
    import uvicorn

    app = server.streamable_http_app(stateless_http=a.stateless, json_response=a.json)
    uvicorn.run(Recorder(app, a.log) if a.log else app, host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
