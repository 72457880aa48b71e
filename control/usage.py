"""Usage: the edges' metered buckets in (`POST /v1/edge/usage`), what an account was served out
(`GET /v1/usage`), and the byte counts billing rates (`usage_points`, `usage_total`).

Usage is money, so a batch counts exactly once: its id is stored with its buckets in one
transaction, and a batch whose id is already stored (a retry after a lost answer, or the same
batch posted twice at once) adds nothing. Counters only ever add up, so batches of several edges
and flushes may arrive in any order and late.

Each usage row keeps the account that owned its domain when its first bucket arrived, so a domain
deleted or later registered by someone else never moves past traffic between accounts. Buckets
of a domain no account has are kept (account null) but shown to no one. Bytes for a settled
billing day too old to be adjusted (`control.rating` decision 9) are kept and shown too, but
never billed: each batch bringing some is logged as a warning per account and day.

Bandwidth figures are exact until formatted: a bucket's is bytes x 8 / 300 s
(`control.rating.bucket_mbps`), written as a decimal string with 6 places, rounded half up.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field, PlainValidator, WithJsonSchema
from sqlalchemy import ColumnElement, func, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from control.api import (
    ACCOUNTS,
    EDGE,
    ENGINE,
    OPERATOR,
    QueryParam,
    RouteTable,
    account_of,
    caller,
    domain_name,
    now,
    reading,
)
from control.auth import Principal
from control.db import write_transaction
from control.digits import parse_digits
from control.domains import check_visible
from control.models import Body, Out
from control.problems import Problem
from control.rating import (
    ADJUST_DAYS,
    BUCKET_SECONDS,
    adjustable_since,
    billing_date,
    bucket_mbps,
    day_bounds,
    monthly_p95_bucket_bytes,
)
from control.scheduler import CLOCK
from control.schema import accounts, day_settlements, domains, usage, usage_batches
from edge.meter import FIELDS, Bucket, merge

log = logging.getLogger("control.usage")
routes = RouteTable()

MAX_BUCKETS = 100_000  # per batch
MAX_BATCH_ID = 200
MAX_RANGE = timedelta(days=92)
GRANULARITIES: dict[str, timedelta | None] = {
    "5m": timedelta(seconds=BUCKET_SECONDS),
    "1h": timedelta(hours=1),
    "1d": None,  # billing days in the account's time zone (23 to 25 hours with DST)
}
_MAX_COUNT = 2**63 - 1  # a BigInteger
_LAST_START = 253402300500  # the last window before year 10000 (a datetime's limit)
_LOOKUP_CHUNK = 500  # domain names per IN (...) when resolving owners
_MAX_ID_DIGITS = 10
_TICK = timedelta(microseconds=1)  # `to` is excluded: its last instant is `to` - 1 us
_SENT = FIELDS.index("bytes_sent")


# --- bodies and answers ---------------------------------------------------------------------------


def _bucket(data: object) -> Bucket:
    """`edge.meter.Bucket.from_json`, plus what the database can store (BigInteger counters, a
    start before year 10000): a bad value is the edge's 422, not the control plane's 500."""
    bucket = Bucket.from_json(data)
    if bucket.start > _LAST_START:
        raise ValueError(f"bucket start is beyond year 9999: {bucket.start}")
    if any(count > _MAX_COUNT for count in bucket.counts()):
        raise ValueError("bucket counts must be below 2**63")
    return bucket


_BUCKET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "edge.meter.Bucket.to_json: one domain's counts in one 5-minute window",
    "required": ["domain", "start", *FIELDS],
    "additionalProperties": False,
    "properties": {
        "domain": {"type": "string", "minLength": 1},
        "start": {
            "type": "integer",
            "minimum": 0,
            "multipleOf": BUCKET_SECONDS,
            "description": "seconds since the UTC epoch",
        },
        **{name: {"type": "integer", "minimum": 0} for name in FIELDS},
    },
}

UsageBucket = Annotated[Bucket, PlainValidator(_bucket), WithJsonSchema(_BUCKET_SCHEMA)]


class UsageBatch(Body):
    """`POST /v1/edge/usage`: a spooled batch (edge.spool.Batch.to_json)."""

    batch: Annotated[str, Field(min_length=1, max_length=MAX_BATCH_ID)]
    edge: Annotated[
        str,
        Field(
            max_length=MAX_BATCH_ID,
            description="the edge's own id (the token says which edge posts)",
        ),
    ]
    buckets: Annotated[list[UsageBucket], Field(max_length=MAX_BUCKETS)]


class UsageAck(Out):
    batch: str
    duplicate: bool = Field(description="true: this batch id was already counted; nothing added")


Mbps = Annotated[
    str,
    Field(
        pattern=r"^[0-9]+\.[0-9]{6}$",
        description="Mbps (10**6 bit/s) of a 5-minute bucket: bytes x 8 / 300 s, half up",
    ),
]


class UsageStatus(Out):
    s1xx: int = Field(alias="1xx")
    s2xx: int = Field(alias="2xx")
    s3xx: int = Field(alias="3xx")
    s4xx: int = Field(alias="4xx")
    s5xx: int = Field(alias="5xx")


class UsagePoint(Out):
    start: datetime
    end: datetime
    requests: int
    bytes_sent: int
    body_bytes: int
    origin_bytes: int
    hits: int
    misses: int
    passes: int
    refused: int
    hit_ratio: Annotated[str, Field(pattern=r"^[01]\.[0-9]{4}$")] | None = Field(
        description="hits / (hits + misses) to 4 places, half up; null without either"
    )
    bandwidth_peak_mbps: Mbps = Field(description="the busiest 5-minute bucket of the interval")
    status: UsageStatus


class UsageDayPeak(Out):
    day: date
    mbps: Mbps


class UsageMonthP95(Out):
    month: Annotated[str, Field(pattern=r"^[0-9]{4}-[0-9]{2}$")]
    mbps: Mbps


class UsageReport(Out):
    account: int
    domain: str | None = Field(description="null: every domain the caller may see")
    timezone: str = Field(description="the account's, which billing days and months follow")
    granularity: Literal["5m", "1h", "1d"]
    points: list[UsagePoint]
    daily_peak_mbps: list[UsageDayPeak] = Field(
        description="per billing day overlapping the range: its busiest 5-minute bucket"
    )
    p95_mbps: list[UsageMonthP95] = Field(
        description="per calendar month (account time zone) overlapping the range: the 95th "
        "percentile of its 5-minute buckets, missing ones as zero (drop the top 5 %); of a month "
        "in progress, over the buckets begun so far"
    )


# --- ingest ---------------------------------------------------------------------------------------


@routes.route_with_body(
    "POST",
    "/v1/edge/usage",
    "Store a batch of usage buckets; a batch id already stored adds nothing",
    UsageBatch,
    who=EDGE,
    response=UsageAck,
)
async def post_usage(request: web.Request, body: UsageBatch) -> web.StreamResponse:
    edge_id = caller(request).edge_id
    buckets = merge(body.buckets)  # one row per (domain, window): an upsert touches a row once
    # Usage is not a change edges follow: no need to wake the feed, as `writing` does.
    unbilled: list[tuple[int, date, int]] = []
    async with write_transaction(request.app[ENGINE]) as conn:
        fresh = await _claim(conn, body.batch, edge_id, len(body.buckets))
        if fresh:
            await _add(conn, buckets, await _owners(conn, {b.domain for b in buckets}))
            unbilled = await _too_late(conn, buckets, request.app[CLOCK].now())
    for account_id, day, nbytes in unbilled:  # after the commit: they are stored
        log.warning(
            "account %d: %d bytes sent on billing day %s arrived more than %d days late; "
            "that day is settled for good, so they are not billed (GET /v1/usage shows them)",
            account_id,
            nbytes,
            day,
            ADJUST_DAYS,
        )
    return web.json_response({"batch": body.batch, "duplicate": not fresh})


def _insert(conn: AsyncConnection) -> Any:
    """The dialect's INSERT, which has ON CONFLICT (both databases spell it alike)."""
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


