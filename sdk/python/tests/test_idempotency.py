"""Money calls carry an idempotency key and are retried with it: a lost answer never charges twice."""

from __future__ import annotations

from decimal import Decimal
from urllib.parse import urlsplit

import pytest

from bulkhead import AgentClient, BulkheadConnectionError
from conftest import MakeAccount
from support.proxy import DroppingProxy

W = "payments:write"


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def test_a_spend_whose_answer_was_lost_is_retried_and_charged_once(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="10.00")
    with (
        DroppingProxy(_port(account.url), drop=["^POST /v1/spend "]) as proxy,
        AgentClient(account.key, url=proxy.url) as client,
    ):
        receipt = client.spend("2.50", scope=W, memo="once")
        # The server answered the first attempt; the client never saw that answer.
        assert len(proxy.dropped) == 1
        assert b" 200 " in proxy.dropped[0].split(b"\r\n", 1)[0]
        assert b'"amount":"2.50"' in proxy.dropped[0]
        spends = [r for r in proxy.requests if r[0].startswith("POST /v1/spend")]
        assert len(spends) == 2
        key = spends[0][1]
        assert key is not None
        assert spends[1][1] == key  # the retry carried the same key
    assert receipt.replayed
    assert receipt.amount == Decimal("2.50")
    assert receipt.remaining == Decimal("7.50")
    assert receipt.id.encode() in proxy.dropped[0]  # the stored answer, replayed
    usage = account.usage()
    assert usage.window_spent == Decimal("2.50")
    assert usage.tx_count == 1
    assert [e.action for e in account.audit() if e.action == "spend"] == ["spend"]


def test_a_read_timeout_is_retried_with_the_same_key(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="10.00")
    with (
        DroppingProxy(_port(account.url), drop=["^POST /v1/spend "], hang=True) as proxy,
        AgentClient(account.key, url=proxy.url, timeout=1.0) as client,
    ):
        receipt = client.spend("1.25", scope=W)
        spends = [r for r in proxy.requests if r[0].startswith("POST /v1/spend")]
        assert len(spends) == 2
        assert spends[0][1] == spends[1][1]
    assert receipt.replayed
    assert account.usage().window_spent == Decimal("1.25")
    assert account.usage().tx_count == 1


def test_hold_and_capture_whose_answers_were_lost(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="10.00")
    with (
        DroppingProxy(_port(account.url), drop=["^POST /v1/holds ", "/capture "]) as proxy,
        AgentClient(account.key, url=proxy.url) as client,
    ):
        hold = client.hold("1.00", scope=W)
        settlement = hold.capture("0.40")
        assert len(proxy.dropped) == 2
    assert hold.replayed
    assert settlement.replayed
    assert (settlement.captured, settlement.released) == (Decimal("0.40"), Decimal("0.60"))
    usage = account.usage()
    assert (usage.window_spent, usage.window_held) == (Decimal("0.40"), Decimal("0.00"))
    actions = [e.action for e in account.audit()]
    assert actions.count("hold") == 1
    assert actions.count("capture") == 1


def test_every_money_call_sends_a_fresh_key_unless_given_one(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="10.00")
    with DroppingProxy(_port(account.url)) as proxy, AgentClient(account.key, url=proxy.url) as client:
        client.spend("1.00", scope=W)
        client.spend("1.00", scope=W)
        client.spend("1.00", scope=W, idempotency_key="invoice-4711")
        with client.hold("1.00", scope=W) as hold:
            hold.capture("0.50")
        client.me()
    keys = [key for _, key in proxy.requests]
    assert len(keys) == 6
    money, me = keys[:5], keys[5]
    assert all(k is not None for k in money)
    assert len(set(money)) == 5
    assert money[2] == "invoice-4711"
    assert me is None  # reads carry none
    assert account.usage().window_spent == Decimal("3.50")


def test_retries_are_bounded(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="10.00")
    with DroppingProxy(_port(account.url), drop=["^POST /v1/spend "] * 10) as proxy:
        client = AgentClient(account.key, url=proxy.url, max_retries=2)
        with pytest.raises(BulkheadConnectionError, match="outcome is unknown"):
            client.spend("1.00", scope=W, idempotency_key="bounded-1")
        assert len(proxy.requests) == 3
        client.close()
    # Three attempts reached the server; one charge.
    assert account.usage().window_spent == Decimal("1.00")
    # The same key later learns the outcome without paying again.
    with account.client() as direct:
        receipt = direct.spend("1.00", scope=W, idempotency_key="bounded-1")
    assert receipt.replayed
    assert account.usage().window_spent == Decimal("1.00")
