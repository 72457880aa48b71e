"""End to end: RFC 9111 shared-cache behaviour, rules, the proxy's header hygiene, Range, HEAD,
the memory tier and the admin endpoints, as a client and an origin see them.

Timing: a stored response is made stale at once with an upstream `Age` larger than its max-age,
so only the Age-grows test sleeps (one second).
"""

from __future__ import annotations

import asyncio
import gzip
import time
from typing import Any

import pytest
from aiohttp import web

from edge import policy
from tests.integration.conftest import HOST
from tests.integration.edgetest import (
    closed_port_url,
    cs_params,
    fixed,
    get,
    http_date,
    metrics,
    raw_origin,
    raw_response,
    send_raw,
    sequence,
    status_of,
    ttl_of,
)
from tests.rawhttp import exchange

AUTH = {"Authorization": "Bearer secret"}
LAST_MODIFIED = "Mon, 01 Jan 2024 00:00:00 GMT"


async def setup(make_origin: Any, make_edge: Any, routes: dict[str, Any], **kw: Any) -> Any:
    origin = await make_origin(routes)
    edge = await make_edge([origin.url], **kw)
    return origin, edge


class Validating:
    """A route with validators that answers 304 to a matching conditional request."""

    def __init__(
        self,
        body: bytes = b"validated body\n",
        cc: str = "max-age=60",
        etag: str = '"v1"',
        extra: dict[str, str] | None = None,
        not_modified_extra: dict[str, str] | None = None,
        last_modified: str | None = LAST_MODIFIED,
    ) -> None:
        self.body = body
        self.last_modified = last_modified
        self.cc = cc
        self.etag = etag
        self.extra = extra or {}
        self.not_modified_extra = not_modified_extra or {}
        self.conditionals: list[dict[str, str]] = []
        self.full = 0
        self.not_modified = 0

    async def __call__(self, req: web.Request) -> web.StreamResponse:
        cond = {k: v for k, v in req.headers.items() if k.lower().startswith("if-")}
        self.conditionals.append(cond)
        if req.headers.get("If-None-Match") == self.etag or (
            "If-None-Match" not in req.headers
            and req.headers.get("If-Modified-Since") == LAST_MODIFIED
        ):
            self.not_modified += 1
            headers = {"ETag": self.etag, **self.not_modified_extra}
            return web.Response(status=304, headers=headers)
        self.full += 1
        headers = {"Cache-Control": self.cc, "ETag": self.etag, **self.extra}
        if self.last_modified:
            headers["Last-Modified"] = self.last_modified
        return web.Response(body=self.body, headers=headers)


# ------------------------------------------------------------------------------- storing

STORING = [
    pytest.param({"Cache-Control": "max-age=60"}, {}, True, id="max-age"),
    pytest.param({"Cache-Control": "no-store, max-age=60"}, {}, False, id="no-store"),
    pytest.param({"Cache-Control": "private, max-age=60"}, {}, False, id="private"),
    pytest.param({"Cache-Control": "max-age=60"}, AUTH, False, id="authorization"),
    pytest.param({"Cache-Control": "public, max-age=60"}, AUTH, True, id="authorization-public"),
    pytest.param({"Cache-Control": "s-maxage=60"}, AUTH, True, id="authorization-s-maxage"),
    pytest.param(
        {"Cache-Control": "max-age=60, must-revalidate"}, AUTH, True,
        id="authorization-must-revalidate",
    ),
    pytest.param({"Cache-Control": "max-age=60", "Set-Cookie": "id=1"}, {}, False, id="set-cookie"),
    pytest.param({}, {}, False, id="no-freshness-no-validator"),
]


@pytest.mark.parametrize(("resp_headers", "req_headers", "stored"), STORING)
async def test_storing_rules(make_origin, make_edge, resp_headers, req_headers, stored) -> None:
    origin, edge = await setup(make_origin, make_edge, {"/r": fixed(b"body", resp_headers)})
    first = await get(edge, "/r", req_headers)
    second = await get(edge, "/r", req_headers)
    assert first.body == second.body == b"body"
    assert ("stored" in cs_params(first)) is stored
    assert origin.hits["/r"] == (1 if stored else 2)
    if stored:
        assert cs_params(second).get("hit") is True
    if "Set-Cookie" in resp_headers:
        assert first.header("set-cookie") == "id=1"


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_never_stored(make_origin, make_edge, status) -> None:
    route = fixed(b"broken\n", {"Cache-Control": "public, max-age=60"}, status=status)
    origin, edge = await setup(make_origin, make_edge, {"/e": route})
    for _ in range(2):
        resp = await get(edge, "/e")
        assert resp.status == status and resp.body == b"broken\n"
        assert "stored" not in cs_params(resp)
        assert cs_params(resp)["fwd-status"] == str(status)
    assert origin.hits["/e"] == 2


@pytest.mark.parametrize(
    ("status", "modified_ago", "ttl"),
    [
        pytest.param(200, 1000, 100, id="200-10%"),
        pytest.param(200, 100 * 86400, 86400, id="200-capped"),
        pytest.param(404, 1000, 100, id="404"),
        pytest.param(302, 1000, None, id="302-not-heuristic"),
    ],
)
async def test_heuristic_freshness_from_last_modified(
    make_origin, make_edge, status, modified_ago, ttl
) -> None:
    headers = {"Last-Modified": http_date(-modified_ago), "Location": "/x"}
    origin, edge = await setup(make_origin, make_edge, {"/h": fixed(b"h", headers, status)})
    first = await get(edge, "/h")
    second = await get(edge, "/h")
    assert first.status == second.status == status
    if ttl is None:
        assert "stored" not in cs_params(first)
        assert origin.hits["/h"] == 2
    else:
        assert abs(ttl_of(first) - ttl) <= 2
        assert cs_params(second).get("hit") is True
        assert origin.hits["/h"] == 1


async def test_no_default_ttl_with_only_a_validator(make_origin, make_edge) -> None:
    """Stored for its ETag, but with lifetime 0: every use is a revalidation, never a hit."""
    # no freshness at all (an unknown directive is ignored), no Last-Modified for a heuristic
    route = Validating(cc="x-unknown-directive", last_modified=None)
    _, edge = await setup(make_origin, make_edge, {"/v": route})
    first = await get(edge, "/v")
    second = await get(edge, "/v")
    assert first.body == second.body == route.body
    assert ttl_of(first) <= 0
    assert "hit" not in cs_params(second)
    assert route.not_modified == 1  # the second went to origin, conditionally
    assert route.conditionals[1].get("If-None-Match") == '"v1"'


@pytest.mark.parametrize("expires", ["not a date", "0", "Thu, 01 Jan 1970 00:00:00 GMT"])
async def test_invalid_or_past_expires_is_stale(make_origin, make_edge, expires) -> None:
    origin, edge = await setup(make_origin, make_edge, {"/x": fixed(b"x", {"Expires": expires})})
    first = await get(edge, "/x")
    second = await get(edge, "/x")
    assert "stored" in cs_params(first) and ttl_of(first) <= 0
    assert cs_params(second)["fwd"] == "stale"
    assert origin.hits["/x"] == 2


