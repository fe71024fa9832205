"""32 threads sharing one client race one cap: never a micro-unit over, and the ledger is exact."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

from bulkhead import BulkheadError, SpendingCapExceeded
from conftest import MakeAccount

W = "payments:write"
THREADS = 32
ATTEMPTS_PER_THREAD = 5
AMOUNT = Decimal("0.03")
CAP = Decimal("1.00")


def test_threads_racing_one_cap_never_overspend(make_account: MakeAccount) -> None:
    account = make_account(spending_cap=CAP, breaker={"denials": 0})
    client = account.client()
    start = threading.Barrier(THREADS)
    lock = threading.Lock()
    allowed: list[Decimal] = []
    denied: list[str] = []
    other: list[BaseException] = []

    def worker() -> None:
        start.wait()
        for _ in range(ATTEMPTS_PER_THREAD):
            try:
                receipt = client.spend(AMOUNT, scope=W)
            except SpendingCapExceeded as e:
                with lock:
                    denied.append(e.code)
            except BulkheadError as e:  # pragma: no cover - reported below
                with lock:
                    other.append(e)
            else:
                with lock:
                    allowed.append(receipt.amount)

    with ThreadPoolExecutor(THREADS) as pool:
        for f in [pool.submit(worker) for _ in range(THREADS)]:
            f.result()
    client.close()

    assert other == []
    assert len(allowed) + len(denied) == THREADS * ATTEMPTS_PER_THREAD
    # Every spend that fitted was allowed, and none that did not: 33 × 0.03 = 0.99.
    assert len(allowed) == int(CAP / AMOUNT) == 33
    usage = account.usage()
    spent = usage.window_spent
    assert spent == len(allowed) * AMOUNT == sum(allowed)
    assert spent <= CAP
    assert max(Decimal(0), spent - CAP) == 0  # overspend
    assert usage.tx_count == len(allowed)
    assert usage.denied_count == len(denied)
    events = account.audit(limit=1000)
    assert sum(1 for e in events if e.action == "spend" and e.outcome == "allowed") == len(allowed)
    assert sum(1 for e in events if e.action == "spend" and e.outcome == "denied") == len(denied)


def test_concurrent_calls_with_one_key_charge_once(make_account: MakeAccount) -> None:
    account = make_account(spending_cap="10.00")
    client = account.client()
    start = threading.Barrier(16)

    def spend() -> str:
        start.wait()
        return client.spend("0.75", scope=W, idempotency_key="order-2026-12-05").id

    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda _: spend(), range(16)))
    client.close()
    assert len(set(ids)) == 1
    usage = account.usage()
    assert usage.window_spent == Decimal("0.75")
    assert usage.tx_count == 1
