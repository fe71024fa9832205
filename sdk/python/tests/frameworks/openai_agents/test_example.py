"""`examples/python/openai_agents/two_agents.py` runs as its README says, end to end.

The scripted model runs as the README starts it (`llm_upstream.py --listen …`), `bulkhead serve`
runs with `examples/python/bulkhead.toml` (pointed at that port), and the example runs as a
script with nothing but `BULKHEAD_URL` and `BULKHEAD_ADMIN_TOKEN` from its environment.
"""

from __future__ import annotations

import pytest

from support.frameworks import EXAMPLES, run_two_agents_example, scripted_model_fixture  # noqa: F401 - a fixture

SCRIPT = EXAMPLES / "openai_agents" / "two_agents.py"

pytestmark = pytest.mark.timeout(90)


def test_the_example_runs_end_to_end(scripted_model):
    run_two_agents_example(SCRIPT, scripted_model)