async def _claim(conn: AsyncConnection, batch_id: str, edge_id: int | None, count: int) -> bool:
    """Record the batch; False if its id is already recorded. ON CONFLICT DO NOTHING waits for a
    concurrent insert of the same id to commit or roll back, so of two simultaneous posts
    exactly one claims the batch, and neither fails."""
    stmt = (
        _insert(conn)(usage_batches)
        .values(batch_id=batch_id, edge_id=edge_id, received_at=now(), buckets=count)
        .on_conflict_do_nothing(index_elements=[usage_batches.c.batch_id])
        .returning(usage_batches.c.batch_id)
    )
    return (await conn.execute(stmt)).first() is not None


async def _owners(conn: AsyncConnection, names: set[str]) -> dict[str, int]:
    """The account owning each of `names` that is a registered domain."""
    ordered = sorted(names)
    owners: dict[str, int] = {}
    for i in range(0, len(ordered), _LOOKUP_CHUNK):
        rows = await conn.execute(
            select(domains.c.name, domains.c.account_id).where(
                domains.c.name.in_(ordered[i : i + _LOOKUP_CHUNK])
            )
        )
        owners.update({row.name: row.account_id for row in rows})
    return owners


async def _add(conn: AsyncConnection, buckets: Sequence[Bucket], owners: dict[str, int]) -> None:
    """Add every bucket's counts to its usage row. A row's owner is the one it got first; one
    first stored for an unregistered domain takes the owner of a later bucket. Rows are written
    in `merge`'s order (window, domain), so concurrent batches lock shared rows in one order
    and never deadlock on PostgreSQL."""
    if not buckets:
        return
    stmt = _insert(conn)(usage)
    set_: dict[str, Any] = {name: usage.c[name] + stmt.excluded[name] for name in FIELDS}
    set_["account_id"] = func.coalesce(usage.c.account_id, stmt.excluded.account_id)
    stmt = stmt.on_conflict_do_update(index_elements=[usage.c.domain, usage.c.start], set_=set_)
    rows = [
        {
            "domain": b.domain,
            "start": datetime.fromtimestamp(b.start, UTC),
            "account_id": owners.get(b.domain),
            **dict(zip(FIELDS, b.counts(), strict=True)),
        }
        for b in buckets
    ]
    await conn.execute(stmt, rows)


