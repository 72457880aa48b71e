"""`cdn edge` as operators run it: a real supervisor process with real worker processes.

Each test starts `.venv/bin/cdn edge --config FILE` on free loopback ports, in front of an
aiohttp origin running in the test process, and talks to it over sockets and signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from edge.config import CacheSettings
from edge.metrics import EdgeStats, merge_snapshots, worker_snapshot
from edge.store import MemoryTier
from edge.supervisor import backoff
from edge.tiers import Tiers
from tests.integration.conftest import Origin
from tests.rawhttp import RawResponse, request

# The edge under test runs its own event loops (its --loop); the test's loop only drives clients.
on_one_loop = pytest.mark.asyncio(loop_factories=["uvloop"])

HOST = "www.example.test"
NEW_HOST = "new.example.test"
BODY = b"cached body\n" * 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cdn_command() -> list[str]:
    script = Path(sys.executable).with_name("cdn")
    return [str(script)] if script.exists() else [sys.executable, "-m", "edge.cli"]


def config_text(
    origin: str, *, state: Path, port: int, admin_port: int, workers: int, extra: str = ""
) -> str:
    return f"""
[edge]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
workers = {workers}
state_dir = "{state}"

[[domains]]
name = "{HOST}"
origins = ["{origin}"]
{extra}
"""


class EdgeProcess:
    """A `cdn edge` supervisor process; its stderr goes to a file the test can search."""

    def __init__(self, tmp: Path, origin: Origin, *, workers: int, loop: str) -> None:
        self.origin_server = origin
        self.origin = origin.url
        self.workers = workers
        self.loop = loop
        self.port = free_port()
        self.admin_port = free_port()
        self.config = tmp / "edge.toml"
        self.state = tmp / "state"
        self.log = tmp / "edge.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.write_config()

    def write_config(self, extra: str = "", *, port: int | None = None) -> None:
        self.config.write_text(
            config_text(
                self.origin,
                state=self.state,
                port=self.port if port is None else port,
                admin_port=self.admin_port,
                workers=self.workers,
                extra=extra,
            )
        )

    async def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *cdn_command(), "--loop", self.loop, "edge", "--config", str(self.config),
                "--drain-timeout", "5",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        await self.until(self.is_ready, "the edge never became ready")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def worker_pids(self) -> set[int]:
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        return {int(pid) for pid in children.split()}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    async def get(self, target: str = "/obj", host: str = HOST) -> RawResponse:
        return await request(self.port, target, host)

    async def admin(self, target: str) -> RawResponse:
        return await request(self.admin_port, target, "admin")

    async def is_ready(self) -> bool:
        try:
            return (await self.admin("/readyz")).status == 200
        except (ConnectionError, asyncio.IncompleteReadError):
            return False

    async def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in (await self.admin("/metrics")).body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    async def until(
        self, check: Callable[[], Awaitable[bool]], failure: str, timeout: float = 15.0
    ) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            if self.proc is not None and self.proc.returncode is not None:
                pytest.fail(f"{failure}: exited {self.proc.returncode}\n{self.log_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{failure}\n{self.log_text()}")
            await asyncio.sleep(0.05)

    async def until_logged(self, text: str, timeout: float = 15.0) -> None:
        async def logged() -> bool:
            return text in self.log_text()

        await self.until(logged, f"never logged {text!r}", timeout)

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), 20)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            pytest.fail(f"the edge did not stop on SIGTERM\n{self.log_text()}")


def total(metrics: dict[str, float], name: str) -> float:
    """The sum of a metric over its label values."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


async def slow(req: web.Request) -> web.StreamResponse:
    await asyncio.sleep(1.5)
    return web.Response(body=b"slow body\n" * 1000, headers={"Cache-Control": "no-store"})


async def obj(req: web.Request) -> web.StreamResponse:
    return web.Response(body=BODY, headers={"Cache-Control": "max-age=60"})


async def fresh(req: web.Request) -> web.StreamResponse:
    return web.Response(body=b"not stored\n", headers={"Cache-Control": "no-store"})


