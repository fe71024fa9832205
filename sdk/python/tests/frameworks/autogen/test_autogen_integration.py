"""`bulkhead.integrations.autogen` driving real AutoGen agents through a real gateway.

Each agent gets its own account and key at instantiation: its model client (made by
`model_client`) calls the scripted LLM through `/proxy/openai`, and its tools are wrapped by
`guard`. The scripted model loops (`[[loop:TOOL]]`) or calls a tool N times (`[[call:TOOL:N]]`).
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import openai
import pytest
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.base import TaskResult
from autogen_agentchat.conditions import MaxMessageTermination
from autogen_agentchat.messages import TextMessage, ToolCallExecutionEvent
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_core import CancellationToken
from autogen_core.tools import FunctionTool

from bulkhead import AgentAccount
from bulkhead.integrations.autogen import DEFAULT_MODEL_INFO, ToolDenied, guard, model_client
from support.frameworks import (
    PRICE_PER_CALL,
    Gateway,
    assert_upstream_saw_only_the_secret,
    check_quote_holds,
    check_researcher_and_writer,
    settled,
    spends,
    wait_for,
)

pytestmark = [
    pytest.mark.timeout(60),
    # The scripted upstream echoes the model name it was sent; AutoGen expected its dated alias.
    pytest.mark.filterwarnings("ignore:Resolved model mismatch:UserWarning"),
]


def agent_name(account: AgentAccount) -> str:
    """The agent's name in AutoGen: its handle as an identifier."""
    return account.handle.replace("-", "_")


def assistant(account: AgentAccount, client: Any, directive: str, tools: list[Any]) -> AssistantAgent:
    """An AutoGen agent built with its own key: model client and tools both carry it."""
    return AssistantAgent(
        name=agent_name(account),
        model_client=model_client(client, "gpt-4o-mini"),
        tools=tools,
        system_message=f"You are agent {account.handle}. {directive}",
        max_tool_iterations=20,
    )


async def run_all(*runs: tuple[AssistantAgent, str]) -> list[TaskResult | BaseException]:
    """Runs agents side by side, each on its own task; closes their model clients afterwards."""
    try:
        return await asyncio.gather(*(agent.run(task=task) for agent, task in runs), return_exceptions=True)
    finally:
        for agent, _ in runs:
            await agent._model_client.close()


def tool_results(result: TaskResult) -> list[Any]:
    return [r for m in result.messages if isinstance(m, ToolCallExecutionEvent) for r in m.content]


def test_looping_agent_stops_at_its_cap_while_the_other_finishes(gateway: Gateway) -> None:
    # The cap is four searches' worth: with the metered LLM calls on top, the fourth search is
    # refused whatever LLM slots the gateway holds at that moment; the third fits beside them.
    researcher = gateway.account("ag-research", ["llm:openai", "tools:search"], "4.00")
    writer = gateway.account("ag-writer", ["llm:openai", "tools:draft"], "1.00")
    runs = {"search": 0, "draft": 0}

    async def search(query: str) -> str:
        """Search the web."""
        runs["search"] += 1
        return f"result {runs['search']} for {query}"

    def draft(topic: str) -> str:
        """Draft a paragraph."""
        runs["draft"] += 1
        return f"draft {runs['draft']} about {topic}"

    async def main() -> tuple[TaskResult, TaskResult]:
        r_client, w_client = researcher.async_client(), writer.async_client()
        try:
            r_agent = assistant(
                researcher,
                r_client,
                '[[loop:search:{"query": "bulkheads"}]]',
                [guard(search, r_client, scope="tools:search", cost="1.00")],
            )
            w_agent = assistant(
                writer,
                w_client,
                '[[call:draft:2:{"topic": "caps"}]]',
                [guard(FunctionTool(draft, "Draft a paragraph."), w_client, scope="tools:draft", cost="0.10")],
            )
            r_out, w_out = await run_all((r_agent, "Research bulkheads."), (w_agent, "Write about caps."))
            assert isinstance(r_out, TaskResult), r_out
            assert isinstance(w_out, TaskResult), w_out
            return r_out, w_out
        finally:
            await r_client.aclose()
            await w_client.aclose()

    r_result, w_result = asyncio.run(main())

    # The looping agent: three paid searches, then a refusal naming the code; the tool never ran again.
    assert runs["search"] == 3
    results = tool_results(r_result)
    assert [r.is_error for r in results] == [False, False, False, True]
    assert results[-1].content.startswith("spending_cap_exceeded:")
    assert "did not run" in results[-1].content
    final = r_result.messages[-1]
    assert isinstance(final, TextMessage)
    assert "spending_cap_exceeded" in final.content

    # The other agent finished its script untouched.
    assert runs["draft"] == 2
    assert [r.is_error for r in tool_results(w_result)] == [False, False]
    assert isinstance(w_result.messages[-1], TextMessage)
    assert w_result.messages[-1].content == "Done after 2 tool calls."

    check_researcher_and_writer(gateway, researcher, writer)


