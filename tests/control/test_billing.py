"""Billing and enforcement on a controllable clock: a month of a prepaid account with two
packages, overage across a tier, arrears, suspension, penalty, payment and resumption, late usage,
termination with its refund, and `cdn control settle`; each figure to the fen, on both backends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import subprocess
import sys
import tempfile
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import make_url, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control import billing, rating
from control.db import engine_for, migrate
from control.scheduler import CLOCK, SCHEDULER, Clock
from control.schema import (
    account_billing,
    accounts,
    bill_lines,
    day_settlements,
    notices,
    packages,
    price_lists,
    usage,
)
from edge.meter import FIELDS

from .conftest import PG_URL, Api, admin_connection

ROOT = Path(__file__).resolve().parents[2]
GB = 10**9
CST = timedelta(hours=8)  # Asia/Shanghai, the default billing zone
PRICES = {
    "traffic_tiers": [
        {"up_to_gb": 10, "fen_per_gb": "200"},
        {"up_to_gb": None, "fen_per_gb": "150"},
    ],
    "fen_per_mbps_day": "100",
}


def local(day: int, hour: int = 0, minute: int = 0, month: int = 11) -> datetime:
    """An instant given as Asia/Shanghai wall time in 2026."""
    return datetime(2026, month, day, hour, minute, tzinfo=UTC) - CST


def instant(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def add_usage(api: Api, account_id: int, domain: str, start: datetime, nbytes: int) -> None:
    """A usage row as the usage module stores an edge batch (bytes sent per 5-minute bucket)."""
    counters = {c.name: 0 for c in usage.columns if c.name not in ("domain", "start", "account_id")}
    values = {**counters, "domain": domain, "start": start, "account_id": account_id}
    async with api.engine.begin() as conn:
        await conn.execute(usage.insert().values({**values, "bytes_sent": nbytes}))


async def tick(api: Api, at: datetime) -> None:
    api.app[CLOCK].set(at)
    await api.app[SCHEDULER].tick()


async def lines(api: Api, account_id: int) -> list[tuple[str, str, str, str, int, bool]]:
    async with api.engine.connect() as conn:
        rows = await conn.execute(
            select(bill_lines)
            .where(bill_lines.c.account_id == account_id)
            .order_by(bill_lines.c.day, bill_lines.c.id)
        )
        return [
            (r.day.isoformat(), r.kind, r.ref, r.quantity, int(r.amount_fen), bool(r.adjustment))
            for r in rows
        ]


async def money(api: Api, account_id: int) -> Any:
    return await api.ok("GET", f"/v1/accounts/{account_id}/balance")


async def notice_kinds(api: Api, account_id: int) -> list[str]:
    async with api.engine.connect() as conn:
        rows = await conn.execute(
            select(notices.c.kind).where(notices.c.account_id == account_id).order_by(notices.c.id)
        )
        return [r.kind for r in rows]


async def state_changes(api: Api, name: str) -> list[tuple[str, str]]:
    return [
        (c.payload["state"], c.payload["reason"])
        for c in await api.changes()
        if c.kind == "domain.state" and c.payload["name"] == name
    ]


async def billed_account(
    api: Api, name: str, billing_kind: str = "prepaid", low_balance_fen: int = 0
) -> tuple[int, str]:
    made = await api.ok("POST", "/v1/accounts", body={"name": name, "billing": billing_kind})
    account_id = made["account"]["id"]
    await api.ok("PUT", "/v1/price-lists/std", body=PRICES)
    terms = {"charge_by": "traffic", "price_list": "std", "low_balance_fen": low_balance_fen}
    await api.ok("PUT", f"/v1/accounts/{account_id}/billing", body=terms)
    return account_id, made["token"]


async def test_a_month_prepaid_packages_overage_arrears_payment(api: Api) -> None:
    api.app[CLOCK].set(local(1))
    a, token = await billed_account(api, "acme", low_balance_fen=1000)
    paid = await api.ok(
        "POST", f"/v1/accounts/{a}/payments", body={"amount_fen": 10000, "reference": "p1"}
    )
    await api.domain(token, "www.acme.test")  # after the prepayment: active at once (4.1)
    assert paid["balance_fen"] == 10000
    # Two packages: P1 expires mid-month (Nov 11) with 2 GB unused, P2 lasts the month.
    p1 = await api.ok(
        "POST",
        f"/v1/accounts/{a}/packages",
        body={"quota_bytes": 5 * GB, "valid_days": 10, "price_fen": 3000},
    )
    p2 = await api.ok(
        "POST",
        f"/v1/accounts/{a}/packages",
        body={"quota_bytes": 8 * GB, "expires_at": "2026-12-01T00:00:00+08:00", "price_fen": 4000},
    )
    assert instant(p1["expires_at"]) == local(11) and p1["state"] == "live"
    assert (await money(api, a))["balance_fen"] == 3000

    await add_usage(api, a, "www.acme.test", local(1, 1), 3 * GB)
    await add_usage(api, a, "www.acme.test", local(12, 1), 6 * GB)
    await add_usage(api, a, "www.acme.test", local(12, 2), 4 * GB)
    await add_usage(api, a, "www.acme.test", local(13, 1), 10 * GB)
    await add_usage(api, a, "www.acme.test", local(14, 1), 10 * GB)

    await tick(api, local(15, 0, 1))
    p1_id, p2_id = str(p1["id"]), str(p2["id"])
    assert await lines(api, a) == [
        ("2026-11-01", "package_purchase", p1_id, "1", 3000, False),
        ("2026-11-01", "package_purchase", p2_id, "1", 4000, False),
        ("2026-11-01", "package", p1_id, "3", 0, False),  # earliest expiry first
        ("2026-11-12", "package", p2_id, "8", 0, False),  # P1 expired: P2, then list price
        ("2026-11-12", "traffic", "tier 1", "2", 400, False),
        ("2026-11-13", "traffic", "tier 1", "8", 1600, False),  # crossing 10 GB in the month
        ("2026-11-13", "traffic", "tier 2", "2", 300, False),
        ("2026-11-14", "traffic", "tier 2", "10", 1500, False),
    ]
    state = await money(api, a)
    assert state["balance_fen"] == 3000 - 400 - 1900 - 1500 == -800
    assert instant(state["arrears_since"]) == local(15, 0, 1)
    remaining = {p["id"]: (p["remaining_bytes"], p["state"]) for p in state["packages"]}
    assert remaining == {p1["id"]: (2 * GB, "expired"), p2["id"]: (0, "used_up")}
    kinds = await notice_kinds(api, a)
    assert kinds == ["balance_low", "arrears", "package_90"]
    async with api.engine.connect() as conn:
        settled = (await conn.execute(select(day_settlements.c.day))).all()
    assert len(settled) == 14

    # Settling again changes nothing.
    before = (await lines(api, a), await money(api, a), await api.version())
    await tick(api, local(15, 0, 1))
    assert (await lines(api, a), await money(api, a), await api.version()) == before

    # Within the grace the domain still serves; after 24 h it is suspended through the feed.
    await tick(api, local(15, 12))
    assert await state_changes(api, "www.acme.test") == []
    await tick(api, local(16, 0, 1))
    [(state_name, reason)] = await state_changes(api, "www.acme.test")
    assert state_name == "suspended" and reason.startswith(billing.ARREARS)
    await tick(api, local(17, 0, 1))
    penalties = [line for line in await lines(api, a) if line[1] == "late_penalty"]
    assert penalties == [
        ("2026-11-15", "late_penalty", "7.5", "800", 4, False),  # 0.5 % of 800 fen
        ("2026-11-16", "late_penalty", "7.5", "800", 4, False),  # penalties are not compounded
    ]
    state = await money(api, a)
    assert (state["balance_fen"], state["penalty_accrued_fen"]) == (-808, 8)
    assert (await notice_kinds(api, a))[-1] == "suspended"

    # A payment that ends the arrears resumes the domain in the same request.
    paid = await api.ok(
        "POST", f"/v1/accounts/{a}/payments", body={"amount_fen": 1000, "reference": "p2"}
    )
    assert (paid["balance_fen"], paid["penalty_accrued_fen"], paid["arrears_since"]) == (
        192,
        0,
        None,
    )
    assert (await state_changes(api, "www.acme.test"))[-1] == ("active", "")
    assert (await notice_kinds(api, a))[-1] == "resumed"
    again = await api.ok(
        "POST", f"/v1/accounts/{a}/payments", body={"amount_fen": 1000, "reference": "p2"}
    )
    assert again["payment"]["replayed"] and again["balance_fen"] == 192
    clash = await api.call(
        "POST", f"/v1/accounts/{a}/payments", body={"amount_fen": 5, "reference": "p2"}
    )
    assert clash.status == 409

    # Late usage for a settled day: one adjustment line, at the month's current tier.
    await add_usage(api, a, "www.acme.test", local(13, 5), 1 * GB)
    await tick(api, local(17, 0, 2))
    adjustments = [line for line in await lines(api, a) if line[5]]
    assert adjustments == [("2026-11-13", "traffic", "tier 2", "1", 150, True)]
    assert (await money(api, a))["balance_fen"] == 42
    assert (await money(api, a))["month_billable_bytes"] == 23 * GB
    before = (await lines(api, a), await money(api, a))
    await tick(api, local(17, 0, 3))
    assert (await lines(api, a), await money(api, a)) == before

    bill = await api.ok("GET", "/v1/bills?month=2026-11", token)
    assert bill["totals"] == {
        "amount_fen": 10958,
        "by_kind": {"package_purchase": 7000, "package": 0, "traffic": 3950, "late_penalty": 8},
    }
    assert bill["balance_fen"] == 10000 + 1000 - 10958
    assert [d["day"] for d in bill["days"]][:2] == ["2026-11-01", "2026-11-12"]
    nov13 = next(d for d in bill["days"] if d["day"] == "2026-11-13")
    assert nov13["amount_fen"] == 1600 + 300 + 150 and nov13["lines"][-1]["adjustment"] is True
    assert {p["id"] for p in bill["packages"]} == {p1["id"], p2["id"]}
    listed = await api.ok("GET", "/v1/packages", token)
    assert [p["remaining_bytes"] for p in listed["packages"]] == [2 * GB, 0]
    assert (await api.ok("GET", "/v1/bills?month=2026-10", token))["days"] == []


async def test_postpaid_is_charged_daily_and_may_go_negative(api: Api) -> None:
    api.app[CLOCK].set(local(1))
    a, token = await billed_account(api, "later", "postpaid")
    await api.domain(token, "www.later.test")
    await add_usage(api, a, "www.later.test", local(1, 3), 3 * GB)
    await add_usage(api, a, "www.later.test", local(2, 3), GB // 2)
    await tick(api, local(2, 0, 1))
    assert await lines(api, a) == [("2026-11-01", "traffic", "tier 1", "3", 600, False)]
    assert (await money(api, a))["balance_fen"] == -600
    assert await notice_kinds(api, a) == ["arrears"]
    await tick(api, local(3, 0, 1))  # 24 h later: suspended; the day's penalty is 3 fen
    assert (await lines(api, a))[-2:] == [
        ("2026-11-02", "traffic", "tier 1", "0.5", 100, False),
        ("2026-11-02", "late_penalty", "7.5", "600", 3, False),
    ]
    assert [s for s, _ in await state_changes(api, "www.later.test")] == ["suspended"]

    # The operator suspends the account meanwhile: the payment hands the domain to that
    # suspension, and resuming the account resumes it.
    await api.ok("POST", f"/v1/accounts/{a}/suspend", body={"reason": "audit"})
    await api.ok("POST", f"/v1/accounts/{a}/payments", body={"amount_fen": 703, "reference": "r"})
    assert (await state_changes(api, "www.later.test"))[-1] == (
        "suspended",
        "account suspended: audit",
    )
    assert (await money(api, a))["arrears_since"] is None
    await api.ok("POST", f"/v1/accounts/{a}/resume")
    assert (await state_changes(api, "www.later.test"))[-1] == ("active", "")


async def _three_days_of_usage(api: Api, name: str) -> int:
    """A postpaid account `name` with 3 GB used on Nov 1, 1 GB on Nov 2 and 2 GB on Nov 3
    (600, 200 and 400 fen); its id."""
    api.app[CLOCK].set(local(1))
    a, token = await billed_account(api, name, "postpaid")
    domain = f"www.{name}.test"
    await api.domain(token, domain)
    for day, used in ((1, 3 * GB), (2, GB), (3, 2 * GB)):
        await add_usage(api, a, domain, local(day, 3), used)
    return a


async def test_a_backlog_is_not_penalised_for_debts_it_bills_itself(api: Api) -> None:
    """The control plane was down: its first run, on Nov 10, settles Nov 1-9 at once. Nov 1's
    debt was billed on Nov 10, so it was not unpaid on Nov 2-9 (7.5): no penalty for those
    days. From Nov 10 on the debt is billed and unpaid, and each day costs 0.5 % of it."""
    a = await _three_days_of_usage(api, "backlog")

    await tick(api, local(10, 0, 1))
    assert await lines(api, a) == [
        ("2026-11-01", "traffic", "tier 1", "3", 600, False),
        ("2026-11-02", "traffic", "tier 1", "1", 200, False),
        ("2026-11-03", "traffic", "tier 1", "2", 400, False),
    ]
    assert (await money(api, a))["balance_fen"] == -1200
    before = (await lines(api, a), await money(api, a), await api.version())
    await tick(api, local(10, 0, 2))  # settling again changes nothing
    assert (await lines(api, a), await money(api, a), await api.version()) == before

    await tick(api, local(11, 0, 1))  # on time again: Nov 10 owed 1200 fen all day
    api.app[CLOCK].set(local(11, 12))
    pay = {"amount_fen": 900, "reference": "part"}  # pays fees first: 300 fen of fees left
    paid = await api.ok("POST", f"/v1/accounts/{a}/payments", body=pay)
    assert (paid["balance_fen"], paid["penalty_accrued_fen"]) == (-306, 6)
    await tick(api, local(12, 0, 1))
    assert (await lines(api, a))[3:] == [
        ("2026-11-10", "late_penalty", "7.5", "1200", 6, False),  # 0.5 % of 1200 fen
        ("2026-11-11", "late_penalty", "7.5", "300", 2, False),  # 1.5 fen, half up
    ]
    view = await money(api, a)
    assert (view["balance_fen"], view["penalty_accrued_fen"]) == (-308, 8)


async def test_a_debt_billed_on_time_keeps_its_penalty_through_a_backlog(api: Api) -> None:
    """Nov 1 is settled on time (its 600 fen billed on Nov 2), then the control plane is down
    until Nov 5, when Nov 2-4 are settled at once: each of those days is charged 0.5 % of the
    600 fen, not of the debts of Nov 2 and 3, which the catch-up itself billed."""
    a = await _three_days_of_usage(api, "gap")
    await tick(api, local(2, 0, 1))
    await tick(api, local(5, 0, 1))
    await tick(api, local(6, 0, 1))
    assert await lines(api, a) == [
        ("2026-11-01", "traffic", "tier 1", "3", 600, False),
        ("2026-11-02", "traffic", "tier 1", "1", 200, False),
        ("2026-11-02", "late_penalty", "7.5", "600", 3, False),
        ("2026-11-03", "traffic", "tier 1", "2", 400, False),
        ("2026-11-03", "late_penalty", "7.5", "600", 3, False),  # not 800
        ("2026-11-04", "late_penalty", "7.5", "600", 3, False),  # not 1200
        ("2026-11-05", "late_penalty", "7.5", "1200", 6, False),  # on time: all of it
    ]
    view = await money(api, a)
    assert (view["balance_fen"], view["penalty_accrued_fen"]) == (-1215, 15)


async def test_bandwidth_billing_by_daily_peak_with_late_usage(api: Api) -> None:
    api.app[CLOCK].set(local(1))
    a, _ = await billed_account(api, "bw", "postpaid")
    terms = {"charge_by": "bandwidth", "price_list": "std"}
    await api.ok("PUT", f"/v1/accounts/{a}/billing", body=terms)
    # 300 MB in 5 minutes = 8 Mbps at 100 fen per Mbps-day; the smaller bucket does not count.
    await add_usage(api, a, "www.bw.test", local(1, 10), 300 * 10**6)
    await add_usage(api, a, "www.bw.test", local(1, 11), 100 * 10**6)
    await tick(api, local(2, 0, 1))
    assert await lines(api, a) == [("2026-11-01", "bandwidth", "peak", "8.000000", 800, False)]
    await add_usage(api, a, "www.bw.test", local(1, 12), 375 * 10**6)  # late: a 10 Mbps peak
    await tick(api, local(2, 0, 2))
    await tick(api, local(2, 0, 3))
    assert (await lines(api, a))[1:] == [
        ("2026-11-01", "bandwidth", "peak", "-8.000000", -800, True),
        ("2026-11-01", "bandwidth", "peak", "10.000000", 1000, True),
    ]
    assert (await money(api, a))["balance_fen"] == -1000


async def test_bills_are_the_callers_own(api: Api) -> None:
    api.app[CLOCK].set(local(1))
    a, token_a = await billed_account(api, "one")
    b, token_b = await billed_account(api, "two")
    await api.ok("POST", f"/v1/accounts/{a}/payments", body={"amount_fen": 500, "reference": "x"})
    await add_usage(api, a, "www.one.test", local(1, 1), GB)
    await tick(api, local(2, 0, 1))
    bill_a = await api.ok("GET", "/v1/bills?month=2026-11", token_a)
    bill_b = await api.ok("GET", "/v1/bills?month=2026-11", token_b)
    assert bill_a["totals"]["amount_fen"] == 200 and bill_b["days"] == []
    assert (bill_a["balance_fen"], bill_b["balance_fen"]) == (300, 0)
    _, reader = await api.subaccount(token_a, ["billing:read"], name="books")
    _, other = await api.subaccount(token_a, ["domains:read"], name="ops")
    assert (await api.ok("GET", "/v1/bills?month=2026-11", reader))["balance_fen"] == 300
    assert (await api.call("GET", "/v1/bills?month=2026-11", other)).status == 403
    assert (await api.call("GET", "/v1/packages", other)).status == 403
    assert (await api.call("GET", "/v1/bills?month=2026-13", token_a)).status == 422
    assert (await api.call("GET", f"/v1/accounts/{b}/balance", token_a)).status == 403
    assert (await api.call("GET", "/v1/accounts/999/balance")).status == 404
    made = await api.ok("POST", "/v1/accounts", body={"name": "bare", "billing": "prepaid"})
    assert (await api.call("GET", "/v1/bills", made["token"])).status == 404


async def test_validation(api: Api) -> None:
    api.app[CLOCK].set(local(1))
    a, _ = await billed_account(api, "v")
    bad_tiers = {**PRICES, "traffic_tiers": [{"up_to_gb": 10, "fen_per_gb": "1"}]}
    assert (await api.call("PUT", "/v1/price-lists/x", body=bad_tiers)).status == 422
    floaty = {**PRICES, "fen_per_mbps_day": 1.5}
    assert (await api.call("PUT", "/v1/price-lists/x", body=floaty)).status == 422
    nothing = {"amount_fen": 0, "reference": "r"}
    assert (await api.call("POST", f"/v1/accounts/{a}/payments", body=nothing)).status == 422
    both = {"quota_bytes": GB, "valid_days": 1, "expires_at": "2027-01-01T00:00:00Z"}
    assert (await api.call("POST", f"/v1/accounts/{a}/packages", body=both)).status == 422
    dear = {"quota_bytes": GB, "valid_days": 1, "price_fen": 1}
    assert (await api.call("POST", f"/v1/accounts/{a}/packages", body=dear)).status == 409
    unknown = {"charge_by": "traffic", "price_list": "nope"}
    assert (await api.call("PUT", f"/v1/accounts/{a}/billing", body=unknown)).status == 422
    soon = {"at": local(20).isoformat(), "reason": "closing"}
    reply = await api.call("POST", f"/v1/accounts/{a}/termination", body=soon)
    assert reply.status == 422 and "30 days" in reply.body["detail"]


async def test_termination_now_refunds_unconsumed_prepayment(api: Api) -> None:
    api.app[CLOCK].set(local(1))
    a, token = await billed_account(api, "gone")
    await api.ok("POST", f"/v1/accounts/{a}/payments", body={"amount_fen": 5000, "reference": "1"})
    await api.domain(token, "www.gone.test")
    body = {"quota_bytes": 10 * GB, "valid_days": 30, "price_fen": 1000}
    pkg = await api.ok("POST", f"/v1/accounts/{a}/packages", body=body)
    await add_usage(api, a, "www.gone.test", local(1, 1), 4 * GB)
    api.app[CLOCK].set(local(2, 12))
    done = await api.ok(
        "POST", f"/v1/accounts/{a}/termination", body={"now": True, "reason": "breach"}
    )
    # 4000 fen of balance, and 6 of the package's 10 GB unused: 600 of its 1000 fen.
    assert done["refund"] == {
        "refund_fen": 4600,
        "owed_fen": 0,
        "packages": [{"id": pkg["id"], "unused_bytes": 6 * GB, "refund_fen": 600}],
    }
    assert done["balance_fen"] == 4600
    assert (await lines(api, a))[-1] == ("2026-11-02", "refund", "5.5", "4600", -600, False)
    assert await state_changes(api, "www.gone.test") == [("terminated", "breach")]
    assert (await notice_kinds(api, a))[-1] == "terminated"
    assert (await api.call("GET", "/v1/bills", token)).status == 401  # its tokens died
    before = await lines(api, a)
    await tick(api, local(5))  # a terminated account is not settled further
    assert await lines(api, a) == before


async def test_the_operator_reads_any_accounts_bills_terminated_ones_included(api: Api) -> None:
    """After a termination (5.5) the account's tokens are dead: the operator fetches its final
    bill, with the refund line, and its balance; a customer token reaches no other account's."""
    api.app[CLOCK].set(local(1))
    a, token = await billed_account(api, "closed")
    _, other_token = await billed_account(api, "other")
    await api.ok("POST", f"/v1/accounts/{a}/payments", body={"amount_fen": 5000, "reference": "1"})
    body = {"quota_bytes": 10 * GB, "valid_days": 30, "price_fen": 1000}
    await api.ok("POST", f"/v1/accounts/{a}/packages", body=body)
    await add_usage(api, a, "www.closed.test", local(1, 1), 6 * GB)  # 4 of its 10 GB unused
    api.app[CLOCK].set(local(2, 12))
    await api.ok("POST", f"/v1/accounts/{a}/termination", body={"now": True, "reason": "breach"})
    assert (await api.call("GET", "/v1/bills?month=2026-11", token)).status == 401

    bill = await api.ok("GET", f"/v1/accounts/{a}/bills?month=2026-11")
    assert bill["month"] == "2026-11" and bill["account_id"] == a
    # Refunded: the 4000 fen balance left after the package's price, and 4 of the package's
    # 10 GB unused, 400 of its 1000 fen, credited to the balance by the refund line.
    assert [(d["day"], d["amount_fen"]) for d in bill["days"]] == [
        ("2026-11-01", 1000),
        ("2026-11-02", -400),
    ]
    [refund] = bill["days"][-1]["lines"]
    assert (refund["kind"], refund["quantity"], refund["unit"], refund["amount_fen"]) == (
        "refund",
        "4400",
        "fen",
        -400,
    )
    assert bill["totals"] == {
        "amount_fen": 600,
        "by_kind": {"package_purchase": 1000, "package": 0, "refund": -400},
    }
    assert bill["balance_fen"] == 4400 and instant(bill["termination_at"]) == local(2, 12)
    assert (await money(api, a))["balance_fen"] == 4400
    assert (await api.ok("GET", f"/v1/accounts/{a}/bills?month=2026-10"))["days"] == []

    assert (await api.call("GET", f"/v1/accounts/{a}/bills", other_token)).status == 403
    missing = await api.call("GET", "/v1/accounts/999/bills?month=2026-11")
    assert missing.status == 404 and missing.content_type == "application/problem+json"
    bad = await api.call("GET", f"/v1/accounts/{a}/bills?month=2026-13")
    assert bad.status == 422


