"""edge.range: Range and If-Range (RFC 9110 14, 13.1.5) as pure functions."""

from __future__ import annotations

import pytest

from edge.range import (
    coalesce_ranges,
    if_range_allows,
    multipart_length,
    multipart_parts,
    parse_range,
)

LM = "Mon, 01 Jan 2024 00:00:00 GMT"


@pytest.mark.parametrize(
    ("value", "ranges"),
    [
        ("bytes=0-9", [(0, 10)]),
        ("bytes=0-0", [(0, 1)]),
        ("bytes=90-", [(90, 100)]),
        ("bytes=90-1000", [(90, 100)]),
        ("bytes=-10", [(90, 100)]),
        ("bytes=-1000", [(0, 100)]),
        ("BYTES = 1-2", [(1, 3)]),
        ("bytes= 0-1 , 5-6", [(0, 2), (5, 7)]),
        ("bytes=100-", []),  # unsatisfiable: 416
        ("bytes=-0", []),
        ("bytes=200-300, -0", []),
        ("bytes=200-300, 0-1", [(0, 2)]),  # the satisfiable part only
        ("bytes=5-1", None),  # invalid: ignore the field
        ("bytes=a-b", None),
        ("bytes=1", None),
        ("bytes=-", None),
        ("bytes=", None),
        ("items=0-1", None),
        ("0-1", None),
        ("bytes=\u00b2-", None),  # "²" from a latin-1 byte: isdigit() but not a digit
        ("bytes=-\u00b9", None),
        ("bytes=0-\u00b3", None),
    ],
)
def test_parse_range(value: str, ranges: list[tuple[int, int]] | None) -> None:
    assert parse_range(value, 100) == ranges


def test_parse_range_empty_body_is_sent_whole() -> None:
    assert parse_range("bytes=0-", 0) is None
    assert parse_range("bytes=-5", 0) is None


@pytest.mark.parametrize(
    ("if_range", "stored", "allowed"),
    [
        ('"a"', {"etag": '"a"'}, True),
        ('"a"', {"etag": '"b"'}, False),
        ('"a"', {"etag": 'W/"a"'}, False),  # strong comparison
        ('W/"a"', {"etag": 'W/"a"'}, False),  # a weak validator never allows a range
        ('"a"', {}, False),
        (LM, {"last-modified": LM}, True),
        (LM, {"last-modified": "Tue, 02 Jan 2024 00:00:00 GMT"}, False),
        (LM, {}, False),
        ("not a date", {"last-modified": LM}, False),
    ],
)
def test_if_range(if_range: str, stored: dict[str, str], allowed: bool) -> None:
    assert if_range_allows(if_range, stored) is allowed


def test_coalesce_sorts_and_merges_overlapping_and_touching_ranges() -> None:
    assert coalesce_ranges([(50, 60), (0, 10), (5, 20), (20, 30)]) == [(0, 30), (50, 60)]
    assert coalesce_ranges([(i, i + 1) for i in range(0, 200, 2)]) is None  # too many


def test_multipart_layout_is_rfc_9110_14_6() -> None:
    parts, closing = multipart_parts([(0, 2), (5, 7)], 10, "text/plain", "B")
    body = b"0123456789"
    wire = b"".join(head + body[s:e] for head, s, e in parts) + closing
    assert wire == (
        b"\r\n--B\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-1/10\r\n\r\n01"
        b"\r\n--B\r\nContent-Type: text/plain\r\nContent-Range: bytes 5-6/10\r\n\r\n56"
        b"\r\n--B--\r\n"
    )
    assert multipart_length(parts, closing) == len(wire)
