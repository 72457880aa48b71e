"""Billing and enforcement: daily settlement, late adjustments, arrears, terminations, and the
billing routes (agreement 4, 5, 7.5; issue #5).

The money rules are `control.rating`'s (pure functions); this module reads the database and the
clock, calls them and writes what they return. Each account-day is settled in one transaction:
its `day_settlements` row, bill lines, package remainders, balance and penalty together.

Decisions where the agreement and the issue leave a choice:
- Idempotence lives in `day_settlements`: under the account's row lock the next day to settle is
  the one after the last settled, so settling a day twice changes nothing; the record kept there
  (`rating.DayRecord` with the day's charge mode and the price list's rates it was settled
  under) is what `rating.adjust_day` needs to charge usage that arrives late as adjustment lines
  exactly once, at the day's own rates: a price-list change applies to days settled after it.
  Late usage is looked for in the last `rating.ADJUST_DAYS` days (older: rating decision 9).
- Penalty (7.5, rating decision 6): an adjustment that raises an earlier day's charge does not
  recompute the penalties charged since. 7.5 charges a penalty on "the unpaid amount for each
  day on which unpaid amount exists"; late usage was not billed, so not unpaid, on those days.
  From its adjustment on, the raised debt counts for the next days' penalties. By the same
  rule a day's penalty excludes every fee billed after the day ended (`rating.settle_day`'s
  `billed_since_day_end_fen`, from the lines' `created_at`): days settled as a backlog (the
  control plane was down, the account got terms late) are not penalised for debts the same
  catch-up billed seconds before them; settled on time, nothing is excluded.
- Every account is billed from the billing day (account zone) it was created. Its terms are the
  operator's (`PUT /v1/accounts/{id}/billing`) or, until the operator sets them, the default
  price list's in traffic mode: the first thing that needs them (a settlement run, a payment, a
  grant, a termination, a read of the balance or the bill) stores them as the account's own
  (`account_billing`, audited as `billing.default_terms`), as if the operator had set them;
  setting terms later replaces them for the days not settled yet. Without a default list an
  account without terms is not billed: its days wait unsettled (they are settled once it has
  terms), every settlement run logs one warning naming such accounts, and its money routes
  answer that billing is not configured. A terminated account never gets terms.
- A package's price is paid from the balance when it is granted (4.1: service begins after
  payment; 5.1 packages are prepaid), as a `package_purchase` line; a grant whose price exceeds
  the balance is 409; a free grant (price 0) is allowed. Packages cover traffic-billed days only.
- Arrears: a negative balance (rating decision 7), for prepaid and postpaid alike. The account is
  notified at once; after `arrears_grace` its active domains are suspended with a reason starting
  `ARREARS`. A payment that ends the arrears resumes exactly those in its own transaction; if the
  operator has suspended the account meanwhile, they are handed to that suspension instead, so
  resuming the account resumes them.
- Prepaid (4.1: service begins after payment): a prepaid account's domains added while it may
  not serve wait, suspended with `domains.AWAITING_REASON` (see control.domains). A payment or a
  package grant after which `rating.may_serve` holds activates exactly those in its own
  transaction, or, while the operator has suspended the account, hands them to that suspension,
  as for arrears. A domain the operator suspended is not touched. Running out later is arrears
  (above), not a second path: an arrears payment that leaves a prepaid balance at exactly 0
  resumes the arrears-suspended domains but activates no waiting one.
- Termination (5.3, 5.5): scheduled at least 30 days ahead, or at once (breach, 5.3b). Then the
  days up to it are settled (the last one up to the instant), `rating.termination_refund` is
  credited as a `refund` line (quantity: the refundable fen), and the account is terminated as
  the operator's terminate does (edges delete caches, 6.3). That settlement is final: the
  scheduler never settles or adjusts a terminated account again, so usage arriving late for any
  of its days (including the termination day, before or after the instant) is not billed and
  the refund stands; it stays visible in `GET /v1/usage`. Customer-safe: never charge an
  account after it was closed and refunded.
- Several replicas: every transaction of the job first takes `pg_try_advisory_xact_lock`; when
  another replica holds it, this run stops (the other is settling). Settlement and payments also
  lock the account's `account_billing` row, so they never interleave on one account.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field, model_validator
from sqlalchemy import Row, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control import accounts as account_routes
from control import rating
from control.api import (
    ACCOUNTS,
    OPERATOR,
    QueryParam,
    RouteTable,
    account_of,
    audit,
    caller,
    invalid,
    path_id,
    reading,
    writing,
)
from control.auth import Principal
from control.db import write_transaction
from control.domains import (
    ACCOUNT_SUSPENDED,
    AWAITING_PREPAYMENT,
    prepaid_may_serve,
    set_state,
)
from control.models import Body, Name, Reason
from control.notices import notify
from control.problems import Problem
from control.scheduler import CLOCK, Clock
from control.schema import (
    account_billing,
    accounts,
    bill_lines,
    day_settlements,
    domains,
    iso,
    packages,
    payments,
    price_lists,
)
from control.usage import usage_points

log = logging.getLogger("control.billing")

ARREARS = "arrears: "
"""Prefix of the reason of domains suspended for arrears: only those resume on payment."""

NOTICE_PERIOD = timedelta(days=30)  # 5.5: "30 days in advance"
EXPIRY_NOTICE = timedelta(days=7)  # issue #5: "package expiring in 7 days"
ARREARS_GRACE = timedelta(hours=24)
MAX_FEN = 10**15
_CHARGE_KINDS = ("traffic", "bandwidth", "late_penalty")
_FEE_KINDS = ("traffic", "bandwidth", "package_purchase")  # service fees: penalty base (7.5)
_NAMED_IN_WARNING = 50  # accounts named in the run's "not billed" warning; the rest counted
_PG_SETTLE_LOCK_KEY = 0x43444E42  # "CDNB"


class Busy(Exception):
    """Another control replica is settling now."""


BUSY_EXIT = 3
"""`cdn control settle`'s exit code when another replica is settling: run it again later."""


@dataclass(frozen=True, slots=True)
class DayCharge:
    """What a run did for one account-day: the day's charge (None: not settled), the balance."""

    account_id: int
    day: date
    charge_fen: int | None
    balance_fen: int
    adjustment: bool = False

    def line(self) -> str:
        if self.charge_fen is None:
            return f"account {self.account_id}: {self.day} not settled (not ended or not billed)"
        what = "adjustment" if self.adjustment else "charge"
        return (
            f"account {self.account_id}: {self.day} {what} {self.charge_fen} fen, "
            f"balance {self.balance_fen} fen"
        )


@dataclass(frozen=True, slots=True)
class _Account:
    id: int
    state: str
    state_reason: str
    terms: rating.AccountTerms
    prices: rating.PriceList
    price_list: str
    balance_fen: int
    penalty_accrued_fen: int
    month_billable_bytes: int
    arrears_since: datetime | None
    low_balance_fen: int
    termination_at: datetime | None
    termination_reason: str
    first_day: date


# --- the database side of rating ----------------------------------------------------------------


