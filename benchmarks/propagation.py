#!/usr/bin/env python3
"""How fast do edges obey the control plane? (issue 4: p99 <= 50 ms)

Starts a control plane (`cdn control`, SQLite), an origin (in this process) and 10 edges
(`cdn edge`, one worker each), all on 127.0.0.1. A poller per edge requests the object under
test over a kept-alive connection every millisecond or so. Then 300 operations, in turn a domain
suspend, a resume, a URL purge and a tag purge; for each, the time from the API call returning to
the moment the last edge answers the new way (403, 200, fresh bytes after a purge). Prints p50,
p99 and max and writes them into benchmarks/RESULTS.md (the propagation section).

Anchors: Fastly's global purge ~150 ms, Cloudflare's < 150 ms P50; those cross continents, this
is loopback, so it measures our feed, not the speed of light.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from run import (  # benchmarks/ is on sys.path: this file is a script
    HOST,
    OUT,
    BenchError,
    ManagedProcess,
    cpu_seconds,
    exclusive_out_dir,
    find_cdn,
    free_port,
    reap_stale_groups,
    self_cpu_seconds,
    wait_until,
    write_section,
)

HERE = Path(__file__).resolve().parent
WORK = OUT / "propagation"
DOMAIN = "prop.bench.test"
TARGET_P99_MS = 50.0
OP_TIMEOUT = 5.0
IDLE_SECONDS = 3.0
POLL_INTERVAL = 0.001  # between a poller's answer and its next request


@dataclass
class Origin:
    """Objects whose body names a generation: a purge is visible as a new generation."""

    generation: dict[str, int] = field(default_factory=dict)
    fetches: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{kind}/{n}", self.serve)
        app.router.add_post("/_next{path:/.*}", self.next_generation)
        return app

    async def next_generation(self, request: web.Request) -> web.Response:
        """The benchmark's own call, before a purge: the object's next bytes."""
        path = request.match_info["path"]
        self.generation[path] = self.generation.get(path, 0) + 1
        return web.Response(text=str(self.generation[path]))

    async def serve(self, request: web.Request) -> web.Response:
        self.fetches += 1
        path = request.path
        headers = {"Cache-Control": "max-age=3600"}
        if request.match_info["kind"] == "tag":
            headers["Surrogate-Key"] = f"t{request.match_info['n']}"
        return web.Response(text=f"{path} gen {self.generation.get(path, 0)}", headers=headers)


@dataclass
class Edge:
    name: str
    port: int
    process: ManagedProcess


@dataclass
class Watch:
    """What every poller looks for after the current operation."""

    path: str
    done: Callable[[int, str], bool]
    seen: dict[str, float] = field(default_factory=dict)  # edge name -> first time it held


class Bench:
    def __init__(self, edges: int, operations: int) -> None:
        self.edge_count = edges
        self.operations = operations
        self.cdn = find_cdn()
        self.origin_port = 0
        self.processes: list[ManagedProcess] = []
        self.edges: list[Edge] = []
        self.admin_token = secrets.token_urlsafe(24)
        self.account_token = ""
        self.control_port = free_port()
        self.watch: Watch | None = None
        self.cpu_use: dict[str, float] = {}
        self.idle_cpu_use: dict[str, float] = {}
        self.cpu_per_operation: dict[str, float] = {}  # CPU seconds
        self.stop_polling = asyncio.Event()

    # --- set-up ---------------------------------------------------------------------------
    async def start(self, session: aiohttp.ClientSession) -> None:
        # Every run starts clean: an edge's saved state, bans and usage spool from an earlier
        # run would be replayed against this run's new control plane.
        shutil.rmtree(WORK, ignore_errors=True)
        WORK.mkdir(parents=True)
        control_toml = WORK / "control.toml"
        control_toml.write_text(
            f"""[control]
