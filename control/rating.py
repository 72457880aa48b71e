"""The rating core: the agreement's money rules as pure functions (no database, no clock, no I/O).

Every function takes what it needs (dates, amounts, usage) as arguments and names, in its
docstring, the clause of `shared/agreement/cdn-service-agreement.txt` it implements. The
scheduler and the API (the callers) read the database and the clock, call these functions and
write what they return; idempotence (a day settled once) lives there, determinism lives here:
the same inputs always give the same outputs, whatever the order of buckets or packages.

Units
-----
- Money is an integer number of fen (minor units, 1 yuan = 100 fen). Rates may carry fractions
  of a fen (0.235 yuan/GB = 23.5 fen/GB) and are `Decimal`; intermediate amounts are exact
  `Fraction`s; an amount becomes fen only in `round_half_up_fen`, the single rounding place.
  Never float.
- Traffic is an integer number of bytes. The agreement does not define GB or Mbps: 13.2 makes
  the pricing page part of the agreement (and it prevails), so the unit is a property of the
  price list, `PriceList.gb_bytes`, default 10**9 bytes (decimal GB, as network traffic is
  sold). Bandwidth is decimal: 1 Mbps = 10**6 bit/s.
- Bandwidth of a 5-minute bucket = bytes x 8 / 300 s, exact (a `Fraction`).
- Instants are aware datetimes; billing days are `date`s in the account's IANA time zone
  (default Asia/Shanghai). 5-minute buckets are aligned to UTC; every zone in use today has
  an offset that is a multiple of 15 minutes, so a bucket never straddles a local midnight
  (checked: `day_bounds` refuses a day whose bounds are not bucket-aligned).

Decisions where the agreement is silent or ambiguous (each one is repeated where it applies)
-------------------------------------------------------------------------------------------
1. Cumulative tiers count only billable traffic (traffic not covered by a package, 5.1c):
   the price list prices what is charged at list price; package traffic was paid separately.
2. A daily traffic charge is the difference of the rounded cumulative monthly charges after
   and before the day. Rounding each day's own amount could drift by up to half a fen a day;
   the difference telescopes, so the daily charges of a month add up exactly to the monthly
   charge of its total. Bill lines per tier are differences too, so they add up to the day.
3. Usage of a bucket is deemed to occur at the bucket's start instant; a package covers it iff
   activated_at <= start < expires_at (5.1a, validity is [activated_at, expires_at)).
4. Traffic packages apply to traffic-billed accounts only; a bandwidth-billed day is charged
   on its peak and consumes no package.
5. A package's remainder at expiry is voided (5.1b) by never being usable again, not by being
   set to zero: late usage that happened while the package was valid may still consume it
   (the usage was not "ordered but not used"), so late reporting never costs the customer.
6. Late penalty (7.5): 0.5 % of the unpaid service fees per day, rounded half-up per day
   (each day is one bill line). Not compounded: the penalty is not a service fee, so the base
   excludes penalties. Payments pay service fees before penalties. A day counts when the
   unpaid amount still exists at the day's end (the settlement), before that day's own charge.
   Of it, only fees billed before the day ended count: payments pay the oldest fees first, so
   the unpaid fees are the newest, and fees billed after the day (a backlog settled at once,
   an adjustment) were not unpaid on it: base = max(0, unpaid - fees billed since its end).
7. Arrears: the balance after the day's charges is negative (4.3, 5.2b).
8. Refund on provider termination (5.5): "paid in advance but not consumed" = the balance
   after settling all usage up to the termination, plus the unused part of each live package
   valued pro rata to its price by unused quota; expired packages are void (5.1b) and refund
   nothing. The refund is credited to the balance (5.5 "to your Kingsoft Cloud account"); what
   is positive afterwards is refundable, what is negative is still owed.
9. Late usage is billed, as an adjustment, only for the last `ADJUST_DAYS` billing days
   (`adjustable_since`); usage arriving later for a day already settled is kept (and shown)
   but never billed, and control.usage logs a warning naming the account, day and bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction
from typing import Literal
from zoneinfo import ZoneInfo

__all__ = [
    "ADJUST_DAYS",
    "BUCKET_SECONDS",
    "DEFAULT_TIMEZONE",
    "MBPS",
    "PENALTY_RATE",
    "AccountState",
    "AccountTerms",
    "BillLine",
    "Billing",
    "Bucket",
    "ChargeBy",
    "Consumption",
    "DayAdjustment",
    "DayRecord",
    "DaySettlement",
    "LineKind",
    "Package",
    "PackageRefund",
    "PriceList",
    "TerminationRefund",
    "TrafficTier",
    "adjust_day",
    "adjustable_since",
    "apply_payment",
    "billing_date",
    "bucket_bps",
    "bucket_mbps",
    "buckets_in_day",
    "consume_packages",
    "cumulative_traffic_value",
    "daily_bandwidth_charge_fen",
    "daily_peak_bucket_bytes",
    "day_bounds",
    "late_penalty_fen",
    "line_totals",
    "may_serve",
    "monthly_p95_bucket_bytes",
    "monthly_traffic_charge_fen",
    "p95_drop_count",
    "round_half_up_fen",
    "settle_day",
    "termination_refund",
    "traffic_charge_fen",
    "traffic_lines",
    "unpaid_fees_fen",
    "voided_bytes",
]

BUCKET_SECONDS = 300
"""Metering bucket: 5 minutes, aligned to the UTC epoch (issue #5)."""

MBPS = 10**6
"""1 Mbps = 10**6 bit/s (decimal, as bandwidth is sold; the pricing page governs, 13.2)."""

PENALTY_RATE = Decimal("0.005")
"""7.5: "a penalty equal to 0.5 percent of the unpaid amount for each day"."""

DEFAULT_TIMEZONE = "Asia/Shanghai"

ADJUST_DAYS = 62
"""How far back late usage is billed (decision 9): an edge offline for a month, and the month
before."""

Billing = Literal["prepaid", "postpaid"]
ChargeBy = Literal["traffic", "bandwidth"]
# "package_purchase" and "refund" lines are written by control.billing, not by the rules here.
LineKind = Literal["traffic", "bandwidth", "package", "late_penalty", "package_purchase", "refund"]


# --------------------------------------------------------------------------------------------
# Rounding: the single place


def round_half_up_fen(amount: Decimal | Fraction | int) -> int:
    """Round an exact amount of fen to whole fen, half away from zero (`ROUND_HALF_UP`).

    Issue #5: "money is integer minor units (fen) with half-up rounding at one documented
    place, never float". This is that place: every amount of money in this module becomes an
    integer only here. It takes `Fraction` as well as `Decimal` so that amounts stay exact
    until now (a bandwidth of bytes x 8 / 300 s has no finite decimal expansion); a float is
    refused. Amounts rated here are never negative; a negative one rounds symmetrically.
    """
    if isinstance(amount, float | bool):
        raise TypeError("money is never a float (or a bool)")
    exact = Fraction(amount)
    magnitude = math.floor(abs(exact) + Fraction(1, 2))
    return magnitude if exact >= 0 else -magnitude


# --------------------------------------------------------------------------------------------
# Time zones: billing days


def _zone(tz: str | ZoneInfo) -> ZoneInfo:
    return tz if isinstance(tz, ZoneInfo) else ZoneInfo(tz)


def _require_aware(instant: datetime, what: str) -> None:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got naive {instant!r}")


def billing_date(instant: datetime, tz: str | ZoneInfo = DEFAULT_TIMEZONE) -> date:
    """The billing date (in the account's zone) on which `instant` falls.

    Issue #5 ("daily settlement at midnight in the account's timezone") applying 5.1c
    ("charged ... by day") and 4.2 (postpaid, charged daily): a day is a calendar day of the
    account's IANA zone. `instant` must be aware.
    """
    _require_aware(instant, "instant")
    return instant.astimezone(_zone(tz)).date()


def day_bounds(day: date, tz: str | ZoneInfo = DEFAULT_TIMEZONE) -> tuple[datetime, datetime]:
    """The billing day `day` as the UTC instants [start, end).

    Same clauses as `billing_date`. `start` is the first instant whose local date is `day`:
    local midnight, or, where a zone skips midnight (a DST gap at 00:00), the end of the gap
    (zoneinfo's fold=0 maps a missing local time to the pre-transition offset, which is that
    instant). A day lasts 23, 24 or 25 hours in a DST zone. Raises ValueError if the bounds
    are not aligned to the 5-minute buckets (a historical zone offset like LMT +08:05:43).
    """
    zone = _zone(tz)
    start = datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone).astimezone(UTC)
    for bound in (start, end):
        if int(bound.timestamp()) % BUCKET_SECONDS or bound.microsecond:
            raise ValueError(f"{day} in {zone.key} does not start on a 5-minute bucket")
    return start, end


