#!/usr/bin/env python3
"""How soon is a closed hour of access logs downloadable? (issue 6: within 5 minutes)

In this one process, on 127.0.0.1: the control plane (control.app on SQLite), an origin, an edge
worker (edge.worker.EdgeWorker) whose clock this script moves, and the log shipper its supervisor
runs (edge.logship.LogShipper, default settings: a scan every 2 s). For each of HOURS hours:
requests through the edge, then the clock passes the end of the hour; the delay is the real time
from that moment until the domain's account has downloaded the hour with every request in it.
In a real edge the worker notices the end of the hour from the wall clock, at the same tick
as here (its writer runs every 0.5 s). Prints p50 and max, writes the logdelay section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from run import HOST, OUT, free_port, write_section  # benchmarks/ is on sys.path

from control.app import make_app
from control.config import ControlConfig
from control.db import engine_for, migrate
from edge.config import ControlSettings, parse_config
from edge.logship import LogShipper
from edge.worker import EdgeWorker

HERE = Path(__file__).resolve().parent
WORK = OUT / "logdelay"
DOMAIN = "logs.bench.test"
ADMIN = "logdelay-benchmark-operator-token"
TARGET_SECONDS = 300.0
REQUESTS_PER_HOUR = 200
FIRST_HOUR = 1_795_698_000.0  # 2026-11-26T13:00:00 UTC: any past hour does


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _origin(_request: web.Request) -> web.Response:
    return web.Response(text="x", headers={"Cache-Control": "no-store"})


async def serve(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    return runner


async def call(
    session: aiohttp.ClientSession, method: str, url: str, token: str, body: Any = None
) -> Any:
    async with session.request(
        method, url, json=body, headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        if resp.status >= 300:
            raise RuntimeError(f"{method} {url}: {resp.status} {await resp.text()}")
        return await resp.json() if resp.content_type == "application/json" else await resp.read()


async def measure(hours: int) -> list[float]:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    engine = engine_for(f"sqlite:///{WORK}/control.db")
    await migrate(engine)
    control_port, origin_port = free_port(), free_port()
    control = ControlConfig(
        source="logdelay",
        admin_token=ADMIN,
        cname_suffix="cdn.bench.test",
        origin_deny=(),
        log_dir=str(WORK / "control-logs"),
    )
    origin_app = web.Application()
    origin_app.router.add_get("/{n}", _origin)
    runners = [await serve(make_app(control, engine), control_port)]
    runners.append(await serve(origin_app, origin_port))
    api = f"http://{HOST}:{control_port}"
    delays: list[float] = []
    worker: EdgeWorker | None = None
    shipper: LogShipper | None = None
    try:
        async with aiohttp.ClientSession() as session:
            edge_token = (await call(session, "POST", f"{api}/v1/edges", ADMIN, {"name": "e1"}))[
                "token"
            ]
            account = await call(
                session, "POST", f"{api}/v1/accounts", ADMIN, {"name": "a", "billing": "postpaid"}
            )
            token = account["token"]
            body = {"name": DOMAIN, "origins": [f"http://{HOST}:{origin_port}"]}
            await call(session, "POST", f"{api}/v1/domains", token, body)
            config = parse_config(
                f'[edge]\nlisten = "{HOST}:0"\nadmin_listen = "{HOST}:0"\n'
                f'state_dir = "{WORK / "edge"}"\nedge_id = "e1"\n\n'
                f'[[domains]]\nname = "{DOMAIN}"\norigins = ["http://{HOST}:{origin_port}"]\n',
                "logdelay.toml",
            )
            clock = Clock(FIRST_HOUR + 1)
            worker = EdgeWorker(config, clock=clock)
            await worker.start()
            shipper = LogShipper(
                WORK / "edge" / "logs", config.logs, ControlSettings(url=api, token=edge_token)
            )
            shipper.start()
            edge_url = f"http://{HOST}:{worker.port}"
            for hour in range(hours):
                start = FIRST_HOUR + hour * 3600
                clock.now = start + 1
                for n in range(REQUESTS_PER_HOUR):
                    async with session.get(f"{edge_url}/{n}", headers={"Host": DOMAIN}) as resp:
                        await resp.read()
                name = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%dT%H")
                clock.now = start + 3600  # the hour is over
                ended = time.monotonic()
                while True:
                    try:
                        data = await call(session, "GET", f"{api}/v1/logs/{DOMAIN}/{name}", token)
                    except RuntimeError:  # 404 until it arrived
                        await asyncio.sleep(0.01)
                        continue
                    if len(gzip.decompress(data).splitlines()) != REQUESTS_PER_HOUR:
                        raise RuntimeError(f"hour {name}: not every request was logged")
                    break
                delays.append(time.monotonic() - ended)
    finally:
        if shipper is not None:
            await shipper.stop()
        if worker is not None:
            await worker.stop(grace=1.0)
        for runner in runners:
            await runner.cleanup()
        await engine.dispose()
    return delays


def report(delays: list[float], results: Path) -> str:
    written = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    worst = max(delays)
    verdict = "met" if worst <= TARGET_SECONDS else "NOT met"
    body = "\n".join(
        [
            "## Access-log delay (issue 6)",
            "",
            f"Written by `benchmarks/logdelay.py` on {written}: {len(delays)} hours of "
            f"{REQUESTS_PER_HOUR} requests each through an edge worker whose clock the script "
            "moves past each hour's end, shipped by the supervisor's log shipper (default "
            "settings) to the control plane (SQLite); the delay is the real time from the end "
            "of the hour until its account has downloaded it whole.",
            "",
            "| hours | p50 s | max s |",
            "| ---: | ---: | ---: |",
            f"| {len(delays)} | {statistics.median(delays):.2f} | {worst:.2f} |",
            "",
            f"Target: within {TARGET_SECONDS:.0f} s: {verdict} ({worst:.2f} s).",
        ]
    )
    return write_section(results, "logdelay", body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=int, default=5)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    try:
        delays = asyncio.run(measure(args.hours))
    except (RuntimeError, OSError) as e:
        print(f"logdelay: error: {e}", file=sys.stderr)
        return 1
    print(report(delays, args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
