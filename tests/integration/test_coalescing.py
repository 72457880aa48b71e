"""End to end: one origin fetch per key, shared by every waiting client (read-while-write).

To make "every client joined the fill" deterministic rather than a race, origin handlers hold
their answer until the edge has counted the expected number of coalesced waits.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from tests.integration.conftest import HOST, Edge
from tests.integration.edgetest import cs_params, get

SMALL_OBJECTS = '[cache]\nmemory = "1MiB"\nmax_object = "16KiB"\n'


async def until_waiting(edge_box: list[Edge], waits: int, timeout: float = 5.0) -> None:
    """Hold an origin answer until `waits` clients joined fills on the edge."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if edge_box and edge_box[0].stats.coalesced_waits >= waits:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"only {edge_box[0].stats.coalesced_waits} of {waits} waits")


async def timed_get(port: int, target: str, headers: dict[str, str] | None = None) -> Any:
    """GET with Connection: close; returns (head, body, seconds to first body byte, total)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {target} HTTP/1.1", f"Host: {HOST}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    first = await reader.read(1)
    first_byte = time.monotonic() - started
    rest = await reader.read()
    writer.close()
    return head, first + rest, first_byte, time.monotonic() - started


async def test_200_clients_one_origin_fetch(make_origin, make_edge) -> None:
    clients = 200
    body = bytes(range(256)) * 256  # 64 KiB
    box: list[Edge] = []

    async def obj(req: web.Request) -> web.Response:
        await until_waiting(box, clients - 1)
        return web.Response(body=body, headers={"Cache-Control": "max-age=60"})

    origin = await make_origin({"/hot": obj})
    box.append(await make_edge([origin.url]))
    edge = box[0]
    resps = await asyncio.gather(*(get(edge, "/hot") for _ in range(clients)))
    assert origin.hits["/hot"] == 1
    assert all(r.status == 200 and r.body == body for r in resps)
    collapsed = [r for r in resps if cs_params(r).get("collapsed")]
    assert len(collapsed) == clients - 1
    starter = [r for r in resps if not cs_params(r).get("collapsed")]
    assert cs_params(starter[0])["fwd"] == "uri-miss"
    assert all(cs_params(r)["fwd"] == "uri-miss" for r in collapsed)
    assert edge.stats.coalesced_waits == clients - 1
    assert cs_params(await get(edge, "/hot")).get("hit") is True


BODY_GAP = 1.5  # seconds between the two halves of the slow origin's body


async def test_first_byte_not_delayed_by_the_whole_body(make_origin, make_edge) -> None:
    part = b"a" * 4096

    async def slow(req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=60"})
        resp.content_length = 2 * len(part)
        await resp.prepare(req)
        await resp.write(part)
        await asyncio.sleep(BODY_GAP)
        await resp.write(part)
        return resp

    origin = await make_origin({"/slow": slow})
    edge = await make_edge([origin.url])
    starter = asyncio.create_task(timed_get(edge.port, "/slow"))
    await asyncio.sleep(0.1)  # joins while the body is in flight
    joiner = asyncio.create_task(timed_get(edge.port, "/slow"))
    (_head1, body1, first1, total1), (head2, body2, first2, total2) = await asyncio.gather(
        starter, joiner
    )
    assert body1 == body2 == part * 2
    # Half the gap: far from it even on a loaded CI machine (0.42 s was seen against 0.3 s).
    assert first1 < BODY_GAP / 2 and first2 < BODY_GAP / 2
    assert total1 >= BODY_GAP - 0.05 and total2 >= BODY_GAP - 0.15
    assert b"collapsed" in head2 and origin.hits["/slow"] == 1


async def test_uncacheable_response_releases_waiters_to_fetch_concurrently(
    make_origin, make_edge
) -> None:
    clients, delay = 10, 0.3
    box: list[Edge] = []
    calls = 0

    async def private(req: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await until_waiting(box, clients - 1)
        await asyncio.sleep(delay)
        return web.Response(body=b"mine", headers={"Cache-Control": "private, max-age=60"})

    origin = await make_origin({"/p": private})
    box.append(await make_edge([origin.url]))
    edge = box[0]
    started = time.monotonic()
    resps = await asyncio.gather(*(get(edge, "/p") for _ in range(clients)))
    elapsed = time.monotonic() - started
    assert all(r.status == 200 and r.body == b"mine" for r in resps)
    assert origin.hits["/p"] == clients
    # one round for the first fetch, one for all released waiters together; serialised
    # fetches would take clients * delay
    assert elapsed < 3 * delay + 0.3, elapsed
    assert all("stored" not in cs_params(r) for r in resps)
    # known uncacheable now: later requests do not even try to wait on each other
    started = time.monotonic()
    again = await asyncio.gather(*(get(edge, "/p") for _ in range(clients)))
    assert time.monotonic() - started < 3 * delay + 0.3  # not clients * delay
    assert all(cs_params(r)["fwd"] == "miss" for r in again)
    assert origin.hits["/p"] == 2 * clients


async def test_vary_mismatch_among_waiters(make_origin, make_edge) -> None:
    box: list[Edge] = []
    calls = 0

    async def negotiated(req: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await until_waiting(box, 7)
        enc = req.headers.get("Accept-Encoding", "-")
        return web.Response(
            body=f"enc:{enc}".encode(),
            headers={"Cache-Control": "max-age=60", "Vary": "Accept-Encoding"},
        )

    origin = await make_origin({"/n": negotiated})
    box.append(await make_edge([origin.url]))
    edge = box[0]
    starter = asyncio.create_task(get(edge, "/n", {"Accept-Encoding": "gzip"}))
    while not origin.hits:
        await asyncio.sleep(0.005)
    encodings = ["gzip", "br", "gzip , identity", "gzip", "br", "gzip,identity", "br", "gzip"]
    others = await asyncio.gather(
        *(get(edge, "/n", {"Accept-Encoding": enc}) for enc in encodings[1:])
    )
    first = await starter
    for enc, resp in zip(encodings, [first, *others], strict=True):
        # "gzip , identity" and "gzip,identity" are one variant: either's body will do
        assert resp.body.replace(b" ", b"") == f"enc:{enc.replace(' ', '')}".encode(), enc
    gzip_waiters = [r for e, r in zip(encodings[1:], others, strict=True) if e == "gzip"]
    assert all(cs_params(r).get("collapsed") for r in gzip_waiters)
    assert origin.hits["/n"] <= 1 + 6
    for enc in ("gzip", "br", "gzip,identity"):
        hit = await get(edge, "/n", {"Accept-Encoding": enc})
        assert hit.body.replace(b" ", b"") == f"enc:{enc}".encode()
        assert cs_params(hit).get("hit") is True


async def test_revalidation_waiter_of_another_variant_gets_its_own(make_origin, make_edge) -> None:
    """A stale variant's revalidation (304) is not served to a waiter for another variant."""
    box: list[Edge] = []
    revalidations = 0

    async def negotiated(req: web.Request) -> web.Response:
        nonlocal revalidations
        enc = req.headers.get("Accept-Encoding", "-")
        etag = f'"{enc}"'
        if req.headers.get("If-None-Match") == etag:
            revalidations += 1
            if revalidations == 1:
                await until_waiting(box, 1)
            return web.Response(status=304, headers={"ETag": etag, "Cache-Control": "max-age=60"})
        headers = {
            "Cache-Control": "max-age=1", "Age": "3", "ETag": etag, "Vary": "Accept-Encoding"
        }
        return web.Response(body=f"enc:{enc}".encode(), headers=headers)

    origin = await make_origin({"/v": negotiated})
    box.append(await make_edge([origin.url]))
    edge = box[0]
    await get(edge, "/v", {"Accept-Encoding": "gzip"})
    await get(edge, "/v", {"Accept-Encoding": "br"})
    gz = asyncio.create_task(get(edge, "/v", {"Accept-Encoding": "gzip"}))
    while origin.hits["/v"] < 3:
        await asyncio.sleep(0.005)
    br = await get(edge, "/v", {"Accept-Encoding": "br"})
    assert (await gz).body == b"enc:gzip"
    assert br.status == 200 and br.body == b"enc:br"