@pytest.mark.parametrize(
    ("headers", "ttl"),
    [
        pytest.param({"Cache-Control": "s-maxage=100, max-age=5"}, 100, id="s-maxage"),
        pytest.param(
            {"Cache-Control": "max-age=50", "Expires": "@500"}, 50, id="max-age-over-expires"
        ),
        pytest.param({"Expires": "@30"}, 30, id="expires-minus-date"),
        pytest.param({"Cache-Control": "max-age=60", "Age": "50"}, 10, id="upstream-age"),
    ],
)
async def test_freshness_lifetime_precedence(make_origin, make_edge, headers, ttl) -> None:
    headers = {k: http_date(int(v[1:])) if v.startswith("@") else v for k, v in headers.items()}
    _, edge = await setup(make_origin, make_edge, {"/f": fixed(b"f", headers)})
    first = await get(edge, "/f")
    assert ttl - 2 <= ttl_of(first) <= ttl
    hit = await get(edge, "/f")
    assert cs_params(hit).get("hit") is True
    assert ttl - 2 <= ttl_of(hit) <= ttl
    if "Age" in headers:
        assert first.header("age") is not None and 50 <= int(first.header("age") or 0) <= 51
        assert 50 <= int(hit.header("age") or 0) <= 52


async def test_upstream_age_beyond_max_age_is_stale_at_once(make_origin, make_edge) -> None:
    headers = {"Cache-Control": "max-age=10", "Age": "20"}
    origin, edge = await setup(make_origin, make_edge, {"/a": fixed(b"a", headers)})
    await get(edge, "/a")
    second = await get(edge, "/a")
    assert cs_params(second)["fwd"] == "stale"
    assert origin.hits["/a"] == 2


async def test_age_grows_on_hits(make_origin, make_edge) -> None:
    _, edge = await setup(
        make_origin, make_edge, {"/g": fixed(b"g", {"Cache-Control": "max-age=60"})}
    )
    await get(edge, "/g")
    await asyncio.sleep(1.1)
    hit = await get(edge, "/g")
    assert 1 <= int(hit.header("age") or "-1") <= 2
    assert 57 <= ttl_of(hit) <= 59


# ---------------------------------------------------------------------- request directives


async def test_request_max_age_zero_revalidates(make_origin, make_edge) -> None:
    route = Validating()
    _, edge = await setup(make_origin, make_edge, {"/v": route})
    await get(edge, "/v")
    resp = await get(edge, "/v", {"Cache-Control": "max-age=0"})
    assert resp.status == 200 and resp.body == route.body
    params = cs_params(resp)
    assert params["fwd"] == "request" and params["fwd-status"] == "304"
    assert route.conditionals[1]["If-None-Match"] == '"v1"'
    assert route.conditionals[1]["If-Modified-Since"] == LAST_MODIFIED


async def test_request_max_stale(make_origin, make_edge) -> None:
    headers = {"Cache-Control": "max-age=1", "Age": "5"}  # stale by 4 s
    origin, edge = await setup(make_origin, make_edge, {"/s": fixed(b"s", headers)})
    await get(edge, "/s")
    ok = await get(edge, "/s", {"Cache-Control": "max-stale=30"})
    assert cs_params(ok).get("hit") is True and ttl_of(ok) < 0
    assert origin.hits["/s"] == 1
    bare = await get(edge, "/s", {"Cache-Control": "max-stale"})
    assert cs_params(bare).get("hit") is True
    too_old = await get(edge, "/s", {"Cache-Control": "max-stale=1"})
    assert cs_params(too_old)["fwd"] == "stale"
    assert origin.hits["/s"] == 2


async def test_request_min_fresh(make_origin, make_edge) -> None:
    origin, edge = await setup(
        make_origin, make_edge, {"/m": fixed(b"m", {"Cache-Control": "max-age=60"})}
    )
    await get(edge, "/m")
    ok = await get(edge, "/m", {"Cache-Control": "min-fresh=30"})
    assert cs_params(ok).get("hit") is True
    refused = await get(edge, "/m", {"Cache-Control": "min-fresh=100"})
    assert cs_params(refused)["fwd"] == "request"
    assert origin.hits["/m"] == 2


async def test_request_no_cache_revalidates(make_origin, make_edge) -> None:
    route = Validating()
    _, edge = await setup(make_origin, make_edge, {"/v": route})
    await get(edge, "/v")
    resp = await get(edge, "/v", {"Cache-Control": "no-cache"})
    assert resp.body == route.body
    assert cs_params(resp)["fwd"] == "request"
    assert route.not_modified == 1 and route.full == 1


async def test_request_no_store_is_not_stored(make_origin, make_edge) -> None:
    origin, edge = await setup(
        make_origin, make_edge, {"/n": fixed(b"n", {"Cache-Control": "max-age=60"})}
    )
    first = await get(edge, "/n", {"Cache-Control": "no-store"})
    assert first.body == b"n" and "stored" not in cs_params(first)
    second = await get(edge, "/n")
    assert cs_params(second)["fwd"] == "uri-miss" and "stored" in cs_params(second)
    assert origin.hits["/n"] == 2


async def test_only_if_cached(make_origin, make_edge) -> None:
    origin, edge = await setup(
        make_origin, make_edge, {"/o": fixed(b"o", {"Cache-Control": "max-age=60"})}
    )
    cold = await get(edge, "/o", {"Cache-Control": "only-if-cached"})
    assert cold.status == 504 and origin.hits == {}
    assert cs_params(cold)["detail"] == "only-if-cached"
    assert b"Traceback" not in cold.body and len(cold.body) < 100
    await get(edge, "/o")
    warm = await get(edge, "/o", {"Cache-Control": "only-if-cached"})
    assert warm.status == 200 and warm.body == b"o"
    assert origin.hits["/o"] == 1


async def test_pragma_no_cache_only_without_cache_control(make_origin, make_edge) -> None:
    route = Validating()
    _, edge = await setup(make_origin, make_edge, {"/p": route})
    await get(edge, "/p")
    ignored = await get(edge, "/p", {"Pragma": "no-cache", "Cache-Control": "x-foo"})
    assert cs_params(ignored).get("hit") is True
    honoured = await get(edge, "/p", {"Pragma": "no-cache"})
    assert cs_params(honoured)["fwd"] == "request"
    assert route.not_modified == 1


# ------------------------------------------------------------------------------ validation