async def _too_late(
    conn: AsyncConnection, buckets: Sequence[Bucket], at: datetime
) -> list[tuple[int, date, int]]:
    """The bytes of `buckets` that billing will never charge (rating decision 9), as (account,
    billing day, bytes): those on a settled day older than `adjustable_since(at)`. The account
    is the usage row's (its first owner), as for billing."""
    # A bucket on such a day starts more than ADJUST_DAYS - 1 days before `at` in any zone (a
    # day is 23 to 25 hours long), so recent batches, nearly all of them, cost no query.
    bound = at - timedelta(days=ADJUST_DAYS - 1)
    old: dict[tuple[str, datetime], int] = {}
    for bucket in buckets:
        start = datetime.fromtimestamp(bucket.start, UTC)
        if start < bound and bucket.bytes_sent:
            old[(bucket.domain, start)] = bucket.bytes_sent
    keys = list(old)
    by_day: dict[tuple[int, date], int] = {}
    for i in range(0, len(keys), _LOOKUP_CHUNK):
        rows = await conn.execute(
            select(usage.c.domain, usage.c.start, usage.c.account_id, accounts.c.timezone)
            .join(accounts, accounts.c.id == usage.c.account_id)
            .where(tuple_(usage.c.domain, usage.c.start).in_(keys[i : i + _LOOKUP_CHUNK]))
        )
        for row in rows:
            day = billing_date(row.start, row.timezone)
            if day < adjustable_since(at, row.timezone):
                key = (row.account_id, day)
                by_day[key] = by_day.get(key, 0) + old[(row.domain, row.start)]
    if not by_day:
        return []
    settled = await conn.execute(
        select(day_settlements.c.account_id, day_settlements.c.day).where(
            tuple_(day_settlements.c.account_id, day_settlements.c.day).in_(list(by_day))
        )
    )
    return sorted((row.account_id, row.day, by_day[(row.account_id, row.day)]) for row in settled)


