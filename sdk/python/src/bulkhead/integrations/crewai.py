"""CrewAI (`crewai`): each crew member gets its own key in its `Agent(...)` constructor.

The key goes in per crew member, where the agent is built: its LLM calls the model through the
Bulkhead gateway with that member's key, and every tool it is given spends from that member's
budget before it runs. Nothing is shared at the crew level.

```python
from crewai import Agent
from bulkhead import AgentAccount
from bulkhead.integrations.crewai import guard, llm

researcher = AgentAccount.create(handle="researcher", scopes=["llm:openai", "tools:search"],
                                 spending_cap="2.00").client()
agent = Agent(
    role="Researcher", goal="…", backstory="…",
    llm=llm(researcher, "gpt-4o-mini"),
    tools=[guard(search_tool, researcher, scope="tools:search", cost="0.05")],
)
```

`guard` returns a CrewAI tool (a `crewai.tools.BaseTool`) with the wrapped tool's name,
description and schemas. When Bulkhead refuses the payment the tool does not run: the call
returns a `crewai.tools.tool_failure.ToolFailure` whose `code` is the error code, which CrewAI
shows the agent as `… (code: spending_cap_exceeded)` and records on the task output's
`tool_failures` (the agent's or task's `tool_failure_policy` decides whether the run goes on).

CrewAI is imported when these functions are called, so `bulkhead` itself never needs it.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeAlias

from bulkhead._amounts import Amount
from bulkhead.client import AgentClient, Hold
from bulkhead.errors import BulkheadError
from bulkhead.integrations import _pay

__all__ = ["guard", "llm"]

CrewAITool: TypeAlias = Any
"""A `crewai.tools.BaseTool` (typed loosely: CrewAI is an optional dependency)."""

CrewAILLM: TypeAlias = Any
"""A `crewai.LLM` (CrewAI's native OpenAI provider)."""

ToolFailure: TypeAlias = Any
"""A `crewai.tools.tool_failure.ToolFailure`."""

_RETRYABLE = frozenset({"rate_limited", "connection_error", "idempotency_in_progress"})


def _module(name: str) -> ModuleType:
    """Import a CrewAI module, with a clear message when CrewAI is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("bulkhead.integrations.crewai needs CrewAI: pip install crewai") from exc


def _never_cache(_args: object = None, _result: object = None) -> bool:
    """Keep CrewAI's tool cache from answering for a guarded tool: every call is paid and checked."""
    return False


def _denial(tool: str, error: BulkheadError) -> ToolFailure:
    """Build the `ToolFailure` a refused payment returns, naming the error code."""
    failure: Any = _module("crewai.tools.tool_failure")
    details: dict[str, object] = {"status": error.status}
    if error.remaining is not None:
        details["remaining"] = str(error.remaining)
    if error.retry_after is not None:
        details["retry_after"] = error.retry_after
    return failure.ToolFailure(
        message=f"Bulkhead refused to pay for tool `{tool}` ({error.message}); the tool did not run",
        reason=failure.ToolFailureReason.TOOL_REPORTED,
        code=error.code,
        retryable=error.code in _RETRYABLE,
        details=details,
    )


async def _run_inner_async(inner: CrewAITool, *args: object, **kwargs: object) -> object:
    """Run a CrewAI tool's own implementation from async code, never twice."""
    base: Any = _module("crewai.tools").BaseTool
    func = getattr(inner, "func", None)
    if callable(func):  # a `Tool` made by `@tool`: its function may be sync or async
        if inspect.iscoroutinefunction(func):
            result: object = await func(*args, **kwargs)
            return result
        result = await asyncio.to_thread(functools.partial(func, *args, **kwargs))
    elif type(inner)._arun is not base._arun:
        result = await inner._arun(*args, **kwargs)
    else:
        result = await asyncio.to_thread(functools.partial(inner._run, *args, **kwargs))
    if inspect.isawaitable(result):
        result = await result
    return result


@functools.cache
def _guarded_class() -> type:
    """Make the `BaseTool` subclass `guard` returns (once CrewAI is importable)."""
    base: Any = _module("crewai.tools").BaseTool

    class GuardedTool(base):  # type: ignore[misc]
        """A CrewAI tool that pays Bulkhead with one agent's key before its wrapped tool runs."""

        inner: CrewAITool
        client: AgentClient
        scope: str
        amount: Amount
        holds: bool = False
        cost_of: Callable[[Any], Amount] | None = None
        memo: str

        def _open(self) -> Hold | None:
            """Spend the cost (`None`), or open the hold (returned); raise when refused."""
            cost, hold = (None, self.amount) if self.holds else (self.amount, None)
            return _pay.pay(self.client, scope=self.scope, cost=cost, hold=hold, memo=self.memo)

        def _run(self, *args: object, **kwargs: object) -> object:
            try:
                held = self._open()
            except BulkheadError as error:
                return _denial(self.name, error)  # refused: the wrapped tool does not run
            try:
                result = self.inner._run(*args, **kwargs)
                if inspect.isawaitable(result):
                    result = asyncio.run(_awaited(result))
            except BaseException:
                if held is not None:
                    held.release()  # the tool failed: nothing is charged
                raise
            if held is not None:
                _pay.settle(held, self.cost_of, result)
            return result

        async def _arun(self, *args: object, **kwargs: object) -> object:
            try:
                held = await asyncio.to_thread(self._open)
            except BulkheadError as error:
                return _denial(self.name, error)
            try:
                result = await _run_inner_async(self.inner, *args, **kwargs)
            except BaseException:
                if held is not None:
                    await asyncio.to_thread(held.release)  # the tool failed: nothing is charged
                raise
            if held is not None:
                await asyncio.to_thread(_pay.settle, held, self.cost_of, result)
            return result

        def format_output_for_agent(self, raw_result: object) -> str:
            return str(self.inner.format_output_for_agent(raw_result))

    return GuardedTool


async def _awaited(value: Any) -> object:  # noqa: ANN401 - any awaitable a tool returns
    """Await `value` (for `asyncio.run`, which takes a coroutine)."""
    result: object = await value
    return result


def guard(
    tool: CrewAITool,
    client: AgentClient,
    *,
    scope: str,
    cost: Amount | None = None,
    hold: Amount | None = None,
    cost_of: Callable[[Any], Amount] | None = None,
    memo: str | None = None,
) -> CrewAITool:
    """Return a CrewAI tool that pays for each call with `client`'s key before `tool` runs.

    Args:
        tool: a CrewAI tool (a `crewai.tools.BaseTool`, e.g. one made with `@tool`).
        client: the crew member's `AgentClient`.
        scope: the scope each call spends under, e.g. `"tools:search"`.
        cost: the price of one call, spent before the tool runs.
        hold: instead of `cost`, for tools whose price is known only afterwards: this amount
            is held before the tool runs, `cost_of(result)` of it is captured after it returned
            (the whole hold without `cost_of`), and all of it is released if the tool raised.
        cost_of: the actual price of a call, from the tool's result (with `hold`). A price above
            the hold is charged as the hold; if `cost_of` raises, the whole hold is charged.
        memo: the memo of each spend (default `"tool <name>"`).

    Returns:
        a `crewai.tools.BaseTool` with `tool`'s name, description, argument and result schemas,
        `result_as_answer`, `max_usage_count` and failure policy. A call Bulkhead refuses (a cap,
        scope, revocation, …) returns a `ToolFailure` whose `code` is the error code, and `tool`
        does not run. CrewAI's tool cache never answers for a guarded tool: every call is checked.

    """
    _pay.check_terms(cost, hold, cost_of)
    if not isinstance(client, AgentClient):
        raise TypeError(f"guard needs the crew member's AgentClient, not {type(client).__name__}")
    base: Any = _module("crewai.tools").BaseTool
    if not isinstance(tool, base):
        raise TypeError(f"guard needs a CrewAI tool (crewai.tools.BaseTool), not {type(tool).__name__}")
    return _guarded_class()(
        name=tool.name,
        description=tool.description,
        args_schema=tool.args_schema,
        result_schema=tool.result_schema,
        env_vars=list(tool.env_vars),
        result_as_answer=tool.result_as_answer,
        max_usage_count=tool.max_usage_count,
        tool_failure_policy=tool.tool_failure_policy,
        cache_function=_never_cache,
        inner=tool,
        client=client,
        scope=scope,
        amount=hold if hold is not None else cost,
        holds=hold is not None,
        cost_of=cost_of,
        memo=memo if memo is not None else f"tool {tool.name}",
    )


def llm(client: AgentClient, model: str, upstream: str = "openai", **kwargs: object) -> CrewAILLM:
    """Return CrewAI's own `crewai.LLM` calling `model` through the Bulkhead gateway with the agent's key.

    The LLM is CrewAI's native OpenAI provider (`custom_openai=True`, so any model name stays on
    it rather than falling back to LiteLLM), with `base_url` set to
    `client.base_url(upstream) + "/v1"` and the agent's key as `api_key`: the gateway checks
    that key, meters each call against that agent's caps and forwards it with the real secret.

    Args:
        client: the crew member's `AgentClient`.
        model: the model name sent upstream, e.g. `"gpt-4o-mini"` (an `openai/` prefix is dropped).
        upstream: the `[[upstream]]` name in the server's config.
        **kwargs: anything else `crewai.LLM` takes (`temperature`, `max_tokens`, `stream`, …).

    """
    crewai: Any = _module("crewai")
    options: dict[str, object] = {
        "base_url": client.base_url(upstream) + "/v1",
        "api_key": client.key,
        "custom_openai": True,
    }
    options.update(kwargs)
    return crewai.LLM(model=model.removeprefix("openai/"), **options)
