"""Usage: edges' batches counted exactly once, and what `GET /v1/usage` shows of them (issue 5)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import pytest

from control.scheduler import CLOCK
from control.schema import usage, usage_batches
from control.usage import _fixed, _mbps, usage_points, usage_total
from edge.meter import FIELDS
from tests.control.conftest import Api, Reply, on_one_backend

T0 = datetime(2026, 11, 10, 15, 50, tzinfo=UTC)  # 23:50 in Shanghai
FIVE = timedelta(minutes=5)


def bucket(domain: str, start: datetime, **counts: int) -> dict[str, Any]:
    return {"domain": domain, "start": int(start.timestamp()), **dict.fromkeys(FIELDS, 0), **counts}


class Edge:
    def __init__(self, api: Api, token: str, name: str) -> None:
        self.api, self.token, self.name = api, token, name
        self.sent = 0

    async def post(self, buckets: list[dict[str, Any]], batch: str | None = None) -> Reply:
        self.sent += 1
        body = {"batch": batch or f"{self.name}-{self.sent}", "edge": self.name, "buckets": buckets}
        return await self.api.call("POST", "/v1/edge/usage", self.token, body)


async def edge(api: Api, name: str = "edge-1") -> Edge:
    _, token = await api.edge(name)
    return Edge(api, token, name)


async def get(api: Api, token: str, **params: str) -> Reply:
    query = {"granularity": "5m", **params}
    return await api.call("GET", f"/v1/usage?{urlencode(query)}", token)


def span(start: datetime, end: datetime) -> dict[str, str]:
    return {"from": start.isoformat(), "to": end.isoformat()}


@pytest.fixture
async def acme(api: Api) -> tuple[int, str]:
    """An Asia/Shanghai account with domains a.example and b.example."""
    account_id, token = await api.account("acme")
    await api.domain(token, "a.example")
    await api.domain(token, "b.example")
    return account_id, token


# --- ingest ---------------------------------------------------------------------------------------


async def test_a_batch_posted_twice_counts_once(api: Api, acme: tuple[int, str]) -> None:
    _, token = acme
    e = await edge(api)
    buckets = [bucket("a.example", T0, requests=3, bytes_sent=1000)]
    first = await e.post(buckets, batch="b-1")
    again = await e.post(buckets, batch="b-1")
    assert (first.status, first.body) == (200, {"batch": "b-1", "duplicate": False})
    assert (again.status, again.body) == (200, {"batch": "b-1", "duplicate": True})
    [point] = (await get(api, token, **span(T0, T0 + FIVE))).body["points"]
    assert (point["requests"], point["bytes_sent"]) == (3, 1000)
    [stored] = await api.rows(usage_batches)
    assert (stored.batch_id, stored.buckets) == ("b-1", 1)


async def test_concurrent_posts_of_one_batch_count_once(api: Api, acme: tuple[int, str]) -> None:
    _, token = acme
    e = await edge(api)
    buckets = [bucket("a.example", T0 + i * FIVE, requests=1, bytes_sent=10) for i in range(50)]
    replies = await asyncio.gather(*(e.post(buckets, batch="same") for _ in range(4)))
    assert [r.status for r in replies] == [200] * 4
    assert sorted(r.body["duplicate"] for r in replies) == [False, True, True, True]
    points = (await get(api, token, **span(T0, T0 + 50 * FIVE))).body["points"]
    assert [p["bytes_sent"] for p in points] == [10] * 50


async def test_edges_and_batches_add_up(api: Api, acme: tuple[int, str]) -> None:
    _, token = acme
    one, two = await edge(api, "edge-1"), await edge(api, "edge-2")
    # Two parts of one window in one batch (two workers' flushes) add up too.
    await one.post([bucket("a.example", T0, hits=1), bucket("a.example", T0, hits=2, misses=1)])
    await two.post([bucket("a.example", T0, hits=4, status_2xx=7, origin_bytes=5)])
    await one.post([bucket("a.example", T0, misses=1, status_2xx=1), bucket("b.example", T0)])
    rows = {row.domain: row for row in await api.rows(usage)}
    assert (rows["a.example"].hits, rows["a.example"].misses) == (7, 2)
    assert (rows["a.example"].status_2xx, rows["a.example"].origin_bytes) == (8, 5)
    assert rows["a.example"].account_id == rows["b.example"].account_id == acme[0]
    [point] = (await get(api, token, **span(T0, T0 + FIVE), domain="a.example")).body["points"]
    assert (point["hits"], point["misses"], point["hit_ratio"]) == (7, 2, "0.7778")


async def test_concurrent_batches_of_shared_windows_all_count(
    api: Api, acme: tuple[int, str]
) -> None:
    _, token = acme
    edges = [await edge(api, f"edge-{i}") for i in range(4)]
    keys = [(d, T0 + i * FIVE) for i in range(20) for d in ("a.example", "b.example")]
    posts = [
        e.post([bucket(d, at, requests=1, bytes_sent=k + 1) for d, at in keys[:: 1 - 2 * (k % 2)]])
        for k, e in enumerate(edges)
    ]
    assert [r.body["duplicate"] for r in await asyncio.gather(*posts)] == [False] * 4
    points = (await get(api, token, **span(T0, T0 + 20 * FIVE))).body["points"]
    assert [(p["requests"], p["bytes_sent"]) for p in points] == [(8, 20)] * 20


async def test_only_edges_post_usage(api: Api, acme: tuple[int, str]) -> None:
    body = {"batch": "x", "edge": "e", "buckets": []}
    assert (await api.call("POST", "/v1/edge/usage", acme[1], body)).status == 403
    assert (await api.call("POST", "/v1/edge/usage", body=body)).status == 403  # the operator
    assert (await api.call("POST", "/v1/edge/usage", None, body)).status == 401
    assert await api.rows(usage_batches) == []


def _batch(**change: Any) -> dict[str, Any]:
    good = bucket("a.example", T0, requests=1)
    return {"batch": "b", "edge": "e", "buckets": [good, good], **change}


@on_one_backend
@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        (_batch(edge=7), "edge", "string"),
        (_batch(batch=""), "batch", "at least 1"),
        (_batch(batch="b" * 201), "batch", "at most 200"),
        (_batch(extra=1), "extra", "unknown field"),
        ({"batch": "b", "edge": "e"}, "buckets", "required"),
        (_batch(buckets={}), "buckets", "list"),
        (
            _batch(buckets=[bucket("a.example", T0), {"domain": "a.example"}]),
            "buckets[1]",
            "fields",
        ),
        (_batch(buckets=[bucket("a.example", T0 + timedelta(seconds=1))]), "buckets[0]", "300"),
        (_batch(buckets=[bucket("a.example", T0, hits=-1)]), "buckets[0]", "hits"),
        (_batch(buckets=[bucket("a.example", T0, hits=True)]), "buckets[0]", "hits"),
        (_batch(buckets=[{**bucket("a.example", T0), "hits": 1.0}]), "buckets[0]", "hits"),
        (_batch(buckets=[bucket("a.example", T0, hits=2**63)]), "buckets[0]", "2**63"),
        (_batch(buckets=[bucket("", T0)]), "buckets[0]", "domain"),
        (_batch(buckets=[{**bucket("a.example", T0), "start": 300 * 10**9}]), "buckets[0]", "9999"),
        (_batch(buckets=[{}] * 100_001), "buckets", "at most 100000"),
        ([], "(body)", "object"),
    ],
)
async def test_malformed_batches_are_422_naming_the_field(
    api: Api, body: Any, field: str, words: str
) -> None:
    e = await edge(api)
    reply = await api.call("POST", "/v1/edge/usage", e.token, body)
    assert reply.status == 422, reply
    assert reply.body["errors"][0]["field"] == field
    assert words in reply.body["errors"][0]["problem"]
    assert await api.rows(usage_batches) == [] and await api.rows(usage) == []


async def test_bad_json_is_400(api: Api) -> None:
    e = await edge(api)
    reply = await api.call("POST", "/v1/edge/usage", e.token, raw=b'{"batch": ')
    assert reply.status == 400
    assert await api.rows(usage_batches) == []


async def test_unregistered_domains_are_kept_but_shown_to_no_one(
    api: Api, acme: tuple[int, str]
) -> None:
    e = await edge(api)
    await e.post([bucket("nobody.example", T0, bytes_sent=5), bucket("a.example", T0)])
    owners = {row.domain: row.account_id for row in await api.rows(usage)}
    assert owners == {"nobody.example": None, "a.example": acme[0]}
    reply = await get(api, acme[1], **span(T0, T0 + FIVE), domain="nobody.example")
    assert reply.status == 404


# --- the customer's view --------------------------------------------------------------------------


async def test_points_per_granularity_in_the_accounts_zone(api: Api, acme: tuple[int, str]) -> None:
    """Shanghai is UTC+8: 15:55Z is 23:55 on the 10th, 16:00Z midnight of the 11th."""
    _, token = acme
    e = await edge(api)
    sent = [1_000, 37_500_000, 3_750_000, 2_000]  # 15:50Z, 15:55Z, 16:00Z, 16:05Z
    await e.post(
        [
            bucket("a.example", T0 + i * FIVE, requests=i + 1, bytes_sent=n, hits=i, misses=1)
            for i, n in enumerate(sent)
        ]
    )
    await e.post([bucket("b.example", T0 + FIVE, requests=1, bytes_sent=500, status_4xx=1)])

    five = (await get(api, token, **span(T0, T0 + 4 * FIVE))).body
    assert five["account"] == acme[0] and five["domain"] is None
    assert (five["granularity"], five["timezone"]) == ("5m", "Asia/Shanghai")
    assert [p["start"] for p in five["points"]] == [(T0 + i * FIVE).isoformat() for i in range(4)]
    assert five["points"][1]["end"] == (T0 + 2 * FIVE).isoformat()
    assert [p["bytes_sent"] for p in five["points"]] == [1_000, 37_500_500, 3_750_000, 2_000]
    assert [p["requests"] for p in five["points"]] == [1, 3, 3, 4]
    assert five["points"][1]["status"] == {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 1, "5xx": 0}
    # 37,500,500 bytes x 8 / 300 s = 1.00001333... Mbps
    assert [p["bandwidth_peak_mbps"] for p in five["points"]] == [
        "0.000027",
        "1.000013",
        "0.100000",
        "0.000053",
    ]
    assert [p["hit_ratio"] for p in five["points"]] == ["0.0000", "0.5000", "0.6667", "0.7500"]

    hours_span = span(
        datetime(2026, 11, 10, 15, tzinfo=UTC), datetime(2026, 11, 10, 17, tzinfo=UTC)
    )
    hours = (await get(api, token, granularity="1h", **hours_span)).body["points"]
    assert [p["start"] for p in hours] == ["2026-11-10T15:00:00+00:00", "2026-11-10T16:00:00+00:00"]
    assert [p["bytes_sent"] for p in hours] == [37_501_500, 3_752_000]
    assert [p["bandwidth_peak_mbps"] for p in hours] == ["1.000013", "0.100000"]
    assert [(p["hits"], p["misses"]) for p in hours] == [(1, 2), (5, 2)]

    days = (
        await get(
            api,
            token,
            granularity="1d",
            **{"from": "2026-11-10T00:00:00+08:00", "to": "2026-11-12T00:00:00+08:00"},
        )
    ).body
    assert [(p["start"], p["end"]) for p in days["points"]] == [
        ("2026-11-09T16:00:00+00:00", "2026-11-10T16:00:00+00:00"),
        ("2026-11-10T16:00:00+00:00", "2026-11-11T16:00:00+00:00"),
    ]
    assert [p["bytes_sent"] for p in days["points"]] == [37_501_500, 3_752_000]
    assert days["daily_peak_mbps"] == [
        {"day": "2026-11-10", "mbps": "1.000013"},
        {"day": "2026-11-11", "mbps": "0.100000"},
    ]
    one = (await get(api, token, **span(T0, T0 + 4 * FIVE), domain="B.example.")).body
    assert one["domain"] == "b.example"
    assert [p["bytes_sent"] for p in one["points"]] == [0, 500, 0, 0]
    assert one["points"][0]["hit_ratio"] is None


async def test_daily_peak_covers_whole_billing_days(api: Api, acme: tuple[int, str]) -> None:
    """The range is 16:00Z-16:05Z, but the day's peak is its busiest bucket all day."""
    _, token = acme
    e = await edge(api)
    await e.post(
        [
            bucket("a.example", datetime(2026, 11, 11, 3, tzinfo=UTC), bytes_sent=75_000_000),
            bucket("a.example", T0 + 2 * FIVE, bytes_sent=37_500),
        ]
    )
    report = (await get(api, token, **span(T0 + 2 * FIVE, T0 + 3 * FIVE))).body
    assert report["daily_peak_mbps"] == [{"day": "2026-11-11", "mbps": "2.000000"}]
    assert [p["bandwidth_peak_mbps"] for p in report["points"]] == ["0.001000"]


