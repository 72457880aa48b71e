"""Access logs from the socket to the customer (issue 6): an edge worker logs every request,
closes the hour when it ends (a controllable clock), its supervisor's shipper (default settings)
uploads the file to the real control plane (control.app on SQLite), and the domain's owner
lists and downloads the hour: every request of the hour, once; another account sees nothing."""

from __future__ import annotations

import asyncio
import functools
import gzip
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from edge.accesslog import parse_line
from edge.config import ControlSettings, parse_config
from edge.logship import LogShipper
from edge.worker import EdgeWorker
from tests.integration.conftest import HOST, Origin
from tests.integration.edgetest import Clock, fixed
from tests.integration.test_supervisor import on_one_loop
from tests.integration.test_usage_e2e import ADMIN, Plane
from tests.rawhttp import request

H13 = 1_795_698_000.0  # 2026-11-26T13:00:00 UTC
HOUR = "2026-11-26T13"
RANGE = "from=2026-11-26T13:00:00Z&to=2026-11-26T14:00:00Z"
ENOUGH = 30.0  # seconds; the issue allows 5 minutes, the shipper scans every 2 s


@on_one_loop
async def test_a_closed_hour_reaches_its_owner_and_nobody_else(
    tmp_path: Path, make_origin: Callable[..., Awaitable[Origin]]
) -> None:
    plane = Plane(tmp_path)
    await plane.up()
    worker: EdgeWorker | None = None
    shipper: LogShipper | None = None
    try:
        async with aiohttp.ClientSession() as client:
            call = functools.partial(plane.call, client)

            async def customer_get(path: str, token: str) -> tuple[int, bytes]:
                headers = {"Authorization": f"Bearer {token}"}
                async with client.get(plane.url + path, headers=headers) as resp:
                    return resp.status, await resp.read()

            edge_token = (await call("POST", "/v1/edges", ADMIN, {"name": "edge-1"}))["token"]
            acme, other = [
                await call("POST", "/v1/accounts", ADMIN, {"name": name, "billing": "postpaid"})
                for name in ("acme", "other")
            ]
            origin = await make_origin({"/a": fixed(b"hello\n", {"Cache-Control": "max-age=60"})})
            domain = {"name": HOST, "origins": [origin.url]}
            await call("POST", "/v1/domains", acme["token"], domain)

            state = tmp_path / "edge"
            config = parse_config(
                f"""
[edge]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
state_dir = "{state}"
edge_id = "edge-1"

[[domains]]
name = "{HOST}"
origins = ["{origin.url}"]
""",
                "edge.toml",
            )
            clock = Clock(H13 + 60)
            worker = EdgeWorker(config, clock=clock)
            await worker.start()
            # What the supervisor runs, with its default scan interval and backoff.
            shipper = LogShipper(
                state / "logs", config.logs, ControlSettings(url=plane.url, token=edge_token)
            )
            shipper.start()

            targets = [f"/a?n={n}" for n in range(25)]
            for target in targets:
                assert (await request(worker.port, target, HOST)).status == 200
            assert worker.access_log is not None
            await worker.access_log.flush()

            listing = f"/v1/logs?domain={HOST}&{RANGE}"
            assert (await call("GET", listing, acme["token"]))["hours"] == []  # still open
            clock.now = H13 + 3600 + 1  # the hour is over
            ended = time.monotonic()
            while not (hours := (await call("GET", listing, acme["token"]))["hours"]):
                assert time.monotonic() - ended < ENOUGH, "the closed hour did not arrive"
                await asyncio.sleep(0.1)
            assert [(h["hour"], h["pieces"]) for h in hours] == [(HOUR, 1)]

            status, body = await customer_get(hours[0]["download"], acme["token"])
            assert status == 200
            records = [parse_line(line) for line in gzip.decompress(body).splitlines(True)]
            assert [r.url for r in records] == [t.encode() for t in targets]
            seen = {(r.edge, r.domain, r.status) for r in records}
            assert seen == {("edge-1", HOST.encode(), 200)}

            for path in (listing, hours[0]["download"]):
                assert (await customer_get(path, other["token"]))[0] == 404
            # Acknowledged: moved aside at the edge (deleted after keep_days).
            assert list((state / "logs" / HOST).glob("*.gz")) == []
            assert len(list((state / "logs" / HOST / "shipped").glob("*.gz"))) == 1
    finally:
        if shipper is not None:
            await shipper.stop()
        if worker is not None:
            await worker.stop(grace=1.0)
        await plane.close()