DOC_VERSION = {"n": 1}


async def doc(req: web.Request) -> web.StreamResponse:
    """A resource a DELETE changes (the next version)."""
    if req.method == "DELETE":
        DOC_VERSION["n"] += 1
        return web.Response(status=204)
    body = f"version {DOC_VERSION['n']}".encode()
    return web.Response(body=body, headers={"Cache-Control": "max-age=600"})


ROUTES = {"/obj": obj, "/slow": slow, "/fresh": fresh, "/doc": doc}

EdgeFactory = Callable[..., Awaitable[EdgeProcess]]


@pytest.fixture
async def edge(make_origin, tmp_path: Path) -> AsyncIterator[EdgeFactory]:
    started: list[EdgeProcess] = []

    async def start(*, workers: int = 2, loop: str = "uvloop") -> EdgeProcess:
        origin: Origin = await make_origin(ROUTES)
        process = EdgeProcess(tmp_path, origin, workers=workers, loop=loop)
        started.append(process)
        await process.start()
        return process

    yield start
    for process in started:
        if process.proc is not None and process.proc.returncode is None:
            await process.stop()


@contextlib.asynccontextmanager
async def client_loop(edge: EdgeProcess, hosts: list[str]) -> AsyncIterator[list[str]]:
    """Clients requesting in a loop, a new connection each time; yields the failures seen."""
    failures: list[str] = []
    done = asyncio.Event()

    async def run(host: str) -> None:
        while not done.is_set():
            try:
                resp = await edge.get("/obj", host)
                if resp.status != 200 or resp.body != BODY:
                    failures.append(f"{host}: {resp.status} {resp.body[:80]!r}")
            except (OSError, asyncio.IncompleteReadError) as exc:
                failures.append(f"{host}: {exc!r}")

    tasks = [asyncio.create_task(run(host)) for host in hosts]
    try:
        yield failures
    finally:
        done.set()
        await asyncio.gather(*tasks)


# --- pieces -----------------------------------------------------------------------------------


def test_snapshots_add_up_and_exited_workers_keep_only_their_counters() -> None:
    a, b = EdgeStats(), EdgeStats()
    a.account("hit", 200, 100, 80)
    b.account("hit", 200, 10, 8)
    b.account("miss", 502, 5, 0)
    b.origin_errors["connect"] += 1
    tiers = Tiers(MemoryTier(1000), CacheSettings(memory=1000, disk=0), "unused")
    merged = merge_snapshots([worker_snapshot(a, tiers), worker_snapshot(b, tiers)])
    assert merged["counters"]["requests"] == {"hit": 2, "miss": 1}
    assert merged["counters"]["status_classes"] == {"2xx": 2, "5xx": 1}
    assert merged["counters"]["bytes_sent"] == 115
    assert merged["counters"]["origin_errors"] == {"connect": 1}
    assert merged["gauges"]["memory_tier_budget_bytes"] == 2000
    retired = merge_snapshots([worker_snapshot(a, tiers)], counters_only=True)
    assert retired["gauges"] == {}
    assert retired["counters"]["requests"] == {"hit": 1}
    # A snapshot is plain JSON: it crosses the control socket unchanged.
    assert json.loads(json.dumps(merged)) == merged


def test_restart_backoff_grows_and_is_bounded() -> None:
    assert [backoff(n) for n in range(6)] == [0.0, 0.0, 0.5, 1.0, 2.0, 4.0]
    assert backoff(100) == 30.0


# --- start-up ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workers", "extra", "message"),
    [
        (2, "garbage = 1\n", "domains[0].garbage: unknown key"),
        (2, "[edge]\n", "(toml): "),
        (0, "", "edge.workers: 0 is less than 1"),
    ],
)
@on_one_loop
async def test_bad_config_exits_2_with_one_line(
    tmp_path: Path, workers: int, extra: str, message: str
) -> None:
    config = tmp_path / "edge.toml"
    config.write_text(
        config_text(
            "http://127.0.0.1:1",
            state=tmp_path,
            port=free_port(),
            admin_port=free_port(),
            workers=workers,
        )
        + extra
    )
    proc = await asyncio.create_subprocess_exec(
        *cdn_command(), "edge", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert out == b""
    lines = err.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"cdn: {config}: {message}"), lines


