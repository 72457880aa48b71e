"""edge.slices: slice arithmetic, Content-Range parsing, version checks."""

from __future__ import annotations

import pytest

from edge.slices import (
    ContentRange,
    expected_span,
    parse_content_range,
    same_version,
    slice_key,
    slice_span,
    slices_covering,
)

MiB = 1 << 20


def test_spans_and_coverage() -> None:
    assert slice_span(0, MiB) == (0, MiB)
    assert slice_span(3, MiB) == (3 * MiB, 4 * MiB)
    assert list(slices_covering(0, 1, MiB)) == [0]
    assert list(slices_covering(MiB - 1, MiB + 1, MiB)) == [0, 1]  # straddles a boundary
    assert list(slices_covering(MiB, 2 * MiB, MiB)) == [1]
    assert list(slices_covering(5, 5, MiB)) == []
    assert slice_key("a.test/v.mp4", MiB, 7) == f"a.test/v.mp4#slice={MiB}:7"
    assert slice_key("k", MiB, 1) != slice_key("k", 2 * MiB, 1)  # the size is in the key
    assert expected_span(3, MiB, 3 * MiB + 5) == (3 * MiB, 3 * MiB + 5)  # the last, short one


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("bytes 0-99/1000", ContentRange(0, 100, 1000)),
        ("bytes 900-999/1000", ContentRange(900, 1000, 1000)),
        ("BYTES 0-0/1", ContentRange(0, 1, 1)),
        ("bytes */1000", None),  # unsatisfied-range form: not a slice
        ("bytes 0-99/*", None),  # unknown length
        ("bytes 100-99/1000", None),
        ("bytes 0-1000/1000", None),  # beyond the length
        ("items 0-1/2", None),
        (None, None),
    ],
)
def test_parse_content_range(value: str | None, parsed: ContentRange | None) -> None:
    assert parse_content_range(value) == parsed


def test_same_version() -> None:
    a = {"etag": '"v1"', "last-modified": "Mon, 01 Jan 2024 00:00:00 GMT"}
    assert same_version(a, dict(a), 10, 10)
    assert not same_version(a, {**a, "etag": '"v2"'}, 10, 10)
    assert not same_version(a, {**a, "last-modified": "Tue, 02 Jan 2024 00:00:00 GMT"}, 10, 10)
    assert not same_version(a, a, 10, 11)
