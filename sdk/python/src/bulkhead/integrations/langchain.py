"""LangChain: the agent's key goes in per tool, at tool initialisation.

```python
from bulkhead.integrations.langchain import chat_model, guard

search = guard(search_tool, client, scope="tools:search", cost="0.01")
model = chat_model(client, "gpt-4o-mini")      # ChatOpenAI through the gateway, with the agent's key
agent = create_agent(model, tools=[search])
```

`guard` returns a LangChain tool (a `BaseTool` with the wrapped tool's name, description and
argument schema) that spends with the client's key before the wrapped tool runs. A denied spend
never runs the tool: it becomes a `ToolException` that the tool handles, so the agent loop gets
a tool message with status `error` and content such as
`spending_cap_exceeded: The spend would exceed … (tool 'search' did not run)` instead of crashing.
`guard(…, hold=…, cost_of=…)` (or `metered`) is for tools whose cost is known only afterwards:
it holds the most a call may cost, runs the tool, captures what `cost_of(result)` says and
releases the rest (all of it if the tool failed).

A guard made with an `AsyncAgentClient` spends with `await` on the tool's async path (`ainvoke`,
async agent loops); one made with an `AgentClient` works on both paths (the async one runs the
spend in a worker thread).

LangChain (`langchain-core`, and `langchain-openai` for `chat_model`) is imported when these
functions are called, not when this module is imported.
"""

# LangChain's tool objects are untyped here (it is an optional dependency, imported lazily).
# ruff: noqa: ANN401, PLC0415

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from typing import TYPE_CHECKING, Any

from bulkhead._amounts import Amount
from bulkhead.errors import BulkheadError
from bulkhead.integrations import _pay

if TYPE_CHECKING:  # pragma: no cover - types only
    from collections.abc import Callable

    from langchain_core.tools import BaseTool  # type: ignore[import-not-found,unused-ignore]
    from langchain_openai import ChatOpenAI  # type: ignore[import-not-found,unused-ignore]

    from bulkhead.aio import AsyncAgentClient
    from bulkhead.client import AgentClient

    AnyClient = AgentClient | AsyncAgentClient

__all__ = ["chat_model", "guard", "metered"]

_INSTALL = "LangChain: pip install langchain-core langchain-openai"


def guard(
    tool: BaseTool | Callable[..., Any],
    client: AnyClient,
    *,
    scope: str,
    cost: Amount | None = None,
    hold: Amount | None = None,
    cost_of: Callable[[Any], Amount] | None = None,
    memo: str | None = None,
) -> BaseTool:
    """Return a tool that pays under `scope` with `client`'s key before `tool` runs.

    Args:
        tool: any LangChain tool (`@tool` functions, `StructuredTool`, `BaseTool` subclasses), or
            a typed Python function with a docstring, which becomes a `StructuredTool`.
        client: the agent's `AgentClient` or `AsyncAgentClient`; its key is the only one used.
        scope: the scope the tool's calls are paid under, e.g. `"tools:search"`.
        cost: the price of one call (`"0.01"`, `Decimal`, `int` or `float`), spent before it runs.
        hold: instead of `cost`, for tools whose price is known only afterwards: this amount is
            held before the tool runs, `cost_of(result)` of it is captured after it returned (the
            whole hold without `cost_of`; a price of 0 releases it), and all of it is released if
            the tool raised.
        cost_of: the actual price of a call, from the tool's result (with `hold`); for a tool
            with `response_format="content_and_artifact"`, from the `(content, artifact)` pair.
            A price above the hold is charged as the hold; if `cost_of` raises, the whole hold is
            charged (the tool ran, and the hold is the most a call may cost).
        memo: the memo of each spend or hold; default `tool <name>`.

    Returns:
        A `BaseTool` with the same name, description and argument schema. When the payment is
        refused (a cap, scope, revocation, …) the tool does not run and the call answers a tool
        error naming the code.

    """
    _pay.check_terms(cost, hold, cost_of)
    _pay.check_amounts(cost, hold)
    return _make(tool, client, scope=scope, cost=cost, hold=hold, cost_of=cost_of, memo=memo)


