"""The AutoGen example (`examples/python/autogen/two_agents.py`), run end to end.

It runs as a user would run it, in its own process, against a real `bulkhead serve` started with
the examples' own `bulkhead.toml`, whose upstream is the scripted model.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal

import pytest
from autogen_support import Gateway, example_config, gateway_calls_settled, start_gateway, wait_for

from bulkhead import AgentAccount, Usage
from support.server import REPO

EXAMPLE = REPO / "examples" / "python" / "autogen" / "two_agents.py"
SEARCH_COST = Decimal("0.10")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def example_gateway() -> Iterator[Gateway]:
    yield from start_gateway(example_config)


def price_per_call(config: str) -> Decimal:
    """What the examples' gateway meters for one scripted answer (100 tokens in, 20 out)."""
    rates = dict(re.findall(r'(input|output)_per_million = "([0-9.]+)"', config))
    return (100 * Decimal(rates["input"]) + 20 * Decimal(rates["output"])) / 1_000_000


def settled_usage(account: AgentAccount) -> Usage | None:
    """The agent's usage once the gateway holds nothing more for it."""
    usage = account.usage()
    return usage if usage.window_held == 0 else None


def test_example_runs_end_to_end(example_gateway: Gateway) -> None:
    server = example_gateway.server
    env = dict(os.environ, BULKHEAD_URL=server.url, BULKHEAD_ADMIN_TOKEN=server.admin_token)
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], cwd=REPO, env=env, capture_output=True, text=True, timeout=110, check=False
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout

    (researcher,) = set(re.findall(r"researcher-[0-9a-f]{6}", out))
    (summarizer,) = set(re.findall(r"summarizer-[0-9a-f]{6}", out))
    assert "ERROR spending_cap_exceeded" in out  # the researcher's search, refused at its cap
    assert "Done after 2 tool calls." in out  # the summarizer finished

    # What the example printed is what the server recorded, per agent.
    def spends(handle: str) -> list[tuple[str, str | None]]:
        return [
            (e["outcome"], e["reason"])
            for e in example_gateway.audit(handle)
            if e["action"] == "spend" and e["scope"] == "tools:search"
        ]

    assert spends(researcher) == [("allowed", None)] * 3 + [("denied", "spending_cap_exceeded")]
    assert spends(summarizer) == [("allowed", None)] * 2
    calls = {h: gateway_calls_settled(example_gateway.audit(h)) for h in (researcher, summarizer)}
    assert calls == {researcher: 5, summarizer: 3}
    assert sum(calls.values()) == len(example_gateway.calls)  # every upstream call was metered to one of them
    price = price_per_call(example_config(example_gateway.llm_url))
    for handle, paid_searches in ((researcher, 3), (summarizer, 2)):
        account = AgentAccount(handle, url=server.url, admin_token=server.admin_token)
        usage = wait_for(functools.partial(settled_usage, account))
        assert usage.window_spent == paid_searches * SEARCH_COST + calls[handle] * price
        assert f"{handle}: spent {usage.window_spent} of its" in out
