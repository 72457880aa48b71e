"""End to end: origins that fail. The client gets a short 502/504 or an aborted connection,
never a traceback and never a truncated body presented as complete, and nothing is stored.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import web

from tests.integration.conftest import HOST
from tests.integration.edgetest import (
    RawHandler,
    closed_port_url,
    cs_params,
    get,
    raw_origin,
    raw_response,
    read_until_closed,
    send_raw,
)
from tests.rawhttp import read_response

TIMEOUTS = "[origin]\nconnect_timeout = 1.0\nfirst_byte_timeout = 0.5\nidle_read_timeout = 0.5\n"
BODY = bytes(range(256)) * 400  # 100 KiB
GOOD = raw_response(
    200, [("Cache-Control", "max-age=60"), ("Content-Length", str(len(BODY)))], BODY
)


def failing_once(failure: RawHandler) -> RawHandler:
    """The first request gets `failure`, later ones the whole, cacheable BODY."""
    calls = 0

    async def handler(reader: Any, writer: Any, head: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await failure(reader, writer, head)
        else:
            writer.write(GOOD)

    return handler


async def reset_mid_body(reader: Any, writer: Any, head: bytes) -> None:
    writer.write(raw_response(200, [("Cache-Control", "max-age=60"),
                                    ("Content-Length", str(len(BODY)))], BODY[:10000]))
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.transport.abort()


async def reset_mid_chunked_body(reader: Any, writer: Any, head: bytes) -> None:
    writer.write(raw_response(200, [("Cache-Control", "max-age=60"),
                                    ("Transfer-Encoding", "chunked")], b"2710\r\n" + BODY[:10000]))
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.transport.abort()


async def short_body(reader: Any, writer: Any, head: bytes) -> None:
    """Content-Length says more than is sent, then a clean close (FIN)."""
    writer.write(raw_response(200, [("Cache-Control", "max-age=60"),
                                    ("Content-Length", str(len(BODY)))], BODY[:5000]))
    await writer.drain()
    writer.close()


async def hang_mid_body(reader: Any, writer: Any, head: bytes) -> None:
    writer.write(raw_response(200, [("Cache-Control", "max-age=60"),
                                    ("Content-Length", str(len(BODY)))], BODY[:1000]))
    await writer.drain()
    await reader.read()  # until the edge gives up and closes


async def hang_before_head(reader: Any, writer: Any, head: bytes) -> None:
    await reader.read()


async def garbage(reader: Any, writer: Any, head: bytes) -> None:
    writer.write(b"SSH-2.0-OpenSSH_9.6\r\nthis is not http at all\r\n\r\n")
    await writer.drain()
    writer.close()


async def close_without_answer(reader: Any, writer: Any, head: bytes) -> None:
    writer.close()


@pytest.mark.parametrize(
    "failure",
    [reset_mid_body, reset_mid_chunked_body, short_body, hang_mid_body],
    ids=["reset", "reset-chunked", "short-content-length", "idle-timeout"],
)
async def test_origin_dies_mid_body(make_edge, failure) -> None:
    async with raw_origin(failing_once(failure)) as origin:
        edge = await make_edge([origin.url], top_extra=TIMEOUTS)
        data, aborted = await read_until_closed(edge.port, "/obj")
        assert aborted, "a truncated body must not look complete"
        assert data.startswith(b"HTTP/1.1 200")
        assert b"Traceback" not in data
        again = await get(edge, "/obj")  # nothing partial was stored
        assert again.status == 200 and again.body == BODY
        assert cs_params(again)["fwd"] == "uri-miss"
        assert origin.hits == 2
        assert edge.stats.origin_errors["body"] == 1


async def test_origin_dies_mid_body_with_waiters(make_edge) -> None:
    async def slow_then_reset(reader: Any, writer: Any, head: bytes) -> None:
        writer.write(raw_response(200, [("Cache-Control", "max-age=60"),
                                        ("Content-Length", str(len(BODY)))], BODY[:1000]))
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.transport.abort()

    async with raw_origin(failing_once(slow_then_reset)) as origin:
        edge = await make_edge([origin.url], top_extra=TIMEOUTS)
        results = await asyncio.gather(*(read_until_closed(edge.port, "/obj") for _ in range(5)))
        assert all(aborted for _, aborted in results)
        assert origin.hits == 1
        again = await get(edge, "/obj")
        assert again.body == BODY and origin.hits == 2


@pytest.mark.parametrize(
    ("failure", "status", "hits_per_request"),
    [
        (hang_before_head, 504, 1),
        (garbage, 502, 1),
        (close_without_answer, 502, 2),  # one retry: it may be a stale pooled connection
    ],
    ids=["first-byte-timeout", "garbage", "closed-without-answer"],
)
async def test_origin_fails_before_the_head(make_edge, failure, status, hits_per_request) -> None:
    calls = 0

    async def handler(reader: Any, writer: Any, head: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls <= 2 * hits_per_request:
            await failure(reader, writer, head)
        else:
            writer.write(GOOD)

    async with raw_origin(handler) as origin:
        edge = await make_edge([origin.url], top_extra=TIMEOUTS)
        for attempt in range(2):  # an error response is never cached: both reach the origin
            started = time.monotonic()
            resp = await get(edge, "/obj")
            assert time.monotonic() - started < 2.0
            assert resp.status == status, attempt
            assert resp.header("content-type") == "text/plain; charset=utf-8"
            assert 0 < len(resp.body) < 100 and b"Traceback" not in resp.body
            assert resp.header("cache-status") is not None
            assert origin.hits == (attempt + 1) * hits_per_request
        ok = await get(edge, "/obj")
        assert ok.status == 200 and ok.body == BODY


async def test_origin_unreachable(make_edge) -> None:
    edge = await make_edge([closed_port_url()], top_extra=TIMEOUTS)
    for method in ("GET", "POST"):
        resp = await get(edge, "/x", method=method)
        assert resp.status == 502
        assert 0 < len(resp.body) < 100 and b"Traceback" not in resp.body
    assert edge.stats.origin_errors["connect"] == 2


async def test_all_origins_unreachable_then_recovers(make_edge) -> None:
    async with raw_origin(failing_once(close_without_answer)) as origin:
        edge = await make_edge([closed_port_url(), origin.url], top_extra=TIMEOUTS)
        resp = await get(edge, "/x")  # first refused, second closed, and its retry answers
        assert resp.status == 200 and resp.body == BODY


async def test_pass_origin_dies_mid_body(make_edge) -> None:
    async with raw_origin(failing_once(reset_mid_body)) as origin:
        edge = await make_edge([origin.url], top_extra=TIMEOUTS)
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(f"POST /form HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 2\r\n\r\nhi".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        rest = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert len(rest) < len(BODY)  # cut, and the connection closed


async def test_pass_garbage_is_502(make_edge) -> None:
    async with raw_origin(garbage) as origin:
        edge = await make_edge([origin.url], top_extra=TIMEOUTS)
        data = f"PUT /x HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3\r\n\r\nabc".encode()
        resp = await send_raw(edge.port, data)
        assert resp.status == 502 and b"Traceback" not in resp.body
        assert origin.bodies == [b"abc"]


async def test_slow_upload_is_not_cut_by_the_first_byte_timeout(make_origin, make_edge) -> None:
    async def echo(req: web.Request) -> web.Response:
        return web.Response(body=await req.read())

    origin = await make_origin({"/up": echo})
    edge = await make_edge([origin.url], top_extra=TIMEOUTS)
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    writer.write(f"POST /up HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 9\r\n\r\n".encode())
    for part in (b"abc", b"def", b"ghi"):  # 0.9 s in all, first_byte_timeout is 0.5 s
        writer.write(part)
        await writer.drain()
        await asyncio.sleep(0.3)
    resp = await asyncio.wait_for(read_response(reader), 5)
    writer.close()
    assert resp.status == 200 and resp.body == b"abcdefghi"


async def test_origin_hangs_after_an_upload(make_edge) -> None:
    async with raw_origin(hang_before_head) as origin:
        edge = await make_edge([origin.url], top_extra=TIMEOUTS)
        started = time.monotonic()
        resp = await send_raw(
            edge.port, f"POST /x HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1\r\n\r\nz".encode()
        )
        assert resp.status == 504 and time.monotonic() - started < 2.0
        assert b"Traceback" not in resp.body


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="hello", headers={"Cache-Control": "max-age=60"})


async def test_an_origin_in_origin_deny_is_never_connected_to(make_edge, make_origin) -> None:
    """SSRF: whether the origin is an address literal, a loopback name or a name that only
    resolves to a denied address, the edge answers 502 without connecting."""
    origin = await make_origin({"/x": _hello})
    port = origin.server.port
    deny = '[origin]\ndeny = ["127.0.0.0/8", "::1/128"]\n' + TIMEOUTS.removeprefix("[origin]\n")
    for url in (origin.url, f"http://localhost:{port}", f"http://0x7f.1:{port}"):
        edge = await make_edge([url], top_extra=deny)
        for method in ("GET", "POST"):
            resp = await get(edge, "/x", method=method)
            assert resp.status == 502, url
            assert 0 < len(resp.body) < 100 and b"Traceback" not in resp.body
    assert origin.hits == {}


async def test_a_denied_origin_fails_over_to_an_allowed_one(make_edge, make_origin) -> None:
    origin = await make_origin({"/x": _hello})
    denied = f"http://127.0.0.2:{origin.server.port}"
    edge = await make_edge([denied, origin.url], top_extra='[origin]\ndeny = ["127.0.0.2/32"]\n')
    resp = await get(edge, "/x")
    assert resp.status == 200 and resp.body == b"hello"
    assert origin.hits == {"/x": 1}