async def test_late_usage_after_termination_is_not_billed(api: Api) -> None:
    api.app[CLOCK].set(local(1))
    a, token = await billed_account(api, "late")
    await api.ok("POST", f"/v1/accounts/{a}/payments", body={"amount_fen": 5000, "reference": "1"})
    await api.domain(token, "www.late.test")
    await add_usage(api, a, "www.late.test", local(1, 1), 4 * GB)
    api.app[CLOCK].set(local(2, 12))
    done = await api.ok(
        "POST", f"/v1/accounts/{a}/termination", body={"now": True, "reason": "breach"}
    )
    assert done["refund"]["refund_fen"] == done["balance_fen"] == 4200  # 5000 - 4 GB at 200
    before = (await lines(api, a), await notice_kinds(api, a))
    # an edge that was offline delivers the termination day's usage: before and after the instant
    await add_usage(api, a, "www.late.test", local(2, 11), 3 * GB)
    await add_usage(api, a, "www.late.test", local(2, 12, 5), 1 * GB)
    await tick(api, local(3, 1))
    await tick(api, local(4, 1))
    # the settlement at termination is final: no adjustment, the refund stands
    assert (await lines(api, a), await notice_kinds(api, a)) == before
    assert (await lines(api, a))[-1] == ("2026-11-02", "refund", "5.5", "4200", 0, False)
    balance = await money(api, a)
    assert balance["balance_fen"] == 4200 and balance["arrears_since"] is None
    # the late usage stays visible to the operator
    query = {"granularity": "1d", "account": str(a), "from": local(2).isoformat()}
    seen = await api.ok("GET", f"/v1/usage?{urlencode({**query, 'to': local(3).isoformat()})}")
    assert [p["bytes_sent"] for p in seen["points"]] == [4 * GB]


