"""The edge's HTTP/1.1 protocol on the wire: a real edge, a real origin, raw sockets.

Keep-alive, pipelining, HTTP/1.0, request bodies (chunked, Expect: 100-continue), refusals,
half-closed clients, timeouts, HEAD, and memory while streaming a body of several GiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from edge.server import CLOCK, HttpConnection, HttpServer
from tests.integration.conftest import HOST, Edge, Origin
from tests.rawhttp import RawResponse, read_response

BODY = b"cached body " * 100


def get(
    path: str, *lines: str, method: str = "GET", version: str = "1.1", host: str = HOST
) -> bytes:
    head = [f"{method} {path} HTTP/{version}"] + ([f"Host: {host}"] if host else []) + list(lines)
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


class Client:
    """One raw connection to the edge."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, method: str = "GET", timeout: float = 10) -> RawResponse:
        return await asyncio.wait_for(read_response(self.reader, method), timeout)

    async def closed_by_peer(self, timeout: float) -> bool:
        """True when the edge closes the connection within `timeout` s with no further bytes."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        assert data == b"", f"unexpected bytes {data[:200]!r}"
        return True

    def shutdown_write(self) -> None:
        self.writer.write_eof()  # shutdown(SHUT_WR)

    def close(self) -> None:
        self.writer.close()


ClientFactory = Callable[[int], Awaitable[Client]]


@pytest.fixture
async def client_factory() -> AsyncIterator[ClientFactory]:
    clients: list[Client] = []

    async def make(port: int) -> Client:
        c = await Client.open(port)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


OriginFactory = Callable[..., Awaitable[Origin]]
EdgeFactory = Callable[..., Awaitable[Edge]]


async def cached(request: web.Request) -> web.Response:
    return web.Response(body=BODY + request.path.encode(), headers={"Cache-Control": "max-age=60"})


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(0.3)
    return web.Response(
        body=b"slow " + request.path.encode(), headers={"Cache-Control": "max-age=60"}
    )


async def stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Cache-Control": "no-store"})
    await resp.prepare(request)
    for i in range(5):
        await resp.write(f"part {i};".encode())
        await asyncio.sleep(0.01)
    await resp.write_eof()
    return resp


async def long(request: web.Request) -> web.StreamResponse:
    """1.5 s of response: longer than one tick of the edge's clock."""
    resp = web.StreamResponse(headers={"Cache-Control": "no-store"})
    await resp.prepare(request)
    for _ in range(3):
        await resp.write(b"tick\n")
        await asyncio.sleep(0.5)
    return resp


def echo_routes(
    received: list[bytes],
) -> dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        received.append(body)
        digest = hashlib.sha256(body).hexdigest()
        return web.Response(text=f"{len(body)} {digest}", headers={"Cache-Control": "no-store"})

    return {"/echo": echo}


async def edge_with(
    make_origin: OriginFactory,
    make_edge: EdgeFactory,
    *,
    top_extra: str = "",
    routes: dict[str, Any] | None = None,
) -> tuple[Origin, Edge]:
    all_routes: dict[str, Any] = {
        "/a": cached,
        "/b": cached,
        "/c": cached,
        "/slow": slow,
        "/slow2": slow,
        "/stream": stream,
    }
    all_routes.update(routes or {})
    origin = await make_origin(all_routes)
    edge = await make_edge([origin.url], top_extra=top_extra)
    return origin, edge


def server_of(edge: Edge) -> HttpServer:
    server: HttpServer = edge.worker.server
    return server


def only_connection(edge: Edge) -> HttpConnection:
    conns = list(server_of(edge).connections)
    assert len(conns) == 1
    return conns[0]


def assert_refusal(resp: RawResponse, status: int) -> None:
    assert resp.status == status
    assert resp.header("connection") == "close"
    assert (resp.header("content-type") or "").startswith("text/plain")
    assert 0 < len(resp.body) < 200
    assert resp.body.endswith(b"\n")
    assert int(resp.header("content-length") or -1) == len(resp.body)


# --- keep-alive and pipelining -------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    for path in ("/a", "/a", "/b", "/a", "/b", "/c"):
        await c.send(get(path))
        resp = await c.response()
        assert resp.status == 200
        assert resp.body == BODY + path.encode()
        assert resp.header("connection") is None
    assert origin.hits == {"/a": 1, "/b": 1, "/c": 1}
    assert len(server_of(edge).connections) == 1