@asynccontextmanager
async def _settling(
    engine: AsyncEngine, changed: Callable[[], None]
) -> AsyncIterator[AsyncConnection]:
    """A write transaction of the job (`control.db.write_transaction`), one settling replica at
    a time on PostgreSQL (Busy when another holds the lock; SQLite's write lock already
    serialises); `changed` wakes this process's feed after the commit."""
    async with write_transaction(engine) as conn:
        if conn.dialect.name == "postgresql":
            got = await conn.execute(
                text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": _PG_SETTLE_LOCK_KEY}
            )
            if not got.scalar_one():
                raise Busy
        yield conn
    changed()


def _price_list(rates: Mapping[Any, Any]) -> rating.PriceList:
    """A `price_lists` row's rates, or their copy in a day's record (`_rates_json`)."""
    tiers = tuple(
        rating.TrafficTier(tier["up_to_gb"], Decimal(tier["fen_per_gb"]))
        for tier in rates["traffic_tiers"]
    )
    return rating.PriceList(tiers, Decimal(rates["fen_per_mbps_day"]), int(rates["gb_bytes"]))


def _rates_json(prices: rating.PriceList) -> dict[str, Any]:
    """The rates as a `price_lists` row holds them (decimal strings), for `_price_list`."""
    return {
        "traffic_tiers": [
            {"up_to_gb": tier.up_to_gb, "fen_per_gb": format(tier.fen_per_gb, "f")}
            for tier in prices.traffic_tiers
        ],
        "fen_per_mbps_day": format(prices.fen_per_mbps_day, "f"),
        "gb_bytes": prices.gb_bytes,
    }


async def _load(conn: AsyncConnection, account_id: int, *, lock: bool = True) -> _Account | None:
    """The account with its billing terms, its `account_billing` row locked for the transaction;
    None when it has no billing terms."""
    query = (
        select(
            accounts.c.id,
            accounts.c.state,
            accounts.c.state_reason,
            accounts.c.billing,
            accounts.c.timezone,
            account_billing.c.charge_by,
            account_billing.c.balance_fen,
            account_billing.c.penalty_accrued_fen,
            account_billing.c.month_billable_bytes,
            account_billing.c.arrears_since,
            account_billing.c.low_balance_fen,
            account_billing.c.termination_at,
            account_billing.c.termination_reason,
            accounts.c.created_at,
            price_lists.c.name.label("price_list"),
            price_lists.c.traffic_tiers,
            price_lists.c.fen_per_mbps_day,
            price_lists.c.gb_bytes,
        )
        .select_from(
            accounts.join(account_billing, account_billing.c.account_id == accounts.c.id).join(
                price_lists, price_lists.c.id == account_billing.c.price_list_id
            )
        )
        .where(accounts.c.id == account_id)
    )
    if lock:
        query = query.with_for_update(of=account_billing)
    row = (await conn.execute(query)).first()
    if row is None:
        return None
    return _Account(
        id=row.id,
        state=row.state,
        state_reason=row.state_reason,
        terms=rating.AccountTerms(row.billing, row.charge_by, row.timezone),
        prices=_price_list(row._mapping),
        price_list=row.price_list,
        balance_fen=int(row.balance_fen),
        penalty_accrued_fen=int(row.penalty_accrued_fen),
        month_billable_bytes=int(row.month_billable_bytes),
        arrears_since=row.arrears_since,
        low_balance_fen=int(row.low_balance_fen),
        termination_at=row.termination_at,
        termination_reason=row.termination_reason,
        first_day=rating.billing_date(row.created_at, row.timezone),
    )


def _not_configured(account_id: int) -> str:
    return (
        f"billing is not configured for account {account_id}: it has no billing terms and no "
        "price list is the default (PUT /v1/accounts/{id}/billing, or PUT a price list with "
        '"default": true)'
    )


async def _without_terms(conn: AsyncConnection, account_id: int | None = None) -> list[Row[Any]]:
    """The accounts (or the one) without billing terms, terminated ones aside: those are never
    billed again."""
    query = (
        select(accounts.c.id, accounts.c.name)
        .select_from(
            accounts.outerjoin(account_billing, account_billing.c.account_id == accounts.c.id)
        )
        .where(account_billing.c.account_id.is_(None), accounts.c.state != "terminated")
        .order_by(accounts.c.id)
    )
    if account_id is not None:
        query = query.where(accounts.c.id == account_id)
    return list(await conn.execute(query))


async def _default_price_list(conn: AsyncConnection) -> Row[int, str] | None:
    query = select(price_lists.c.id, price_lists.c.name).where(price_lists.c.is_default)
    return (await conn.execute(query)).first()


async def _adopt_default(conn: AsyncConnection, without: list[Row[Any]], at: datetime) -> bool:
    """Give the accounts `without` terms the default price list's, in traffic mode, each in its
    audit log as the operator's act (the operator chose the default); False without a default.
    A row made meanwhile by another transaction (PostgreSQL) is left as it is."""
    default = await _default_price_list(conn)
    if default is None:
        return False
    dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    terms = {"charge_by": "traffic", "price_list": default.name}
    for account in without:
        made = await conn.execute(
            dialect_insert(account_billing)
            .values(
                account_id=account.id,
                charge_by="traffic",
                price_list_id=default.id,
                created_at=at,
            )
            .on_conflict_do_nothing()
        )
        if made.rowcount:
            await audit(
                conn,
                Principal(kind="operator"),
                account.id,
                "billing.default_terms",
                f"account {account.id}",
                terms,
            )
    return True


async def _load_or_default(conn: AsyncConnection, account_id: int, at: datetime) -> _Account | None:
    """`_load` in a write transaction, giving the account the default list's terms first when
    it has none; None when billing is not configured for it (or it was terminated without)."""
    account = await _load(conn, account_id)
    if account is None and await _adopt_default(conn, await _without_terms(conn, account_id), at):
        account = await _load(conn, account_id)
    return account


async def _packages(conn: AsyncConnection, account_id: int) -> tuple[rating.Package, ...]:
    rows = await conn.execute(
        select(packages).where(packages.c.account_id == account_id).order_by(packages.c.id)
    )
    return tuple(
        rating.Package(
            str(row.id),
            int(row.quota_bytes),
            int(row.remaining_bytes),
            row.activated_at,
            row.expires_at,
            int(row.price_fen),
        )
        for row in rows
    )


async def _store_packages(
    conn: AsyncConnection, before: tuple[rating.Package, ...], after: tuple[rating.Package, ...]
) -> None:
    was = {p.id: p.remaining_bytes for p in before}
    for package in after:
        if was[package.id] != package.remaining_bytes:
            await conn.execute(
                update(packages)
                .where(packages.c.id == int(package.id))
                .values(remaining_bytes=package.remaining_bytes)
            )


def _record_json(
    record: rating.DayRecord, charge_by: rating.ChargeBy, prices: rating.PriceList
) -> dict[str, Any]:
    return {
        "charge_by": charge_by,
        "prices": _rates_json(prices),
        "usage": [[b.start.isoformat(), b.bytes_sent] for b in record.usage],
        "consumed": [[pid, n] for pid, n in record.consumed],
        "uncovered_bytes": record.uncovered_bytes,
        "peak_bucket_bytes": record.peak_bucket_bytes,
    }


