"""Metering at the edge (issue 5), in one worker over real sockets: what a worker meters for a
domain equals what its clients received, byte for byte, for whole responses, ranges, HEAD,
304s and downloads the client abandoned; a long response's bytes fall in the window in which
they were sent. (tests/integration/test_usage_e2e.py: the same through `cdn edge` and a control
plane.)"""

from __future__ import annotations

import array
import asyncio
import fcntl
import socket
import termios
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import web

from edge.meter import WINDOW, Bucket, window_start
from edge.worker import EdgeWorker
from tests.integration.conftest import HOST, EdgeFactory, Origin

BIG = bytes(range(256)) * (32 << 12)  # 8 MiB
SMALL = b"small body\n" * 100
ETAG = '"v1"'


async def big(req: web.Request) -> web.StreamResponse:
    return web.Response(body=BIG, headers={"Cache-Control": "max-age=600", "ETag": ETAG})


async def small(req: web.Request) -> web.StreamResponse:
    return web.Response(body=SMALL, headers={"Cache-Control": "max-age=600", "ETag": ETAG})


ROUTES = {"/big": big, "/small": small}


class Usage:
    """What a worker metered for HOST, taken as the supervisor would (`take_usage`)."""

    def __init__(self, worker: EdgeWorker) -> None:
        self.worker = worker
        self.total: Counter[str] = Counter()
        self.by_window: dict[int, Counter[str]] = {}

    def take(self) -> Counter[str]:
        for bucket in self.worker.take_usage():
            assert bucket.domain == HOST
            counts = dict(zip(_names(bucket), bucket.counts(), strict=True))
            self.total.update(counts)
            self.by_window.setdefault(bucket.start, Counter()).update(counts)
        return self.total

    async def until(self, check: Callable[[Counter[str]], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not check(self.take()):
                await asyncio.sleep(0.02)


def _names(bucket: Bucket) -> list[str]:
    return [name for name in bucket.to_json() if name not in ("domain", "start")]


async def received(port: int, head: str, host: str = HOST) -> int:
    """Send one request with Connection: close and count every byte until the edge closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{head}Host: {host}\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return len(data)


MakeOrigin = Callable[..., Awaitable[Origin]]


async def start(make_edge: EdgeFactory, make_origin: MakeOrigin) -> tuple[int, Usage]:
    origin = await make_origin(ROUTES)
    edge = await make_edge([origin.url])
    return edge.port, Usage(edge.worker)


def unread(sock: socket.socket) -> int:
    """Bytes the client's kernel holds that the client has not read (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return buf[0]


async def stalled_download(port: int, read: int, extra: str = "") -> tuple[socket.socket, int]:
    """Download /big through a small receive buffer, read `read` bytes, then stop reading until
    nothing more arrives: what the client's kernel accepted is then read + unread(sock)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, f"GET /big HTTP/1.1\r\nHost: {HOST}\r\n{extra}\r\n".encode())
    got = 0
    while got < read:
        got += len(await loop.sock_recv(sock, min(65536, read - got)))
    last, same = -1, 0
    while same < 5:  # the client's window is closed: the edge cannot send more
        await asyncio.sleep(0.1)
        now = unread(sock)
        same = same + 1 if now == last else 0
        last = now
    return sock, got + last


async def test_metered_bytes_are_what_clients_received(
    make_edge: EdgeFactory, make_origin: MakeOrigin
) -> None:
    port, usage = await start(make_edge, make_origin)
    heads = [
        "GET /big HTTP/1.1\r\n",  # a miss
        "GET /big HTTP/1.1\r\n",  # a hit
        "GET /small HTTP/1.1\r\n",
        "GET /big HTTP/1.1\r\nRange: bytes=1000-200999\r\n",
        "GET /small HTTP/1.1\r\nRange: bytes=0-9,20-29\r\n",
        "HEAD /big HTTP/1.1\r\n",
        f"GET /small HTTP/1.1\r\nIf-None-Match: {ETAG}\r\n",
        "GET /big HTTP/1.1\r\nRange: bytes=99999999-\r\n",  # 416
    ]
    total = 0
    for head in heads:
        total += await received(port, head)
    await usage.until(lambda u: u["requests"] == len(heads))
    assert usage.total["bytes_sent"] == total
    assert usage.total["origin_bytes"] == len(BIG) + len(SMALL)
    assert usage.total["misses"] == 2 and usage.total["hits"] == len(heads) - 2
    assert usage.total["status_3xx"] == 1 and usage.total["status_4xx"] == 1
    # The body bytes: 2 whole BIGs, a SMALL, 200000 of a range, the multipart's parts
    assert usage.total["body_bytes"] > 2 * len(BIG) + len(SMALL) + 200_000


async def test_an_abandoned_download_counts_what_the_client_got(
    make_edge: EdgeFactory, make_origin: MakeOrigin
) -> None:
    """The client reads 300000 bytes of 8 MiB, stops, and closes: metered bytes_sent equals the
    bytes its kernel accepted (read + still unread), with a tolerance of 0."""
    port, usage = await start(make_edge, make_origin)
    warm = await received(port, "GET /big HTTP/1.1\r\n")
    await usage.until(lambda u: u["requests"] == 1)
    for read in (300_000, 1000):
        sock, got = await stalled_download(port, read)
        requests = usage.total["requests"] + 1
        before = usage.total["bytes_sent"]
        sock.close()  # unread data: a reset
        await usage.until(lambda u: u["requests"] == requests)  # noqa: B023 (awaited here)
        metered = usage.total["bytes_sent"] - before
        assert metered == got, (read, metered, got)
        assert 0 < got < len(BIG)
    assert usage.total["bytes_sent"] - warm < 2 * len(BIG)


async def test_a_long_response_counts_in_the_windows_it_was_sent_in(
    make_edge: EdgeFactory, make_origin: MakeOrigin
) -> None:
    """A download that crosses a window boundary (the edge's clock moved by the test): the bytes
    delivered before it are in the earlier window, the rest and the request in the later one."""
    port, usage = await start(make_edge, make_origin)
    await received(port, "GET /big HTTP/1.1\r\n")  # cached: the download below is a hit
    usage.take()
    usage.by_window.clear()
    first = window_start(time.time()) - 10 * WINDOW
    now = [first + WINDOW - 2.0]
    usage.worker.server.clock = lambda: now[0]
    sock, _ = await stalled_download(port, 500_000, "Connection: close\r\n")
    usage.take()  # what a usage message carries: progress so far
    assert list(usage.by_window) == [first]
    earlier = usage.by_window[first]
    assert earlier["requests"] == 0 and earlier["bytes_sent"] >= 500_000
    now[0] = first + WINDOW + 1.0
    loop = asyncio.get_running_loop()
    total = 500_000
    while data := await loop.sock_recv(sock, 1 << 20):
        total += len(data)
    sock.close()
    await usage.until(lambda u: u["requests"] == 2)
    later = usage.by_window[first + WINDOW]
    assert later["requests"] == 1 and later["bytes_sent"] > 0
    assert earlier["bytes_sent"] + later["bytes_sent"] == total
    assert earlier["body_bytes"] + later["body_bytes"] == len(BIG)


async def test_a_response_the_edge_cuts_counts_what_the_client_got(
    make_edge: EdgeFactory, make_origin: MakeOrigin
) -> None:
    """The origin dies mid-body and the edge aborts the client's connection: the kernel still
    delivers what the edge had handed it, so metered bytes_sent equals every byte the client
    read until EOF (status line, header block and the part of the body it got)."""
    sent = 48 * 65536  # 3 MiB of a declared 8 MiB

    async def dying(req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Cache-Control": "max-age=600", "Content-Length": str(len(BIG))}
        )
        await resp.prepare(req)
        for i in range(0, sent, 65536):
            await resp.write(BIG[i : i + 65536])
        await asyncio.sleep(1.0)
        assert req.transport is not None
        req.transport.abort()  # the origin dies mid-body
        return resp

    origin = await make_origin({"/die": dying})
    edge = await make_edge([origin.url])
    usage = Usage(edge.worker)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", edge.port))
        await loop.sock_sendall(sock, f"GET /die HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        await asyncio.sleep(2.0)  # the client reads nothing while the origin dies
        data = bytearray()
        async with asyncio.timeout(10):
            while chunk := await loop.sock_recv(sock, 1 << 20):
                data += chunk
    finally:
        sock.close()
    await usage.until(lambda u: u["requests"] == 1)
    head_end = data.index(b"\r\n\r\n") + 4
    assert data.startswith(b"HTTP/1.1 200 ")
    body = len(data) - head_end
    assert 0 < body < len(BIG)  # cut short
    assert data[head_end:] == BIG[:body]
    assert usage.total["bytes_sent"] == len(data), (usage.total["bytes_sent"], len(data))
    assert usage.total["body_bytes"] == body
