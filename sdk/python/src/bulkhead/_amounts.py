"""Amounts: exact decimal strings on the wire, `Decimal` in answers.

An amount is a `str`, `int`, `Decimal` or `float`. A float is read from its shortest `repr`
(`50.0` is sent as `"50.0"`), never through its binary value. More than six decimal places is a
`ValueError`, never rounded; negatives, NaN, infinities and booleans are refused before anything
is sent.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import TypeAlias

Amount: TypeAlias = str | int | Decimal | float
"""What the SDK accepts wherever an amount goes: `"2.50"`, `2`, `Decimal("2.50")` or `2.5`."""

MAX_DECIMALS = 6
_PLAIN = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\Z")
_MICRO = Decimal(1).scaleb(-MAX_DECIMALS)


def amount_text(value: Amount, *, name: str = "amount") -> str:
    """The decimal string sent for `value`, or `ValueError`/`TypeError` when it is no amount."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a str, int, Decimal or float, not a bool")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must not be negative: {value}")
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"{name} must be a finite number, not {value!r}")
        dec = Decimal(repr(value))
    elif isinstance(value, Decimal):
        dec = value
    elif isinstance(value, str):
        text = value
        if not _PLAIN.match(text):
            raise ValueError(f"{name} must be a plain non-negative decimal like '2.50', not {value!r}")
        try:
            dec = Decimal(text)
        except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
            raise ValueError(f"{name} is not a decimal: {value!r}") from None
    else:
        raise TypeError(f"{name} must be a str, int, Decimal or float, not {type(value).__name__}")
    return _decimal_text(dec, value, name)


def _decimal_text(dec: Decimal, original: object, name: str) -> str:
    if not dec.is_finite():
        raise ValueError(f"{name} must be a finite number, not {original!r}")
    if dec < 0:
        raise ValueError(f"{name} must not be negative: {original!r}")
    exponent = dec.as_tuple().exponent
    assert isinstance(exponent, int)  # finite, checked above
    if exponent < -MAX_DECIMALS:
        # Trailing zeros are no precision: "1.5000000" is 1.5. Anything else would need rounding.
        try:
            exact = dec.quantize(_MICRO)
        except InvalidOperation:
            raise ValueError(f"{name} has too many digits: {original!r}") from None
        if exact != dec:
            raise ValueError(
                f"{name} has more than {MAX_DECIMALS} decimal places: {original!r} (amounts are never rounded)"
            )
        dec = exact
    text = format(dec, "f")
    if text.startswith("-"):  # Decimal("-0")
        text = text[1:]
    return text


def parse_amount(value: object) -> Decimal:
    """An amount from an answer (a decimal string, or a JSON number read from its text)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Decimal)):
        raise TypeError(f"not an amount: {value!r}")
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def parse_optional_amount(value: object) -> Decimal | None:
    """`parse_amount`, with `None` for a missing or null amount."""
    return None if value is None else parse_amount(value)
