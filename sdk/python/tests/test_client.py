"""The synchronous surface against a real server: every call of AgentAccount, AgentClient and Hold."""

from __future__ import annotations

from decimal import Decimal

import pytest

from bulkhead import (
    AgentAccount,
    AgentClient,
    AgentSuspended,
    CredentialRevoked,
    HoldClosed,
    InvalidAmount,
    InvalidCredentials,
    RateLimit,
    Receipt,
    Settlement,
)
from conftest import MakeAccount
from support.server import Server
from support.util import unique_handle


def test_create_takes_every_field(make_account: MakeAccount) -> None:
    account = make_account(
        ["payments:write", "invoices:read"],
        "50.00",
        window="1h",
        per_tx_limit="5.00",
        lifetime_cap="500.00",
        rate_limit=RateLimit(60, "1m"),
        expires_in="30d",
        labels={"team": "billing"},
        breaker={"denials": 10, "window": "30s"},
        enforce=True,
    )
    assert account.key.startswith("bk_")
    agent = account.agent
    assert agent is not None
    assert agent.handle == account.handle
    assert agent.scopes == ("payments:write", "invoices:read")
    assert agent.spending_cap == Decimal("50.00")
    assert agent.window in ("1h", "60m")  # the server may render it in minutes
    assert agent.per_tx_limit == Decimal("5.00")
    assert agent.lifetime_cap == Decimal("500.00")
    assert agent.rate_limit is not None
    assert agent.rate_limit.requests == 60
    assert agent.rate_limit.per in ("1m", "60s")  # the server may render it in seconds
    assert agent.expires_at is not None
    assert agent.created_at is not None
    assert 29 * 86400 < (agent.expires_at - agent.created_at).total_seconds() <= 30 * 86400
    assert dict(agent.labels) == {"team": "billing"}
    assert agent.breaker is not None
    assert agent.breaker["denials"] == 10
    assert agent.status == "active"
    assert agent.parent is None


def test_defaults_of_create(make_account: MakeAccount) -> None:
    agent = make_account(["payments:write"], 7).refresh()
    assert agent.window == "24h"
    assert agent.per_tx_limit == Decimal("7.00")
    assert agent.lifetime_cap is None
    assert agent.rate_limit is None


def test_spend_returns_a_receipt_with_exact_remaining(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="50.00", lifetime_cap="60.00")
    with account.client() as client:
        receipt = client.spend("2.50", scope="payments:write", memo="invoice 4711")
        assert isinstance(receipt, Receipt)
        assert receipt.id.startswith("sp_")
        assert receipt.amount == Decimal("2.50")
        assert receipt.remaining == Decimal("47.50")
        assert receipt.remaining_lifetime == Decimal("57.50")
        assert receipt.window_resets_at is not None
        assert not receipt.replayed
        second = client.spend("0.000001", scope="payments:write")
        assert second.remaining == Decimal("47.499999")
    usage = account.usage()
    assert usage.window_spent == Decimal("2.500001")
    assert usage.lifetime_spent == Decimal("2.500001")
    assert usage.tx_count == 2
    events = account.audit()
    spends = [e for e in events if e.action == "spend"]
    assert [e.amount for e in spends] == [Decimal("2.50"), Decimal("0.000001")]
    assert "invoice 4711" in str(spends[0].raw["detail"])


def test_hold_capture_and_release(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="10.00")
    client = account.client()
    hold = client.hold("1.00", scope="payments:write", expires_in="2m")
    assert hold.id.startswith("hold_")
    assert hold.amount == Decimal("1.00")
    assert hold.remaining == Decimal("9.00")
    assert hold.expires_at is not None
    assert not hold.closed
    assert account.usage().window_held == Decimal("1.00")
    settlement = hold.capture("0.40")
    assert isinstance(settlement, Settlement)
    assert (settlement.captured, settlement.released) == (Decimal("0.40"), Decimal("0.60"))
    assert hold.closed
    usage = account.usage()
    assert (usage.window_spent, usage.window_held) == (Decimal("0.40"), Decimal("0.00"))
    with pytest.raises(HoldClosed) as caught:
        hold.capture("0.10")
    assert caught.value.status == 409

    other = client.hold(2, scope="payments:write")
    released = other.release()
    assert (released.captured, released.released) == (Decimal("0"), Decimal("2.00"))
    assert account.usage().window_held == Decimal("0.00")
    client.close()