def metered(
    tool: BaseTool | Callable[..., Any],
    client: AnyClient,
    *,
    scope: str,
    max_cost: Amount,
    cost_of: Callable[[Any], Amount],
    memo: str | None = None,
) -> BaseTool:
    """Return a tool that holds `max_cost`, runs `tool` and captures `cost_of(result)`.

    The same as `guard(tool, client, scope=scope, hold=max_cost, cost_of=cost_of)`.
    """
    return guard(tool, client, scope=scope, hold=max_cost, cost_of=cost_of, memo=memo)


def chat_model(client: AnyClient, model: str, upstream: str = "openai", **kwargs: Any) -> ChatOpenAI:
    """Return LangChain's `ChatOpenAI` calling `model` through the gateway with `client`'s key.

    The base URL is `client.base_url(upstream) + "/v1"` and the API key is the agent's own, so
    every model call is checked, capped and metered for this agent. `kwargs` go to `ChatOpenAI`
    (`temperature`, `streaming`, `max_retries`, …).
    """
    try:
        from langchain_openai import ChatOpenAI  # type: ignore[import-not-found,unused-ignore]
        from pydantic import SecretStr  # type: ignore[import-not-found,unused-ignore]
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"bulkhead.integrations.langchain.chat_model needs {_INSTALL}") from e
    return ChatOpenAI(model=model, base_url=f"{client.base_url(upstream)}/v1", api_key=SecretStr(client.key), **kwargs)


def _make(
    tool: BaseTool | Callable[..., Any],
    client: AnyClient,
    *,
    scope: str,
    cost: Amount | None,
    hold: Amount | None,
    cost_of: Callable[[Any], Amount] | None,
    memo: str | None,
) -> BaseTool:
    guarded_class = _guarded_tool_class()
    tool = _as_tool(tool)
    guarded: BaseTool = guarded_class(
        name=tool.name,
        description=tool.description,
        args_schema=tool.args_schema,
        return_direct=tool.return_direct,
        response_format=tool.response_format,
        tags=tool.tags,
        metadata=tool.metadata,
        handle_validation_error=tool.handle_validation_error,
        handle_tool_error=_handle_tool_error,
        inner=tool,
        bulkhead_client=client,
        bulkhead_scope=scope,
        bulkhead_cost=cost,
        bulkhead_hold=hold,
        bulkhead_cost_of=cost_of,
        bulkhead_memo=memo if memo is not None else f"tool {tool.name}",
    )
    return guarded


def _as_tool(value: BaseTool | Callable[..., Any]) -> BaseTool:
    """Take a LangChain tool as it is; make a typed function with a docstring a `StructuredTool`."""
    from langchain_core.tools import BaseTool, StructuredTool  # type: ignore[import-not-found,unused-ignore]

    if isinstance(value, BaseTool):
        return value
    if not callable(value):
        raise TypeError(f"guard wraps a LangChain tool or a function, not {type(value).__name__}")
    made: BaseTool = StructuredTool.from_function(value)
    return made


def _handle_tool_error(error: Exception) -> str:
    """Answer a denial (or a wrapped tool's handled failure) as the tool's content; raise the rest.

    The wrapped tool's own `ToolException`s reach here only when the wrapped tool does not
    handle them itself, so they keep propagating as they would without the guard.
    """
    if getattr(error, "bulkhead_handled", False):
        return str(error.args[0])
    raise error