def test_keys_stay_per_agent_inside_a_team(gateway: Gateway) -> None:
    """A group chat gets no key of its own: each member keeps the one it was built with."""
    researcher = gateway.account("ag-team-research", ["llm:openai", "tools:search"], "2.00")
    writer = gateway.account("ag-team-writer", ["llm:openai", "tools:draft"], "1.00")
    runs = {"search": 0, "draft": 0}

    def search(query: str) -> str:
        """Search the web."""
        runs["search"] += 1
        return f"result {runs['search']} for {query}"

    def draft(topic: str) -> str:
        """Draft a paragraph."""
        runs["draft"] += 1
        return f"draft {runs['draft']} about {topic}"

    async def main() -> TaskResult:
        r_client, w_client = researcher.async_client(), writer.async_client()
        r_agent = assistant(
            researcher,
            r_client,
            '[[loop:search:{"query": "bulkheads"}]]',
            [guard(search, r_client, scope="tools:search", cost="1.00")],
        )
        w_agent = assistant(
            writer,
            w_client,
            '[[call:draft:2:{"topic": "caps"}]]',
            [guard(draft, w_client, scope="tools:draft", cost="0.10")],
        )
        team = RoundRobinGroupChat([r_agent, w_agent], termination_condition=MaxMessageTermination(3))
        try:
            return await team.run(task="Research bulkheads, then write about caps.")
        finally:
            for agent in (r_agent, w_agent):
                await agent._model_client.close()
            await r_client.aclose()
            await w_client.aclose()

    result = asyncio.run(main())

    texts = [m for m in result.messages if isinstance(m, TextMessage)]
    assert [m.source for m in texts] == ["user", agent_name(researcher), agent_name(writer)]
    assert "spending_cap_exceeded" in texts[1].content
    assert texts[2].content == "Done after 2 tool calls."
    assert (runs["search"], runs["draft"]) == (1, 2)  # the second search was refused at the cap
    assert spends(gateway.audit(researcher.handle), "tools:search") == [
        ("allowed", None, "1.00"),
        ("denied", "spending_cap_exceeded", "1.00"),
    ]
    assert spends(gateway.audit(writer.handle), "tools:draft") == [("allowed", None, "0.10")] * 2
    r_calls, w_calls = gateway.calls_of(researcher.handle), gateway.calls_of(writer.handle)
    assert (len(r_calls), len(w_calls)) == (3, 3)
    assert_upstream_saw_only_the_secret(r_calls + w_calls)
    wait_for(lambda: settled(gateway, researcher, 3) and settled(gateway, writer, 3))
    assert researcher.usage().window_spent == Decimal("1.00") + 3 * PRICE_PER_CALL
    assert writer.usage().window_spent == 2 * Decimal("0.10") + 3 * PRICE_PER_CALL


def test_an_agent_revoked_mid_run_stops_at_its_next_call(gateway: Gateway) -> None:
    doomed = gateway.account("ag-doomed", ["llm:openai", "tools:fetch"], "10.00")
    steady = gateway.account("ag-steady", ["llm:openai", "tools:fetch"], "10.00")
    runs = {"doomed": 0, "steady": 0}

    def fetch_doomed(url: str) -> str:
        """Fetch a page."""
        runs["doomed"] += 1
        if runs["doomed"] == 2:
            doomed.revoke(reason="operator pulled the plug mid-run")
        return f"page {runs['doomed']}"

    def fetch_steady(url: str) -> str:
        """Fetch a page."""
        runs["steady"] += 1
        return f"page {runs['steady']}"

    async def main() -> tuple[BaseException | TaskResult, BaseException | TaskResult]:
        d_client, s_client = doomed.client(), steady.client()  # sync clients: spends run in threads
        d_agent = assistant(
            doomed,
            d_client,
            '[[loop:fetch:{"url": "https://example.com"}]]',
            [
                guard(
                    FunctionTool(fetch_doomed, "Fetch a page.", name="fetch"),
                    d_client,
                    scope="tools:fetch",
                    cost="0.01",
                )
            ],
        )
        s_agent = assistant(
            steady,
            s_client,
            '[[call:fetch:3:{"url": "https://example.com"}]]',
            [
                guard(
                    FunctionTool(fetch_steady, "Fetch a page.", name="fetch"),
                    s_client,
                    scope="tools:fetch",
                    cost="0.01",
                )
            ],
        )
        outcomes = await run_all((d_agent, "Fetch pages."), (s_agent, "Fetch pages."))
        return outcomes[0], outcomes[1]

    d_outcome, s_outcome = asyncio.run(main())

    # The revoked agent's next call, to the model through the gateway, was refused.
    assert isinstance(d_outcome, openai.AuthenticationError), d_outcome
    assert d_outcome.status_code == 401
    assert d_outcome.code == "credential_revoked"
    assert runs["doomed"] == 2
    assert len(gateway.calls_of(doomed.handle)) == 2  # the refused third call never reached upstream
    assert doomed.refresh().status == "revoked"

    # The other agent, on its own key, finished.
    assert isinstance(s_outcome, TaskResult)
    assert runs["steady"] == 3
    assert s_outcome.messages[-1].content == "Done after 3 tool calls."

    # And a guarded tool with the revoked key refuses before running.
    denied = guard(fetch_doomed, doomed.client(), scope="tools:fetch", cost="0.01")
    with pytest.raises(ToolDenied) as info:
        asyncio.run(denied.run_json({"url": "x"}, CancellationToken()))
    assert info.value.code == "credential_revoked"
    assert runs["doomed"] == 2


