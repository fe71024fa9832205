"""Two OpenAI Agents SDK assistants, each with its own Bulkhead key, through the Bulkhead gateway.

The researcher keeps searching until its spending cap stops its search tool; the summarizer
searches twice and finishes. Then the audit trail shows which assistant did what: every search
it paid for, the one it was refused, and the gateway's metering of its model calls.

Needs a running `bulkhead serve --config examples/python/bulkhead.toml` (see README.md) and
`BULKHEAD_URL` / `BULKHEAD_ADMIN_TOKEN` in the environment.
"""

from __future__ import annotations

import os
import time
import uuid

from agents import Agent, Runner, function_tool, set_tracing_disabled

from bulkhead import AgentAccount
from bulkhead.integrations.openai_agents import guard, model

MODEL = os.environ.get("EXAMPLE_MODEL", "gpt-4o-mini")
SEARCH_COST = "0.10"  # what one call of the search API costs us

# Traces would go to OpenAI's servers with OPENAI_API_KEY; this example keeps every call on the gateway.
set_tracing_disabled(True)


@function_tool
def search(query: str) -> str:
    """Search the web for `query`."""
    return f"3 pages about {query!r}"


def run_assistant(account: AgentAccount, instructions: str) -> str:
    """Run one assistant: its key goes into its tool-call handler and its model, and nowhere else."""
    client = account.client()
    assistant = Agent(
        name=account.handle,
        instructions=instructions,
        model=model(client, MODEL),  # the Responses API, the Agents SDK's default
        tools=[guard(search, client, scope="tools:search", cost=SEARCH_COST)],
    )
    result = Runner.run_sync(assistant, "What is new in agent security?", max_turns=20)
    return str(result.final_output)


def print_audit(account: AgentAccount) -> None:
    """Print the assistant's usage and audit trail once the gateway has settled its model calls."""
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


def main() -> None:
    """Create the two assistants, run them one after the other, print what each did."""
    run_id = uuid.uuid4().hex[:6]
    scopes = ["llm:openai", "tools:search"]
    researcher = AgentAccount.create(handle=f"researcher-{run_id}", scopes=scopes, spending_cap="0.35")
    summarizer = AgentAccount.create(handle=f"summarizer-{run_id}", scopes=scopes, spending_cap="1.00")

    # The [[…]] directives script the example model (see README.md); a real model ignores them.
    answer = run_assistant(researcher, 'Search until you know everything. [[loop:search:{"query": "agents"}]]')
    print(f"{researcher.handle}: {answer}")
    answer = run_assistant(summarizer, 'Search twice, then summarise. [[call:search:2:{"query": "agents"}]]')
    print(f"{summarizer.handle}: {answer}")

    for account in (researcher, summarizer):
        print_audit(account)


if __name__ == "__main__":
    main()
