"""Billing enforced at a real edge (issue 5, "What must be shown"): `cdn edge` with 2 workers
follows a real control plane (control.app on SQLite) whose billing clock the test sets. Real
traffic through the edge is metered, shipped and settled at midnight Asia/Shanghai into a bill
line; the postpaid account falls into arrears, is charged the late penalty the next day and,
after the 24 h grace, its domain is refused by the edge with the arrears reason; a payment of
the debt makes the edge serve it again. Every figure is asserted to the fen.

The edge meters real time, so the billing clock starts at the real instant: the traffic falls in
today's billing day, and the ticks then jump past the following midnights.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.integration.conftest import Origin
from tests.integration.test_control_follow import ControlledEdge
from tests.integration.test_metering import BIG
from tests.integration.test_supervisor import HOST
from tests.integration.test_usage_e2e import ADMIN, Plane

ZONE = "Asia/Shanghai"
GB = 10**9
PRICES = {  # 20 yuan/GB for a month's first GB, 15 yuan/GB beyond (cumulative tiers)
    "traffic_tiers": [
        {"up_to_gb": 1, "fen_per_gb": "2000"},
        {"up_to_gb": None, "fen_per_gb": "1500"},
    ],
    "fen_per_mbps_day": "100",
}
FETCHES = 32  # of the 32 MiB object: 1 GiB of bodies, so the day crosses into tier 2
EDGE_DELAY = 2.0  # issue 5: suspension and resumption reach the edge "within seconds"
QUIET_BEFORE_MIDNIGHT = 30.0  # s: the traffic must fall in one billing day


async def big(req: web.Request) -> web.StreamResponse:
    return web.Response(body=BIG, headers={"Cache-Control": "max-age=600"})


async def small(req: web.Request) -> web.StreamResponse:
    return web.Response(body=b"small\n", headers={"Cache-Control": "max-age=600"})


class BillingPlane(Plane):
    """The usage test's control plane, with its billing clock and scheduler at hand: the 24 h
    arrears grace, and a scheduler that never runs by itself (only the test's ticks settle)."""

    app: web.Application

    async def up(self) -> None:
        from control.app import make_app
        from control.config import ControlConfig
        from control.db import engine_for, migrate

        if self.engine is None:
            self.engine = engine_for(self.db)
            await migrate(self.engine)
        config = ControlConfig(
            source="test", admin_token=ADMIN, cname_suffix="cdn.test", heartbeat=0.5,
            change_log_keep=3600.0, origin_deny=(),  # the test's origin is on loopback
            arrears_grace=86400.0, settle_every=30 * 86400.0, log_dir=self.log_dir,
        )  # fmt: skip
        self.app = make_app(config, self.engine)
        self.server = TestServer(self.app, host="127.0.0.1", port=self.port)
        await self.server.start_server()

    def set_clock(self, at: datetime) -> None:
        from control.scheduler import CLOCK

        self.app[CLOCK].set(at)

    async def tick(self, at: datetime) -> None:
        """The settlement job at billing instant `at`, as the scheduler runs it."""
        from control.scheduler import SCHEDULER

        self.set_clock(at)
        await self.app[SCHEDULER].tick()


def exchange(port: int, target: str, host: str = HOST) -> tuple[int, int]:
    """GET with Connection: close, reading every byte until the edge closes: (status, bytes
    received). A blocking socket with a large buffer (run in a thread): asyncio's stream reader
    would make the test's client, not the edge, the bottleneck of a gigabyte."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        buffer = bytearray(4 << 20)
        n = sock.recv_into(buffer)
        status_line = bytes(buffer[: buffer.find(b"\r\n")])
        total = n
        while n:
            n = sock.recv_into(buffer)
            total += n
    return int(status_line.split(b" ", 2)[1]), total


async def edge_answers(e: ControlledEdge, status: int, what: str) -> bytes:
    """Poll the edge until it answers `status` for the domain, within EDGE_DELAY; its body."""
    deadline = time.monotonic() + EDGE_DELAY
    while True:
        got = await e.get("/small", HOST)
        if got.status == status:
            return got.body
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not reach the edge in {EDGE_DELAY} s: {got.status}")
        await asyncio.sleep(0.02)


def half_up(amount: Fraction) -> int:
    """A non-negative amount to whole fen, half up (here, independently of control.rating)."""
    whole, rest = divmod(amount.numerator, amount.denominator)
    return whole + (1 if 2 * rest >= amount.denominator else 0)


def gb(nbytes: int) -> str:
    """A quantity in GB as bill lines show it (exact decimal)."""
    return format((Decimal(nbytes) / GB).normalize(), "f")


async def test_arrears_penalty_suspension_and_resumption_at_the_edge(
    tmp_path: Path, make_origin: Callable[..., Awaitable[Origin]]
) -> None:
    from control import rating

    plane = BillingPlane(tmp_path)
    await plane.up()
    edge: ControlledEdge | None = None
    try:
        async with aiohttp.ClientSession() as client:

            call = functools.partial(plane.call, client)

            # The billing clock starts at the real instant (the edge meters real time), not
            # just before a midnight: the traffic must fall in one billing day.
            start = datetime.now(UTC)
            day = rating.billing_date(start, ZONE)
            midnight = rating.day_bounds(day, ZONE)[1]
            if (midnight - start).total_seconds() < QUIET_BEFORE_MIDNIGHT:
                await asyncio.sleep((midnight - start).total_seconds() + 1)
                start = datetime.now(UTC)
                day = rating.billing_date(start, ZONE)
                midnight = rating.day_bounds(day, ZONE)[1]
            plane.set_clock(start)

            edge_token = (await call("POST", "/v1/edges", ADMIN, {"name": "edge-1"}))["token"]
            made = await call(
                "POST", "/v1/accounts", ADMIN, {"name": "acme", "billing": "postpaid"}
            )
            account, token = made["account"]["id"], made["token"]
            await call("PUT", "/v1/price-lists/std", ADMIN, PRICES)
            terms = {"charge_by": "traffic", "price_list": "std"}
            await call("PUT", f"/v1/accounts/{account}/billing", ADMIN, terms)
            origin = await make_origin({"/big": big, "/small": small})
            await call("POST", "/v1/domains", token, {"name": HOST, "origins": [origin.url]})
            edge = ControlledEdge(tmp_path, origin, plane.url, token=edge_token)
            await edge.start()

            # A day's traffic through the edge: what the clients received is what is billed.
            received = 0
            for _ in range(FETCHES):
                status, n = await asyncio.to_thread(exchange, edge.port, "/big")
                assert status == 200
                received += n
            heads = received - FETCHES * len(BIG)
            assert FETCHES * len(BIG) == 2**30 and 0 < heads < FETCHES * 3000
            assert await edge.stop() == 0  # a graceful stop ships the open window
            assert (await plane.stored())[HOST]["bytes_sent"] == received
            assert origin.hits["/big"] == 1
            await edge.start()

            # Past midnight: the day is settled: tier 1 full, the rest at tier 2; postpaid goes
            # negative, into arrears, with a notice.
            tick1 = midnight + timedelta(minutes=1)
            await plane.tick(tick1)
            tier1 = 2000  # 1 GB at 2000 fen/GB exactly
            tier2 = half_up(Fraction((received - GB) * 1500, GB))
            charge = tier1 + tier2
            # 73,741,824 bytes of bodies beyond the GB plus the heads: 110.61 fen and a bit.
            assert (tier2, charge) == (111, 2111)
            bill = await call("GET", f"/v1/bills?month={day:%Y-%m}", token)
            assert [d["day"] for d in bill["days"]] == [day.isoformat()]
            assert [
                (x["kind"], x["ref"], x["quantity"], x["unit_price"], x["amount_fen"])
                for x in bill["days"][0]["lines"]
            ] == [
                ("traffic", "tier 1", "1", "2000", tier1),
                ("traffic", "tier 2", gb(received - GB), "1500", tier2),
            ]
            balance = await call("GET", f"/v1/accounts/{account}/balance", ADMIN)
            assert (balance["balance_fen"], balance["penalty_accrued_fen"]) == (-charge, 0)
            assert balance["month_billable_bytes"] == received
            assert datetime.fromisoformat(balance["arrears_since"]) == tick1
            notices = (await call("GET", "/v1/notices", token))["notices"]
            assert [(x["kind"], x["detail"]) for x in notices] == [
                ("arrears", {"balance_fen": -charge, "day": day.isoformat()})
            ]
            # Within the grace the domain stays active (checked here, not by a request to the
            # edge: that usage, shipped before the next tick, would adjust the settled day).
            domain = await call("GET", f"/v1/domains/{HOST}", token)
            assert (domain["state"], domain["reason"]) == ("active", "")

            # 24 h later: the next day's settlement adds 0.5 % of the unpaid amount, and the
            # grace is over: the domain is suspended, and the edge refuses it within seconds.
            tick2 = tick1 + timedelta(hours=24)
            await plane.tick(tick2)
            next_day = day + timedelta(days=1)
            penalty = half_up(Fraction(charge * 5, 1000))
            assert penalty == 11  # 0.5 % of 2111 fen = 10.555 fen
            refused = await edge_answers(edge, 403, "the arrears suspension")
            since = tick1.strftime("%Y-%m-%d %H:%M UTC")
            reason = f"arrears: the account's balance is overdue since {since}"
            assert refused == f"domain suspended: {reason}\n".encode()
            domain = await call("GET", f"/v1/domains/{HOST}", token)
            assert (domain["state"], domain["reason"]) == ("suspended", reason)
            balance = await call("GET", f"/v1/accounts/{account}/balance", ADMIN)
            debt = charge + penalty
            assert debt == 2122
            assert (balance["balance_fen"], balance["penalty_accrued_fen"]) == (-debt, penalty)
            notices = (await call("GET", "/v1/notices", token))["notices"]
            assert [x["kind"] for x in notices] == ["arrears", "suspended"]
            assert notices[1]["detail"]["balance_fen"] == -debt
            assert notices[1]["detail"]["domains"] == [HOST]

            # A payment of the whole debt ends the arrears; the edge serves again.
            paid = await call(
                "POST",
                f"/v1/accounts/{account}/payments",
                ADMIN,
                {"amount_fen": debt, "reference": "bank-1"},
            )
            assert (paid["balance_fen"], paid["penalty_accrued_fen"]) == (0, 0)
            assert paid["arrears_since"] is None
            await edge_answers(edge, 200, "the resumption")
            status, n = await asyncio.to_thread(exchange, edge.port, "/big")
            assert (status, n > len(BIG)) == (200, True)
            notices = (await call("GET", "/v1/notices", token))["notices"]
            assert [x["kind"] for x in notices] == ["arrears", "suspended", "resumed"]

            # The bill(s): the traffic day and the penalty day, with their totals.
            lines: dict[str, list[tuple[str, str, str, int]]] = {}
            by_kind: dict[str, int] = {}
            for month in sorted({f"{day:%Y-%m}", f"{next_day:%Y-%m}"}):
                bill = await call("GET", f"/v1/bills?month={month}", token)
                assert bill["balance_fen"] == 0
                for d in bill["days"]:
                    assert d["amount_fen"] == sum(x["amount_fen"] for x in d["lines"])
                    lines[d["day"]] = [
                        (x["kind"], x["ref"], x["quantity"], x["amount_fen"]) for x in d["lines"]
                    ]
                for kind, amount in bill["totals"]["by_kind"].items():
                    by_kind[kind] = by_kind.get(kind, 0) + amount
            assert lines == {
                day.isoformat(): [
                    ("traffic", "tier 1", "1", tier1),
                    ("traffic", "tier 2", gb(received - GB), tier2),
                ],
                next_day.isoformat(): [("late_penalty", "7.5", str(charge), penalty)],
            }
            assert by_kind == {"traffic": charge, "late_penalty": penalty}
            assert sum(by_kind.values()) == debt == paid["payment"]["amount_fen"]

            assert await edge.stop() == 0
    finally:
        if edge is not None and edge.proc is not None and edge.proc.returncode is None:
            await edge.stop()
        await plane.close()