def test_capture_more_than_held_is_invalid_amount(make_account: MakeAccount) -> None:
    client = make_account().client()
    with client.hold("1.00", scope="payments:write") as hold, pytest.raises(InvalidAmount):
        hold.capture("1.01")
    # The failed capture closed nothing, so leaving the block released the hold.
    assert hold.settlement is not None
    assert hold.settlement.released == Decimal("1.00")
    with pytest.raises(HoldClosed):
        client.release(hold.id)


def test_hold_context_manager_captures(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="10.00")
    client = account.client()
    with client.hold("1.00", scope="payments:write") as hold:
        hold.capture("0.40")
    usage = account.usage()
    assert (usage.window_spent, usage.window_held) == (Decimal("0.40"), Decimal("0.00"))


def test_leaving_the_block_without_capture_releases(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="10.00")
    client = account.client()
    with client.hold("3.00", scope="payments:write") as hold:
        assert account.usage().window_held == Decimal("3.00")
    assert hold.closed
    assert hold.settlement is not None
    assert hold.settlement.released == Decimal("3.00")
    usage = account.usage()
    assert (usage.window_spent, usage.window_held) == (Decimal("0.00"), Decimal("0.00"))


def test_an_exception_in_the_block_releases(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="10.00")
    client = account.client()
    held = []

    def tool() -> None:
        with client.hold("4.00", scope="payments:write"):
            held.append(account.usage().window_held)
            raise RuntimeError("tool failed")

    with pytest.raises(RuntimeError, match="tool failed"):
        tool()
    assert held == [Decimal("4.00")]
    usage = account.usage()
    assert (usage.window_spent, usage.window_held) == (Decimal("0.00"), Decimal("0.00"))
    assert [e.action for e in account.audit()][-2:] == ["hold", "release"]


def test_a_hold_closed_elsewhere_leaves_the_block_quietly(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="10.00")
    client = account.client()
    with client.hold("1.00", scope="payments:write") as hold:
        client.release(hold.id)  # by id, as another process would
    assert account.usage().window_held == Decimal("0.00")


def test_me_and_me_audit(make_account: MakeAccount) -> None:
    account = make_account(["payments:write", "invoices:read"], "20.00")
    client = account.client()
    client.spend("1.25", scope="payments:write")
    me = client.me()
    assert me.handle == account.handle
    assert me.scopes == ("payments:write", "invoices:read")
    assert me.usage is not None
    assert me.usage.window_spent == Decimal("1.25")
    assert me.usage.utilization == pytest.approx(1.25 / 20)
    events = client.me_audit()
    assert [e.action for e in events] == ["agent.create", "spend"]
    assert events[1].outcome == "allowed"
    assert events[1].amount == Decimal("1.25")
    assert events[1].prev_hash == events[0].hash
    assert events[1].seq > events[0].seq
    assert events[0].detail is not None
    assert events[0].detail["by"] == "admin"
    assert events[1].reference is not None
    assert events[1].reference.startswith("sp_")
    page = client.me_audit(limit=1)
    assert [e.seq for e in page] == [events[0].seq]
    assert [e.seq for e in client.me_audit(after=events[0].seq)] == [events[1].seq]


def test_from_key(make_account: MakeAccount, server: Server) -> None:
    account = make_account(spending_cap="5.00")
    account.client().spend("1.00", scope="payments:write")
    same = AgentAccount.from_key(account.key, url=server.url)
    assert same.handle == account.handle
    assert same.key == account.key
    assert same.usage().window_spent == Decimal("1.00")
    with same.client() as client:
        assert client.spend("0.50", scope="payments:write").remaining == Decimal("3.50")
    with pytest.raises(InvalidCredentials):
        AgentAccount.from_key("bk_" + "A" * 40, url=server.url)


def test_client_from_key_and_environment(make_account: MakeAccount, bulkhead_env: Server) -> None:
    account = make_account()
    client = AgentClient(account.key)  # BULKHEAD_URL
    assert client.url == bulkhead_env.url
    assert client.key == account.key
    assert client.me().handle == account.handle
    env_account = AgentAccount.create(unique_handle("env"), ["payments:write"], "1.00")  # BULKHEAD_ADMIN_TOKEN
    assert env_account.refresh().spending_cap == Decimal("1.00")


def test_create_without_admin_token_is_refused_before_sending(server: Server) -> None:
    with pytest.raises(ValueError, match="admin token"):
        AgentAccount.create(unique_handle(), ["payments:write"], "1.00", url=server.url)


