"""Amounts: exact decimal strings on the wire, `Decimal` back, nothing rounded, bad input never sent."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import httpx
import pytest

from bulkhead import AgentAccount, AgentClient
from bulkhead._amounts import amount_text
from conftest import MakeAccount
from support.server import Server
from support.util import unique_handle

W = "payments:write"


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (50.00, "50.0"),
        (2.5, "2.5"),
        (0.1, "0.1"),
        (0.000150, "0.00015"),
        (1e-6, "0.000001"),
        (1e12, "1000000000000.0"),
        (3, "3"),
        (0, "0"),
        (Decimal("2.50"), "2.50"),
        (Decimal("0.000150"), "0.000150"),
        (Decimal("1E+3"), "1000"),
        (Decimal("1.5000000"), "1.500000"),  # trailing zeros are no precision
        ("2.50", "2.50"),
        ("0.000001", "0.000001"),
        ("7", "7"),
        (".5", "0.5"),
    ],
)
def test_amount_text(value: Any, wire: str) -> None:
    assert amount_text(value) == wire


@pytest.mark.parametrize(
    "value",
    [
        "0.0000001",
        "1.1234567",
        Decimal("0.0000001"),
        Decimal("1E-7"),
        1e-7,
        0.1 + 0.2,  # 0.30000000000000004: the float is not the decimal it looks like
        float("nan"),
        float("inf"),
        float("-inf"),
        Decimal("NaN"),
        Decimal("Infinity"),
        -1,
        -0.5,
        Decimal("-2.50"),
        "-2.50",
        "1e3",
        "",
        " 1",
        "1,000",
        "abc",
        "NaN",
        "Infinity",
    ],
)
def test_not_an_amount_is_a_value_error(value: Any) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message names the problem; any ValueError
        amount_text(value)


@pytest.mark.parametrize("value", [True, False, None, [1], b"1"])
def test_not_an_amount_type_is_a_type_error(value: Any) -> None:
    with pytest.raises(TypeError):
        amount_text(value)


class Recorder:
    """An `httpx.Client` whose requests are recorded (method, path, JSON body)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.http = httpx.Client(event_hooks={"request": [self._record]})

    def _record(self, request: httpx.Request) -> None:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, request.url.path, body))


def test_floats_go_on_the_wire_as_their_shortest_repr(make_account: MakeAccount, server: Server) -> None:
    account = make_account(spending_cap=50.00, per_tx_limit=5.00)
    agent = account.agent
    assert agent is not None
    assert agent.spending_cap == Decimal("50.00")
    assert agent.per_tx_limit == Decimal("5.00")
    recorder = Recorder()
    client = AgentClient(account.key, url=server.url, http_client=recorder.http)
    receipt = client.spend(0.1, scope=W)
    assert recorder.requests == [("POST", "/v1/spend", {"scope": W, "amount": "0.1"})]
    assert receipt.amount == Decimal("0.10")
    assert isinstance(receipt.amount, Decimal)
    # Ten spends of the float 0.1 are exactly 1.00: never 0.9999999999999999.
    for _ in range(9):
        receipt = client.spend(0.1, scope=W)
    assert receipt.remaining == Decimal("49.00")
    assert account.usage().window_spent == Decimal("1.00")
    recorder.http.close()


def test_every_kind_of_amount(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="100.00")
    client = account.client()
    spent = [
        client.spend(50.00, scope=W).amount,
        client.spend(Decimal("0.000150"), scope=W).amount,
        client.spend(7, scope=W).amount,
        client.spend("2.50", scope=W).amount,
    ]
    assert spent == [Decimal("50"), Decimal("0.00015"), Decimal("7"), Decimal("2.5")]
    usage = account.usage()
    assert usage.window_spent == Decimal("59.500150")
    assert client.spend("0.000001", scope=W).remaining == Decimal("40.499849")


def test_seven_decimals_are_refused_and_nothing_is_sent(make_account: MakeAccount, server: Server) -> None:
    account = make_account(spending_cap="10.00")
    recorder = Recorder()
    client = AgentClient(account.key, url=server.url, http_client=recorder.http)
    with pytest.raises(ValueError, match="more than 6 decimal places"):
        client.spend("0.0000001", scope=W)
    with pytest.raises(ValueError, match="more than 6 decimal places"):
        client.hold(Decimal("1.0000001"), scope=W)
    with pytest.raises(ValueError, match="more than 6 decimal places"):
        client.capture("hold_x", 0.1 + 0.2)
    with pytest.raises(ValueError, match="more than 6 decimal places"):
        client.spawn(unique_handle(), [W], "0.0000001")
    with pytest.raises(TypeError):
        client.spend(True, scope=W)
    with pytest.raises(ValueError, match="finite"):
        client.spend(float("nan"), scope=W)
    with pytest.raises(ValueError, match="negative"):
        client.spend(-1, scope=W)
    assert recorder.requests == []
    with pytest.raises(ValueError, match="more than 6 decimal places"):
        AgentAccount.create(unique_handle(), [W], "1.0000001", url=server.url, admin_token=server.admin_token)
    # The server saw nothing: no decision, no audit event.
    assert account.usage().tx_count == 0
    assert account.usage().denied_count == 0
    assert [e.action for e in account.audit()] == ["agent.create"]
    recorder.http.close()


def test_remaining_is_exact_to_the_micro_unit(make_account: MakeAccount) -> None:
    client = make_account(spending_cap="1.000000").client()
    receipt = None
    for _ in range(3):
        receipt = client.spend("0.333333", scope=W)
    assert receipt is not None
    assert receipt.remaining == Decimal("0.000001")
    assert client.spend("0.000001", scope=W).remaining == Decimal("0")
