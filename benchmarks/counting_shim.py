#!/usr/bin/env python3
"""The benchmark's origin as the proxies see it: counts per URL, /gen/{n} with ranges.

    counting_shim.py --listen 127.0.0.1:P --upstream 127.0.0.1:Q

benchmarks/run.py starts it in front of `cdn origin` (on Q) and gives its address to every
proxy as their origin. It does two things:

- It counts, per URL (path and query), the requests the proxies send and the body bytes they
  receive. The cold scenarios (cold-herd, cold-seek, memory) read these counts: origin fetches
  and bytes from origin. Hits never reach it.
- It answers `GET`/`HEAD /gen/{n}` itself: n bytes of the same deterministic content as `cdn
  origin`'s /gen/{n} (piece i of 256 KiB is i as 8 big-endian bytes, then a fixed block; run.py
  compares the two at start), with what a video or download origin has and `cdn origin`'s /gen
  lacks: a single `Range` gives 206 (or 416), `If-Range`, `Accept-Ranges: bytes`, a strong
  ETag and a Last-Modified.
  Without ranges at the origin, no proxy could fetch only the slices a seek needs (cold-seek).
  Everything else is relayed to `cdn origin` byte for byte.

One upstream connection per client connection; a connection handles one request at a time (the
proxies do not pipeline to origins). `GET /__bench/stats` answers with the counts as JSON:
{target: {"requests", "body_bytes", "active", "completed", "aborted", "ranges"}}; `active` is
how many responses for that target are still on their way.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import signal
from collections import defaultdict
from dataclasses import asdict, dataclass, field

CHUNK = 256 * 1024
MAX_HEAD = 64 * 1024
MAX_GENERATED = 2**31
STATS_PATH = "/__bench/stats"
MAX_RANGES_KEPT = 16  # per target: the Range headers of the first few requests
GEN_LAST_MODIFIED = "Mon, 01 Jan 2024 00:00:00 GMT"
_BLOCK = hashlib.shake_128(b"cdn-edge generated body").digest(CHUNK)  # as edge/sample_origin.py
_BLOCK_TAIL = _BLOCK[8:]
_GEN = re.compile(r"/gen/([0-9]{1,10})(?:\?.*)?")
_RANGE = re.compile(r"bytes=([0-9]{0,18})-([0-9]{0,18})", re.IGNORECASE)


@dataclass
class TargetStats:
    requests: int = 0
    body_bytes: int = 0
    active: int = 0  # responses not yet complete
    completed: int = 0
    aborted: int = 0  # connection closed before the response was complete
    ranges: list[str | None] = field(default_factory=list)

    def start(self, range_header: str | None) -> None:
        self.requests += 1
        self.active += 1
        if len(self.ranges) < MAX_RANGES_KEPT:
            self.ranges.append(range_header)

    def finish(self, complete: bool) -> None:
        self.active -= 1
        if complete:
            self.completed += 1
        else:
            self.aborted += 1


STATS: dict[str, TargetStats] = defaultdict(TargetStats)


class Closed(Exception):
    """The connection cannot carry another request."""


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """The first line of an HTTP head and its fields (lowercase names); run.py uses it too."""
    lines = head.decode("latin-1").split("\r\n")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    return lines[0], fields


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None


async def _relay(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    n: int | None,
    stats: TargetStats | None = None,
) -> int:
    """Relay n bytes (None: until EOF), charging them to `stats` as they go; return the count."""
    copied = 0
    while n is None or copied < n:
        data = await reader.read(CHUNK if n is None else min(CHUNK, n - copied))
        if not data:
            break
        writer.write(data)
        await writer.drain()
        copied += len(data)
        if stats is not None:
            stats.body_bytes += len(data)
    return copied


# --- /gen/{n}, answered here


def piece_bytes(piece: int, start: int = 0, end: int = CHUNK) -> bytes:
    data = piece.to_bytes(8, "big") + _BLOCK_TAIL
    return data if (start, end) == (0, CHUNK) else data[start:end]


def generated(first: int, last: int) -> list[tuple[int, int, int]]:
    """(piece, start, end) slices of the pieces that hold bytes first..last (inclusive)."""
    out = []
    for piece in range(first // CHUNK, last // CHUNK + 1):
        base = piece * CHUNK
        out.append((piece, max(first - base, 0), min(last - base, CHUNK - 1) + 1))
    return out


def _gen_response(size: int, method: str, fields: dict[str, str]) -> tuple[bytes, int, int]:
    """The response head for /gen/{size}, and the first and last body byte (last < first: none)."""
    etag = f'"gen-{size:x}"'
    headers = {
        "Content-Type": "application/octet-stream",
        "Cache-Control": "public, max-age=60",
        "Accept-Ranges": "bytes",
        "ETag": etag,
        "Last-Modified": GEN_LAST_MODIFIED,
    }
    status, first, last = "200 OK", 0, size - 1
    range_header = fields.get("range")
    if_range = fields.get("if-range")
    if (
        range_header is not None
        and method == "GET"
        and (if_range is None or if_range in (etag, GEN_LAST_MODIFIED))
    ):
        found = _RANGE.fullmatch(range_header.strip())
        if found is not None:
            a, b = found.groups()
            if not a and b and int(b) > 0 and size:  # suffix: the last b bytes
                first = max(size - int(b), 0)
                status = "206 Partial Content"
            elif a and (not b or int(b) >= int(a)):
                if int(a) >= size:
                    headers = {"Content-Range": f"bytes */{size}"}
                    status, first, last = "416 Range Not Satisfiable", 0, -1
                else:
                    first, last = int(a), min(int(b), size - 1) if b else size - 1
                    status = "206 Partial Content"
            if status.startswith("206"):
                headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    headers["Content-Length"] = str(last - first + 1)
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    if method == "HEAD":
        last = first - 1
    return (head + "\r\n").encode("latin-1"), first, last


async def _serve_generated(
    writer: asyncio.StreamWriter, size: int, method: str, fields: dict[str, str], st: TargetStats
) -> None:
    if size > MAX_GENERATED:
        body = b"size too large\n"
        writer.write(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        return
    head, first, last = _gen_response(size, method, fields)
    writer.write(head)
    if last >= first:
        for piece, start, end in generated(first, last):
            data = piece_bytes(piece, start, end)
            writer.write(data)
            await writer.drain()
            st.body_bytes += len(data)
    await writer.drain()


# --- connections


async def _answer_stats(writer: asyncio.StreamWriter) -> None:
    body = json.dumps({k: asdict(v) for k, v in STATS.items()}).encode()
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    await writer.drain()


class Upstream:
    """The connection to `cdn origin` for one client connection, opened when first needed."""

    def __init__(self, addr: tuple[str, int]) -> None:
        self.addr = addr
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(
        self,
        head: bytes,
        method: str,
        fields: dict[str, str],
        client_reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        st: TargetStats,
    ) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(*self.addr)
        assert self.reader is not None
        self.writer.write(head)
        length = int(fields.get("content-length", "0") or 0)
        if length and await _relay(client_reader, self.writer, length) < length:
            raise Closed
        await self.writer.drain()
        while True:
            resp = await _read_head(self.reader)
            if resp is None:
                raise Closed
            line, rfields = parse_head(resp)
            status = int(line.split(" ", 2)[1])
            client.write(resp)
            if status >= 200:
                break  # else an interim response: the final one follows
        if method == "HEAD" or status in (204, 304):
            await client.drain()
            return
        if "content-length" in rfields:
            n = int(rfields["content-length"])
            if await _relay(self.reader, client, n, st) < n:
                raise Closed
            return
        await _relay(self.reader, client, None, st)  # until the origin closes
        raise Closed

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _serve(
    client_reader: asyncio.StreamReader,
    client: asyncio.StreamWriter,
    upstream_addr: tuple[str, int],
) -> None:
    upstream = Upstream(upstream_addr)
    try:
        while (head := await _read_head(client_reader)) is not None:
            line, fields = parse_head(head)
            method, target = [*line.split(" "), "", ""][:2]
            if target == STATS_PATH:
                await _answer_stats(client)
                return
            st = STATS[target]
            st.start(fields.get("range"))
            complete = False
            try:
                gen = _GEN.fullmatch(target)
                if gen is not None and method in ("GET", "HEAD"):
                    await _serve_generated(client, int(gen[1]), method, fields, st)
                else:
                    await upstream.exchange(head, method, fields, client_reader, client, st)
                complete = True
            finally:
                st.finish(complete)
            if fields.get("connection", "").lower() == "close":
                return
    except (Closed, ConnectionError, OSError, ValueError, IndexError):
        pass
    finally:
        upstream.close()
        client.close()


async def main_async(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    server = await asyncio.start_server(
        lambda r, w: _serve(r, w, upstream), listen[0], listen[1], backlog=1024, limit=MAX_HEAD
    )
    print(f"counting shim on {listen[0]}:{listen[1]} -> {upstream[0]}:{upstream[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _addr(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--listen", type=_addr, required=True, help="HOST:PORT")
    p.add_argument("--upstream", type=_addr, required=True, help="HOST:PORT of `cdn origin`")
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_async(args.listen, args.upstream))
    else:
        uvloop.run(main_async(args.listen, args.upstream))


if __name__ == "__main__":
    main()
