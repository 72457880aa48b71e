"""Usage from the socket to the control plane (issue 5): `cdn edge` with 2 workers in front of
a real origin, following a real control plane (control.app on SQLite). What the control plane
stores per domain equals what the test's clients received, byte for byte and request for
request, through a graceful stop, a control-plane outage and a SIGKILL of the whole edge."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from tests.integration.conftest import Origin
from tests.integration.test_control_follow import ControlledEdge
from tests.integration.test_metering import ETAG, ROUTES, received, stalled_download
from tests.integration.test_supervisor import HOST, free_port, on_one_loop

ADMIN = "test-operator-token-usage"
SUSPENDED = "suspended.example.test"
KILL_AFTER = 1.0  # "a hard kill loses at most the last flush interval (at most 1 s)"
LAST = "GET /small HTTP/1.1\r\n"  # the exchange that ends right before a kill


class Plane:
    """control.app on one SQLite file, which can go down and come back on the same port."""

    def __init__(self, tmp: Path, *, secret_key: str = "") -> None:
        self.db = f"sqlite:///{tmp}/control.db"
        self.log_dir = str(tmp / "logs")  # edges ship their access logs here
        self.secret_key = secret_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: TestServer | None = None
        self.engine: Any = None

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
            log_dir=self.log_dir,
            secret_key=self.secret_key,
        )  # fmt: skip
        self.server = TestServer(make_app(config, self.engine), host="127.0.0.1", port=self.port)
        await self.server.start_server()

    async def call(
        self,
        client: aiohttp.ClientSession,
        method: str,
        path: str,
        token: str,
        body: object = None,
    ) -> Any:
        """One API call that must succeed; its JSON (None for a 204)."""
        headers = {"Authorization": f"Bearer {token}"}
        async with client.request(method, self.url + path, json=body, headers=headers) as r:
            assert r.status < 300, (method, path, r.status, await r.text())
            return await r.json() if r.status != 204 else None

    async def down(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None

    async def close(self) -> None:
        await self.down()
        if self.engine is not None:
            await self.engine.dispose()

    async def stored(self) -> dict[str, Counter[str]]:
        """The usage table's sums per domain."""
        from sqlalchemy import func, select

        from control.schema import usage
        from edge.meter import FIELDS

        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(usage.c.domain, *(func.sum(usage.c[name]) for name in FIELDS)).group_by(
                    usage.c.domain
                )
            )
            return {
                row[0]: Counter({n: int(v) for n, v in zip(FIELDS, row[1:], strict=True) if v})
                for row in rows
            }


async def traffic(port: int, expected: dict[str, Counter[str]]) -> None:
    """Every kind of exchange, with what its client received added to `expected`."""
    heads = [
        "GET /big HTTP/1.1\r\n",
        "GET /small HTTP/1.1\r\n",
        "GET /big HTTP/1.1\r\nRange: bytes=1000-200999\r\n",
        "GET /small HTTP/1.1\r\nRange: bytes=0-9,20-29\r\n",
        "HEAD /big HTTP/1.1\r\n",
        f"GET /small HTTP/1.1\r\nIf-None-Match: {ETAG}\r\n",
        "GET /nothing-here HTTP/1.1\r\n",  # the origin's 404
    ] * 3
    mine = expected.setdefault(HOST, Counter())
    for head in heads:
        mine.update(requests=1, bytes_sent=await received(port, head))
    for host in ("unknown.example.test", SUSPENDED):  # 404: not shipped; 403: refused
        n = await received(port, "GET /small HTTP/1.1\r\n", host)
        if host == SUSPENDED:
            expected.setdefault(SUSPENDED, Counter()).update(requests=1, bytes_sent=n, refused=1)
    for read in (300_000, 5000):  # abandoned downloads
        sock, got = await stalled_download(port, read)
        sock.close()
        mine.update(requests=1, bytes_sent=got)


def shown(stored: dict[str, Counter[str]]) -> dict[str, Counter[str]]:
    keys = ("requests", "bytes_sent", "refused")
    return {d: Counter({k: c[k] for k in keys if c[k]}) for d, c in stored.items()}


