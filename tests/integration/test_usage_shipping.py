"""Usage from meters through the spool to a real HTTP 'control plane': nothing lost, nothing
counted twice, through outages, restarts, timeouts and error answers (issue 5)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from edge.meter import GRACE, HIT, MISS, PASS, WINDOW, Bucket, Meter, merge
from edge.spool import USAGE_PATH, Shipper, Spool
from tests.integration.test_supervisor import free_port, on_one_loop

# What is tested is the spool's and the shipper's protocol with the control plane (what is sent,
# kept, retried, counted once), not the event loop's transports: one loop, uvloop, as `cdn edge`
# runs by default.
pytestmark = on_one_loop

TOKEN = "edge-token-123"
EDGE = "edge-1"
T0 = 1_764_150_000
DOMAINS = ("a.example.com", "b.example.com", "c.example.com")
FAST = {"backoff_first": 0.02, "backoff_max": 0.1}


class ControlPlane:
    """The control plane's side of POST /v1/edge/usage, as the real one will be: batches stored
    by id (a batch sent twice is stored once), acknowledged with a 2xx only once stored."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.batches: dict[str, dict[str, Any]] = {}
        self.posts: Counter[str] = Counter()  # by batch id
        self.status = 200  # what to answer instead of storing, when not 2xx
        self.refuse: dict[str, int] = {}  # batch id -> status for that batch only
        self.stall_once: set[str] = set()  # store, then answer too late for the client
        self.cookies: list[str] = []
        self._released = asyncio.Event()  # ends the stalls
        self._runner: web.AppRunner | None = None

    async def up(self) -> None:
        app = web.Application()
        app.router.add_post(USAGE_PATH, self._usage)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def down(self) -> None:
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _usage(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.Response(status=401)
        self.cookies.append(request.headers.get("Cookie", ""))
        body = await request.json()
        batch_id = body["batch"]
        self.posts[batch_id] += 1
        status = self.refuse.get(batch_id, self.status)
        if status != 200:
            return web.Response(status=status)
        assert body["edge"] == EDGE
        self.batches.setdefault(batch_id, body)
        if batch_id in self.stall_once:
            self.stall_once.discard(batch_id)
            await self._released.wait()
        response = web.json_response({"batch": batch_id})
        response.set_cookie("session", "x")  # the edge must not send it back
        return response

    def total(self, name: str) -> int:
        return sum(b[name] for batch in self.batches.values() for b in batch["buckets"])


@pytest.fixture
async def control() -> AsyncIterator[ControlPlane]:
    plane = ControlPlane(free_port())
    yield plane
    await plane.down()


@pytest.fixture
async def shippers() -> AsyncIterator[Callable[..., Shipper]]:
    started: list[Shipper] = []

    def start(spool: Spool, url: str, **kwargs: Any) -> Shipper:
        shipper = Shipper(spool, url, TOKEN, **{**FAST, **kwargs})
        shipper.start()
        started.append(shipper)
        return shipper

    yield start
    for shipper in started:
        await shipper.stop()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


class Edge:
    """Three workers' meters and a supervisor's spool on a simulated clock, wired as the edge
    will be: every second the workers' buckets are taken, merged and added to the open batch,
    which is sealed at the end of each window."""

    def __init__(self, spool: Spool, seed: int) -> None:
        self.spool = spool
        self.workers = [Meter() for _ in range(3)]
        self.random = random.Random(seed)
        self.recorded: Counter[str] = Counter()
        self.sealed: list[str] = []

    def run(self, start: float, seconds: int, on_seal: Callable[[], None] = lambda: None) -> None:
        for second in range(seconds):
            now = start + second
            for _ in range(self.random.randrange(4)):
                self._request(now + self.random.random())
            self.spool.add(merge(b for worker in self.workers for b in worker.take_all()))
            if (now - GRACE) % WINDOW == 0:
                self.seal()
                on_seal()

    def _request(self, now: float) -> None:
        worker = self.random.choice(self.workers)
        domain = self.random.choice(DOMAINS)
        kind = self.random.choice((HIT, MISS, PASS))
        body = self.random.randrange(10**7)
        sent = body + self.random.randrange(200, 400)
        worker.record(domain, now, kind, 200, sent, body)
        self.recorded.update(requests=1, bytes_sent=sent, body_bytes=body)
        if kind == MISS:
            worker.add_origin(domain, now, body)
            self.recorded["origin_bytes"] += body

    def seal(self) -> None:
        batch_id = self.spool.seal()
        if batch_id is not None:
            self.sealed.append(batch_id)


async def test_an_outage_and_a_restart_lose_nothing_and_count_nothing_twice(
    tmp_path: Path, control: ControlPlane, shippers: Callable[..., Shipper]
) -> None:
    spool = Spool(tmp_path / "usage", EDGE)
    edge = Edge(spool, seed=1)
    shipper = shippers(spool, control.url)
    # Twelve minutes of traffic while the control plane is down (connection refused).
    edge.run(T0 + 2, 12 * 60, on_seal=shipper.wake)
    await until(lambda: shipper.failures >= 3)
    assert shipper.shipped == 0
    assert [b.id for b in spool.pending()] == edge.sealed
    assert len(edge.sealed) == 2  # two windows closed; the third is still open

    # The edge restarts (still no control plane): the open batch is sealed, nothing is lost.
    await shipper.stop()
    spool = Spool(tmp_path / "usage", EDGE)
    assert len(spool.pending()) == 3
    edge.spool = spool
    edge.sealed = [b.id for b in spool.pending()]
    shipper = shippers(spool, control.url)
    edge.run(T0 + 2 + 12 * 60, 6 * 60, on_seal=shipper.wake)

    await control.up()
    await until(lambda: not spool.pending())
    edge.seal()  # a graceful stop: the open window goes too
    assert await shipper.flush()

    assert set(control.batches) == set(edge.sealed)
    assert all(n == 1 for n in control.posts.values())  # refused connections never arrived
    assert shipper.shipped == len(edge.sealed)
    for name in ("requests", "bytes_sent", "body_bytes", "origin_bytes"):
        assert control.total(name) == edge.recorded[name], name
    assert control.cookies and not any(control.cookies)


async def test_a_batch_resent_after_a_timeout_counts_once(
    tmp_path: Path, control: ControlPlane, shippers: Callable[..., Shipper]
) -> None:
    await control.up()
    spool = Spool(tmp_path, EDGE)
    edge = Edge(spool, seed=2)
    edge.run(T0, 2 * WINDOW)
    edge.seal()
    first, second = edge.sealed[0], edge.sealed[1]
    control.stall_once.add(first)
    shipper = shippers(spool, control.url, timeout=1.0)
    shipper.wake()
    await until(lambda: not spool.pending())
    assert control.posts == {first: 2, second: 1} | {b: 1 for b in edge.sealed[2:]}
    assert shipper.failures == 1
    assert set(control.batches) == set(edge.sealed)
    assert control.total("bytes_sent") == edge.recorded["bytes_sent"]
    assert control.total("requests") == edge.recorded["requests"]


async def test_an_error_answer_keeps_the_batch(
    tmp_path: Path, control: ControlPlane, shippers: Callable[..., Shipper]
) -> None:
    await control.up()
    control.status = 500
    spool = Spool(tmp_path, EDGE)
    batch_id = spool.append([Bucket(DOMAINS[0], T0, requests=1, bytes_sent=10)])
    shipper = shippers(spool, control.url)
    assert not await shipper.flush()
    await until(lambda: control.posts[batch_id] >= 3)  # retried in the background
    assert [b.id for b in spool.pending()] == [batch_id]
    assert control.batches == {}
    control.status = 200
    await until(lambda: not spool.pending())
    assert list(control.batches) == [batch_id]
    assert control.total("bytes_sent") == 10


async def test_a_batch_refused_on_its_own_does_not_hold_up_the_others(
    tmp_path: Path, control: ControlPlane, shippers: Callable[..., Shipper]
) -> None:
    await control.up()
    spool = Spool(tmp_path, EDGE)
    ids = [spool.append([Bucket(DOMAINS[0], T0, bytes_sent=n)]) for n in range(3)]
    control.refuse[ids[0]] = 422
    shipper = shippers(spool, control.url, backoff_first=10.0)
    assert not await shipper.flush()
    assert set(control.batches) == set(ids[1:])
    assert [b.id for b in spool.pending()] == [ids[0]]  # kept, never deleted unacknowledged
    control.status = 401  # about the edge, not a batch: the round stops at once
    control.refuse.clear()
    ids.append(spool.append([Bucket(DOMAINS[0], T0, bytes_sent=3)]))
    assert not await shipper.flush()
    assert control.posts[ids[3]] == 0
    control.status = 200
    assert await shipper.flush()
    assert set(control.batches) == set(ids)
    assert control.total("bytes_sent") == 0 + 1 + 2 + 3
