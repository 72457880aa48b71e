"""Slices: large objects cached as fixed-size pieces fetched with Range requests (pure part).

A seek into a cold 4 GiB video should fetch the one or two slices that cover it, not the whole
file (nginx's slice module, Varnish's segmented caching). Slice `i` of an object covers bytes
[i * size, (i + 1) * size) and is stored under its own key. Slices of one object must come from
one version of it: each slice's validators are checked against the first one's.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.policy import Headers

SLICE_MARK = "#slice="


def slice_key(key: str, size: int, index: int) -> str:
    """The cache key of one slice; the size is part of it, so that slices cut at another size
    (a changed config, two worker generations) are never mistaken for these."""
    return f"{key}{SLICE_MARK}{size}:{index}"


def expected_span(index: int, size: int, total: int) -> tuple[int, int]:
    """What slice `index` must cover of an object of `total` bytes."""
    start, end = slice_span(index, size)
    return start, min(end, total)


def slice_span(index: int, size: int) -> tuple[int, int]:
    """[start, end) of slice `index`, before clipping to the object's length."""
    return index * size, (index + 1) * size


def slices_covering(start: int, end: int, size: int) -> range:
    """Indices of the slices that hold bytes [start, end)."""
    return range(start // size, (end - 1) // size + 1) if end > start else range(0)


@dataclass(frozen=True, slots=True)
class ContentRange:
    start: int
    end: int  # exclusive
    total: int


def parse_content_range(value: str | None) -> ContentRange | None:
    """`Content-Range: bytes a-b/N` of a 206 (RFC 9110 14.4); None unless complete and sane."""
    if value is None:
        return None
    unit, _, rest = value.strip().partition(" ")
    span, _, total = rest.partition("/")
    first, _, last = span.partition("-")
    if unit.lower() != "bytes" or not (first.isdigit() and last.isdigit() and total.isdigit()):
        return None
    start, end, length = int(first), int(last) + 1, int(total)
    if not start < end <= length:
        return None
    return ContentRange(start, end, length)


def same_version(first: Headers, other: Headers, total: int, other_total: int) -> bool:
    """Whether two slices come from one version of the object: same length, and the same
    ETag and Last-Modified where the origin sends them (RFC 9110 8.8)."""
    return (
        total == other_total
        and first.get("etag") == other.get("etag")
        and first.get("last-modified") == other.get("last-modified")
    )
