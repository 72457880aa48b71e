"""Unit tests for control.rating: the agreement's money rules, figures asserted to the fen.

Scenarios (a month with two packages, one expiring mid-month, overage, a tier crossed mid-day,
arrears and penalty, late usage), one table per rule, and hypothesis properties: conservation,
no negative remainders, the days of a month add up to the month, determinism, adjustment
additivity.
"""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.rating import (
    BUCKET_SECONDS,
    AccountState,
    AccountTerms,
    BillLine,
    Bucket,
    Package,
    PriceList,
    TrafficTier,
    adjust_day,
    apply_payment,
    billing_date,
    bucket_bps,
    bucket_mbps,
    buckets_in_day,
    consume_packages,
    cumulative_traffic_value,
    daily_bandwidth_charge_fen,
    daily_peak_bucket_bytes,
    day_bounds,
    late_penalty_fen,
    line_totals,
    may_serve,
    monthly_p95_bucket_bytes,
    monthly_traffic_charge_fen,
    p95_drop_count,
    round_half_up_fen,
    settle_day,
    termination_refund,
    traffic_charge_fen,
    traffic_lines,
    unpaid_fees_fen,
    voided_bytes,
)

GB = 10**9
SH = "Asia/Shanghai"
FIVE = timedelta(seconds=BUCKET_SECONDS)

PRICES = PriceList(
    traffic_tiers=(
        TrafficTier(100, Decimal("24")),  # 0.24 yuan/GB up to 100 GB
        TrafficTier(500, Decimal("23.5")),  # 0.235 yuan/GB: half a fen
        TrafficTier(None, Decimal("21")),
    ),
    fen_per_mbps_day=Decimal("1000"),  # 10 yuan per Mbps-day
)
TRAFFIC = AccountTerms(billing="prepaid", charge_by="traffic", timezone=SH)
BANDWIDTH = AccountTerms(billing="postpaid", charge_by="bandwidth", timezone=SH)


def midnight(day: date, tz: str = SH) -> datetime:
    return day_bounds(day, tz)[0]


def day_usage(day: date, total: int, tz: str = SH, at: int = 100) -> list[Bucket]:
    """`total` bytes of one day in one bucket, the `at`-th bucket of the day."""
    return [Bucket(midnight(day, tz) + at * FIVE, total)] if total else []


# --------------------------------------------------------------------------------------------
# Rounding


@pytest.mark.parametrize(
    ("amount", "fen"),
    [
        (Decimal("2.5"), 3),
        (Decimal("2.4999999"), 2),
        (Decimal("3.5"), 4),  # half up, not half even
        (Decimal("0"), 0),
        (Decimal("-2.5"), -3),  # symmetric (ROUND_HALF_UP)
        (Fraction(5, 2), 3),
        (Fraction(1, 3), 0),
        (Fraction(2, 3), 1),
        (7, 7),
    ],
)
def test_round_half_up_fen(amount: Decimal | Fraction | int, fen: int) -> None:
    assert round_half_up_fen(amount) == fen


def test_round_refuses_float() -> None:
    with pytest.raises(TypeError):
        round_half_up_fen(2.5)  # type: ignore[arg-type]


@given(st.decimals(min_value=-(10**9), max_value=10**9, places=4))
def test_round_matches_decimal_round_half_up(amount: Decimal) -> None:
    from decimal import ROUND_HALF_UP

    assert round_half_up_fen(amount) == int(amount.quantize(Decimal(1), rounding=ROUND_HALF_UP))


# --------------------------------------------------------------------------------------------
# Time zones


def test_billing_date_shanghai() -> None:
    assert billing_date(datetime(2026, 3, 1, 15, 59, 59, tzinfo=UTC), SH) == date(2026, 3, 1)
    assert billing_date(datetime(2026, 3, 1, 16, 0, tzinfo=UTC), SH) == date(2026, 3, 2)
    assert day_bounds(date(2026, 3, 2), SH) == (
        datetime(2026, 3, 1, 16, 0, tzinfo=UTC),
        datetime(2026, 3, 2, 16, 0, tzinfo=UTC),
    )
    assert buckets_in_day(date(2026, 3, 2), SH) == 288


def test_default_zone_is_shanghai() -> None:
    assert billing_date(datetime(2026, 3, 1, 16, 0, tzinfo=UTC)) == date(2026, 3, 2)


def test_berlin_dst_days() -> None:
    # spring forward: 23 hours; fall back: 25 hours; an ordinary day: 24
    assert day_bounds(date(2026, 3, 29), "Europe/Berlin") == (
        datetime(2026, 3, 28, 23, 0, tzinfo=UTC),
        datetime(2026, 3, 29, 22, 0, tzinfo=UTC),
    )
    assert buckets_in_day(date(2026, 3, 29), "Europe/Berlin") == 276
    assert day_bounds(date(2026, 10, 25), "Europe/Berlin") == (
        datetime(2026, 10, 24, 22, 0, tzinfo=UTC),
        datetime(2026, 10, 25, 23, 0, tzinfo=UTC),
    )
    assert buckets_in_day(date(2026, 10, 25), "Europe/Berlin") == 300
    assert buckets_in_day(date(2026, 7, 1), "Europe/Berlin") == 288
    # 02:30 local on the fall-back day exists twice; both are that day
    assert billing_date(datetime(2026, 10, 25, 0, 30, tzinfo=UTC), "Europe/Berlin") == date(
        2026, 10, 25
    )
    assert billing_date(datetime(2026, 10, 25, 1, 30, tzinfo=UTC), "Europe/Berlin") == date(
        2026, 10, 25
    )


