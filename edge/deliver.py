"""deliver: answering from a stored response, and the responses the edge makes itself.

A hit is written synchronously from prebuilt bytes (`deliver_hit`); a large body is streamed
with flow control, a disk object's with sendfile (`send_stored`). Age, Cache-Status
(RFC 9211), Via, conditional requests (304, 412), Range (206, multipart/byteranges, 416) and
HEAD. Responses from a fill in progress are delivered by `edge.miss`, from slices by
`edge.sliced`; both reuse the helpers here.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable

from edge import policy
from edge.disk import DiskEntry
from edge.meter import Meter
from edge.metrics import EdgeStats
from edge.range import coalesce_ranges, if_range_allows, multipart_parts, parse_range
from edge.server import Exchange, synth_fields
from edge.store import CachedObject, replay_block

CONDITIONAL_FIELDS = frozenset(
    {"if-match", "if-none-match", "if-modified-since", "if-unmodified-since"}
)
# Fields replayed in a 304 (RFC 9110 15.4.5).
NOT_MODIFIED_FIELDS = frozenset(
    {"cache-control", "content-location", "date", "etag", "expires", "vary", "last-modified"}
)
# Stored bodies above this are streamed in STREAM_CHUNK writes, each waiting for the socket.
STREAMED_HIT = 1 << 20
STREAM_CHUNK = 256 << 10


class Delivery:
    """Delivering stored responses and synthetic ones: a mixin of `edge.request.EdgeProxy`."""

    stats: EdgeStats
    meter: Meter

    def origin_read(self, domain: str, n: int) -> None:
        """Count `n` body bytes read from `domain`'s origin, where they are read (a fill shared
        by many clients counts once)."""
        self.stats.origin_bytes += n
        self.meter.add_origin(domain, time.time(), n)

    # hit -----------------------------------------------------------------------------
    def deliver_hit(
        self,
        ex: Exchange,
        obj: CachedObject,
        age: float,
        outcome: str,
        *,
        detail: str | None = None,
        fwd: str | None = None,
        fwd_status: int | None = None,
    ) -> Awaitable[None] | None:
        """Answer from a stored response; synchronous unless the body is large."""
        head = ex.head
        fields = head.headers
        age_s = int(age)
        # Plain hits reuse the head built for this age second (Age and ttl change per second).
        memo = outcome == "hit" and detail is None
        if memo and obj.hit_age == age_s:
            tail = obj.hit_tail
        else:
            status_value = policy.cache_status(
                hit=fwd is None, fwd=fwd, fwd_status=fwd_status, ttl=int(obj.lifetime) - age_s,
                detail=detail,
            )
            tail = f"Age: {age_s}\r\nCache-Status: {status_value}\r\n".encode()
            if memo:
                obj.hit_age, obj.hit_tail, obj.hit_block = age_s, tail, obj.out_block + tail
        if 200 <= obj.status < 300 and not CONDITIONAL_FIELDS.isdisjoint(fields):
            status = policy.evaluate_conditional(head.method, fields, obj.headers)
            if status is not None:
                self.send_without_body(ex, status, obj.fields, tail, outcome)
                return None
        if "range" in fields and obj.status == 200:
            return self.deliver_range(ex, obj, tail, outcome)
        block = obj.hit_block if memo else obj.out_block + tail
        return self.send_stored(ex, obj.status, block, obj, [(0, obj.body_length)], outcome)

    def send_stored(
        self,
        ex: Exchange,
        status: int,
        block: bytes,
        obj: CachedObject,
        pieces: list[Piece],
        outcome: str,
    ) -> Awaitable[None] | None:
        """A stored body, or pieces of it: from memory, one synchronous write when small, else
        streamed with flow control (a 16 MiB write to a slow client would otherwise sit in the
        transport's buffer, and stock asyncio copies it there); from disk with sendfile."""
        if obj.file is not None:
            return self._send_file(ex, status, block, obj.file, pieces, outcome)
        body = _assemble(obj.body, pieces)
        pace = ex.pace  # a speed limit: streamed (paced by ex.write) beyond its free bytes
        if (len(body) <= STREAMED_HIT and (pace is None or len(body) <= pace.free)) or ex.no_body:
            ex.send(status, block, body)
            ex.set_outcome(outcome)
            return None
        return self._stream_stored(ex, status, block, body, outcome)

    async def _stream_stored(
        self, ex: Exchange, status: int, block: bytes, body: bytes | memoryview, outcome: str
    ) -> None:
        ex.start(status, block, len(body))
        view = memoryview(body)
        try:
            for offset in range(0, len(body), STREAM_CHUNK):
                await ex.write(view[offset : offset + STREAM_CHUNK])
            ex.finish()
        finally:
            ex.set_outcome(outcome)

    async def _send_file(
        self,
        ex: Exchange,
        status: int,
        block: bytes,
        file: DiskEntry,
        pieces: list[Piece],
        outcome: str,
    ) -> None:
        ex.start(status, block, _pieces_length(pieces))
        try:
            for piece in pieces:
                if isinstance(piece, bytes):
                    await ex.write(piece)
                else:
                    start, end = piece
                    await ex.sendfile(file.fd, file.body_offset + start, end - start)
            ex.finish()
        finally:
            ex.set_outcome(outcome)

    def deliver_range(
        self, ex: Exchange, obj: CachedObject, tail: bytes, outcome: str
    ) -> Awaitable[None] | None:
        """Byte ranges from a stored body (RFC 9110 14): one range as a 206 with Content-Range,
        several as multipart/byteranges (14.6), too many as the whole 200."""
        fields = ex.head.headers
        block = obj.out_block + tail
        length = obj.body_length
        whole: list[Piece] = [(0, length)]
        if_range = fields.get("if-range")
        ranges = parse_range(fields["range"], length)
        if ranges is None or (if_range is not None and not if_range_allows(if_range, obj.headers)):
            return self.send_stored(ex, obj.status, block, obj, whole, outcome)
        if not ranges:
            body = b"range not satisfiable\n"
            extra = f"Content-Range: bytes */{length}\r\n".encode()
            ex.send(416, synth_fields(len(body)) + extra + tail, body)
            ex.set_outcome(outcome)
            return None
        coalesced = coalesce_ranges(ranges)
        if coalesced is None:
            return self.send_stored(ex, obj.status, block, obj, whole, outcome)
        if len(coalesced) > 1:
            boundary = secrets.token_hex(12)
            parts, closing = multipart_parts(
                coalesced, length, obj.headers.get("content-type"), boundary
            )
            pieces: list[Piece] = [p for head, s, e in parts for p in (head, (s, e))]
            pieces.append(closing)
            kept = [(n, v) for n, v in obj.fields if n.lower() != "content-type"]
            block = (
                replay_block(kept, obj.headers.get("via"), _pieces_length(pieces))
                + f"Content-Type: multipart/byteranges; boundary={boundary}\r\n".encode()
                + tail
            )
            return self.send_stored(ex, 206, block, obj, pieces, outcome)
        start, end = coalesced[0]
        block = _with_content_range(block, start, end, length)
        return self.send_stored(ex, 206, block, obj, [(start, end)], outcome)

    def send_without_body(
        self, ex: Exchange, status: int, fields: list[tuple[str, str]], tail: bytes, outcome: str
    ) -> None:
        """304 or 412 to a client's conditional request, from stored or fetched fields."""
        if status == 304:
            kept = [(n, v) for n, v in fields if n.lower() in NOT_MODIFIED_FIELDS]
            via = policy.combine_fields(fields).get("via")
            ex.send(304, replay_block(kept, via, None) + tail, b"")
        else:
            body = b"precondition failed\n"
            ex.send(412, synth_fields(len(body)) + tail, body)
        ex.set_outcome(outcome)

    # synthetic ---------------------------------------------------------------------
    def synth(
        self,
        ex: Exchange,
        status: int,
        reason: str,
        outcome: str,
        *,
        fwd: str | None = None,
        detail: str | None = None,
        extra: bytes = b"",
    ) -> None:
        """A response the edge makes itself: short plain-text body, never stored; `extra`:
        more field lines (e.g. Retry-After)."""
        body = (reason + "\n").encode()
        status_value = policy.cache_status(fwd=fwd, detail=detail)
        block = synth_fields(len(body)) + f"Cache-Status: {status_value}\r\n".encode() + extra
        ex.send(status, block, body)
        ex.set_outcome(outcome)


Piece = bytes | tuple[int, int]  # literal bytes, or a [start, end) span of the stored body


def _pieces_length(pieces: list[Piece]) -> int:
    return sum(len(p) if isinstance(p, bytes) else p[1] - p[0] for p in pieces)


def _assemble(body: bytes, pieces: list[Piece]) -> bytes | memoryview:
    """The bytes of `pieces` of an in-memory body, copying only when there are several."""
    if len(pieces) == 1 and not isinstance(pieces[0], bytes):
        start, end = pieces[0]
        return body if (start, end) == (0, len(body)) else memoryview(body)[start:end]
    view = memoryview(body)
    return b"".join(p if isinstance(p, bytes) else view[p[0] : p[1]] for p in pieces)


def _closing(file: DiskEntry, pending: Awaitable[None] | None) -> Awaitable[None] | None:
    """Close a disk object's descriptor once the response that reads it is done."""
    if pending is None:
        file.close()
        return None

    async def then_close() -> None:
        try:
            await pending
        finally:
            file.close()

    return then_close()


def _with_content_range(block: bytes, start: int, end: int, length: int) -> bytes:
    # replay_block puts our Content-Length after Via, so it always follows a CRLF; this cannot
    # match inside another field such as X-Content-Length.
    block = block.replace(
        f"\r\nContent-Length: {length}\r\n".encode(),
        f"\r\nContent-Length: {end - start}\r\n".encode(),
    )
    return block + f"Content-Range: bytes {start}-{end - 1}/{length}\r\n".encode()