async def test_scheduled_termination_happens_at_its_time(api: Api) -> None:
    api.app[CLOCK].set(local(1))
    a, token = await billed_account(api, "planned")
    await api.ok("POST", f"/v1/accounts/{a}/payments", body={"amount_fen": 900, "reference": "1"})
    await api.domain(token, "www.planned.test")
    at = local(2, 12, month=12)
    scheduled = await api.ok(
        "POST", f"/v1/accounts/{a}/termination", body={"at": at.isoformat(), "reason": "5.5"}
    )
    assert instant(scheduled["termination_at"]) == at and scheduled["terminated"] is False
    assert await notice_kinds(api, a) == ["termination_scheduled"]
    await tick(api, at - timedelta(minutes=1))
    assert await state_changes(api, "www.planned.test") == []
    await tick(api, at)
    assert await state_changes(api, "www.planned.test") == [("terminated", "5.5")]
    assert (await lines(api, a))[-1] == ("2026-12-02", "refund", "5.5", "900", 0, False)
    async with api.engine.connect() as conn:
        days = (await conn.execute(select(day_settlements.c.day))).scalars().all()
    assert (min(days), max(days), len(days)) == (date(2026, 11, 1), date(2026, 12, 2), 32)


@pytest.mark.parametrize("api_settings", [{"settle_every": 0.05}])
async def test_the_scheduler_settles_in_the_background(api: Api) -> None:
    api.app[CLOCK].set(local(1))
    a, _ = await billed_account(api, "bg", "postpaid")
    await add_usage(api, a, "www.bg.test", local(1, 1), GB)
    api.app[CLOCK].set(local(2, 0, 1))
    for _ in range(200):
        if (await money(api, a))["balance_fen"] == -200:
            break
        await asyncio.sleep(0.02)
    assert (await money(api, a))["balance_fen"] == -200


