"""LangChain agents (`create_agent` loops) with a Bulkhead key each, through a real gateway.

The only stand-in is the LLM: `llm_upstream` answers with tool calls as its prompt scripts them.
Everything else is real: LangChain's agent loop and `ChatOpenAI`, the SDK, `bulkhead serve`.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import openai
import pytest
from langchain.agents import create_agent
from langchain.tools import ToolRuntime
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langchain_core.utils.function_calling import convert_to_openai_tool

from bulkhead.integrations.langchain import chat_model, guard, metered

MODEL = "gpt-4o-mini"
TOOL_SCOPE = "tools:search"
TOOL_COST = Decimal("0.10")
# A cap of 0.35 pays for three searches and the model calls around them (a fraction of a cent
# each, with room for the gateway's 0.05 hold per call, see `frameworks.gateway_config`): the
# fourth search is refused.
LOOPER_CAP = "0.35"
LOOPER_RUNS = 3
# The scripted model's plans (see llm_upstream): search until refused, or search N times.
LOOP = '[[loop:search:{"query": "bulkhead"}]]'
CALL_TWICE = '[[call:search:2:{"query": "bulkhead"}]]'
CALL_ONCE = '[[call:search:1:{"query": "bulkhead"}]]'

pytestmark = pytest.mark.timeout(60)


def search_tool(runs: list[str], on_run: Any = None) -> BaseTool:
    """A LangChain tool whose body records each run in `runs`."""

    @tool
    def search(query: str = "") -> str:
        """Search the web for `query`."""
        runs.append(query)
        if on_run is not None:
            on_run(len(runs))
        return f"result {len(runs)} for {query!r}"

    return search


def task(handle: str) -> dict[str, Any]:
    """The user's message to an agent; it names the agent so its model calls can be told apart."""
    return {"messages": [{"role": "user", "content": f"You are {handle}. Search for what you need."}]}


def tool_messages(out: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in out["messages"] if isinstance(m, ToolMessage)]


def model_calls(out: dict[str, Any]) -> int:
    return sum(isinstance(m, AIMessage) for m in out["messages"])


def check_two_agents(harness, looper, finisher, loop_out, finish_out, loop_runs, finish_runs) -> None:
    """The looping agent was stopped at its cap, the other finished, each paid for its own."""
    # The looper: three searches ran, the fourth was refused and never ran, the model read why.
    messages = tool_messages(loop_out)
    assert [m.status for m in messages] == ["success"] * LOOPER_RUNS + ["error"]
    assert messages[-1].content.startswith("spending_cap_exceeded: ")
    assert loop_runs == ["bulkhead"] * LOOPER_RUNS  # the arguments reached the body through the guard
    assert "spending_cap_exceeded" in loop_out["messages"][-1].content
    # The finisher: its two searches, then its answer.
    assert [m.status for m in tool_messages(finish_out)] == ["success", "success"]
    assert finish_out["messages"][-1].content == "Done after 2 tool calls."
    assert len(finish_runs) == 2
    for account, out, runs in ((looper, loop_out, loop_runs), (finisher, finish_out, finish_runs)):
        calls = model_calls(out)
        assert len(harness.llm_calls(account.handle)) == calls  # every model call went upstream once
        usage = harness.settled(account, calls, TOOL_COST * len(runs))
        assert usage.denied_count == (1 if account is looper else 0)
    harness.check_audit(
        looper.handle,
        allowed=LOOPER_RUNS,
        denied=1,
        model_calls=model_calls(loop_out),
        tool_scope=TOOL_SCOPE,
        tool_cost=TOOL_COST,
    )
    harness.check_audit(
        finisher.handle,
        allowed=2,
        denied=0,
        model_calls=model_calls(finish_out),
        tool_scope=TOOL_SCOPE,
        tool_cost=TOOL_COST,
    )
    harness.assert_upstream_saw_only_the_secret()