def test_hold_flow_captures_the_actual_cost_and_releases_on_error(gateway: Gateway) -> None:
    account = gateway.account("ag-quote", ["llm:openai", "tools:quote"], "5.00")
    runs = {"quote": 0}

    def quote(item: str) -> dict[str, str]:
        """Quote a price."""
        runs["quote"] += 1
        if runs["quote"] == 3:
            raise RuntimeError("quote service error")
        return {"item": item, "cost": ["0.12", "0.90"][runs["quote"] - 1]}

    async def main() -> TaskResult:
        client = account.async_client()
        try:
            agent = AssistantAgent(
                name="quoter",
                model_client=model_client(client, "house-model-v1"),  # a name AutoGen does not know
                tools=[guard(quote, client, scope="tools:quote", hold="0.50", cost_of=lambda r: r["cost"])],
                system_message=f'You are agent {account.handle}. [[call:quote:3:{{"item": "disk"}}]]',
                max_tool_iterations=5,
            )
            (outcome,) = await run_all((agent, "Get quotes."))
            assert isinstance(outcome, TaskResult), outcome
            return outcome
        finally:
            await client.aclose()

    result = asyncio.run(main())

    assert runs["quote"] == 3
    assert [r.is_error for r in tool_results(result)] == [False, False, True]
    check_quote_holds(gateway, account)


def test_streamed_model_calls_are_metered_to_the_agent(gateway: Gateway) -> None:
    account = gateway.account("ag-stream", ["llm:openai", "tools:search"], "1.00")
    runs = {"search": 0}

    def search(query: str) -> str:
        """Search the web."""
        runs["search"] += 1
        return f"result {runs['search']}"

    async def main() -> TaskResult:
        client = account.async_client()
        agent = AssistantAgent(
            name="streamer",
            model_client=model_client(client, "gpt-4o-mini"),
            model_client_stream=True,
            tools=[guard(search, client, scope="tools:search", cost="0.05")],
            system_message=f'You are agent {account.handle}. [[call:search:1:{{"query": "streams"}}]]',
            max_tool_iterations=5,
        )
        try:
            (outcome,) = await run_all((agent, "Search once."))
            assert isinstance(outcome, TaskResult), outcome
            return outcome
        finally:
            await client.aclose()

    result = asyncio.run(main())

    assert result.messages[-1].to_text() == "Done after 1 tool calls."
    assert runs["search"] == 1
    calls = gateway.calls_of(account.handle)
    assert [c["body"].get("stream") for c in calls] == [True, True]
    wait_for(lambda: settled(gateway, account, 2))  # metered from each stream's last chunk
    assert account.usage().window_spent == Decimal("0.05") + 2 * PRICE_PER_CALL


def test_guard_keeps_the_tool_schema_and_refuses_an_ungranted_scope(gateway: Gateway) -> None:
    account = gateway.account("ag-scope", ["tools:read"], "1.00")
    ran: list[str] = []

    def lookup(city: str, days: int = 1) -> str:
        """Look up the weather."""
        ran.append(city)
        return "sunny"

    inner = FunctionTool(lookup, "Look up the weather.")
    client = account.client()
    guarded = guard(inner, client, scope="tools:write", cost="0.01")
    assert guarded.name == inner.name == "lookup"
    assert guarded.description == inner.description
    assert guarded.schema == inner.schema
    with pytest.raises(ToolDenied) as info:
        asyncio.run(guarded.run_json({"city": "Oslo"}, CancellationToken()))
    assert info.value.code == "scope_not_granted"
    assert str(info.value).startswith("scope_not_granted:")
    assert ran == []

    allowed = guard(inner, client, scope="tools:read", cost="0.01")
    assert asyncio.run(allowed.run_json({"city": "Oslo"}, CancellationToken())) == "sunny"
    assert ran == ["Oslo"]
    assert account.usage().window_spent == Decimal("0.01")

    with pytest.raises(ValueError, match="exactly one"):
        guard(inner, client, scope="tools:read")
    made = model_client(client, "house-model-v2")
    assert made.model_info["function_calling"] is DEFAULT_MODEL_INFO["function_calling"]
    known = model_client(client, "gpt-4o-mini")
    assert known.model_info["family"] != "unknown"
