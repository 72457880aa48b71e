"""A response body in flight from origin, shared by every client that wants it (the *miss* step).

One fill task appends origin chunks to a `Fill`; each client reads it through its own
`FillReader` at its own pace (read-while-write), so the first byte is not delayed by the whole
body and clients that arrive during the fetch stream from the same origin fetch (coalescing,
as Varnish's busy objects and nginx's proxy_cache_lock).

Memory: while the response is headed for the memory tier, every chunk is kept (it becomes the
stored body, bounded by the object size limit). When it is spooled to a file (the disk tier),
chunks are not kept: readers read the file (`os.pread`, from the page cache) at their own pace
and the fill never waits for them. When it is neither (too big, or the disk failed), chunks
behind the slowest reader are dropped and the fill waits while it is more than `window` bytes
ahead of that reader, so a 2 GiB pass-through stays within a few MiB.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_right
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from edge.policy import Headers
from edge.store import CachedObject

WINDOW = 8 << 20
SPOOL_READ = 256 << 10


class Spool(Protocol):
    """A file the body is also written to (the disk tier's writer)."""

    @property
    def fd(self) -> int:
        """A descriptor the body can be read back through while it is written."""

    @property
    def body_offset(self) -> int:
        """Where the body's first byte is in that file."""

    def append(self, data: bytes) -> None:
        """Write the next body bytes; raises OSError (or a subclass) when it cannot."""


class FillError(Exception):
    """The origin response could not be completed; readers must abort their clients."""


@dataclass(slots=True)
class FillHead:
    """What the origin answered, known before the body."""

    status: int
    fields: list[tuple[str, str]]  # hop-by-hop free
    headers: dict[str, str]
    content_length: int | None
    shareable: bool  # clients other than the one that started the fill may read it
    stored: bool  # will be stored when complete
    ttl: int | None  # freshness left when stored, for Cache-Status
    initial_age: float
    response_time: float
    vary_names: tuple[str, ...] | None
    revalidated: CachedObject | None = None  # a 304 refreshed this stored object; no body


class Fill:
    def __init__(self, key: str, request_fields: Headers, window: int = WINDOW) -> None:
        self.key = key
        self.request_fields = request_fields  # of the request that started it, for Vary checks
        self.head: asyncio.Future[FillHead] = asyncio.get_running_loop().create_future()
        self.window = window
        self.retain = True
        self.size = 0
        self.done = False
        self.error: BaseException | None = None
        self.waiters = 0  # clients that joined this fill (collapsed)
        self.invalidated = False  # an unsafe request changed the resource: do not store
        # The origin's answer (edge.fetch.OriginAnswer), copied to each exchange it serves.
        self.origin_status: int | None = None
        self.origin_ms: float | None = None
        self.spool: Spool | None = None
        self.spooled = 0  # body bytes [0, spooled) are readable from the spool's file
        self.spool_error: OSError | None = None
        # Our own descriptor of the spool's file: readers need it after the writer commits or
        # aborts (and closes its own); closed once the fill is over and no reader is left.
        self._spool_fd = -1
        self._spool_body_offset = 0
        self._chunks: list[bytes] = []
        self._starts: list[int] = []
        self._base = 0  # offset of the first byte held in memory
        self._readers: set[FillReader] = set()
        self._wakeup: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None

    # writer side ---------------------------------------------------------------------
    def set_head(self, head: FillHead) -> None:
        if not self.head.done():
            self.head.set_result(head)

    def attach_spool(self, spool: Spool) -> None:
        """Write the body to `spool` too (before the first append)."""
        self.spool = spool
        self._spool_fd = os.dup(spool.fd)
        self._spool_body_offset = spool.body_offset

    def stop_spooling(self) -> None:
        """Write no more to the spool (it is being aborted); what it has stays readable."""
        self.spool = None

    def append(self, chunk: bytes) -> None:
        spool = self.spool
        if spool is not None and self.spool_error is None and self.spooled == self.size:
            try:
                spool.append(chunk)
                self.spooled += len(chunk)
            except OSError as e:
                # The disk failed: what is in the file stays readable; the rest lives in memory.
                self.spool_error = e
        if self.retain or self.spooled < self.size + len(chunk):
            self._starts.append(self.size)
            self._chunks.append(chunk)
        self.size += len(chunk)
        if not self.retain:
            self._trim()
        self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()
        self._close_spool_fd()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done = True
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved: readers that never came must not log it
        self._wake()
        self._close_spool_fd()

    def _close_spool_fd(self) -> None:
        if self.done and not self._readers and self._spool_fd >= 0:
            os.close(self._spool_fd)
            self._spool_fd = -1

    def stop_retaining(self) -> None:
        """The body will not be stored: from now on keep only what readers still need."""
        self.retain = False
        self._trim()

    def body(self) -> bytes:
        return b"".join(self._chunks)

    @property
    def has_readers(self) -> bool:
        return bool(self._readers)

    async def wait_for_space(self) -> None:
        """Backpressure for bytes held only in memory: stay within `window` of the slowest
        reader. Spooled bytes never wait: readers read them from the file."""
        while (
            not self.retain
            and self._readers
            and self.size - max(self._min_pos(), self.spooled) > self.window
        ):
            self._space = asyncio.get_running_loop().create_future()
            await self._space

    # reader side ---------------------------------------------------------------------
    def can_join(self) -> bool:
        """A new client can read this fill from its first byte (file, then memory)."""
        readable = self._spool_fd >= 0 or self.spooled == 0
        return self.error is None and readable and self._base <= self.spooled

    def reader(self) -> FillReader:
        """A cursor from byte 0; only while `can_join()` (nothing trimmed yet)."""
        if self._base > self.spooled:
            raise FillError("fill no longer holds its first bytes")
        r = FillReader(self)
        self._readers.add(r)
        return r

    def _detach(self, reader: FillReader) -> None:
        self._readers.discard(reader)
        self._trim()
        self._wake_space()
        self._close_spool_fd()

    def _min_pos(self) -> int:
        return min(r.pos for r in self._readers)

    def _trim(self) -> None:
        if self.retain or not self._chunks:
            return
        keep_from = self._min_pos() if self._readers else self.size
        keep_from = max(keep_from, self.spooled)  # the file has those
        chunks, starts = self._chunks, self._starts
        n = 0
        while n < len(chunks) and starts[n] + len(chunks[n]) <= keep_from:
            n += 1
        if n:
            del chunks[:n]
            del starts[:n]
        self._base = starts[0] if starts else self.size

    def _chunk_at(self, pos: int) -> tuple[bytes, int]:
        """Bytes from offset `pos` on: a chunk held in memory and the offset within it, or a
        piece read back from the spool's file."""
        if pos >= self._base and self._chunks:
            i = bisect_right(self._starts, pos) - 1
            return self._chunks[i], pos - self._starts[i]
        assert self._spool_fd >= 0 and pos < self.spooled
        count = min(SPOOL_READ, self.spooled - pos)
        return os.pread(self._spool_fd, count, self._spool_body_offset + pos), 0

    def _wake(self) -> None:
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)
        self._wakeup = None

    def _wake_space(self) -> None:
        s = self._space
        if s is not None and not s.done():
            s.set_result(None)

    async def _wait_data(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._wakeup)