@on_one_loop
async def test_an_address_in_use_is_refused_even_with_so_reuseport(tmp_path: Path) -> None:
    """SO_REUSEPORT must not let a second edge (or anything) quietly share the port."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        config = tmp_path / "edge.toml"
        config.write_text(
            config_text(
                "http://127.0.0.1:1",
                state=tmp_path,
                port=port,
                admin_port=free_port(),
                workers=2,
            )
        )
        proc = await asyncio.create_subprocess_exec(
            *cdn_command(), "edge", "--config", str(config), stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err.decode()
    assert "edge.worker" not in err.decode()


# --- serving ----------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@on_one_loop
async def test_requests_spread_over_workers_and_metrics_add_up(
    edge: EdgeFactory, loop: str
) -> None:
    e = await edge(workers=2, loop=loop)
    assert len(e.worker_pids()) == 2
    assert (await e.admin("/healthz")).status == 200
    assert (await e.admin("/readyz")).status == 200
    k = 60
    for i in range(k):
        resp = await e.get("/obj" if i % 2 else "/fresh")
        assert resp.status == 200
    m = await e.metrics()
    # Every request counted exactly once, whichever worker answered it.
    assert total(m, "cdn_edge_requests_total") == k
    assert total(m, "cdn_edge_responses_total") == k
    assert m['cdn_edge_responses_total{code="2xx"}'] == k
    # Both workers served (the kernel spread the connections over their sockets) ...
    per_worker = {w: m.get(f'cdn_edge_worker_requests{{worker="{w}"}}', 0) for w in ("0", "1")}
    assert per_worker["0"] > 0 and per_worker["1"] > 0, per_worker
    assert sum(per_worker.values()) == k
    # ... and each has its own memory tier: gauges add up too.
    assert m["cdn_edge_memory_tier_budget_bytes"] == 2 * 256 * 2**20
    assert m["cdn_edge_workers"] == 2
    assert m["cdn_edge_workers_configured"] == 2
    assert m["cdn_edge_worker_restarts_total"] == 0
    # Scrapes do not count as requests, and counters hold still between scrapes.
    assert total(await e.metrics(), "cdn_edge_requests_total") == k


@on_one_loop
async def test_killed_worker_is_restarted_and_service_continues(edge: EdgeFactory) -> None:
    e = await edge(workers=2)
    before = e.worker_pids()
    for _ in range(10):
        assert (await e.get()).status == 200
    assert total(await e.metrics(), "cdn_edge_requests_total") == 10
    victim = min(before)
    async with client_loop(e, [HOST, HOST]) as failures:
        os.kill(victim, signal.SIGKILL)

        async def not_ready() -> bool:
            return not await e.is_ready()

        await e.until(not_ready, "/readyz stayed 200 with a worker down", timeout=5)
        await e.until(e.is_ready, "the killed worker was not replaced")
        await asyncio.sleep(0.3)
    # Connections the kernel queued for the dead worker's socket waited for its successor.
    assert failures == []
    after = e.worker_pids()
    assert len(after) == 2 and victim not in after and (before - {victim}) <= after
    await e.until_logged(f"(pid {victim}) was killed by SIGKILL (exit code -9); restarting it")
    m = await e.metrics()
    assert m["cdn_edge_worker_restarts_total"] == 1
    assert m["cdn_edge_workers"] == 2
    # What the dead worker had counted (as of the last scrape) is still in the totals.
    assert total(m, "cdn_edge_requests_total") >= 10


@on_one_loop
async def test_sigterm_drains_in_flight_response_then_exits_0(edge: EdgeFactory) -> None:
    e = await edge(workers=2)
    origin = e.origin_server
    in_flight = asyncio.create_task(e.get("/slow"))

    async def fetching() -> bool:
        return origin.hits.get("/slow", 0) == 1

    await e.until(fetching, "the slow request never reached the origin")
    started = time.monotonic()
    e.signal(signal.SIGTERM)
    resp = await asyncio.wait_for(in_flight, 10)
    assert resp.status == 200
    assert resp.body == b"slow body\n" * 1000
    assert await asyncio.wait_for(e.stop(), 10) == 0
    assert time.monotonic() - started < 5
    log = e.log_text()
    assert "stopping: workers drain" in log
    assert log.count("exited with code 0") == 2, log
    assert "Traceback" not in log


# --- reload -----------------------------------------------------------------------------------


@on_one_loop
async def test_sighup_adds_a_domain_without_failing_a_request(edge: EdgeFactory) -> None:
    e = await edge(workers=2)
    assert (await e.get(host=NEW_HOST)).status == 404
    old_workers = e.worker_pids()
    e.write_config(f'[[domains]]\nname = "{NEW_HOST}"\norigins = ["{e.origin}"]\n')
    async with client_loop(e, [HOST, HOST, HOST]) as failures:
        await asyncio.sleep(0.2)
        e.signal(signal.SIGHUP)

        async def new_domain_served() -> bool:
            return (await e.get(host=NEW_HOST)).status == 200

        await e.until(new_domain_served, "the new domain was never served")
        await e.until_logged("of generation 1 exited with code 0")
        await asyncio.sleep(0.2)
    assert failures == []
    assert e.worker_pids().isdisjoint(old_workers)
    assert "reloaded: generation 2 serving 2 domains with 2 workers" in e.log_text()
    m = await e.metrics()
    assert m['cdn_edge_config_reloads_total{result="applied"}'] == 1
    assert m["cdn_edge_workers"] == 2
    assert m["cdn_edge_worker_restarts_total"] == 0
    # The old generation's counts survive it: every 200 the clients saw is in the total.
    assert total(m, "cdn_edge_requests_total") >= m['cdn_edge_responses_total{code="2xx"}'] > 0


@on_one_loop
async def test_sighup_with_a_broken_config_keeps_the_running_one(edge: EdgeFactory) -> None:
    e = await edge(workers=2)
    workers = e.worker_pids()
    e.config.write_text(e.config.read_text() + "ttl = 'soon'\n")
    e.signal(signal.SIGHUP)
    await e.until_logged(
        f"reload refused, keeping the running config: {e.config}: domains[0].ttl: unknown key"
    )
    assert (await e.get()).status == 200
    assert e.worker_pids() == workers
    assert (await e.admin("/readyz")).status == 200
    m = await e.metrics()
    assert m['cdn_edge_config_reloads_total{result="refused"}'] == 1
    assert m['cdn_edge_config_reloads_total{result="applied"}'] == 0

    # A valid config that moves `listen`: the rest applies, the address needs a restart.
    e.write_config(port=free_port())
    e.signal(signal.SIGHUP)
    await e.until_logged("reloaded: generation 2")
    assert "edge.listen changed from 127.0.0.1:" in e.log_text()
    assert "which needs a restart; still on 127.0.0.1:" in e.log_text()
    assert (await e.get()).status == 200


@on_one_loop
async def test_a_write_through_one_worker_invalidates_them_all(edge: EdgeFactory) -> None:
    """RFC 9111 4.4 for the host: a DELETE answered by one worker drops the stored response
    in every worker's memory, not just its own."""
    DOC_VERSION["n"] = 1
    e = await edge(workers=2)
    for _ in range(30):  # new connections: both workers answer, and each keeps a copy
        assert (await e.get("/doc")).body == b"version 1"
    m = await e.metrics()
    assert all(m.get(f'cdn_edge_worker_requests{{worker="{w}"}}', 0) > 0 for w in "01")
    assert (await request(e.port, "/doc", HOST, method="DELETE")).status == 204
    await asyncio.sleep(0.2)  # the supervisor relays it to the other worker
    for _ in range(30):
        assert (await e.get("/doc")).body == b"version 2"