def test_guard_keeps_the_tools_interface_and_chat_model_uses_the_agents_key(harness):
    account = harness.account("lc-iface", "1.00", scopes=["llm:openai"])  # no tool scope
    client = account.client()
    runs: list[str] = []
    search = search_tool(runs)
    guarded = guard(search, client, scope=TOOL_SCOPE, cost="0.10")
    assert isinstance(guarded, BaseTool)
    assert (guarded.name, guarded.description) == (search.name, search.description)
    assert convert_to_openai_tool(guarded) == convert_to_openai_tool(search)

    # A refused spend is the tool's answer, with status error, and the body never runs.
    answer = guarded.invoke({"type": "tool_call", "name": "search", "args": {"query": "x"}, "id": "c1"})
    assert isinstance(answer, ToolMessage)
    assert answer.status == "error"
    assert answer.content.startswith("scope_not_granted: ")
    assert "did not run" in answer.content
    assert runs == []

    model = chat_model(client, MODEL, max_retries=0)
    assert model.openai_api_base == f"{account.client().base_url('openai')}/v1"
    assert model.openai_api_key.get_secret_value() == account.key
    with pytest.raises(ValueError, match="decimal"):
        guard(search, client, scope=TOOL_SCOPE, cost="0.1234567")

    # A plain typed function becomes a tool of its own name, schema and docstring.
    def lookup(city: str) -> str:
        """Look up the weather in `city`."""
        return f"sunny in {city}"

    from_function = guard(lookup, client, scope=TOOL_SCOPE, cost="0.10")
    assert (from_function.name, from_function.description) == ("lookup", "Look up the weather in `city`.")
    assert from_function.args == tool(lookup).args


def test_two_agents_one_loops_into_its_cap_and_is_stopped_the_other_finishes(harness):
    looper = harness.account("lc-looper", LOOPER_CAP)
    finisher = harness.account("lc-finisher", "1.00")
    loop_runs: list[str] = []
    finish_runs: list[str] = []
    agents = []
    for account, runs, script in ((looper, loop_runs, LOOP), (finisher, finish_runs, CALL_TWICE)):
        client = account.client()  # the key goes in here, per tool and per model
        agents.append(
            create_agent(
                chat_model(client, MODEL, max_retries=0),
                tools=[guard(search_tool(runs), client, scope=TOOL_SCOPE, cost=TOOL_COST)],
                system_prompt=f"You research things. {script}",
            )
        )
    with ThreadPoolExecutor(2) as pool:
        loop_future = pool.submit(agents[0].invoke, task(looper.handle))
        finish_future = pool.submit(agents[1].invoke, task(finisher.handle))
        loop_out, finish_out = loop_future.result(), finish_future.result()
    check_two_agents(harness, looper, finisher, loop_out, finish_out, loop_runs, finish_runs)
    assert not any(c["body"].get("stream") for c in harness.llm_calls(looper.handle))


def test_two_async_agents_streaming_through_the_gateway(harness):
    looper = harness.account("lc-async-looper", LOOPER_CAP)
    finisher = harness.account("lc-async-finisher", "1.00")
    loop_runs: list[str] = []
    finish_runs: list[str] = []

    async def run(account, runs: list[str], script: str) -> dict[str, Any]:
        async with account.async_client() as client:
            agent = create_agent(
                chat_model(client, MODEL, streaming=True, max_retries=0),
                tools=[guard(search_tool(runs), client, scope=TOOL_SCOPE, cost=TOOL_COST)],
                system_prompt=f"You research things. {script}",
            )
            result: dict[str, Any] = await agent.ainvoke(task(account.handle))
            return result

    async def both() -> list[dict[str, Any]]:
        return await asyncio.gather(run(looper, loop_runs, LOOP), run(finisher, finish_runs, CALL_TWICE))

    loop_out, finish_out = asyncio.run(both())
    check_two_agents(harness, looper, finisher, loop_out, finish_out, loop_runs, finish_runs)
    for account in (looper, finisher):
        assert all(c["body"].get("stream") is True for c in harness.llm_calls(account.handle))


