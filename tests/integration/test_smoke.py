"""First end-to-end checks: miss then hit, unknown host, bytes intact."""

from __future__ import annotations

from aiohttp import web

from tests.integration.conftest import HOST
from tests.rawhttp import request


async def test_miss_then_hit(make_origin, make_edge) -> None:
    body = b"x" * 4096

    async def logo(req: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Cache-Control": "max-age=60", "ETag": '"v1"'})

    origin = await make_origin({"/logo.png": logo})
    edge = await make_edge([origin.url])
    first = await request(edge.port, "/logo.png", HOST)
    second = await request(edge.port, "/logo.png", HOST)
    assert first.status == second.status == 200
    assert first.body == second.body == body
    assert first.header("cache-status").startswith("cdn-edge; fwd=uri-miss; fwd-status=200; stored")
    assert second.header("cache-status").startswith("cdn-edge; hit")
    assert second.header("age") is not None
    assert origin.hits["/logo.png"] == 1


async def test_unknown_host_is_404_and_never_reaches_origin(make_origin, make_edge) -> None:
    origin = await make_origin({})
    edge = await make_edge([origin.url])
    resp = await request(edge.port, "/", "evil.example.test")
    assert resp.status == 404
    assert origin.hits == {}