def adjustable_since(instant: datetime, tz: str | ZoneInfo = DEFAULT_TIMEZONE) -> date:
    """The oldest billing day whose late usage is still billed at `instant` (decision 9): days
    before it are final, whatever usage arrives for them."""
    return billing_date(instant, tz) - timedelta(days=ADJUST_DAYS)


def buckets_in_day(day: date, tz: str | ZoneInfo = DEFAULT_TIMEZONE) -> int:
    """Number of 5-minute buckets in the billing day: 288, or 276 / 300 on DST change days.

    Issue #5 ("288 points a day"), generalised to zones with daylight saving time.
    """
    start, end = day_bounds(day, tz)
    return int((end - start).total_seconds()) // BUCKET_SECONDS


# --------------------------------------------------------------------------------------------
# Usage: buckets, bandwidth, peaks, percentile


@dataclass(frozen=True, slots=True)
class Bucket:
    """Bytes sent to clients by one account in one 5-minute bucket, from all edges/domains."""

    start: datetime
    bytes_sent: int

    def __post_init__(self) -> None:
        _require_aware(self.start, "Bucket.start")
        if self.bytes_sent < 0:
            raise ValueError(f"negative bytes in bucket {self.start}")
        if self.start.microsecond or int(self.start.timestamp()) % BUCKET_SECONDS:
            raise ValueError(f"bucket start {self.start} is not aligned to 5 minutes (UTC)")


def _merge(usage: Iterable[Bucket]) -> tuple[Bucket, ...]:
    """Sum buckets with the same start (several edges, several domains); sort by time."""
    totals: dict[datetime, int] = {}
    for bucket in usage:
        key = bucket.start.astimezone(UTC)
        totals[key] = totals.get(key, 0) + bucket.bytes_sent
    return tuple(Bucket(start, n) for start, n in sorted(totals.items()))


