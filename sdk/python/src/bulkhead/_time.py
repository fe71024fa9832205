"""RFC 3339 timestamps from answers."""

from __future__ import annotations

import re
from datetime import datetime, timezone

_FRACTION = re.compile(r"\.(\d+)")


def parse_time(text: str) -> datetime | None:
    """An aware `datetime` from an RFC 3339 string, or `None` when it is not one."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    # Python 3.10 reads only 3 or 6 fractional digits: make it six (sub-microsecond digits dropped).
    value = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), value, count=1)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed


def optional_time(value: object) -> datetime | None:
    """`parse_time` for a field that may be missing or null."""
    return parse_time(value) if isinstance(value, str) else None