async def test_pipelined_requests_are_answered_in_order(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    await c.send(get("/a"))
    assert (await c.response()).status == 200
    # a hit, a slow miss, a hit: the hit after the miss must wait for it
    await c.send(get("/a") + get("/slow") + get("/a"))
    bodies = [(await c.response()).body for _ in range(3)]
    assert bodies == [BODY + b"/a", b"slow /slow", BODY + b"/a"]
    assert origin.hits == {"/a": 1, "/slow": 1}
    # still usable
    await c.send(get("/slow"))
    assert (await c.response()).body == b"slow /slow"


async def test_pipelined_misses_and_mixed_methods(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    data = get("/slow") + get("/a", method="HEAD") + get("/slow2") + get("/a") + get("/stream")
    await c.send(data)
    responses = [await c.response(m) for m in ("GET", "HEAD", "GET", "GET", "GET")]
    assert [r.status for r in responses] == [200] * 5
    assert responses[1].body == b""
    assert [r.body for r in responses[2:]] == [
        b"slow /slow2",
        BODY + b"/a",
        b"part 0;part 1;part 2;part 3;part 4;",
    ]


async def test_empty_lines_between_pipelined_requests_are_ignored(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    await c.send(b"\r\n" + get("/a") + b"\r\n\r\n\r\n" + get("/b") + b"\r\n")
    assert (await c.response()).body == BODY + b"/a"
    assert (await c.response()).body == BODY + b"/b"
    await c.send(b"\r\n" + get("/c"))
    assert (await c.response()).body == BODY + b"/c"
    # a stray CRLF leaves the connection idle: no 408 for a head that never started
    await c.send(b"\r\n")
    await asyncio.sleep(0.1)
    conn = only_connection(edge)
    conn.idle_check(CLOCK.now + 5, 75.0, 1.0, 60.0)
    assert not conn.closed
    await c.send(get("/a"))
    assert (await c.response()).body == BODY + b"/a"


async def test_pipelined_bytes_behind_a_slow_response_are_bounded(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    """A client cannot make the edge buffer unbounded bytes behind a request in progress."""
    release = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="held", headers={"Cache-Control": "no-store"})

    _origin, edge = await edge_with(make_origin, make_edge, routes={"/held": held})
    c = await client_factory(edge.port)
    await c.send(get("/held"))
    flood = get("/a") * 20000  # ~1 MB of complete pipelined requests
    writer = asyncio.ensure_future(c.send(flood * 32))
    await asyncio.sleep(1.0)
    conn = only_connection(edge)
    assert len(conn._buf) <= 4 * server_of(edge).max_header_bytes + (1 << 18)
    assert not writer.done()  # the edge stopped reading
    writer.cancel()
    release.set()
    assert (await c.response()).body == b"held"


async def test_http11_connection_close_is_honoured(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    await c.send(get("/slow", "Connection: close") + get("/a"))
    resp = await c.response()
    assert resp.body == b"slow /slow"
    assert resp.header("connection") == "close"
    assert await c.closed_by_peer(3)  # the pipelined /a is not answered


async def test_get_with_a_body_keeps_the_connection_in_sync(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    await c.send(get("/a"))
    await c.response()
    chunked_get = get("/a", "Transfer-Encoding: chunked") + b"3\r\nGET\r\n0\r\n\r\n"
    await c.send(get("/a", "Content-Length: 16") + get("/b")[:16] + chunked_get + get("/b"))
    assert [(await c.response()).body for _ in range(3)] == [
        BODY + b"/a",
        BODY + b"/a",
        BODY + b"/b",
    ]


async def test_graceful_stop(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    """Idle connections close at once; a response in progress completes with Connection: close."""
    _origin, edge = await edge_with(make_origin, make_edge)
    idle = await client_factory(edge.port)
    await idle.send(get("/a"))
    await idle.response()
    busy = await client_factory(edge.port)
    await busy.send(get("/slow"))
    await asyncio.sleep(0.05)
    stopping = asyncio.ensure_future(server_of(edge).stop(grace=5))
    assert await idle.closed_by_peer(1)
    resp = await busy.response()
    assert resp.body == b"slow /slow" and resp.header("connection") == "close"
    assert await busy.closed_by_peer(1)
    await asyncio.wait_for(stopping, 3)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", edge.port)


async def test_absolute_form_target_names_the_domain(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    await c.send(get(f"http://{HOST}/a?x=%41", "Host: not-configured.test", host=""))
    resp = await c.response()
    assert resp.status == 200 and resp.body == BODY + b"/a"
    assert origin.requests[-1].raw_path == "/a?x=%41"
    assert origin.requests[-1].host == HOST


async def test_options_asterisk_is_answered_by_the_edge(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    await c.send(get("*", method="OPTIONS"))
    resp = await c.response()
    assert resp.status == 200 and "GET" in (resp.header("allow") or "")
    assert resp.body == b""


async def test_pipelined_hits_wait_for_a_client_that_does_not_read(
    make_origin: OriginFactory, make_edge: EdgeFactory
) -> None:
    """Answers to pipelined requests must not pile up in the edge while the client reads none."""
    obj = os.urandom(60_000)

    async def stored(request: web.Request) -> web.Response:
        return web.Response(body=obj, headers={"Cache-Control": "max-age=600"})

    _origin, edge = await edge_with(make_origin, make_edge, routes={"/obj": stored})
    await (await Client.open(edge.port)).send(get("/obj", "Connection: close"))  # store it
    await asyncio.sleep(0.2)
    count = 300  # 18 MB of answers for 20 KB of requests
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", edge.port))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, get("/obj") * count)
        await asyncio.sleep(1.0)
        buffered = max(
            conn._transport.get_write_buffer_size()  # type: ignore[union-attr]
            for conn in server_of(edge).connections
        )
        assert buffered < 2 << 20, f"{buffered} bytes of answers buffered in the edge"
        # Reading resumes the answers; every one arrives intact and in order.
        reader = asyncio.StreamReader(limit=1 << 20)
        protocol = asyncio.StreamReaderProtocol(reader)
        await loop.connect_accepted_socket(lambda: protocol, sock)
        for _ in range(count):
            resp = await asyncio.wait_for(read_response(reader), 10)
            assert resp.status == 200 and resp.body == obj
    finally:
        sock.close()


# --- HTTP/1.0 -----------------------------------------------------------------------------------


async def test_http10_closes_by_default(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    await c.send(get("/a", version="1.0"))
    resp = await c.response()
    assert resp.status == 200 and resp.body == BODY + b"/a"
    assert resp.raw_head.startswith(b"HTTP/1.1 200 OK\r\n")  # RFC 9110 2.5
    assert resp.header("connection") == "close"
    assert await c.closed_by_peer(3)


async def test_http10_without_host(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    await c.send(get("/a", version="1.0", host=""))
    resp = await c.response()
    assert resp.status == 404  # no Host names no domain
    assert await c.closed_by_peer(3)


async def test_http10_keep_alive_is_honoured_and_echoed(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    for path in ("/a", "/a", "/slow"):
        await c.send(get(path, "Connection: keep-alive", version="1.0"))
        resp = await c.response()
        assert resp.status == 200
        assert resp.header("connection") == "keep-alive"
    await c.send(get("/a", version="1.0"))
    resp = await c.response()
    assert resp.header("connection") == "close"
    assert await c.closed_by_peer(3)


async def test_http10_streamed_body_of_unknown_length_is_close_delimited(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    await c.send(get("/stream", "Connection: keep-alive", version="1.0"))
    resp = await c.response()
    assert resp.status == 200
    assert resp.header("content-length") is None
    assert resp.header("transfer-encoding") is None
    assert resp.header("connection") == "close"
    assert resp.body == b"part 0;part 1;part 2;part 3;part 4;"


async def test_http11_streamed_body_of_unknown_length_is_chunked(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    await c.send(get("/stream"))
    resp = await c.response()
    assert resp.header("transfer-encoding") == "chunked"
    assert resp.body == b"part 0;part 1;part 2;part 3;part 4;"
    await c.send(get("/a"))
    assert (await c.response()).status == 200


# --- request bodies -----------------------------------------------------------------------------


async def test_chunked_post_is_forwarded_intact(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    received: list[bytes] = []
    _origin, edge = await edge_with(make_origin, make_edge, routes=echo_routes(received))
    c = await client_factory(edge.port)
    payload = os.urandom(300_000)
    head = get(
        "/echo",
        "Transfer-Encoding: chunked",
        "Content-Type: application/octet-stream",
        method="POST",
    )
    await c.send(head)
    pos = 0
    for size in (1, 100, 65536, 5, 200_000):
        chunk = payload[pos : pos + size]
        await c.send(f"{len(chunk):x};ext=1\r\n".encode() + chunk + b"\r\n")
        pos += size
        await asyncio.sleep(0.01)
    await c.send(f"{len(payload) - pos:X}\r\n".encode() + payload[pos:] + b"\r\n")
    await c.send(b"0\r\nX-Trailer: dropped\r\n\r\n")
    resp = await c.response()
    assert resp.status == 200
    assert resp.body == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()
    assert received == [payload]
    # the connection is still in sync
    await c.send(get("/a"))
    assert (await c.response()).body == BODY + b"/a"


async def test_large_upload_to_a_slow_origin_is_not_cut_as_stalled(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    """The edge stops reading while the origin is slow: the client has not stalled."""
    got: list[int] = []

    async def slow_sink(request: web.Request) -> web.Response:
        size = 0
        while chunk := await request.content.read(1 << 18):
            size += len(chunk)
            await asyncio.sleep(0.02)  # ~12 MB/s
        got.append(size)
        return web.Response(text=str(size), headers={"Cache-Control": "no-store"})

    _origin, edge = await edge_with(
        make_origin, make_edge, routes={"/sink": slow_sink}, top_extra="request_head_timeout = 1"
    )
    c = await client_factory(edge.port)
    total = 40 << 20
    await c.send(get("/sink", f"Content-Length: {total}", method="PUT"))
    piece = b"u" * (1 << 20)
    for _ in range(total // len(piece)):
        await c.send(piece)
    resp = await c.response(timeout=20)
    assert resp.status == 200 and resp.body == str(total).encode()
    assert got == [total]


async def test_steady_trickle_upload_is_not_cut_as_stalled(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    """A byte every 0.25 s never pauses for the 1 s timeout: the upload is not stalled,
    although the edge's clock only ticks once a second."""
    received: list[bytes] = []
    _origin, edge = await edge_with(
        make_origin, make_edge, routes=echo_routes(received), top_extra="request_head_timeout = 1"
    )
    c = await client_factory(edge.port)
    await c.send(get("/echo", "Content-Length: 14", method="POST"))
    for _ in range(14):
        await asyncio.sleep(0.25)
        await c.send(b"t")
    resp = await c.response(timeout=5)
    assert resp.status == 200 and resp.body.startswith(b"14 ")
    assert received == [b"t" * 14]


async def test_content_length_post_then_pipelined_get(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    received: list[bytes] = []
    _origin, edge = await edge_with(make_origin, make_edge, routes=echo_routes(received))
    c = await client_factory(edge.port)
    await c.send(get("/echo", "Content-Length: 5", method="POST") + b"hello" + get("/a"))
    assert (await c.response()).body.startswith(b"5 ")
    assert (await c.response()).body == BODY + b"/a"
    assert received == [b"hello"]


async def test_expect_100_continue(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    received: list[bytes] = []
    _origin, edge = await edge_with(make_origin, make_edge, routes=echo_routes(received))
    c = await client_factory(edge.port)
    await c.send(get("/echo", "Content-Length: 11", "Expect: 100-continue", method="POST"))
    interim = await c.response()
    assert interim.status == 100
    assert interim.raw_head == b"HTTP/1.1 100 Continue\r\n\r\n"
    await c.send(b"hello world")
    final = await c.response()
    assert final.status == 200 and final.body.startswith(b"11 ")
    assert received == [b"hello world"]
    await c.send(get("/a"))
    assert (await c.response()).status == 200


async def test_expect_100_continue_refused_without_continue(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    """A request answered without reading its body gets no 100 and the connection closes."""
    _origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    await c.send(
        get("/x", "Content-Length: 5", "Expect: 100-continue", method="POST", host="unknown.test")
    )
    resp = await c.response()
    assert resp.status == 404
    assert resp.header("connection") == "close"
    assert await c.closed_by_peer(3)


async def test_malformed_chunked_body_is_400(
    make_origin: OriginFactory,
    make_edge: EdgeFactory,
    client_factory: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    received: list[bytes] = []
    _origin, edge = await edge_with(make_origin, make_edge, routes=echo_routes(received))
    c = await client_factory(edge.port)
    caplog.set_level(logging.ERROR)
    await c.send(
        get("/echo", "Transfer-Encoding: chunked", method="POST") + b"5\r\nhelloXX0\r\n\r\n"
    )
    resp = await c.response()
    assert_refusal(resp, 400)
    assert await c.closed_by_peer(3)
    await asyncio.sleep(0.1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert received == []


async def test_malformed_chunked_body_arriving_later_is_400(
    make_origin: OriginFactory,
    make_edge: EdgeFactory,
    client_factory: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def slow_reader(request: web.Request) -> web.Response:
        await release.wait()
        body = await request.read()
        return web.Response(text=str(len(body)))

    _origin, edge = await edge_with(make_origin, make_edge, routes={"/up": slow_reader})
    caplog.set_level(logging.ERROR)
    c = await client_factory(edge.port)
    await c.send(get("/up", "Transfer-Encoding: chunked", method="POST") + b"5\r\nhello\r\n")
    await asyncio.sleep(0.2)
    await c.send(b"zz\r\n")
    release.set()
    resp = await c.response()
    assert resp.status in (400, 502)
    assert resp.header("connection") == "close"
    assert await c.closed_by_peer(3)
    await asyncio.sleep(0.1)
    assert not [
        r
        for r in caplog.records
        if "Fatal" in r.getMessage() or "never retrieved" in r.getMessage()
    ], caplog.text


# --- refusals -----------------------------------------------------------------------------------


REFUSALS = [
    pytest.param(
        get("/a", "Content-Length: 3", "Transfer-Encoding: chunked", method="POST"),
        400,
        id="cl-and-te",
    ),
    pytest.param(b"GET /a HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400, id="request-line"),
    pytest.param(b"GET\r\nHost: x\r\n\r\n", 400, id="short-request-line"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, id="tls-hello"),
    pytest.param(get("/a", version="2.0"), 505, id="http2"),
    pytest.param(get("/a", "Transfer-Encoding: gzip, chunked", method="POST"), 501, id="gzip-te"),
    pytest.param(get("/a", "X-Fold: a", " b"), 400, id="obs-fold"),
    pytest.param(get("/a", host=""), 400, id="no-host"),
    pytest.param(get("/a", "Host: other.test"), 400, id="two-hosts"),
    pytest.param(get("/a", "Content-Length: 1, 2", method="POST"), 400, id="two-lengths"),
    pytest.param(get("/\xe9"), 400, id="non-ascii-target"),
    pytest.param(get("/a", "X-Big: " + "x" * 20000), 431, id="431"),
]


@pytest.mark.parametrize(("data", "status"), REFUSALS)
async def test_refusals_are_short_plain_text_and_close(
    make_origin: OriginFactory,
    make_edge: EdgeFactory,
    client_factory: ClientFactory,
    data: bytes,
    status: int,
) -> None:
    origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    await c.send(data)
    resp = await c.response()
    assert_refusal(resp, status)
    assert await c.closed_by_peer(3)
    assert origin.hits == {}
    assert edge.stats.requests["refused"] == 1


async def test_refusal_after_good_requests_on_the_same_connection(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    await c.send(get("/a") + get("/slow") + b"BAD REQUEST LINE\r\n\r\n" + get("/b"))
    assert (await c.response()).status == 200
    assert (await c.response()).status == 200
    assert_refusal(await c.response(), 400)
    assert await c.closed_by_peer(3)
    assert "/b" not in origin.hits


async def test_header_limit_trickled_without_end_is_431(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    await c.send(b"GET /a HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n")
    for _ in range(40):
        await c.send(b"X-Filler: " + b"f" * 500 + b"\r\n")
    assert_refusal(await c.response(), 431)


async def test_huge_head_still_gets_its_431(
    make_origin: OriginFactory, make_edge: EdgeFactory
) -> None:
    """The refusal arrives even though the edge stops reading the rest of a 4 MiB head."""
    _origin, edge = await edge_with(make_origin, make_edge)
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    try:
        writer.write(b"GET /a HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nX: " + b"y" * (4 << 20))
        sender = asyncio.ensure_future(writer.drain())
        resp = await asyncio.wait_for(read_response(reader), 5)
        assert_refusal(resp, 431)
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
    finally:
        writer.close()


async def test_refusal_with_unread_body_is_delivered(
    make_origin: OriginFactory, make_edge: EdgeFactory
) -> None:
    """A 400 sent while the client is still uploading is not destroyed by a reset."""
    _origin, edge = await edge_with(make_origin, make_edge)
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        try:
            writer.write(
                get("/a", "Content-Length: 5", "Transfer-Encoding: chunked", method="POST")
                + b"z" * (2 << 20)
            )
            sender = asyncio.ensure_future(writer.drain())
            resp = await asyncio.wait_for(read_response(reader), 5)
            assert_refusal(resp, 400)
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
        finally:
            writer.close()


# --- half-closed clients ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/a", "/slow", "/stream"])
async def test_half_closed_client_gets_its_response(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory, path: str
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    await c.send(get("/a"))
    await c.response()
    await c.send(get(path))
    c.shutdown_write()
    resp = await c.response()
    assert resp.status == 200
    assert await c.closed_by_peer(3)


async def test_half_closed_client_gets_every_pipelined_response(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    await c.send(get("/slow") + get("/a") + get("/slow2") + get("/stream"))
    c.shutdown_write()
    bodies = [(await c.response()).body for _ in range(4)]
    assert bodies == [
        b"slow /slow",
        BODY + b"/a",
        b"slow /slow2",
        b"part 0;part 1;part 2;part 3;part 4;",
    ]
    assert await c.closed_by_peer(3)


async def test_half_closed_with_an_incomplete_head_is_closed(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge)
    first = await client_factory(edge.port)
    await first.send(get("/a"))
    await first.response()
    c = await client_factory(edge.port)
    await c.send(get("/a") + b"GET /b HTTP/1.1\r\nHo")  # /a is a hit: answered at once
    c.shutdown_write()
    assert (await c.response()).body == BODY + b"/a"
    assert await c.closed_by_peer(3)  # no 408 30 s later: the head can never complete


# --- timeouts -----------------------------------------------------------------------------------


async def test_idle_keep_alive_connection_is_closed(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge, top_extra="keepalive_timeout = 1")
    c = await client_factory(edge.port)
    await c.send(get("/a"))
    assert (await c.response()).status == 200
    started = time.monotonic()
    assert await c.closed_by_peer(5)
    assert 0.5 < time.monotonic() - started < 4
    # a connection that never sends a request is closed too
    idle = await client_factory(edge.port)
    assert await idle.closed_by_peer(5)
    assert not server_of(edge).connections


async def test_keep_alive_idle_time_counts_from_the_end_of_the_response(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge, routes={"/long": long})
    c = await client_factory(edge.port)
    await c.send(get("/long"))
    assert (await c.response()).body == b"tick\n" * 3
    conn = only_connection(edge)
    conn.idle_check(CLOCK.now, 1.0, 1.0, 60.0)  # the request itself is > 1 s old
    assert not conn.closed
    await c.send(get("/a"))
    assert (await c.response()).status == 200


async def test_slowloris_head_gets_408(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    origin, edge = await edge_with(make_origin, make_edge, top_extra="request_head_timeout = 1")
    c = await client_factory(edge.port)
    started = time.monotonic()
    response = asyncio.ensure_future(c.response())
    for byte in b"GET /a HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nX-Slow: " + b"s" * 40:
        if response.done():
            break
        with contextlib.suppress(ConnectionError):
            await c.send(bytes([byte]))
        await asyncio.sleep(0.1)
    resp = await response
    assert_refusal(resp, 408)
    assert 0.9 < time.monotonic() - started < 4
    assert await c.closed_by_peer(3)
    assert origin.hits == {}


async def test_partial_pipelined_head_behind_a_long_response_is_not_timed_out(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge, routes={"/long": long})
    c = await client_factory(edge.port)
    # the second head's start arrives with the first request, its end only after the response
    await c.send(get("/long") + b"GET /a HTTP/1.1\r\n")
    assert (await c.response()).status == 200
    await asyncio.sleep(0.1)
    conn = only_connection(edge)
    conn.idle_check(CLOCK.now, 75.0, 0.5, 60.0)  # it arrived > 1 s ago, but waited for us
    assert not conn.closed
    await c.send(b"Host: " + HOST.encode() + b"\r\n\r\n")
    assert (await c.response()).body == BODY + b"/a"


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_client_that_stops_reading_is_cut_after_send_timeout(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory, version: str
) -> None:
    """1.1: a streamed miss waits for the client; 1.0: a hit written at once, then close()."""
    big = os.urandom(8 << 20)

    async def large(request: web.Request) -> web.Response:
        return web.Response(body=big, headers={"Cache-Control": "max-age=60"})

    _origin, edge = await edge_with(
        make_origin,
        make_edge,
        routes={"/large": large},
        top_extra="keepalive_timeout = 300\nsend_timeout = 1",
    )
    if version == "1.0":
        primer = await client_factory(edge.port)
        await primer.send(get("/large", "Connection: close"))
        assert (await primer.response()).body == big
        assert await primer.closed_by_peer(2)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", edge.port))
    try:
        sock.sendall(get("/large", version=version))
        for _ in range(50):
            await asyncio.sleep(0.1)
            if any(conn._paused for conn in server_of(edge).connections):
                break
        else:
            raise AssertionError("the edge never had to wait for the client")
        started = time.monotonic()
        while server_of(edge).connections and time.monotonic() - started < 6:
            await asyncio.sleep(0.1)
        assert not server_of(edge).connections
        assert time.monotonic() - started > 0.5
    finally:
        sock.close()


# --- HEAD ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/a", "/stream", "/slow"])
async def test_head_has_no_body_and_keeps_the_connection(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory, path: str
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    expected = {
        "/a": BODY + b"/a",
        "/stream": b"part 0;part 1;part 2;part 3;part 4;",
        "/slow": b"slow /slow",
    }[path]
    for method in ("HEAD", "GET", "HEAD", "HEAD", "GET"):
        await c.send(get(path, method=method))
        # any body byte a HEAD leaked would be read as the start of the next response
        resp = await c.response(method)
        assert resp.status == 200
        assert resp.body == (expected if method == "GET" else b"")
    await c.send(get("/b", method="HEAD") + get("/b"))
    head = await c.response("HEAD")
    full = await c.response()
    assert head.body == b"" and full.body == BODY + b"/b"
    assert head.header("content-length") == full.header("content-length")
    c.close()


async def test_head_then_get_bytes_on_the_wire(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    _origin, edge = await edge_with(make_origin, make_edge)
    c = await client_factory(edge.port)
    await c.send(get("/a"))
    await c.response()
    await c.send(get("/a", method="HEAD"))
    head = await c.response("HEAD")
    await asyncio.sleep(0.2)
    assert c.reader.at_eof() is False
    assert len(c.reader._buffer) == 0  # type: ignore[attr-defined]
    assert head.header("content-length") == str(len(BODY) + 2)


# --- memory while streaming ---------------------------------------------------------------------


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


STREAM_SIZE = 2 << 30
PIECE = bytes(range(256)) * 4096  # 1 MiB


async def test_multi_gib_stream_keeps_memory_bounded(
    make_origin: OriginFactory, make_edge: EdgeFactory, client_factory: ClientFactory
) -> None:
    async def generated(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=60"})
        await resp.prepare(request)
        for _ in range(STREAM_SIZE // len(PIECE)):
            await resp.write(PIECE)
        await resp.write_eof()
        return resp

    _origin, edge = await edge_with(
        make_origin,
        make_edge,
        routes={"/huge": generated},
        top_extra='[cache]\nmemory = "64MiB"\nmax_object = "1MiB"',
    )
    c = await client_factory(edge.port)
    await c.send(get("/a"))
    await c.response()
    baseline = rss()
    peak = baseline
    started = time.monotonic()
    await c.send(get("/huge"))
    head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding: chunked" in head.lower()
    total = 0
    crc = 0
    reads = 0
    while True:
        size_line = await c.reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            assert await c.reader.readuntil(b"\r\n") == b"\r\n"
            break
        left = size
        while left:
            data = await c.reader.read(min(left, 1 << 20))
            assert data
            crc = zlib.crc32(data, crc)
            left -= len(data)
            total += len(data)
            reads += 1
            if reads % 64 == 0:
                peak = max(peak, rss())
        assert await c.reader.readexactly(2) == b"\r\n"
    elapsed = time.monotonic() - started
    peak = max(peak, rss())
    expected = 0
    for _ in range(STREAM_SIZE // len(PIECE)):
        expected = zlib.crc32(PIECE, expected)
    assert total == STREAM_SIZE
    assert crc == expected
    growth = peak - baseline
    print(f"streamed {total >> 20} MiB in {elapsed:.1f} s, RSS growth {growth >> 20} MiB")
    assert growth < 100 << 20
    # and the connection is still usable
    await c.send(get("/a"))
    assert (await c.response()).status == 200
