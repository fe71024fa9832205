"""A scripted OpenAI-compatible LLM upstream for tests and examples (standard library only).

It answers `POST …/chat/completions` and `POST …/responses`, plain or streamed (SSE), closely
enough that the official `openai` client and the agent frameworks built on it parse the answers.
Nothing is random: each answer follows from the request alone.

Scripting: directives in the conversation's system text (chat `system`/`developer` messages, the
Responses `instructions`) or its first user message say what the model does.

- `[[call:TOOL:N]]` calls tool TOOL N times (one call per answer), then answers with a final text.
- `[[loop:TOOL]]` keeps calling TOOL, until a tool result reports an error: then a final text
  quoting that error. A safety limit of `LOOP_MAX` calls ends the loop in any case.
- Arguments: `[[call:TOOL:N:{"city": "Paris"}]]`, `[[loop:TOOL:{"q": 1}]]` (JSON); default `{}`.
- Several `call` directives run in order; a `loop` ends the script.
- No directive: a final text at once.

The script's position is the number of tool results already in the history (chat `tool`
messages, Responses `function_call_output` items). A tool result reports an error when it
contains the word "error" or a Bulkhead error code (`spending_cap_exceeded`, `credential_revoked`,
…); an error ends any script with a final text quoting it.

Every answer reports the same usage, `PROMPT_TOKENS` in and `COMPLETION_TOKENS` out, so a
gateway's metered cost is exact and predictable. Streamed chat answers carry it in a last chunk
when `stream_options.include_usage` is set; streamed Responses answers in `response.completed`.

Every request (method, path, headers with lower-cased names, body) is recorded: `GET /__calls`
returns them as JSON and `DELETE /__calls` clears them; `start()` also hands back the live list.

From tests: `url, stop, calls = start()`, and `gateway_config(url)` for a `bulkhead serve` in
front of it (run with `SECRET_ENV=SECRET`). From a shell:
`python llm_upstream.py --listen 127.0.0.1:9100`.
"""

from __future__ import annotations

import argparse
import decimal
import hashlib
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PROMPT_TOKENS = 100
COMPLETION_TOKENS = 20
SECRET = "sk-scripted-upstream-0123456789"
"""The upstream's own credential in `gateway_config`: what the gateway must send, never an agent key."""
SECRET_ENV = "SCRIPTED_LLM_API_KEY"
INPUT_PER_MILLION = "0.50"
OUTPUT_PER_MILLION = "2.50"
MAX_COST_PER_REQUEST = "0.01"
LOOP_MAX = 200
"""The most tool calls a `loop` script makes before it gives up with a final text."""

BODY_BYTES_MAX = 16 * 1024 * 1024

ERROR_CODES = (
    "invalid_credentials",
    "credential_revoked",
    "credential_expired",
    "per_tx_limit_exceeded",
    "spending_cap_exceeded",
    "lifetime_cap_exceeded",
    "ancestor_cap_exceeded",
    "scope_not_granted",
    "agent_suspended",
    "rate_limited",
)
_ERROR = re.compile(r"\berror\b|" + "|".join(ERROR_CODES), re.IGNORECASE)
_DIRECTIVE = re.compile(r"\[\[(call|loop):([A-Za-z0-9_.\-]+)((?::.*?)?)\]\]", re.DOTALL)

Call = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# The script: what the model does next, from the conversation so far


class Turn:
    """The model's next move: a tool call (`tool`, `arguments`) or a final `text`."""

    def __init__(self, *, tool: str | None = None, arguments: str = "{}", text: str = "", step: int = 0) -> None:
        self.tool = tool
        self.arguments = arguments
        self.text = text
        self.step = step


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                for key in ("text", "content", "output"):
                    if isinstance(part.get(key), str):
                        parts.append(part[key])
                        break
        return "\n".join(parts)
    if content is None:
        return ""
    return json.dumps(content)


