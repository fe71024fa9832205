"""Fixtures shared by the SDK's tests and the framework integrations' tests.

`server`: one real `bulkhead serve` for the whole session (a throwaway data dir, a free port).
`make_account`: a factory of `AgentAccount`s on it, each with a unique handle.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bulkhead import AgentAccount
from support import server as support_server
from support.util import unique_handle


@pytest.fixture(scope="session")
def server() -> Iterator[support_server.Server]:
    """A running `bulkhead serve`, shared by every test of the session."""
    with support_server.start() as s:
        yield s


MakeAccount = Callable[..., AgentAccount]


@pytest.fixture
def make_account(server: support_server.Server) -> Iterator[MakeAccount]:
    """`make_account(scopes=…, spending_cap=…, prefix=…, **fields)` creates an agent with a unique handle.

    Defaults: scopes `["payments:write"]`, cap `"100.00"`. The accounts' connections are closed
    after the test.
    """
    made: list[AgentAccount] = []

    def make(
        scopes: list[str] | None = None,
        spending_cap: Any = "100.00",
        *,
        prefix: str = "t",
        handle: str | None = None,
        **fields: Any,
    ) -> AgentAccount:
        account = AgentAccount.create(
            handle or unique_handle(prefix),
            scopes if scopes is not None else ["payments:write"],
            spending_cap,
            url=server.url,
            admin_token=server.admin_token,
            **fields,
        )
        made.append(account)
        return account

    yield make
    for account in made:
        account.close()


@pytest.fixture
def bulkhead_env(server: support_server.Server, monkeypatch: pytest.MonkeyPatch) -> support_server.Server:
    """`BULKHEAD_URL` and `BULKHEAD_ADMIN_TOKEN` set to the test server's."""
    monkeypatch.setenv("BULKHEAD_URL", server.url)
    monkeypatch.setenv("BULKHEAD_ADMIN_TOKEN", server.admin_token)
    return server


def pytest_configure(config: pytest.Config) -> None:
    """The SDK reads these; a developer's own settings must not leak into the tests."""
    del config
    for name in ("BULKHEAD_URL", "BULKHEAD_ADMIN_TOKEN"):
        os.environ.pop(name, None)