async def test_settle_by_date_is_idempotent(db: AsyncEngine) -> None:
    await _seed(db)
    clock = Clock()
    clock.set(local(3))
    [first] = await billing.settle(db, date(2026, 11, 1), clock=clock)
    assert first.line() == "account 1: 2026-11-01 charge 200 fen, balance -200 fen"
    assert await billing.settle(db, date(2026, 11, 1), clock=clock) == [first]
    [later] = await billing.settle(db, date(2026, 11, 5), clock=clock)
    assert later.charge_fen is None  # not ended by the clock


async def test_settle_by_date_adjusts_late_usage_and_enforces(api: Api) -> None:
    """`cdn control settle --date` (`billing.settle` with a date) does what the scheduler does:
    late usage for a settled day becomes an adjustment line, and arrears past the grace suspend
    the account's domains; a second run changes nothing."""
    clock = api.app[CLOCK]
    clock.set(local(1))
    a, token = await billed_account(api, "cli", "postpaid")
    await api.domain(token, "www.cli.test")
    await add_usage(api, a, "www.cli.test", local(1, 1), GB)
    clock.set(local(2, 0, 1))
    first = await billing.settle(api.engine, date(2026, 11, 1), clock=clock)
    assert [c.line() for c in first] == [
        f"account {a}: 2026-11-01 charge 200 fen, balance -200 fen"
    ]

    await add_usage(api, a, "www.cli.test", local(1, 5), GB)  # an edge that was offline
    clock.set(local(3, 0, 1))  # 24 h after the arrears began
    done = await billing.settle(api.engine, date(2026, 11, 2), clock=clock)
    assert [c.line() for c in done] == [
        f"account {a}: 2026-11-01 adjustment 200 fen, balance -400 fen",
        f"account {a}: 2026-11-02 charge 1 fen, balance -401 fen",
    ]
    assert await lines(api, a) == [
        ("2026-11-01", "traffic", "tier 1", "1", 200, False),
        ("2026-11-01", "traffic", "tier 1", "1", 200, True),
        # 0.5 % of the 200 fen billed during Nov 2; the adjustment was billed after it ended
        ("2026-11-02", "late_penalty", "7.5", "200", 1, False),
    ]
    [(state_name, reason)] = await state_changes(api, "www.cli.test")
    assert state_name == "suspended" and reason.startswith(billing.ARREARS)
    assert await notice_kinds(api, a) == ["arrears", "suspended"]

    before = (
        await lines(api, a),
        await money(api, a),
        await notice_kinds(api, a),
        await api.version(),
    )
    again = await billing.settle(api.engine, date(2026, 11, 2), clock=clock)
    assert [c.line() for c in again] == [done[-1].line()]
    after = (
        await lines(api, a),
        await money(api, a),
        await notice_kinds(api, a),
        await api.version(),
    )
    assert after == before


