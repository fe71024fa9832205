"""`examples/python/openai_agents/two_agents.py` runs as its README says, end to end.

The scripted model runs as the README starts it (`llm_upstream.py --listen …`), `bulkhead serve`
runs with `examples/python/bulkhead.toml` (pointed at that port), and the example runs as a
script with nothing but `BULKHEAD_URL` and `BULKHEAD_ADMIN_TOKEN` from its environment.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest

from support import llm_upstream
from support import server as support_server

EXAMPLES = support_server.REPO / "examples" / "python"
SCRIPT = EXAMPLES / "openai_agents" / "two_agents.py"
SECRET = "sk-examples-stand-in"

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def scripted_model() -> Iterator[str]:
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


def test_the_example_runs_end_to_end(scripted_model):
    config = (EXAMPLES / "bulkhead.toml").read_text()
    assert 'base_url = "http://127.0.0.1:9100"' in config
    config = config.replace("http://127.0.0.1:9100", scripted_model)
    with support_server.start(config=config, env={"OPENAI_API_KEY": SECRET}) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BULKHEAD_", "OPENAI_"))}
        env.update(BULKHEAD_URL=server.url, BULKHEAD_ADMIN_TOKEN=server.admin_token)
        done = subprocess.run(
            [sys.executable, str(SCRIPT)],
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
    # The audit each agent prints: its own searches, the refusal, the gateway's metering.
    assert f"{researcher.group(1)}: spent 0.31 of its 0.35 cap, 1 denied" in out
    assert f"{summarizer.group(1)}: spent 0.206 of its 1.00 cap, 0 denied" in out
    sections = out.split(f"\n{summarizer.group(1)}: spent")
    researcher_audit = sections[0].split(f"\n{researcher.group(1)}: spent")[1]
    summarizer_audit = sections[1]
    assert len(re.findall(r" spend +allowed +tools:search +0\.10$", researcher_audit, re.MULTILINE)) == 3
    assert len(re.findall(r" spend +denied +spending_cap_exceeded +tools:search", researcher_audit)) == 1
    assert len(re.findall(r" spend +allowed +tools:search +0\.10$", summarizer_audit, re.MULTILINE)) == 2
    assert "denied" not in summarizer_audit.split("\n", 1)[1]
    for audit in (researcher_audit, summarizer_audit):
        assert re.search(r" capture +allowed +0\.002 \(gateway\)$", audit, re.MULTILINE)

    # The model saw the real secret on every call, never an agent's key.
    with urllib.request.urlopen(f"{scripted_model}/__calls", timeout=10) as answer:
        calls = json.load(answer)["calls"]
    assert len(calls) == 5 + 3  # the researcher's model calls, then the summarizer's
    for call in calls:
        assert call["headers"]["authorization"] == f"Bearer {SECRET}"
        assert "bk_" not in json.dumps(call)
