"""`bulkhead.integrations.crewai` driving real CrewAI crews through a real gateway.

Each crew member gets its own account and key in its `Agent(...)` constructor: its LLM (made by
`llm`) calls the scripted model through `/proxy/openai`, and its tools are wrapped by `guard`.
The scripted model loops (`[[loop:TOOL]]`) or calls a tool N times (`[[call:TOOL:N]]`).

CrewAI stops a run that makes the same call with the same result five times, so every tool here
answers something new each time.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import openai
import pytest
from crewai import Agent, Crew, Process, Task
from crewai.llms.providers.openai.completion import OpenAICompletion
from crewai.tools import BaseTool, tool
from pydantic import BaseModel, Field

from bulkhead import AgentAccount, AgentClient
from bulkhead.integrations.crewai import guard, llm
from support.frameworks import (
    PRICE_PER_CALL,
    Gateway,
    assert_upstream_saw_only_the_secret,
    check_quote_holds,
    check_researcher_and_writer,
    settled,
    wait_for,
)

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # raised inside CrewAI 1.15 itself
]


def member(account: AgentAccount, client: AgentClient, role: str, tools: list[Any]) -> Agent:
    """A crew member built with its own key: its LLM and its tools both carry it."""
    return Agent(
        role=role,
        goal=f"Do the {role.lower()}'s part of the job.",
        backstory=f"You are agent {account.handle}.",
        tools=tools,
        llm=llm(client, "gpt-4o-mini"),
        max_iter=20,
        verbose=False,
    )


def counting_tool(name: str, runs: dict[str, int]) -> BaseTool:
    """A CrewAI tool made with `@tool` that counts its runs and answers something new each time."""

    @tool(name)
    def run(query: str) -> str:
        """Look something up."""
        runs[name] += 1
        return f"{name} result {runs[name]} for {query}"

    return run


def test_crew_member_looping_into_its_cap_is_stopped_while_the_other_finishes(gateway: Gateway) -> None:
    # The cap is four searches' worth: with the metered LLM calls on top, the fourth search is
    # refused whatever LLM slots the gateway holds at that moment; the third fits beside them.
    researcher = gateway.account("cr-research", ["llm:openai", "tools:search"], "4.00")
    writer = gateway.account("cr-writer", ["llm:openai", "tools:draft"], "1.00")
    r_client, w_client = researcher.client(), writer.client()
    runs = {"search": 0, "draft": 0}

    r_agent = member(
        researcher,
        r_client,
        "Researcher",
        [guard(counting_tool("search", runs), r_client, scope="tools:search", cost="1.00")],
    )
    w_agent = member(
        writer, w_client, "Writer", [guard(counting_tool("draft", runs), w_client, scope="tools:draft", cost="0.10")]
    )
    research = Task(
        description='Research bulkheads. [[loop:search:{"query": "bulkheads"}]]',
        expected_output="What you found.",
        agent=r_agent,
    )
    write = Task(
        description='Write about caps. [[call:draft:2:{"query": "caps"}]]',
        expected_output="A paragraph.",
        agent=w_agent,
    )
    output = Crew(agents=[r_agent, w_agent], tasks=[research, write], process=Process.sequential).kickoff()

    # The looping member: three paid searches, then a refusal naming the code; the tool never ran again.
    assert runs["search"] == 3
    r_out, w_out = output.tasks_output
    assert [f.failure.code for f in r_out.tool_failures] == ["spending_cap_exceeded"]
    assert "did not run" in r_out.tool_failures[0].failure.message
    assert "spending_cap_exceeded" in r_out.raw  # the model read the refusal and quoted it

    # The other member finished its script untouched.
    assert runs["draft"] == 2
    assert w_out.tool_failures == []
    assert w_out.raw == "Done after 2 tool calls."

    check_researcher_and_writer(gateway, researcher, writer)


def test_crew_member_revoked_mid_run_stops_at_its_next_call(gateway: Gateway) -> None:
    steady = gateway.account("cr-steady", ["llm:openai", "tools:fetch"], "10.00")
    doomed = gateway.account("cr-doomed", ["llm:openai", "tools:fetch"], "10.00")
    s_client, d_client = steady.client(), doomed.client()
    runs = {"steady": 0, "doomed": 0}

    @tool("fetch")
    def fetch_steady(url: str) -> str:
        """Fetch a page."""
        runs["steady"] += 1
        return f"page {runs['steady']}"

    @tool("fetch")
    def fetch_doomed(url: str) -> str:
        """Fetch a page."""
        runs["doomed"] += 1
        if runs["doomed"] == 2:
            doomed.revoke(reason="operator pulled the plug mid-run")
        return f"page {runs['doomed']}"

    s_agent = member(steady, s_client, "Collector", [guard(fetch_steady, s_client, scope="tools:fetch", cost="0.01")])
    d_agent = member(doomed, d_client, "Crawler", [guard(fetch_doomed, d_client, scope="tools:fetch", cost="0.01")])
    collect = Task(
        description='Collect pages. [[call:fetch:3:{"url": "https://example.com/a"}]]',
        expected_output="The pages.",
        agent=s_agent,
    )
    crawl = Task(
        description='Crawl pages. [[loop:fetch:{"url": "https://example.com/b"}]]',
        expected_output="The pages.",
        agent=d_agent,
    )
    crew = Crew(agents=[s_agent, d_agent], tasks=[collect, crawl], process=Process.sequential)

    with pytest.raises(openai.AuthenticationError) as info:
        crew.kickoff()

    # The revoked member's next call, to the model through the gateway, was refused.
    assert info.value.status_code == 401
    assert info.value.code == "credential_revoked"
    assert runs["doomed"] == 2
    assert len(gateway.calls_of(doomed.handle)) == 2  # its later calls never reached the upstream
    assert doomed.refresh().status == "revoked"

    # The member that ran first, on its own key, had finished.
    assert runs["steady"] == 3
    assert collect.output is not None
    assert collect.output.raw == "Done after 3 tool calls."
    assert len(gateway.calls_of(steady.handle)) == 4

    # And the revoked member's guarded tool refuses before running.
    failure = guard(fetch_doomed, doomed.client(), scope="tools:fetch", cost="0.01").run(url="x")
    assert failure.code == "credential_revoked"
    assert runs["doomed"] == 2


def test_streamed_llm_calls_are_metered_to_the_member(gateway: Gateway) -> None:
    account = gateway.account("cr-stream", ["llm:openai", "tools:search"], "1.00")
    client = account.client()
    runs = {"search": 0}
    agent = Agent(
        role="Streamer",
        goal="Search once.",
        backstory=f"You are agent {account.handle}.",
        tools=[guard(counting_tool("search", runs), client, scope="tools:search", cost="0.05")],
        llm=llm(client, "gpt-4o-mini", stream=True),
        verbose=False,
    )
    task = Task(description='Search once. [[call:search:1:{"query": "streams"}]]', expected_output="x", agent=agent)
    output = Crew(agents=[agent], tasks=[task]).kickoff()

    assert output.raw == "Done after 1 tool calls."
    assert runs["search"] == 1
    calls = gateway.calls_of(account.handle)
    assert [c["body"].get("stream") for c in calls] == [True, True]
    wait_for(lambda: settled(gateway, account, 2))  # metered from each stream's last chunk
    assert account.usage().window_spent == Decimal("0.05") + 2 * PRICE_PER_CALL


class Quote(BaseModel):
    item: str = Field(description="What to price.")


class QuoteTool(BaseTool):
    """A tool subclass whose price is known only after it ran."""

    name: str = "quote"
    description: str = "Quote a price."
    args_schema: type[BaseModel] = Quote
    runs: int = 0

    def _run(self, item: str) -> dict[str, str]:
        self.runs += 1
        if self.runs == 3:
            raise RuntimeError("quote service error")
        return {"item": item, "cost": ["0.12", "0.90"][self.runs - 1]}


def test_hold_flow_captures_the_actual_cost_and_releases_on_error(gateway: Gateway) -> None:
    account = gateway.account("cr-quote", ["llm:openai", "tools:quote"], "5.00")
    client = account.client()
    inner = QuoteTool()
    agent = Agent(
        role="Buyer",
        goal="Price things.",
        backstory=f"You are agent {account.handle}.",
        tools=[guard(inner, client, scope="tools:quote", hold="0.50", cost_of=lambda r: r["cost"])],
        llm=llm(client, "house-model-v1"),  # a name CrewAI does not know stays on the gateway
        verbose=False,
    )
    task = Task(description='Get quotes. [[call:quote:3:{"item": "disk"}]]', expected_output="The quotes.", agent=agent)
    Crew(agents=[agent], tasks=[task]).kickoff()

    assert inner.runs == 3
    assert_upstream_saw_only_the_secret(gateway.calls_of(account.handle))
    check_quote_holds(gateway, account)


def test_guard_keeps_the_tool_and_refuses_an_ungranted_scope(gateway: Gateway) -> None:
    account = gateway.account("cr-scope", ["tools:read"], "1.00")
    client = account.client()
    ran: list[str] = []

    @tool("weather", max_usage_count=5)
    def weather(city: str) -> str:
        """Look up the weather."""
        ran.append(city)
        return "sunny"

    denied = guard(weather, client, scope="tools:write", cost="0.01")
    assert isinstance(denied, BaseTool)
    assert (denied.name, denied.description) == (weather.name, weather.description)
    assert denied.args_schema is weather.args_schema
    assert denied.max_usage_count == 5
    failure = denied.run(city="Oslo")
    assert failure.code == "scope_not_granted"
    assert "(code: scope_not_granted)" in failure.as_agent_message()
    assert ran == []

    allowed = guard(weather, client, scope="tools:read", cost="0.01")
    assert allowed.run(city="Oslo") == "sunny"
    assert asyncio.run(allowed.arun(city="Bergen")) == "sunny"  # the async path pays the same way
    assert ran == ["Oslo", "Bergen"]
    assert account.usage().window_spent == Decimal("0.02")
    assert asyncio.run(denied.arun(city="Oslo")).code == "scope_not_granted"
    assert ran == ["Oslo", "Bergen"]
    assert allowed.cache_function({"city": "Oslo"}, "sunny") is False  # CrewAI's cache never answers

    with pytest.raises(ValueError, match="exactly one"):
        guard(weather, client, scope="tools:read")

    for name in ("gpt-4o-mini", "openai/gpt-4o-mini", "house-model-v2"):
        made = llm(client, name, temperature=0)
        assert isinstance(made, OpenAICompletion)  # CrewAI's native OpenAI provider, not LiteLLM
        assert made.base_url == f"{account.client().url}/proxy/openai/v1"
        assert made.api_key == client.key
        assert made.model == name.removeprefix("openai/")
        assert made.temperature == 0
