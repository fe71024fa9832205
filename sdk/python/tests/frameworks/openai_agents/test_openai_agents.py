"""OpenAI Agents SDK assistants (`Runner.run`) with a Bulkhead key each, through a real gateway.

The only stand-in is the LLM: `llm_upstream` answers the Responses API and chat completions with
tool calls as its prompt scripts them. The Agents SDK's own loop and OpenAI model objects, the
SDK and `bulkhead serve` are all real.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import openai
import pytest
from agents import (
    Agent,
    FunctionTool,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    RunResult,
    RunResultStreaming,
    function_tool,
)
from agents.items import ToolCallOutputItem
from agents.tool_context import ToolContext

from bulkhead.integrations.openai_agents import guard, metered, model

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


def search_tool(runs: list[str], on_run: Any = None) -> FunctionTool:
    """An Agents SDK function tool whose body records each run in `runs`."""

    @function_tool
    def search(query: str) -> str:
        """Search the web for `query`."""
        runs.append(query)
        if on_run is not None:
            on_run(len(runs))
        return f"result {len(runs)} for {query!r}"

    return search


def assistant(client, runs: list[str], script: str, *, api: str = "responses", on_run: Any = None) -> Agent:
    """An assistant whose model and tool both carry `client`'s key."""
    return Agent(
        name="researcher",
        instructions=f"You research things. {script}",
        model=model(client, MODEL, api=api, max_retries=0),
        tools=[guard(search_tool(runs, on_run), client, scope=TOOL_SCOPE, cost=TOOL_COST)],
    )


def task(handle: str) -> str:
    """The user's message to an assistant; it names the agent so its model calls can be told apart."""
    return f"You are {handle}. Search for what you need."


async def run(agent: Agent, handle: str, *, streamed: bool = False) -> RunResult | RunResultStreaming:
    if not streamed:
        return await Runner.run(agent, task(handle), max_turns=30)
    result = Runner.run_streamed(agent, task(handle), max_turns=30)
    async for _event in result.stream_events():
        pass
    return result


def outputs(result: RunResult | RunResultStreaming) -> list[str]:
    return [str(item.output) for item in result.new_items if isinstance(item, ToolCallOutputItem)]


def check_two_agents(harness, looper, finisher, loop_out, finish_out, loop_runs, finish_runs) -> None:
    """The looping assistant was stopped at its cap, the other finished, each paid for its own."""
    # The looper: three searches ran, the fourth was refused and never ran, the model read why.
    loop_outputs = outputs(loop_out)
    assert len(loop_outputs) == LOOPER_RUNS + 1
    assert all(o.startswith("result ") for o in loop_outputs[:-1])
    assert loop_outputs[-1].startswith("spending_cap_exceeded: ")
    assert loop_runs == ["bulkhead"] * LOOPER_RUNS  # the arguments reached the body through the guard
    assert "spending_cap_exceeded" in str(loop_out.final_output)
    # The finisher: its two searches, then its answer.
    assert [o.startswith("result ") for o in outputs(finish_out)] == [True, True]
    assert finish_out.final_output == "Done after 2 tool calls."
    assert len(finish_runs) == 2
    for account, out, runs in ((looper, loop_out, loop_runs), (finisher, finish_out, finish_runs)):
        calls = len(out.raw_responses)
        assert len(harness.llm_calls(account.handle)) == calls  # every model call went upstream once
        usage = harness.settled(account, calls, TOOL_COST * len(runs))
        assert usage.denied_count == (1 if account is looper else 0)
    harness.check_audit(
        looper.handle,
        allowed=LOOPER_RUNS,
        denied=1,
        model_calls=len(loop_out.raw_responses),
        tool_scope=TOOL_SCOPE,
        tool_cost=TOOL_COST,
    )
    harness.check_audit(
        finisher.handle,
        allowed=2,
        denied=0,
        model_calls=len(finish_out.raw_responses),
        tool_scope=TOOL_SCOPE,
        tool_cost=TOOL_COST,
    )
    harness.assert_upstream_saw_only_the_secret()


