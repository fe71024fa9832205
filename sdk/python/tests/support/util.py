"""Small test helpers that need nothing but the standard library."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable


def unique_handle(prefix: str = "t") -> str:
    """A handle no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Polls `condition` until it holds; raises `AssertionError` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
