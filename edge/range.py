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


MAX_RANGES = 32  # more in one request is answered with the whole body (RFC 9110 14.2 allows it)


def coalesce_ranges(ranges: list[ByteRange]) -> list[ByteRange] | None:
    """Ranges sorted, overlapping or touching ones merged (RFC 9110 14.2 lets a server do so),
    or None when there are too many to be worth a multipart answer."""
    if len(ranges) > MAX_RANGES:
        return None
    merged: list[ByteRange] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def multipart_parts(
    ranges: list[ByteRange], length: int, content_type: str | None, boundary: str
) -> tuple[list[tuple[bytes, int, int]], bytes]:
    """The layout of a multipart/byteranges body. RFC 9110 14.6.

    Returns, per range, the part's head (delimiter and fields) with its [start, end) in the
    representation, and the closing delimiter; the body is each head followed by its bytes,
    then the closing delimiter.
    """
    parts = []
    for start, end in ranges:
        head = f"\r\n--{boundary}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        head += f"Content-Range: bytes {start}-{end - 1}/{length}\r\n\r\n"
        parts.append((head.encode("latin-1"), start, end))
    return parts, f"\r\n--{boundary}--\r\n".encode("latin-1")


def multipart_length(parts: list[tuple[bytes, int, int]], closing: bytes) -> int:
    return sum(len(head) + end - start for head, start, end in parts) + len(closing)
