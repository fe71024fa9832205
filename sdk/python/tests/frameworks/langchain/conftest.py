"""Fixtures for the LangChain integration's tests: a scripted LLM behind a real gateway.

`llm_upstream` plays the model; a `bulkhead serve` (one per module) forwards `/proxy/openai/…` to
it with the real secret and meters each call. `harness` makes agents on that server and reads
back what each of them did: its model calls at the upstream, its usage once settled, its audit.
"""

from __future__ import annotations

from support.frameworks import harness_fixture, scripted_gateway_fixture  # noqa: F401 - the fixtures
