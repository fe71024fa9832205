"""Latency and throughput of `AgentClient.spend` against a real server.

Latency: N sequential calls each of (a) a bare keep-alive `httpx` GET /healthz, (b) a bare
keep-alive `httpx` POST /v1/spend with the same body and headers the SDK sends, and (c)
`client.spend`, after a warm-up, in interleaved rounds so that drift hits all three alike. The
SDK's added p50 is (c) - (a); its own overhead is (c) - (b).

Throughput: THREADS threads share one client and spend in a loop; afterwards the agent's window
spend must equal calls x amount exactly.

    python bench/bench_spend.py                       # starts $BULKHEAD_BIN on a temp data dir
    python bench/bench_spend.py --url URL --admin-token TOKEN
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import httpx

from bulkhead import AgentAccount, AgentClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SCOPE = "bench:spend"


def percentile(sorted_ns: list[int], q: float) -> float:
    """The q-quantile (0..1) of sorted nanoseconds, in milliseconds (nearest rank)."""
    index = min(len(sorted_ns) - 1, max(0, round(q * len(sorted_ns)) - 1))
    return sorted_ns[index] / 1e6


def timed(fn: Callable[[], object], n: int, out: list[int]) -> None:
    for _ in range(n):
        start = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - start)


def latency(url: str, account: AgentAccount, n: int, warmup: int, rounds: int) -> dict[str, list[int]]:
    key = account.key
    bare = httpx.Client(timeout=30)
    client = account.client()
    body = json.dumps({"scope": SCOPE, "amount": "0.01"}, separators=(",", ":")).encode()

    def healthz() -> None:
        r = bare.get(f"{url}/healthz")
        assert r.status_code == 200

    def bare_spend() -> None:
        r = bare.post(
            f"{url}/v1/spend",
            content=body,
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/json",
                "Idempotency-Key": f"bench-{uuid.uuid4().hex}",
            },
        )
        assert r.status_code == 200, r.text
        r.json()

    def sdk_spend() -> None:
        client.spend("0.01", scope=SCOPE)

    cases = {"healthz (bare httpx)": healthz, "spend (bare httpx)": bare_spend, "client.spend (SDK)": sdk_spend}
    samples: dict[str, list[int]] = {name: [] for name in cases}
    for fn in cases.values():
        timed(fn, warmup, [])
    per_round = max(1, n // rounds)
    for _ in range(rounds):
        for name, fn in cases.items():
            timed(fn, per_round, samples[name])
    bare.close()
    client.close()
    return samples


def client_side(n: int) -> tuple[float, float]:
    """p50 of a bare httpx POST and of client.spend over an in-process transport: the SDK's own CPU."""
    answer = json.dumps(
        {
            "id": "sp_0123456789012345678901",
            "amount": "0.01",
            "remaining": {"window": "47.50", "lifetime": None},
            "window_resets_at": "2026-12-06T03:17:59.177Z",
        }
    ).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=answer, headers={"content-type": "application/json"})

    transport = httpx.MockTransport(handler)
    bare = httpx.Client(transport=transport)
    client = AgentClient("bk_bench", url="http://bench.invalid", http_client=httpx.Client(transport=transport))
    body = json.dumps({"scope": SCOPE, "amount": "0.01"}, separators=(",", ":")).encode()

    def bare_post() -> None:
        bare.post(
            "http://bench.invalid/v1/spend",
            content=body,
            headers={
                "Authorization": "Bearer bk_bench",
                "Content-Type": "application/json",
                "Idempotency-Key": f"bench-{uuid.uuid4().hex}",
            },
        ).json()

    def sdk_spend() -> None:
        client.spend("0.01", scope=SCOPE)

    bare_ns: list[int] = []
    sdk_ns: list[int] = []
    timed(bare_post, n // 10, [])
    timed(sdk_spend, n // 10, [])
    for _ in range(10):
        timed(bare_post, n // 10, bare_ns)
        timed(sdk_spend, n // 10, sdk_ns)
    bare_ns.sort()
    sdk_ns.sort()
    return percentile(bare_ns, 0.5), percentile(sdk_ns, 0.5)


def throughput(account: AgentAccount, threads: int, per_thread: int, amount: str) -> tuple[int, float, list[str]]:
    client = account.client()
    barrier = threading.Barrier(threads + 1)
    errors: list[str] = []
    done = [0] * threads

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(per_thread):
            try:
                client.spend(amount, scope=SCOPE)
                done[i] += 1
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(repr(e))

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    client.close()
    return sum(done), elapsed, errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url")
    parser.add_argument("--admin-token")
    parser.add_argument("-n", type=int, default=int(os.environ.get("N", "3000")), help="calls per latency case")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--per-thread", type=int, default=int(os.environ.get("PER_THREAD", "200")))
    args = parser.parse_args()

    server = None
    url, token = args.url, args.admin_token
    if url is None:
        from support import server as support_server

        server = support_server.start(env={"RUST_LOG": "warn"})
        url, token = server.url, server.admin_token
        print(f"server: {support_server.binary()} on {url} (temp data dir)")
    try:
        lat_account = AgentAccount.create(
            f"bench-latency-{uuid.uuid4().hex[:8]}",
            [SCOPE],
            "1000000",
            breaker={"denials": 0},
            url=url,
            admin_token=token,
        )
        samples = latency(url, lat_account, args.n, args.warmup, args.rounds)
        print(f"\nlatency, {len(next(iter(samples.values())))} sequential calls each (after {args.warmup} warm-up):")
        print(f"  {'':24} {'p50 ms':>8} {'p99 ms':>8}")
        p50 = {}
        for name, ns in samples.items():
            ns.sort()
            p50[name] = percentile(ns, 0.5)
            print(f"  {name:24} {p50[name]:8.3f} {percentile(ns, 0.99):8.3f}")
        added = p50["client.spend (SDK)"] - p50["healthz (bare httpx)"]
        overhead = p50["client.spend (SDK)"] - p50["spend (bare httpx)"]
        print(f"  added p50, client.spend - healthz:      {added:+.3f} ms (goal <= 0.2 ms)")
        print(f"  SDK's own p50, client.spend - bare spend: {overhead:+.3f} ms")
        bare_p50, sdk_p50 = client_side(args.n)
        print(f"  client side only (in-process transport): bare httpx POST {bare_p50:.3f} ms, ", end="")
        print(f"client.spend {sdk_p50:.3f} ms: SDK adds {sdk_p50 - bare_p50:+.3f} ms")

        amount = "0.01"
        thr_account = AgentAccount.create(
            f"bench-threads-{uuid.uuid4().hex[:8]}",
            [SCOPE],
            "1000000",
            breaker={"denials": 0},
            url=url,
            admin_token=token,
        )
        calls, elapsed, errors = throughput(thr_account, args.threads, args.per_thread, amount)
        spent = thr_account.usage().window_spent
        expected = calls * Decimal(amount)
        print(f"\nthroughput, {args.threads} threads sharing one client, {args.per_thread} spends each:")
        print(f"  {calls} spends in {elapsed:.2f} s: {calls / elapsed:,.0f} spends/s; errors: {len(errors)}")
        verdict = "exact" if spent == expected else "MISMATCH"
        print(f"  ledger: window_spent {spent}, calls x amount = {calls} x {amount} = {expected}: {verdict}")
        if errors:
            print("  first errors:", errors[:3])
        return 0 if spent == expected and not errors else 1
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