def _record_of(
    day: date, data: dict[str, Any]
) -> tuple[rating.DayRecord, rating.ChargeBy, rating.PriceList | None]:
    """The day's record, charge mode and rates (None: settled before rates were recorded)."""
    record = rating.DayRecord(
        day=day,
        usage=tuple(rating.Bucket(datetime.fromisoformat(s), int(n)) for s, n in data["usage"]),
        consumed=tuple((str(pid), int(n)) for pid, n in data["consumed"]),
        uncovered_bytes=int(data["uncovered_bytes"]),
        peak_bucket_bytes=int(data["peak_bucket_bytes"]),
    )
    charge_by: rating.ChargeBy = "bandwidth" if data["charge_by"] == "bandwidth" else "traffic"
    prices = _price_list(data["prices"]) if "prices" in data else None
    return record, charge_by, prices


def _buckets(points: list[tuple[datetime, int]]) -> tuple[rating.Bucket, ...]:
    return tuple(rating.Bucket(start, n) for start, n in points)


def _line_values(
    account_id: int, day: date, line: rating.BillLine, at: datetime, *, adjustment: bool
) -> dict[str, Any]:
    return {
        "account_id": account_id,
        "day": day,
        "kind": line.kind,
        "quantity": format(line.quantity, "f"),
        "unit": line.unit,
        "unit_price": format(line.unit_price, "f"),
        "amount_fen": line.amount_fen,
        "ref": line.ref,
        "adjustment": adjustment,
        "created_at": at,
    }


async def _insert_lines(
    conn: AsyncConnection,
    account_id: int,
    day: date,
    lines: tuple[rating.BillLine, ...],
    at: datetime,
    *,
    adjustment: bool,
) -> None:
    if lines:
        await conn.execute(
            insert(bill_lines),
            [_line_values(account_id, day, line, at, adjustment=adjustment) for line in lines],
        )


def _month(day: date) -> tuple[date, date]:
    first = day.replace(day=1)
    return first, (first + timedelta(days=32)).replace(day=1)


async def _month_billable(
    conn: AsyncConnection, account_id: int, day: date, *, through_month: bool
) -> int:
    """Billable traffic charged in `day`'s month: before `day` (to settle it), or all of the
    month so far (to adjust it), from the settled days' records (rating decision 1)."""
    first, after = _month(day)
    rows = await conn.execute(
        select(day_settlements.c.record).where(
            day_settlements.c.account_id == account_id,
            day_settlements.c.day >= first,
            day_settlements.c.day < (after if through_month else day),
        )
    )
    return sum(
        int(row.record["uncovered_bytes"]) for row in rows if row.record["charge_by"] == "traffic"
    )


async def _next_day(conn: AsyncConnection, account: _Account) -> date:
    last = (
        await conn.execute(
            select(func.max(day_settlements.c.day)).where(
                day_settlements.c.account_id == account.id
            )
        )
    ).scalar_one()
    return account.first_day if last is None else last + timedelta(days=1)


async def _store_money(
    conn: AsyncConnection,
    account: _Account,
    state: rating.AccountState,
    at: datetime,
    day: date,
    **values: Any,
) -> None:
    """Write the balance and penalty; enter or leave arrears; notice a low balance (11)."""
    balance = state.balance_fen
    arrears_since = account.arrears_since
    if balance < 0 and arrears_since is None:
        arrears_since = at
        await notify(
            conn,
            account.id,
            "arrears",
            {"balance_fen": balance, "day": day.isoformat()},
            at,
            dedupe_key=f"arrears:{day}",
        )
    elif balance >= 0 and arrears_since is not None:
        arrears_since = None
        await _resume_arrears(conn, account, at)
    low = account.low_balance_fen  # 0: no balance-low notice (the arrears notice says it)
    if low and balance < low <= account.balance_fen:
        await notify(
            conn,
            account.id,
            "balance_low",
            {"balance_fen": balance, "low_balance_fen": account.low_balance_fen},
            at,
            dedupe_key=f"balance_low:{day}",
        )
    await conn.execute(
        update(account_billing)
        .where(account_billing.c.account_id == account.id)
        .values(
            balance_fen=balance,
            penalty_accrued_fen=state.penalty_accrued_fen,
            arrears_since=arrears_since,
            **values,
        )
    )


def _state(
    account: _Account, month_billable: int, pkgs: tuple[rating.Package, ...]
) -> rating.AccountState:
    return rating.AccountState(
        balance_fen=account.balance_fen,
        month_billable_bytes=month_billable,
        penalty_accrued_fen=account.penalty_accrued_fen,
        packages=pkgs,
    )


async def _fees_billed_since(conn: AsyncConnection, account_id: int, instant: datetime) -> int:
    """Service fees whose lines were written at or after `instant` (adjustments included)."""
    total = (
        await conn.execute(
            select(func.coalesce(func.sum(bill_lines.c.amount_fen), 0)).where(
                bill_lines.c.account_id == account_id,
                bill_lines.c.created_at >= instant,
                bill_lines.c.kind.in_(_FEE_KINDS),
            )
        )
    ).scalar_one()
    return int(total)


async def _settle_day(
    conn: AsyncConnection, account: _Account, day: date, at: datetime, until: datetime | None = None
) -> rating.DaySettlement:
    """Settle `day` (the next unsettled one) with its usage before `until` (termination)."""
    start, end = rating.day_bounds(day, account.terms.timezone)
    points = await usage_points(conn, account.id, start, end if until is None else min(end, until))
    pkgs = await _packages(conn, account.id)
    month = await _month_billable(conn, account.id, day, through_month=False)
    result = rating.settle_day(
        account.terms,
        account.prices,
        day,
        _buckets(points),
        _state(account, month, pkgs),
        billed_since_day_end_fen=await _fees_billed_since(conn, account.id, end),
    )
    await conn.execute(
        insert(day_settlements).values(
            account_id=account.id,
            day=day,
            record=_record_json(result.record, account.terms.charge_by, account.prices),
            settled_at=at,
        )
    )
    await _insert_lines(conn, account.id, day, result.lines, at, adjustment=False)
    await _store_packages(conn, pkgs, result.state.packages)
    await _store_money(
        conn, account, result.state, at, day, month_billable_bytes=result.state.month_billable_bytes
    )
    return result


async def _adjust_day(
    conn: AsyncConnection, account: _Account, day: date, at: datetime
) -> rating.DayAdjustment | None:
    """Charge `day`'s late usage as adjustment lines; None when it has none (any more)."""
    data = (
        await conn.execute(
            select(day_settlements.c.record).where(
                day_settlements.c.account_id == account.id, day_settlements.c.day == day
            )
        )
    ).scalar_one()
    record, charge_by, prices = _record_of(day, data)
    if prices is None:
        # Settled before records kept their rates: the current list is the best there is (and
        # is recorded below, so that later adjustments of the day agree with this one).
        prices = account.prices
    start, end = rating.day_bounds(day, account.terms.timezone)
    usage = _buckets(await usage_points(conn, account.id, start, end))
    if _usage_map(usage) == _usage_map(record.usage):
        return None
    pkgs = await _packages(conn, account.id)
    month = await _month_billable(conn, account.id, day, through_month=True)
    result = rating.adjust_day(
        replace(account.terms, charge_by=charge_by),
        prices,
        record,
        usage,
        _state(account, month, pkgs),
    )
    await conn.execute(
        update(day_settlements)
        .where(day_settlements.c.account_id == account.id, day_settlements.c.day == day)
        .values(record=_record_json(result.record, charge_by, prices))
    )
    await _insert_lines(conn, account.id, day, result.lines, at, adjustment=True)
    await _store_packages(conn, pkgs, result.state.packages)
    latest = await _next_day(conn, account) - timedelta(days=1)
    if _month(latest) == _month(day):  # the month-to-date shown is the latest settled month's
        month = result.state.month_billable_bytes
    else:
        month = account.month_billable_bytes
    await _store_money(conn, account, result.state, at, day, month_billable_bytes=month)
    return result