def test_guard_keeps_the_tools_interface_and_model_uses_the_agents_key(harness):
    account = harness.account("oa-iface", "1.00", scopes=["llm:openai"])  # no tool scope
    client = account.client()
    runs: list[str] = []
    search = search_tool(runs)
    guarded = guard(search, client, scope=TOOL_SCOPE, cost="0.10")
    assert isinstance(guarded, FunctionTool)
    assert (guarded.name, guarded.description) == (search.name, search.description)
    assert guarded.params_json_schema == search.params_json_schema
    assert guarded.on_invoke_tool is not search.on_invoke_tool

    # A refused spend is the tool's answer to the model, and the body never runs.
    arguments = '{"query": "x"}'
    ctx = ToolContext(context=None, tool_name="search", tool_call_id="call_1", tool_arguments=arguments)
    answer = asyncio.run(guarded.on_invoke_tool(ctx, arguments))
    assert answer.startswith("scope_not_granted: ")
    assert "did not run" in answer
    assert runs == []

    responses = model(client, MODEL)
    assert isinstance(responses, OpenAIResponsesModel)
    assert isinstance(model(client, MODEL, api="chat"), OpenAIChatCompletionsModel)
    openai_client = responses._client
    assert str(openai_client.base_url).rstrip("/") == f"{account.client().base_url('openai')}/v1"
    assert openai_client.api_key == account.key
    with pytest.raises(ValueError, match="api"):
        model(client, MODEL, api="assistants")

    # A plain typed function becomes a function tool of its own name, schema and docstring.
    def lookup(city: str) -> str:
        """Look up the weather in `city`."""
        return f"sunny in {city}"

    from_function = guard(lookup, client, scope=TOOL_SCOPE, cost="0.10")
    assert isinstance(from_function, FunctionTool)
    assert from_function.name == "lookup"
    assert from_function.params_json_schema == function_tool(lookup).params_json_schema


@pytest.mark.parametrize(
    ("api", "streamed"),
    [("responses", False), ("responses", True), ("chat", False), ("chat", True)],
)
def test_two_assistants_one_loops_into_its_cap_and_is_stopped_the_other_finishes(harness, api, streamed):
    looper = harness.account("oa-looper", LOOPER_CAP)
    finisher = harness.account("oa-finisher", "1.00")
    loop_runs: list[str] = []
    finish_runs: list[str] = []

    async def both() -> list[Any]:
        # Non-streamed runs pay with the async client, streamed ones with the sync client (in a thread).
        if streamed:
            loop_client, finish_client = looper.client(), finisher.client()
        else:
            loop_client, finish_client = looper.async_client(), finisher.async_client()
        loop_agent = assistant(loop_client, loop_runs, LOOP, api=api)
        finish_agent = assistant(finish_client, finish_runs, CALL_TWICE, api=api)
        return await asyncio.gather(
            run(loop_agent, looper.handle, streamed=streamed),
            run(finish_agent, finisher.handle, streamed=streamed),
        )

    loop_out, finish_out = asyncio.run(both())
    check_two_agents(harness, looper, finisher, loop_out, finish_out, loop_runs, finish_runs)
    path = "/v1/responses" if api == "responses" else "/v1/chat/completions"
    for account in (looper, finisher):
        calls = harness.llm_calls(account.handle)
        assert {c["path"] for c in calls} == {path}
        assert all(bool(c["body"].get("stream")) == streamed for c in calls)