def test_an_agent_revoked_mid_run_stops_at_its_next_call_the_other_goes_on(harness):
    victim = harness.account("lc-victim", "1.00")
    other = harness.account("lc-other", "1.00")
    runs: list[str] = []

    def revoke_on_second_run(count: int) -> None:
        if count == 2:
            assert victim.revoke(reason="compromised") == [victim.handle]

    client = victim.client()
    guarded = guard(search_tool(runs, revoke_on_second_run), client, scope=TOOL_SCOPE, cost=TOOL_COST)
    agent = create_agent(chat_model(client, MODEL, max_retries=0), tools=[guarded], system_prompt=LOOP)
    with pytest.raises(openai.AuthenticationError) as refused:
        agent.invoke(task(victim.handle))
    assert refused.value.status_code == 401
    assert refused.value.code == "credential_revoked"
    assert len(runs) == 2
    assert len(harness.llm_calls(victim.handle)) == 2  # the call after the revocation never went upstream

    # Its next spend is refused too: the guard answers the code and the tool does not run.
    answer = guarded.invoke({"type": "tool_call", "name": "search", "args": {"query": "again"}, "id": "c9"})
    assert answer.status == "error"
    assert answer.content.startswith("credential_revoked: ")
    assert len(runs) == 2
    events = harness.audit(victim.handle)
    assert [e["action"] for e in events].count("agent.revoke") == 1
    spends = [(e["outcome"], e["reason"]) for e in events if e["action"] == "spend"]
    assert spends == [("allowed", None), ("allowed", None)]
    # The first refusal of the revoked key (its model call, at the gateway) is audited in full;
    # later ones, like that spend, are answered from memory and audited coalesced, one `refused`
    # event per interval.
    refusals = [e for e in events if e["outcome"] == "denied" and e["reason"] == "credential_revoked"]
    assert refusals, events

    # The other agent, on the same gateway, is untouched.
    other_runs: list[str] = []
    other_client = other.client()
    other_agent = create_agent(
        chat_model(other_client, MODEL, max_retries=0),
        tools=[guard(search_tool(other_runs), other_client, scope=TOOL_SCOPE, cost=TOOL_COST)],
        system_prompt=CALL_ONCE,
    )
    out = other_agent.invoke(task(other.handle))
    assert out["messages"][-1].content == "Done after 1 tool calls."
    harness.settled(other, model_calls(out), TOOL_COST)
    harness.assert_upstream_saw_only_the_secret()


