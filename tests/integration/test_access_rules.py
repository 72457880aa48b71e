"""Access rules through a real edge (issue 7): signed URLs A-D, referer, client IP (and the
trusted-proxy rule), user agent, rate limit, speed limit; the order of the checks with the
domain's state and URL blocks; bounded rate-limit memory under a flood of addresses."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.integration.conftest import HOST, Edge, EdgeFactory, Origin
from tests.integration.edgetest import cs_params, fixed, get
from tests.integration.test_control_enforce import (  # noqa: F401 - the fixture
    ControlEdgeFactory,
    domain,
    make_control_edge,
)
from tests.integration.test_control_follow import ControlledEdge
from tests.integration.test_usage_e2e import ADMIN, Plane
from tests.rawhttp import RawResponse, exchange

KEY = "primary-key-1"
SECONDARY = "secondary-key-2"
CACHEABLE = {"Cache-Control": "max-age=600"}


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def sign_a(path: str, key: str = KEY, ts: int | None = None, rand: str = "0") -> str:
    ts = int(time.time()) if ts is None else ts
    return f"{path}?auth_key={ts}-{rand}-0-{md5(f'{path}-{ts}-{rand}-0-{key}')}"


def sign_b(path: str, key: str = KEY, at: float | None = None) -> str:
    minute = datetime.fromtimestamp(
        time.time() if at is None else at, timezone(timedelta(hours=8))
    ).strftime("%Y%m%d%H%M")
    return f"/{minute}/{md5(key + minute + path)}{path}"


def sign_c(path: str, key: str = KEY, ts: int | None = None) -> str:
    hex_time = f"{int(time.time()) if ts is None else ts:X}"
    return f"/{md5(key + path + hex_time)}/{hex_time}{path}"


def sign_d(path: str, key: str = KEY, ts: int | None = None, query: str = "") -> str:
    t = str(int(time.time()) if ts is None else ts)
    return f"{path}?{query}{'&' if query else ''}sign={md5(key + path + t)}&t={t}"


def signed_domain(kind: str, extra: str = "") -> str:
    return f"""