async def test_stale_revalidation_304_updates_stored_headers(make_origin, make_edge) -> None:
    route = Validating(
        cc="max-age=1",
        extra={"Age": "5", "X-Version": "1"},  # stale on arrival
        not_modified_extra={"X-Version": "2", "Cache-Control": "max-age=60"},
    )
    _, edge = await setup(make_origin, make_edge, {"/v": route})
    first = await get(edge, "/v")
    assert first.header("x-version") == "1"
    revalidated = await get(edge, "/v")
    assert revalidated.status == 200 and revalidated.body == route.body
    assert revalidated.header("x-version") == "2"
    assert revalidated.header("cache-control") == "max-age=60"
    params = cs_params(revalidated)
    assert params["fwd"] == "stale" and params["fwd-status"] == "304"
    assert route.conditionals[1] == {
        "If-None-Match": '"v1"', "If-Modified-Since": LAST_MODIFIED
    }
    hit = await get(edge, "/v")
    assert cs_params(hit).get("hit") is True
    assert hit.header("x-version") == "2" and hit.body == route.body
    # the origin vouched for it just now: the old upstream Age no longer counts
    assert int(hit.header("age") or "99") <= 1
    assert route.full == 1 and route.not_modified == 1


async def test_304_that_forbids_storing_drops_the_stored_response(
    make_origin, make_edge
) -> None:
    route = Validating(
        cc="max-age=1",
        extra={"Age": "5"},  # stale on arrival
        not_modified_extra={"Cache-Control": "no-store"},
    )
    _, edge = await setup(make_origin, make_edge, {"/v": route})
    await get(edge, "/v")
    revalidated = await get(edge, "/v")
    assert revalidated.body == route.body and cs_params(revalidated)["fwd-status"] == "304"
    again = await get(edge, "/v")
    assert cs_params(again)["fwd"] == "uri-miss"  # nothing stored any more
    assert route.full == 2


async def test_pass_of_304_with_content_length_keeps_the_connection(make_edge) -> None:
    """RFC 9110 8.6: a 304 may carry the representation's Content-Length; no body follows."""

    async def not_modified(reader: Any, writer: Any, head: bytes) -> None:
        writer.write(raw_response(304, [("ETag", '"e"'), ("Content-Length", "1234")], b""))
        await writer.drain()

    extra = '[[domains.rules]]\nprefix = ["/api/"]\nttl = 0'
    async with raw_origin(not_modified) as origin:
        edge = await make_edge([origin.url], domain_extra=extra)
        request = f"GET /api/n HTTP/1.1\r\nHost: {HOST}\r\nIf-None-Match: \"e\"\r\n\r\n"
        both = await exchange(edge.port, request.encode() * 2, count=2)
        assert [r.status for r in both] == [304, 304]
        assert both[0].header("content-length") == "1234" and both[0].body == b""


async def test_204_carries_no_content_length(make_origin, make_edge) -> None:
    async def empty(req: web.Request) -> web.Response:
        return web.Response(status=204, headers={"Cache-Control": "max-age=60"})

    _, edge = await setup(make_origin, make_edge, {"/e": empty})
    miss = await get(edge, "/e")
    hit = await get(edge, "/e")
    assert miss.status == hit.status == 204 and cs_params(hit).get("hit") is True
    assert miss.header("content-length") is None and hit.header("content-length") is None


async def test_response_no_cache_is_revalidated_on_every_use(make_origin, make_edge) -> None:
    route = Validating(cc="no-cache, max-age=60")
    _, edge = await setup(make_origin, make_edge, {"/n": route})
    first = await get(edge, "/n")
    assert "stored" in cs_params(first)
    for _ in range(2):
        resp = await get(edge, "/n")
        assert resp.body == route.body
        params = cs_params(resp)
        assert params["fwd"] == "stale" and params["fwd-status"] == "304"
    assert route.full == 1 and route.not_modified == 2


async def test_no_store_request_revalidation_does_not_update_the_store(
    make_origin, make_edge
) -> None:
    route = Validating(
        cc="max-age=1",
        extra={"Age": "5", "X-Version": "1"},
        not_modified_extra={"X-Version": "2", "Cache-Control": "max-age=60"},
    )
    _, edge = await setup(make_origin, make_edge, {"/v": route})
    await get(edge, "/v")
    private = await get(edge, "/v", {"Cache-Control": "no-store"})
    assert private.body == route.body and private.header("x-version") == "2"
    later = await get(edge, "/v")
    assert "hit" not in cs_params(later)  # still the stale entry: revalidated again
    assert route.not_modified == 2


async def test_client_conditionals_answered_from_cache(make_origin, make_edge) -> None:
    route = Validating()
    _, edge = await setup(make_origin, make_edge, {"/c": route})
    await get(edge, "/c")
    inm = await get(edge, "/c", {"If-None-Match": '"v1"'})
    assert inm.status == 304 and inm.body == b"" and inm.header("etag") == '"v1"'
    assert inm.header("cache-status") is not None
    weak = await get(edge, "/c", {"If-None-Match": 'W/"v1", "zz"'})
    assert weak.status == 304
    other = await get(edge, "/c", {"If-None-Match": '"v0"'})
    assert other.status == 200 and other.body == route.body
    ims = await get(edge, "/c", {"If-Modified-Since": LAST_MODIFIED})
    assert ims.status == 304
    older = await get(edge, "/c", {"If-Modified-Since": "Sun, 01 Jan 2023 00:00:00 GMT"})
    assert older.status == 200 and older.body == route.body
    assert route.full == 1 and route.not_modified == 0


async def test_client_conditional_on_a_cold_object(make_origin, make_edge) -> None:
    """The fill fetches the whole object (no client validators forwarded); the client gets 304."""
    route = Validating()
    _, edge = await setup(make_origin, make_edge, {"/c": route})
    resp = await get(edge, "/c", {"If-None-Match": '"v1"'})
    assert resp.status == 304
    assert route.conditionals[0] == {}
    full = await get(edge, "/c")
    assert full.body == route.body and cs_params(full).get("hit") is True


async def test_conditional_against_a_stored_404_is_not_304(make_origin, make_edge) -> None:
    headers = {"Cache-Control": "max-age=60", "ETag": '"e"'}
    _, edge = await setup(make_origin, make_edge, {"/nf": fixed(b"nf", headers, 404)})
    await get(edge, "/nf")
    resp = await get(edge, "/nf", {"If-None-Match": '"e"'})
    assert resp.status == 404 and resp.body == b"nf"


# ------------------------------------------------------------------------------------ vary


async def echo_encoding(req: web.Request) -> web.Response:
    value = req.headers.get("Accept-Encoding", "-")
    return web.Response(
        body=f"enc:{value}".encode(),
        headers={"Cache-Control": "max-age=60", "Vary": "Accept-Encoding"},
    )


async def test_vary_variants(make_origin, make_edge) -> None:
    origin, edge = await setup(make_origin, make_edge, {"/v": echo_encoding})
    gz = await get(edge, "/v", {"Accept-Encoding": "gzip"})
    assert gz.body == b"enc:gzip" and cs_params(gz)["fwd"] == "uri-miss"
    br = await get(edge, "/v", {"Accept-Encoding": "br"})
    assert br.body == b"enc:br" and cs_params(br)["fwd"] == "vary-miss"
    gz2 = await get(edge, "/v", {"Accept-Encoding": "gzip"})
    assert gz2.body == b"enc:gzip" and cs_params(gz2).get("hit") is True
    both = await get(edge, "/v", {"Accept-Encoding": "gzip,br"})
    assert both.body == b"enc:gzip,br"
    spaced = await get(edge, "/v", {"Accept-Encoding": "gzip,  br"})
    assert spaced.body == b"enc:gzip,br" and cs_params(spaced).get("hit") is True
    none = await get(edge, "/v")
    assert none.body == b"enc:-" and cs_params(none)["fwd"] == "vary-miss"
    empty = await get(edge, "/v", {"Accept-Encoding": ""})
    assert empty.body == b"enc:" and cs_params(empty)["fwd"] == "vary-miss"
    assert origin.hits["/v"] == 5