def test_base_url(make_account: MakeAccount, server: Server) -> None:
    client = make_account().client()
    assert client.base_url("openai") == f"{server.url}/proxy/openai"
    assert AgentClient("bk_x", url="http://example.test:9/").base_url("anthropic") == (
        "http://example.test:9/proxy/anthropic"
    )


def test_spawn_and_cascading_revoke(make_account: MakeAccount) -> None:
    parent = make_account(["spawn:agents", "payments:write"], "10.00", prefix="parent")
    parent_client = parent.client()
    child = parent_client.spawn(
        handle=unique_handle("child"), scopes=["payments:write"], spending_cap="4.00", per_tx_limit="2.00"
    )
    assert child.key.startswith("bk_")
    assert child.key != parent.key
    assert child.agent is not None
    assert child.agent.parent == parent.handle
    child_client = child.client()
    assert child_client.spend("1.50", scope="payments:write").remaining == Decimal("2.50")
    # A child's spend counts against its parent.
    assert parent.usage().window_spent == Decimal("1.50")

    revoked = parent.revoke(reason="done")
    assert revoked[0] == parent.handle
    assert set(revoked) == {parent.handle, child.handle}
    with pytest.raises(CredentialRevoked) as caught:
        child_client.spend("0.10", scope="payments:write")
    assert caught.value.status == 401
    assert caught.value.code == "credential_revoked"
    with pytest.raises(CredentialRevoked):
        parent_client.me()
    assert set(parent.revoke()) == set(revoked)  # idempotent


def test_a_spawned_child_revokes_with_its_parents_key(make_account: MakeAccount) -> None:
    parent = make_account(["spawn:agents", "payments:write"], "10.00", prefix="parent")
    client = parent.client()
    child = client.spawn(unique_handle("child"), ["spawn:agents", "payments:write"], "5.00")
    grandchild = child.client().spawn(unique_handle("grandchild"), ["payments:write"], "1.00")
    assert grandchild.agent is not None
    assert grandchild.agent.parent == child.handle
    # No admin token in these accounts: the revocation goes with the parent's key.
    assert set(child.revoke()) == {child.handle, grandchild.handle}
    with pytest.raises(CredentialRevoked):
        grandchild.client().spend("0.10", scope="payments:write")
    assert client.spend("0.10", scope="payments:write").amount == Decimal("0.10")  # the parent lives on
    assert parent.refresh().status == "active"


def test_client_revokes_a_descendant(make_account: MakeAccount) -> None:
    parent = make_account(["spawn:agents", "payments:write"], "10.00", prefix="parent")
    client = parent.client()
    child = client.spawn(unique_handle("child"), ["payments:write"], "5.00")
    assert client.revoke(child.handle, reason="runaway") == [child.handle]
    with pytest.raises(CredentialRevoked):
        child.refresh()  # with the child's own key: no admin token here
    assert client.me().status == "active"


def test_suspend_and_resume(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="10.00")
    client = account.client()
    suspended = account.suspend(reason="investigating")
    assert suspended.status == "suspended"
    with pytest.raises(AgentSuspended):
        client.spend("1.00", scope="payments:write")
    assert account.resume().status == "active"
    assert client.spend("1.00", scope="payments:write").remaining == Decimal("9.00")


def test_rotate_key_and_update(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="10.00")
    client = account.client()
    client.spend("1.00", scope="payments:write")
    old = account.key
    new = account.rotate_key()
    assert new != old
    assert account.key == new
    with pytest.raises(InvalidCredentials):
        client.spend("1.00", scope="payments:write")
    assert account.client().spend("1.00", scope="payments:write").remaining == Decimal("8.00")

    agent = account.update(spending_cap=20.5, labels={"team": "ops"})
    assert agent.spending_cap == Decimal("20.50")
    assert dict(agent.labels) == {"team": "ops"}


def test_repr_hides_the_key(make_account: MakeAccount) -> None:
    account = make_account()
    assert account.key not in repr(account)
    assert account.key not in repr(account.client())


def test_a_shadow_agent_records_what_its_limits_would_do(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="1.00", enforce=False)
    agent = account.agent
    assert agent is not None
    assert agent.enforce is False
    client = account.client()
    assert client.spend("0.60", scope="payments:write").shadow_denied is None
    receipt = client.spend("0.60", scope="payments:write")  # over the cap: let through, recorded
    assert receipt.shadow_denied == "spending_cap_exceeded"
    assert account.usage().window_spent == Decimal("1.20")
