"""The rules of the access-log store, as I/O-free functions (issue 6; agreement 2.6 and 6.2).

- Names: an hour is `YYYY-MM-DDTHH` (UTC); a piece is `[A-Za-z0-9_.-]{1,64}` (the edge sends
  `w<slot>`); a log domain is a DNS name, or `_` for requests no domain was routed to.
- Integrity: `Content-Digest: sha-256=:<base64>:` (RFC 9530 section 2, a Structured Field
  Dictionary of RFC 8941 whose values are Byte Sequences); other algorithms are ignored.
- Ranges: an hour is in the range [from, to) when its start is; `hour_at_or_after` turns any
  instant into the first hour starting at or after it, so a range is a pair of hour starts.
- Age: an hour's lines all ended before `hour + 1h`, so the hour is N days old from
  `hour + 1h + N days` on (`passes`). Retention deletes an hour once it is as old as the owner's
  retention; a customer's delete request deletes it once it is as old as the legal floor.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime, timedelta

HOUR = timedelta(hours=1)
UNROUTED = "_"  # the edge's domain directory for requests with no routed domain (operator only)

_HOUR = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2})")
_PIECE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KEY = re.compile(r"[a-z*][a-z0-9_.*-]*")  # an RFC 8941 key
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_LATEST = datetime(9000, 1, 1, tzinfo=UTC)
SHA256_SIZE = 32


def parse_hour(text: str) -> datetime | None:
    """The UTC hour `YYYY-MM-DDTHH` names (years 2000 to 8999), or None."""
    match = _HOUR.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour_of_day = (int(part) for part in match.groups())
    try:
        hour = datetime(year, month, day, hour_of_day, tzinfo=UTC)
    except ValueError:
        return None
    return hour if _EARLIEST <= hour < _LATEST else None


def hour_name(hour: datetime) -> str:
    """`parse_hour`'s inverse."""
    return hour.astimezone(UTC).strftime("%Y-%m-%dT%H")


def valid_piece(name: str) -> bool:
    return _PIECE.fullmatch(name) is not None


def floor_hour(instant: datetime) -> datetime:
    """The start of the UTC hour `instant` lies in."""
    return instant.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def hour_at_or_after(instant: datetime) -> datetime:
    """The first hour start at or after `instant`: hours starting in [a, b) are exactly those
    in [hour_at_or_after(a), hour_at_or_after(b))."""
    start = floor_hour(instant)
    return start if start == instant else start + HOUR


class DigestError(ValueError):
    """The Content-Digest header is missing, malformed or has no sha-256."""


def content_digest_sha256(header: str | None) -> bytes:
    """The SHA-256 a `Content-Digest` header (RFC 9530) states; DigestError saying why not."""
    if header is None or not header.strip():
        raise DigestError("the Content-Digest header (sha-256=:<base64>:) is required")
    for member in header.split(","):  # Byte Sequences hold no commas (base64 alphabet)
        key, equals, value = member.strip().partition("=")
        if not _KEY.fullmatch(key) or not equals:
            raise DigestError(f"Content-Digest is not a structured dictionary: {header[:200]!r}")
        if key != "sha-256":
            continue
        value = value.partition(";")[0]  # parameters carry nothing for us
        if len(value) < 2 or value[0] != ":" or value[-1] != ":":
            raise DigestError("Content-Digest sha-256 must be a byte sequence :<base64>:")
        try:
            digest = base64.b64decode(value[1:-1], validate=True)
        except (binascii.Error, ValueError):
            raise DigestError("Content-Digest sha-256 is not valid base64") from None
        if len(digest) != SHA256_SIZE:
            raise DigestError(f"Content-Digest sha-256 has {len(digest)} bytes, not 32")
        return digest
    raise DigestError("Content-Digest has no sha-256 member (the only algorithm accepted)")


def content_digest(sha256: bytes) -> str:
    """The `Content-Digest` header value for a body with this SHA-256."""
    return f"sha-256=:{base64.b64encode(sha256).decode('ascii')}:"


def passes(hour: datetime, days: int) -> datetime:
    """When every line of `hour` is at least `days` days old."""
    return hour + HOUR + timedelta(days=days)


def last_hour_past(now: datetime, days: int) -> datetime:
    """Hours starting at or before this are at least `days` days old at `now` (`passes(hour,
    days) <= now`)."""
    return now - timedelta(days=days) - HOUR


def retention_days(account_days: int | None, default: int, floor: int) -> int:
    """How long an owner's pieces are kept: its own setting or the default, never below the
    legal floor (which only the operator's config moves)."""
    return max(default if account_days is None else account_days, floor)