async def test_vary_star_never_served_from_cache(make_origin, make_edge) -> None:
    headers = {"Cache-Control": "max-age=60", "Vary": "*"}
    origin, edge = await setup(make_origin, make_edge, {"/s": fixed(b"s", headers)})
    for _ in range(3):
        resp = await get(edge, "/s")
        assert resp.body == b"s" and "stored" not in cs_params(resp)
    assert origin.hits["/s"] == 3


# ---------------------------------------------------------------------------- invalidation


def invalidating_origin(unsafe_status: int, location: str, content_location: str) -> Any:
    async def doc(req: web.Request) -> web.Response:
        if req.method == "GET":
            return web.Response(body=b"doc", headers={"Cache-Control": "max-age=60"})
        headers = {"Location": location, "Content-Location": content_location}
        return web.Response(body=b"done", status=unsafe_status, headers=headers)

    return doc


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_unsafe_method_invalidates(make_origin, make_edge, method) -> None:
    cached = fixed(b"c", {"Cache-Control": "max-age=60"})
    routes = {
        "/doc": invalidating_origin(201, "/loc?x=1#frag", f"http://{HOST.upper()}/cl"),
        "/loc": cached, "/cl": cached, "/foreign": cached,
    }
    _, edge = await setup(make_origin, make_edge, routes)
    for target in ("/doc", "/loc?x=1", "/cl", "/foreign"):
        await get(edge, target)
    resp = await get(edge, "/doc", method=method)
    assert resp.status == 201 and resp.body == b"done"
    assert cs_params(resp)["fwd"] == "method"
    for target in ("/doc", "/loc?x=1", "/cl"):
        assert cs_params(await get(edge, target))["fwd"] == "uri-miss", target
    assert cs_params(await get(edge, "/foreign")).get("hit") is True


async def test_invalidation_only_same_host_and_not_on_error(make_origin, make_edge) -> None:
    cached = fixed(b"c", {"Cache-Control": "max-age=60"})
    routes = {
        "/ok": invalidating_origin(200, "http://other.example.test/x", "//other.example.test/y"),
        "/bad": invalidating_origin(500, "/x", "/y"),
        "/x": cached, "/y": cached,
    }
    _, edge = await setup(make_origin, make_edge, routes)
    for target in ("/ok", "/bad", "/x", "/y"):
        await get(edge, target)
    await get(edge, "/ok", method="POST")
    assert cs_params(await get(edge, "/x")).get("hit") is True
    assert cs_params(await get(edge, "/y")).get("hit") is True
    await get(edge, "/bad", method="DELETE")
    for target in ("/bad", "/x", "/y"):
        assert cs_params(await get(edge, target)).get("hit") is True, target


# ------------------------------------------------------------------------------ stale-*