def bucket_bps(bucket_bytes: int) -> Fraction:
    """Bandwidth of a bucket in bit/s, exact: bytes x 8 / 300 s (issue #5)."""
    return Fraction(bucket_bytes * 8, BUCKET_SECONDS)


def bucket_mbps(bucket_bytes: int) -> Fraction:
    """Bandwidth of a bucket in Mbps (10**6 bit/s), exact."""
    return bucket_bps(bucket_bytes) / MBPS


def daily_peak_bucket_bytes(buckets: Sequence[int]) -> int:
    """The day's peak, as the byte count of its busiest 5-minute bucket (0 for no traffic).

    Issue #5, daily-peak bandwidth billing ("peak of the day's 5-minute bandwidths"). The
    bandwidth is monotone in the byte count, so the peak bandwidth is `bucket_mbps` of this.
    Buckets with no traffic may be omitted (they are zeros).
    """
    if any(n < 0 for n in buckets):
        raise ValueError("negative bucket byte count")
    return max(buckets, default=0)


def p95_drop_count(points: int) -> int:
    """How many of `points` 5-minute points the 95th percentile drops: floor(points x 0.05).

    Issue #5: "drop the top 5 %, take the highest remaining". 8,928 points in a 31-day month of
    288-point days drop 446; fewer than 20 points drop none.
    """
    if points < 0:
        raise ValueError("negative number of points")
    return points * 5 // 100


def monthly_p95_bucket_bytes(points: Sequence[int], slots: int | None = None) -> int:
    """The month's 95th-percentile point (a bucket byte count; `bucket_mbps` makes it Mbps).

    Issue #5 ("monthly 95th percentile (288 points a day; drop the top 5 %, take the highest
    remaining)"): sort the n points, drop the top floor(n x 0.05), take the highest remaining.
    `slots`, when given, is the number of 5-minute buckets in the month (DST months have 12
    fewer or more, see `buckets_in_day`); buckets missing from `points` count as zeros, so n =
    `slots`. 0 for a month without points.
    """
    if any(n < 0 for n in points):
        raise ValueError("negative bucket byte count")
    n = len(points) if slots is None else slots
    if n < len(points):
        raise ValueError(f"{len(points)} points for {slots} slots")
    if n == 0:
        return 0
    ordered = sorted(points, reverse=True) + [0] * (n - len(points))
    return ordered[p95_drop_count(n)]


# --------------------------------------------------------------------------------------------
# Price list


@dataclass(frozen=True, slots=True)
class TrafficTier:
    """One tier of the monthly cumulative traffic price: up to `up_to_gb` GB (None: no limit)."""

    up_to_gb: int | None
    fen_per_gb: Decimal


@dataclass(frozen=True, slots=True)
class PriceList:
    """The operator's list prices (5.1c "prices listed on ... official website", 4.2, 13.2).

    `traffic_tiers`: monthly cumulative per-GB tiers, ascending, the last one unbounded; the
    position in the tiers is the month's billable traffic (decision 1 of the module doc).
    `fen_per_mbps_day`: the daily-peak bandwidth price. `gb_bytes`: bytes in the price list's
    GB (10**9 unless the pricing page says otherwise; only the prime factors 2 and 5 are
    allowed, as in 10**9 or 2**30, so that GB quantities are exact decimals).
    """

    traffic_tiers: tuple[TrafficTier, ...]
    fen_per_mbps_day: Decimal
    gb_bytes: int = 10**9

    def __post_init__(self) -> None:
        if not self.traffic_tiers:
            raise ValueError("a price list needs at least one traffic tier")
        previous = 0
        for i, tier in enumerate(self.traffic_tiers):
            _check_rate(tier.fen_per_gb, f"tier {i + 1}")
            last = i == len(self.traffic_tiers) - 1
            if (tier.up_to_gb is None) != last:
                raise ValueError("only the last traffic tier is unbounded, and it must be")
            if tier.up_to_gb is not None:
                if tier.up_to_gb <= previous:
                    raise ValueError("traffic tier bounds must increase")
                previous = tier.up_to_gb
        _check_rate(self.fen_per_mbps_day, "bandwidth price")
        rest = self.gb_bytes
        if rest <= 0:
            raise ValueError("gb_bytes must be positive")
        for prime in (2, 5):
            while rest % prime == 0:
                rest //= prime
        if rest != 1:
            raise ValueError("gb_bytes may only have the prime factors 2 and 5")

    def tier_bounds(self) -> tuple[tuple[int, int | None, Decimal], ...]:
        """The tiers as (low byte, high byte or None, fen per GB)."""
        bounds: list[tuple[int, int | None, Decimal]] = []
        low = 0
        for tier in self.traffic_tiers:
            high = None if tier.up_to_gb is None else tier.up_to_gb * self.gb_bytes
            bounds.append((low, high, tier.fen_per_gb))
            if high is not None:
                low = high
        return tuple(bounds)


def _check_rate(rate: Decimal, what: str) -> None:
    if not isinstance(rate, Decimal) or not rate.is_finite() or rate < 0:
        raise ValueError(f"{what}: a rate is a finite, non-negative Decimal, got {rate!r}")


def _exact_decimal(value: Fraction) -> Decimal:
    """A Fraction with a finite decimal expansion as an exact Decimal."""
    with localcontext() as ctx:
        ctx.prec = 200
        quotient = Decimal(value.numerator) / Decimal(value.denominator)
        if Fraction(quotient) != value:
            raise ArithmeticError(f"{value} has no exact decimal form")
        return quotient.normalize() if quotient != 0 else Decimal(0)