async def test_too_big_object_shared_but_not_stored(make_origin, make_edge) -> None:
    clients = 10
    body = bytes(range(256)) * 256  # 64 KiB > max_object
    box: list[Edge] = []
    calls = 0

    async def big(req: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await until_waiting(box, clients - 1)
        return web.Response(body=body, headers={"Cache-Control": "max-age=60"})

    origin = await make_origin({"/big": big})
    box.append(await make_edge([origin.url], top_extra=SMALL_OBJECTS))
    edge = box[0]
    resps = await asyncio.gather(*(get(edge, "/big") for _ in range(clients)))
    assert all(r.body == body for r in resps)
    assert origin.hits["/big"] == 1
    assert sum(1 for r in resps if cs_params(r).get("collapsed")) == clients - 1
    again = await get(edge, "/big")
    assert again.body == body and "hit" not in cs_params(again)
    assert origin.hits["/big"] == 2


async def test_fill_survives_the_client_that_started_it(make_origin, make_edge) -> None:
    part = b"b" * 65536

    async def slow(req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=60"})
        resp.content_length = 4 * len(part)
        await resp.prepare(req)
        for _ in range(4):
            await resp.write(part)
            await asyncio.sleep(0.05)
        return resp

    origin = await make_origin({"/s": slow})
    edge = await make_edge([origin.url])
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    writer.write(f"GET /s HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    joiner = asyncio.create_task(get(edge, "/s"))
    await asyncio.sleep(0.02)
    writer.transport.abort()  # the starter goes away mid-body
    resp = await joiner
    assert resp.body == part * 4
    hit = await get(edge, "/s")
    assert hit.body == part * 4 and cs_params(hit).get("hit") is True
    assert origin.hits["/s"] == 1
