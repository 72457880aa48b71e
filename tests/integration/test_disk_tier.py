"""The disk tier end to end: large objects on disk served with sendfile, ranges from disk,
restarts that keep the cache, corrupt files never served, a failing disk never failing a
request, Vary variants and invalidation on disk, revalidation of a disk object."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from edge.worker import EdgeWorker
from tests.integration.conftest import Edge
from tests.integration.edgetest import cs_params, fixed, get, metrics

DISK = '[cache]\nmemory_max_object = "64KiB"\ndisk = "64MiB"\n'
BIG = os.urandom(3 << 20)  # on disk only (> memory_max_object)
HEADERS = {"Cache-Control": "max-age=600", "ETag": '"big1"', "Content-Type": "video/mp4"}


def objects_dir(edge: Edge) -> Path:
    return Path(edge.worker.config.edge.state_dir) / "cache" / "objects"


def stored_files(edge: Edge) -> list[Path]:
    return [p for p in objects_dir(edge).rglob("*") if p.is_file() and "." not in p.name]


async def settled_files(edge: Edge, count: int) -> list[Path]:
    """The committed files once there are `count`: a client can have its last byte a moment
    before the fill commits the file."""
    for _ in range(200):
        files = stored_files(edge)
        if len(files) == count:
            return files
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(stored_files(edge))} files stored, expected {count}")


async def test_large_object_is_served_from_disk_with_sendfile(
    make_origin: Any, make_edge: Any, monkeypatch: Any
) -> None:
    origin = await make_origin({"/v.mp4": fixed(BIG, HEADERS)})
    edge = await make_edge([origin.url], top_extra=DISK)
    miss = await get(edge, "/v.mp4")
    assert miss.body == BIG and "stored" in cs_params(miss)
    await settled_files(edge, 1)
    m = await metrics(edge)
    assert m["cdn_edge_disk_tier_bytes"] >= len(BIG)
    assert m["cdn_edge_disk_tier_budget_bytes"] == 64 << 20
    sent: list[int] = []
    real = os.sendfile

    def observed(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        n = real(out_fd, in_fd, offset, count)
        sent.append(n)
        return n

    monkeypatch.setattr(os, "sendfile", observed)
    hit = await get(edge, "/v.mp4")
    assert hit.body == BIG and cs_params(hit).get("hit") is True
    assert sum(sent) == len(BIG)  # zero-copy from the file
    part = await get(edge, "/v.mp4", {"Range": "bytes=1000000-1999999"})
    assert part.status == 206 and part.body == BIG[1000000:2000000]
    multi = await get(edge, "/v.mp4", {"Range": "bytes=0-9, -10"})
    assert multi.status == 206
    assert BIG[:10] in multi.body and BIG[-10:] in multi.body
    assert (multi.header("content-type") or "").startswith("multipart/byteranges")
    head = await get(edge, "/v.mp4", method="HEAD")
    assert head.body == b"" and head.header("content-length") == str(len(BIG))
    cond = await get(edge, "/v.mp4", {"If-None-Match": '"big1"'})
    assert cond.status == 304 and cond.body == b""
    assert origin.hits["/v.mp4"] == 1


async def test_a_restart_keeps_the_cache(make_origin: Any, make_edge: Any) -> None:
    small = b"s" * 1000
    origin = await make_origin(
        {"/v.mp4": fixed(BIG, HEADERS), "/s.txt": fixed(small, {"Cache-Control": "max-age=600"})}
    )
    first = await make_edge([origin.url], top_extra=DISK)
    await get(first, "/v.mp4")
    await get(first, "/s.txt")
    await settled_files(first, 2)
    await first.worker.stop(grace=1.0)
    again = EdgeWorker(first.worker.config)  # same state_dir, new ports
    await again.start()
    try:
        restarted = Edge(again)
        for path, body in (("/v.mp4", BIG), ("/s.txt", small)):
            resp = await get(restarted, path)
            assert resp.body == body and cs_params(resp).get("hit") is True, path
        assert origin.hits == {"/v.mp4": 1, "/s.txt": 1}
    finally:
        await again.stop(grace=1.0)


async def test_corrupt_and_truncated_files_are_never_served(
    make_origin: Any, make_edge: Any
) -> None:
    origin = await make_origin({"/v.mp4": fixed(BIG, HEADERS)})
    edge = await make_edge([origin.url], top_extra=DISK)
    await get(edge, "/v.mp4")
    (path,) = await settled_files(edge, 1)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    resp = await get(edge, "/v.mp4")
    assert resp.body == BIG and cs_params(resp)["fwd"] == "uri-miss"
    assert origin.hits["/v.mp4"] == 2
    (path,) = await settled_files(edge, 1)  # stored again, whole
    with open(path, "r+b") as f:
        f.seek(30)
        f.write(b"\xff")  # inside the checksummed metadata
    resp = await get(edge, "/v.mp4")
    assert resp.body == BIG and cs_params(resp)["fwd"] == "uri-miss"


async def test_a_failing_disk_never_fails_a_request(make_origin: Any, make_edge: Any) -> None:
    origin = await make_origin({"/v.mp4": fixed(BIG, HEADERS)})
    edge = await make_edge([origin.url], top_extra=DISK)
    root = objects_dir(edge)
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():
        root.rmdir()
    root.write_bytes(b"")  # every object directory now fails to be created (ENOTDIR)
    for _ in range(3):
        resp = await get(edge, "/v.mp4")
        assert resp.status == 200 and resp.body == BIG
        assert "stored" not in cs_params(resp)
    assert origin.hits["/v.mp4"] == 3
    m = await metrics(edge)
    assert m["cdn_edge_disk_tier_write_errors_total"] >= 3


async def test_vary_variants_and_invalidation_on_disk(make_origin: Any, make_edge: Any) -> None:
    async def varied(req: web.Request) -> web.Response:
        if req.method == "POST":
            return web.Response(status=204)
        encoding = req.headers.get("Accept-Encoding", "none")
        return web.Response(
            body=encoding.encode() * 50_000,  # > memory_max_object: disk only
            headers={"Cache-Control": "max-age=600", "Vary": "Accept-Encoding"},
        )

    origin = await make_origin({"/v": varied})
    edge = await make_edge([origin.url], top_extra=DISK)
    for encoding in ("gzip", "br"):
        await get(edge, "/v", {"Accept-Encoding": encoding})
    for encoding in ("gzip", "br"):
        resp = await get(edge, "/v", {"Accept-Encoding": encoding})
        assert resp.body == encoding.encode() * 50_000 and cs_params(resp).get("hit") is True
    assert origin.hits["/v"] == 2
    await settled_files(edge, 3)  # the Vary stub and two variants
    await get(edge, "/v", method="POST")
    assert stored_files(edge) == []
    resp = await get(edge, "/v", {"Accept-Encoding": "gzip"})
    assert cs_params(resp)["fwd"] == "uri-miss"


async def test_stale_disk_object_is_revalidated_and_kept(make_origin: Any, make_edge: Any) -> None:
    calls: list[str] = []

    async def validating(req: web.Request) -> web.Response:
        if req.headers.get("If-None-Match") == '"big1"':
            calls.append("304")
            return web.Response(status=304, headers={"ETag": '"big1"', "X-Version": "2",
                                                     "Cache-Control": "max-age=600"})
        calls.append("200")
        return web.Response(body=BIG, headers={**HEADERS, "Cache-Control": "max-age=1",
                                               "Age": "5", "X-Version": "1"})

    origin = await make_origin({"/v.mp4": validating})
    edge = await make_edge([origin.url], top_extra=DISK)
    await get(edge, "/v.mp4")
    revalidated = await get(edge, "/v.mp4")
    assert revalidated.body == BIG and revalidated.header("x-version") == "2"
    assert cs_params(revalidated)["fwd-status"] == "304"
    hit = await get(edge, "/v.mp4")
    assert hit.body == BIG and hit.header("x-version") == "2"
    assert cs_params(hit).get("hit") is True
    assert calls == ["200", "304"]


def slow_route(body: bytes, headers: dict[str, str]) -> Any:
    """An origin route that takes its time: workers that miss together overlap its fetch."""

    async def slow(req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers=headers)
        resp.content_length = len(body)
        await resp.prepare(req)
        for i in range(0, len(body), 256 << 10):
            await resp.write(body[i : i + (256 << 10)])
            await asyncio.sleep(0.02)
        return resp

    return slow


@pytest.mark.parametrize(
    "vary",
    [
        pytest.param(False, id="plain"),
        # The second worker finds the variant being written through the key's Vary stub,
        # written as soon as the fetch starts.
        pytest.param(True, id="vary"),
    ],
)
async def test_workers_sharing_a_disk_fetch_a_cold_object_once(
    make_origin: Any, make_edge: Any, vary: bool
) -> None:
    """Two workers (two edges on one state_dir, as a supervisor's workers are) and a herd on
    one cold object: one origin fetch; the second worker follows the first one's file."""
    body = os.urandom(2 << 20)
    headers = {"Cache-Control": "max-age=600"}
    if vary:
        headers["Vary"] = "Accept-Encoding"
    origin = await make_origin({"/cold.bin": slow_route(body, headers)})
    first = await make_edge([origin.url], top_extra=DISK)
    second = await make_edge([origin.url], top_extra=DISK)
    request = {"Accept-Encoding": "gzip"}
    results = await asyncio.gather(
        *(get(edge, "/cold.bin", request) for _ in range(20) for edge in (first, second))
    )
    assert all(r.status == 200 and r.body == body for r in results)
    assert origin.hits["/cold.bin"] == 1