def test_midnight_skipped_by_dst() -> None:
    # Havana springs forward at 00:00 -> 01:00: the day starts at 01:00 local (05:00 UTC)
    start, _ = day_bounds(date(2026, 3, 8), "America/Havana")
    assert start == datetime(2026, 3, 8, 5, 0, tzinfo=UTC)
    assert billing_date(start, "America/Havana") == date(2026, 3, 8)
    assert billing_date(start - timedelta(microseconds=1), "America/Havana") == date(2026, 3, 7)
    assert buckets_in_day(date(2026, 3, 8), "America/Havana") == 276


def test_unaligned_historical_offset_refused() -> None:
    with pytest.raises(ValueError, match="5-minute"):
        day_bounds(date(1900, 1, 1), SH)  # local mean time, +08:05:43


def test_naive_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        billing_date(datetime(2026, 3, 1, 12, 0), SH)
    with pytest.raises(ValueError, match="aware"):
        Bucket(datetime(2026, 3, 1, 12, 0), 1)


ZONES = ["Asia/Shanghai", "Europe/Berlin", "America/New_York", "America/Havana", "UTC"]
ZONES += ["Asia/Kathmandu", "Pacific/Chatham", "Australia/Lord_Howe"]


@given(
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2037, 12, 31)),
    st.sampled_from(ZONES),
)
def test_instant_falls_in_its_billing_day(naive: datetime, tz: str) -> None:
    instant = naive.replace(tzinfo=UTC)
    day = billing_date(instant, tz)
    start, end = day_bounds(day, tz)
    assert start <= instant < end
    assert day_bounds(day + timedelta(days=1), tz)[0] == end  # days tile the time line
    assert billing_date(start, tz) == day
    assert billing_date(end - timedelta(microseconds=1), tz) == day
    assert 23 * 12 <= buckets_in_day(day, tz) <= 25 * 12


# --------------------------------------------------------------------------------------------
# Bandwidth, peak, 95th percentile


def test_bucket_bandwidth() -> None:
    assert bucket_bps(300) == 8
    assert bucket_bps(1) == Fraction(8, 300)
    assert bucket_mbps(37_500_000) == 1  # 37.5 MB in 5 minutes = 1 Mbps
    assert bucket_mbps(3_750_000_000) == 100


def test_daily_peak_of_288_buckets() -> None:
    buckets = [1000 * i for i in range(288)]
    buckets[137] = 10**9
    assert daily_peak_bucket_bytes(buckets) == 10**9
    assert daily_peak_bucket_bytes([]) == 0
    assert daily_peak_bucket_bytes([0] * 288) == 0
    with pytest.raises(ValueError):
        daily_peak_bucket_bytes([1, -1])


@pytest.mark.parametrize(
    ("n", "dropped"), [(0, 0), (19, 0), (20, 1), (39, 1), (40, 2), (288, 14), (8928, 446)]
)
def test_p95_drop_count(n: int, dropped: int) -> None:
    assert p95_drop_count(n) == dropped


def test_monthly_p95() -> None:
    # a 31-day month: 8,928 points, 446 dropped: the 447th highest point is the 95th
    points = list(range(1, 8929))
    random.Random(5).shuffle(points)
    assert monthly_p95_bucket_bytes(points) == 8928 - 446
    assert monthly_p95_bucket_bytes(list(range(1, 21))) == 19  # 20 points: top one dropped
    assert monthly_p95_bucket_bytes(list(range(1, 20))) == 19  # 19 points: none dropped
    assert monthly_p95_bucket_bytes([]) == 0
    # missing buckets are zeros: 100 busy points in a 30-day month (8,640 slots, 432 dropped)
    assert monthly_p95_bucket_bytes([10**6] * 100, slots=8640) == 0
    assert monthly_p95_bucket_bytes([10**6] * 433, slots=8640) == 10**6
    with pytest.raises(ValueError):
        monthly_p95_bucket_bytes([1, 2, 3], slots=2)


@given(st.lists(st.integers(0, 10**12), max_size=600), st.integers(0, 100))
def test_p95_property(points: list[int], padding: int) -> None:
    n = len(points) + padding
    p95 = monthly_p95_bucket_bytes(points, slots=n)
    if n == 0:
        assert p95 == 0
        return
    padded = points + [0] * padding
    dropped = n * 5 // 100
    assert sum(1 for x in padded if x > p95) <= dropped
    assert sum(1 for x in padded if x >= p95) >= dropped + 1
    assert p95 == sorted(padded)[n - 1 - dropped]


# --------------------------------------------------------------------------------------------
# Price list and traffic rating


