"""Helpers shared by the caching, coalescing and fault tests (not a test module).

`fixed` builds aiohttp origin routes; `RawOrigin` is an origin written on bare sockets, for
answers aiohttp will not produce (garbage, resets, lying Content-Length, odd hop-by-hop fields).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from email.utils import formatdate

from aiohttp import web

from tests.integration.conftest import HOST, Edge
from tests.rawhttp import RawResponse, read_response, request

Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def http_date(offset: float = 0.0) -> str:
    return formatdate(time.time() + offset, usegmt=True)


class Clock:
    """A wall clock a test sets (`now`), for the edge's `clock=` arguments."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fixed(
    body: bytes = b"hello\n",
    headers: dict[str, str] | None = None,
    status: int = 200,
    delay: float = 0.0,
) -> Route:
    """A route answering the same response every time (after `delay` seconds)."""

    async def handler(req: web.Request) -> web.StreamResponse:
        if delay:
            await asyncio.sleep(delay)
        return web.Response(body=body, status=status, headers=headers or {})

    return handler


def sequence(*responses: tuple[int, dict[str, str], bytes]) -> Route:
    """A route answering the given (status, headers, body) in turn, repeating the last."""
    calls = [0]

    async def handler(req: web.Request) -> web.StreamResponse:
        status, headers, body = responses[min(calls[0], len(responses) - 1)]
        calls[0] += 1
        return web.Response(body=body, status=status, headers=headers)

    return handler


async def get(
    edge: Edge, target: str, headers: dict[str, str] | None = None, method: str = "GET",
    host: str = HOST,
) -> RawResponse:
    return await request(edge.port, target, host, method, headers)


def status_of(resp: RawResponse) -> str:
    """Our Cache-Status member (exactly one is expected)."""
    value = resp.header("cache-status")
    assert value is not None, resp.raw_head
    assert value.startswith("cdn-edge"), value
    return value


def cs_params(resp: RawResponse) -> dict[str, str | bool]:
    """Cache-Status parameters as a dict: bare keys map to True."""
    out: dict[str, str | bool] = {}
    for part in status_of(resp).split(";")[1:]:
        name, eq, value = part.strip().partition("=")
        out[name] = value if eq else True
    return out


def ttl_of(resp: RawResponse) -> int:
    value = cs_params(resp)["ttl"]
    assert isinstance(value, str)
    return int(value)


async def send_raw(port: int, data: bytes, method: str = "GET", timeout: float = 10) -> RawResponse:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader, method), timeout)
    finally:
        writer.close()


async def metrics(edge: Edge) -> dict[str, float]:
    """The admin /metrics samples as {"name{labels}": value}."""
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.worker.admin_port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        resp = await read_response(reader)
    finally:
        writer.close()
    out: dict[str, float] = {}
    for line in resp.body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]


class RawOrigin:
    """An origin on a bare socket: `handler(reader, writer, head)` answers each request head."""

    def __init__(self, handler: RawHandler) -> None:
        self.handler = handler
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []  # Content-Length request bodies, read before `handler`
        self.url = ""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def hits(self) -> int:
        return len(self.heads)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                body = await reader.readexactly(int(length.group(1))) if length else b""
                self.bodies.append(body)
                await self.handler(reader, writer, head)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()


@asynccontextmanager
async def raw_origin(handler: RawHandler) -> AsyncIterator[RawOrigin]:
    origin = RawOrigin(handler)
    await origin.start()
    try:
        yield origin
    finally:
        await origin.close()


def raw_response(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + [f"{n}: {v}" for n, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def closed_port_url() -> str:
    """An origin URL on which nothing listens (connection refused)."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


async def read_until_closed(port: int, target: str, timeout: float = 10) -> tuple[bytes, bool]:
    """GET with Connection: close, read until the edge closes; returns (bytes, incomplete).

    Incomplete: no full head, fewer body bytes than Content-Length, or a chunked body without
    its last chunk, i.e. what a client sees when the edge aborts the connection mid-response.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = b""
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(timeout):
            while True:
                try:
                    piece = await reader.read(65536)
                except ConnectionError:
                    break
                if not piece:
                    break
                data += piece
    finally:
        writer.close()
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return data, True
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    if length:
        return data, len(body) < int(length.group(1))
    if re.search(rb"(?i)\r\ntransfer-encoding: *chunked", head):
        return data, not body.endswith(b"0\r\n\r\n")
    return data, False