def _usage_map(usage: tuple[rating.Bucket, ...]) -> dict[datetime, int]:
    return {b.start.astimezone(UTC): b.bytes_sent for b in usage if b.bytes_sent}


# --- enforcement: arrears, notices, termination ---------------------------------------------


async def _suspended_for(conn: AsyncConnection, account_id: int, prefix: str) -> list[Row[Any]]:
    """The account's domains suspended with a reason starting `prefix` (billing's own)."""
    rows = await conn.execute(
        select(domains)
        .where(domains.c.account_id == account_id, domains.c.state == "suspended")
        .order_by(domains.c.name)
    )
    return [row for row in rows if row.state_reason.startswith(prefix)]


async def _release(conn: AsyncConnection, account: _Account, held: list[Row[Any]]) -> None:
    """Activate `held`, or hand them to the operator's suspension of the account (whose resume
    then resumes them): money must not undo the operator's decision."""
    for domain in held:
        if account.state == "active":
            await set_state(conn, domain, "active", "")
        elif account.state == "suspended":
            await set_state(conn, domain, "suspended", ACCOUNT_SUSPENDED + account.state_reason)


async def _resume_arrears(conn: AsyncConnection, account: _Account, at: datetime) -> None:
    """The arrears ended: resume the domains suspended for them."""
    suspended = await _suspended_for(conn, account.id, ARREARS)
    await _release(conn, account, suspended)
    if suspended and account.state == "active":
        await notify(conn, account.id, "resumed", {"domains": [d.name for d in suspended]}, at)


async def _start_prepaid(conn: AsyncConnection, account_id: int, at: datetime) -> None:
    """4.1, after a payment or grant: once the account may serve, its waiting domains go live
    in this transaction (edges hear `domain.state` with the commit)."""
    if not await prepaid_may_serve(conn, account_id, at):
        return
    waiting = await _suspended_for(conn, account_id, AWAITING_PREPAYMENT)
    if waiting:
        await _release(conn, await _reloaded(conn, account_id), waiting)


async def _suspend_arrears(conn: AsyncConnection, account: _Account, at: datetime) -> None:
    """4.3 / 5.2b after the grace: suspend the account's active domains."""
    assert account.arrears_since is not None
    since = account.arrears_since.strftime("%Y-%m-%d %H:%M UTC")
    reason = f"{ARREARS}the account's balance is overdue since {since}"
    rows = await conn.execute(
        select(domains)
        .where(domains.c.account_id == account.id, domains.c.state == "active")
        .order_by(domains.c.name)
    )
    names = []
    for domain in rows.all():
        await set_state(conn, domain, "suspended", reason)
        names.append(domain.name)
    if names:
        await notify(
            conn,
            account.id,
            "suspended",
            {"domains": names, "reason": reason, "balance_fen": account.balance_fen},
            at,
            dedupe_key=f"suspended:{account.arrears_since.isoformat()}",
        )


async def _package_notices(conn: AsyncConnection, account_id: int, at: datetime) -> None:
    for p in await _packages(conn, account_id):
        if not p.valid_at(at):
            continue
        detail = {
            "package": int(p.id),
            "quota_bytes": p.quota_bytes,
            "remaining_bytes": p.remaining_bytes,
            "expires_at": p.expires_at.isoformat(),
        }
        if (p.quota_bytes - p.remaining_bytes) * 10 >= p.quota_bytes * 9:
            await notify(conn, account_id, "package_90", detail, at, dedupe_key=f"90:{p.id}")
        if p.remaining_bytes and at >= p.expires_at - EXPIRY_NOTICE:
            await notify(conn, account_id, "package_expiring", detail, at, dedupe_key=f"exp:{p.id}")


async def _terminate(
    conn: AsyncConnection, account: _Account, at: datetime, now: datetime
) -> rating.TerminationRefund:
    """5.5 at `at`: settle up to it, credit the refund, terminate the account (6.3)."""
    last = rating.billing_date(at, account.terms.timezone)
    while (day := await _next_day(conn, account)) <= last:
        await _settle_day(conn, account, day, now, until=at if day == last else None)
        account = await _reloaded(conn, account.id)
    pkgs = await _packages(conn, account.id)
    refund = rating.termination_refund(account.balance_fen, pkgs, at)
    credit = refund.credited_balance_fen - refund.balance_fen
    line = rating.BillLine("refund", Decimal(refund.refund_fen), "fen", Decimal(1), -credit, "5.5")
    await _insert_lines(conn, account.id, last, (line,), now, adjustment=False)
    for package in refund.packages:
        await conn.execute(
            update(packages).where(packages.c.id == int(package.id)).values(remaining_bytes=0)
        )
    await account_routes.terminate(conn, account.id, account.termination_reason)
    account = await _reloaded(conn, account.id)
    state = rating.apply_payment(_state(account, 0, ()), credit)
    await _store_money(conn, account, state, now, last)
    await notify(
        conn,
        account.id,
        "terminated",
        {
            "at": at.isoformat(),
            "reason": account.termination_reason,
            "refund_fen": refund.refund_fen,
            "owed_fen": refund.owed_fen,
        },
        now,
        dedupe_key="terminated",
    )
    return refund


async def _reloaded(conn: AsyncConnection, account_id: int) -> _Account:
    account = await _load(conn, account_id)
    assert account is not None  # billing rows are never deleted
    return account


# --- the job ----------------------------------------------------------------------------------


async def _bill_every_account(
    engine: AsyncEngine, at: datetime, changed: Callable[[], None]
) -> None:
    """Accounts without terms get the default price list's; without a default, one warning
    names them (their days wait)."""
    async with engine.connect() as conn:
        without = await _without_terms(conn)
        default = await _default_price_list(conn) if without else None
    if not without:
        return
    if default is None:
        named = ", ".join(f"account {a.id} {a.name!r}" for a in without[:_NAMED_IN_WARNING])
        more = len(without) - _NAMED_IN_WARNING
        log.warning(
            "not billed, no billing terms and no default price list: %s%s",
            named,
            f" and {more} more" if more > 0 else "",
        )
        return
    async with _settling(engine, changed) as conn:
        await _adopt_default(conn, await _without_terms(conn), at)


async def _account_ids(engine: AsyncEngine) -> list[int]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(account_billing.c.account_id).order_by(account_billing.c.account_id)
        )
        return [int(row[0]) for row in rows]


