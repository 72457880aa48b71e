"""Billing enforced at a real edge (issue 5, "What must be shown"): `cdn edge` with 2 workers
follows a real control plane (control.app on SQLite) whose billing clock the test sets. Real
traffic through the edge is metered, shipped and settled at midnight Asia/Shanghai into a bill
line; the postpaid account falls into arrears, is charged the late penalty the next day and,
after the 24 h grace, its domain is refused by the edge with the arrears reason; a payment of
the debt makes the edge serve it again. Every figure is asserted to the fen.

The edge meters real time, so the billing clock starts at the real instant: the traffic falls in
today's billing day, and the ticks then jump past the following midnights.

A prepaid month (issue 5's scenario) runs on fixed dates instead: the edge's own wall clock is
moved too (tests/integration/edge_clock), so its real traffic falls on Nov 1 and Nov 12 2026,
before and after a package expires. Last, an account terminated at once loses its domain's
cached objects on the edge's disk (agreement 6.3).
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.integration.conftest import Origin
from tests.integration.edgetest import cs_params
from tests.integration.test_control_follow import DISK, ControlledEdge, _true
from tests.integration.test_metering import BIG
from tests.integration.test_supervisor import HOST, on_one_loop
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
    return cacheable(b"small\n")


def cacheable(body: bytes) -> web.Response:
    return web.Response(body=body, headers={"Cache-Control": "max-age=600"})


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


async def edge_answers(e: ControlledEdge, status: int, what: str, target: str = "/small") -> bytes:
    """Poll the edge until it answers `status` for the domain, within EDGE_DELAY; its body."""
    deadline = time.monotonic() + EDGE_DELAY
    while True:
        got = await e.get(target, HOST)
        if got.status == status:
            return got.body
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not reach the edge in {EDGE_DELAY} s: {got.status}")
        await asyncio.sleep(0.02)


def half_up(amount: Fraction) -> int:
    """A non-negative amount to whole fen, half up (here, independently of control.rating)."""
    whole, rest = divmod(amount.numerator, amount.denominator)
    return whole + (1 if 2 * rest >= amount.denominator else 0)


def gb(nbytes: int, gb_bytes: int = GB) -> str:
    """A quantity in the price list's GB (`gb_bytes`) as bill lines show it (exact decimal)."""
    return format((Decimal(nbytes) / gb_bytes).normalize(), "f")


@on_one_loop
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


# --- a prepaid month with packages, at the edge ------------------------------------------------

