"""Slices end to end: a cold seek fetches only the slices it covers, whole objects under a
slice rule stream slice after slice, versions are never mixed, an origin that ignores Range
gets a whole-object fill."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from typing import Any

from aiohttp import web

from tests.integration.edgetest import cs_params, get, read_until_closed

SIZE = 24 << 20
MiB = 1 << 20


_CONTENT: dict[int, bytes] = {}


def content(version: int) -> bytes:
    """Bytes that never repeat at a short period: a wrong offset cannot compare equal."""
    if version not in _CONTENT:
        seed = hashlib.sha256(str(version).encode()).digest()
        _CONTENT[version] = random.Random(seed).randbytes(SIZE)
    return _CONTENT[version]


class RangeOrigin:
    """Serves one large object, honouring single Range requests (unless told not to)."""

    def __init__(self, honour_range: bool = True, max_span: int | None = None) -> None:
        self.version = 1
        self.honour_range = honour_range
        self.max_span = max_span  # an origin that cuts ranges shorter than asked
        self.bytes_sent = 0
        self.requests: list[str | None] = []

    async def __call__(self, req: web.Request) -> web.Response:
        body = content(self.version)
        headers = {
            "Cache-Control": "max-age=600", "ETag": f'"v{self.version}"',
            "Content-Type": "video/mp4", "Accept-Ranges": "bytes",
        }
        if req.method == "PUT":
            self.version += 1
            return web.Response(status=204)
        value = req.headers.get("Range")
        self.requests.append(value)
        if value and self.honour_range:
            first, _, last = value.partition("=")[2].partition("-")
            start = int(first)
            if start >= len(body):
                headers["Content-Range"] = f"bytes */{len(body)}"
                return web.Response(status=416, headers=headers)
            end = min(int(last) + 1 if last else len(body), len(body))
            if self.max_span is not None:
                end = min(end, start + self.max_span)
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(body)}"
            self.bytes_sent += end - start
            return web.Response(status=206, body=body[start:end], headers=headers)
        self.bytes_sent += len(body)
        return web.Response(body=body, headers=headers)


SLICE_RULE = '[[domains.rules]]\nsuffix = [".mp4"]\nslice = "1MiB"\n'
CACHE = '[cache]\nmemory_max_object = "64KiB"\ndisk = "256MiB"\n'


async def test_cold_seek_fetches_only_the_slices_it_covers(
    make_origin: Any, make_edge: Any
) -> None:
    origin_route = RangeOrigin()
    origin = await make_origin({"/movie.bin": origin_route})
    edge = await make_edge([origin.url], top_extra=CACHE)
    start = 10 * MiB + 12345
    resp = await get(edge, "/movie.bin", {"Range": f"bytes={start}-{start + MiB - 1}"})
    assert resp.status == 206 and resp.body == content(1)[start : start + MiB]
    assert resp.header("content-range") == f"bytes {start}-{start + MiB - 1}/{SIZE}"
    assert origin_route.bytes_sent == 2 * MiB  # the two slices that cover it, not 24 MiB
    again = await get(edge, "/movie.bin", {"Range": f"bytes={start}-{start + 99}"})
    assert again.body == content(1)[start : start + 100]
    assert cs_params(again).get("hit") is True and cs_params(again)["detail"] == "slice"
    assert again.header("age") is not None and 590 <= int(cs_params(again)["ttl"]) <= 600
    tail = await get(edge, "/movie.bin", {"Range": "bytes=-100"})
    assert tail.status == 206 and tail.body == content(1)[-100:]
    # A suffix range needs the length first: slice 0, then the last slice.
    assert origin_route.bytes_sent == 4 * MiB


async def test_whole_object_under_a_slice_rule_streams_slice_after_slice(
    make_origin: Any, make_edge: Any
) -> None:
    origin_route = RangeOrigin()
    origin = await make_origin({"/v.mp4": origin_route})
    edge = await make_edge([origin.url], top_extra=CACHE, domain_extra=SLICE_RULE)
    whole = await get(edge, "/v.mp4")
    assert whole.status == 200 and whole.body == content(1)
    assert whole.header("content-length") == str(SIZE)
    assert all(r is not None for r in origin_route.requests)  # only Range requests
    assert len(origin_route.requests) == SIZE // MiB and origin_route.bytes_sent == SIZE
    seek = await get(edge, "/v.mp4", {"Range": "bytes=5000000-5999999"})
    assert seek.body == content(1)[5000000:6000000] and cs_params(seek).get("hit") is True
    assert len(origin_route.requests) == SIZE // MiB


async def test_slices_of_two_versions_are_never_mixed(make_origin: Any, make_edge: Any) -> None:
    origin_route = RangeOrigin()
    origin = await make_origin({"/v.mp4": origin_route})
    edge = await make_edge([origin.url], top_extra=CACHE, domain_extra=SLICE_RULE)
    await get(edge, "/v.mp4", {"Range": "bytes=0-99"})  # slice 0 of version 1 stored
    origin_route.version = 2  # the object changes at the origin
    _, incomplete = await read_until_closed(edge.port, "/v.mp4")
    assert incomplete  # version 1's head was sent; a version 2 slice ends it: aborted
    whole = await get(edge, "/v.mp4")
    assert whole.status == 200 and whole.body == content(2)  # consistent, all refetched


async def test_origin_ignoring_range_gets_a_whole_object_fill(
    make_origin: Any, make_edge: Any
) -> None:
    origin_route = RangeOrigin(honour_range=False)
    origin = await make_origin({"/movie.bin": origin_route})
    edge = await make_edge([origin.url], top_extra=CACHE)
    resp = await get(edge, "/movie.bin", {"Range": "bytes=100-199"})
    assert resp.status == 206 and resp.body == content(1)[100:200]
    await asyncio.sleep(0.2)
    again = await get(edge, "/movie.bin", {"Range": "bytes=300-399"})
    assert again.body == content(1)[300:400] and cs_params(again).get("hit") is True
    assert len(origin_route.requests) == 2  # the ignored Range request, then one whole fill


async def test_an_origin_cutting_its_own_spans_gets_a_whole_object_fill(
    make_origin: Any, make_edge: Any
) -> None:
    origin_route = RangeOrigin(max_span=256 << 10)
    origin = await make_origin({"/movie.bin": origin_route})
    edge = await make_edge([origin.url], top_extra=CACHE)
    resp = await get(edge, "/movie.bin", {"Range": "bytes=0-2097151"})
    assert resp.status == 206 and resp.body == content(1)[: 2 * MiB]


async def test_slices_cut_at_another_size_are_never_used(make_origin: Any, make_edge: Any) -> None:
    origin_route = RangeOrigin()
    origin = await make_origin({"/v.mp4": origin_route})
    two = await make_edge([origin.url], top_extra=CACHE,
                          domain_extra=SLICE_RULE.replace("1MiB", "2MiB"))
    await get(two, "/v.mp4", {"Range": "bytes=0-4194303"})
    one = await make_edge([origin.url], top_extra=CACHE, domain_extra=SLICE_RULE)  # same disk
    resp = await get(one, "/v.mp4", {"Range": "bytes=1572864-3670015"})
    assert resp.status == 206 and resp.body == content(1)[1572864:3670016]


async def test_a_write_to_the_object_drops_its_slices(make_origin: Any, make_edge: Any) -> None:
    origin_route = RangeOrigin()
    origin = await make_origin({"/v.mp4": origin_route})
    edge = await make_edge([origin.url], top_extra=CACHE, domain_extra=SLICE_RULE)
    await get(edge, "/v.mp4", {"Range": "bytes=0-99"})
    assert (await get(edge, "/v.mp4", method="PUT")).status == 204
    resp = await get(edge, "/v.mp4", {"Range": "bytes=0-99"})
    assert resp.body == content(2)[:100] and cs_params(resp).get("hit") is not True


async def test_probe_past_the_end_is_416_and_keeps_slicing(
    make_origin: Any, make_edge: Any
) -> None:
    origin_route = RangeOrigin()
    origin = await make_origin({"/movie.bin": origin_route})
    edge = await make_edge([origin.url], top_extra=CACHE)
    probe = await get(edge, "/movie.bin", {"Range": f"bytes={SIZE + 5}-"})
    assert probe.status == 416 and probe.header("content-range") == f"bytes */{SIZE}"
    seek = await get(edge, "/movie.bin", {"Range": "bytes=100-199"})
    assert seek.body == content(1)[100:200]
    assert origin_route.bytes_sent == MiB  # one slice, never the whole object


async def test_head_and_suffix_ranges_on_slices_leak_no_descriptor(
    make_origin: Any, make_edge: Any
) -> None:
    origin_route = RangeOrigin()
    origin = await make_origin({"/v.mp4": origin_route})
    edge = await make_edge([origin.url], top_extra=CACHE, domain_extra=SLICE_RULE)
    await get(edge, "/v.mp4", {"Range": "bytes=-100"})
    await asyncio.sleep(0.1)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        tail = await get(edge, "/v.mp4", {"Range": "bytes=-100"})
        assert tail.body == content(1)[-100:] and cs_params(tail).get("hit") is True
        head = await get(edge, "/v.mp4", method="HEAD")
        assert head.status == 200 and head.body == b""
        assert head.header("content-length") == str(SIZE)
    await asyncio.sleep(0.1)
    assert len(os.listdir("/proc/self/fd")) <= before
    assert origin_route.bytes_sent == 2 * MiB  # HEAD fetched nothing more
