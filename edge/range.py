"""Range requests (RFC 9110 14) as pure functions, for the *deliver* step."""

from __future__ import annotations

from edge.policy import Headers, parse_http_date

ByteRange = tuple[int, int]  # [start, end) offsets


def parse_range(value: str, length: int) -> list[ByteRange] | None:
    """Satisfiable ranges of a `Range` field for a body of `length` bytes. RFC 9110 14.1.2, 14.2.

    None means "ignore the field and send the whole body" (not a bytes range, or malformed:
    14.2 lets a server ignore it); an empty list means unsatisfiable (416). An empty body is
    always sent whole: no Content-Range can describe a part of it.
    """
    unit, eq, spec = value.partition("=")
    if not eq or unit.strip().lower() != "bytes" or length == 0:
        return None
    ranges: list[ByteRange] = []
    for part in spec.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        if not dash:
            return None
        first, last = first.strip(), last.strip()
        if first:
            if not _digits(first) or (last and not _digits(last)):
                return None
            start = int(first)
            end = int(last) + 1 if last else length
            if last and end <= start:
                return None  # last-pos < first-pos is invalid, not unsatisfiable
            if start >= length:
                continue
            ranges.append((start, min(end, length)))
        else:
            if not _digits(last):
                return None
            suffix = int(last)
            if suffix == 0:
                continue
            ranges.append((max(0, length - suffix), length))
    return ranges


def _digits(text: str) -> bool:
    # isdigit() alone accepts "²" (a latin-1 byte a client can send), which int() refuses
    return text.isascii() and text.isdigit()


def if_range_allows(if_range: str, stored: Headers) -> bool:
    """Whether a Range may be honoured under `If-Range`. RFC 9110 13.1.5.

    An entity-tag must match the stored ETag by strong comparison; a date must equal the stored
    Last-Modified exactly. Anything else: send the whole representation.
    """
    value = if_range.strip()
    if value.startswith('"') or value.startswith("W/"):
        etag = stored.get("etag")
        return not value.startswith("W/") and etag is not None and etag == value
    date = parse_http_date(value)
    last_modified = parse_http_date(stored.get("last-modified"))
    return date is not None and last_modified is not None and date == last_modified