@functools.cache
def _guarded_tool_class() -> type[Any]:
    """Build the guarded tool class once LangChain is importable (it is imported only here)."""
    try:
        from langchain_core.tools import BaseTool, ToolException  # type: ignore[import-not-found,unused-ignore]
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"bulkhead.integrations.langchain needs {_INSTALL}") from e

    class SpendDenied(ToolException):  # type: ignore[misc,unused-ignore]
        """The guard's spend or hold was refused: the wrapped tool did not run."""

        bulkhead_handled = True

    class ToolFailed(ToolException):  # type: ignore[misc,unused-ignore]
        """The wrapped tool failed and handled its failure itself: its answer stays an error."""

        bulkhead_handled = True

    class GuardedTool(BaseTool):  # type: ignore[misc,unused-ignore]
        """A LangChain tool that pays with one agent's key before its wrapped tool runs."""

        inner: BaseTool
        bulkhead_client: Any
        bulkhead_scope: str
        bulkhead_cost: Any = None
        bulkhead_hold: Any = None
        bulkhead_cost_of: Any = None
        bulkhead_memo: str | None = None

        def _run(self, *args: Any, run_manager: Any = None, **kwargs: Any) -> Any:
            client = self.bulkhead_client
            if inspect.iscoroutinefunction(client.spend):
                raise TypeError(
                    f"tool '{self.name}' was guarded with an async client: call it with ainvoke, "
                    "or guard it with a sync AgentClient"
                )
            config: Any = {"callbacks": run_manager.get_child()} if run_manager is not None else None
            tool_input = self._call(args, kwargs)
            try:
                hold = _pay.pay(client, **self._terms())
            except BulkheadError as e:
                raise SpendDenied(_pay.denial_text(e, self.name)) from e
            if hold is None:
                return self._unwrap(self.inner.invoke(tool_input, config=config))
            try:
                result = self._unwrap(self.inner.invoke(tool_input, config=config))
            except BaseException:
                with contextlib.suppress(BulkheadError):  # the tool failed: nothing is charged
                    hold.release()
                raise
            _pay.settle(hold, self.bulkhead_cost_of, result)
            return result

        async def _arun(self, *args: Any, run_manager: Any = None, **kwargs: Any) -> Any:
            client = self.bulkhead_client
            config: Any = {"callbacks": run_manager.get_child()} if run_manager is not None else None
            tool_input = self._call(args, kwargs)
            try:
                hold: Any = await _pay.apay(client, **self._terms())
            except BulkheadError as e:
                raise SpendDenied(_pay.denial_text(e, self.name)) from e
            if hold is None:
                return self._unwrap(await self.inner.ainvoke(tool_input, config=config))
            try:
                result = self._unwrap(await self.inner.ainvoke(tool_input, config=config))
            except BaseException:
                with contextlib.suppress(BulkheadError):  # the tool failed: nothing is charged
                    await _pay.call(hold.release)
                raise
            if inspect.iscoroutinefunction(client.spend):
                await _pay.asettle(hold, self.bulkhead_cost_of, result)
            else:
                await asyncio.to_thread(_pay.settle, hold, self.bulkhead_cost_of, result)
            return result

        def _terms(self) -> dict[str, Any]:
            """How each call is paid: `_pay.pay`'s keyword arguments."""
            return {
                "scope": self.bulkhead_scope,
                "cost": self.bulkhead_cost,
                "hold": self.bulkhead_hold,
                "memo": self.bulkhead_memo,
            }

        def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            """Make the wrapped tool's input; a tool call when it answers content and an artifact."""
            tool_input: Any = args[0] if args and not kwargs else kwargs
            if self.inner.response_format == "content_and_artifact" and isinstance(tool_input, dict):
                return {"type": "tool_call", "name": self.inner.name, "args": tool_input, "id": "guarded"}
            return tool_input

        def _unwrap(self, output: Any) -> Any:
            """Turn the wrapped tool's answer into what this tool's `_run` returns."""
            if self.inner.response_format == "content_and_artifact" and hasattr(output, "artifact"):
                if getattr(output, "status", "success") == "error":
                    raise ToolFailed(output.content)
                return output.content, output.artifact
            return output

    return GuardedTool