def _gb(nbytes: int, prices: PriceList) -> Decimal:
    return _exact_decimal(Fraction(nbytes, prices.gb_bytes))


# --------------------------------------------------------------------------------------------
# Traffic rating: monthly cumulative tiers


def cumulative_traffic_value(billable_bytes: int, prices: PriceList) -> Fraction:
    """The exact (unrounded) list price, in fen, of a month's first `billable_bytes`.

    5.1c / 4.2 with the price list's monthly cumulative tiers: each tier prices the bytes that
    fall inside it (a tier boundary crossed mid-day is split at the byte).
    """
    if billable_bytes < 0:
        raise ValueError("negative traffic")
    value = Fraction(0)
    for low, high, rate in prices.tier_bounds():
        top = billable_bytes if high is None else min(billable_bytes, high)
        if top <= low:
            break
        value += Fraction(top - low) * Fraction(rate) / prices.gb_bytes
    return value


def monthly_traffic_charge_fen(billable_bytes: int, prices: PriceList) -> int:
    """The charge, in fen, for a month's billable traffic: the cumulative value, rounded once.

    5.1c / 4.2 with monthly cumulative tiers. The daily charges of the month add up to this
    exactly (see `traffic_charge_fen`).
    """
    return round_half_up_fen(cumulative_traffic_value(billable_bytes, prices))


def traffic_charge_fen(month_to_date_bytes: int, added_bytes: int, prices: PriceList) -> int:
    """The charge, in fen, for `added_bytes` of billable traffic after `month_to_date_bytes`.

    5.1c ("charged ... by day according to the prices listed"): the difference of the rounded
    cumulative monthly charges after and before (decision 2): rounding each day on its own
    would drift up to half a fen a day, the difference telescopes so that the days of a month
    add up to `monthly_traffic_charge_fen` of its total to the fen. Never negative for a
    non-negative `added_bytes`; a negative one (a correction) gives the matching credit.
    """
    after = month_to_date_bytes + added_bytes
    if month_to_date_bytes < 0 or after < 0:
        raise ValueError("month-to-date traffic cannot be negative")
    return monthly_traffic_charge_fen(after, prices) - monthly_traffic_charge_fen(
        month_to_date_bytes, prices
    )


@dataclass(frozen=True, slots=True)
class BillLine:
    """One line of a bill.

    `quantity` in `unit` (GB, Mbps-day, fen-day), `unit_price` in fen per unit, `amount_fen`
    what is charged. `ref`: the tier ("tier 2"), the package id, "peak" or "7.5". Package
    lines record traffic a package covered (price and amount 0). A bandwidth line's quantity
    is the peak in Mbps shown to 6 decimals (1 bit/s); its amount is computed from the exact
    peak. A traffic line's amount is a difference of rounded cumulative charges, so it may
    differ by a fen from quantity x unit price; the lines of a day add up exactly.
    """

    kind: LineKind
    quantity: Decimal
    unit: str
    unit_price: Decimal
    amount_fen: int
    ref: str = ""


def line_totals(lines: Iterable[BillLine]) -> Mapping[tuple[str, str], tuple[Decimal, int]]:
    """Quantity and amount summed per (kind, ref): a day's bill with its adjustments folded in."""
    totals: dict[tuple[str, str], tuple[Decimal, int]] = {}
    with localcontext() as ctx:
        ctx.prec = 200  # GiB quantities have up to 30 significant digits: add them exactly
        for line in lines:
            q, a = totals.get((line.kind, line.ref), (Decimal(0), 0))
            totals[(line.kind, line.ref)] = (q + line.quantity, a + line.amount_fen)
    return totals


def traffic_lines(
    month_to_date_bytes: int, added_bytes: int, prices: PriceList
) -> tuple[BillLine, ...]:
    """Bill lines for `added_bytes` of billable traffic after `month_to_date_bytes`, per tier.

    5.1c with cumulative tiers: one line per tier the bytes fall in. Each line's amount is the
    difference of the rounded cumulative charges at its ends, so the lines add up to
    `traffic_charge_fen` exactly, and lines of the same tier over a month (including late
    adjustments) add up to that tier's share of the monthly charge. A negative `added_bytes`
    (a correction) gives lines with negative quantities and amounts. No bytes, no lines.
    """
    start, end = sorted((month_to_date_bytes, month_to_date_bytes + added_bytes))
    if start < 0:
        raise ValueError("month-to-date traffic cannot be negative")
    sign = 1 if added_bytes >= 0 else -1
    lines: list[BillLine] = []
    for i, (low, high, rate) in enumerate(prices.tier_bounds()):
        a = max(start, low)
        b = end if high is None else min(end, high)
        if b <= a:
            continue
        amount = monthly_traffic_charge_fen(b, prices) - monthly_traffic_charge_fen(a, prices)
        lines.append(
            BillLine(
                "traffic", _gb(sign * (b - a), prices), "GB", rate, sign * amount, f"tier {i + 1}"
            )
        )
    return tuple(lines)


# --------------------------------------------------------------------------------------------
# Bandwidth rating: daily peak, per Mbps-day