def test_metered_tool_holds_the_most_and_captures_what_the_call_cost(harness):
    account = harness.account("lc-metered", "0.30")
    client = account.client()
    runs: list[str] = []
    search = search_tool(runs)

    def cost_of(result: str) -> Decimal:
        return Decimal("0.04")  # e.g. what the search API billed for the pages it returned

    tool_ = metered(search, client, scope=TOOL_SCOPE, max_cost="0.10", cost_of=cost_of)
    agent = create_agent(chat_model(client, MODEL, max_retries=0), tools=[tool_], system_prompt=LOOP)
    out = agent.invoke(task(account.handle))
    # Holds of 0.10 fit under 0.30 five times (each run keeps 0.04); the sixth is refused.
    messages = tool_messages(out)
    assert [m.status for m in messages] == ["success"] * 5 + ["error"]
    assert messages[-1].content.startswith("spending_cap_exceeded: ")
    assert len(runs) == 5
    harness.settled(account, model_calls(out), Decimal("0.04") * 5)
    events = harness.audit(account.handle)
    holds = [e for e in events if e["action"] == "hold" and e["scope"] == TOOL_SCOPE]
    assert [e["outcome"] for e in holds] == ["allowed"] * 5 + ["denied"]
    hold_ids = {e["ref"] for e in holds if e["outcome"] == "allowed"}
    captures = [e for e in events if e["action"] == "capture" and e["ref"] in hold_ids]
    assert [Decimal(e["amount"]) for e in captures] == [Decimal("0.04")] * 5

    # A tool that fails is charged nothing: its hold is released.
    def broken(query: str = "") -> str:
        """Search the web for `query`."""
        raise RuntimeError("search backend down")

    before = account.usage().window_spent
    failing = metered(tool(broken), client, scope=TOOL_SCOPE, max_cost="0.01", cost_of=cost_of)
    with pytest.raises(RuntimeError, match="backend down"):
        failing.invoke({"query": "x"})
    usage = account.usage()
    assert (usage.window_spent, usage.window_held) == (before, 0)
    assert harness.audit(account.handle)[-1]["action"] == "release"

    # A call that cost nothing releases its hold; a cost_of that fails charges the whole hold.
    free = guard(search_tool(runs), client, scope=TOOL_SCOPE, hold="0.01", cost_of=lambda result: 0)
    assert free.invoke({"query": "cached"}) == "result 6 for 'cached'"
    assert account.usage().window_spent == before
    assert harness.audit(account.handle)[-1]["action"] == "release"

    def unpriced(result: str) -> Decimal:
        raise LookupError("no price for this page")

    priced_later = guard(search_tool(runs), client, scope=TOOL_SCOPE, hold="0.01", cost_of=unpriced)
    with pytest.raises(LookupError, match="no price"):
        priced_later.invoke({"query": "rare"})
    assert account.usage().window_spent == before + Decimal("0.01")
    assert [harness.audit(account.handle)[-1][k] for k in ("action", "amount")] == ["capture", "0.01"]

    with pytest.raises(ValueError, match="exactly one"):
        guard(search, client, scope=TOOL_SCOPE, cost="0.01", hold="0.10")
    with pytest.raises(ValueError, match="goes with hold"):
        guard(search, client, scope=TOOL_SCOPE, cost="0.01", cost_of=cost_of)


def test_async_metered_tool_and_an_async_guard_called_synchronously(harness):
    account = harness.account("lc-async-metered", "1.00")
    runs: list[str] = []

    async def once() -> Any:
        async with account.async_client() as client:
            metered_search = metered(
                search_tool(runs), client, scope=TOOL_SCOPE, max_cost="0.10", cost_of=lambda result: "0.03"
            )
            call = {"type": "tool_call", "name": "search", "args": {"query": "q"}, "id": "c1"}
            answer = await metered_search.ainvoke(call)
            # An async client pays with `await`: the synchronous path says so instead of blocking.
            guarded = guard(search_tool(runs), client, scope=TOOL_SCOPE, cost="0.01")
            with pytest.raises(TypeError, match="ainvoke"):
                guarded.invoke({"query": "q"})
            return answer

    answer = asyncio.run(once())
    assert answer.status == "success"
    assert answer.content == "result 1 for 'q'"
    assert runs == ["q"]
    usage = account.usage()
    assert (usage.window_spent, usage.window_held) == (Decimal("0.03"), 0)
    events = harness.audit(account.handle)
    assert [(e["action"], e["amount"]) for e in events[1:]] == [("hold", "0.10"), ("capture", "0.03")]


def test_a_tool_with_an_injected_runtime_still_gets_it(harness):
    """LangChain injects `ToolRuntime` into tools that ask for it; the guard passes it through."""
    account = harness.account("lc-runtime", "1.00")
    client = account.client()
    seen: list[str] = []

    @tool
    def search(query: str, runtime: ToolRuntime) -> str:
        """Search the web for `query`."""
        seen.append(runtime.tool_call_id)
        return f"found {query}"

    guarded = guard(search, client, scope=TOOL_SCOPE, cost=TOOL_COST)
    assert "runtime" not in guarded.tool_call_schema.model_json_schema()["properties"]
    agent = create_agent(chat_model(client, MODEL, max_retries=0), tools=[guarded], system_prompt=CALL_ONCE)
    out = agent.invoke(task(account.handle))
    (message,) = tool_messages(out)
    assert (message.status, message.content) == ("success", "found bulkhead")
    assert seen == [message.tool_call_id]
    harness.settled(account, model_calls(out), TOOL_COST)
