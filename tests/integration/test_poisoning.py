"""Attacks and races that would serve one client's or one moment's response to others.

Each test here reproduces a defect found in review: the request that could poison the cache,
then what a later, innocent client must see.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from tests.integration.conftest import HOST
from tests.integration.edgetest import cs_params, get
from tests.rawhttp import exchange


def echo_path(max_age: int = 600) -> Any:
    async def handler(req: web.Request) -> web.Response:
        return web.Response(
            body=f"content of {req.path_qs}".encode(),
            headers={"Cache-Control": f"max-age={max_age}"},
        )

    return handler


async def test_get_with_a_body_cannot_smuggle_a_request_onto_the_origin_connection(
    make_origin, make_edge
) -> None:
    """A GET's Content-Length must not reach the origin without its body: the origin would
    read the next request on the pooled connection as that body."""
    routes = {p: echo_path() for p in ("/a", "/x", "/poison")}
    origin = await make_origin(routes)
    edge = await make_edge([origin.url])
    prefix = f"GET /x HTTP/1.1\r\nHost: {HOST}\r\nX-Foo: "
    attack = (
        f"GET /a HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(prefix)}\r\n\r\n"
    ).encode()
    await exchange(edge.port, attack)
    follow = f"GET /x HTTP/1.1\r\nHost: {HOST}\r\nX-Foo: GET /poison HTTP/1.0\r\n\r\n"
    first = (await exchange(edge.port, follow.encode()))[0]
    assert first.body == b"content of /x"
    victim = await get(edge, "/x")
    assert victim.body == b"content of /x"
    assert "/poison" not in origin.hits


async def test_origin_sees_the_domain_name_not_the_clients_host_spelling(
    make_origin, make_edge
) -> None:
    """An origin that builds redirects from Host must not get a port or case the cache key
    ignores, or one client's spelling is served to everyone."""

    async def redirect(req: web.Request) -> web.Response:
        return web.Response(
            status=301,
            headers={"Location": f"http://{req.host}/docs/", "Cache-Control": "max-age=3600"},
        )

    origin = await make_origin({"/docs": redirect})
    edge = await make_edge([origin.url])
    await get(edge, "/docs", host=f"{HOST.upper()}:6666")
    victim = await get(edge, "/docs")
    assert cs_params(victim).get("hit") is True
    assert victim.header("location") == f"http://{HOST}/docs/"


async def test_write_during_a_fill_keeps_the_old_body_out_of_the_cache(
    make_origin, make_edge
) -> None:
    """RFC 9111 4.4: a PUT that succeeds while a GET's fetch is in flight invalidates what
    that fetch would store."""
    version = {"v": 1}
    release = asyncio.Event()

    async def resource(req: web.Request) -> web.StreamResponse:
        if req.method == "PUT":
            version["v"] += 1
            return web.Response(status=204)
        body = f"version {version['v']}".encode()
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=600"})
        resp.content_length = len(body)
        await resp.prepare(req)
        await release.wait()
        await resp.write(body)
        return resp

    origin = await make_origin({"/doc": resource})
    edge = await make_edge([origin.url])
    reading = asyncio.ensure_future(get(edge, "/doc"))
    while origin.hits.get("/doc", 0) < 1:
        await asyncio.sleep(0.01)
    put = await get(edge, "/doc", method="PUT")
    assert put.status == 204
    release.set()
    assert (await reading).body == b"version 1"  # it asked before the write
    after = await get(edge, "/doc")
    assert after.body == b"version 2"


async def test_clients_of_another_variant_coalesce_among_themselves(
    make_origin, make_edge
) -> None:
    """Waiters that find the in-flight fetch is for another Vary variant share one fetch for
    their own variant instead of each going to the origin."""
    calls: list[str] = []

    async def varied(req: web.Request) -> web.Response:
        encoding = req.headers.get("Accept-Encoding", "")
        calls.append(encoding)
        await asyncio.sleep(0.3)
        return web.Response(
            body=f"encoded for {encoding}".encode(),
            headers={"Cache-Control": "max-age=600", "Vary": "Accept-Encoding"},
        )

    origin = await make_origin({"/v": varied})
    edge = await make_edge([origin.url])
    first = asyncio.ensure_future(get(edge, "/v", {"Accept-Encoding": "gzip"}))
    while not calls:
        await asyncio.sleep(0.01)
    others = await asyncio.gather(
        *(get(edge, "/v", {"Accept-Encoding": "br"}) for _ in range(30))
    )
    assert (await first).body == b"encoded for gzip"
    assert all(r.body == b"encoded for br" for r in others)
    assert sorted(calls) == ["br", "gzip"]