@on_one_loop
async def test_usage_reaches_the_control_plane_exactly(
    tmp_path: Path, make_origin: Callable[..., Awaitable[Origin]]
) -> None:
    loop = asyncio.get_running_loop()
    plane = Plane(tmp_path)
    await plane.up()
    edge: ControlledEdge | None = None
    try:
        async with aiohttp.ClientSession() as client:

            call = functools.partial(plane.call, client)

            edge_token = (await call("POST", "/v1/edges", ADMIN, {"name": "edge-1"}))["token"]
            made = await call(
                "POST", "/v1/accounts", ADMIN, {"name": "acme", "billing": "postpaid"}
            )
            origin = await make_origin(ROUTES)
            for name in (HOST, SUSPENDED):
                body = {"name": name, "origins": [origin.url]}
                await call("POST", "/v1/domains", made["token"], body)
            await call("POST", f"/v1/domains/{SUSPENDED}/suspend", ADMIN, {"reason": "unpaid"})
            edge = ControlledEdge(tmp_path, origin, plane.url, token=edge_token)
            await edge.start()
            port = edge.port

            expected: dict[str, Counter[str]] = {}
            await traffic(port, expected)
            # A graceful stop ships the open window before it exits.
            assert await edge.stop() == 0
            assert shown(await plane.stored()) == expected

            # An outage: what is served meanwhile, and at a stop during it, stays spooled, and is
            # shipped once, later.
            await edge.start()
            await plane.down()
            await traffic(port, expected)
            assert await edge.stop() == 0  # its flush fails
            assert list((edge.state / "usage").glob("*-*.json"))
            await plane.up()
            assert shown(await plane.stored()) != expected
            await edge.start()
            await edge.until(
                lambda: _equal(plane, expected), "the spooled usage never reached the plane"
            )

            # A hard kill of the whole edge loses at most the last second (issue 5): the edge is
            # SIGKILLed, supervisor and workers, 1 s after its last response was received, and
            # nothing was lost.
            await traffic(port, expected)
            expected[HOST].update(requests=1, bytes_sent=await received(port, LAST))
            answered = loop.time()
            await asyncio.sleep(KILL_AFTER)
            waited = loop.time() - answered
            await kill_edge(edge)
            # The sleep can end late: this loop shares 2 cores with the edge's 3 processes and
            # the control plane, which are busy with this very traffic. Up to 0.1 s late is
            # accepted as that noise; later than that, the test would not show the 1 s bound,
            # so it fails rather than pass on a weaker claim.
            assert waited <= KILL_AFTER + 0.1, waited
            await edge.start()
            await edge.until(lambda: _equal(plane, expected), "the killed edge's usage was lost")
            metrics = await edge.metrics()
            assert metrics["cdn_edge_usage_shipped_batches_total"] >= 1
            assert metrics["cdn_edge_usage_spooled_batches"] == 0
            assert metrics["cdn_edge_usage_spool_errors_total"] == 0
            assert await edge.stop() == 0
            assert shown(await plane.stored()) == expected  # and nothing doubled

            await _usage_api(call, made["token"], expected[HOST])
    finally:
        if edge is not None and edge.proc is not None and edge.proc.returncode is None:
            await edge.stop()
        await plane.close()


async def kill_edge(edge: ControlledEdge) -> None:
    """SIGKILL the supervisor and every worker, as a power cut would stop them: nobody gets
    to write what it still holds."""
    workers = edge.worker_pids()
    assert len(workers) == edge.workers
    edge.signal(signal.SIGKILL)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    assert edge.proc is not None
    await edge.proc.wait()


async def _equal(plane: Plane, expected: dict[str, Counter[str]]) -> bool:
    return shown(await plane.stored()) == expected


async def _usage_api(
    call: Callable[..., Awaitable[Any]], token: str, expected: Counter[str]
) -> None:
    """GET /v1/usage shows the same sums."""
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start, end = hour - timedelta(hours=1), hour + timedelta(hours=2)
    query = f"from={start.isoformat()}&to={end.isoformat()}&granularity=1h&domain={HOST}"
    report = await call("GET", "/v1/usage?" + query.replace("+", "%2B"), token)
    points = report["points"]
    assert sum(p["requests"] for p in points) == expected["requests"]
    assert sum(p["bytes_sent"] for p in points) == expected["bytes_sent"]
