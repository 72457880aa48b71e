"""The default price list (issue 5: every account is billed): an account without billing terms
is billed from the day it was created under the list the operator marked as the default, in
traffic mode, until the operator sets its own terms; without a default it is not billed, each
settlement run warns naming it, and its money views say billing is not configured. Both
backends, figures to the fen.
"""

from __future__ import annotations

import logging
from datetime import date

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from control.scheduler import CLOCK
from control.schema import account_billing, day_settlements, price_lists

from .conftest import Api
from .test_billing import PRICES, add_usage, lines, local, money, state_changes, tick

GB = 10**9
GOLD = {"traffic_tiers": [{"up_to_gb": None, "fen_per_gb": "100"}], "fen_per_mbps_day": "50"}
NOT_CONFIGURED = "billing is not configured"


def billing_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "control.billing" and r.levelno == logging.WARNING
    ]


async def test_without_terms_the_default_list_bills_from_the_accounts_creation(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="control.billing")
    api.app[CLOCK].set(local(1))
    a, token = await api.account("plain")  # postpaid, no terms: its domains serve at once
    b, _ = await api.account("idle")
    gone, _ = await api.account("gone")
    await api.ok("POST", f"/v1/accounts/{gone}/terminate", body={"reason": "closed"})
    await api.domain(token, "www.plain.test")
    await add_usage(api, a, "www.plain.test", local(1, 3), 3 * GB)
    await add_usage(api, a, "www.plain.test", local(2, 3), GB)

    # No default list: nothing is billed, and every run warns once, naming the accounts.
    await tick(api, local(2, 0, 1))
    await tick(api, local(3, 0, 1))
    warned = billing_warnings(caplog)
    assert len(warned) == 2
    for line in warned:
        assert f"account {a} 'plain'" in line and f"account {b} 'idle'" in line
        assert "'gone'" not in line  # a terminated account is never billed again
    assert await lines(api, a) == []
    balance = await api.call("GET", f"/v1/accounts/{a}/balance")
    bills = await api.call("GET", "/v1/bills", token)
    for reply in (balance, bills):
        assert reply.status == 404 and NOT_CONFIGURED in reply.body["detail"], reply
    pay = {"amount_fen": 100, "reference": "early"}
    reply = await api.call("POST", f"/v1/accounts/{a}/payments", body=pay)
    assert reply.status == 409 and NOT_CONFIGURED in reply.body["detail"]

    # The operator marks a default list: the next run bills every day since the account was
    # created under it, in traffic mode (no late penalty on Nov 2: Nov 1's 600 fen were billed
    # only now, after Nov 2 ended, so they were not unpaid on Nov 2).
    listed = await api.ok("PUT", "/v1/price-lists/std", body={**PRICES, "default": True})
    assert listed["default"] is True
    caplog.clear()
    await tick(api, local(3, 0, 2))
    assert billing_warnings(caplog) == []
    assert await lines(api, a) == [
        ("2026-11-01", "traffic", "tier 1", "3", 600, False),
        ("2026-11-02", "traffic", "tier 1", "1", 200, False),
    ]
    view = await money(api, a)
    assert (view["price_list"], view["charge_by"], view["balance_fen"]) == ("std", "traffic", -800)
    idle = await money(api, b)
    assert (idle["price_list"], idle["balance_fen"]) == ("std", 0)
    bill = await api.ok("GET", "/v1/bills?month=2026-11", token)
    assert bill["totals"]["amount_fen"] == 800 and bill["price_list"] == "std"
    audit = await api.ok("GET", "/v1/audit", token)
    [adopted] = [e for e in audit["entries"] if e["action"] == "billing.default_terms"]
    assert (adopted["actor"], adopted["detail"]) == (
        "operator",
        {"charge_by": "traffic", "price_list": "std"},
    )
    async with api.engine.connect() as conn:
        billed = (await conn.execute(select(account_billing.c.account_id))).scalars().all()
    assert sorted(billed) == [a, b]

    # Explicit terms replace the default's for the days not settled yet.
    await api.ok("PUT", "/v1/price-lists/gold", body=GOLD)
    api.app[CLOCK].set(local(3, 12))
    terms = await api.ok(
        "PUT", f"/v1/accounts/{a}/billing", body={"charge_by": "traffic", "price_list": "gold"}
    )
    assert terms["price_list"] == "gold"
    await add_usage(api, a, "www.plain.test", local(3, 13), 2 * GB)
    await tick(api, local(4, 0, 1))
    assert (await lines(api, a))[2:] == [
        ("2026-11-03", "traffic", "tier 1", "2", 200, False),
        ("2026-11-03", "late_penalty", "7.5", "800", 4, False),  # billed on Nov 3, unpaid
    ]
    assert (await money(api, a))["balance_fen"] == -800 - 204


