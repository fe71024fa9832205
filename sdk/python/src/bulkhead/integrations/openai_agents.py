"""OpenAI Agents SDK: the agent's key goes in per assistant, in the tool-call handler.

```python
from agents import Agent, Runner, function_tool
from bulkhead.integrations.openai_agents import guard, model

agent = Agent(
    name="researcher",
    model=model(client, "gpt-4o-mini"),          # the SDK's own model object, through the gateway
    tools=[guard(search, client, scope="tools:search", cost="0.01")],
)
result = await Runner.run(agent, "…")
```

`guard` returns an `agents.FunctionTool` with the wrapped tool's name, description and schema
whose `on_invoke_tool` handler spends with the client's key before it hands the call to the
wrapped tool. A denied spend never runs the tool: the handler answers the model a tool error
naming the code (`spending_cap_exceeded: … (tool 'search' did not run)`), the way the Agents SDK
reports a tool failure to the model, and the run goes on. `guard(…, hold=…, cost_of=…)` (or
`metered`) holds the most a call may cost instead, runs the tool, captures what `cost_of(output)`
says and releases the rest.

The model factory `model` returns the Agents SDK's `OpenAIResponsesModel` (its default API) or,
with `api="chat"`, its `OpenAIChatCompletionsModel`, on an `AsyncOpenAI` client whose base URL is
the gateway and whose API key is the agent's own.

The Agents SDK (`openai-agents`) is imported when these functions are called, not when this
module is imported.
"""

# The Agents SDK's objects are untyped here (it is an optional dependency, imported lazily).
# ruff: noqa: ANN401, PLC0415

from __future__ import annotations

import contextlib
import copy
import logging
from typing import TYPE_CHECKING, Any, Literal

from bulkhead._amounts import Amount
from bulkhead.errors import BulkheadError
from bulkhead.integrations import _pay

if TYPE_CHECKING:  # pragma: no cover - types only
    from collections.abc import Callable

    from agents import FunctionTool  # type: ignore[import-not-found,unused-ignore]
    from agents.models.interface import Model  # type: ignore[import-not-found,unused-ignore]

    from bulkhead.aio import AsyncAgentClient
    from bulkhead.client import AgentClient

    AnyClient = AgentClient | AsyncAgentClient

__all__ = ["guard", "metered", "model"]

_INSTALL = "the OpenAI Agents SDK: pip install openai-agents"
_log = logging.getLogger(__name__)


def guard(
    tool: FunctionTool | Callable[..., Any],
    client: AnyClient,
    *,
    scope: str,
    cost: Amount | None = None,
    hold: Amount | None = None,
    cost_of: Callable[[Any], Amount] | None = None,
    memo: str | None = None,
) -> FunctionTool:
    """Return a `FunctionTool` whose tool-call handler pays with `client`'s key before `tool` runs.

    Args:
        tool: an `agents.FunctionTool` (e.g. made by `@function_tool`), or a typed Python function
            with a docstring, which `function_tool` turns into one.
        client: the agent's `AsyncAgentClient` (awaited) or `AgentClient` (run in a worker thread).
        scope: the scope the tool's calls are paid under, e.g. `"tools:search"`.
        cost: the price of one call (`"0.01"`, `Decimal`, `int` or `float`), spent before it runs.
        hold: instead of `cost`, for tools whose price is known only afterwards: this amount is
            held before the tool runs, `cost_of(output)` of it is captured after it returned (the
            whole hold without `cost_of`; a price of 0 releases it), and all of it is released if
            the tool raised.
        cost_of: the actual price of a call, from the wrapped tool's output (what the model will
            read), with `hold`. A price above the hold is charged as the hold; if `cost_of`
            raises, the whole hold is charged (the tool ran, and the hold is the most a call may
            cost).
        memo: the memo of each spend or hold; default `tool <name>`.

    Returns:
        A copy of `tool` (same name, description, schema, guardrails and timeouts) whose handler
        pays first. When the payment is refused (a cap, scope, revocation, …) the tool does not
        run and the model reads a tool error naming the code.

    """
    _pay.check_terms(cost, hold, cost_of)
    _pay.check_amounts(cost, hold)
    return _make(tool, client, scope=scope, cost=cost, hold=hold, cost_of=cost_of, memo=memo)


