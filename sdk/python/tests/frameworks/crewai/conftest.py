"""CrewAI tests: a real `bulkhead serve` whose gateway forwards to the scripted LLM upstream.

CrewAI reads its settings when it is imported, so they are set here, before any test module
imports it: no telemetry, no tracing, and a throwaway `HOME` for what it stores.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

_HOME = tempfile.mkdtemp(prefix="bulkhead-crewai-home-")
os.environ.update(
    {
        "HOME": _HOME,
        "CREWAI_DISABLE_TELEMETRY": "true",
        "CREWAI_TRACING_ENABLED": "false",
        "OTEL_SDK_DISABLED": "true",
        "CREWAI_STORAGE_DIR": os.path.join(_HOME, "crewai-storage"),
    }
)
os.environ.pop("OPENAI_API_KEY", None)  # every LLM call must carry an agent's key
os.environ.pop("OPENAI_BASE_URL", None)

from support.frameworks import Gateway, start_gateway  # noqa: E402 - after the environment is set


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    yield from start_gateway()


def pytest_unconfigure(config: pytest.Config) -> None:
    del config
    shutil.rmtree(_HOME, ignore_errors=True)