def test_an_assistant_revoked_mid_run_stops_at_its_next_call_the_other_goes_on(harness):
    victim = harness.account("oa-victim", "1.00")
    other = harness.account("oa-other", "1.00")
    runs: list[str] = []

    def revoke_on_second_run(count: int) -> None:
        if count == 2:
            assert victim.revoke(reason="compromised") == [victim.handle]

    client = victim.client()
    agent = assistant(client, runs, LOOP, on_run=revoke_on_second_run)
    with pytest.raises(openai.AuthenticationError) as refused:
        asyncio.run(run(agent, victim.handle))
    assert refused.value.status_code == 401
    assert refused.value.code == "credential_revoked"
    assert len(runs) == 2
    assert len(harness.llm_calls(victim.handle)) == 2  # the call after the revocation never went upstream

    # Its next spend is refused too: the handler answers the code and the tool does not run.
    guarded = agent.tools[0]
    arguments = '{"query": "again"}'
    ctx = ToolContext(context=None, tool_name="search", tool_call_id="call_9", tool_arguments=arguments)
    answer = asyncio.run(guarded.on_invoke_tool(ctx, arguments))
    assert answer.startswith("credential_revoked: ")
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

    # The other assistant, on the same gateway, is untouched.
    other_runs: list[str] = []
    out = asyncio.run(run(assistant(other.async_client(), other_runs, CALL_ONCE), other.handle))
    assert out.final_output == "Done after 1 tool calls."
    harness.settled(other, len(out.raw_responses), TOOL_COST)
    harness.assert_upstream_saw_only_the_secret()


def test_metered_tool_holds_the_most_and_captures_what_the_call_cost(harness):
    account = harness.account("oa-metered", "0.30")
    client = account.async_client()
    runs: list[str] = []

    def cost_of(output: str) -> Decimal:
        return Decimal("0.04")  # e.g. what the search API billed for the pages it returned

    agent = Agent(
        name="researcher",
        instructions=LOOP,
        model=model(client, MODEL, max_retries=0),
        tools=[metered(search_tool(runs), client, scope=TOOL_SCOPE, max_cost="0.10", cost_of=cost_of)],
    )
    out = asyncio.run(run(agent, account.handle))
    # Holds of 0.10 fit under 0.30 five times (each run keeps 0.04); the sixth is refused.
    results = outputs(out)
    assert len(results) == 6
    assert results[-1].startswith("spending_cap_exceeded: ")
    assert len(runs) == 5
    harness.settled(account, len(out.raw_responses), Decimal("0.04") * 5)
    events = harness.audit(account.handle)
    holds = [e for e in events if e["action"] == "hold" and e["scope"] == TOOL_SCOPE]
    assert [e["outcome"] for e in holds] == ["allowed"] * 5 + ["denied"]
    hold_ids = {e["ref"] for e in holds if e["outcome"] == "allowed"}
    captures = [e for e in events if e["action"] == "capture" and e["ref"] in hold_ids]
    assert [Decimal(e["amount"]) for e in captures] == [Decimal("0.04")] * 5

    # A call that cost nothing releases its hold; a cost_of that fails charges the whole hold.
    # (These pay with the sync client: the async one belongs to the event loop of the run above.)
    client = account.client()
    before = account.usage().window_spent
    arguments = '{"query": "cached"}'
    ctx = ToolContext(context=None, tool_name="search", tool_call_id="call_f", tool_arguments=arguments)
    free = guard(search_tool(runs), client, scope=TOOL_SCOPE, hold="0.01", cost_of=lambda output: 0)
    assert asyncio.run(free.on_invoke_tool(ctx, arguments)) == "result 6 for 'cached'"
    assert account.usage().window_spent == before
    assert harness.audit(account.handle)[-1]["action"] == "release"

    def unpriced(output: str) -> Decimal:
        raise LookupError("no price for this page")

    priced_later = guard(search_tool(runs), client, scope=TOOL_SCOPE, hold="0.01", cost_of=unpriced)
    with pytest.raises(LookupError, match="no price"):
        asyncio.run(priced_later.on_invoke_tool(ctx, arguments))
    assert account.usage().window_spent == before + Decimal("0.01")
    assert [harness.audit(account.handle)[-1][k] for k in ("action", "amount")] == ["capture", "0.01"]

    with pytest.raises(ValueError, match="exactly one"):
        guard(search_tool(runs), client, scope=TOOL_SCOPE, cost="0.01", hold="0.10")
    with pytest.raises(ValueError, match="goes with hold"):
        guard(search_tool(runs), client, scope=TOOL_SCOPE, cost="0.01", cost_of=cost_of)