class FillReader:
    """One client's cursor into a fill."""

    __slots__ = ("_fill", "end", "pos")

    def __init__(self, fill: Fill) -> None:
        self._fill = fill
        self.pos = 0
        self.end: int | None = None

    def seek(self, start: int, end: int | None) -> None:
        """Read only bytes [start, end) (a Range request); call before iterating."""
        self.pos = start
        self.end = end

    async def __aiter__(self) -> AsyncIterator[bytes | memoryview]:
        fill = self._fill
        try:
            while True:
                end = self.end
                if end is not None and self.pos >= end:
                    return
                if self.pos < fill.size:
                    chunk, offset = fill._chunk_at(self.pos)
                    piece = memoryview(chunk)[offset:]
                    if end is not None and self.pos + len(piece) > end:
                        piece = piece[: end - self.pos]
                    self.pos += len(piece)
                    if not fill.retain:
                        fill._trim()
                        fill._wake_space()
                    yield piece
                    continue
                if fill.error is not None:
                    raise FillError(str(fill.error)) from fill.error
                if fill.done:
                    if end is not None and self.pos < end:
                        raise FillError("origin body shorter than the requested range")
                    return
                await fill._wait_data()
        finally:
            self.close()

    def close(self) -> None:
        self._fill._detach(self)