async def test_late_usage_is_rated_at_the_rates_the_day_was_settled_under(api: Api) -> None:
    """A price-list change between a day's settlement and its late usage does not reprice the
    day: the adjustment uses the rates recorded with the settlement; new days use the new list."""
    api.app[CLOCK].set(local(1))
    t, _ = await billed_account(api, "by-traffic")
    b, _ = await billed_account(api, "by-peak")
    for account_id in (t, b):  # prepaid, no arrears: no penalty lines
        paid = {"amount_fen": 10000, "reference": "p"}
        await api.ok("POST", f"/v1/accounts/{account_id}/payments", body=paid)
    await api.ok(
        "PUT", f"/v1/accounts/{b}/billing", body={"charge_by": "bandwidth", "price_list": "std"}
    )
    await add_usage(api, t, "www.t.test", local(1, 1), GB)
    await add_usage(api, b, "www.b.test", local(1, 1), 300 * 10**6)  # 8 Mbps
    await tick(api, local(2, 0, 1))
    dearer = {
        "traffic_tiers": [
            {"up_to_gb": 10, "fen_per_gb": "300"},
            {"up_to_gb": None, "fen_per_gb": "250"},
        ],
        "fen_per_mbps_day": "150",
    }
    await api.ok("PUT", "/v1/price-lists/std", body=dearer)
    await add_usage(api, t, "www.t.test", local(1, 5), GB)
    await add_usage(api, b, "www.b.test", local(1, 5), 375 * 10**6)  # 10 Mbps
    await add_usage(api, t, "www.t.test", local(2, 1), GB)
    await tick(api, local(3, 0, 1))
    assert await lines(api, t) == [
        ("2026-11-01", "traffic", "tier 1", "1", 200, False),
        ("2026-11-01", "traffic", "tier 1", "1", 200, True),  # the old rate, not 300
        ("2026-11-02", "traffic", "tier 1", "1", 300, False),  # a new day: the new list
    ]
    assert await lines(api, b) == [
        ("2026-11-01", "bandwidth", "peak", "8.000000", 800, False),
        ("2026-11-01", "bandwidth", "peak", "-8.000000", -800, True),
        ("2026-11-01", "bandwidth", "peak", "10.000000", 1000, True),  # 100 fen, not 150
        ("2026-11-02", "bandwidth", "peak", "0.000000", 0, False),
    ]
    assert (await money(api, t))["balance_fen"] == 10000 - 700
    assert (await money(api, b))["balance_fen"] == 10000 - 1000


