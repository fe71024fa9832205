"""AutoGen (`autogen-agentchat`): each agent gets its own key at instantiation.

The key goes in per agent, where the agent is built, never on the group chat: the agent's model
client calls the LLM through the Bulkhead gateway with that agent's key, and every tool it is
given spends from that agent's budget before it runs.

```python
from autogen_agentchat.agents import AssistantAgent
from bulkhead import AgentAccount
from bulkhead.integrations.autogen import guard, model_client

researcher = AgentAccount.create(handle="researcher", scopes=["llm:openai", "tools:search"],
                                 spending_cap="2.00").async_client()
agent = AssistantAgent(
    "researcher",
    model_client=model_client(researcher, "gpt-4o-mini"),
    tools=[guard(search, researcher, scope="tools:search", cost="0.05")],
)
```

`guard` returns an AutoGen tool (an `autogen_core.tools.BaseTool`) with the wrapped tool's
name, description and argument schema. When Bulkhead refuses the payment, the tool does not
run: the call raises `ToolDenied`, which AutoGen hands to the model as a
`FunctionExecutionResult` with `is_error=True` whose text starts with the error code
(`spending_cap_exceeded: …`).

AutoGen is imported when these functions are called, so `bulkhead` itself never needs it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, TypeAlias

from bulkhead._amounts import Amount
from bulkhead.aio import AsyncAgentClient, AsyncHold
from bulkhead.client import AgentClient, Hold
from bulkhead.errors import BulkheadError
from bulkhead.integrations import _pay

__all__ = ["DEFAULT_MODEL_INFO", "ToolDenied", "guard", "model_client"]

AutoGenTool: TypeAlias = Any
"""An `autogen_core.tools.BaseTool` (typed loosely: AutoGen is an optional dependency)."""

ModelClient: TypeAlias = Any
"""An `autogen_ext.models.openai.OpenAIChatCompletionClient`."""

Client: TypeAlias = "AgentClient | AsyncAgentClient"

DEFAULT_MODEL_INFO: dict[str, object] = {
    "vision": False,
    "function_calling": True,
    "json_output": True,
    "structured_output": True,
    "family": "unknown",
    "multiple_system_messages": True,
}
"""The `model_info` `model_client` gives AutoGen for a model name it does not know."""


class ToolDenied(Exception):  # noqa: N818 - it names what happened to the tool call
    """Bulkhead refused the spend (or hold) that pays for a tool call, so the tool did not run.

    Its text starts with the error code (`spending_cap_exceeded: …`): that is what the model
    reads. `error` is the `BulkheadError` the SDK raised; `code` and `tool` are at hand.
    """

    def __init__(self, tool: str, error: BulkheadError) -> None:
        """Describe the refusal of `tool`'s payment, from the SDK's `error`."""
        self.tool = tool
        self.error = error
        self.code = error.code
        super().__init__(
            f"{error.code}: Bulkhead refused to pay for tool `{tool}` ({error.message}); the tool did not run."
        )


def _module(name: str) -> ModuleType:
    """Import an AutoGen module, with a clear message when AutoGen is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "bulkhead.integrations.autogen needs AutoGen: pip install autogen-agentchat 'autogen-ext[openai]'"
        ) from exc


async def _release(held: Hold | AsyncHold) -> None:
    """Release a hold made by either kind of client, unless it is closed already."""
    if held.closed:
        return
    await _pay.call(held.release)


@functools.cache
def _guarded_class() -> type:
    """Make the `BaseTool` subclass `guard` returns (once AutoGen is importable)."""
    base: Any = _module("autogen_core.tools").BaseTool

    class GuardedTool(base):  # type: ignore[misc]
        """An AutoGen tool that pays Bulkhead with one agent's key before its wrapped tool runs."""

        def __init__(
            self,
            inner: AutoGenTool,
            client: Client,
            *,
            scope: str,
            amount: Amount,
            holds: bool,
            cost_of: Callable[[Any], Amount] | None,
            memo: str,
        ) -> None:
            super().__init__(
                inner.args_type(),
                inner.return_type(),
                inner.name,
                inner.description,
                getattr(inner, "_strict", False),
            )
            self.inner = inner
            self.client = client
            self.scope = scope
            self.amount = amount
            self.holds = holds
            self.cost_of = cost_of
            self.memo = memo

        @property
        def schema(self) -> Mapping[str, object]:
            return dict(self.inner.schema)

        async def run(self, args: object, cancellation_token: object) -> object:
            try:
                held = await _pay.apay(
                    self.client,
                    scope=self.scope,
                    cost=None if self.holds else self.amount,
                    hold=self.amount if self.holds else None,
                    memo=self.memo,
                )
            except BulkheadError as error:
                raise ToolDenied(self.name, error) from error
            if held is None:
                return await self.inner.run(args, cancellation_token)
            try:
                result = await self.inner.run(args, cancellation_token)
            except BaseException:
                await _release(held)  # the tool failed: nothing is charged
                raise
            await _pay.asettle(held, self.cost_of, result)
            return result

        def return_value_as_string(self, value: object) -> str:
            return str(self.inner.return_value_as_string(value))

        def state_type(self) -> type | None:
            state: type | None = self.inner.state_type()
            return state

        async def save_state_json(self) -> Mapping[str, object]:
            return dict(await self.inner.save_state_json())

        async def load_state_json(self, state: Mapping[str, object]) -> None:
            await self.inner.load_state_json(state)

    return GuardedTool