# --- for billing ----------------------------------------------------------------------------------


async def usage_points(
    conn: AsyncConnection, account_id: int, start: datetime, end: datetime
) -> list[tuple[datetime, int]]:
    """The account's 5-minute buckets in [start, end) with bytes sent (summed over its domains),
    oldest first; buckets without bytes are left out."""
    total = func.sum(usage.c.bytes_sent)
    rows = await conn.execute(
        select(usage.c.start, total)
        .where(usage.c.account_id == account_id, usage.c.start >= start, usage.c.start < end)
        .group_by(usage.c.start)
        .having(total > 0)
        .order_by(usage.c.start)
    )
    return [(row[0], int(row[1])) for row in rows]


async def usage_total(
    conn: AsyncConnection, account_id: int, start: datetime, end: datetime
) -> int:
    """Bytes sent for the account in [start, end), all its domains."""
    total = (
        await conn.execute(
            select(func.coalesce(func.sum(usage.c.bytes_sent), 0)).where(
                usage.c.account_id == account_id, usage.c.start >= start, usage.c.start < end
            )
        )
    ).scalar_one()
    return int(total)


# --- the customer's view --------------------------------------------------------------------------

_QUERY = (
    QueryParam(
        "from",
        {"type": "string", "format": "date-time"},
        "required: the start (ISO 8601 with a UTC offset)",
    ),
    QueryParam(
        "to",
        {"type": "string", "format": "date-time"},
        "required: the end, excluded; at most 92 days after from",
    ),
    QueryParam(
        "granularity",
        {"type": "string", "enum": list(GRANULARITIES), "default": "1h"},
        "5m and 1h: UTC-aligned; 1d: billing days (account time zone); from and to must lie on "
        "interval boundaries",
    ),
    QueryParam("domain", {"type": "string"}, "one domain; absent: every domain the caller sees"),
    QueryParam("account", {"type": "integer", "minimum": 1}, "the account (operator only)"),
)
_PARAMS = frozenset(q.name for q in _QUERY)
# Before 2000 some zones' days did not start on 5-minute buckets (control.rating.day_bounds).
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_LATEST = datetime(9000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class _Query:
    start: datetime
    end: datetime
    granularity: str
    domain: str | None
    account: int | None


def _bad(status: int, field: str, problem: str) -> Problem:
    return Problem(status, f"{field}: {problem}", errors=[{"field": field, "problem": problem}])


def query_instant(raw: str | None, field: str) -> datetime:
    """The instant `raw` names (ISO 8601 with a UTC offset, years 2000 to 8999), in UTC; a 422
    (400 when it is not a date-time at all) naming `field`."""
    if raw is None:
        raise _bad(422, field, "required (ISO 8601 date-time with offset)")
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise _bad(400, field, f"not an ISO 8601 date-time: {raw[:100]!r}") from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise _bad(422, field, "needs a UTC offset (like +08:00 or Z)")
    if not _EARLIEST <= value < _LATEST:  # also keeps month arithmetic clear of year 1 and 9999
        raise _bad(422, field, f"must be from {_EARLIEST.year} to {_LATEST.year - 1}")
    return value.astimezone(UTC)


def _query(request: web.Request, principal: Principal) -> _Query:
    """The query parameters, checked on their own (alignment needs the account's zone)."""
    query = request.query
    for name in query:
        if name not in _PARAMS:
            raise _bad(422, name, "unknown parameter")
        if len(query.getall(name)) > 1:
            raise _bad(400, name, "given more than once")
    start = query_instant(query.get("from"), "from")
    end = query_instant(query.get("to"), "to")
    if start >= end:
        raise _bad(422, "to", "must be after from")
    if end - start > MAX_RANGE:
        raise _bad(422, "to", f"at most {MAX_RANGE.days} days after from")
    granularity = query.get("granularity", "1h")
    if granularity not in GRANULARITIES:
        raise _bad(422, "granularity", f"one of {', '.join(GRANULARITIES)}")
    raw_domain = query.get("domain")
    domain = None if raw_domain is None else domain_name(raw_domain, "domain")
    raw_account = query.get("account")
    account = None
    if principal.kind == "operator":
        if raw_account is None:
            raise _bad(422, "account", "required with the operator's token")
        account = parse_digits(raw_account, _MAX_ID_DIGITS)
        if account is None:
            raise _bad(400, "account", "must be an account id")
    elif raw_account is not None:
        raise _bad(422, "account", "only the operator chooses the account")
    return _Query(start, end, granularity, domain, account)


def _intervals(q: _Query, tz: str) -> list[tuple[datetime, datetime]]:
    """[start, end) of every point; 422 unless `from` and `to` lie on interval boundaries."""
    step = GRANULARITIES[q.granularity]
    if step is None:
        for field, value in (("from", q.start), ("to", q.end)):
            try:
                aligned = day_bounds(billing_date(value, tz), tz)[0] == value
            except ValueError:  # a zone whose days do not start on 5-minute buckets
                aligned = False
            if not aligned:
                raise _bad(422, field, f"must be a midnight in {tz} (the billing day) for 1d")
        days = []
        day = billing_date(q.start, tz)
        while (bounds := day_bounds(day, tz))[0] < q.end:
            days.append(bounds)
            day += timedelta(days=1)
        return days
    seconds = int(step.total_seconds())
    for field, value in (("from", q.start), ("to", q.end)):
        if value.microsecond or int(value.timestamp()) % seconds:
            raise _bad(422, field, f"must be a UTC multiple of {q.granularity} for {q.granularity}")
    count = (q.end - q.start) // step
    return [(q.start + i * step, q.start + (i + 1) * step) for i in range(count)]


def _months(first: date, last: date, tz: str) -> list[tuple[str, datetime, datetime]]:
    """Every calendar month from `first`'s to `last`'s: its name and UTC bounds."""
    months = []
    year, month = first.year, first.month
    while (year, month) <= (last.year, last.month):
        following = (year + month // 12, month % 12 + 1)
        start = day_bounds(date(year, month, 1), tz)[0]
        end = day_bounds(date(*following, 1), tz)[0]
        months.append((f"{year:04d}-{month:02d}", start, end))
        year, month = following
    return months


@routes.route(
    "GET",
    "/v1/usage",
    "Traffic, requests, hit ratio and bandwidth of the account or one domain",
    who=ACCOUNTS | OPERATOR,
    scope="usage:read",
    query=_QUERY,
    response=UsageReport,
)
async def get_usage(request: web.Request) -> web.StreamResponse:
    principal = caller(request)
    q = _query(request, principal)
    at = request.app[CLOCK].now()
    async with reading(request) as conn:
        account_id = q.account if q.account is not None else account_of(principal)
        tz = (
            await conn.execute(select(accounts.c.timezone).where(accounts.c.id == account_id))
        ).scalar_one_or_none()
        if tz is None:
            raise Problem(404, f"no account {account_id}")
        intervals = _intervals(q, tz)
        where = [usage.c.account_id == account_id]
        if q.domain is not None:
            await check_visible(conn, principal, account_id, q.domain, usage)
            where.append(usage.c.domain == q.domain)
        elif principal.domains is not None:
            where.append(usage.c.domain.in_(sorted(principal.domains)))
        months = _months(billing_date(q.start, tz), billing_date(q.end - _TICK, tz), tz)
        slots = await _slots(conn, where, months[0][1], months[-1][2])
    return web.json_response(
        {
            "account": account_id,
            "domain": q.domain,
            "timezone": tz,
            "granularity": q.granularity,
            "points": _points(intervals, slots),
            "daily_peak_mbps": _daily_peaks(q, tz, slots),
            "p95_mbps": [
                {"month": name, "mbps": _mbps(_p95(slots, start, end, at))}
                for name, start, end in months
            ],
        }
    )


async def _slots(
    conn: AsyncConnection, where: list[ColumnElement[bool]], start: datetime, end: datetime
) -> dict[datetime, list[int]]:
    """FIELDS' sums per 5-minute bucket in [start, end), over the selected domains."""
    rows = await conn.execute(
        select(usage.c.start, *(func.sum(usage.c[name]) for name in FIELDS))
        .where(*where, usage.c.start >= start, usage.c.start < end)
        .group_by(usage.c.start)
        .order_by(usage.c.start)
    )
    return {row[0]: [int(n) for n in row[1:]] for row in rows}


def _points(
    intervals: list[tuple[datetime, datetime]], slots: dict[datetime, list[int]]
) -> list[dict[str, Any]]:
    starts = [start for start, _ in intervals]
    sums = [[0] * len(FIELDS) for _ in intervals]
    peaks = [0] * len(intervals)
    for at, counts in slots.items():
        i = bisect.bisect_right(starts, at) - 1
        if i < 0 or at >= intervals[i][1]:
            continue
        sums[i] = [a + b for a, b in zip(sums[i], counts, strict=True)]
        peaks[i] = max(peaks[i], counts[_SENT])
    return [
        _point(start, end, dict(zip(FIELDS, total, strict=True)), peak)
        for (start, end), total, peak in zip(intervals, sums, peaks, strict=True)
    ]


def _point(start: datetime, end: datetime, total: dict[str, int], peak: int) -> dict[str, Any]:
    looked_up = total["hits"] + total["misses"]
    return {
        "start": start.isoformat(),
        "end": end.isoformat(),
        **{name: total[name] for name in FIELDS if not name.startswith("status_")},
        "hit_ratio": _fixed(total["hits"], looked_up, 4) if looked_up else None,
        "bandwidth_peak_mbps": _mbps(peak),
        "status": {
            name.removeprefix("status_"): total[name]
            for name in FIELDS
            if name.startswith("status_")
        },
    }


def _daily_peaks(q: _Query, tz: str, slots: dict[datetime, list[int]]) -> list[dict[str, str]]:
    """The busiest bucket of every billing day overlapping the range (the whole day's)."""
    peaks: dict[date, int] = {}
    day, last = billing_date(q.start, tz), billing_date(q.end - _TICK, tz)
    while day <= last:
        peaks[day] = 0
        day += timedelta(days=1)
    for at, counts in slots.items():
        day = billing_date(at, tz)
        if day in peaks:
            peaks[day] = max(peaks[day], counts[_SENT])
    return [{"day": day.isoformat(), "mbps": _mbps(peak)} for day, peak in peaks.items()]


def _p95(slots: dict[datetime, list[int]], start: datetime, end: datetime, at: datetime) -> int:
    """The 95th-percentile bucket of the month [start, end) over its 5-minute slots begun by
    `at` (missing ones zero): all of a past month's, and of a month in progress only those so
    far, or the slots still to come would count as zeros and pull it down (to 0 for most of the
    month's first day and a half: 5 % of a month's slots). A bucket stamped after `at` (an edge
    whose clock runs ahead) counts, with the slots up to it."""
    points = {slot: counts[_SENT] for slot, counts in slots.items() if start <= slot < end}
    last = max([at, *points])
    begun = (min(last, end - _TICK) - start) // timedelta(seconds=BUCKET_SECONDS) + 1
    return monthly_p95_bucket_bytes(list(points.values()), slots=max(begun, 0))


def _mbps(bucket_bytes: int) -> str:
    exact = bucket_mbps(bucket_bytes)
    return _fixed(exact.numerator, exact.denominator, 6)


def _fixed(numerator: int, denominator: int, places: int) -> str:
    """numerator / denominator as a decimal string with `places` places, rounded half up,
    exactly (integers only: no float, no Decimal context precision)."""
    scale = 10**places
    scaled = (2 * numerator * scale + denominator) // (2 * denominator)
    whole, part = divmod(scaled, scale)
    return f"{whole}.{part:0{places}d}"