async def test_monthly_p95_drops_the_top_five_percent(api: Api, acme: tuple[int, str]) -> None:
    """November 2026 in Shanghai: 30 days, 8640 points of 1 ... 8640 kbit/s x 1000; the top 432
    are dropped, the highest remaining is the 8208th."""
    account_id, token = acme
    api.app[CLOCK].set(datetime(2027, 1, 1, tzinfo=UTC))  # both months have ended
    e = await edge(api)
    month = datetime(2026, 10, 31, 16, tzinfo=UTC)  # November 1st, 00:00 in Shanghai
    points = [
        bucket("a.example", month + i * FIVE, bytes_sent=(i + 1) * 37_500) for i in range(8640)
    ]
    await e.post(points[::2])
    await e.post(points[1::2])
    await e.post([bucket("a.example", month - FIVE, bytes_sent=10**12)])  # October: not counted
    nov = {"from": "2026-11-01T00:00:00+08:00", "to": "2026-12-01T00:00:00+08:00"}
    report = (await get(api, token, granularity="1d", **nov)).body
    assert report["p95_mbps"] == [{"month": "2026-11", "mbps": "8.208000"}]
    assert len(report["points"]) == 30 == len(report["daily_peak_mbps"])
    assert report["daily_peak_mbps"][-1] == {"day": "2026-11-30", "mbps": "8.640000"}
    assert report["points"][0]["bytes_sent"] == sum(range(1, 289)) * 37_500

    # Missing buckets count as zero: December has 8928 slots, drops 446 of its 500 points.
    december = datetime(2026, 11, 30, 16, tzinfo=UTC)
    await e.post(
        [bucket("b.example", december + i * FIVE, bytes_sent=i * 37_500) for i in range(500)]
    )
    span_both = {"from": "2026-11-30T00:00:00+08:00", "to": "2026-12-02T00:00:00+08:00"}
    both = (await get(api, token, granularity="1d", **span_both)).body
    assert both["p95_mbps"] == [
        {"month": "2026-11", "mbps": "8.208000"},
        {"month": "2026-12", "mbps": "0.053000"},  # 500 - 446 = 54 left: 0 ... 53
    ]
    only_b = (await get(api, token, granularity="1d", domain="b.example", **span_both)).body
    assert only_b["p95_mbps"] == [
        {"month": "2026-11", "mbps": "0.000000"},
        {"month": "2026-12", "mbps": "0.053000"},
    ]
    async with api.engine.connect() as conn:
        nov_start, nov_end = month, december
        got = await usage_points(conn, account_id, nov_start, nov_end)
        assert got == [(month + i * FIVE, (i + 1) * 37_500) for i in range(8640)]
        assert await usage_total(conn, account_id, nov_start, nov_end) == (
            sum(range(1, 8641)) * 37_500
        )