MIB = 2**20
OBJECT = bytes(range(256)) * (4 * MIB // 256)  # 4 MiB
MONTH_PRICES = {  # per MiB (the price list's "GB" is 2**20 bytes here): a month in a few MiB
    "traffic_tiers": [
        {"up_to_gb": 16, "fen_per_gb": "20"},
        {"up_to_gb": None, "fen_per_gb": "15"},
    ],
    "fen_per_mbps_day": "100",
    "gb_bytes": MIB,
}
DECEMBER = datetime(2026, 12, 1, tzinfo=ZoneInfo(ZONE))
CLOCK_SHIM = Path(__file__).with_name("edge_clock")  # its sitecustomize.py moves time.time


async def four_mib(req: web.Request) -> web.StreamResponse:
    return cacheable(OBJECT)


def local(day: int, hour: int = 0, minute: int = 0) -> datetime:
    """An instant of November 2026 in the account's zone."""
    return datetime(2026, 11, day, hour, minute, tzinfo=ZoneInfo(ZONE))


class EdgeClock:
    """The wall clock of the edge's processes (tests/integration/edge_clock): what they meter
    with, so that real traffic falls on the days of the test's month."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.file = tmp / "edge-clock"
        path = os.environ.get("PYTHONPATH")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(CLOCK_SHIM), *filter(None, [path])]))
        monkeypatch.setenv("CDN_TEST_CLOCK_FILE", str(self.file))

    def set(self, at: datetime) -> None:
        """From now on the edge's wall clock reads `at` (and runs on from there)."""
        temp = self.file.with_suffix(".tmp")
        temp.write_text(repr(at.timestamp() - time.time()))
        os.replace(temp, self.file)


async def object_fetches(e: ControlledEdge, count: int) -> int:
    """GET /object `count` times through the edge; the bytes received (heads and bodies)."""
    received = 0
    for _ in range(count):
        status, n = await asyncio.to_thread(exchange, e.port, "/object")
        assert status == 200
        received += n
    return received


@on_one_loop
async def test_a_prepaid_month_with_packages_at_the_edge(
    tmp_path: Path,
    make_origin: Callable[..., Awaitable[Origin]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 5's month on a real edge: two packages (P1 expiring on Nov 11 with a voided
    remainder), overage into the second price tier, arrears, the late penalty, suspension at the
    edge, payment, resumption at the edge; the figures to the fen.

    The edge's traffic is real and metered by the edge; its wall clock (EdgeClock) is set to the
    traffic's day while it serves, and the edge is stopped in between (a graceful stop ships what
    it metered), as if it were down from Nov 1 to Nov 12. While the control plane's billing clock
    settles the days, the edge's clock stands on Nov 30, a day this test never settles, so the
    probes that watch the suspension come and go do not change the figures.
    """
    edge_clock = EdgeClock(tmp_path, monkeypatch)
    plane = BillingPlane(tmp_path)
    await plane.up()
    edge: ControlledEdge | None = None
    try:
        async with aiohttp.ClientSession() as client:
            call = functools.partial(plane.call, client)

            plane.set_clock(local(1))
            edge_token = (await call("POST", "/v1/edges", ADMIN, {"name": "edge-1"}))["token"]
            made = await call("POST", "/v1/accounts", ADMIN, {"name": "acme", "billing": "prepaid"})
            account, token = made["account"]["id"], made["token"]
            await call("PUT", "/v1/price-lists/month", ADMIN, MONTH_PRICES)
            terms = {"charge_by": "traffic", "price_list": "month"}
            await call("PUT", f"/v1/accounts/{account}/billing", ADMIN, terms)
            payment = {"amount_fen": 1000, "reference": "p1"}
            await call("POST", f"/v1/accounts/{account}/payments", ADMIN, payment)
            # P1: 16 MiB for 10 days (to Nov 11 00:00), 500 fen; P2: 8 MiB for the month, 440
            # fen; both paid from the balance: 1000 - 500 - 440 = 60 fen.
            p1 = await call(
                "POST",
                f"/v1/accounts/{account}/packages",
                ADMIN,
                {"quota_bytes": 16 * MIB, "valid_days": 10, "price_fen": 500},
            )
            p2 = await call(
                "POST",
                f"/v1/accounts/{account}/packages",
                ADMIN,
                {"quota_bytes": 8 * MIB, "expires_at": DECEMBER.isoformat(), "price_fen": 440},
            )
            assert datetime.fromisoformat(p1["expires_at"]) == local(11)
            balance = await call("GET", f"/v1/accounts/{account}/balance", ADMIN)
            assert balance["balance_fen"] == 60
            origin = await make_origin({"/object": four_mib, "/small": small})
            await call("POST", "/v1/domains", token, {"name": HOST, "origins": [origin.url]})
            edge = ControlledEdge(tmp_path, origin, plane.url, token=edge_token)

            # Nov 1, 10:00: 3 x 4 MiB, all within P1 (the earliest expiry goes first).
            edge_clock.set(local(1, 10))
            await edge.start()
            nov1 = await object_fetches(edge, 3)
            assert await edge.stop() == 0  # a graceful stop ships what it metered
            h1 = nov1 - 3 * len(OBJECT)  # the response heads
            assert 0 < h1 < 3 * 1000
            assert (await plane.stored())[HOST]["bytes_sent"] == nov1

            # Nov 11, 00:01: Nov 1 to Nov 10 are settled; P1 expired at midnight with 16 MiB -
            # (12 MiB + h1) = 4 MiB - h1 left: voided (5.1b).
            await plane.tick(local(11, 0, 1))
            balance = await call("GET", f"/v1/accounts/{account}/balance", ADMIN)
            assert balance["balance_fen"] == 60
            packages = [(p["id"], p["remaining_bytes"], p["state"]) for p in balance["packages"]]
            assert packages == [
                (p1["id"], 4 * MIB - h1, "expired"),
                (p2["id"], 8 * MIB, "live"),
            ]

            # Nov 12, 10:00: 10 x 4 MiB. P1 is void; P2 covers 8 MiB, the other 32 MiB and the
            # heads are overage: 16 MiB at 20 fen = 320 fen, then 16 MiB + h2 at 15 fen = 240
            # fen (h2 < 10,000 bytes is under 0.15 fen), 560 fen: 60 - 560 = -500, arrears.
            edge_clock.set(local(12, 10))
            await edge.start()
            nov12 = await object_fetches(edge, 10)
            assert await edge.stop() == 0
            h2 = nov12 - 10 * len(OBJECT)
            assert 0 < h2 < 10 * 1000
            assert (await plane.stored())[HOST]["bytes_sent"] == nov1 + nov12
            assert origin.hits["/object"] == 2  # a miss on each day, hits otherwise
            overage = nov12 - 8 * MIB
            assert half_up(Fraction(16 * MIB * 20 + (overage - 16 * MIB) * 15, MIB)) == 560

            edge_clock.set(local(30, 12))
            await edge.start()
            tick1 = local(13, 0, 1)
            await plane.tick(tick1)
            balance = await call("GET", f"/v1/accounts/{account}/balance", ADMIN)
            assert (balance["balance_fen"], balance["penalty_accrued_fen"]) == (-500, 0)
            assert balance["month_billable_bytes"] == overage
            assert datetime.fromisoformat(balance["arrears_since"]) == tick1
            assert [(p["remaining_bytes"], p["state"]) for p in balance["packages"]] == [
                (4 * MIB - h1, "expired"),
                (0, "used_up"),
            ]
            # Within the 24 h grace the edge serves on.
            await edge_answers(edge, 200, "the grace")

            # Nov 14, 00:01: Nov 13 has unpaid fees of 500 fen: 0.5 % = 2.5 fen, 3 fen half
            # up; the grace is over: suspended, and the edge refuses the domain within seconds.
            await plane.tick(local(14, 0, 1))
            refused = await edge_answers(edge, 403, "the arrears suspension")
            reason = "arrears: the account's balance is overdue since 2026-11-12 16:01 UTC"
            assert refused == f"domain suspended: {reason}\n".encode()
            balance = await call("GET", f"/v1/accounts/{account}/balance", ADMIN)
            assert (balance["balance_fen"], balance["penalty_accrued_fen"]) == (-503, 3)

            # Nov 15, 00:01: the penalty accrues on the unpaid fees (503 - 3 = 500), not on
            # itself: 3 fen again, -506.
            await plane.tick(local(15, 0, 1))
            balance = await call("GET", f"/v1/accounts/{account}/balance", ADMIN)
            assert (balance["balance_fen"], balance["penalty_accrued_fen"]) == (-506, 6)
            assert (await edge.get("/small", HOST)).status == 403

            # Nov 15, 09:00: a payment of 1000 fen: 494 fen, the arrears end, the edge serves.
            plane.set_clock(local(15, 9))
            payment = {"amount_fen": 1000, "reference": "p2"}
            paid = await call("POST", f"/v1/accounts/{account}/payments", ADMIN, payment)
            assert (paid["balance_fen"], paid["penalty_accrued_fen"]) == (494, 0)
            assert paid["arrears_since"] is None
            await edge_answers(edge, 200, "the resumption")
            assert await object_fetches(edge, 1) > len(OBJECT)

            notices = (await call("GET", "/v1/notices", token))["notices"]
            assert [x["kind"] for x in notices] == ["arrears", "package_90", "suspended", "resumed"]
            assert notices[0]["detail"] == {"balance_fen": -500, "day": "2026-11-12"}
            assert notices[1]["detail"]["package"] == p2["id"]
            assert notices[2]["detail"]["balance_fen"] == -503

            # The month's bill: every line, the totals and the balance, to the fen.
            bill = await call("GET", "/v1/bills?month=2026-11", token)
            lines: dict[str, list[tuple[str, str, str, int]]] = {}
            for d in bill["days"]:
                assert d["amount_fen"] == sum(x["amount_fen"] for x in d["lines"])
                lines[d["day"]] = [
                    (x["kind"], x["ref"], x["quantity"], x["amount_fen"]) for x in d["lines"]
                ]
            one, two = str(p1["id"]), str(p2["id"])
            assert lines == {
                "2026-11-01": [
                    ("package_purchase", one, "1", 500),
                    ("package_purchase", two, "1", 440),
                    ("package", one, gb(nov1, MIB), 0),
                ],
                "2026-11-12": [
                    ("package", two, "8", 0),
                    ("traffic", "tier 1", "16", 320),
                    ("traffic", "tier 2", gb(overage - 16 * MIB, MIB), 240),
                ],
                "2026-11-13": [("late_penalty", "7.5", "500", 3)],
                "2026-11-14": [("late_penalty", "7.5", "500", 3)],
            }
            assert bill["totals"] == {
                "amount_fen": 500 + 440 + 560 + 3 + 3,
                "by_kind": {
                    "package_purchase": 500 + 440,
                    "package": 0,
                    "traffic": 320 + 240,
                    "late_penalty": 3 + 3,
                },
            }
            assert bill["balance_fen"] == 1000 + 1000 - 1506 == 494
            assert [(p["remaining_bytes"], p["state"]) for p in bill["packages"]] == [
                (4 * MIB - h1, "expired"),
                (0, "used_up"),
            ]
            assert await edge.stop() == 0
    finally:
        if edge is not None and edge.proc is not None and edge.proc.returncode is None:
            await edge.stop()
        await plane.close()


# --- termination at the edge ---------------------------------------------------------------------

OTHER = "other.example.test"
ON_DISK = bytes(range(256)) * 400  # 100 KiB: above the memory tier's limit, so on disk only


async def on_disk(req: web.Request) -> web.StreamResponse:
    return cacheable(ON_DISK)


@on_one_loop
async def test_termination_deletes_the_accounts_caches_at_the_edge(
    tmp_path: Path, make_origin: Callable[..., Awaitable[Origin]]
) -> None:
    """Agreement 5.3b / 6.3 on a real edge: the operator terminates an account at once; within
    seconds the edge answers 404 for its domain and has deleted the domain's cached object from
    its disk, while another account's domain keeps its cache."""
    plane = BillingPlane(tmp_path)
    await plane.up()
    edge: ControlledEdge | None = None
    try:
        async with aiohttp.ClientSession() as client:
            call = functools.partial(plane.call, client)

            edge_token = (await call("POST", "/v1/edges", ADMIN, {"name": "edge-1"}))["token"]
            await call("PUT", "/v1/price-lists/std", ADMIN, PRICES)
            origin = await make_origin({"/obj": on_disk})
            accounts: dict[str, int] = {}
            for name, domain in (("acme", HOST), ("other", OTHER)):
                body = {"name": name, "billing": "postpaid"}
                made = await call("POST", "/v1/accounts", ADMIN, body)
                accounts[domain] = made["account"]["id"]
                terms = {"charge_by": "traffic", "price_list": "std"}
                await call("PUT", f"/v1/accounts/{accounts[domain]}/billing", ADMIN, terms)
                body = {"name": domain, "origins": [origin.url]}
                await call("POST", "/v1/domains", made["token"], body)
            edge = ControlledEdge(tmp_path, origin, plane.url, token=edge_token)
            edge.write_config(DISK)
            await edge.start()

            # Each domain's object is cached on the edge's disk: the second GET is a hit.
            stored: dict[str, Path] = {}
            for domain in (HOST, OTHER):
                first, again = await edge.get("/obj", domain), await edge.get("/obj", domain)
                assert (first.status, first.body) == (200, ON_DISK)
                assert (again.body, cs_params(again).get("hit")) == (ON_DISK, True)
                await edge.until(
                    lambda: _true(len(edge.stored()) == len(stored) + 1), "the object not stored"
                )
                [stored[domain]] = set(edge.stored()) - set(stored.values())
            assert origin.hits == {"/obj": 2}

            # Terminated at once (5.3b): the edge refuses the domain within seconds (404, as an
            # unknown domain), and its object is deleted from the disk (6.3); the other
            # account's stays, and is still served from the cache.
            breach = {"now": True, "reason": "breach of 5.3b"}
            ended = await call("POST", f"/v1/accounts/{accounts[HOST]}/termination", ADMIN, breach)
            assert ended["terminated"] is True
            assert await edge_answers(edge, 404, "the termination", "/obj") == b"unknown host\n"
            await edge.until(lambda: _true(edge.stored() == [stored[OTHER]]), "the cache was kept")
            again = await edge.get("/obj", OTHER)
            assert (again.body, cs_params(again).get("hit")) == (ON_DISK, True)
            assert origin.hits == {"/obj": 2}  # nothing of the terminated domain was fetched
            assert await edge.stop() == 0
    finally:
        if edge is not None and edge.proc is not None and edge.proc.returncode is None:
            await edge.stop()
        await plane.close()