listen = "{HOST}:{self.control_port}"
database = "sqlite:///{WORK}/control-{secrets.token_hex(4)}.db"
admin_token = "{self.admin_token}"
cname_suffix = "cdn.bench.test"
origin_deny = []  # the benchmark's origin is on loopback
"""
        )
        control = ManagedProcess(
            "control", [self.cdn, "control", "--config", str(control_toml)], WORK / "control.log"
        )
        control.start()
        self.processes.append(control)
        await asyncio.to_thread(
            wait_until,
            control,
            lambda: _answers(self.control_port, "/v1/openapi.json"),
            30,
            "control plane",
        )

        # The origin runs in a process of its own: in this one it would queue behind the
        # pollers, and the purges' refetches would measure the benchmark, not the edges.
        self.origin_port = origin_port = free_port()
        origin = ManagedProcess(
            "origin",
            [sys.executable, str(Path(__file__)), "--serve-origin", str(origin_port)],
            WORK / "origin.log",
        )
        origin.start()
        self.processes.append(origin)
        await asyncio.to_thread(
            wait_until, origin, lambda: _answers(origin_port, "/obj/0"), 30, "origin"
        )

        account = await self.api(
            session,
            "POST",
            "/v1/accounts",
            self.admin_token,
            {"name": "bench", "billing": "postpaid"},
        )
        self.account_token = account["token"]
        await self.api(
            session,
            "POST",
            "/v1/domains",
            self.account_token,
            {"name": DOMAIN, "origins": [f"http://{HOST}:{origin_port}"]},
        )
        for index in range(self.edge_count):
            name = f"edge{index}"
            made = await self.api(session, "POST", "/v1/edges", self.admin_token, {"name": name})
            port = free_port()
            config = WORK / f"{name}.toml"
            config.write_text(
                f"""[edge]
listen = "{HOST}:{port}"
admin_listen = "{HOST}:{free_port()}"
workers = 1
state_dir = "{WORK / name}"
edge_id = "{name}"

[cache]
disk = 0

[origin]
deny = []  # the benchmark's origin is on loopback