[domains.access.signed_url]
type = "{kind}"
key = "{KEY}"
secondary_key = "{SECONDARY}"
{extra}
"""


def echo() -> Any:
    """A cacheable route answering the path and query the origin received."""

    async def handler(req: web.Request) -> web.StreamResponse:
        return web.Response(text=f"{req.path_qs}\n", headers=CACHEABLE)

    return handler


async def origin_with(make_origin: Any, *paths: str) -> Origin:
    return await make_origin({p: echo() for p in paths})  # type: ignore[no-any-return]


def refused(resp: RawResponse, status: int, reason: str) -> None:
    assert resp.status == status, (resp.status, resp.body)
    assert resp.body == f"{reason}\n".encode(), resp.body
    assert resp.header("cache-control") == "no-store"


# --- signed URLs -------------------------------------------------------------------------------


async def test_type_a_hits_one_entry_and_hides_the_signature(
    make_origin: Any, make_edge: EdgeFactory
) -> None:
    origin = await origin_with(make_origin, "/v/a.mp4")
    edge = await make_edge([origin.url], domain_extra=signed_domain("A"))
    first = await get(edge, sign_a("/v/a.mp4"))
    assert first.status == 200 and first.body == b"/v/a.mp4\n"  # no auth_key at the origin
    # Another signature (other rand, the secondary key) for the same object: the same entry.
    again = await get(edge, sign_a("/v/a.mp4", SECONDARY, rand="77"))
    assert again.status == 200 and cs_params(again).get("hit") is True
    assert origin.hits == {"/v/a.mp4": 1}
    assert all("auth_key" not in r.query_string for r in origin.requests)

    refused(await get(edge, "/v/a.mp4"), 403, "forbidden: missing signature")
    refused(await get(edge, sign_a("/v/a.mp4", "wrong")), 403, "forbidden: bad signature")
    refused(await get(edge, sign_a("/v/b.mp4").replace("/v/b", "/v/a")), 403,
            "forbidden: bad signature")  # replayed with another path
    expired = sign_a("/v/a.mp4", ts=int(time.time()) - 1801)
    refused(await get(edge, expired), 403, "forbidden: expired signature")
    refused(await get(edge, "/v/a.mp4?auth_key=1-2"), 403, "forbidden: malformed signature")
    assert edge.stats.requests["refused"] == 5
    assert origin.hits == {"/v/a.mp4": 1}


async def test_a_remembered_signed_url_hits_and_still_expires(
    make_origin: Any, make_edge: EdgeFactory
) -> None:
    """The same request again (a player's ranges) is let in from the rules' memory and takes
    its cache key from it: the same answers as the first time, and refused once the URL
    expires, whatever was remembered; another referer or client is checked anew."""
    origin = await origin_with(make_origin, "/v/a.mp4")
    edge = await make_edge(
        [origin.url],
        domain_extra=signed_domain("A")
        + '[domains.access.referer]\nallow = ["*.example.test"]\nallow_empty = false\n'
        + '[domains.access.ip]\nallow = ["127.0.0.0/8"]',
    )
    # Valid for two or three seconds more (ttl 1800 s by default).
    target = sign_a("/v/a.mp4", ts=int(time.time()) - 1798).replace("?", "?x=1&")
    ok = {"Referer": "http://www.example.test/"}
    first = await get(edge, target, ok)
    assert first.status == 200 and first.body == b"/v/a.mp4?x=1\n"
    for _ in range(3):
        again = await get(edge, target, ok)
        assert again.status == 200 and cs_params(again).get("hit") is True
        assert again.body == first.body
        refused(await get(edge, target, {"Referer": "http://leech.test/"}), 403,
                "forbidden: referer not allowed")
    assert origin.hits == {"/v/a.mp4": 1}
    assert [r.query_string for r in origin.requests] == ["x=1"]
    expires = int(target.split("auth_key=")[1].split("-")[0]) + 1800
    await asyncio.sleep(max(0.0, expires + 0.1 - time.time()))
    refused(await get(edge, target, ok), 403, "forbidden: expired signature")
    assert origin.hits == {"/v/a.mp4": 1}


async def test_type_a_keeps_other_parameters_for_the_origin(
    make_origin: Any, make_edge: EdgeFactory
) -> None:
    origin = await origin_with(make_origin, "/p")
    edge = await make_edge([origin.url], domain_extra=signed_domain("A"))
    target = sign_a("/p").replace("?", "?x=1&") + "&y=2"
    resp = await get(edge, target)
    assert resp.status == 200 and resp.body == b"/p?x=1&y=2\n"
    # A POST is checked and stripped the same way.
    resp = await get(edge, target, method="POST")
    assert resp.status == 200 and resp.body == b"/p?x=1&y=2\n"
    refused(await get(edge, "/p?x=1", method="POST"), 403, "forbidden: missing signature")


async def test_type_b_path_form(make_origin: Any, make_edge: EdgeFactory) -> None:
    origin = await origin_with(make_origin, "/4/44/a.mp3")
    edge = await make_edge([origin.url], domain_extra=signed_domain("B"))
    first = await get(edge, sign_b("/4/44/a.mp3") + "?q=1")
    assert first.status == 200 and first.body == b"/4/44/a.mp3?q=1\n"
    again = await get(edge, sign_b("/4/44/a.mp3", SECONDARY, at=time.time() - 120) + "?q=1")
    assert again.status == 200 and cs_params(again).get("hit") is True
    assert origin.hits == {"/4/44/a.mp3": 1}
    refused(await get(edge, sign_b("/4/44/a.mp3", at=time.time() - 1900)), 403,
            "forbidden: expired signature")
    refused(await get(edge, "/4/44/a.mp3"), 403, "forbidden: malformed signature")


@pytest.mark.parametrize("form", ["path", "query"])
async def test_type_c(form: str, make_origin: Any, make_edge: EdgeFactory) -> None:
    origin = await origin_with(make_origin, "/test.flv")
    extra = 'form = "query"' if form == "query" else ""
    edge = await make_edge([origin.url], domain_extra=signed_domain("C", extra))

    def sign(key: str, ts: int) -> str:
        if form == "path":
            return sign_c("/test.flv", key, ts)
        hex_time = f"{ts:x}"
        return f"/test.flv?sign={md5(key + '/test.flv' + hex_time)}&t={hex_time}"

    now = int(time.time())
    first = await get(edge, sign(KEY, now))
    assert first.status == 200 and first.body == b"/test.flv\n"
    again = await get(edge, sign(SECONDARY, now - 5))
    assert cs_params(again).get("hit") is True and again.body == first.body
    refused(await get(edge, sign("nope", now)), 403, "forbidden: bad signature")
    assert origin.hits == {"/test.flv": 1}


async def test_type_d_origin_gets_the_signature_cache_key_does_not(
    make_origin: Any, make_edge: EdgeFactory
) -> None:
    origin = await origin_with(make_origin, "/d.bin")
    edge = await make_edge([origin.url], domain_extra=signed_domain("D"))
    now = int(time.time())
    first = await get(edge, sign_d("/d.bin", ts=now, query="v=2"))
    assert first.status == 200
    assert first.body.decode().startswith("/d.bin?v=2&sign=")  # forwarded as sent
    again = await get(edge, sign_d("/d.bin", SECONDARY, ts=now - 1, query="v=2"))
    assert cs_params(again).get("hit") is True and again.body == first.body
    other = await get(edge, sign_d("/d.bin", ts=now, query="v=3"))  # other parameters: own entry
    assert cs_params(other).get("hit") is not True
    assert origin.hits == {"/d.bin": 2}


async def test_type_d_unsafe_method_invalidates_the_unsigned_key(
    make_origin: Any, make_edge: EdgeFactory
) -> None:
    """RFC 9111 4.4 with signatures: a POST signed one way drops the GET stored under another
    signature (both are the one object, whose key holds no signature)."""
    origin = await origin_with(make_origin, "/d.bin")
    edge = await make_edge([origin.url], domain_extra=signed_domain("D"))
    now = int(time.time())
    await get(edge, sign_d("/d.bin", ts=now))
    assert cs_params(await get(edge, sign_d("/d.bin", ts=now - 1))).get("hit") is True
    posted = await get(edge, sign_d("/d.bin", ts=now - 2), method="POST")
    assert posted.status == 200
    again = await get(edge, sign_d("/d.bin", ts=now - 3))
    assert cs_params(again).get("hit") is not True
    assert origin.hits == {"/d.bin": 3}


# --- referer, IP, user agent -------------------------------------------------------------------


async def test_referer_allow_list(make_origin: Any, make_edge: EdgeFactory) -> None:
    origin = await make_origin({"/i.png": fixed(b"png", CACHEABLE)})
    edge = await make_edge(
        [origin.url],
        domain_extra='[domains.access.referer]\nallow = ["*.example.test"]\nallow_empty = false',
    )
    assert (await get(edge, "/i.png", {"Referer": "https://www.example.test/x"})).status == 200
    assert (await get(edge, "/i.png", {"Referer": "https://a.b.example.test/"})).status == 200
    for referer in ("https://example.test/", "https://leech.test/?www.example.test",
                    "http://www.example.test.leech.test/", "garbage"):
        refused(await get(edge, "/i.png", {"Referer": referer}), 403,
                "forbidden: referer not allowed")
    refused(await get(edge, "/i.png"), 403, "forbidden: referer not allowed")


async def test_referer_deny_list_allows_empty(make_origin: Any, make_edge: EdgeFactory) -> None:
    origin = await make_origin({"/i.png": fixed(b"png", CACHEABLE)})
    edge = await make_edge(
        [origin.url], domain_extra='[domains.access.referer]\ndeny = ["leech.test"]'
    )
    assert (await get(edge, "/i.png")).status == 200
    assert (await get(edge, "/i.png", {"Referer": "http://ok.test/"})).status == 200
    refused(await get(edge, "/i.png", {"Referer": "http://LEECH.test:8080/a"}), 403,
            "forbidden: referer not allowed")


@pytest.mark.parametrize(
    ("rule", "status"),
    [
        ('allow = ["127.0.0.1"]', 200),
        ('allow = ["10.0.0.0/8", "::1"]', 403),
        ('deny = ["127.0.0.0/8"]', 403),
        ('deny = ["2001:db8::/32"]', 200),
    ],
)
async def test_ip_rules(rule: str, status: int, make_origin: Any, make_edge: EdgeFactory) -> None:
    origin = await make_origin({"/f": fixed(b"f", CACHEABLE)})
    edge = await make_edge([origin.url], domain_extra=f"[domains.access.ip]\n{rule}")
    resp = await get(edge, "/f")
    assert resp.status == status
    if status == 403:
        refused(resp, 403, "forbidden: client address not allowed")


async def test_client_ip_from_a_trusted_proxy(make_origin: Any, make_edge: EdgeFactory) -> None:
    origin = await make_origin({"/f": fixed(b"f", CACHEABLE)})
    edge = await make_edge(
        [origin.url],
        top_extra='trusted_proxies = ["127.0.0.0/8"]',
        domain_extra='[domains.access.ip]\ndeny = ["203.0.113.0/24"]',
    )
    assert (await get(edge, "/f", {"X-Forwarded-For": "198.51.100.1"})).status == 200
    refused(await get(edge, "/f", {"X-Forwarded-For": "203.0.113.5"}), 403,
            "forbidden: client address not allowed")
    # The client wrote the left entry itself: the right-most untrusted one is the client.
    assert (await get(edge, "/f", {"X-Forwarded-For": "203.0.113.5, 198.51.100.1"})).status == 200
    refused(await get(edge, "/f", {"X-Forwarded-For": "198.51.100.1, 203.0.113.5, 127.0.0.9"}),
            403, "forbidden: client address not allowed")


async def test_x_forwarded_for_ignored_from_untrusted_peers(
    make_origin: Any, make_edge: EdgeFactory
) -> None:
    origin = await make_origin({"/f": fixed(b"f", CACHEABLE)})
    edge = await make_edge(
        [origin.url],
        top_extra='trusted_proxies = ["10.0.0.0/8"]',
        domain_extra='[domains.access.ip]\nallow = ["203.0.113.5"]',
    )
    refused(await get(edge, "/f", {"X-Forwarded-For": "203.0.113.5"}), 403,
            "forbidden: client address not allowed")


async def test_user_agent_rules(make_origin: Any, make_edge: EdgeFactory) -> None:
    origin = await make_origin({"/f": fixed(b"f", CACHEABLE)})
    edge = await make_edge(
        [origin.url],
        domain_extra='[domains.access.user_agent]\ndeny = ["*curl*", "python-*"]',
    )
    assert (await get(edge, "/f", {"User-Agent": "Mozilla/5.0"})).status == 200
    assert (await get(edge, "/f")).status == 200
    for agent in ("curl/8.0", "python-aiohttp/3", "x CURL y"):
        refused(await get(edge, "/f", {"User-Agent": agent}), 403,
                "forbidden: user agent not allowed")


# --- rate limit --------------------------------------------------------------------------------

RATE = "[domains.access.rate_limit]\nrate = 0.5\nburst = 3\n"  # a token every 2 s


def pipelined(count: int, target: str = "/f", headers: dict[str, str] | None = None) -> bytes:
    lines = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    one = f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\n{lines}\r\n".encode()
    return one * count


async def test_rate_limit_429_with_retry_after(make_origin: Any, make_edge: EdgeFactory) -> None:
    origin = await make_origin({"/f": fixed(b"f", CACHEABLE)})
    edge = await make_edge([origin.url], domain_extra=RATE)
    answers = await exchange(edge.port, pipelined(5), count=5)
    assert [r.status for r in answers] == [200, 200, 200, 429, 429]
    assert answers[3].header("retry-after") == "2"
    refused(answers[3], 429, "too many requests")
    assert edge.stats.requests["refused"] == 2
    # Metered for the domain like any request: refused, and as 4xx.
    usage = [b for b in edge.worker.take_usage() if b.domain == HOST]
    assert sum(b.requests for b in usage) == 5 and sum(b.refused for b in usage) == 2
    assert sum(b.status_4xx for b in usage) == 2 and sum(b.hits for b in usage) == 2
    await asyncio.sleep(2.1)
    assert (await get(edge, "/f")).status == 200  # a token came back


async def test_rate_limit_is_per_client_behind_a_trusted_proxy(
    make_origin: Any, make_edge: EdgeFactory
) -> None:
    origin = await make_origin({"/f": fixed(b"f", CACHEABLE)})
    edge = await make_edge(
        [origin.url], top_extra='trusted_proxies = ["127.0.0.0/8"]', domain_extra=RATE
    )
    one = await exchange(edge.port, pipelined(4, headers={"X-Forwarded-For": "1.1.1.1"}), count=4)
    two = await exchange(edge.port, pipelined(4, headers={"X-Forwarded-For": "2.2.2.2"}), count=4)
    assert [r.status for r in one] == [200, 200, 200, 429]
    assert [r.status for r in two] == [200, 200, 200, 429]


async def test_flood_of_addresses_keeps_rate_limit_memory_bounded(
    make_origin: Any, make_edge: EdgeFactory
) -> None:
    origin = await make_origin({"/f": fixed(b"f", CACHEABLE)})
    edge = await make_edge(
        [origin.url],
        top_extra='trusted_proxies = ["127.0.0.0/8"]',
        domain_extra="[domains.access.rate_limit]\nrate = 0.01\nburst = 1\n",
    )
    limiter = edge.worker.proxy.limiter
    limiter.max_clients = 500  # the default is 65536; the unit test floods that one
    abuser = {"X-Forwarded-For": "9.9.9.9"}
    assert [r.status for r in await exchange(edge.port, pipelined(2, headers=abuser), 2)] == [
        200, 429
    ]
    for batch in range(10):
        data = b"".join(
            pipelined(1, headers={"X-Forwarded-For": f"10.{batch}.{n >> 8}.{n & 255}"})
            for n in range(300)
        )
        answers = await exchange(edge.port, data, count=300)
        assert {r.status for r in answers} == {200}
        assert len(limiter) <= 500
        # The abuser keeps coming back within the flood: its bucket is recent, never evicted.
        assert (await get(edge, "/f", abuser)).status == 429
    assert len(limiter) == 500


# --- order of the checks -----------------------------------------------------------------------


async def test_order_signature_before_referer_ip_and_agent(
    make_origin: Any, make_edge: EdgeFactory
) -> None:
    origin = await make_origin({"/f": fixed(b"f", CACHEABLE)})
    rules = (
        signed_domain("A")
        + '[domains.access.referer]\nallow = ["ok.test"]\nallow_empty = false\n'
        + '[domains.access.ip]\ndeny = ["127.0.0.0/8"]\n'
        + '[domains.access.user_agent]\ndeny = ["bot*"]\n'
        + "[domains.access.rate_limit]\nrate = 0.01\nburst = 1\n"
    )
    edge = await make_edge([origin.url], domain_extra=rules)
    hostile = {"Referer": "http://leech.test/", "User-Agent": "bot"}
    # A bad signature from a denied address with a bad referer: the signature's refusal.
    refused(await get(edge, "/f", hostile), 403, "forbidden: missing signature")
    refused(await get(edge, sign_a("/f", "wrong"), hostile), 403, "forbidden: bad signature")
    refused(await get(edge, sign_a("/f"), hostile), 403, "forbidden: referer not allowed")
    refused(await get(edge, sign_a("/f"), {**hostile, "Referer": "http://ok.test/"}), 403,
            "forbidden: client address not allowed")
    assert origin.hits == {}


async def test_order_403_before_429(make_origin: Any, make_edge: EdgeFactory) -> None:
    origin = await make_origin({"/f": fixed(b"f", CACHEABLE)})
    rules = '[domains.access.referer]\ndeny = ["leech.test"]\n' + RATE
    edge = await make_edge([origin.url], domain_extra=rules)
    answers = await exchange(edge.port, pipelined(4), count=4)
    assert [r.status for r in answers] == [200, 200, 200, 429]
    # Rate-limited, and with a bad referer: 403, not 429.
    bad = await get(edge, "/f", {"Referer": "http://leech.test/"})
    refused(bad, 403, "forbidden: referer not allowed")


async def test_order_with_domain_state_and_url_blocks(
    make_origin: Any, make_control_edge: ControlEdgeFactory  # noqa: F811
) -> None:
    origin = await origin_with(make_origin, "/ok", "/secret/a.mp3")
    access = {
        "signed_url": {"type": "B", "key": KEY},
        "ip": {"deny": ["127.0.0.0/8"]},
    }
    state = {"version": 1, "domains": [domain(HOST, origin.url, access=access)], "blocks": []}
    edge = await make_control_edge(origin.url, state)
    # The access rules came with the domain from the control plane and are enforced.
    refused(await get(edge, sign_b("/ok")), 403, "forbidden: client address not allowed")
    refused(await get(edge, "/ok"), 403, "forbidden: missing signature")

    edge.change("block", {"domain": HOST, "pattern": "/secret/*", "reason": "court order 7"})
    # A blocked URL with a bad signature (also in B's path form) is 451.
    refused(await get(edge, "/secret/a.mp3"), 451, "unavailable for legal reasons: court order 7")
    refused(await get(edge, sign_b("/secret/a.mp3", "wrong")), 451,
            "unavailable for legal reasons: court order 7")

    edge.change("domain.state", {"name": HOST, "state": "suspended", "reason": "unpaid"})
    # A suspended domain with a bad signature is 403 suspended.
    refused(await get(edge, sign_b("/ok", "wrong")), 403, "domain suspended: unpaid")
    assert origin.hits == {}

    # The domain's rules change through the feed like the rest of its config.
    edge.change("domain.state", {"name": HOST, "state": "active", "reason": ""})
    edge.change("domain.upsert", {"domain": domain(HOST, origin.url, access={
        "signed_url": {"type": "B", "key": KEY}})})
    ok = await get(edge, sign_b("/ok"))
    assert ok.status == 200 and ok.body == b"/ok\n"
    hit = await get(edge, sign_b("/ok", KEY, at=time.time() - 60))
    assert cs_params(hit).get("hit") is True
    # A purge names the object, not any of its signed URLs.
    edge.purge("url", "/ok")
    assert cs_params(await get(edge, sign_b("/ok"))).get("hit") is not True
    assert origin.hits == {"/ok": 2}


# --- speed limit -------------------------------------------------------------------------------

BODY = bytes(range(256)) * 1200  # 300 KiB
RATE_BYTES = 200 * 1024
FREE = 64 * 1024
SPEED = f"""
[[domains.access.speed_limits]]
suffix = [".mp4"]
rate = "{RATE_BYTES // 1024}KiB"
after = "{FREE // 1024}KiB"
"""
# The pieces after the free bytes need (len - free) / rate seconds at least.
LEAST = (len(BODY) - FREE) / RATE_BYTES


async def timed_download(port: int, target: str) -> tuple[bytes, float, float]:
    """(body, seconds to the first FREE body bytes, seconds to the whole body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.monotonic()
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        body = await reader.readexactly(FREE)
        first = time.monotonic() - started
        body += await reader.read()
        return body, first, time.monotonic() - started
    finally:
        writer.close()


@pytest.mark.parametrize("tier", ["memory", "disk"])
async def test_speed_limit_paces_misses_and_hits(
    tier: str, make_origin: Any, make_edge: EdgeFactory
) -> None:
    origin = await make_origin(
        {"/v.mp4": fixed(BODY, CACHEABLE), "/v.bin": fixed(BODY, CACHEABLE)}
    )
    top = '[cache]\nmemory_max_object = "64KiB"\ndisk = "64MiB"' if tier == "disk" else ""
    # [cache] must follow [edge]'s keys: top_extra is the end of [edge].
    edge = await make_edge([origin.url], top_extra=top, domain_extra=SPEED)
    for attempt in ("miss", "hit"):
        body, first, whole = await timed_download(edge.port, "/v.mp4")
        assert body == BODY, attempt
        assert whole >= LEAST * 0.95, (attempt, whole)
        assert first < LEAST / 2, (attempt, first)  # the first FREE bytes at full speed
    # Another path, no rule: full speed.
    for attempt in ("miss", "hit"):
        body, _, whole = await timed_download(edge.port, "/v.bin")
        assert body == BODY and whole < LEAST / 2, (attempt, whole)
    assert origin.hits == {"/v.mp4": 1, "/v.bin": 1}


async def test_speed_limit_on_a_range(make_origin: Any, make_edge: EdgeFactory) -> None:
    origin = await make_origin({"/v.mp4": fixed(BODY, CACHEABLE)})
    edge = await make_edge([origin.url], domain_extra=SPEED.replace('"64KiB"', '"0KiB"'))
    await timed_download(edge.port, "/v.mp4")
    started = time.monotonic()
    resp = await get(edge, "/v.mp4", {"Range": "bytes=1000-103399"})
    assert resp.status == 206 and resp.body == BODY[1000:103400]
    assert time.monotonic() - started >= 102400 / RATE_BYTES * 0.95


@pytest.mark.parametrize("trusted", [False, True])
async def test_origin_gets_x_forwarded_for_as_before(
    trusted: bool, make_origin: Any, make_edge: EdgeFactory
) -> None:
    """Without rules nothing changes; with trusted proxies the edge still appends the peer it
    saw (the origin may apply its own trust)."""
    origin = await make_origin({"/f": fixed(b"f", CACHEABLE)})
    top = 'trusted_proxies = ["127.0.0.0/8"]' if trusted else ""
    edge: Edge = await make_edge([origin.url], top_extra=top)
    assert edge.worker.config.domains[HOST].access is None
    assert (await get(edge, "/f", {"X-Forwarded-For": "1.2.3.4"})).status == 200
    assert origin.requests[0].headers["X-Forwarded-For"] == "1.2.3.4, 127.0.0.1"


# --- through the control plane -----------------------------------------------------------------


async def test_rules_set_through_the_api_are_enforced_by_an_attached_edge(
    tmp_path: Path, make_origin: Any
) -> None:
    """control.app on SQLite, `cdn edge` following it: the rules an account sets with the API
    reach the edge with the domain (its signing key, stored encrypted, in plaintext), and a
    change to them takes effect within seconds."""
    plane = Plane(tmp_path, secret_key="integration-secret-key-0123456789abcdef")
    await plane.up()
    edge: ControlledEdge | None = None
    try:
        async with aiohttp.ClientSession() as client:
            call = functools.partial(plane.call, client)
            edge_token = (await call("POST", "/v1/edges", ADMIN, {"name": "edge-1"}))["token"]
            made = await call(
                "POST", "/v1/accounts", ADMIN, {"name": "acme", "billing": "postpaid"}
            )
            token = made["token"]
            origin = await origin_with(make_origin, "/v/a.mp4", "/v/b.mp4")
            signed = {"signed_url": {"type": "A", "key": KEY}}
            body = {"name": HOST, "origins": [origin.url], "access": signed}
            await call("POST", "/v1/domains", token, body)
            edge = ControlledEdge(tmp_path, origin, plane.url, token=edge_token, workers=1)
            await edge.start()

            ok = await edge.get(sign_a("/v/a.mp4"), HOST)
            assert ok.status == 200 and ok.body == b"/v/a.mp4\n"
            # The key is encrypted in the control plane's database, in plaintext in the edge's
            # state file, which only its owner may read.
            stored = b"".join(p.read_bytes() for p in tmp_path.glob("control.db*"))
            assert b'"fernet"' in stored and KEY.encode() not in stored
            saved = edge.state / "control" / "state.json"
            assert KEY in saved.read_text() and saved.stat().st_mode & 0o777 == 0o600
            refused(await edge.get("/v/a.mp4", HOST), 403, "forbidden: missing signature")

            # The edge's own prefetch is not refused by the rules, and its proof of being the
            # edge's (the supervisor's secret) never reaches the origin.
            task = await call("POST", "/v1/prefetch", token, {"urls": [f"http://{HOST}/v/b.mp4"]})
            deadline = time.monotonic() + 5.0
            while (done := await call("GET", f"/v1/tasks/{task['id']}", token))["state"] != "done":
                assert time.monotonic() < deadline, done
                await asyncio.sleep(0.05)
            assert done["results"] == {"edge-1": {"fetched": 1, "failed": []}}, done
            hit = await edge.get(sign_a("/v/b.mp4"), HOST)
            assert hit.status == 200 and cs_params(hit).get("hit") is True
            assert origin.hits == {"/v/a.mp4": 1, "/v/b.mp4": 1}
            assert all("X-Cdn-Edge-Prefetch" not in r.headers for r in origin.requests)

            settings = {"origins": [origin.url], "access": {"ip": {"deny": ["127.0.0.0/8"]}}}
            await call("PUT", f"/v1/domains/{HOST}", token, settings)
            deadline = time.monotonic() + 2.0
            while (resp := await edge.get("/v/a.mp4", HOST)).status != 403 or (
                resp.body != b"forbidden: client address not allowed\n"
            ):
                assert time.monotonic() < deadline, (resp.status, resp.body)
                await asyncio.sleep(0.02)
            assert await edge.stop() == 0
    finally:
        if edge is not None and edge.proc is not None and edge.proc.returncode is None:
            await edge.stop()
        await plane.close()