def daily_bandwidth_charge_fen(peak_bucket_bytes: int, prices: PriceList) -> int:
    """The charge, in fen, for a day whose busiest bucket carried `peak_bucket_bytes`.

    4.2 / 5.1c with daily-peak bandwidth billing: peak Mbps (exact) x price per Mbps-day,
    rounded once. A day is rated on its own, so the month is the sum of its days.
    """
    if peak_bucket_bytes < 0:
        raise ValueError("negative peak")
    return round_half_up_fen(bucket_mbps(peak_bucket_bytes) * Fraction(prices.fen_per_mbps_day))


def _bandwidth_line(peak_bucket_bytes: int, amount_fen: int, prices: PriceList) -> BillLine:
    mbps = bucket_mbps(peak_bucket_bytes)
    shown = (Decimal(mbps.numerator) / Decimal(mbps.denominator)).quantize(
        Decimal("0.000001"), rounding=ROUND_HALF_UP
    )
    return BillLine("bandwidth", shown, "Mbps-day", prices.fen_per_mbps_day, amount_fen, "peak")


# --------------------------------------------------------------------------------------------
# Resource packages


@dataclass(frozen=True, slots=True)
class Package:
    """A resource package: a traffic quota valid in [activated_at, expires_at) (5.1a).

    `remaining_bytes` is what is left of `quota_bytes`; once `expires_at` has passed it is
    the voided amount (5.1b, see `voided_bytes`). `price_fen` is what the customer paid for
    it (0 for a package granted free), used only for a refund on termination (5.5).
    """

    id: str
    quota_bytes: int
    remaining_bytes: int
    activated_at: datetime
    expires_at: datetime
    price_fen: int = 0

    def __post_init__(self) -> None:
        _require_aware(self.activated_at, "Package.activated_at")
        _require_aware(self.expires_at, "Package.expires_at")
        if self.quota_bytes <= 0:
            raise ValueError(f"package {self.id}: quota must be positive")
        if not 0 <= self.remaining_bytes <= self.quota_bytes:
            raise ValueError(f"package {self.id}: remaining outside [0, quota]")
        if self.expires_at <= self.activated_at:
            raise ValueError(f"package {self.id}: expires before it is activated")
        if self.price_fen < 0:
            raise ValueError(f"package {self.id}: negative price")

    def valid_at(self, instant: datetime) -> bool:
        """5.1a: in effect from activation until expiry, [activated_at, expires_at)."""
        return self.activated_at <= instant < self.expires_at

    def live_at(self, instant: datetime) -> bool:
        """5.1a: in effect at `instant` and not used up."""
        return self.valid_at(instant) and self.remaining_bytes > 0


def _consumption_order(package: Package) -> tuple[datetime, datetime, str]:
    return (package.expires_at, package.activated_at, package.id)


def voided_bytes(package: Package, at: datetime) -> int:
    """What of `package` is void at `at`: its remainder once expired, else 0.

    5.1b: "If the service period of the resource package expires, the services that you have
    ordered but not used up will be voided". The remainder is not destroyed (decision 5): late
    usage from the package's validity may still consume it, which lowers the voided amount.
    """
    _require_aware(at, "at")
    return package.remaining_bytes if at >= package.expires_at else 0


@dataclass(frozen=True, slots=True)
class Consumption:
    """How a run of usage was covered: bytes per package id, the uncovered rest, new packages.

    `by_package` lists every package passed (0 for an unused one), in consumption order.
    """

    by_package: tuple[tuple[str, int], ...]
    uncovered_bytes: int
    packages: tuple[Package, ...]

    @property
    def covered_bytes(self) -> int:
        return sum(n for _, n in self.by_package)


def consume_packages(packages: Iterable[Package], usage: Iterable[Bucket]) -> Consumption:
    """Cover usage with packages: earliest expiry first, only packages valid at the usage time.

    5.1a (a package is in effect from its activation until used up or expired, whichever is
    earlier), 5.1b (an expired package covers nothing more), 5.1c (usage beyond the packages is
    uncovered, to be charged at list price). Buckets are taken in time order; a bucket's usage
    happens at its start (decision 3) and is covered by the valid packages with something left,
    earliest `expires_at` first (ties: earlier activation, then id), and the rest is uncovered.
    Conservation: covered + uncovered = usage; no remainder goes negative. Package ids must
    be unique. `packages` in the result are in consumption order.
    """
    ordered = sorted(packages, key=_consumption_order)
    if len({p.id for p in ordered}) != len(ordered):
        raise ValueError("duplicate package id")
    remaining = [p.remaining_bytes for p in ordered]
    used = [0] * len(ordered)
    uncovered = 0
    for bucket in _merge(usage):
        need = bucket.bytes_sent
        for i, package in enumerate(ordered):
            if need == 0:
                break
            if remaining[i] and package.valid_at(bucket.start):
                take = min(need, remaining[i])
                remaining[i] -= take
                used[i] += take
                need -= take
        uncovered += need
    return Consumption(
        by_package=tuple((p.id, u) for p, u in zip(ordered, used, strict=True)),
        uncovered_bytes=uncovered,
        packages=tuple(
            replace(p, remaining_bytes=r) for p, r in zip(ordered, remaining, strict=True)
        ),
    )


# --------------------------------------------------------------------------------------------
# Arrears and late penalty