def _conversation(body: dict[str, Any]) -> tuple[str, list[str]]:
    """The directive-bearing text (system text and first user message) and the tool results."""
    system: list[str] = []
    first_user: str | None = None
    results: list[str] = []
    if isinstance(body.get("instructions"), str):
        system.append(body["instructions"])
    items: list[Any]
    if "messages" in body:
        items = body.get("messages") or []
    else:
        raw = body.get("input")
        items = [{"role": "user", "content": raw}] if isinstance(raw, str) else list(raw or [])
    for item in items:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        role = item.get("role")
        if role == "tool" or kind == "function_call_output":
            results.append(_text_of(item.get("content", item.get("output"))))
        elif role in ("system", "developer"):
            system.append(_text_of(item.get("content")))
        elif role == "user" and first_user is None:
            first_user = _text_of(item.get("content"))
    return "\n".join([*system, first_user or ""]), results


def _arguments(spec: str) -> str:
    """A directive's JSON arguments (after a colon), normalised; `{}` when none are given."""
    spec = spec.strip()
    if not spec:
        return "{}"
    try:
        return json.dumps(json.loads(spec), separators=(",", ":"))
    except ValueError:
        return "{}"


def plan(body: dict[str, Any]) -> Turn:
    """The model's next move for a chat-completions or Responses request body."""
    text, results = _conversation(body)
    done = len(results)
    for result in results:
        if _ERROR.search(result):
            return Turn(text=f"Stopped after {done} tool calls: {result}", step=done)
    script: list[tuple[str, str]] = []  # (tool, arguments), one per call
    loop: tuple[str, str] | None = None
    for kind, tool, tail in _DIRECTIVE.findall(text):
        rest = tail[1:] if tail.startswith(":") else tail
        if kind == "loop":
            loop = (tool, _arguments(rest))
            break
        count_text, _, args = rest.partition(":")
        count = int(count_text) if count_text.strip().isdigit() else 1
        script.extend([(tool, _arguments(args))] * count)
    if done < len(script):
        tool, args = script[done]
        return Turn(tool=tool, arguments=args, step=done)
    if loop is not None and done < len(script) + LOOP_MAX:
        return Turn(tool=loop[0], arguments=loop[1], step=done)
    if done:
        return Turn(text=f"Done after {done} tool calls.", step=done)
    return Turn(text="Hello from the scripted model.", step=0)


# ---------------------------------------------------------------------------------------------
# Answers in the two OpenAI wire formats


def _ids(body: dict[str, Any], turn: Turn) -> tuple[str, str]:
    """A response id (from the request) and a tool call id (from the step), both deterministic."""
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]
    return digest, f"call_{turn.step}_{digest[:8]}"


def _chat_usage() -> dict[str, Any]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    }


def _responses_usage() -> dict[str, Any]:
    return {
        "input_tokens": PROMPT_TOKENS,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": COMPLETION_TOKENS,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    }


def chat_completion(body: dict[str, Any], turn: Turn) -> dict[str, Any]:
    """A non-streamed `chat.completion` object."""
    digest, call_id = _ids(body, turn)
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
    if turn.tool is not None:
        message["tool_calls"] = [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": turn.tool, "arguments": turn.arguments},
            }
        ]
        finish = "tool_calls"
    else:
        message["content"] = turn.text
        finish = "stop"
    return {
        "id": f"chatcmpl-{digest}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "scripted"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": _chat_usage(),
        "system_fingerprint": None,
    }