def guard(
    tool: AutoGenTool | Callable[..., object],
    client: Client,
    *,
    scope: str,
    cost: Amount | None = None,
    hold: Amount | None = None,
    cost_of: Callable[[Any], Amount] | None = None,
    memo: str | None = None,
    description: str | None = None,
) -> AutoGenTool:
    """Return an AutoGen tool that pays for each call with `client`'s key before `tool` runs.

    Args:
        tool: an AutoGen tool (`FunctionTool`, any `BaseTool`), or a typed Python function,
            which becomes a `FunctionTool` (its docstring the description, unless `description`).
        client: the agent's `AsyncAgentClient` (awaited) or `AgentClient` (run in a thread).
        scope: the scope each call spends under, e.g. `"tools:search"`.
        cost: the price of one call, spent before the tool runs.
        hold: instead of `cost`, for tools whose price is known only afterwards: this amount
            is held before the tool runs, `cost_of(result)` of it is captured after it returned
            (the whole hold without `cost_of`), and all of it is released if the tool raised.
        cost_of: the actual price of a call, from the tool's result (with `hold`). A price above
            the hold is charged as the hold; if `cost_of` raises, the whole hold is charged.
        memo: the memo of each spend (default `"tool <name>"`).
        description: the description of a plain function (ignored for a tool).

    Returns:
        an `autogen_core.tools.BaseTool` with `tool`'s name, description and argument schema.
        When Bulkhead refuses the payment (a cap, scope, revocation, …) it raises `ToolDenied`
        naming the code, and the wrapped tool does not run.

    """
    _pay.check_terms(cost, hold, cost_of)
    if not isinstance(client, (AgentClient, AsyncAgentClient)):
        raise TypeError(f"guard needs an AgentClient or AsyncAgentClient, not {type(client).__name__}")
    tools = _module("autogen_core.tools")
    if not isinstance(tool, tools.BaseTool):
        if not callable(tool):
            raise TypeError(f"guard needs an AutoGen tool or a function, not {type(tool).__name__}")
        text = description or inspect.getdoc(tool) or getattr(tool, "__name__", "tool")
        tool = tools.FunctionTool(tool, description=text)
    return _guarded_class()(
        tool,
        client,
        scope=scope,
        amount=hold if hold is not None else cost,
        holds=hold is not None,
        cost_of=cost_of,
        memo=memo if memo is not None else f"tool {tool.name}",
    )


def model_client(client: Client, model: str, upstream: str = "openai", **kwargs: object) -> ModelClient:
    """Return AutoGen's `OpenAIChatCompletionClient` calling `model` through the Bulkhead gateway.

    Requests go to `client.base_url(upstream) + "/v1"` with the agent's key as the API key:
    the gateway checks that key, meters each call's cost against that agent's caps and
    forwards it with the real secret, which the agent never sees.

    Args:
        client: the agent's `AgentClient` or `AsyncAgentClient`.
        model: the model name sent upstream, e.g. `"gpt-4o-mini"`.
        upstream: the `[[upstream]]` name in the server's config.
        **kwargs: anything else `OpenAIChatCompletionClient` takes (`temperature`,
            `model_info`, `parallel_tool_calls`, …). A model AutoGen does not know gets
            `DEFAULT_MODEL_INFO` unless `model_info` is given.

    """
    openai: Any = _module("autogen_ext.models.openai")
    options: dict[str, object] = {"base_url": client.base_url(upstream) + "/v1", "api_key": client.key}
    options.update(kwargs)
    if "model_info" not in options:
        try:
            return openai.OpenAIChatCompletionClient(model=model, **options)
        except ValueError as exc:
            if "model_info" not in str(exc):
                raise
        options["model_info"] = dict(DEFAULT_MODEL_INFO)
    return openai.OpenAIChatCompletionClient(model=model, **options)