async def test_p95_of_the_month_in_progress_is_over_the_slots_begun_so_far(
    api: Api, acme: tuple[int, str]
) -> None:
    """December 1st 2026, 11:57:30 in Shanghai: 144 slots have begun (00:00 ... 11:55), each
    with 1 ... 144 kbit/s. The p95 drops floor(144 x 0.05) = 7 and is the 137th; the month's
    8928 slots, the ones still to come as zeros, would drop 446 and read 0."""
    _, token = acme
    december = datetime(2026, 11, 30, 16, tzinfo=UTC)  # December 1st, 00:00 in Shanghai
    api.app[CLOCK].set(december + 144 * FIVE - timedelta(seconds=150))
    e = await edge(api)
    await e.post(
        [bucket("a.example", december + i * FIVE, bytes_sent=(i + 1) * 37_500) for i in range(144)]
    )
    span_month = {"from": "2026-12-01T00:00:00+08:00", "to": "2027-01-01T00:00:00+08:00"}
    report = (await get(api, token, granularity="1d", **span_month)).body
    assert report["p95_mbps"] == [{"month": "2026-12", "mbps": "0.137000"}]
    assert report["daily_peak_mbps"][0] == {"day": "2026-12-01", "mbps": "0.144000"}

    # A bucket stamped ahead of the clock (an edge's clock running fast) counts, with the slots
    # up to it: 12:00 ... 12:25 are 6 more, 150 in all, still 7 dropped.
    await e.post([bucket("a.example", december + 149 * FIVE, bytes_sent=1_000 * 37_500)])
    report = (await get(api, token, granularity="1d", **span_month)).body
    assert report["p95_mbps"] == [{"month": "2026-12", "mbps": "0.138000"}]

    # Once December has ended, the p95 is over all its 8928 slots.
    api.app[CLOCK].set(datetime(2027, 1, 1, tzinfo=UTC))
    report = (await get(api, token, granularity="1d", **span_month)).body
    assert report["p95_mbps"] == [{"month": "2026-12", "mbps": "0.000000"}]