def unpaid_fees_fen(balance_fen: int, penalty_accrued_fen: int) -> int:
    """The unpaid service fees in a balance, the base of the late penalty (7.5, decision 6).

    A negative balance is owed; of it, up to `penalty_accrued_fen` (penalties charged since the
    balance was last non-negative) are penalties, because payments pay service fees first; the
    rest is unpaid service fees. 0 when the balance is not negative.
    """
    if penalty_accrued_fen < 0:
        raise ValueError("negative accrued penalty")
    return max(0, -balance_fen - penalty_accrued_fen)


def late_penalty_fen(unpaid_fen: int) -> int:
    """One day's late penalty, in fen, on `unpaid_fen` of unpaid service fees.

    7.5: "a penalty equal to 0.5 percent of the unpaid amount for each day on which unpaid
    amount exists", rounded half-up per day (each day is one bill line; decision 6).
    """
    if unpaid_fen < 0:
        raise ValueError("negative unpaid amount")
    return round_half_up_fen(unpaid_fen * PENALTY_RATE)


def may_serve(
    billing: Billing, balance_fen: int, packages: Iterable[Package], at: datetime
) -> bool:
    """Whether the account's service may run at `at` as far as money goes.

    4.1 (prepaid: "Kingsoft Cloud will begin to provide services after you have paid"): a
    positive balance or a live package. 4.2 / 5.2b (postpaid: use first, pay after; "if the
    balance ... is not enough ... suspend"): a non-negative balance. 4.3 lets the provider stop
    the service otherwise (after the caller's grace period).
    """
    if billing == "postpaid":
        return balance_fen >= 0
    return balance_fen > 0 or any(p.live_at(at) for p in packages)


# --------------------------------------------------------------------------------------------
# Settlement of one account-day, and late adjustments


@dataclass(frozen=True, slots=True)
class AccountTerms:
    """Per-account terms: prepaid or postpaid (4.1 / 4.2), traffic or bandwidth, time zone."""

    billing: Billing
    charge_by: ChargeBy = "traffic"
    timezone: str = DEFAULT_TIMEZONE


@dataclass(frozen=True, slots=True)
class AccountState:
    """The account's money state the rating reads and returns.

    `month_billable_bytes`: billable (uncovered) traffic already charged in the calendar month
    of the day being rated (decision 1; 0 on the 1st). `balance_fen`: the balance at the end of
    the day, before this day's charges (payments credited, earlier days debited).
    `penalty_accrued_fen`: penalties still owed (charged since the balance was last non-negative)
    (decision 6). `packages`: every package of the account, expired ones included.
    """

    balance_fen: int
    month_billable_bytes: int = 0
    penalty_accrued_fen: int = 0
    packages: tuple[Package, ...] = ()


def _normalised(state: AccountState) -> AccountState:
    """Penalties owed can never exceed the debt (decision 6: payments pay fees first)."""
    if state.penalty_accrued_fen < 0:
        raise ValueError("negative accrued penalty")
    owed = max(0, -state.balance_fen)
    if state.penalty_accrued_fen <= owed:
        return state
    return replace(state, penalty_accrued_fen=owed)


def apply_payment(state: AccountState, amount_fen: int) -> AccountState:
    """Credit a payment (or a refund credited to the account) to the balance.

    4.3 / 5.2b: a payment that brings the balance back to zero or above ends the arrears.
    7.5 with decision 6: a payment pays unpaid service fees before penalties, so the penalties
    still owed are min(penalties accrued, what is still owed); at a non-negative balance, none.
    """
    if amount_fen < 0:
        raise ValueError("a payment is not negative")
    return _normalised(replace(state, balance_fen=state.balance_fen + amount_fen))


@dataclass(frozen=True, slots=True)
class DayRecord:
    """What was rated for a day, kept by the caller to adjust the day later.

    `usage`: the merged buckets rated; `consumed`: bytes per package id; `uncovered_bytes`:
    what was charged at list price (traffic accounts); `peak_bucket_bytes`: the peak rated.
    """

    day: date
    usage: tuple[Bucket, ...]
    consumed: tuple[tuple[str, int], ...]
    uncovered_bytes: int
    peak_bucket_bytes: int

    @property
    def traffic_bytes(self) -> int:
        return sum(b.bytes_sent for b in self.usage)


@dataclass(frozen=True, slots=True)
class DaySettlement:
    """The result of settling one account-day (see `settle_day`)."""

    lines: tuple[BillLine, ...]
    record: DayRecord
    state: AccountState
    charge_fen: int
    penalty_fen: int
    in_arrears: bool
    may_serve: bool
    voided: tuple[tuple[str, int], ...] = field(default=())


@dataclass(frozen=True, slots=True)
class DayAdjustment:
    """The result of adjusting a settled day for late usage (see `adjust_day`)."""

    lines: tuple[BillLine, ...]
    record: DayRecord
    state: AccountState
    charge_fen: int
    in_arrears: bool
    consumed_delta: tuple[tuple[str, int], ...]


def _day_usage(day: date, terms: AccountTerms, usage: Iterable[Bucket]) -> tuple[Bucket, ...]:
    start, end = day_bounds(day, terms.timezone)
    merged = _merge(usage)
    for bucket in merged:
        if not start <= bucket.start < end:
            raise ValueError(f"bucket {bucket.start} is outside billing day {day}")
    return merged


def _package_lines(consumed: Iterable[tuple[str, int]], prices: PriceList) -> list[BillLine]:
    return [
        BillLine("package", _gb(n, prices), "GB", Decimal(0), 0, pid) for pid, n in consumed if n
    ]