def _last_due_day(account: _Account, at: datetime) -> date:
    """The last ended billing day at `at`; before a termination's day (it settles that one)."""
    last = rating.billing_date(at, account.terms.timezone) - timedelta(days=1)
    if account.termination_at is not None:
        ends = rating.billing_date(account.termination_at, account.terms.timezone)
        last = min(last, ends - timedelta(days=1))
    return last


async def _settle_through(
    engine: AsyncEngine, account_id: int, last: date, clock: Clock, changed: Callable[[], None]
) -> list[DayCharge]:
    """Settle the account's unsettled days up to `last`, in order, one transaction each."""
    done: list[DayCharge] = []
    while True:
        async with _settling(engine, changed) as conn:
            account = await _load(conn, account_id)
            if account is None or account.state == "terminated":
                return done
            day = await _next_day(conn, account)
            if day > last:
                return done
            result = await _settle_day(conn, account, day, clock.now())
        charge = result.charge_fen + result.penalty_fen
        done.append(DayCharge(account_id, day, charge, result.state.balance_fen))


async def _adjust_late(
    engine: AsyncEngine, account_id: int, at: datetime, clock: Clock, changed: Callable[[], None]
) -> list[DayCharge]:
    """Find settled days whose usage grew since (late batches) and adjust each once; never for
    a terminated account (its settlement at termination is final)."""
    async with engine.connect() as conn:
        account = await _load(conn, account_id, lock=False)
        if account is None or account.state == "terminated":
            return []
        tz = account.terms.timezone
        since = rating.adjustable_since(at, tz)
        rows = list(
            await conn.execute(
                select(day_settlements.c.day, day_settlements.c.record)
                .where(day_settlements.c.account_id == account_id, day_settlements.c.day >= since)
                .order_by(day_settlements.c.day)
            )
        )
        if not rows:
            return []
        start = rating.day_bounds(rows[0].day, tz)[0]
        end = rating.day_bounds(rows[-1].day, tz)[1]
        points = await usage_points(conn, account_id, start, end)
    now_by_day: dict[date, dict[datetime, int]] = {}
    for bucket_start, n in points:
        now_by_day.setdefault(rating.billing_date(bucket_start, tz), {})[bucket_start] = n
    stale = [
        row.day
        for row in rows
        if now_by_day.get(row.day, {}) != _usage_map(_record_of(row.day, row.record)[0].usage)
    ]
    done: list[DayCharge] = []
    for day in stale:
        try:
            async with _settling(engine, changed) as conn:
                account = await _reloaded(conn, account_id)
                if account.state == "terminated":  # terminated meanwhile: final
                    return done
                result = await _adjust_day(conn, account, day, clock.now())
        except ValueError as exc:  # usage went down: a bug elsewhere, never charge it back
            log.warning("account %d: cannot adjust %s: %s", account_id, day, exc)
            continue
        if result is not None:
            done.append(
                DayCharge(account_id, day, result.charge_fen, result.state.balance_fen, True)
            )
    return done


async def _enforce(
    engine: AsyncEngine,
    account_id: int,
    at: datetime,
    grace: timedelta,
    clock: Clock,
    changed: Callable[[], None],
) -> None:
    """Suspend after the arrears grace, package notices, a termination that is due."""
    async with _settling(engine, changed) as conn:
        account = await _load(conn, account_id)
        if account is None or account.state == "terminated":
            return
        if account.termination_at is not None and account.termination_at <= at:
            await _terminate(conn, account, account.termination_at, clock.now())
            return
        if account.arrears_since is not None and at >= account.arrears_since + grace:
            await _suspend_arrears(conn, account, clock.now())
        await _package_notices(conn, account_id, at)


def _nothing() -> None:
    """No feed to wake (the command line: edges hear PostgreSQL's NOTIFY or the next poll)."""


@dataclass(frozen=True, slots=True)
class AccountFailure:
    """An account whose billing failed in a run (the others' went on)."""

    account_id: int
    error: Exception

    def line(self) -> str:
        kind = type(self.error).__name__
        reason = " ".join(str(self.error).splitlines())
        what = f"{kind}: {reason}" if reason else kind
        return f"account {self.account_id}: {what}"


@dataclass(frozen=True, slots=True)
class Settlement:
    """What a run did (`DayCharge`s), the accounts whose billing failed, and whether it stopped
    early because another replica is settling."""

    charges: tuple[DayCharge, ...]
    failures: tuple[AccountFailure, ...]
    busy: bool


async def settle(
    engine: AsyncEngine,
    day_or_now: date | datetime,
    *,
    clock: Clock,
    grace: timedelta = ARREARS_GRACE,
    changed: Callable[[], None] = _nothing,
) -> list[DayCharge]:
    """`settle_run` for the scheduler: what it settled and adjusted; the accounts that failed
    are logged with their tracebacks."""
    run = await settle_run(engine, day_or_now, clock=clock, grace=grace, changed=changed)
    for failure in run.failures:
        log.error("billing %s", failure.line(), exc_info=failure.error)
    if run.busy:
        log.info("another control replica is settling; this run stops")
    return list(run.charges)


async def settle_run(
    engine: AsyncEngine,
    day_or_now: date | datetime,
    *,
    clock: Clock,
    grace: timedelta = ARREARS_GRACE,
    changed: Callable[[], None] = _nothing,
) -> Settlement:
    """Settle what is due.

    First, accounts without billing terms get the default price list's (or a warning names
    them). With an instant (the scheduler): for every account with billing terms, adjust
    settled days for late usage, settle every billing day that has ended at that instant, then
    suspend for arrears after `grace`, send package notices and carry out a termination that is
    due; the charges are what was settled and adjusted. With a date (`cdn control settle
    --date`): the same at `clock`'s instant, except that no day after the date is settled; the
    charges are the adjustments, then one entry per account with that day's charge. Running
    either twice changes nothing. An account whose billing fails is a failure; the others are
    billed. Stops early (`busy`) when another replica is settling (PostgreSQL).
    """
    charges: list[DayCharge] = []
    failures: list[AccountFailure] = []
    try:
        await _bill_every_account(engine, clock.now(), changed)
        for account_id in await _account_ids(engine):
            try:
                if isinstance(day_or_now, datetime):
                    charges += await _run_due(engine, account_id, day_or_now, grace, clock, changed)
                else:
                    charges += await _settle_date(
                        engine, account_id, day_or_now, grace, clock, changed
                    )
            except Busy:
                raise
            except Exception as exc:  # one account's failure must not stop the others' billing
                failures.append(AccountFailure(account_id, exc))
    except Busy:
        return Settlement(tuple(charges), tuple(failures), busy=True)
    return Settlement(tuple(charges), tuple(failures), busy=False)


async def _run_due(
    engine: AsyncEngine,
    account_id: int,
    at: datetime,
    grace: timedelta,
    clock: Clock,
    changed: Callable[[], None],
    through: date | None = None,
) -> list[DayCharge]:
    """Adjust, settle (the days due at `at`, none after `through`) and enforce one account."""
    async with engine.connect() as conn:
        account = await _load(conn, account_id, lock=False)
    if account is None:
        return []
    last = _last_due_day(account, at)
    if through is not None:
        last = min(last, through)
    done = await _adjust_late(engine, account_id, at, clock, changed)
    done += await _settle_through(engine, account_id, last, clock, changed)
    await _enforce(engine, account_id, at, grace, clock, changed)
    return done