def chat_chunks(body: dict[str, Any], turn: Turn) -> Iterator[str]:
    """The SSE events of a streamed chat completion, `data: [DONE]` included."""
    digest, call_id = _ids(body, turn)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    base = {
        "id": f"chatcmpl-{digest}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model", "scripted"),
        "system_fingerprint": None,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        data = dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": finish}])
        if include_usage:
            data["usage"] = None
        return _sse(data)

    if turn.tool is not None:
        yield chunk({"role": "assistant", "content": None})
        call = {"index": 0, "id": call_id, "type": "function"}
        yield chunk({"tool_calls": [dict(call, function={"name": turn.tool, "arguments": ""})]})
        for piece in _pieces(turn.arguments):
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        yield chunk({}, "tool_calls")
    else:
        yield chunk({"role": "assistant", "content": ""})
        for piece in _pieces(turn.text):
            yield chunk({"content": piece})
        yield chunk({}, "stop")
    if include_usage:
        yield _sse(dict(base, choices=[], usage=_chat_usage()))
    yield "data: [DONE]\n\n"


def _response_object(body: dict[str, Any], digest: str, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": f"resp_{digest}",
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": body.get("model", "scripted"),
        "output": output,
        "usage": _responses_usage() if status == "completed" else None,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "metadata": {},
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "temperature": body.get("temperature", 1.0),
        "top_p": body.get("top_p", 1.0),
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools", []),
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "max_output_tokens": body.get("max_output_tokens"),
        "reasoning": None,
        "user": None,
    }