async def test_a_day_settled_without_recorded_rates_is_adjusted_at_the_current_list(
    api: Api,
) -> None:
    """Days settled before the rates were recorded with them fall back to the current list."""
    api.app[CLOCK].set(local(1))
    a, _ = await billed_account(api, "older", "postpaid")
    await add_usage(api, a, "www.older.test", local(1, 1), GB)
    await tick(api, local(2, 0, 1))
    async with api.engine.begin() as conn:
        record = (await conn.execute(select(day_settlements.c.record))).scalar_one()
        del record["prices"]  # as settled by the version before the rates were recorded
        await conn.execute(day_settlements.update().values(record=record))
    dearer = {**PRICES, "traffic_tiers": [{"up_to_gb": None, "fen_per_gb": "300"}]}
    await api.ok("PUT", "/v1/price-lists/std", body=dearer)
    await add_usage(api, a, "www.older.test", local(1, 5), GB)
    await tick(api, local(2, 0, 2))
    assert (await lines(api, a))[1:] == [("2026-11-01", "traffic", "tier 1", "1", 300, True)]


async def test_usage_too_late_to_be_billed_is_logged(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """Usage for a settled day older than the adjustment window (rating.ADJUST_DAYS) is stored
    but never billed: the control plane says so with a warning naming account, day and bytes."""
    clock = api.app[CLOCK]
    clock.set(local(1))
    a, token = await billed_account(api, "slow", "postpaid")
    await api.domain(token, "www.slow.test")
    await add_usage(api, a, "www.slow.test", local(1, 1), GB)
    later = local(1) + timedelta(days=rating.ADJUST_DAYS + 1, minutes=1)  # 2027-01-03 00:01
    await tick(api, later)  # settles Nov 1 to Jan 2
    _, edge_token = await api.edge("late-edge")
    buckets = [
        {
            "domain": "www.slow.test",
            "start": int(start.timestamp()),
            **dict.fromkeys(FIELDS, 0),
            "bytes_sent": n,
        }
        for start, n in ((local(1, 5), 3 * GB), (local(1, 6), 1 * GB), (local(2, 5), 5 * GB))
    ]
    body = {"batch": "old", "edge": "late-edge", "buckets": buckets}
    with caplog.at_level(logging.WARNING, logger="control.usage"):
        await api.ok("POST", "/v1/edge/usage", edge_token, body=body)
    [record] = [r for r in caplog.records if r.name == "control.usage"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert f"account {a}" in message and "2026-11-01" in message and str(4 * GB) in message
    await tick(api, later + timedelta(minutes=1))
    # Nov 2 is still in the window: adjusted; Nov 1 is not billed (it stays in GET /v1/usage)
    adjustments = [line for line in await lines(api, a) if line[5]]
    assert adjustments == [("2026-11-02", "traffic", "tier 1", "5", 1000, True)]


async def _billed_account(
    conn: AsyncConnection, number: int, name: str, tiers: list[dict[str, Any]]
) -> None:
    """Account `number`, postpaid, billed by traffic from Nov 1 on its own price list `name`."""
    await conn.execute(
        accounts.insert().values(
            id=number,
            name=name,
            billing="postpaid",
            timezone="Asia/Shanghai",
            state="active",
            state_reason="",
            created_at=local(1),
        )
    )
    await conn.execute(
        price_lists.insert().values(
            id=number,
            name=name,
            traffic_tiers=tiers,
            fen_per_mbps_day="100",
            gb_bytes=GB,
            created_at=local(1),
        )
    )
    await conn.execute(
        account_billing.insert().values(
            account_id=number, charge_by="traffic", price_list_id=number, created_at=local(1)
        )
    )


async def _seed(engine: AsyncEngine) -> None:
    """A postpaid account billed from Nov 1 with 1 GB on that day (200 fen), straight in the db."""
    await migrate(engine)
    async with engine.begin() as conn:
        await _billed_account(conn, 1, "std", PRICES["traffic_tiers"])
        counters = {c.name: 0 for c in usage.columns if c.name not in ("domain", "start")}
        await conn.execute(
            usage.insert().values(
                {
                    **counters,
                    "domain": "www.cli.test",
                    "start": local(1, 1),
                    "account_id": 1,
                    "bytes_sent": GB,
                }
            )
        )


def test_cdn_control_settle_command(tmp_path: Path) -> None:
    database = tmp_path / "control.db"
    engine = engine_for(f"sqlite:///{database}")

    async def seed() -> None:
        try:
            await _seed(engine)
        finally:
            await engine.dispose()

    asyncio.run(seed())
    config = tmp_path / "control.toml"
    config.write_text(
        f'[control]\ndatabase = "sqlite:///{database}"\nadmin_token = "t"\n'
        'cname_suffix = "cdn.test"\n'
    )
    cdn = [sys.executable, "-m", "edge.cli", "control", "settle", "--config", str(config)]
    for _ in range(2):
        run = subprocess.run(
            [*cdn, "--date", "2026-11-01"], capture_output=True, text=True, cwd=ROOT
        )
        assert (run.returncode, run.stdout) == (
            0,
            "account 1: 2026-11-01 charge 200 fen, balance -200 fen\n",
        ), run.stderr
    bad = subprocess.run([*cdn, "--date", "2026-11-31"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "2026-11-31" in bad.stderr and bad.stdout == ""


def _cdn(*args: str) -> subprocess.CompletedProcess[str]:
    """`cdn ARGS` in a subprocess, without an admin token in its environment."""
    env = {k: v for k, v in os.environ.items() if k != "CDN_ADMIN_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env
    )


def _errors(run: subprocess.CompletedProcess[str]) -> list[str]:
    """The command's own lines on stderr (log records aside)."""
    return [line for line in run.stderr.splitlines() if line.startswith("cdn:")]


def test_cdn_control_settle_needs_no_admin_token_and_fails_per_account(tmp_path: Path) -> None:
    """`cdn control settle` reads only the database and the billing settings: no admin token or
    cname_suffix (the server still requires both). One account whose billing fails is one line
    on stderr and exit 1, the others are settled; once it is repaired, exit 0."""
    database = tmp_path / "control.db"
    engine = engine_for(f"sqlite:///{database}")
    broken = [{"up_to_gb": 10, "fen_per_gb": "200"}]  # no unbounded last tier: not a price list

    async def seed() -> None:
        try:
            await _seed(engine)
            async with engine.begin() as conn:
                await _billed_account(conn, 2, "broken", broken)
        finally:
            await engine.dispose()

    async def repair() -> None:
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    price_lists.update()
                    .where(price_lists.c.id == 2)
                    .values(traffic_tiers=PRICES["traffic_tiers"])
                )
        finally:
            await engine.dispose()

    asyncio.run(seed())
    config = tmp_path / "control.toml"
    config.write_text(f'[control]\ndatabase = "sqlite:///{database}"\n')
    settle = ("control", "settle", "--config", str(config), "--date", "2026-11-01")
    charged = "account 1: 2026-11-01 charge 200 fen, balance -200 fen\n"

    failed = _cdn(*settle)
    assert (failed.returncode, failed.stdout) == (1, charged), failed.stderr
    assert _errors(failed) == [
        "cdn: control settle: account 2: ValueError: "
        "only the last traffic tier is unbounded, and it must be"
    ]
    assert "Traceback" not in failed.stderr
    debug = _cdn("--log-level", "DEBUG", *settle)
    assert debug.returncode == 1 and "Traceback" in debug.stderr

    asyncio.run(repair())
    done = _cdn(*settle)
    assert (done.returncode, done.stdout, _errors(done)) == (
        0,
        charged + "account 2: 2026-11-01 charge 0 fen, balance 0 fen\n",
        [],
    )
    server = _cdn("control", "--config", str(config))
    assert server.returncode == 2 and _errors(server)[0].endswith(
        "control.admin_token: is empty: set it here or in the environment variable "
        "CDN_ADMIN_TOKEN (the operator's token; the control plane has no other way in)"
    ), server.stderr


async def test_cdn_control_settle_exits_3_while_another_replica_settles(tmp_path: Path) -> None:
    """On PostgreSQL the settlement lock is held by another replica: one line, exit 3, nothing
    settled; run again once it is free, it settles."""
    admin = await admin_connection()
    name = f"settle_busy_{secrets.token_hex(4)}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = str(make_url(PG_URL).set(database=name))
        engine = engine_for(url)
        try:
            await _seed(engine)
        finally:
            await engine.dispose()
        replica = await asyncpg.connect(url)
        config = tmp_path / "control.toml"
        config.write_text(f'[control]\ndatabase = "{url}"\n')
        settle = ("control", "settle", "--config", str(config), "--date", "2026-11-01")
        try:
            await replica.execute("SELECT pg_advisory_lock($1)", billing._PG_SETTLE_LOCK_KEY)
            busy = await asyncio.to_thread(_cdn, *settle)
        finally:
            await replica.close()
        assert (busy.returncode, busy.stdout) == (3, ""), busy.stderr
        assert _errors(busy) == [
            "cdn: control settle: another control replica is settling now; this run stopped "
            "early: run it again when that one is done"
        ]
        done = await asyncio.to_thread(_cdn, *settle)
        assert (done.returncode, done.stdout) == (
            0,
            "account 1: 2026-11-01 charge 200 fen, balance -200 fen\n",
        ), done.stderr
    finally:
        await admin.execute(f'DROP DATABASE "{name}"')
        await admin.close()


async def test_packages_notice_expiry_and_no_negative_remainders(api: Api) -> None:
    api.app[CLOCK].set(local(1))
    a, _ = await billed_account(api, "pk")
    body = {"quota_bytes": 10 * GB, "valid_days": 10}
    await api.ok("POST", f"/v1/accounts/{a}/packages", body=body)
    await add_usage(api, a, "www.pk.test", local(1, 1), 9 * GB)
    await tick(api, local(2, 0, 1))
    assert await notice_kinds(api, a) == ["package_90"]
    await tick(api, local(4, 0, 1))  # 7 days before expiry (Nov 11)
    assert await notice_kinds(api, a) == ["package_90", "package_expiring"]
    await tick(api, local(5, 0, 1))
    assert await notice_kinds(api, a) == ["package_90", "package_expiring"]
    async with api.engine.connect() as conn:
        left = (await conn.execute(select(packages.c.remaining_bytes))).scalars().all()
    assert left == [GB]


def _property_run(
    buckets: list[tuple[int, int, bool]], quota_gb: int, valid_hours: int, tmp: Path
) -> None:
    """Settle four days of `buckets` (day, 5-minute slot, bytes, late?) through the database,
    the late ones after the days were settled; then check what the bill says."""

    async def run() -> None:
        engine = engine_for(f"sqlite:///{tmp}/p.db")
        try:
            await _seed(engine)
            async with engine.begin() as conn:
                await conn.execute(usage.delete())
                await conn.execute(
                    packages.insert().values(
                        id=1,
                        account_id=1,
                        quota_bytes=quota_gb * GB,
                        remaining_bytes=quota_gb * GB,
                        activated_at=local(1),
                        expires_at=local(1) + timedelta(hours=valid_hours),
                        price_fen=0,
                        created_at=local(1),
                    )
                )
            clock = Clock()
            clock.set(local(5))

            async def add(late: bool) -> None:
                counters = {c.name: 0 for c in usage.columns if c.name not in ("domain", "start")}
                async with engine.begin() as conn:
                    for index, (slot, nbytes, is_late) in enumerate(buckets):
                        if is_late == late:
                            start = local(1) + timedelta(minutes=5 * slot)
                            domain = f"d{index}.test"  # one row per bucket and domain
                            row = {"domain": domain, "start": start, "account_id": 1}
                            values = {**counters, **row, "bytes_sent": nbytes}
                            await conn.execute(usage.insert().values(values))

            await add(late=False)
            await billing.settle(engine, local(5), clock=clock)
            await add(late=True)
            await billing.settle(engine, local(5), clock=clock)
            async with engine.connect() as conn:
                snapshot = (await conn.execute(select(bill_lines))).all()
            await billing.settle(engine, local(5), clock=clock)
            async with engine.connect() as conn:
                rows = (await conn.execute(select(bill_lines))).all()
                balance = (await conn.execute(select(account_billing.c.balance_fen))).scalar_one()
                left = (await conn.execute(select(packages.c.remaining_bytes))).scalar_one()
        finally:
            await engine.dispose()
        assert rows == snapshot  # idempotent
        covered = sum(Decimal(r.quantity) for r in rows if r.kind == "package") * GB
        charged = sum(Decimal(r.quantity) for r in rows if r.kind == "traffic") * GB
        assert covered + charged == sum(n for _, n, _ in buckets)  # conservation
        assert left == quota_gb * GB - covered >= 0
        assert balance == -sum(r.amount_fen for r in rows)
        prices = rating.PriceList(
            (
                rating.TrafficTier(10, Decimal(200)),
                rating.TrafficTier(None, Decimal(150)),
            ),
            Decimal(100),
        )
        traffic_fen = sum(r.amount_fen for r in rows if r.kind == "traffic")
        assert traffic_fen == rating.monthly_traffic_charge_fen(int(charged), prices)

    asyncio.run(run())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    buckets=st.lists(
        st.tuples(st.integers(0, 4 * 288 - 1), st.integers(1, 6 * GB), st.booleans()),
        min_size=1,
        max_size=12,
    ),
    quota_gb=st.integers(1, 20),
    valid_hours=st.integers(1, 96),
)
def test_settlement_conserves_usage_and_is_idempotent(
    buckets: list[tuple[int, int, bool]], quota_gb: int, valid_hours: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _property_run(buckets, quota_gb, valid_hours, Path(tmp))
