"""Decimal numbers from query strings, paths and config values.

`str.isdigit` accepts characters such as '²', which `int` refuses (a 500), and Arabic-Indic
digits, which `int` reads; `int` also refuses more than 4300 digits. Parsed here instead, anything
but a short run of ASCII digits is simply not a number.
"""

from __future__ import annotations


def parse_digits(raw: str, max_digits: int) -> int | None:
    """`raw` as a non-negative integer if it is 1 to `max_digits` ASCII digits, else None."""
    if not (raw.isascii() and raw.isdigit() and len(raw) <= max_digits):
        return None
    return int(raw)
