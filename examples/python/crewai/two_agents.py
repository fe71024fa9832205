"""A CrewAI crew of two agents, each with its own Bulkhead key, through the Bulkhead gateway.

Each crew member gets its key in its `Agent(...)` constructor: its LLM calls the model through
the gateway with that key, and its search tool pays for each call with it. The researcher keeps
searching until its spending cap stops its search tool; the summarizer searches twice and
finishes. Then the audit trail shows which agent did what: every search it paid for, the one it
was refused, and the gateway's metering of its model calls.

Needs a running `bulkhead serve --config examples/python/bulkhead.toml` (see ../README.md) and
`BULKHEAD_URL` / `BULKHEAD_ADMIN_TOKEN` in the environment.
"""

from __future__ import annotations

import os
import time
import uuid

# CrewAI reads these when it is imported: no telemetry or tracing leaves this machine.
os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")
os.environ.setdefault("OTEL_SDK_DISABLED", "true")

from crewai import Agent, Crew, Process, Task  # noqa: E402
from crewai.tools import tool  # noqa: E402

from bulkhead import AgentAccount  # noqa: E402
from bulkhead.integrations.crewai import guard, llm  # noqa: E402

MODEL = os.environ.get("EXAMPLE_MODEL", "gpt-4o-mini")
SEARCH_COST = "0.10"  # what one call of the search API costs us
searches = 0


@tool("search")
def search(query: str) -> str:
    """Search the web for `query`."""
    global searches  # noqa: PLW0603 - numbered answers: CrewAI stops runs that repeat themselves
    searches += 1
    return f"result {searches}: 3 pages about {query!r}"


def crew_member(account: AgentAccount, role: str) -> Agent:
    """A crew member whose key goes into its LLM and its tools, and nowhere else."""
    client = account.client()
    return Agent(
        role=role,
        goal=f"Do the {role.lower()}'s part of the job.",
        backstory=f"You are {account.handle}.",
        llm=llm(client, MODEL),
        tools=[guard(search, client, scope="tools:search", cost=SEARCH_COST)],
        max_iter=20,
    )


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


def main() -> None:
    """Create the two agents, run the crew, print what each did."""
    run_id = uuid.uuid4().hex[:6]
    scopes = ["llm:openai", "tools:search"]
    researcher = AgentAccount.create(handle=f"researcher-{run_id}", scopes=scopes, spending_cap="0.35")
    summarizer = AgentAccount.create(handle=f"summarizer-{run_id}", scopes=scopes, spending_cap="1.00")
    researching, summarizing = crew_member(researcher, "Researcher"), crew_member(summarizer, "Summarizer")

    # The [[…]] directives script the example model (see ../README.md); a real model ignores them.
    research = Task(
        description='Search until you know everything. [[loop:search:{"query": "agents"}]]',
        expected_output="What you found.",
        agent=researching,
    )
    summary = Task(
        description='Search twice, then summarise. [[call:search:2:{"query": "agents"}]]',
        expected_output="A short summary.",
        agent=summarizing,
    )
    crew = Crew(agents=[researching, summarizing], tasks=[research, summary], process=Process.sequential)
    result = crew.kickoff()

    for account, output in zip((researcher, summarizer), result.tasks_output, strict=True):
        print(f"\n{account.handle}: {output.raw}")
        for record in output.tool_failures:
            print(f"  refused: {record.failure.code}")
    for account in (researcher, summarizer):
        print_audit(account)


if __name__ == "__main__":
    main()