def _rate_usage(
    terms: AccountTerms,
    prices: PriceList,
    day: date,
    usage: tuple[Bucket, ...],
    available: tuple[Package, ...],
) -> tuple[DayRecord, Consumption]:
    """Cover and measure a day's usage against `available` packages (traffic accounts only)."""
    peak = daily_peak_bucket_bytes([b.bytes_sent for b in usage])
    if terms.charge_by == "traffic":
        consumption = consume_packages(available, usage)
    else:  # decision 4: no package covers a bandwidth-billed day
        consumption = consume_packages(available, ())
        consumption = replace(consumption, uncovered_bytes=sum(b.bytes_sent for b in usage))
    record = DayRecord(
        day=day,
        usage=usage,
        consumed=tuple((pid, n) for pid, n in consumption.by_package if n),
        uncovered_bytes=consumption.uncovered_bytes,
        peak_bucket_bytes=peak,
    )
    return record, consumption


def settle_day(
    terms: AccountTerms,
    prices: PriceList,
    day: date,
    usage: Iterable[Bucket],
    state: AccountState,
    *,
    billed_since_day_end_fen: int = 0,
) -> DaySettlement:
    """Settle one account-day: rate it, consume packages, charge the balance, write lines.

    4.1 / 4.2 (prepaid and postpaid are both charged daily from the balance), 5.1a-c (packages
    first, earliest expiry first; overage charged by day at list price), the price list's
    traffic tiers or daily-peak bandwidth (4.2, 13.2), 7.5 (one day's late penalty when unpaid
    fees exist at the day's end), 4.3 / 5.2b (in arrears when the balance goes negative).

    `usage`: the day's buckets (any order, duplicates summed; all inside the billing day).
    `state`: as documented on `AccountState`. Order: the penalty is computed on the unpaid fees
    in `state.balance_fen` (so not on this day's own charge) less `billed_since_day_end_fen`,
    the service fees billed after the day ended (0 when settled on time; decision 6), then the
    usage is charged.
    The result's `state` is the state for the next day (its `month_billable_bytes` is for the
    same month: the caller resets it on the 1st). `voided` lists packages that expire during
    the day with what they void (5.1b). Pure and deterministic: the same inputs give an equal
    result however often it runs and in whatever order buckets and packages are given; not
    running a day twice is the caller's job (its database).
    """
    rated = _day_usage(day, terms, usage)
    state = _normalised(state)
    record, consumption = _rate_usage(terms, prices, day, rated, state.packages)

    if billed_since_day_end_fen < 0:
        raise ValueError("negative fees billed since the day's end")
    unpaid = unpaid_fees_fen(state.balance_fen, state.penalty_accrued_fen)
    penalty_base = max(0, unpaid - billed_since_day_end_fen)
    penalty = late_penalty_fen(penalty_base)
    lines = _package_lines(record.consumed, prices)
    if terms.charge_by == "traffic":
        traffic = traffic_lines(state.month_billable_bytes, record.uncovered_bytes, prices)
        lines.extend(traffic)
        charge = sum(line.amount_fen for line in traffic)
        month_billable = state.month_billable_bytes + record.uncovered_bytes
    else:
        charge = daily_bandwidth_charge_fen(record.peak_bucket_bytes, prices)
        lines.append(_bandwidth_line(record.peak_bucket_bytes, charge, prices))
        month_billable = state.month_billable_bytes
    if penalty:
        lines.append(
            BillLine("late_penalty", Decimal(penalty_base), "fen-day", PENALTY_RATE, penalty, "7.5")
        )

    balance = state.balance_fen - charge - penalty
    accrued = 0 if balance >= 0 else min(state.penalty_accrued_fen + penalty, -balance)
    start, end = day_bounds(day, terms.timezone)
    voided = tuple(
        (p.id, p.remaining_bytes)
        for p in consumption.packages
        if start < p.expires_at <= end and p.remaining_bytes
    )
    new_state = AccountState(
        balance_fen=balance,
        month_billable_bytes=month_billable,
        penalty_accrued_fen=accrued,
        packages=consumption.packages,
    )
    return DaySettlement(
        lines=tuple(lines),
        record=record,
        state=new_state,
        charge_fen=charge,
        penalty_fen=penalty,
        in_arrears=balance < 0,
        may_serve=may_serve(terms.billing, balance, consumption.packages, end),
        voided=voided,
    )