[control]
url = "http://{HOST}:{self.control_port}"
token = "{made["token"]}"
"""
            )
            process = ManagedProcess(
                name, [self.cdn, "edge", "--config", str(config)], WORK / f"{name}.log"
            )
            process.start()
            self.processes.append(process)
            self.edges.append(Edge(name, port, process))
        for edge in self.edges:
            await asyncio.to_thread(
                wait_until, edge.process, lambda p=edge.port: _serves(p), 60, "edge"
            )

    async def api(
        self,
        session: aiohttp.ClientSession,
        method: str,
        path: str,
        token: str,
        body: dict[str, object] | None = None,
    ) -> dict[str, object]:
        url = f"http://{HOST}:{self.control_port}{path}"
        headers = {"Authorization": f"Bearer {token}"}
        async with session.request(method, url, json=body, headers=headers) as resp:
            text = await resp.text()
            if resp.status >= 300:
                raise BenchError(f"{method} {path}: {resp.status} {text[:300]}")
            return json.loads(text) if text else {}

    # --- polling --------------------------------------------------------------------------
    async def poll(self, edge: Edge) -> None:
        """Ask `edge` for the watched path, again and again, over one kept-alive connection.

        Raw HTTP/1.1 rather than an aiohttp client: ten of those in this process cost a core's
        third, which the processes under test queued behind, and polled each edge only every
        few milliseconds."""
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while not self.stop_polling.is_set():
            watch = self.watch
            if watch is None or edge.name in watch.seen:
                await asyncio.sleep(0.001)
                continue
            try:
                if connection is None:
                    connection = await asyncio.open_connection(HOST, edge.port)
                status, body = await _get(*connection, watch.path)
            except (OSError, ValueError, asyncio.IncompleteReadError):
                if connection is not None:
                    connection[1].close()
                connection = None
                await asyncio.sleep(0.01)
                continue
            if watch.done(status, body):
                watch.seen.setdefault(edge.name, time.monotonic())
            await asyncio.sleep(POLL_INTERVAL)
        if connection is not None:
            connection[1].close()

    async def warm(self, path: str) -> None:
        """Every edge has `path` cached (the second request is a hit)."""
        async with aiohttp.ClientSession() as session:
            for edge in self.edges:
                for _ in range(2):
                    url = f"http://{HOST}:{edge.port}{path}"
                    async with session.get(url, headers={"Host": DOMAIN}) as resp:
                        await resp.read()

    # --- where the CPU goes -----------------------------------------------------------------
    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds so far of each kind of process: 2 cores serve them all, so a role's
        share is what the others queue behind."""
        roles = {"control": 0.0, "origin": 0.0, "edge supervisors": 0.0, "edge workers": 0.0}
        for process in self.processes:
            if process.name in ("control", "origin"):
                roles[process.name] += cpu_seconds(process.pids())
            else:
                pids = process.pids()
                roles["edge supervisors"] += cpu_seconds([process.pid])
                roles["edge workers"] += cpu_seconds([p for p in pids if p != process.pid])
        roles["benchmark (pollers, API calls)"] = self_cpu_seconds()
        return roles

    # --- operations -----------------------------------------------------------------------
    async def run(self) -> list[tuple[str, float]]:
        pollers = [asyncio.create_task(self.poll(edge)) for edge in self.edges]
        results: list[tuple[str, float]] = []
        before, started = self.cpu_by_role(), time.monotonic()
        await asyncio.sleep(IDLE_SECONDS)  # what everything costs with nothing to do
        after, elapsed = self.cpu_by_role(), time.monotonic() - started
        self.idle_cpu_use = {role: (after[role] - before[role]) / elapsed for role in after}
        before, started = after, time.monotonic()
        try:
            async with aiohttp.ClientSession() as session:
                for number in range(self.operations):
                    kind = ("suspend", "resume", "url-purge", "tag-purge")[number % 4]
                    results.append((kind, await self.operation(session, kind, number)))
            after, elapsed = self.cpu_by_role(), time.monotonic() - started
            self.cpu_use = {role: (after[role] - before[role]) / elapsed for role in after}
            self.cpu_per_operation = {
                role: (after[role] - before[role]) / self.operations for role in after
            }
        finally:
            self.stop_polling.set()
            for task in pollers:
                task.cancel()
            for task in pollers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return results

    async def operation(self, session: aiohttp.ClientSession, kind: str, number: int) -> float:
        if kind in ("suspend", "resume"):
            path = "/obj/status"
            want = 403 if kind == "suspend" else 200
            watch = Watch(path, lambda status, _body: status == want)
            call = (
                "POST",
                f"/v1/domains/{DOMAIN}/{kind}",
                self.admin_token,
                {"reason": "benchmark"} if kind == "suspend" else {},
            )
        else:
            prefix = "obj" if kind == "url-purge" else "tag"
            path = f"/{prefix}/{number}"
            await self.warm(path)
            async with session.post(f"http://{HOST}:{self.origin_port}/_next{path}") as resp:
                generation = int(await resp.text())
            expected = f"{path} gen {generation}"
            watch = Watch(path, lambda status, body: status == 200 and body == expected)
            body: dict[str, object] = (
                {"type": "url", "urls": [f"http://{DOMAIN}{path}"]}
                if kind == "url-purge"
                else {"type": "tag", "tags": [f"t{number}"]}
            )
            call = ("POST", "/v1/purge", self.account_token, body)
        self.watch = watch
        await self.api(session, *call)
        returned = time.monotonic()
        deadline = returned + OP_TIMEOUT
        while len(watch.seen) < len(self.edges):
            if time.monotonic() > deadline:
                missing = sorted({e.name for e in self.edges} - set(watch.seen))
                raise BenchError(
                    f"{kind} #{number}: not enforced after {OP_TIMEOUT} s by {missing}"
                )
            await asyncio.sleep(0.0005)
        self.watch = None
        return max(0.0, max(watch.seen.values()) - returned) * 1000

    async def stop(self) -> None:
        for process in reversed(self.processes):
            await asyncio.to_thread(process.stop)


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> tuple[int, str]:
    """GET `path` of the benchmark's domain on a kept-alive connection: (status, body).
    ValueError if the answer is not what the edge sends (a status line, Content-Length)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    length = next(
        int(value)
        for name, _, value in (field.partition(":") for field in fields)
        if name.lower() == "content-length"
    )
    return int(status_line.split()[1]), (await reader.readexactly(length)).decode()


def _answers(port: int, path: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=1) as resp:
        return bool(resp.status == 200)


def _serves(port: int) -> bool:
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=1)
    try:
        conn.request("GET", "/obj/status", headers={"Host": DOMAIN})
        return conn.getresponse().status == 200
    finally:
        conn.close()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def report(
    results: list[tuple[str, float]],
    edges: int,
    cpu: tuple[dict[str, float], dict[str, float], dict[str, float]],
    results_file: Path,
) -> str:
    """`cpu`: by role, cores busy when idle and while the operations ran, and CPU seconds
    per operation."""
    latencies = [ms for _kind, ms in results]
    written = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "## Propagation (issue 4)",
        "",
        f"Written by `benchmarks/propagation.py` on {written}: "
        f"a control plane, {edges} edges (1 worker each) and an origin on 127.0.0.1; "
        f"{len(results)} operations; time from the API call returning until every edge answers "
        "the new way, seen by a client polling each edge.",
        "",
        "| operations | count | p50 ms | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    kinds = ["suspend", "resume", "url-purge", "tag-purge"]
    for name, values in [("all", latencies)] + [
        (kind, [ms for k, ms in results if k == kind]) for kind in kinds
    ]:
        lines.append(
            f"| {name} | {len(values)} | {statistics.median(values):.1f} | "
            f"{percentile(values, 0.99):.1f} | {max(values):.1f} |"
        )
    idle, busy, per_operation = cpu
    cores = os.cpu_count() or 1
    lines += [
        "",
        f"CPU ({cores} cores on this machine: what one role uses, the others queue behind): "
        f"cores busy on average with nothing to do ({IDLE_SECONDS:.0f} s) and while the "
        "operations ran, and CPU time per operation (polling and refetches included):",
        "",
        "| processes | idle cores | operating cores | ms per operation |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {role} | {idle[role]:.2f} | {use:.2f} | {per_operation[role] * 1000:.1f} |"
            for role, use in busy.items()
        ),
        f"| all | {sum(idle.values()):.2f} | {sum(busy.values()):.2f} | "
        f"{sum(per_operation.values()) * 1000:.1f} |",
    ]
    p99 = percentile(latencies, 0.99)
    verdict = "met" if p99 <= TARGET_P99_MS else "NOT met"
    lines += ["", f"Target p99 <= {TARGET_P99_MS:.0f} ms: {verdict} ({p99:.1f} ms)."]
    return write_section(results_file, "propagation", "\n".join(lines))


async def main_async(args: argparse.Namespace) -> int:
    bench = Bench(args.edges, args.operations)
    try:
        async with aiohttp.ClientSession() as session:
            await bench.start(session)
        results = await bench.run()
    finally:
        await bench.stop()
    cpu = (bench.idle_cpu_use, bench.cpu_use, bench.cpu_per_operation)
    print(report(results, args.edges, cpu, args.results))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=10)
    parser.add_argument("--operations", type=int, default=300)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--serve-origin", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_origin:  # the origin's own process (see Bench.start)
        web.run_app(Origin().app(), host=HOST, port=args.serve_origin, access_log=None)
        return 0
    reap_stale_groups()
    try:
        with exclusive_out_dir():
            return asyncio.run(main_async(args))
    except BenchError as e:
        print(f"propagation: error: {e}", file=sys.stderr)
        if e.detail:
            print(e.detail, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
