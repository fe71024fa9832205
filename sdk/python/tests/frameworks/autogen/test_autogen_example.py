"""The AutoGen example (`examples/python/autogen/two_agents.py`), run end to end.

It runs as a user would run it, in its own process, against a real `bulkhead serve` started with
the examples' own `bulkhead.toml`, whose upstream is the scripted model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal

import pytest

from support.frameworks import Gateway, check_example_output, example_gateway_fixture  # noqa: F401 - a fixture
from support.server import REPO

EXAMPLE = REPO / "examples" / "python" / "autogen" / "two_agents.py"
SEARCH_COST = Decimal("0.10")

pytestmark = pytest.mark.timeout(120)


def test_example_runs_end_to_end(example_gateway: Gateway) -> None:
    server = example_gateway.server
    env = dict(os.environ, BULKHEAD_URL=server.url, BULKHEAD_ADMIN_TOKEN=server.admin_token)
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], cwd=REPO, env=env, capture_output=True, text=True, timeout=110, check=False
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout

    check_example_output(example_gateway, out, "ERROR spending_cap_exceeded", SEARCH_COST)
