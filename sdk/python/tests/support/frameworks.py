"""What the framework integrations' tests share: a real gateway in front of the scripted LLM.

The scripted upstream is the only stand-in: the framework, its OpenAI model client, the SDK and
the server are the real ones, talking real HTTP. This module imports nothing but the standard
library, pytest, the SDK and the other support modules, so every framework's venv can use it.

- `start_gateway` runs the scripted upstream and a `bulkhead serve` whose `openai` upstream
  forwards to it; `Gateway` makes agents on it and reads back their audit and model calls.
- `Harness` (fixture `harness`) does the same on `llm_upstream.gateway_config`'s prices, and
  waits until an agent's usage is exactly what its model calls and tools cost.
- `run_two_agents_example` and `check_example_output` run an example of `examples/python` and
  check what it printed against what the server recorded.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from bulkhead import AgentAccount, Usage
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

EXAMPLES = support_server.REPO / "examples" / "python"


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


def audit(server: support_server.Server, handle: str) -> list[dict[str, Any]]:
    """`GET /v1/agents/{handle}/audit` with the admin token: the agent's events, oldest first."""
    request = urllib.request.Request(
        f"{server.url}/v1/agents/{handle}/audit?limit=1000",
        headers={"Authorization": f"Bearer {server.admin_token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        events: list[dict[str, Any]] = json.load(response)["events"]
    return events


def assert_upstream_saw_only_the_secret(calls: list[dict[str, Any]], secret: str = UPSTREAM_SECRET) -> None:
    """Every request reached the upstream with the real secret and no agent key anywhere."""
    assert calls, "the upstream saw no request"
    for call in list(calls):
        assert call["headers"].get("authorization") == f"Bearer {secret}"
        assert "bk_" not in json.dumps(call), f"an agent key reached the upstream: {call['path']}"


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
        """The agent's audit events, oldest first."""
        return audit(self.server, handle)

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


def start_gateway(
    config: Callable[[str], str] = gateway_config, env: dict[str, str] | None = None
) -> Iterator[Gateway]:
    """Runs the scripted upstream and a server whose `openai` upstream forwards to it.

    `config(llm_url)` is the server's TOML, `env` the server's environment; by default its
    `secret_env` is `UPSTREAM_OPENAI_SECRET` or `OPENAI_API_KEY`, both set to `UPSTREAM_SECRET`.
    """
    llm_url, stop_llm, calls = llm_upstream.start()
    try:
        if env is None:
            env = {"UPSTREAM_OPENAI_SECRET": UPSTREAM_SECRET, "OPENAI_API_KEY": UPSTREAM_SECRET}
        with support_server.start(config=config(llm_url), env=env) as server:
            yield Gateway(server, llm_url, calls)
    finally:
        stop_llm()


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


def check_researcher_and_writer(gateway: Gateway, researcher: AgentAccount, writer: AgentAccount) -> None:
    """After a researcher paid 3 searches at 1.00 and was refused the fourth, and a writer paid 2
    drafts at 0.10: each one's trail, model calls and usage are its own.
    """
    # Each agent's own audit trail holds its own decisions, and only those.
    r_events, w_events = gateway.audit(researcher.handle), gateway.audit(writer.handle)
    assert spends(r_events, "tools:search") == [("allowed", None, "1.00")] * 3 + [
        ("denied", "spending_cap_exceeded", "1.00")
    ]
    assert spends(w_events, "tools:draft") == [("allowed", None, "0.10")] * 2
    assert spends(r_events, "tools:draft") == []
    assert spends(w_events, "tools:search") == []

    # Every LLM call went through the gateway with the agent's own key and is metered to it.
    r_calls, w_calls = gateway.calls_of(researcher.handle), gateway.calls_of(writer.handle)
    assert len(r_calls) == 5  # one before each of the 4 tool calls, one for the final answer
    assert len(w_calls) == 3
    assert_upstream_saw_only_the_secret(r_calls + w_calls)
    wait_for(lambda: settled(gateway, researcher, 5) and settled(gateway, writer, 3))
    assert researcher.usage().window_spent == 3 * Decimal("1.00") + 5 * PRICE_PER_CALL
    assert writer.usage().window_spent == 2 * Decimal("0.10") + 3 * PRICE_PER_CALL


def check_quote_holds(gateway: Gateway, account: AgentAccount) -> None:
    """After three calls of a quote tool holding 0.50 each, whose `cost_of` said 0.12, then 0.90,
    then which failed: the holds, captures and release are in the agent's trail, its model calls
    were made with the model it was given, and it paid 0.62 plus its model calls.
    """
    events = gateway.audit(account.handle)
    tool_events = [(e["action"], e["outcome"], e["amount"]) for e in events if e.get("scope") == "tools:quote"]
    assert tool_events == [("hold", "allowed", "0.50")] * 3
    own = [e for e in events if (e.get("detail") or {}).get("by") != "gateway"]
    assert [(e["action"], e["amount"]) for e in own if e["action"] in ("capture", "release")] == [
        ("capture", "0.12"),
        ("capture", "0.50"),  # it said 0.90: a call costs at most its hold
        ("release", "0.50"),  # the tool failed: nothing charged
    ]
    calls = gateway.calls_of(account.handle)
    assert {c["body"]["model"] for c in calls} == {"house-model-v1"}
    assert len(calls) == 4  # before each quote, and the final answer after the failed one
    wait_for(lambda: settled(gateway, account, 4))
    assert account.usage().window_spent == Decimal("0.62") + 4 * PRICE_PER_CALL


# ---------------------------------------------------------------------------------------------
# The harness: agents on a gateway at `llm_upstream.gateway_config`'s prices


TOOL_SCOPE = "tools:search"
SCOPES = ["llm:openai", TOOL_SCOPE]


class Harness:
    """Agents on the gateway, and what the server and the upstream saw of each."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.server = gateway.server
        self.calls = gateway.calls
        self.accounts: list[AgentAccount] = []

    def account(self, prefix: str, spending_cap: str, scopes: list[str] | None = None) -> AgentAccount:
        """A new agent with its own key (scopes: the model's and the tool's)."""
        account = self.gateway.account(prefix, scopes or SCOPES, spending_cap)
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
        """The agent's raw audit events."""
        return audit(self.server, handle)

    def check_audit(
        self, handle: str, *, allowed: int, denied: int, model_calls: int, tool_scope: str, tool_cost: Decimal
    ) -> None:
        """The agent's own trail has its spends and its gateway leases and settlements, nobody else's."""
        events = self.audit(handle)
        assert {e["agent"] for e in events} == {handle}
        spends = [e for e in events if e["action"] == "spend"]
        assert [e["outcome"] for e in spends] == ["allowed"] * allowed + ["denied"] * denied
        assert {e["scope"] for e in spends} == {tool_scope}
        assert all(Decimal(e["amount"]) == tool_cost for e in spends)
        assert {e["reason"] for e in spends if e["outcome"] == "denied"} <= {"spending_cap_exceeded"}
        by_gateway = [e for e in events if (e.get("detail") or {}).get("by") == "gateway"]
        leases = [e for e in by_gateway if e["action"] == "hold"]
        assert leases
        assert {e["scope"] for e in leases} == {"llm:openai"}
        settlements = [e for e in by_gateway if e["action"] == "capture"]
        assert sum(e["detail"]["calls"] for e in settlements) == model_calls
        assert sum(Decimal(e["amount"]) for e in settlements) == model_calls * llm_upstream.cost_per_call()

    def assert_upstream_saw_only_the_secret(self) -> None:
        """Every request reached the upstream with the real secret and no agent key anywhere."""
        assert_upstream_saw_only_the_secret(self.calls, llm_upstream.SECRET)

    def close(self) -> None:
        for account in self.accounts:
            account.close()


@pytest.fixture(scope="module", name="scripted_gateway")
def scripted_gateway_fixture() -> Iterator[Gateway]:
    """A `bulkhead serve` (one per test module) whose upstream `openai` is the scripted LLM."""
    yield from start_gateway(llm_upstream.gateway_config, {llm_upstream.SECRET_ENV: llm_upstream.SECRET})


@pytest.fixture(name="harness")
def harness_fixture(scripted_gateway: Gateway) -> Iterator[Harness]:
    """A `Harness` on this module's gateway."""
    h = Harness(scripted_gateway)
    yield h
    h.close()


# ---------------------------------------------------------------------------------------------
# The examples of examples/python, run as their README says

EXAMPLE_SECRET = "sk-examples-stand-in"


@pytest.fixture(name="scripted_model")
def scripted_model_fixture() -> Iterator[str]:
    """`python llm_upstream.py --listen 127.0.0.1:PORT`, as the examples' README starts it."""
    for _attempt in range(5):  # another process may take the free port first: try another
        port = support_server.free_port()
        process = subprocess.Popen(
            [sys.executable, llm_upstream.__file__, "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert process.stdout is not None
        if "listening on" in process.stdout.readline():
            break
        process.wait(timeout=10)
    else:
        pytest.fail("the scripted model found no free port")
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)


def run_two_agents_example(script: Path, scripted_model: str) -> None:
    """Run `script` (a `two_agents.py`) as a script with `bulkhead serve` on the examples' config.

    The server runs with `examples/python/bulkhead.toml` (pointed at `scripted_model`), and the
    example with nothing but `BULKHEAD_URL` and `BULKHEAD_ADMIN_TOKEN` from its environment.
    Then what it printed, the audit of each agent and what the model received are checked.
    """
    config = (EXAMPLES / "bulkhead.toml").read_text()
    assert 'base_url = "http://127.0.0.1:9100"' in config
    config = config.replace("http://127.0.0.1:9100", scripted_model)
    with support_server.start(config=config, env={"OPENAI_API_KEY": EXAMPLE_SECRET}) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BULKHEAD_", "OPENAI_"))}
        env.update(BULKHEAD_URL=server.url, BULKHEAD_ADMIN_TOKEN=server.admin_token)
        done = subprocess.run(
            [sys.executable, str(script)],
            env=env,
            cwd=support_server.REPO,
            capture_output=True,
            text=True,
            timeout=80,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    researcher = re.search(r"^(researcher-\w+): (.*)$", out, re.MULTILINE)
    summarizer = re.search(r"^(summarizer-\w+): (.*)$", out, re.MULTILINE)
    assert researcher, out
    assert summarizer, out
    assert researcher.group(2).startswith("Stopped after 4 tool calls: spending_cap_exceeded: ")
    assert summarizer.group(2) == "Done after 2 tool calls."
    # The audit each agent prints: its own searches, the refusal, the gateway's metering. Each
    # model call costs the scripted usage at the examples' prices (`bulkhead.toml`).
    per_call = (
        llm_upstream.PROMPT_TOKENS * Decimal(llm_upstream.INPUT_PER_MILLION)
        + llm_upstream.COMPLETION_TOKENS * Decimal(llm_upstream.OUTPUT_PER_MILLION)
    ) / 1_000_000
    researcher_spent = Decimal("0.30") + 5 * per_call  # three searches, five model calls
    summarizer_spent = Decimal("0.20") + 3 * per_call  # two searches, three model calls

    def shown(amount: Decimal) -> str:
        """An amount as the API renders it: at least two decimals, no trailing zeros beyond."""
        text = f"{amount.normalize():f}"
        whole, _, frac = text.partition(".")
        return f"{whole}.{frac.ljust(2, '0')}"

    assert f"{researcher.group(1)}: spent {shown(researcher_spent)} of its 0.35 cap, 1 denied" in out, out
    assert f"{summarizer.group(1)}: spent {shown(summarizer_spent)} of its 1.00 cap, 0 denied" in out, out
    sections = out.split(f"\n{summarizer.group(1)}: spent")
    researcher_audit = sections[0].split(f"\n{researcher.group(1)}: spent")[1]
    summarizer_audit = sections[1]
    assert len(re.findall(r" spend +allowed +tools:search +0\.10$", researcher_audit, re.MULTILINE)) == 3
    assert len(re.findall(r" spend +denied +spending_cap_exceeded +tools:search", researcher_audit)) == 1
    assert len(re.findall(r" spend +allowed +tools:search +0\.10$", summarizer_audit, re.MULTILINE)) == 2
    assert "denied" not in summarizer_audit.split("\n", 1)[1]
    for section in (researcher_audit, summarizer_audit):
        assert re.search(rf" capture +allowed +{re.escape(shown(per_call))} \(gateway\)$", section, re.MULTILINE)

    # The model saw the real secret on every call, never an agent's key.
    with urllib.request.urlopen(f"{scripted_model}/__calls", timeout=10) as answer:
        calls = json.load(answer)["calls"]
    assert len(calls) == 5 + 3  # the researcher's model calls, then the summarizer's
    assert_upstream_saw_only_the_secret(calls, EXAMPLE_SECRET)


def example_config(llm_url: str) -> str:
    """The examples' own `examples/python/bulkhead.toml`, its upstream moved to `llm_url`."""
    text = (EXAMPLES / "bulkhead.toml").read_text()
    moved = re.sub(r'(?m)^base_url = "http://127\.0\.0\.1:9100"$', f'base_url = "{llm_url}"', text)
    assert moved != text, "examples/python/bulkhead.toml no longer points at the scripted upstream"
    return moved


@pytest.fixture(scope="module", name="example_gateway")
def example_gateway_fixture() -> Iterator[Gateway]:
    """The scripted upstream and a server on the examples' own `bulkhead.toml`."""
    yield from start_gateway(example_config)


def example_price_per_call(config: str) -> Decimal:
    """What the examples' gateway meters for one scripted answer (100 tokens in, 20 out)."""
    rates = dict(re.findall(r'(input|output)_per_million = "([0-9.]+)"', config))
    return (100 * Decimal(rates["input"]) + 20 * Decimal(rates["output"])) / 1_000_000


def settled_usage(account: AgentAccount) -> Usage | None:
    """The agent's usage once the gateway holds nothing more for it."""
    usage = account.usage()
    return usage if usage.window_held == 0 else None


def check_example_output(example_gateway: Gateway, out: str, refusal: str, search_cost: Decimal) -> None:
    """What a `two_agents.py` example printed (`out`) is what the server recorded, per agent.

    `refusal` is how the example shows the researcher's search refused at its cap.
    """
    server = example_gateway.server
    (researcher,) = set(re.findall(r"researcher-[0-9a-f]{6}", out))
    (summarizer,) = set(re.findall(r"summarizer-[0-9a-f]{6}", out))
    assert refusal in out  # the researcher's search, refused at its cap
    assert "Done after 2 tool calls." in out  # the summarizer finished

    def tool_spends(handle: str) -> list[tuple[str, str | None]]:
        return [
            (e["outcome"], e["reason"])
            for e in example_gateway.audit(handle)
            if e["action"] == "spend" and e["scope"] == "tools:search"
        ]

    assert tool_spends(researcher) == [("allowed", None)] * 3 + [("denied", "spending_cap_exceeded")]
    assert tool_spends(summarizer) == [("allowed", None)] * 2
    calls = {h: gateway_calls_settled(example_gateway.audit(h)) for h in (researcher, summarizer)}
    assert calls == {researcher: 5, summarizer: 3}
    assert sum(calls.values()) == len(example_gateway.calls)  # every upstream call was metered to one of them
    price = example_price_per_call(example_config(example_gateway.llm_url))
    for handle, paid_searches in ((researcher, 3), (summarizer, 2)):
        account = AgentAccount(handle, url=server.url, admin_token=server.admin_token)
        usage = wait_for(functools.partial(settled_usage, account))
        assert usage.window_spent == paid_searches * search_cost + calls[handle] * price
        assert f"{handle}: spent {usage.window_spent} of its" in out