def _output_item(digest: str, turn: Turn, status: str, text: str | None = None) -> dict[str, Any]:
    call_id = f"call_{turn.step}_{digest[:8]}"
    if turn.tool is not None:
        return {
            "type": "function_call",
            "id": f"fc_{digest}",
            "call_id": call_id,
            "name": turn.tool,
            "arguments": turn.arguments if text is None else text,
            "status": status,
        }
    content = [] if text == "" else [_text_part(turn.text if text is None else text)]
    return {
        "type": "message",
        "id": f"msg_{digest}",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response(body: dict[str, Any], turn: Turn) -> dict[str, Any]:
    """A non-streamed Responses API `response` object."""
    digest, _ = _ids(body, turn)
    return _response_object(body, digest, "completed", [_output_item(digest, turn, "completed")])


def response_events(body: dict[str, Any], turn: Turn) -> Iterator[str]:
    """The SSE events of a streamed Responses API answer, ending with `response.completed`."""
    digest, _ = _ids(body, turn)
    seq = iter(range(1_000_000))

    def event(kind: str, **fields: Any) -> str:
        return _sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

    yield event("response.created", response=_response_object(body, digest, "in_progress", []))
    yield event("response.in_progress", response=_response_object(body, digest, "in_progress", []))
    item = _output_item(digest, turn, "completed")
    at = {"output_index": 0, "item_id": item["id"]}
    yield event("response.output_item.added", output_index=0, item=_output_item(digest, turn, "in_progress", ""))
    if turn.tool is not None:
        for piece in _pieces(turn.arguments):
            yield event("response.function_call_arguments.delta", **at, delta=piece)
        yield event("response.function_call_arguments.done", **at, name=turn.tool, arguments=turn.arguments)
    else:
        part = {**at, "content_index": 0}
        yield event("response.content_part.added", **part, part=_text_part(""))
        for piece in _pieces(turn.text):
            yield event("response.output_text.delta", **part, delta=piece, logprobs=[])
        yield event("response.output_text.done", **part, text=turn.text, logprobs=[])
        yield event("response.content_part.done", **part, part=_text_part(turn.text))
    yield event("response.output_item.done", output_index=0, item=item)
    yield event("response.completed", response=_response_object(body, digest, "completed", [item]))


def _pieces(text: str, size: int = 8) -> list[str]:
    """`text` in a few chunks, so a client really reassembles a stream."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _sse(data: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------------------------
# A gateway in front of it


def gateway_config(url: str, name: str = "openai", scope: str = "llm:openai") -> str:
    """The `bulkhead serve` TOML putting upstream `name` (agents need `scope`) in front of `url`.

    The server must run with `SECRET_ENV=SECRET` in its environment. Each call holds
    `MAX_COST_PER_REQUEST` and costs `cost_per_call()`.
    """
    return (
        "[[upstream]]\n"
        f'name = "{name}"\n'
        f'base_url = "{url}"\n'
        f'scope = "{scope}"\n'
        f'secret_env = "{SECRET_ENV}"\n'
        f'max_cost_per_request = "{MAX_COST_PER_REQUEST}"\n'
        f'pricing = {{ kind = "openai_usage", input_per_million = "{INPUT_PER_MILLION}", '
        f'output_per_million = "{OUTPUT_PER_MILLION}" }}\n'
    )


def cost_per_call() -> decimal.Decimal:
    """What the gateway charges for one answer: its tokens at `gateway_config`'s prices.

    Each kind of token is priced per million and rounded up to the micro-unit, as the gateway does.
    """
    micro = decimal.Decimal("0.000001")

    def priced(tokens: int, per_million: str) -> decimal.Decimal:
        exact = decimal.Decimal(tokens) * decimal.Decimal(per_million) / 1_000_000
        return exact.quantize(micro, rounding=decimal.ROUND_CEILING)

    return priced(PROMPT_TOKENS, INPUT_PER_MILLION) + priced(COMPLETION_TOKENS, OUTPUT_PER_MILLION)


# ---------------------------------------------------------------------------------------------
# The HTTP server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.calls: list[Call] = []
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests read the recorded calls instead

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
                if len(data) > BODY_BYTES_MAX:
                    raise ValueError("body too large")
        length = int(self.headers.get("Content-Length") or 0)
        if length > BODY_BYTES_MAX:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _json(self, status: int, data: Any) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _stream(self, events: Iterator[str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for text in events:
            raw = text.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._json(status, {"error": {"message": message, "type": kind, "code": None}})

    def _handle(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            raw = self._body()
        except ValueError:
            self.close_connection = True
            self._error(413, "request body too large")
            return
        if path == "/__calls":
            if self.command == "DELETE":
                with self.server.lock:
                    self.server.calls.clear()
                self._json(200, {"cleared": True})
            else:
                with self.server.lock:
                    self._json(200, {"calls": list(self.server.calls)})
            return
        body: Any
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        headers = {k.lower(): v for k, v in self.headers.items()}
        with self.server.lock:
            self.server.calls.append({"method": self.command, "path": self.path, "headers": headers, "body": body})
        if self.command == "GET" and path.endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})
            return
        if self.command != "POST" or not (path.endswith("/chat/completions") or path.endswith("/responses")):
            self._error(404, f"no route for {self.command} {path}", "not_found")
            return
        if not isinstance(body, dict):
            self._error(400, "the body must be a JSON object")
            return
        turn = plan(body)
        chat = path.endswith("/chat/completions")
        if body.get("stream"):
            self._stream(chat_chunks(body, turn) if chat else response_events(body, turn))
        else:
            self._json(200, chat_completion(body, turn) if chat else response(body, turn))

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle


def _url(server: _Server) -> str:
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}"


def start(port: int = 0, host: str = "127.0.0.1") -> tuple[str, Callable[[], None], list[Call]]:
    """Serves the scripted upstream on a background thread.

    Returns its base URL (`http://host:port`), a function that stops it, and the live list of
    recorded requests (each a dict of `method`, `path`, `headers`, `body`).
    """
    server = _Server((host, port))
    thread = threading.Thread(target=server.serve_forever, name="llm-upstream", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return _url(server), stop, server.calls


def main(argv: list[str] | None = None) -> int:
    """`python llm_upstream.py --listen HOST:PORT`: serves until interrupted."""
    parser = argparse.ArgumentParser(description="A scripted OpenAI-compatible LLM upstream.")
    parser.add_argument("--listen", default="127.0.0.1:9100", help="HOST:PORT (default %(default)s)")
    args = parser.parse_args(argv)
    host, _, port = str(args.listen).rpartition(":")
    server = _Server((host or "127.0.0.1", int(port)))
    print(f"scripted LLM upstream listening on {_url(server)}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