def metered(
    tool: FunctionTool | Callable[..., Any],
    client: AnyClient,
    *,
    scope: str,
    max_cost: Amount,
    cost_of: Callable[[Any], Amount],
    memo: str | None = None,
) -> FunctionTool:
    """Return a `FunctionTool` that holds `max_cost`, runs `tool` and captures `cost_of(output)`.

    The same as `guard(tool, client, scope=scope, hold=max_cost, cost_of=cost_of)`.
    """
    return guard(tool, client, scope=scope, hold=max_cost, cost_of=cost_of, memo=memo)


def model(
    client: AnyClient,
    model: str,
    upstream: str = "openai",
    *,
    api: Literal["responses", "chat"] = "responses",
    **kwargs: Any,
) -> Model:
    """Return the Agents SDK's OpenAI model object calling `model` through the gateway.

    Args:
        client: the agent's client; its key is the API key and nothing else is.
        model: the model name sent upstream, e.g. `"gpt-4o-mini"`.
        upstream: the gateway upstream's name (`/proxy/{upstream}`).
        api: `"responses"` (the Agents SDK's default) for `OpenAIResponsesModel`, or `"chat"`
            for `OpenAIChatCompletionsModel`.
        **kwargs: passed to `openai.AsyncOpenAI` (`max_retries`, `timeout`, …).

    Returns:
        An `agents.Model` to pass as `Agent(model=…)`.

    """
    try:
        from agents import (  # type: ignore[import-not-found,unused-ignore]
            OpenAIChatCompletionsModel,
            OpenAIResponsesModel,
        )
        from openai import AsyncOpenAI  # type: ignore[import-not-found,unused-ignore]
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"bulkhead.integrations.openai_agents.model needs {_INSTALL}") from e
    openai_client = AsyncOpenAI(base_url=f"{client.base_url(upstream)}/v1", api_key=client.key, **kwargs)
    if api == "responses":
        made: Model = OpenAIResponsesModel(model=model, openai_client=openai_client)
    elif api == "chat":
        made = OpenAIChatCompletionsModel(model=model, openai_client=openai_client)
    else:
        raise ValueError(f"api must be 'responses' or 'chat', not {api!r}")
    return made


def _make(
    tool: FunctionTool | Callable[..., Any],
    client: AnyClient,
    *,
    scope: str,
    cost: Amount | None,
    hold: Amount | None,
    cost_of: Callable[[Any], Amount] | None,
    memo: str | None,
) -> FunctionTool:
    try:
        from agents import FunctionTool, function_tool
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"bulkhead.integrations.openai_agents needs {_INSTALL}") from e
    if not isinstance(tool, FunctionTool):
        if not callable(tool):
            raise TypeError(f"guard wraps an agents.FunctionTool or a function, not {type(tool).__name__}")
        tool = function_tool(tool)
    invoke_inner = tool.on_invoke_tool
    name = tool.name
    memo = memo if memo is not None else f"tool {name}"

    async def on_invoke_tool(ctx: Any, arguments: str) -> Any:
        """Pay with this assistant's key, then run the wrapped tool; a refusal is the answer."""
        try:
            held = await _pay.apay(client, scope=scope, cost=cost, hold=hold, memo=memo)
        except BulkheadError as e:
            return _denied(e, name)
        if held is None:
            return await invoke_inner(ctx, arguments)
        try:
            output = await invoke_inner(ctx, arguments)
        except BaseException:
            with contextlib.suppress(BulkheadError):  # the tool failed: nothing is charged
                await _pay.call(held.release)
            raise
        await _pay.asettle(held, cost_of, output, name="cost_of(output)")
        return output

    guarded: FunctionTool = copy.copy(tool)
    guarded.on_invoke_tool = on_invoke_tool
    return guarded


def _denied(error: BulkheadError, tool_name: str) -> str:
    """Answer a refused spend as the tool's output: the code first, then the server's sentence."""
    _log.info("tool %s not run: %s", tool_name, error.code)
    return _pay.denial_text(error, tool_name)