def adjust_day(
    terms: AccountTerms,
    prices: PriceList,
    record: DayRecord,
    usage: Iterable[Bucket],
    state: AccountState,
) -> DayAdjustment:
    """Adjust a settled day for usage that arrived late: charge the difference, nothing twice.

    Issue #5 ("usage that arrives late ... is settled as an adjustment on the next run, never
    lost or doubled") under 5.1a-c and the price list. `record` is what the day was settled
    with; `usage` the day's now-complete buckets (every bucket at least what was rated: usage
    is only ever added); `state` the account's state now (its `month_billable_bytes` is for
    the month of `record.day`, as charged so far; packages include expired ones).

    Packages: the day is covered again, with the full usage, from what each package had for
    the day = what is left now + what the day consumed (later days' consumption stays theirs),
    and the differences are the adjustment; so no remainder goes negative and covered +
    uncovered = usage for the day. Late usage may consume a package that has since expired
    (decision 5). Traffic: the extra uncovered bytes are charged at the month's current
    cumulative position (`traffic_lines`), so the month still adds up to its monthly charge.
    Bandwidth: the new peak's charge minus the charged one. No penalty is added.
    If `state` is the state right after the settlement of `record`, then settle(partial) +
    adjust(partial -> full) == settle(full): the same lines per kind and ref, consumption,
    balance and month-to-date. Adjusting with nothing new gives no lines and no change.
    """
    full = _day_usage(record.day, terms, usage)
    state = _normalised(state)
    before = {b.start: b.bytes_sent for b in record.usage}
    after = {b.start: b.bytes_sent for b in full}
    for start, n in before.items():
        if after.get(start, 0) < n:
            raise ValueError(f"usage of bucket {start} went down: late usage only adds")

    consumed_before = dict(record.consumed)
    unknown = set(consumed_before) - {p.id for p in state.packages}
    if unknown:
        raise ValueError(f"packages consumed on {record.day} are missing: {sorted(unknown)}")
    available = tuple(
        replace(p, remaining_bytes=p.remaining_bytes + consumed_before.get(p.id, 0))
        for p in state.packages
    )
    new_record, consumption = _rate_usage(terms, prices, record.day, full, available)
    consumed_after = dict(new_record.consumed)
    delta = tuple(
        (pid, consumed_after.get(pid, 0) - consumed_before.get(pid, 0))
        for pid, _ in consumption.by_package
        if consumed_after.get(pid, 0) != consumed_before.get(pid, 0)
    )
    lines = _package_lines(delta, prices)
    month_billable = state.month_billable_bytes
    if terms.charge_by == "traffic":
        extra = new_record.uncovered_bytes - record.uncovered_bytes
        traffic = traffic_lines(state.month_billable_bytes, extra, prices)
        lines.extend(traffic)
        charge = sum(line.amount_fen for line in traffic)
        month_billable += extra
    else:
        charge = daily_bandwidth_charge_fen(
            new_record.peak_bucket_bytes, prices
        ) - daily_bandwidth_charge_fen(record.peak_bucket_bytes, prices)
        if new_record.peak_bucket_bytes != record.peak_bucket_bytes:
            lines.extend(_bandwidth_adjustment(record, new_record, prices))
    balance = state.balance_fen - charge
    accrued = 0 if balance >= 0 else min(state.penalty_accrued_fen, -balance)
    new_state = AccountState(
        balance_fen=balance,
        month_billable_bytes=month_billable,
        penalty_accrued_fen=accrued,
        packages=consumption.packages,
    )
    return DayAdjustment(
        lines=tuple(lines),
        record=new_record,
        state=new_state,
        charge_fen=charge,
        in_arrears=balance < 0,
        consumed_delta=delta,
    )


def _bandwidth_adjustment(old: DayRecord, new: DayRecord, prices: PriceList) -> list[BillLine]:
    """Reverse the rated peak's line and charge the new one (two lines, amounts add up)."""
    was = _bandwidth_line(
        old.peak_bucket_bytes, daily_bandwidth_charge_fen(old.peak_bucket_bytes, prices), prices
    )
    now = _bandwidth_line(
        new.peak_bucket_bytes, daily_bandwidth_charge_fen(new.peak_bucket_bytes, prices), prices
    )
    reversal = replace(was, quantity=was.quantity.copy_negate(), amount_fen=-was.amount_fen)
    return [reversal, now]


# --------------------------------------------------------------------------------------------
# Termination


@dataclass(frozen=True, slots=True)
class PackageRefund:
    """The refund for one package's unused quota (5.5)."""

    id: str
    unused_bytes: int
    refund_fen: int


@dataclass(frozen=True, slots=True)
class TerminationRefund:
    """The money position on provider termination (5.5, decision 8).

    `balance_fen`: the balance given (all usage settled); `packages`: the pro-rata refund of
    each live package with unused quota; `credited_balance_fen`: the balance with them
    credited; `refund_fen`: its positive part, what is refunded; `owed_fen`: its negative part.
    """

    balance_fen: int
    packages: tuple[PackageRefund, ...]
    credited_balance_fen: int
    refund_fen: int
    owed_fen: int


def termination_refund(
    balance_fen: int, packages: Iterable[Package], at: datetime
) -> TerminationRefund:
    """The unconsumed prepaid amount refunded when the provider terminates at `at`.

    5.5: "Kingsoft Cloud shall refund the amount that you have paid in advance but not
    consumed to your Kingsoft Cloud account." Defined (decision 8) as the balance after all
    usage up to `at` has been settled (the caller settles the partial last day first), plus,
    for each package valid at `at`, price_fen x remaining / quota rounded half-up (the unused
    share of what was paid for it); packages expired by `at` are void (5.1b) and refund
    nothing; free packages refund nothing. Credited to the balance, the positive part is the
    refund, a negative part remains owed.
    """
    _require_aware(at, "at")
    refunds = tuple(
        PackageRefund(
            p.id,
            p.remaining_bytes,
            round_half_up_fen(Fraction(p.price_fen * p.remaining_bytes, p.quota_bytes)),
        )
        for p in sorted(packages, key=_consumption_order)
        if p.valid_at(at) and p.remaining_bytes and p.price_fen
    )
    credited = balance_fen + sum(r.refund_fen for r in refunds)
    return TerminationRefund(
        balance_fen=balance_fen,
        packages=refunds,
        credited_balance_fen=credited,
        refund_fen=max(0, credited),
        owed_fen=max(0, -credited),
    )