def test_price_list_validation() -> None:
    with pytest.raises(ValueError, match="unbounded"):
        PriceList((TrafficTier(10, Decimal(1)),), Decimal(1))
    with pytest.raises(ValueError, match="increase"):
        PriceList(
            (
                TrafficTier(10, Decimal(1)),
                TrafficTier(10, Decimal(1)),
                TrafficTier(None, Decimal(1)),
            ),
            Decimal(1),
        )
    with pytest.raises(ValueError, match="rate"):
        PriceList((TrafficTier(None, Decimal(-1)),), Decimal(1))
    with pytest.raises(ValueError, match="rate"):
        PriceList((TrafficTier(None, 1.5),), Decimal(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prime"):
        PriceList((TrafficTier(None, Decimal(1)),), Decimal(1), gb_bytes=3 * 10**8)
    assert PriceList((TrafficTier(None, Decimal(1)),), Decimal(1), gb_bytes=2**30).gb_bytes


def test_monthly_charge_tiers() -> None:
    assert monthly_traffic_charge_fen(0, PRICES) == 0
    assert monthly_traffic_charge_fen(100 * GB, PRICES) == 2400
    assert monthly_traffic_charge_fen(110 * GB, PRICES) == 2400 + 235
    assert monthly_traffic_charge_fen(600 * GB, PRICES) == 2400 + 400 * 235 // 10 + 100 * 21
    # 1 GB at 23.5 fen: 23.5 rounds up to 24
    assert monthly_traffic_charge_fen(101 * GB, PRICES) == 2424
    # 1 byte: 24e-9 fen, rounds to 0
    assert monthly_traffic_charge_fen(1, PRICES) == 0
    assert cumulative_traffic_value(1, PRICES) == Fraction(24, GB)


def test_daily_charge_crossing_a_tier_mid_day() -> None:
    # 90 GB before, 30 GB today: 10 GB at 24, 20 GB at 23.5
    assert traffic_charge_fen(90 * GB, 30 * GB, PRICES) == 240 + 470
    lines = traffic_lines(90 * GB, 30 * GB, PRICES)
    assert lines == (
        BillLine("traffic", Decimal(10), "GB", Decimal(24), 240, "tier 1"),
        BillLine("traffic", Decimal(20), "GB", Decimal("23.5"), 470, "tier 2"),
    )


def test_exactly_on_a_tier_boundary() -> None:
    assert traffic_lines(0, 100 * GB, PRICES) == (
        BillLine("traffic", Decimal(100), "GB", Decimal(24), 2400, "tier 1"),
    )
    # the next byte is in tier 2
    assert [line.ref for line in traffic_lines(100 * GB, 1, PRICES)] == ["tier 2"]
    assert traffic_lines(100 * GB, 0, PRICES) == ()
    assert traffic_charge_fen(100 * GB, 0, PRICES) == 0


def test_daily_rounding_is_the_difference_of_cumulatives() -> None:
    # 1 GB/day at 23.5 fen in tier 2: alternating 24 and 23 fen, never drifting
    charges = [traffic_charge_fen(100 * GB + d * GB, GB, PRICES) for d in range(10)]
    assert charges == [24, 23] * 5
    assert sum(charges) == monthly_traffic_charge_fen(110 * GB, PRICES) - 2400


def test_gb_of_2_30_bytes() -> None:
    prices = PriceList((TrafficTier(None, Decimal(10)),), Decimal(0), gb_bytes=2**30)
    assert monthly_traffic_charge_fen(2**30, prices) == 10
    (line,) = traffic_lines(0, 2**29, prices)
    assert line.quantity == Decimal("0.5")
    assert line.amount_fen == 5


rates = st.decimals(min_value=0, max_value=100, places=3, allow_nan=False, allow_infinity=False)


@st.composite
def price_lists(draw: st.DrawFn) -> PriceList:
    bounds = sorted(set(draw(st.lists(st.integers(1, 60), max_size=3))))
    tiers = [TrafficTier(b, draw(rates)) for b in bounds] + [TrafficTier(None, draw(rates))]
    gb = draw(st.sampled_from([1000, 10**9, 2**30, 10**6]))
    return PriceList(tuple(tiers), draw(rates), gb_bytes=gb)


@given(price_lists(), st.data())
def test_sum_of_daily_charges_is_the_monthly_charge(prices: PriceList, data: st.DataObject) -> None:
    days = data.draw(st.lists(st.integers(0, 4 * prices.gb_bytes), min_size=28, max_size=31))
    month_to_date = 0
    total_fen = 0
    per_tier: dict[str, int] = {}
    for added in days:
        charge = traffic_charge_fen(month_to_date, added, prices)
        lines = traffic_lines(month_to_date, added, prices)
        assert charge >= 0
        assert sum(line.amount_fen for line in lines) == charge
        assert sum(Fraction(line.quantity) for line in lines) * prices.gb_bytes == added
        for line in lines:
            per_tier[line.ref] = per_tier.get(line.ref, 0) + line.amount_fen
        total_fen += charge
        month_to_date += added
    assert total_fen == monthly_traffic_charge_fen(month_to_date, prices)
    assert per_tier == {
        line.ref: line.amount_fen for line in traffic_lines(0, month_to_date, prices)
    }


# --------------------------------------------------------------------------------------------
# Packages


def pkg(
    pid: str, quota_gb: int, start: datetime, end: datetime, left_gb: int | None = None
) -> Package:
    left = quota_gb if left_gb is None else left_gb
    return Package(pid, quota_gb * GB, left * GB, start, end)


def test_earliest_expiry_first_and_overage() -> None:
    t0 = midnight(date(2026, 3, 10))
    late = pkg("late", 10, t0 - timedelta(days=5), t0 + timedelta(days=30))
    soon = pkg("soon", 3, t0 - timedelta(days=1), t0 + timedelta(days=2))
    result = consume_packages([late, soon], [Bucket(t0, 5 * GB), Bucket(t0 + FIVE, 10 * GB)])
    assert result.by_package == (("soon", 3 * GB), ("late", 10 * GB))
    assert result.uncovered_bytes == 2 * GB  # 5.1c: beyond the packages
    assert [p.remaining_bytes for p in result.packages] == [0, 0]


def test_only_packages_valid_at_the_usage_time() -> None:
    t0 = midnight(date(2026, 3, 10))
    future = pkg("future", 10, t0 + 12 * 12 * FIVE, t0 + timedelta(days=30))  # from noon
    past = pkg("past", 10, t0 - timedelta(days=30), t0)  # expired at midnight
    result = consume_packages([future, past], [Bucket(t0, GB), Bucket(t0 + 144 * FIVE, 2 * GB)])
    assert dict(result.by_package) == {"past": 0, "future": 2 * GB}
    assert result.uncovered_bytes == GB


def test_package_expiring_at_midnight() -> None:
    day = date(2026, 3, 14)
    start, end = day_bounds(day, SH)
    p = pkg("p", 10, start - timedelta(days=10), end)  # expires at the midnight ending the 14th
    last = Bucket(end - FIVE, GB)  # 23:55 local: covered
    first_next = Bucket(end, GB)  # 00:00 next day: not
    assert consume_packages([p], [last]).uncovered_bytes == 0
    assert consume_packages([p], [first_next]).uncovered_bytes == GB
    assert voided_bytes(p, end - timedelta(microseconds=1)) == 0
    assert voided_bytes(p, end) == 10 * GB
    settled = settle_day(TRAFFIC, PRICES, day, [last], AccountState(0, packages=(p,)))
    assert settled.voided == (("p", 9 * GB),)
    nxt = settle_day(TRAFFIC, PRICES, day + timedelta(days=1), [first_next], settled.state)
    assert nxt.voided == ()
    assert nxt.charge_fen == 24


def test_package_validation() -> None:
    t0 = midnight(date(2026, 3, 10))
    with pytest.raises(ValueError):
        Package("p", 10, 11, t0, t0 + FIVE)
    with pytest.raises(ValueError):
        Package("p", 10, 5, t0, t0)
    with pytest.raises(ValueError, match="duplicate"):
        consume_packages([pkg("p", 1, t0, t0 + FIVE), pkg("p", 1, t0, t0 + FIVE)], [])


DAY = date(2026, 3, 10)


@st.composite
def packages(draw: st.DrawFn, day: date = DAY, tz: str = SH) -> tuple[Package, ...]:
    start = midnight(day, tz)
    result = []
    for i in range(draw(st.integers(0, 4))):
        begins = start + draw(st.integers(-300, 287)) * FIVE
        quota = draw(st.integers(1, 3000))
        result.append(
            Package(
                f"p{i}",
                quota,
                draw(st.integers(0, quota)),
                begins,
                begins + draw(st.integers(1, 600)) * FIVE,
                draw(st.integers(0, 10**5)),
            )
        )
    return tuple(result)


@st.composite
def usages(draw: st.DrawFn, day: date = DAY, tz: str = SH) -> list[Bucket]:
    start = midnight(day, tz)
    n = buckets_in_day(day, tz)
    return [
        Bucket(start + draw(st.integers(0, n - 1)) * FIVE, draw(st.integers(0, 1500)))
        for _ in range(draw(st.integers(0, 12)))
    ]


@given(packages(), usages())
def test_consumption_conserves_and_never_goes_negative(
    pkgs: tuple[Package, ...], usage: list[Bucket]
) -> None:
    result = consume_packages(pkgs, usage)
    total = sum(b.bytes_sent for b in usage)
    assert result.covered_bytes + result.uncovered_bytes == total
    before = {p.id: p for p in pkgs}
    for p in result.packages:
        used = dict(result.by_package)[p.id]
        assert p.remaining_bytes >= 0
        assert used >= 0
        assert p.remaining_bytes == before[p.id].remaining_bytes - used
        # only usage while the package was valid can have consumed it
        assert used <= sum(b.bytes_sent for b in usage if p.valid_at(b.start))
    # uncovered usage means every package valid at some bucket with usage was emptied... at
    # least the packages valid for every bucket are empty
    if result.uncovered_bytes:
        for p in result.packages:
            if usage and all(p.valid_at(b.start) for b in usage):
                assert p.remaining_bytes == 0


@given(packages(), usages(), st.randoms(use_true_random=False))
def test_consumption_ignores_input_order(
    pkgs: tuple[Package, ...], usage: list[Bucket], rnd: random.Random
) -> None:
    shuffled_pkgs, shuffled_usage = list(pkgs), list(usage)
    rnd.shuffle(shuffled_pkgs)
    rnd.shuffle(shuffled_usage)
    assert consume_packages(pkgs, usage) == consume_packages(shuffled_pkgs, shuffled_usage)


# --------------------------------------------------------------------------------------------
# Penalty, arrears, may serve


@pytest.mark.parametrize(
    ("unpaid", "penalty"),
    [(0, 0), (99, 0), (100, 1), (300, 2), (575, 3), (1280, 6), (1_000_000, 5000)],
)
def test_late_penalty(unpaid: int, penalty: int) -> None:
    # 0.5 % a day, half up: 99 -> 0.495 -> 0; 100 -> 0.5 -> 1; 300 -> 1.5 -> 2; 575 -> 2.875 -> 3
    assert late_penalty_fen(unpaid) == penalty


@pytest.mark.parametrize(
    ("billed_since", "base", "penalty"),
    [(0, 1200, 6), (600, 600, 3), (1100, 100, 1), (1200, 0, 0), (5000, 0, 0)],
)
def test_penalty_excludes_fees_billed_after_the_day(
    billed_since: int, base: int, penalty: int
) -> None:
    # 1200 fen of fees unpaid (and 9 of penalties) at the settlement; of them, `billed_since`
    # were billed after the day ended (a backlog), so were not unpaid on the day (7.5).
    state = AccountState(balance_fen=-1209, penalty_accrued_fen=9)
    settled = settle_day(TRAFFIC, PRICES, DAY, [], state, billed_since_day_end_fen=billed_since)
    assert settled.penalty_fen == penalty
    assert settled.state.balance_fen == -1209 - penalty
    assert [
        (line.quantity, line.amount_fen) for line in settled.lines if line.kind == "late_penalty"
    ] == ([(Decimal(base), penalty)] if penalty else [])
    with pytest.raises(ValueError, match="negative"):
        settle_day(TRAFFIC, PRICES, DAY, [], state, billed_since_day_end_fen=-1)


def test_unpaid_fees_exclude_penalties() -> None:
    assert unpaid_fees_fen(100, 0) == 0
    assert unpaid_fees_fen(0, 0) == 0
    assert unpaid_fees_fen(-1000, 0) == 1000
    assert unpaid_fees_fen(-1000, 30) == 970  # 30 fen of the debt are penalties
    assert unpaid_fees_fen(-20, 30) == 0  # a part payment paid the fees first


def test_may_serve() -> None:
    t0 = midnight(DAY)
    live = pkg("p", 1, t0 - FIVE, t0 + FIVE)
    empty = pkg("e", 1, t0 - FIVE, t0 + FIVE, left_gb=0)
    assert may_serve("prepaid", 1, [], t0)
    assert not may_serve("prepaid", 0, [], t0)  # 4.1: paid first
    assert may_serve("prepaid", 0, [live], t0)
    assert not may_serve("prepaid", 0, [empty], t0)
    assert not may_serve("prepaid", 0, [live], t0 + FIVE)  # expired
    assert may_serve("postpaid", 0, [], t0)  # 4.2: use first
    assert not may_serve("postpaid", -1, [live], t0)


# --------------------------------------------------------------------------------------------
# The month scenario


def test_month_with_two_packages_overage_tier_crossing_arrears_and_penalty() -> None:
    """March 2026, Asia/Shanghai, prepaid, 3,000 fen balance.

    Packages: "half" 200 GB valid Mar 1 - Mar 15 00:00 (expires mid-month, at midnight),
    "full" 100 GB valid all month. Usage: 10 GB a day Mar 1-24, 30 GB a day Mar 25-31 (Mar 31:
    30 GB + 1/3 GB). "half" covers Mar 1-14 (140 GB) and voids 60 GB; "full" covers Mar 15-24;
    Mar 25 on is overage: 30, 60, 90 GB at 24 fen; Mar 28 crosses 100 GB mid-day.
    """
    month = [date(2026, 3, d) for d in range(1, 32)]
    half = pkg("half", 200, midnight(month[0]), midnight(date(2026, 3, 15)))
    full = pkg("full", 100, midnight(month[0]), midnight(date(2026, 4, 1)))
    state = AccountState(balance_fen=3000, packages=(half, full))
    daily = {d: 10 * GB if d.day <= 24 else 30 * GB for d in month}
    daily[date(2026, 3, 31)] += 333_333_333
    results = {}
    for d in month:
        settled = settle_day(TRAFFIC, PRICES, d, day_usage(d, daily[d]), state)
        results[d.day] = settled
        state = settled.state

    assert results[14].record.consumed == (("half", 10 * GB),)
    assert results[14].voided == (("half", 60 * GB),)
    assert dict((p.id, p.remaining_bytes) for p in results[14].state.packages) == {
        "half": 60 * GB,
        "full": 100 * GB,
    }
    assert results[15].record.consumed == (("full", 10 * GB),)
    assert results[24].state.packages[1].remaining_bytes == 0
    assert all(results[d].charge_fen == 0 for d in range(1, 25))
    assert results[24].state.balance_fen == 3000

    charges = [results[d].charge_fen for d in range(25, 32)]
    # Mar 31: cumulative 210.333333333 GB -> 2400 + 110.333333333 x 23.5 = 4992.83 -> 4993
    assert charges == [720, 720, 720, 240 + 470, 705, 705, 4993 - 4280]
    assert [line.ref for line in results[28].lines] == ["tier 1", "tier 2"]
    assert sum(charges) == monthly_traffic_charge_fen(210 * GB + 333_333_333, PRICES) == 4993

    balances = [results[d].state.balance_fen for d in range(25, 32)]
    # Mar 29 goes into arrears (130 - 705); Mar 30: penalty 0.5 % of 575 = 2.875 -> 3;
    # Mar 31: the unpaid fees are 1,283 - 3 = 1,280 -> 6.4 -> 6 (penalties are not compounded)
    assert balances == [2280, 1560, 840, 130, -575, -575 - 705 - 3, -1283 - 713 - 6]
    assert [results[d].penalty_fen for d in range(25, 32)] == [0, 0, 0, 0, 0, 3, 6]
    assert [results[d].in_arrears for d in range(25, 32)] == [False] * 4 + [True] * 3
    assert results[31].state.penalty_accrued_fen == 9
    assert results[31].lines[-1] == BillLine(
        "late_penalty", Decimal(1280), "fen-day", Decimal("0.005"), 6, "7.5"
    )
    assert not results[29].may_serve
    assert results[28].may_serve
    assert state.month_billable_bytes == 210 * GB + 333_333_333

    # Late usage, after the month was settled: 2 GB of Mar 28 (an edge was offline) is
    # charged at the month's current position (tier 2): 2 x 23.5 = 47 fen, no penalty
    late28 = adjust_day(
        TRAFFIC,
        PRICES,
        results[28].record,
        [*day_usage(date(2026, 3, 28), 30 * GB), Bucket(midnight(date(2026, 3, 28)), 2 * GB)],
        state,
    )
    assert late28.charge_fen == round_half_up_fen(
        cumulative_traffic_value(212 * GB + 333_333_333, PRICES)
    ) - round_half_up_fen(cumulative_traffic_value(210 * GB + 333_333_333, PRICES))
    assert late28.charge_fen == 47
    assert late28.state.balance_fen == -2002 - 47
    state = late28.state

    # 3 GB of Mar 10 arrives even later: "half" was valid then and has 60 GB left (voided at
    # expiry, but this usage happened inside its validity): covered, nothing charged
    late10 = adjust_day(
        TRAFFIC,
        PRICES,
        results[10].record,
        [*day_usage(date(2026, 3, 10), 10 * GB), Bucket(midnight(date(2026, 3, 10)), 3 * GB)],
        state,
    )
    assert late10.charge_fen == 0
    assert late10.consumed_delta == (("half", 3 * GB),)
    assert late10.lines == (BillLine("package", Decimal(3), "GB", Decimal(0), 0, "half"),)
    assert dict((p.id, p.remaining_bytes) for p in late10.state.packages)["half"] == 57 * GB

    # a payment clearing the debt takes the account out of arrears; April starts at tier 1
    paid = replace(apply_payment(late10.state, 2049), month_billable_bytes=0)
    assert (paid.balance_fen, paid.penalty_accrued_fen) == (0, 0)
    part = apply_payment(late10.state, 2000)  # fees first: the 9 fen of penalties still owed
    assert (part.balance_fen, part.penalty_accrued_fen) == (-49, 9)
    assert unpaid_fees_fen(part.balance_fen, part.penalty_accrued_fen) == 40
    april = settle_day(TRAFFIC, PRICES, date(2026, 4, 1), day_usage(date(2026, 4, 1), GB), paid)
    assert (april.penalty_fen, april.charge_fen, april.state.balance_fen) == (0, 24, -24)
    assert april.state.penalty_accrued_fen == 0


def test_bandwidth_day() -> None:
    day = date(2026, 3, 10)
    start = midnight(day)
    usage = [Bucket(start + i * FIVE, 37_500_000 * (i % 7)) for i in range(288)]
    usage.append(Bucket(start + 200 * FIVE, 1))  # a second edge adds 1 byte to a bucket
    settled = settle_day(BANDWIDTH, PRICES, day, usage, AccountState(balance_fen=0))
    # peak: 6 Mbps (225,000,000 bytes in 5 minutes); 6 x 1000 fen
    assert settled.record.peak_bucket_bytes == 225_000_000
    assert daily_bandwidth_charge_fen(225_000_000, PRICES) == 6000
    assert settled.charge_fen == 6000
    assert settled.lines == (
        BillLine("bandwidth", Decimal("6.000000"), "Mbps-day", Decimal(1000), 6000, "peak"),
    )
    assert settled.state.balance_fen == -6000
    assert settled.in_arrears
    # 1/3 Mbps: 333.33 fen -> 333; the line shows the peak to 1 bit/s
    assert daily_bandwidth_charge_fen(12_500_000, PRICES) == 333
    # the 200th bucket carries 4 x 37.5 MB + 1 byte: peak is still bucket 6 mod 7
    assert settled.record.traffic_bytes == sum(37_500_000 * (i % 7) for i in range(288)) + 1


def test_bandwidth_account_consumes_no_package() -> None:
    day = date(2026, 3, 10)
    p = pkg("p", 10, midnight(day), midnight(day) + timedelta(days=30))
    settled = settle_day(
        BANDWIDTH, PRICES, day, day_usage(day, 37_500_000), AccountState(0, packages=(p,))
    )
    assert settled.record.consumed == ()
    assert settled.state.packages == (p,)
    assert settled.charge_fen == 1000


def test_zero_usage_day() -> None:
    for terms in (TRAFFIC, BANDWIDTH):
        settled = settle_day(terms, PRICES, DAY, [], AccountState(balance_fen=500))
        assert settled.charge_fen == 0
        assert settled.state.balance_fen == 500
        assert not settled.in_arrears
        assert all(line.amount_fen == 0 for line in settled.lines)


def test_usage_outside_the_day_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        settle_day(TRAFFIC, PRICES, DAY, day_usage(DAY + timedelta(days=1), 1), AccountState(0))


def test_usage_never_goes_down_in_an_adjustment() -> None:
    settled = settle_day(TRAFFIC, PRICES, DAY, day_usage(DAY, GB), AccountState(0))
    with pytest.raises(ValueError, match="went down"):
        adjust_day(TRAFFIC, PRICES, settled.record, day_usage(DAY, GB - 1), settled.state)


def test_berlin_dst_day_settles_its_276_buckets() -> None:
    terms = AccountTerms("postpaid", "traffic", "Europe/Berlin")
    day = date(2026, 3, 29)
    start, end = day_bounds(day, "Europe/Berlin")
    usage = [Bucket(start + i * FIVE, GB) for i in range(buckets_in_day(day, "Europe/Berlin"))]
    assert usage[-1].start == end - FIVE
    settled = settle_day(terms, PRICES, day, usage, AccountState(0))
    assert settled.record.traffic_bytes == 276 * GB
    assert settled.charge_fen == 2400 + round_half_up_fen(176 * Decimal("23.5"))
    with pytest.raises(ValueError, match="outside"):
        settle_day(terms, PRICES, day, [Bucket(end, 1)], AccountState(0))


# --------------------------------------------------------------------------------------------
# Settlement properties


@st.composite
def account_states(draw: st.DrawFn, day: date = DAY, tz: str = SH) -> AccountState:
    return AccountState(
        balance_fen=draw(st.integers(-(10**6), 10**6)),
        month_billable_bytes=draw(st.integers(0, 200_000)),
        penalty_accrued_fen=draw(st.integers(0, 1000)),
        packages=draw(packages(day, tz)),
    )


SMALL = PriceList(
    (
        TrafficTier(50, Decimal("24")),
        TrafficTier(150, Decimal("23.5")),
        TrafficTier(None, Decimal("7.3")),
    ),
    Decimal("13.7"),
    gb_bytes=1000,  # small "GB" so that hypothesis' byte counts cross tiers
)
terms_st = st.builds(
    AccountTerms,
    st.sampled_from(["prepaid", "postpaid"]),
    st.sampled_from(["traffic", "bandwidth"]),
    st.just(SH),
)


billed_since_st = st.one_of(st.just(0), st.integers(0, 2 * 10**6))
"""Fees billed after the day ended: 0 on time, any amount in a backlog."""


@given(terms_st, account_states(), usages(), billed_since_st, st.randoms(use_true_random=False))
def test_settlement_is_deterministic_and_conserves(
    terms: AccountTerms,
    state: AccountState,
    usage: list[Bucket],
    billed_since: int,
    rnd: random.Random,
) -> None:
    first = settle_day(terms, SMALL, DAY, usage, state, billed_since_day_end_fen=billed_since)
    # running it twice: the same
    assert (
        settle_day(terms, SMALL, DAY, usage, state, billed_since_day_end_fen=billed_since) == first
    )
    shuffled = list(usage)
    rnd.shuffle(shuffled)
    pkgs = list(state.packages)
    rnd.shuffle(pkgs)
    reordered = replace(state, packages=tuple(pkgs))
    assert (
        settle_day(terms, SMALL, DAY, shuffled, reordered, billed_since_day_end_fen=billed_since)
        == first
    )

    traffic = sum(b.bytes_sent for b in usage)
    covered = sum(n for _, n in first.record.consumed)
    assert covered + first.record.uncovered_bytes == traffic  # conservation
    assert all(p.remaining_bytes >= 0 for p in first.state.packages)
    assert first.charge_fen >= 0 and first.penalty_fen >= 0
    assert sum(line.amount_fen for line in first.lines) == first.charge_fen + first.penalty_fen
    assert first.state.balance_fen == state.balance_fen - first.charge_fen - first.penalty_fen
    assert first.in_arrears == (first.state.balance_fen < 0)
    # 7.5, decision 6: the penalty's base is the unpaid fees billed before the day ended
    unpaid = unpaid_fees_fen(state.balance_fen, state.penalty_accrued_fen)
    assert first.penalty_fen == late_penalty_fen(max(0, unpaid - billed_since))
    on_time = settle_day(terms, SMALL, DAY, usage, state)
    assert first.penalty_fen <= on_time.penalty_fen
    assert (first.charge_fen, first.record) == (on_time.charge_fen, on_time.record)
    if terms.charge_by == "traffic":
        assert first.charge_fen == traffic_charge_fen(
            state.month_billable_bytes, first.record.uncovered_bytes, SMALL
        )
        package_gb = sum(Fraction(line.quantity) for line in first.lines if line.kind == "package")
        assert package_gb * SMALL.gb_bytes == covered
    else:
        assert covered == 0
        assert first.charge_fen == daily_bandwidth_charge_fen(first.record.peak_bucket_bytes, SMALL)


@settings(max_examples=50)
@given(st.data())
def test_month_of_settlements_adds_up(data: st.DataObject) -> None:
    """A month of days with packages: charges add up to the monthly charge of the billable."""
    days = [date(2026, 3, d) for d in range(1, 32)]
    state = data.draw(account_states(days[0]))
    state = replace(state, month_billable_bytes=0, balance_fen=10**6, penalty_accrued_fen=0)
    total_usage = covered = charged = 0
    for d in days:
        usage = data.draw(usages(d))
        settled = settle_day(TRAFFIC, SMALL, d, usage, state)
        total_usage += settled.record.traffic_bytes
        covered += sum(n for _, n in settled.record.consumed)
        charged += settled.charge_fen
        state = settled.state
    assert covered + state.month_billable_bytes == total_usage
    assert charged == monthly_traffic_charge_fen(state.month_billable_bytes, SMALL)
    assert state.balance_fen == 10**6 - charged


@st.composite
def partial_and_full(draw: st.DrawFn) -> tuple[list[Bucket], list[Bucket]]:
    full = draw(usages())
    partial = [replace(b, bytes_sent=draw(st.integers(0, b.bytes_sent))) for b in full]
    keep = [draw(st.booleans()) for _ in partial]
    return [b for b, k in zip(partial, keep, strict=True) if k], full


def comparable(lines: tuple[BillLine, ...]) -> dict[tuple[str, str], tuple[Decimal, int]]:
    return {k: v for k, v in line_totals(lines).items() if v != (Decimal(0), 0)}


@given(terms_st, account_states(), partial_and_full(), billed_since_st)
def test_settle_partial_plus_adjust_equals_settle_full(
    terms: AccountTerms,
    state: AccountState,
    usage: tuple[list[Bucket], list[Bucket]],
    billed_since: int,
) -> None:
    partial, full = usage
    first = settle_day(terms, SMALL, DAY, partial, state, billed_since_day_end_fen=billed_since)
    adjusted = adjust_day(terms, SMALL, first.record, full, first.state)
    whole = settle_day(terms, SMALL, DAY, full, state, billed_since_day_end_fen=billed_since)

    assert comparable(first.lines + adjusted.lines) == comparable(whole.lines)
    assert first.charge_fen + adjusted.charge_fen == whole.charge_fen
    assert adjusted.state == whole.state
    assert adjusted.record == whole.record
    assert adjusted.in_arrears == whole.in_arrears
    # nothing new: nothing changes
    again = adjust_day(terms, SMALL, adjusted.record, full, adjusted.state)
    assert (again.lines, again.charge_fen, again.state) == ((), 0, adjusted.state)


@given(account_states(), partial_and_full(), st.integers(0, 5000))
def test_late_usage_after_later_days_is_neither_lost_nor_doubled(
    state: AccountState, usage: tuple[list[Bucket], list[Bucket]], later_bytes: int
) -> None:
    """Late usage for a day adjusted after the next day was settled (which used packages)."""
    partial, full = usage
    first = settle_day(TRAFFIC, SMALL, DAY, partial, state)
    nxt_day = DAY + timedelta(days=1)
    nxt = settle_day(TRAFFIC, SMALL, nxt_day, day_usage(nxt_day, later_bytes), first.state)
    adjusted = adjust_day(TRAFFIC, SMALL, first.record, full, nxt.state)
    late = sum(b.bytes_sent for b in full) - sum(b.bytes_sent for b in partial)
    covered_delta = sum(n for _, n in adjusted.consumed_delta)
    extra_billable = adjusted.state.month_billable_bytes - nxt.state.month_billable_bytes
    assert covered_delta + extra_billable == late  # every late byte: covered or charged, once
    assert 0 <= extra_billable <= late
    assert all(p.remaining_bytes >= 0 for p in adjusted.state.packages)
    assert adjusted.charge_fen == traffic_charge_fen(
        nxt.state.month_billable_bytes, extra_billable, SMALL
    )
    # the month still adds up
    total_charged = first.charge_fen + nxt.charge_fen + adjusted.charge_fen
    assert total_charged == traffic_charge_fen(
        state.month_billable_bytes,
        adjusted.state.month_billable_bytes - state.month_billable_bytes,
        SMALL,
    )


def test_bandwidth_adjustment_lines() -> None:
    day = DAY
    start = midnight(day)
    first = settle_day(
        BANDWIDTH, PRICES, day, [Bucket(start, 37_500_000)], AccountState(balance_fen=5000)
    )
    adjusted = adjust_day(BANDWIDTH, PRICES, first.record, [Bucket(start, 75_000_000)], first.state)
    assert adjusted.charge_fen == 1000
    assert [(line.quantity, line.amount_fen) for line in adjusted.lines] == [
        (Decimal("-1.000000"), -1000),
        (Decimal("2.000000"), 2000),
    ]
    assert adjusted.state.balance_fen == 3000


# --------------------------------------------------------------------------------------------
# Termination refund


def test_termination_refund() -> None:
    at = midnight(date(2026, 3, 20))
    live = Package(
        "live", 100 * GB, 30 * GB, at - timedelta(days=10), at + timedelta(days=10), 5000
    )
    expired = Package("old", 100 * GB, 50 * GB, at - timedelta(days=40), at, 5000)
    free = Package("free", 100 * GB, 100 * GB, at - FIVE, at + FIVE, 0)
    third = Package("third", 3 * GB, 1 * GB, at - FIVE, at + FIVE, 100)  # 33.33 -> 33

    refund = termination_refund(1000, [live, expired, free, third], at)
    assert [(r.id, r.unused_bytes, r.refund_fen) for r in refund.packages] == [
        ("third", GB, 33),
        ("live", 30 * GB, 1500),
    ]
    assert refund.credited_balance_fen == 2533
    assert (refund.refund_fen, refund.owed_fen) == (2533, 0)

    in_debt = termination_refund(-3000, [live], at)
    assert (in_debt.credited_balance_fen, in_debt.refund_fen, in_debt.owed_fen) == (-1500, 0, 1500)
    assert termination_refund(0, [], at).refund_fen == 0


@given(st.integers(-(10**6), 10**6), packages())
def test_termination_refund_never_negative(balance: int, pkgs: tuple[Package, ...]) -> None:
    at = midnight(DAY) + 100 * FIVE
    refund = termination_refund(balance, pkgs, at)
    assert refund.refund_fen >= 0 and refund.owed_fen >= 0
    assert refund.refund_fen - refund.owed_fen == refund.credited_balance_fen
    for r in refund.packages:
        p = next(p for p in pkgs if p.id == r.id)
        assert 0 <= r.refund_fen <= p.price_fen
        assert p.valid_at(at)