async def test_stale_while_revalidate_one_background_fetch(make_origin, make_edge) -> None:
    calls = 0

    async def swr(req: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            headers = {"Cache-Control": "max-age=1, stale-while-revalidate=60", "Age": "3"}
            return web.Response(body=b"old", headers=headers)
        await asyncio.sleep(0.5)
        return web.Response(body=b"new", headers={"Cache-Control": "max-age=60"})

    _, edge = await setup(make_origin, make_edge, {"/w": swr})
    await get(edge, "/w")
    resps = await asyncio.gather(*(get(edge, "/w") for _ in range(20)))
    for resp in resps:  # nobody waited for the revalidation, which takes 0.5 s
        assert resp.body == b"old"
        assert cs_params(resp)["detail"] == "stale-while-revalidate"
    assert calls == 2
    for _ in range(100):
        fresh = await get(edge, "/w")
        if fresh.body == b"new":
            break
        await asyncio.sleep(0.02)
    assert fresh.body == b"new" and cs_params(fresh).get("hit") is True
    assert calls == 2


STALE_OK = {"Cache-Control": "max-age=1, stale-if-error=60", "Age": "3", "ETag": '"s"'}


@pytest.mark.parametrize("failure", [500, 503, "down"])
async def test_stale_if_error(make_origin, make_edge, failure) -> None:
    code = failure if isinstance(failure, int) else 200
    route = sequence((200, STALE_OK, b"good"), (code, {}, b"bad"))
    origin, edge = await setup(make_origin, make_edge, {"/s": route})
    await get(edge, "/s")
    if failure == "down":
        await origin.server.close()
    resp = await get(edge, "/s")
    assert resp.status == 200 and resp.body == b"good"
    params = cs_params(resp)
    assert params["detail"] == "stale-if-error" and params["fwd"] == "stale"
    if isinstance(failure, int):
        assert params["fwd-status"] == str(failure)


@pytest.mark.parametrize(
    "cc",
    [
        "max-age=1, stale-if-error=60, must-revalidate",
        "max-age=1, stale-if-error=60, proxy-revalidate",
        "s-maxage=1, stale-if-error=60",
        "no-cache, stale-if-error=60",
    ],
)
@pytest.mark.parametrize("failure", [503, "down"])
async def test_never_stale_against_revalidation_directives(
    make_origin, make_edge, cc, failure
) -> None:
    headers = {"Cache-Control": cc, "Age": "3", "ETag": '"s"'}
    code = failure if isinstance(failure, int) else 200
    route = sequence((200, headers, b"good"), (code, {}, b"bad"))
    origin, edge = await setup(make_origin, make_edge, {"/s": route})
    first = await get(edge, "/s")
    assert "stored" in cs_params(first)
    if failure == "down":
        await origin.server.close()
    resp = await get(edge, "/s")
    assert resp.status == (503 if failure == 503 else 502)
    assert resp.body != b"good"


async def test_stale_while_revalidate_not_with_must_revalidate(make_origin, make_edge) -> None:
    headers = {"Cache-Control": "max-age=1, stale-while-revalidate=60, must-revalidate", "Age": "3"}
    route = sequence((200, headers, b"old"), (200, {"Cache-Control": "max-age=60"}, b"new"))
    _, edge = await setup(make_origin, make_edge, {"/s": route})
    await get(edge, "/s")
    resp = await get(edge, "/s")
    assert resp.body == b"new" and cs_params(resp)["fwd"] == "stale"


# ----------------------------------------------------------------------- CDN-Cache-Control


async def test_cdn_cache_control_overrides_and_is_not_forwarded(make_origin, make_edge) -> None:
    routes = {
        "/yes": fixed(b"y", {"CDN-Cache-Control": "max-age=60", "Cache-Control": "no-store"}),
        "/no": fixed(b"n", {"CDN-Cache-Control": "no-store", "Cache-Control": "max-age=60"}),
    }
    origin, edge = await setup(make_origin, make_edge, routes)
    for _ in range(2):
        yes = await get(edge, "/yes")
        assert yes.header("cache-control") == "no-store"
        assert yes.header("cdn-cache-control") is None
        no = await get(edge, "/no")
        assert no.header("cdn-cache-control") is None
        assert no.header("cache-control") == "max-age=60"
    assert cs_params(yes).get("hit") is True and ttl_of(yes) >= 58
    assert origin.hits == {"/yes": 1, "/no": 2}


# --------------------------------------------------------------------------- Cache-Status


async def test_cache_status_values(make_origin, make_edge) -> None:
    routes = {
        "/c": fixed(b"c", {"Cache-Control": "max-age=60"}),
        "/p": fixed(b"p", {"Cache-Control": "private"}),
        "/nocache/x": fixed(b"x", {"Cache-Control": "max-age=60"}),
    }
    extra = '[[domains.rules]]\nprefix = ["/nocache/"]\nttl = 0\n'
    _, edge = await setup(make_origin, make_edge, routes, domain_extra=extra)
    miss = await get(edge, "/c")
    # Age + ttl is the lifetime (Age may be 1 s already: Date has whole seconds)
    age = int(miss.header("age") or "0")
    assert status_of(miss) == f"cdn-edge; fwd=uri-miss; fwd-status=200; stored; ttl={60 - age}"
    hit = await get(edge, "/c")
    age = int(hit.header("age") or "-1")
    assert status_of(hit) == f"cdn-edge; hit; ttl={60 - age}"
    first_private = await get(edge, "/p")
    assert status_of(first_private) == "cdn-edge; fwd=uri-miss; fwd-status=200"
    second_private = await get(edge, "/p")  # remembered as uncacheable (hit-for-miss)
    assert status_of(second_private) == "cdn-edge; fwd=miss; fwd-status=200"
    bypass = await get(edge, "/nocache/x")
    assert status_of(bypass) == "cdn-edge; fwd=bypass; fwd-status=200"
    post = await get(edge, "/c", method="POST")
    assert status_of(post) == "cdn-edge; fwd=method; fwd-status=200"


# ------------------------------------------------------------------------------------ HEAD

COMPARED = ("content-length", "content-type", "etag", "cache-control", "last-modified", "via")


async def test_head_answered_from_stored_get(make_origin, make_edge) -> None:
    route = Validating(body=b"z" * 5000)
    _, edge = await setup(make_origin, make_edge, {"/h": route})
    full = await get(edge, "/h")
    data = (
        f"HEAD /h HTTP/1.1\r\nHost: {HOST}\r\n\r\nGET /h HTTP/1.1\r\nHost: {HOST}\r\n\r\n"
    ).encode()
    head, after = await exchange(edge.port, data, count=2, methods=["HEAD", "GET"])
    assert head.status == 200 and head.body == b""
    for name in COMPARED:
        assert head.header(name) == full.header(name), name
    assert cs_params(head).get("hit") is True
    assert after.body == route.body  # no stray body bytes after the HEAD response
    assert route.full == 1


async def test_head_on_a_cold_object_fills_it(make_origin, make_edge) -> None:
    seen: list[str] = []

    async def obj(req: web.Request) -> web.Response:
        seen.append(req.method)
        return web.Response(body=b"q" * 3000, headers={"Cache-Control": "max-age=60"})

    _, edge = await setup(make_origin, make_edge, {"/h": obj})
    data = (
        f"HEAD /h HTTP/1.1\r\nHost: {HOST}\r\n\r\nGET /h HTTP/1.1\r\nHost: {HOST}\r\n\r\n"
    ).encode()
    head, after = await exchange(edge.port, data, count=2, methods=["HEAD", "GET"])
    assert head.status == 200 and head.body == b"" and head.header("content-length") == "3000"
    assert after.body == b"q" * 3000 and cs_params(after).get("hit") is True
    assert seen == ["GET"]


# ----------------------------------------------------------------------------------- rules

RULES = """
[[domains.rules]]
suffix = [".jpg"]
ttl = "1h"
respect_origin = false

[[domains.rules]]
prefix = ["/api/"]
ttl = 0

[[domains.rules]]
path = ["/robots.txt"]
ttl = "2m"

[[domains.rules]]
suffix = [".css"]
ttl = "5m"
"""


async def test_rules(make_origin, make_edge) -> None:
    routes = {
        "/img/a.JPG": fixed(b"a", {"Cache-Control": "private, max-age=5"}),
        "/img/cookie.jpg": fixed(b"k", {"Set-Cookie": "s=1"}),
        "/api/x": fixed(b"x", {"Cache-Control": "max-age=60"}),
        "/robots.txt": fixed(b"r"),
        "/s.css": fixed(b"s", {"Cache-Control": "max-age=5"}),
        "/t.css": fixed(b"t"),
        "/u.css": fixed(b"u", {"Cache-Control": "no-store"}),
    }
    origin, edge = await setup(make_origin, make_edge, routes, domain_extra=RULES)
    expect = {  # path: (ttl of the stored response or None, origin hits after two requests)
        "/img/a.JPG": (3600, 1),  # respect_origin = false overrides private and max-age
        "/img/cookie.jpg": (None, 2),  # ... but not Set-Cookie
        "/api/x": (None, 2),  # ttl 0: bypass
        "/robots.txt": (120, 1),  # the origin says nothing: the rule's ttl
        "/s.css": (5, 1),  # respect_origin: the origin's max-age wins
        "/t.css": (300, 1),
        "/u.css": (None, 2),  # respect_origin: no-store holds
    }
    for path, (ttl, hits) in expect.items():
        first = await get(edge, path)
        second = await get(edge, path)
        assert first.status == second.status == 200
        if ttl is None:
            assert "stored" not in cs_params(first), path
        else:
            assert ttl - 1 <= ttl_of(first) <= ttl, path
            assert cs_params(second).get("hit") is True, path
        assert origin.hits[path] == hits, path
    assert cs_params(await get(edge, "/api/x"))["fwd"] == "bypass"


async def test_rules_and_keys_see_escaped_unreserved_characters_decoded(
    make_origin, make_edge
) -> None:
    routes = {
        "/api/x": fixed(b"x", {"Cache-Control": "max-age=60"}),
        "/img/a.jpg": fixed(b"a", {"Cache-Control": "max-age=60"}),
    }
    origin, edge = await setup(make_origin, make_edge, routes, domain_extra=RULES)
    # "/%61pi/" is "/api/": the bypass rule applies, and the origin gets the bytes as sent.
    resp = await get(edge, "/%61pi/x")
    assert resp.status == 200 and cs_params(resp)["fwd"] == "bypass"
    assert origin.requests[-1].raw_path == "/%61pi/x"
    # One stored object for both spellings.
    await get(edge, "/img/a.jpg")
    again = await get(edge, "/img/%61.jpg")
    assert again.body == b"a" and cs_params(again).get("hit") is True
    assert origin.hits["/img/a.jpg"] == 1


def query_echo() -> Any:
    async def handler(req: web.Request) -> web.Response:
        return web.Response(
            body=req.raw_path.encode(), headers={"Cache-Control": "max-age=60"}
        )

    return handler


@pytest.mark.parametrize(
    ("query", "same", "different"),
    [
        pytest.param("", ["/q?a=1&b=2"], ["/q?b=2&a=1", "/q"], id="keep_all"),
        pytest.param(
            'query = { mode = "ignore_all" }', ["/q?a=1", "/q?a=2", "/q"], [], id="ignore_all"
        ),
        pytest.param(
            'query = { mode = "keep", params = ["a"] }',
            ["/q?a=1&utm=x", "/q?utm=y&a=1", "/q?a=1"], ["/q?a=2", "/q"], id="keep",
        ),
        pytest.param(
            'query = { mode = "drop", params = ["utm"] }',
            ["/q?a=1&utm=x", "/q?utm=y&a=1", "/q?a=1"], ["/q?a=1&b=2", "/q?utm=1"], id="drop",
        ),
    ],
)
async def test_query_handling(make_origin, make_edge, query, same, different) -> None:
    origin, edge = await setup(
        make_origin, make_edge, {"/q": query_echo()}, domain_extra=query
    )
    start = "/q?a=1&b=2" if query == "" else same[0]
    first = await get(edge, start)
    assert first.body == start.encode()  # the origin gets the client's query as sent
    for target in same:
        resp = await get(edge, target)
        assert resp.body == start.encode(), target
    for target in different:
        resp = await get(edge, target)
        assert resp.body == target.encode(), target
    assert origin.hits["/q"] == 1 + len(different)


@pytest.mark.parametrize("target", ["/q?x=%41", "/a/../b", "/p%2Fq?y=%7e&z", "/q?a=1&&a=1"])
async def test_request_target_bytes_reach_origin_unchanged(make_origin, make_edge, target) -> None:
    async def echo(req: web.Request) -> web.Response:
        return web.Response(body=req.raw_path.encode(), headers={"Cache-Control": "max-age=60"})

    origin_echo = {"/q": echo, "/a/../b": echo, "/b": echo, "/p/q": echo, "/p%2Fq": echo}
    origin = await make_origin(origin_echo)
    edge = await make_edge([origin.url])
    resp = await get(edge, target)
    assert resp.status == 200 and resp.body == target.encode()


# ----------------------------------------------------------------------------------- proxy


async def test_forwarding_headers(make_origin, make_edge) -> None:
    async def echo(req: web.Request) -> web.Response:
        return web.Response(body=b"ok", headers={"Via": "1.1 origin-lb"})

    origin, edge = await setup(make_origin, make_edge, {"/f": echo, "/g": echo})
    await get(edge, "/f", {"X-Forwarded-For": "10.1.1.1", "Via": "1.0 client-proxy"})
    resp = await get(edge, "/g")
    first, second = origin.requests
    assert first.headers["X-Forwarded-For"] == "10.1.1.1, 127.0.0.1"
    assert first.headers["Via"] == "1.0 client-proxy, 1.1 cdn-edge"
    assert second.headers["X-Forwarded-For"] == "127.0.0.1"
    assert second.headers["Via"] == "1.1 cdn-edge"
    assert second.headers["Host"] == HOST
    assert "User-Agent" not in second.headers and "Accept-Encoding" not in second.headers
    assert resp.header("via") == "1.1 origin-lb, 1.1 cdn-edge"


async def test_date_added_when_the_origin_sends_none(make_edge) -> None:
    async def answer(reader: Any, writer: Any, head: bytes) -> None:
        writer.write(raw_response(200, [("Cache-Control", "max-age=60"),
                                        ("Content-Length", "2")], b"ok"))

    async with raw_origin(answer) as origin:
        edge = await make_edge([origin.url])
        for method in ("GET", "GET", "POST"):  # miss, hit, pass
            resp = await get(edge, "/d", method=method)
            assert resp.status == 200 and resp.body == b"ok"
            date = resp.header("date")
            assert date is not None and abs(
                time.time() - (policy.parse_http_date(date) or 0)
            ) < 5, method


async def test_origin_host(make_origin, make_edge) -> None:
    origin, edge = await setup(
        make_origin, make_edge, {"/h": fixed()},
        domain_extra='origin_host = "origin.internal.test:8443"',
    )
    await get(edge, "/h")
    assert origin.requests[0].headers["Host"] == "origin.internal.test:8443"


async def test_hop_by_hop_removed_both_ways(make_edge) -> None:
    async def answer(reader: Any, writer: Any, head: bytes) -> None:
        writer.write(raw_response(
            200,
            [
                ("Connection", "X-Private, keep-alive"), ("X-Private", "secret"),
                ("Keep-Alive", "timeout=5"), ("Proxy-Connection", "keep-alive"),
                ("Upgrade", "h2c"), ("Cache-Control", "max-age=60"), ("X-Kept", "1"),
                ("Content-Length", "2"),
            ],
            b"ok",
        ))

    async with raw_origin(answer) as origin:
        edge = await make_edge([origin.url])
        data = (
            f"GET /h HTTP/1.1\r\nHost: {HOST}\r\nConnection: keep-alive, X-Mine\r\n"
            "X-Mine: 1\r\nKeep-Alive: 300\r\nTE: trailers\r\nUpgrade: websocket\r\n"
            "Proxy-Connection: keep-alive\r\nX-Other: 2\r\n\r\n"
        ).encode()
        for _ in range(2):  # miss, then hit
            resp = await send_raw(edge.port, data)
            assert resp.body == b"ok" and resp.header("x-kept") == "1"
            for name in ("x-private", "keep-alive", "proxy-connection", "upgrade"):
                assert resp.header(name) is None, name
            assert "x-private" not in (resp.header("connection") or "").lower()
        sent = origin.heads[0].lower()
        assert b"x-other: 2" in sent
        for name in (b"x-mine", b"keep-alive", b"te:", b"upgrade", b"proxy-connection"):
            assert name not in sent, name
        assert origin.hits == 1


async def test_redirect_not_followed(make_origin, make_edge) -> None:
    routes = {
        "/r": fixed(b"", {"Location": "/target"}, status=302),
        "/target": fixed(b"target"),
    }
    origin, edge = await setup(make_origin, make_edge, routes)
    resp = await get(edge, "/r")
    assert resp.status == 302 and resp.header("location") == "/target"
    assert "/target" not in origin.hits


async def test_no_cookie_replay_across_users(make_origin, make_edge) -> None:
    async def login(req: web.Request) -> web.Response:
        resp = web.Response(body=b"welcome")
        resp.set_cookie("sid", "user-a-secret")
        return resp

    origin, edge = await setup(make_origin, make_edge, {"/login": login, "/page": fixed()})
    a = await get(edge, "/login")
    assert "sid=user-a-secret" in (a.header("set-cookie") or "")
    await get(edge, "/page")  # user B, no cookie of its own
    await get(edge, "/page", {"Cookie": "sid=user-b"}, method="POST")
    assert "Cookie" not in origin.requests[1].headers
    assert origin.requests[2].headers["Cookie"] == "sid=user-b"


async def test_content_encoding_and_bytes_untouched(make_origin, make_edge) -> None:
    packed = gzip.compress(b"hello world " * 500)
    headers = {"Content-Encoding": "gzip", "Cache-Control": "max-age=60", "Vary": "Accept-Encoding"}
    origin, edge = await setup(make_origin, make_edge, {"/z": fixed(packed, headers)})
    for _ in range(2):
        resp = await get(edge, "/z", {"Accept-Encoding": "gzip"})
        assert resp.body == packed and resp.header("content-encoding") == "gzip"
    assert origin.hits["/z"] == 1
    assert origin.requests[0].headers["Accept-Encoding"] == "gzip"


async def test_failover_to_second_origin(make_origin, make_edge) -> None:
    origin = await make_origin({"/f": fixed(b"second")})
    edge = await make_edge([closed_port_url(), origin.url])
    resp = await get(edge, "/f")
    assert resp.status == 200 and resp.body == b"second"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_other_methods_forwarded_with_bodies_never_cached(
    make_origin, make_edge, method
) -> None:
    async def echo(req: web.Request) -> web.Response:
        body = await req.read()
        return web.Response(
            body=req.method.encode() + b":" + body, headers={"Cache-Control": "max-age=60"}
        )

    origin, edge = await setup(make_origin, make_edge, {"/m": echo})
    payload = b"p" * 100_000
    for i in range(2):
        data = (
            f"{method} /m HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(payload)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode() + payload
        resp = await send_raw(edge.port, data)
        assert resp.status == 200 and resp.body == method.encode() + b":" + payload
        assert cs_params(resp)["fwd"] == "method"
        chunked = (
            f"{method} /m HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n"
            "Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        ).encode()
        resp = await send_raw(edge.port, chunked)
        assert resp.body == method.encode() + b":hello world", i
    assert origin.hits["/m"] == 4
    assert cs_params(await get(edge, "/m"))["fwd"] == "uri-miss"


async def test_unknown_method_forwarded_and_invalidates(make_origin, make_edge) -> None:
    """aiohttp's server refuses unknown methods, so this origin is a raw socket."""

    async def answer(reader: Any, writer: Any, head: bytes) -> None:
        if head.startswith(b"BREW "):
            writer.write(raw_response(200, [("Content-Length", "6")], b"brewed"))
        else:
            writer.write(raw_response(
                200, [("Cache-Control", "max-age=60"), ("Content-Length", "3")], b"pot"
            ))

    async with raw_origin(answer) as origin:
        edge = await make_edge([origin.url])
        await get(edge, "/pot")
        assert cs_params(await get(edge, "/pot")).get("hit") is True
        data = (
            f"BREW /pot HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 4\r\n"
            "Connection: close\r\n\r\ntea!"
        ).encode()
        resp = await send_raw(edge.port, data)
        assert resp.status == 200 and resp.body == b"brewed"
        assert cs_params(resp)["fwd"] == "method"
        assert cs_params(await get(edge, "/pot"))["fwd"] == "uri-miss"
        assert origin.heads[1].startswith(b"BREW /pot HTTP/1.1\r\n")
        assert origin.bodies[1] == b"tea!"


# ----------------------------------------------------------------------------------- range

RANGE_BODY = bytes(range(256)) * 4  # 1024 bytes
NO_SLICES = "[cache]\nslice = 0\n"
RANGE_HEADERS = {"Cache-Control": "max-age=60", "ETag": '"r1"', "Last-Modified": LAST_MODIFIED}


@pytest.mark.parametrize(
    ("headers", "status", "part", "content_range"),
    [
        ({"Range": "bytes=0-9"}, 206, RANGE_BODY[:10], "bytes 0-9/1024"),
        ({"Range": "bytes=-5"}, 206, RANGE_BODY[-5:], "bytes 1019-1023/1024"),
        ({"Range": "bytes=1000-"}, 206, RANGE_BODY[1000:], "bytes 1000-1023/1024"),
        ({"Range": "bytes=1000-5000"}, 206, RANGE_BODY[1000:], "bytes 1000-1023/1024"),
        ({"Range": "bytes=2000-"}, 416, None, "bytes */1024"),
        ({"Range": "bytes=0-5, 3-9"}, 206, RANGE_BODY[:10], "bytes 0-9/1024"),  # merged
        ({"Range": ",".join(f"{i}-{i}" for i in range(0, 200, 2))}, 200, RANGE_BODY, None),
        ({"Range": "items=0-1"}, 200, RANGE_BODY, None),
        ({"Range": "bytes=5-1"}, 200, RANGE_BODY, None),
        ({"Range": "bytes=0-9", "If-Range": '"r1"'}, 206, RANGE_BODY[:10], "bytes 0-9/1024"),
        ({"Range": "bytes=0-9", "If-Range": '"r0"'}, 200, RANGE_BODY, None),
        ({"Range": "bytes=0-9", "If-Range": 'W/"r1"'}, 200, RANGE_BODY, None),
        ({"Range": "bytes=0-9", "If-Range": LAST_MODIFIED}, 206, RANGE_BODY[:10],
         "bytes 0-9/1024"),
        ({"Range": "bytes=0-9", "If-Range": "Tue, 02 Jan 2024 00:00:00 GMT"}, 200, RANGE_BODY,
         None),
        ({"Range": "bytes=2000-", "If-Range": '"r0"'}, 200, RANGE_BODY, None),
        ({"Range": "bytes=\u00b2-"}, 200, RANGE_BODY, None),  # a latin-1 "²" is no digit
    ],
)
async def test_range_on_stored_object(
    make_origin, make_edge, headers, status, part, content_range
) -> None:
    origin, edge = await setup(
        make_origin, make_edge, {"/r": fixed(RANGE_BODY, RANGE_HEADERS)}
    )
    await get(edge, "/r")
    resp = await get(edge, "/r", headers)
    assert resp.status == status
    assert resp.header("content-range") == content_range
    assert resp.header("cache-status") is not None
    if part is not None:
        assert resp.body == part
        assert resp.header("content-length") == str(len(part))
        assert resp.header("etag") == '"r1"'
    else:
        assert b"Traceback" not in resp.body
    assert origin.hits["/r"] == 1


async def test_several_ranges_of_a_stored_object_are_multipart_byteranges(
    make_origin, make_edge
) -> None:
    headers = {**RANGE_HEADERS, "Content-Type": "video/mp4"}
    _, edge = await setup(make_origin, make_edge, {"/r": fixed(RANGE_BODY, headers)})
    await get(edge, "/r")
    resp = await get(edge, "/r", {"Range": "bytes=0-1, 1000-, -2"})
    assert resp.status == 206 and resp.header("content-range") is None
    content_type = resp.header("content-type") or ""
    assert content_type.startswith("multipart/byteranges; boundary=")
    boundary = content_type.split("boundary=")[1].encode()
    assert resp.header("content-length") == str(len(resp.body))
    # RFC 9110 14.6: each part names its range; "1000-" and "-2" overlap and are merged.
    chunks = resp.body.split(b"--" + boundary)
    assert chunks[-1] == b"--\r\n"
    parts = chunks[1:-1]
    assert len(parts) == 2
    heads = [p.split(b"\r\n\r\n", 1) for p in parts]
    assert b"Content-Range: bytes 0-1/1024" in heads[0][0]
    assert b"Content-Type: video/mp4" in heads[0][0]
    assert heads[0][1] == RANGE_BODY[:2] + b"\r\n"
    assert b"Content-Range: bytes 1000-1023/1024" in heads[1][0]
    assert heads[1][1] == RANGE_BODY[1000:] + b"\r\n"


async def test_range_on_a_cold_object_while_it_fills(make_origin, make_edge) -> None:
    body = bytes(range(256)) * 1024  # 256 KiB

    async def slow(req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=60", "ETag": '"big"'})
        resp.content_length = len(body)
        await resp.prepare(req)
        for i in range(0, len(body), 65536):
            await resp.write(body[i : i + 65536])
            await asyncio.sleep(0.05)
        return resp

    # Whole-object fills (no slices): ranges are cut from the fill as it arrives.
    origin, edge = await setup(make_origin, make_edge, {"/big": slow}, top_extra=NO_SLICES)
    cold, tail, whole = await asyncio.gather(
        get(edge, "/big", {"Range": "bytes=100-199"}),
        get(edge, "/big", {"Range": "bytes=-1000"}),
        get(edge, "/big"),
    )
    assert cold.status == 206 and cold.body == body[100:200]
    assert cold.header("content-range") == f"bytes 100-199/{len(body)}"
    assert tail.status == 206 and tail.body == body[-1000:]
    assert whole.status == 200 and whole.body == body
    assert origin.hits["/big"] == 1
    assert "Range" not in origin.requests[0].headers
    odd = await get(edge, "/other", {"Range": "bytes=\u00b2-"})
    assert odd.status == 404 and odd.body == b"no such route\n"
    hit = await get(edge, "/big", {"Range": "bytes=10-19"})
    assert hit.status == 206 and hit.body == body[10:20] and cs_params(hit).get("hit") is True


# ----------------------------------------------------------------------------- memory tier

SMALL_CACHE = '[cache]\nmemory = "64KiB"\nmemory_max_object = "16KiB"\ndisk = 0\n'


async def test_memory_budget_and_lru_eviction(make_origin, make_edge) -> None:
    body = b"m" * 10_500  # five fit in 64 KiB with their overhead, six do not
    routes = {f"/o{i}": fixed(body, {"Cache-Control": "max-age=60"}) for i in range(8)}
    _, edge = await setup(make_origin, make_edge, routes, top_extra=SMALL_CACHE)
    for i in range(5):
        await get(edge, f"/o{i}")
    assert cs_params(await get(edge, "/o0")).get("hit") is True  # o0 is now most recent
    await get(edge, "/o5")  # evicts the least recently used: o1
    assert cs_params(await get(edge, "/o0")).get("hit") is True
    assert cs_params(await get(edge, "/o1"))["fwd"] == "uri-miss"
    for i in range(6, 8):
        await get(edge, f"/o{i}")
    m = await metrics(edge)
    assert m["cdn_edge_memory_tier_evictions_total"] >= 3
    assert 0 < m["cdn_edge_memory_tier_bytes"] <= 64 * 1024
    assert m["cdn_edge_memory_tier_budget_bytes"] == 64 * 1024


async def test_objects_over_max_object_pass_through_unstored(make_origin, make_edge) -> None:
    big = bytes(range(256)) * 128  # 32 KiB

    async def chunked(req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=60"})
        await resp.prepare(req)
        for i in range(0, len(big), 4096):
            await resp.write(big[i : i + 4096])
        return resp

    routes = {"/big": fixed(big, {"Cache-Control": "max-age=60"}), "/chunked": chunked}
    origin, edge = await setup(make_origin, make_edge, routes, top_extra=SMALL_CACHE)
    for path in ("/big", "/chunked"):
        for _ in range(2):
            resp = await get(edge, path)
            assert resp.status == 200 and resp.body == big
            # a chunked response is announced "stored" before its size is known
            assert path == "/chunked" or "stored" not in cs_params(resp)
        assert origin.hits[path] == 2, path
    m = await metrics(edge)
    assert m['cdn_edge_not_stored_total{reason="too-big"}'] == 4


# ------------------------------------------------------------------------------ admin


async def test_metrics_and_health(make_origin, make_edge) -> None:
    _, edge = await setup(
        make_origin, make_edge, {"/c": fixed(b"c" * 100, {"Cache-Control": "max-age=60"})}
    )
    await get(edge, "/c")
    await get(edge, "/c")
    await get(edge, "/other", method="POST")
    await get(edge, "/c", host="unknown.test")
    m = await metrics(edge)
    assert m['cdn_edge_requests_total{cache="hit"}'] == 1
    assert m['cdn_edge_requests_total{cache="uri-miss"}'] == 1
    assert m['cdn_edge_requests_total{cache="method"}'] == 1
    assert m['cdn_edge_requests_total{cache="refused"}'] == 1
    assert m["cdn_edge_origin_fetches_total"] == 2
    assert m["cdn_edge_sent_body_bytes_total"] >= 200
    assert m["cdn_edge_sent_bytes_total"] > m["cdn_edge_sent_body_bytes_total"]
    assert m["cdn_edge_coalesced_waits_total"] == 0
    assert m["cdn_edge_memory_tier_bytes"] > 100
    assert m["cdn_edge_memory_tier_objects"] == 1
    assert "cdn_edge_memory_tier_evictions_total" in m
    for path in ("/healthz", "/readyz"):
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.worker.admin_port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
        line = await reader.readline()
        writer.close()
        assert line.startswith(b"HTTP/1.1 200"), path


async def test_large_stored_body_is_streamed_intact(make_origin, make_edge) -> None:
    """Bodies over 1 MiB leave the cache in flow-controlled chunks: same bytes, ranges, HEAD."""
    big = bytes(range(256)) * (6 * 4096)  # 6 MiB

    async def large(req: web.Request) -> web.Response:
        return web.Response(body=big, headers={"Cache-Control": "max-age=60", "ETag": '"L"'})

    origin, edge = await setup(make_origin, make_edge, {"/big.bin": large})
    first = await get(edge, "/big.bin")
    hit = await get(edge, "/big.bin")
    assert first.body == hit.body == big and cs_params(hit).get("hit") is True
    part = await get(edge, "/big.bin", {"Range": "bytes=1048576-3145727"})
    assert part.status == 206 and part.body == big[1048576:3145728]
    assert part.header("content-range") == f"bytes 1048576-3145727/{len(big)}"
    head = await get(edge, "/big.bin", method="HEAD")
    assert head.body == b"" and head.header("content-length") == str(len(big))
    assert origin.hits["/big.bin"] == 1
    assert edge.stats.body_bytes_sent == 2 * len(big) + 2097152
