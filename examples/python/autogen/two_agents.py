"""Two AutoGen agents, each with its own Bulkhead key, through the Bulkhead gateway.

Each `AssistantAgent` gets its key where it is built: its model client calls the model through
the gateway with that key, and its search tool pays for each call with it. The researcher keeps
searching until its spending cap stops its search tool; the summarizer searches twice and
finishes. The two run side by side. Then the audit trail shows which agent did what: every
search it paid for, the one it was refused, and the gateway's metering of its model calls.

Needs a running `bulkhead serve --config examples/python/bulkhead.toml` (see ../README.md) and
`BULKHEAD_URL` / `BULKHEAD_ADMIN_TOKEN` in the environment.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.base import TaskResult
from autogen_agentchat.messages import ToolCallExecutionEvent

from bulkhead import AgentAccount
from bulkhead.integrations.autogen import guard, model_client

MODEL = os.environ.get("EXAMPLE_MODEL", "gpt-4o-mini")
SEARCH_COST = "0.10"  # what one call of the search API costs us


async def search(query: str) -> str:
    """Search the web for `query`."""
    return f"3 pages about {query!r}"


async def run_agent(account: AgentAccount, instructions: str) -> TaskResult:
    """Run one agent: its key goes into its model client and its tools, and nowhere else."""
    client = account.async_client()
    agent = AssistantAgent(
        name=account.handle.split("-")[0],
        model_client=model_client(client, MODEL),
        tools=[guard(search, client, scope="tools:search", cost=SEARCH_COST)],
        system_message=instructions,
        max_tool_iterations=20,
    )
    try:
        return await agent.run(task="What is new in agent security?")
    finally:
        await agent._model_client.close()
        await client.aclose()


def print_run(account: AgentAccount, result: TaskResult) -> None:
    """Print each tool call's outcome as the model saw it, then the agent's last word."""
    print(f"\n{account.handle}:")
    for message in result.messages:
        if isinstance(message, ToolCallExecutionEvent):
            for call in message.content:
                print(f"  tool {call.name}: {'ERROR ' if call.is_error else ''}{call.content}")
    print(f"  answer: {result.messages[-1].to_text()}")


def print_audit(account: AgentAccount) -> None:
    """Print the agent's usage and audit trail once the gateway has settled its model calls."""
    deadline = time.monotonic() + 5
    while account.usage().window_held > 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # calls settle ~25 ms after they end; unused gateway slots return within 1 s
    usage, cap = account.usage(), account.refresh().spending_cap
    print(f"\n{account.handle}: spent {usage.window_spent} of its {cap} cap, {usage.denied_count} denied")
    for event in account.audit():
        detail = event.raw.get("detail") or {}
        by = " (gateway)" if detail.get("by") == "gateway" else ""
        amount = "" if event.amount is None else str(event.amount)
        print(
            f"  #{event.seq:<3} {event.action:<13} {event.outcome:<8} {event.reason or '':<22} "
            f"{event.scope or '':<13} {amount:>6}{by}"
        )


async def main() -> None:
    """Create the two agents, run them side by side, print what each did."""
    run_id = uuid.uuid4().hex[:6]
    scopes = ["llm:openai", "tools:search"]
    researcher = AgentAccount.create(handle=f"researcher-{run_id}", scopes=scopes, spending_cap="0.35")
    summarizer = AgentAccount.create(handle=f"summarizer-{run_id}", scopes=scopes, spending_cap="1.00")

    # The [[…]] directives script the example model (see ../README.md); a real model ignores them.
    results = await asyncio.gather(
        run_agent(researcher, 'Search until you know everything. [[loop:search:{"query": "agents"}]]'),
        run_agent(summarizer, 'Search twice, then summarise. [[call:search:2:{"query": "agents"}]]'),
    )
    for account, result in zip((researcher, summarizer), results, strict=True):
        print_run(account, result)
    for account in (researcher, summarizer):
        print_audit(account)


if __name__ == "__main__":
    asyncio.run(main())