async def _settle_date(
    engine: AsyncEngine,
    account_id: int,
    day: date,
    grace: timedelta,
    clock: Clock,
    changed: Callable[[], None],
) -> list[DayCharge]:
    """The scheduler's run at `clock`'s instant up to `day`: its adjustments, then `day`'s
    charge (adjustments of it included) and the balance."""
    done = await _run_due(engine, account_id, clock.now(), grace, clock, changed, through=day)
    adjusted = [charge for charge in done if charge.adjustment]
    async with engine.connect() as conn:
        settled = (
            await conn.execute(
                select(func.count()).where(
                    day_settlements.c.account_id == account_id, day_settlements.c.day == day
                )
            )
        ).scalar_one()
        charge = (
            await conn.execute(
                select(func.coalesce(func.sum(bill_lines.c.amount_fen), 0)).where(
                    bill_lines.c.account_id == account_id,
                    bill_lines.c.day == day,
                    bill_lines.c.kind.in_(_CHARGE_KINDS),
                )
            )
        ).scalar_one()
        account = await _load(conn, account_id, lock=False)
    assert account is not None
    return [
        *adjusted,
        DayCharge(account_id, day, int(charge) if settled else None, account.balance_fen),
    ]


def settle_main(path: str, day_text: str) -> int:
    """`cdn control settle --config FILE --date YYYY-MM-DD`: one line per account on stdout.
    Exit 0 when every account settled; 1 with one line per failed account on stderr (the
    traceback at the DEBUG log level), or when the database cannot be used; 2 for a bad config
    or date; 3 when another replica is settling (after printing what this run did)."""
    from control.config import load_config
    from control.db import engine_for, migrate
    from edge.config import ConfigError

    try:
        config = load_config(path, serving=False)
    except ConfigError as exc:
        print(f"cdn: {exc}", file=sys.stderr)
        return 2
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", day_text):
        print(f"cdn: --date: {day_text!r} is not a date YYYY-MM-DD", file=sys.stderr)
        return 2
    try:
        day = date.fromisoformat(day_text)
    except ValueError as exc:
        print(f"cdn: --date: {day_text!r} is not a date YYYY-MM-DD ({exc})", file=sys.stderr)
        return 2

    async def run() -> Settlement:
        engine = engine_for(config.database)
        try:
            await migrate(engine)
            grace = timedelta(seconds=config.arrears_grace)
            return await settle_run(engine, day, clock=Clock(), grace=grace)
        finally:
            await engine.dispose()

    try:
        done = asyncio.run(run())
    except SQLAlchemyError as exc:
        print(f"cdn: control settle: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return 1
    for charge in done.charges:
        print(charge.line())
    for failure in done.failures:
        log.debug("billing %s", failure.line(), exc_info=failure.error)
        print(f"cdn: control settle: {failure.line()}", file=sys.stderr)
    if done.failures:
        return 1
    if done.busy:
        print(
            "cdn: control settle: another control replica is settling now; this run stopped "
            "early: run it again when that one is done",
            file=sys.stderr,
        )
        return BUSY_EXIT
    return 0


# --- the API ----------------------------------------------------------------------------------

routes = RouteTable()

Rate = Annotated[str, Field(pattern=r"^[0-9]{1,12}(\.[0-9]{1,6})?$", description="fen, decimal")]
Fen = Annotated[int, Field(ge=0, le=MAX_FEN)]


class TierIn(Body):
    up_to_gb: Annotated[int, Field(ge=1, le=10**9)] | None
    fen_per_gb: Rate


class PriceListIn(Body):
    traffic_tiers: Annotated[list[TierIn], Field(min_length=1, max_length=20)]
    fen_per_mbps_day: Rate
    gb_bytes: Annotated[int, Field(ge=1, le=2**40)] = 10**9
    default: bool | None = Field(
        None,
        description="true: this list bills accounts without terms of their own (it takes the "
        "mark from any other); false: it no longer does; absent: unchanged",
    )


class BillingTermsIn(Body):
    charge_by: Literal["traffic", "bandwidth"]
    price_list: Name
    low_balance_fen: Fen = 0


class PaymentIn(Body):
    amount_fen: Annotated[int, Field(gt=0, le=MAX_FEN)]
    reference: Annotated[str, Field(min_length=1, max_length=200)]


class PackageIn(Body):
    quota_bytes: Annotated[int, Field(gt=0, le=2**62)]
    valid_days: Annotated[int, Field(ge=1, le=3660)] | None = None
    expires_at: str | None = None
    price_fen: Fen = 0

    @model_validator(mode="after")
    def _one_validity(self) -> PackageIn:
        if (self.valid_days is None) == (self.expires_at is None):
            raise ValueError("give exactly one of valid_days and expires_at")
        return self


class TerminationIn(Body):
    at: str | None = None
    now: bool = False
    reason: Reason

    @model_validator(mode="after")
    def _one_time(self) -> TerminationIn:
        if (self.at is None) == (not self.now):
            raise ValueError('give exactly one of "at" and "now": true')
        return self


def _instant(raw: str, field: str) -> datetime:
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise invalid([{"field": field, "problem": "not an ISO 8601 date-time"}]) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise invalid([{"field": field, "problem": "needs a UTC offset (e.g. +08:00 or Z)"}])
    return value.astimezone(UTC)


def _price_list_view(row: Row[Any]) -> dict[str, Any]:
    return {
        "name": row.name,
        "traffic_tiers": row.traffic_tiers,
        "fen_per_mbps_day": row.fen_per_mbps_day,
        "gb_bytes": int(row.gb_bytes),
        "default": bool(row.is_default),
        "created_at": iso(row.created_at),
    }


def _package_view(row: Row[Any], at: datetime) -> dict[str, Any]:
    if at < row.activated_at:
        state = "pending"
    elif at >= row.expires_at:
        state = "expired"
    elif row.remaining_bytes == 0:
        state = "used_up"
    else:
        state = "live"
    return {
        "id": row.id,
        "quota_bytes": int(row.quota_bytes),
        "remaining_bytes": int(row.remaining_bytes),
        "activated_at": iso(row.activated_at),
        "expires_at": iso(row.expires_at),
        "price_fen": int(row.price_fen),
        "state": state,
    }


async def _package_rows(
    conn: AsyncConnection, account_id: int, start: datetime | None = None
) -> list[Row[Any]]:
    query = select(packages).where(packages.c.account_id == account_id)
    if start is not None:
        query = query.where(packages.c.expires_at > start)
    return list(await conn.execute(query.order_by(packages.c.expires_at, packages.c.id)))


def _money_view(account: _Account) -> dict[str, Any]:
    return {
        "account_id": account.id,
        "billing": account.terms.billing,
        "charge_by": account.terms.charge_by,
        "price_list": account.price_list,
        "timezone": account.terms.timezone,
        "balance_fen": account.balance_fen,
        "penalty_accrued_fen": account.penalty_accrued_fen,
        "month_billable_bytes": account.month_billable_bytes,
        "low_balance_fen": account.low_balance_fen,
        "arrears_since": iso(account.arrears_since),
        "termination_at": iso(account.termination_at),
    }


async def _operator_account(
    conn: AsyncConnection, account_id: int, at: datetime, *, live: bool = False
) -> _Account:
    """The path's account with its billing terms (the default list's if it has none): 404
    without the account, 409 when billing is not configured (and, with `live`, when it was
    terminated)."""
    await account_routes.account_row(conn, account_id)
    account = await _load_or_default(conn, account_id, at)
    if account is None:
        raise Problem(409, _not_configured(account_id))
    if live and account.state == "terminated":
        raise Problem(409, f"account {account_id} was terminated")
    return account


@routes.route_with_body(
    "PUT", "/v1/price-lists/{name}", "Create or replace a price list", PriceListIn, who=OPERATOR
)
async def put_price_list(request: web.Request, body: PriceListIn) -> web.StreamResponse:
    name = request.match_info["name"]
    tiers = [{"up_to_gb": t.up_to_gb, "fen_per_gb": t.fen_per_gb} for t in body.traffic_tiers]
    try:
        rating.PriceList(
            tuple(
                rating.TrafficTier(t.up_to_gb, Decimal(t.fen_per_gb)) for t in body.traffic_tiers
            ),
            Decimal(body.fen_per_mbps_day),
            body.gb_bytes,
        )
    except ValueError as exc:
        field = "gb_bytes" if "gb_bytes" in str(exc) else "traffic_tiers"
        raise invalid([{"field": field, "problem": str(exc)}]) from None
    values: dict[str, Any] = {
        "traffic_tiers": tiers,
        "fen_per_mbps_day": body.fen_per_mbps_day,
        "gb_bytes": body.gb_bytes,
    }
    if body.default is not None:
        values["is_default"] = body.default
    at = request.app[CLOCK].now()
    try:
        async with writing(request) as conn:
            if body.default:  # first, as the unique index allows one default at any moment
                await conn.execute(
                    update(price_lists)
                    .where(price_lists.c.is_default, price_lists.c.name != name)
                    .values(is_default=False)
                )
            found = await conn.execute(select(price_lists.c.id).where(price_lists.c.name == name))
            if found.first() is None:
                await conn.execute(insert(price_lists).values(name=name, created_at=at, **values))
            else:
                await conn.execute(
                    update(price_lists).where(price_lists.c.name == name).values(values)
                )
            row = (await conn.execute(select(price_lists).where(price_lists.c.name == name))).one()
    except IntegrityError:  # a concurrent PUT made it, or another default (PostgreSQL)
        raise Problem(409, f"price lists changed meanwhile; PUT {name!r} again") from None
    return web.json_response(_price_list_view(row))


@routes.route_with_body(
    "PUT",
    "/v1/accounts/{id}/billing",
    "Set an account's billing terms (charge mode, price list, low-balance threshold)",
    BillingTermsIn,
    who=OPERATOR,
)
async def put_billing(request: web.Request, body: BillingTermsIn) -> web.StreamResponse:
    account_id = path_id(request)
    at = request.app[CLOCK].now()
    async with writing(request) as conn:
        await account_routes.account_row(conn, account_id)
        price_list_id = (
            await conn.execute(
                select(price_lists.c.id).where(price_lists.c.name == body.price_list)
            )
        ).scalar_one_or_none()
        if price_list_id is None:
            raise invalid([{"field": "price_list", "problem": "no such price list"}])
        values = {
            "charge_by": body.charge_by,
            "price_list_id": price_list_id,
            "low_balance_fen": body.low_balance_fen,
        }
        dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        await conn.execute(  # one statement: a settlement run may adopt the default meanwhile
            dialect_insert(account_billing)
            .values(account_id=account_id, created_at=at, **values)
            .on_conflict_do_update(index_elements=[account_billing.c.account_id], set_=values)
        )
        await audit(
            conn, caller(request), account_id, "billing.terms", f"account {account_id}", values
        )
        account = await _reloaded(conn, account_id)
    return web.json_response(_money_view(account))


@routes.route_with_body(
    "POST",
    "/v1/accounts/{id}/payments",
    "Record a payment (idempotent by reference); ending arrears resumes the domains",
    PaymentIn,
    who=OPERATOR,
    status=201,
)
async def post_payment(request: web.Request, body: PaymentIn) -> web.StreamResponse:
    account_id = path_id(request)
    at = request.app[CLOCK].now()
    async with writing(request) as conn:
        account = await _operator_account(conn, account_id, at)
        found = (
            await conn.execute(
                select(payments).where(
                    payments.c.account_id == account_id, payments.c.reference == body.reference
                )
            )
        ).first()
        if found is not None:
            if found.amount_fen != body.amount_fen:
                raise Problem(
                    409, f"payment {body.reference!r} was recorded with {found.amount_fen} fen"
                )
            replayed = True
        else:
            await conn.execute(
                insert(payments).values(
                    account_id=account_id,
                    amount_fen=body.amount_fen,
                    at=at,
                    reference=body.reference,
                )
            )
            state = rating.apply_payment(_state(account, 0, ()), body.amount_fen)
            day = rating.billing_date(at, account.terms.timezone)
            await _store_money(conn, account, state, at, day)
            await audit(
                conn,
                caller(request),
                account_id,
                "billing.payment",
                f"account {account_id}",
                {"amount_fen": body.amount_fen, "reference": body.reference},
            )
            await _start_prepaid(conn, account_id, at)
            replayed = False
        account = await _reloaded(conn, account_id)
    payment = {"reference": body.reference, "amount_fen": body.amount_fen, "replayed": replayed}
    return web.json_response({"payment": payment, **_money_view(account)}, status=201)


@routes.route_with_body(
    "POST",
    "/v1/accounts/{id}/packages",
    "Grant a resource package (its price is paid from the balance)",
    PackageIn,
    who=OPERATOR,
    status=201,
)
async def post_package(request: web.Request, body: PackageIn) -> web.StreamResponse:
    account_id = path_id(request)
    at = request.app[CLOCK].now()
    if body.expires_at is not None:
        expires = _instant(body.expires_at, "expires_at")
        if expires <= at:
            raise invalid([{"field": "expires_at", "problem": "is not in the future"}])
    else:
        expires = at + timedelta(days=body.valid_days or 0)
    async with writing(request) as conn:
        account = await _operator_account(conn, account_id, at, live=True)
        if body.price_fen > account.balance_fen:
            raise Problem(
                409,
                f"the balance ({account.balance_fen} fen) does not pay the package's price "
                f"({body.price_fen} fen); record a payment first (agreement 4.1)",
            )
        package_id = (
            await conn.execute(
                insert(packages)
                .values(
                    account_id=account_id,
                    quota_bytes=body.quota_bytes,
                    remaining_bytes=body.quota_bytes,
                    activated_at=at,
                    expires_at=expires,
                    price_fen=body.price_fen,
                    created_at=at,
                )
                .returning(packages.c.id)
            )
        ).scalar_one()
        day = rating.billing_date(at, account.terms.timezone)
        if body.price_fen:
            line = rating.BillLine(
                "package_purchase",
                Decimal(1),
                "package",
                Decimal(body.price_fen),
                body.price_fen,
                str(package_id),
            )
            await _insert_lines(conn, account_id, day, (line,), at, adjustment=False)
            state = replace(
                _state(account, 0, ()), balance_fen=account.balance_fen - body.price_fen
            )
            await _store_money(conn, account, state, at, day)
        await audit(
            conn,
            caller(request),
            account_id,
            "billing.package",
            f"package {package_id}",
            {"quota_bytes": body.quota_bytes, "price_fen": body.price_fen},
        )
        await _start_prepaid(conn, account_id, at)
        row = (await conn.execute(select(packages).where(packages.c.id == package_id))).one()
    return web.json_response(_package_view(row, at), status=201)


@routes.route_with_body(
    "POST",
    "/v1/accounts/{id}/termination",
    "Schedule the account's termination (30 days' notice, 5.5) or terminate now (breach, 5.3b)",
    TerminationIn,
    who=OPERATOR,
)
async def post_termination(request: web.Request, body: TerminationIn) -> web.StreamResponse:
    account_id = path_id(request)
    at = request.app[CLOCK].now()
    when = at if body.now else _instant(body.at or "", "at")
    if not body.now and when < at + NOTICE_PERIOD:
        raise invalid(
            [
                {
                    "field": "at",
                    "problem": "must be at least 30 days ahead (agreement 5.5); "
                    'use "now": true for a breach (5.3b)',
                }
            ]
        )
    refund: rating.TerminationRefund | None = None
    async with writing(request) as conn:
        account = await _operator_account(conn, account_id, at, live=True)
        await conn.execute(
            update(account_billing)
            .where(account_billing.c.account_id == account_id)
            .values(termination_at=when, termination_reason=body.reason)
        )
        account = await _reloaded(conn, account_id)
        if body.now:
            refund = await _terminate(conn, account, when, at)
        else:
            await notify(
                conn,
                account_id,
                "termination_scheduled",
                {"at": when.isoformat(), "reason": body.reason},
                at,
            )
        await audit(
            conn,
            caller(request),
            account_id,
            "billing.termination",
            f"account {account_id}",
            {"at": when.isoformat(), "now": body.now, "reason": body.reason},
        )
        account = await _reloaded(conn, account_id)
    result: dict[str, Any] = {
        **_money_view(account),
        "terminated": body.now,
        "reason": body.reason,
        "refund": None,
    }
    if refund is not None:
        result["refund"] = {
            "refund_fen": refund.refund_fen,
            "owed_fen": refund.owed_fen,
            "packages": [
                {"id": int(p.id), "unused_bytes": p.unused_bytes, "refund_fen": p.refund_fen}
                for p in refund.packages
            ],
        }
    return web.json_response(result)


async def _readable(request: web.Request, account_id: int, at: datetime) -> _Account:
    """The account's terms for a read; without them, the default list's, stored now (a write,
    as the next settlement run would do); 404 without the account or when billing is not
    configured."""
    async with reading(request) as conn:
        await account_routes.account_row(conn, account_id)
        account = await _load(conn, account_id, lock=False)
    if account is None:
        async with writing(request) as conn:
            account = await _load_or_default(conn, account_id, at)
    if account is None:
        raise Problem(404, _not_configured(account_id))
    return account


@routes.route(
    "GET", "/v1/accounts/{id}/balance", "An account's balance, arrears and packages", who=OPERATOR
)
async def get_balance(request: web.Request) -> web.StreamResponse:
    account_id = path_id(request)
    at = request.app[CLOCK].now()
    account = await _readable(request, account_id, at)
    async with reading(request) as conn:
        rows = await _package_rows(conn, account_id)
    view = {**_money_view(account), "packages": [_package_view(row, at) for row in rows]}
    return web.json_response(view)


_MONTH = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")
_MONTH_PARAM = QueryParam(
    "month",
    {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}$"},
    "YYYY-MM (default: the month in progress in the account's timezone)",
)


@routes.route(
    "GET",
    "/v1/bills",
    "The caller's bill for a month: lines by day, totals, balance and packages",
    who=ACCOUNTS,
    scope="billing:read",
    query=(_MONTH_PARAM,),
)
async def get_bills(request: web.Request) -> web.StreamResponse:
    return await _bill(request, account_of(caller(request)))


@routes.route(
    "GET",
    "/v1/accounts/{id}/bills",
    "An account's bill for a month (terminated accounts included: the final bill and refund)",
    who=OPERATOR,
    query=(_MONTH_PARAM,),
)
async def get_account_bills(request: web.Request) -> web.StreamResponse:
    return await _bill(request, path_id(request))


async def _bill(request: web.Request, account_id: int) -> web.StreamResponse:
    """The account's bill for the `month` of the query: 404 without the account or when its
    billing is not configured, 422 for a bad month."""
    at = request.app[CLOCK].now()
    account = await _readable(request, account_id, at)
    async with reading(request) as conn:
        raw = request.query.get("month")
        if raw is None:
            first = rating.billing_date(at, account.terms.timezone).replace(day=1)
        elif (match := _MONTH.fullmatch(raw)) is None:
            raise invalid([{"field": "month", "problem": f"{raw!r} is not a month YYYY-MM"}])
        else:
            first = date(int(match[1]), int(match[2]), 1)
        first, after = _month(first)
        rows = await conn.execute(
            select(bill_lines)
            .where(
                bill_lines.c.account_id == account_id,
                bill_lines.c.day >= first,
                bill_lines.c.day < after,
            )
            .order_by(bill_lines.c.day, bill_lines.c.id)
        )
        days: dict[date, list[dict[str, Any]]] = {}
        by_kind: dict[str, int] = {}
        for row in rows:
            days.setdefault(row.day, []).append(
                {
                    "kind": row.kind,
                    "quantity": row.quantity,
                    "unit": row.unit,
                    "unit_price": row.unit_price,
                    "amount_fen": int(row.amount_fen),
                    "ref": row.ref,
                    "adjustment": bool(row.adjustment),
                }
            )
            by_kind[row.kind] = by_kind.get(row.kind, 0) + int(row.amount_fen)
        month_start = rating.day_bounds(first, account.terms.timezone)[0]
        pkgs = await _package_rows(conn, account_id, month_start)
    bill = {
        "month": f"{first:%Y-%m}",
        "days": [
            {
                "day": day.isoformat(),
                "lines": lines,
                "amount_fen": sum(x["amount_fen"] for x in lines),
            }
            for day, lines in days.items()
        ],
        "totals": {"amount_fen": sum(by_kind.values()), "by_kind": by_kind},
        **_money_view(account),
        "packages": [_package_view(row, at) for row in pkgs],
    }
    return web.json_response(bill)


@routes.route(
    "GET", "/v1/packages", "The caller's resource packages", who=ACCOUNTS, scope="billing:read"
)
async def list_packages(request: web.Request) -> web.StreamResponse:
    account_id = account_of(caller(request))
    at = request.app[CLOCK].now()
    async with reading(request) as conn:
        rows = await _package_rows(conn, account_id)
    return web.json_response({"packages": [_package_view(row, at) for row in rows]})
