"""The README's quick start (the contract's Python example) runs as written."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

from bulkhead import AgentAccount
from support.server import Server

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> str:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None
    return match.group(1)


def test_the_quick_start_runs_as_written(bulkhead_env: Server) -> None:
    code = quick_start()
    assert 'handle="invoice-processor-prod-01"' in code
    scope: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), scope)
    account = scope["account"]
    assert isinstance(account, AgentAccount)
    assert account.handle == "invoice-processor-prod-01"
    admin_view = AgentAccount("invoice-processor-prod-01", url=bulkhead_env.url, admin_token=bulkhead_env.admin_token)
    agent = admin_view.refresh()
    assert agent.status == "revoked"
    assert agent.spending_cap == Decimal("50.00")
    assert agent.per_tx_limit == Decimal("5.00")
    assert agent.usage is not None
    assert agent.usage.window_spent == Decimal("2.90")  # 2.50 spent, 0.40 of the hold captured
    assert agent.usage.window_held == Decimal("0.00")
    assert account.revoke() == ["invoice-processor-prod-01"]