async def test_billing_reads_the_accounts_buckets(api: Api, acme: tuple[int, str]) -> None:
    """Summed over domains, empty buckets left out, [start, end), other accounts apart; traffic
    of a domain deleted since stays the account's."""
    account_id, token = acme
    other_id, other = await api.account("other")
    await api.domain(other, "c.example")
    e = await edge(api)
    await e.post(
        [
            bucket("a.example", T0, bytes_sent=10),
            bucket("b.example", T0, bytes_sent=5),
            bucket("c.example", T0, bytes_sent=100),
            bucket("a.example", T0 + FIVE, requests=1),
            bucket("a.example", T0 + 2 * FIVE, bytes_sent=7),
            bucket("a.example", T0 + 3 * FIVE, bytes_sent=1000),
        ]
    )
    assert (await api.call("DELETE", "/v1/domains/b.example", token)).status < 300
    async with api.engine.connect() as conn:
        assert await usage_points(conn, account_id, T0, T0 + 3 * FIVE) == [
            (T0, 15),
            (T0 + 2 * FIVE, 7),
        ]
        assert await usage_total(conn, account_id, T0, T0 + 3 * FIVE) == 22
        assert await usage_total(conn, other_id, T0, T0 + 3 * FIVE) == 100
        assert await usage_total(conn, account_id, T0 - FIVE, T0) == 0
        assert await usage_points(conn, account_id, T0 - FIVE, T0) == []
    served = await get(api, token, **span(T0, T0 + FIVE), domain="b.example")
    assert [p["bytes_sent"] for p in served.body["points"]] == [5]


