"""The CrewAI example (`examples/python/crewai/two_agents.py`), run end to end.

It runs as a script (`__main__`) against a real `bulkhead serve` started with the examples' own
`bulkhead.toml`, whose upstream is the scripted model. It runs in this process, which has
imported CrewAI already: importing it again in a new one would take most of the test's time.
"""

from __future__ import annotations

import runpy
from decimal import Decimal

import pytest

from support.frameworks import Gateway, check_example_output, example_gateway_fixture  # noqa: F401 - a fixture
from support.server import REPO

EXAMPLE = REPO / "examples" / "python" / "crewai" / "two_agents.py"
SEARCH_COST = Decimal("0.10")

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # raised inside CrewAI 1.15 itself
]


def test_example_runs_end_to_end(
    example_gateway: Gateway, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server = example_gateway.server
    monkeypatch.setenv("BULKHEAD_URL", server.url)
    monkeypatch.setenv("BULKHEAD_ADMIN_TOKEN", server.admin_token)
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out

    check_example_output(example_gateway, out, "refused: spending_cap_exceeded", SEARCH_COST)
