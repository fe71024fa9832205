"""AutoGen tests: a real `bulkhead serve` whose gateway forwards to the scripted LLM upstream."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.frameworks import Gateway, start_gateway


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    yield from start_gateway()