async def test_isolation(api: Api, acme: tuple[int, str]) -> None:
    account_id, token = acme
    _, other = await api.account("other")
    await api.domain(other, "c.example")
    e = await edge(api)
    await e.post([bucket(d, T0, bytes_sent=n) for d, n in (("a.example", 1), ("b.example", 2))])
    await e.post([bucket("c.example", T0, bytes_sent=100)])
    window = span(T0, T0 + FIVE)

    missing = await get(api, token, domain="nowhere.example", **window)
    foreign = await get(api, token, domain="c.example", **window)
    assert missing.status == foreign.status == 404
    assert foreign.body["detail"] == "no domain 'c.example'"
    [mine] = (await get(api, token, **window)).body["points"]
    assert mine["bytes_sent"] == 3

    _, no_scope = await api.subaccount(token, ["domains:read"], name="reader")
    denied = await get(api, no_scope, **window)
    assert (denied.status, denied.body["scope"]) == (403, "usage:read")

    _, limited = await api.subaccount(token, ["usage:read"], ["a.example"], name="limited")
    [seen] = (await get(api, limited, **window)).body["points"]
    assert seen["bytes_sent"] == 1
    assert (await get(api, limited, domain="b.example", **window)).status == 404

    as_operator = await get(api, "test-operator-token-f3b9c1d2", account=str(account_id), **window)
    assert [p["bytes_sent"] for p in as_operator.body["points"]] == [3]
    operator_bare = await get(api, "test-operator-token-f3b9c1d2", **window)
    assert (operator_bare.status, operator_bare.body["errors"][0]["field"]) == (422, "account")
    unknown = await get(api, "test-operator-token-f3b9c1d2", account="999999", **window)
    assert unknown.status == 404
    chosen = await get(api, token, account=str(account_id), **window)
    assert (chosen.status, chosen.body["errors"][0]["field"]) == (422, "account")
    edge_reply = await get(api, e.token, **window)
    assert edge_reply.status == 403