async def test_a_payment_adopts_the_default_and_billing_starts_with_the_account(api: Api) -> None:
    api.app[CLOCK].set(local(1))
    await api.ok("PUT", "/v1/price-lists/std", body={**PRICES, "default": True})
    a, token = await api.account("pre", "prepaid")
    await api.domain(token, "www.pre.test")  # waits for prepayment (4.1)
    # Before any settlement run the balance already shows the default terms.
    view = await money(api, a)
    assert (view["price_list"], view["charge_by"], view["balance_fen"]) == ("std", "traffic", 0)

    api.app[CLOCK].set(local(3, 9))
    paid = await api.ok(
        "POST", f"/v1/accounts/{a}/payments", body={"amount_fen": 1000, "reference": "p1"}
    )
    assert (paid["balance_fen"], paid["price_list"]) == (1000, "std")
    assert await state_changes(api, "www.pre.test") == [("active", "")]
    await add_usage(api, a, "www.pre.test", local(3, 10), GB)
    await tick(api, local(4, 0, 1))
    assert await lines(api, a) == [("2026-11-03", "traffic", "tier 1", "1", 200, False)]
    assert (await money(api, a))["balance_fen"] == 800
    async with api.engine.connect() as conn:
        days = (await conn.execute(select(day_settlements.c.day))).scalars().all()
    assert sorted(days) == [date(2026, 11, 1), date(2026, 11, 2), date(2026, 11, 3)]


async def test_one_default_price_list_at_a_time(api: Api) -> None:
    api.app[CLOCK].set(local(1))
    std = await api.ok("PUT", "/v1/price-lists/std", body={**PRICES, "default": True})
    gold = await api.ok("PUT", "/v1/price-lists/gold", body={**GOLD, "default": True})
    assert (std["default"], gold["default"]) == (True, True)
    # A PUT without "default" leaves the mark as it is: gold took it from std.
    assert (await api.ok("PUT", "/v1/price-lists/std", body=PRICES))["default"] is False
    assert (await api.ok("PUT", "/v1/price-lists/gold", body=GOLD))["default"] is True
    a, _ = await api.account("acme")
    assert (await money(api, a))["price_list"] == "gold"

    unmarked = await api.ok("PUT", "/v1/price-lists/gold", body={**GOLD, "default": False})
    assert unmarked["default"] is False
    _, token_b = await api.account("later")
    reply = await api.call("GET", "/v1/bills", token_b)
    assert reply.status == 404 and NOT_CONFIGURED in reply.body["detail"]
    # acme's terms were made when its balance was read; they stay without a default.
    assert (await money(api, a))["price_list"] == "gold"

    # The database itself holds at most one default.
    async with api.engine.connect() as conn:
        with pytest.raises(IntegrityError):
            await conn.execute(price_lists.update().values(is_default=True))


async def test_terms_set_later_bill_the_days_since_the_account_was_created(api: Api) -> None:
    """Without a default the days wait; the operator's terms, when they come, bill them."""
    api.app[CLOCK].set(local(1))
    a, token = await api.account("late")
    await api.domain(token, "www.late.test")
    await add_usage(api, a, "www.late.test", local(1, 3), 2 * GB)
    await tick(api, local(2, 0, 1))
    assert await lines(api, a) == []
    await api.ok("PUT", "/v1/price-lists/gold", body=GOLD)
    api.app[CLOCK].set(local(2, 9))
    await api.ok(
        "PUT", f"/v1/accounts/{a}/billing", body={"charge_by": "traffic", "price_list": "gold"}
    )
    await tick(api, local(3, 0, 1))
    assert await lines(api, a) == [  # Nov 1 billed after Nov 2 ended: no penalty on Nov 2
        ("2026-11-01", "traffic", "tier 1", "2", 200, False),
    ]
    await tick(api, local(4, 0, 1))
    assert (await lines(api, a))[1:] == [("2026-11-03", "late_penalty", "7.5", "200", 1, False)]
