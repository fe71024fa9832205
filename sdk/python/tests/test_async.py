"""The asyncio twin: the same calls, awaited, with asyncio.gather concurrency."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from bulkhead import (
    AsyncAgentAccount,
    AsyncAgentClient,
    AsyncHold,
    BulkheadError,
    CredentialRevoked,
    HoldClosed,
    SpendingCapExceeded,
)
from conftest import MakeAccount
from support.server import Server
from support.util import unique_handle

W = "payments:write"


def test_async_account_client_spend_and_holds(server: Server) -> None:
    async def main() -> None:
        account = await AsyncAgentAccount.create(
            unique_handle("async"),
            [W],
            "10.00",
            per_tx_limit=5.00,
            url=server.url,
            admin_token=server.admin_token,
        )
        assert account.key.startswith("bk_")
        async with account.async_client() as client:
            assert isinstance(client, AsyncAgentClient)
            receipt = await client.spend("2.50", scope=W)
            assert (receipt.amount, receipt.remaining) == (Decimal("2.50"), Decimal("7.50"))

            async with client.hold("1.00", scope=W) as hold:
                assert isinstance(hold, AsyncHold)
                assert (await account.usage()).window_held == Decimal("1.00")
                settlement = await hold.capture("0.40")
            assert (settlement.captured, settlement.released) == (Decimal("0.40"), Decimal("0.60"))

            async with client.hold("2.00", scope=W) as hold:
                pass  # no capture: released on the way out
            assert hold.closed

            with pytest.raises(RuntimeError):
                async with client.hold("3.00", scope=W):
                    raise RuntimeError("tool failed")

            awaited = await client.hold("1.00", scope=W)
            assert not awaited.closed
            await awaited.release()
            with pytest.raises(HoldClosed):
                await awaited.release()

            usage = await account.usage()
            assert (usage.window_spent, usage.window_held) == (Decimal("2.90"), Decimal("0.00"))
            me = await client.me()
            assert me.handle == account.handle
            events = await client.me_audit()
            assert [e.action for e in events].count("release") == 3
            assert client.base_url("openai") == f"{server.url}/proxy/openai"
        await account.aclose()

    asyncio.run(main())


def test_async_gather_races_one_cap(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="1.00", breaker={"denials": 0})

    async def main() -> tuple[int, int]:
        async with account.async_client() as client:

            async def one() -> bool:
                try:
                    await client.spend("0.07", scope=W)
                except SpendingCapExceeded:
                    return False
                return True

            results = await asyncio.gather(*(one() for _ in range(40)))
        return results.count(True), results.count(False)

    allowed, denied = asyncio.run(main())
    assert allowed == 14  # 14 × 0.07 = 0.98
    assert denied == 26
    assert account.usage().window_spent == Decimal("0.98")


def test_async_spawn_and_cascading_revoke(server: Server) -> None:
    async def main() -> None:
        parent = await AsyncAgentAccount.create(
            unique_handle("parent"), ["spawn:agents", W], "10.00", url=server.url, admin_token=server.admin_token
        )
        parent_client = parent.client()
        same = await AsyncAgentAccount.from_key(parent.key, url=server.url)
        assert same.handle == parent.handle
        children = await asyncio.gather(
            *(parent_client.spawn(unique_handle(f"child{i}"), [W], "2.00") for i in range(3))
        )
        assert all(c.agent is not None and c.agent.parent == parent.handle for c in children)
        clients = [c.client() for c in children]
        receipts = await asyncio.gather(*(c.spend("1.00", scope=W) for c in clients))
        assert all(r.remaining == Decimal("1.00") for r in receipts)
        assert (await parent.usage()).window_spent == Decimal("3.00")

        # A child revoked with its parent's key (no admin token in the child's account).
        assert await children[0].revoke() == [children[0].handle]
        revoked = await parent.revoke(reason="done")
        assert revoked[0] == parent.handle
        assert set(revoked) >= {c.handle for c in children[1:]}
        for c in clients:
            with pytest.raises(CredentialRevoked):
                await c.spend("0.10", scope=W)
        admin_view = AsyncAgentAccount(parent.handle, url=server.url, admin_token=server.admin_token)
        assert (await admin_view.refresh()).status == "revoked"
        await admin_view.aclose()
        for c in clients:
            await c.aclose()
        await parent_client.aclose()

    asyncio.run(main())


def test_async_errors_are_the_same_classes(server: Server) -> None:
    async def main() -> BulkheadError:
        async with AsyncAgentClient("bk_" + "y" * 40, url=server.url) as client:
            try:
                await client.spend("1.00", scope=W)
            except BulkheadError as e:
                return e
        raise AssertionError("no error")

    err = asyncio.run(main())
    assert (err.status, err.code) == (401, "invalid_credentials")
    with pytest.raises(ValueError, match="more than 6 decimal places"):
        AsyncAgentClient("bk_x", url=server.url).hold("0.0000001", scope=W)