@pytest.mark.parametrize(
    ("params", "status", "field"),
    [
        ({"from": "2026-01-01T00:00:00Z", "to": "2026-04-03T00:05:00Z"}, 422, "to"),
        ({"from": "2026-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, 422, "to"),
        ({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, 422, "to"),
        ({"from": "yesterday", "to": "2026-01-01T00:00:00Z"}, 400, "from"),
        ({"from": "2026-01-01T00:00:00Z", "to": "2026-13-01T00:00:00Z"}, 400, "to"),
        ({"from": "2026-01-01T00:00:00", "to": "2026-01-02T00:00:00Z"}, 422, "from"),
        ({"to": "2026-01-02T00:00:00Z"}, 422, "from"),
        ({"from": "0001-01-01T00:00:00+08:00", "to": "0001-01-02T00:00:00Z"}, 422, "from"),
        ({"from": "9999-12-30T00:00:00Z", "to": "9999-12-31T00:00:00Z"}, 422, "from"),
        ({"from": "2026-01-01T00:00:00Z"}, 422, "to"),
        ({"from": "2026-01-01T00:01:00Z", "to": "2026-01-02T00:00:00Z"}, 422, "from"),
        (
            {"from": "2026-01-01T00:00:00Z", "to": "2026-01-01T00:30:00Z", "granularity": "1h"},
            422,
            "to",
        ),
        (
            {"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z", "granularity": "1d"},
            422,
            "from",
        ),
        (
            {"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z", "granularity": "1w"},
            422,
            "granularity",
        ),
        ({"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z", "page": "2"}, 422, "page"),
        (
            {"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z", "domain": "-x"},
            422,
            "domain",
        ),
    ],
)
async def test_bad_ranges_name_the_parameter(
    api: Api, acme: tuple[int, str], params: dict[str, str], status: int, field: str
) -> None:
    reply = await api.call("GET", f"/v1/usage?{urlencode(params)}", acme[1])
    assert reply.status == status, reply
    assert reply.body["errors"][0]["field"] == field
    assert reply.body["detail"].startswith(f"{field}: ")


async def test_longest_range_and_repeated_parameters(api: Api, acme: tuple[int, str]) -> None:
    _, token = acme
    longest = {"from": "2026-01-01T00:00:00+08:00", "to": "2026-04-03T00:00:00+08:00"}
    report = await get(api, token, granularity="1d", **longest)
    assert report.status == 200 and len(report.body["points"]) == 92
    assert [m["month"] for m in report.body["p95_mbps"]] == [
        "2026-01",
        "2026-02",
        "2026-03",
        "2026-04",
    ]
    twice = "/v1/usage?" + urlencode([("from", longest["from"]), ("from", longest["from"])])
    reply = await api.call("GET", twice, token)
    assert (reply.status, reply.body["errors"][0]["field"]) == (400, "from")


async def test_billing_days_follow_daylight_saving_time(api: Api) -> None:
    """Europe/Berlin on 2026-10-25 has 25 hours: 22:00Z on the 24th to 23:00Z on the 25th."""
    made = await api.ok(
        "POST",
        "/v1/accounts",
        body={"name": "b", "billing": "postpaid", "timezone": "Europe/Berlin"},
    )
    token = made["token"]
    await api.domain(token, "a.example")
    e = await edge(api)
    late = datetime(2026, 10, 25, 22, 55, tzinfo=UTC)  # 23:55 local, still the 25th
    await e.post([bucket("a.example", late, bytes_sent=37_500_000)])
    days = {"from": "2026-10-25T00:00:00+02:00", "to": "2026-10-27T00:00:00+01:00"}
    report = (await get(api, token, granularity="1d", **days)).body
    assert [(p["start"], p["end"], p["bytes_sent"]) for p in report["points"]] == [
        ("2026-10-24T22:00:00+00:00", "2026-10-25T23:00:00+00:00", 37_500_000),
        ("2026-10-25T23:00:00+00:00", "2026-10-26T23:00:00+00:00", 0),
    ]
    assert report["daily_peak_mbps"][0] == {"day": "2026-10-25", "mbps": "1.000000"}


def test_hit_ratio_and_bandwidth_are_exact_strings() -> None:
    assert _mbps(0) == "0.000000"
    assert _mbps(18_750) == "0.000500"  # exactly 0.0005
    assert _mbps(18_749) == "0.000500"  # 0.00049997 rounds half up
    assert _mbps(2**63 - 1) == "245956587649.460688"  # 2**63 - 1 bytes: no float would say so
    assert (
        _fixed(1, 3, 4) == "0.3333" and _fixed(2, 3, 4) == "0.6667" and _fixed(1, 1, 4) == "1.0000"
    )
    assert _fixed(1, 8, 2) == "0.13"  # 0.125, half up
