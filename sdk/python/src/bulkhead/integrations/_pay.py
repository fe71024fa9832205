"""How a guarded tool pays, shared by the framework integrations (no framework is imported here).

A tool with a `cost` is paid for with a spend before it runs. A tool with a `hold` has that
amount held before it runs; after it returned, `cost_of(result)` of it is captured (at most the
hold, all of it without `cost_of`, a price of 0 releases it, and the whole hold if `cost_of`
raises: the tool ran, and the hold is the most a call may cost). A tool that raised is charged
nothing: its hold is released.

Either kind of client works from async code: an `AsyncAgentClient`'s methods are awaited, an
`AgentClient`'s run in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from bulkhead._amounts import Amount, amount_text

if TYPE_CHECKING:  # pragma: no cover - types only
    from collections.abc import Callable

    from bulkhead.aio import AsyncAgentClient, AsyncHold
    from bulkhead.client import AgentClient, Hold
    from bulkhead.errors import BulkheadError


def check_terms(cost: Amount | None, hold: Amount | None, cost_of: Callable[[Any], Amount] | None) -> None:
    """Refuse a `guard(…)` that does not say exactly how its calls are paid."""
    if (cost is None) == (hold is None):
        raise ValueError("guard needs exactly one of cost= (spend per call) or hold= (hold, then capture)")
    if cost_of is not None and hold is None:
        raise ValueError("cost_of= goes with hold=: the actual cost is captured from the hold")


def check_amounts(cost: Amount | None, hold: Amount | None) -> None:
    """Refuse a `cost` or `hold` that is not an amount when the tool is guarded, not when it is called."""
    if cost is not None:
        amount_text(cost, name="cost")
    if hold is not None:
        amount_text(hold, name="hold")


def denial_text(error: BulkheadError, tool_name: str) -> str:
    """Say what the model reads when a payment is refused: the code first, then the server's sentence."""
    return f"{error.code}: {error.message} (tool '{tool_name}' did not run)"


def charge(
    held: Decimal, cost_of: Callable[[Any], Amount] | None, result: object, *, name: str = "cost_of(result)"
) -> Decimal:
    """Say what a call that ran is charged: `cost_of(result)`, at most the hold (all of it without)."""
    if cost_of is None:
        return held
    return min(Decimal(amount_text(cost_of(result), name=name)), held)


def settle(
    hold: Hold, cost_of: Callable[[Any], Amount] | None, result: object, *, name: str = "cost_of(result)"
) -> None:
    """Capture what the call cost and release the rest (all of it for a call that cost nothing).

    When `cost_of` fails, the whole hold is captured: the tool ran, and the hold is the most a
    call may cost.
    """
    try:
        cost = charge(hold.amount, cost_of, result, name=name)
    except Exception:
        hold.capture(hold.amount)
        raise
    if cost > 0:
        hold.capture(cost)
    else:
        hold.release()


def pay(client: AgentClient, *, scope: str, cost: Amount | None, hold: Amount | None, memo: str | None) -> Hold | None:
    """Spend `cost` (and answer `None`), or hold `hold` (and answer the hold); raise when refused."""
    if hold is None:
        client.spend(cost, scope=scope, memo=memo)  # type: ignore[arg-type]
        return None
    return client.hold(hold, scope=scope)


async def apay(
    client: AgentClient | AsyncAgentClient, *, scope: str, cost: Amount | None, hold: Amount | None, memo: str | None
) -> Hold | AsyncHold | None:
    """`pay` from async code: an `AsyncAgentClient` is awaited, an `AgentClient` runs in a worker thread."""
    if not inspect.iscoroutinefunction(client.spend):
        return await asyncio.to_thread(pay, client, scope=scope, cost=cost, hold=hold, memo=memo)  # type: ignore[arg-type]
    aclient: Any = client
    if hold is None:
        await aclient.spend(cost, scope=scope, memo=memo)
        return None
    held: AsyncHold = await aclient.hold(hold, scope=scope)
    return held


async def call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Await an `AsyncHold`'s method; run a `Hold`'s in a worker thread."""
    if inspect.iscoroutinefunction(method):
        return await method(*args, **kwargs)
    return await asyncio.to_thread(functools.partial(method, *args, **kwargs))


async def asettle(
    hold: Hold | AsyncHold,
    cost_of: Callable[[Any], Amount] | None,
    result: object,
    *,
    name: str = "cost_of(result)",
) -> None:
    """`settle` from async code, for a hold of either kind of client (`cost_of` runs here)."""
    try:
        cost = charge(hold.amount, cost_of, result, name=name)
    except Exception:
        await call(hold.capture, hold.amount)
        raise
    if cost > 0:
        await call(hold.capture, cost)
    else:
        await call(hold.release)
