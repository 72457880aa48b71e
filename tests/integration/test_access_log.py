"""Access logs at a real edge (issue 6): one line per request whatever its fate, per domain and
hour and worker slot, rotation at the hour boundary by each line's time, and both answers to a
failing log disk (a real one: writes to /dev/full fail with ENOSPC)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from edge import logwriter
from edge.accesslog import AccessRecord, parse_line
from edge.config import parse_config
from edge.worker import EdgeWorker
from tests.integration.conftest import HOST, Origin
from tests.integration.edgetest import Clock, fixed, send_raw
from tests.rawhttp import RawResponse, read_response, request

H13 = 1_795_698_000.0  # 2026-11-26T13:00:00 UTC
HOUR13 = "2026-11-26T13"
HOUR14 = "2026-11-26T14"


StartEdge = Callable[..., Awaitable[EdgeWorker]]


@pytest.fixture
async def start_edge(tmp_path: Path) -> AsyncIterator[StartEdge]:
    workers: list[EdgeWorker] = []

    async def start(
        origin: str,
        *,
        slot: int = 0,
        clock: Callable[[], float] | None = None,
        logs: str = "",
        domain_extra: str = "",
    ) -> EdgeWorker:
        text = f"""
[edge]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
state_dir = "{tmp_path / "edge"}"
edge_id = "edge-t"

[logs]
{logs}

[[domains]]
name = "{HOST}"
origins = ["{origin}"]
{domain_extra}
"""
        kwargs = {"clock": clock} if clock is not None else {}
        worker = EdgeWorker(parse_config(text, "test.toml"), slot=slot, **kwargs)
        await worker.start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        await worker.stop(grace=1.0)


def log_dir(tmp_path: Path, domain: str = HOST) -> Path:
    return tmp_path / "edge" / "logs" / domain


def read_lines(path: Path) -> list[AccessRecord]:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return [parse_line(line) for line in data.splitlines(keepends=True)]


async def lines_of(worker: EdgeWorker, path: Path, count: int) -> list[AccessRecord]:
    """The lines of `path` once it holds `count` (an aborted exchange ends a little later)."""
    assert worker.access_log is not None
    for _ in range(200):
        await worker.access_log.flush()
        if path.exists() and len(records := read_lines(path)) >= count:
            assert len(records) == count, records
            return records
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path}: not {count} lines")


async def get(worker: EdgeWorker, target: str, headers: dict[str, str] | None = None,
              method: str = "GET", host: str = HOST) -> RawResponse:  # fmt: skip
    return await request(worker.port, target, host, method, headers)


async def admin_get(worker: EdgeWorker, path: str) -> RawResponse:
    reader, writer = await asyncio.open_connection("127.0.0.1", worker.admin_port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
        return await read_response(reader)
    finally:
        writer.close()


def wire_size(resp: RawResponse) -> int:
    return len(resp.raw_head) + len(resp.body)


async def test_each_request_gives_one_line_with_its_fields(
    start_edge: StartEdge, make_origin: Callable[..., Awaitable[Origin]], tmp_path: Path
) -> None:
    body = bytes(range(256)) * 40

    async def created(req: web.Request) -> web.Response:
        await req.read()
        return web.Response(status=201, text="made\n")

    origin = await make_origin({
        "/a": fixed(b"hello\n", {"Cache-Control": "max-age=60", "Content-Type": "text/x-a"}),
        "/big": fixed(body, {"Cache-Control": "max-age=60", "Content-Type": "application/x-b"}),
        "/p": created,
    })  # fmt: skip
    clock = Clock(H13 + 60)
    edge = await start_edge(origin.url, clock=clock)
    miss = await get(edge, "/a?x=1", {"Referer": "http://r.example/", "User-Agent": "ua/1"})
    hit = await get(edge, "/a?x=1")
    passed = await get(edge, "/p", method="POST", headers={"Content-Length": "0"})
    ranged = await get(edge, "/big", {"Range": "bytes=10-19"})
    hostile = await send_raw(
        edge.port,
        b"GET /a?q=%22 HTTP/1.1\r\nHost: " + HOST.encode()
        + b"\r\nUser-Agent: \"evil\" \\ \xff\xfe caf\xc3\xa9\r\nReferer: x\x80y\r\n\r\n",
    )  # fmt: skip
    assert [r.status for r in (miss, hit, passed, ranged, hostile)] == [200, 200, 201, 206, 200]
    records = await lines_of(edge, log_dir(tmp_path) / f"{HOUR13}.0.jsonl", 5)
    first, second, third, fourth, fifth = records
    assert first.time.timestamp() == pytest.approx(H13 + 60, abs=0.001)
    assert (first.edge, first.client_ip, first.domain, first.method, first.url) == (
        "edge-t", "127.0.0.1", HOST.encode(), b"GET", b"/a?x=1",
    )  # fmt: skip
    assert (first.protocol, first.status, first.cache, first.content_type) == (
        "HTTP/1.1", 200, "uri-miss", b"text/x-a",
    )  # fmt: skip
    assert (first.bytes_sent, first.body_bytes) == (wire_size(miss), 6)
    assert (first.referer, first.user_agent, first.range) == (b"http://r.example/", b"ua/1", None)
    assert first.origin_status == 200 and first.origin_ms is not None
    assert first.ttfb_ms is not None and 0 <= first.ttfb_ms <= first.request_ms
    assert (second.cache, second.origin_status, second.origin_ms) == ("hit", None, None)
    assert (second.bytes_sent, second.referer) == (wire_size(hit), None)
    assert (third.method, third.status, third.cache, third.origin_status) == (
        b"POST", 201, "method", 201,
    )  # fmt: skip
    assert (fourth.status, fourth.range, fourth.body_bytes) == (206, b"bytes=10-19", 10)
    assert fourth.bytes_sent == wire_size(ranged) and fourth.content_type == b"application/x-b"
    assert fifth.user_agent == b'"evil" \\ \xff\xfe caf\xc3\xa9'
    assert (fifth.referer, fifth.url, fifth.cache) == (b"x\x80y", b"/a?q=%22", "uri-miss")


async def test_a_signed_url_is_logged_as_the_client_sent_it(
    start_edge: StartEdge, make_origin: Callable[..., Awaitable[Origin]], tmp_path: Path
) -> None:
    """The origin gets the URL without its signature (type A); the log keeps the URL as
    received, signature included, and refusals too."""
    origin = await make_origin({"/a": fixed(b"hello\n", {"Cache-Control": "max-age=60"})})
    signed = '[domains.access.signed_url]\ntype = "A"\nkey = "k3y"\n'
    edge = await start_edge(origin.url, clock=Clock(H13 + 5), domain_extra=signed)
    stamp = int(time.time())
    digest = hashlib.md5(f"/a-{stamp}-0-0-k3y".encode()).hexdigest()
    target = f"/a?x=1&auth_key={stamp}-0-0-{digest}"
    assert (await get(edge, target)).status == 200
    assert (await get(edge, "/a?x=1&auth_key=1-0-0-0")).status == 403
    assert [r.path_qs for r in origin.requests] == ["/a?x=1"]
    records = await lines_of(edge, log_dir(tmp_path) / f"{HOUR13}.0.jsonl", 2)
    assert [(r.status, r.url) for r in records] == [
        (200, target.encode()),
        (403, b"/a?x=1&auth_key=1-0-0-0"),
    ]


async def test_refusals_and_unknown_hosts_go_to_underscore(
    start_edge: StartEdge, make_origin: Callable[..., Awaitable[Origin]], tmp_path: Path
) -> None:
    origin = await make_origin({})
    edge = await start_edge(origin.url, clock=Clock(H13 + 1))
    unknown = await get(edge, "/x", host="nobody.example:8080")
    malformed = await send_raw(edge.port, b'GET /\xff"bad HTTP/1.1\r\nHost: h\r\n\r\n')
    assert (unknown.status, malformed.status) == (404, 400)
    records = await lines_of(edge, log_dir(tmp_path, "_") / f"{HOUR13}.0.jsonl", 2)
    assert [(r.status, r.cache, r.domain, r.url) for r in records] == [
        (404, "refused", b"nobody.example:8080", b"/x"),
        (400, "refused", None, b'/\xff"bad'),
    ]
    assert records[1].bytes_sent == wire_size(malformed) and records[1].protocol == "HTTP/1.1"
    assert not log_dir(tmp_path).exists()  # nothing in the customer's directory


async def test_suspended_and_blocked_refusals_are_logged_under_their_domain(
    make_origin: Callable[..., Awaitable[Origin]], tmp_path: Path
) -> None:
    origin = await make_origin({"/ok": fixed(b"ok")})
    text = f"""
[edge]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
state_dir = "{tmp_path / "edge"}"

[[domains]]
name = "file-only.test"
origins = ["{origin.url}"]
"""
    other = "other.example.test"
    state = {
        "version": 1,
        "domains": [
            {"name": HOST, "state": "active", "reason": "", "config": {"origins": [origin.url]}},
            {"name": other, "state": "suspended", "reason": "unpaid",
             "config": {"origins": [origin.url]}},
        ],
        "blocks": [{"domain": HOST, "pattern": "/court.html", "reason": "order 12"}],
    }  # fmt: skip
    edge = EdgeWorker(parse_config(text, "t.toml"), control_state=state, clock=Clock(H13 + 9))
    await edge.start()
    try:
        assert (await get(edge, "/court.html")).status == 451
        assert (await get(edge, "/x", host=other)).status == 403
        (blocked,) = await lines_of(edge, log_dir(tmp_path) / f"{HOUR13}.0.jsonl", 1)
        (suspended,) = await lines_of(edge, log_dir(tmp_path, other) / f"{HOUR13}.0.jsonl", 1)
    finally:
        await edge.stop(grace=1.0)
    assert (blocked.status, blocked.cache, blocked.url) == (451, "refused", b"/court.html")
    assert (suspended.status, suspended.domain, suspended.origin_status) == (
        403, other.encode(), None,
    )  # fmt: skip


async def test_a_client_that_goes_away_mid_body_is_logged_once(
    start_edge: StartEdge, make_origin: Callable[..., Awaitable[Origin]], tmp_path: Path
) -> None:
    async def slow(req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(10 << 20)})
        await resp.prepare(req)
        for _ in range(160):
            await resp.write(b"x" * 65536)
            await asyncio.sleep(0.05)
        return resp

    origin = await make_origin({"/slow": slow})
    edge = await start_edge(origin.url, clock=Clock(H13 + 5))
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    writer.write(f"GET /slow HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(1000)
    writer.transport.abort()
    (record,) = await lines_of(edge, log_dir(tmp_path) / f"{HOUR13}.0.jsonl", 1)
    assert (record.status, record.url, record.origin_status) == (200, b"/slow", 200)
    assert 1000 <= record.body_bytes < 10 << 20


async def test_a_client_that_goes_away_mid_upload_is_logged_once(
    start_edge: StartEdge, make_origin: Callable[..., Awaitable[Origin]], tmp_path: Path
) -> None:
    async def upload(req: web.Request) -> web.Response:
        await req.read()
        return web.Response(text="stored\n")

    origin = await make_origin({"/up": upload})
    edge = await start_edge(origin.url, clock=Clock(H13 + 5))
    _reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    writer.write(
        f"PUT /up HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 100000\r\n\r\n".encode()
        + b"x" * 1000
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.transport.abort()
    (record,) = await lines_of(edge, log_dir(tmp_path) / f"{HOUR13}.0.jsonl", 1)
    assert (record.method, record.url, record.cache) == (b"PUT", b"/up", "error")
    # The origin was asked but never answered: the body it was streamed never completed.
    assert (record.status, record.origin_status) == (502, None) and record.origin_ms is not None


async def test_two_workers_write_their_own_slot_files(
    start_edge: StartEdge, make_origin: Callable[..., Awaitable[Origin]], tmp_path: Path
) -> None:
    origin = await make_origin({"/a": fixed(b"a", {"Cache-Control": "max-age=60"})})
    clock = Clock(H13 + 100)
    zero = await start_edge(origin.url, slot=0, clock=clock)
    one = await start_edge(origin.url, slot=1, clock=clock)
    for n in range(7):
        await get(zero, f"/a?n={n}")
    for n in range(5):
        await get(one, f"/a?m={n}")
    a = await lines_of(zero, log_dir(tmp_path) / f"{HOUR13}.0.jsonl", 7)
    b = await lines_of(one, log_dir(tmp_path) / f"{HOUR13}.1.jsonl", 5)
    assert sorted(r.url for r in a + b) == sorted(
        [f"/a?n={n}".encode() for n in range(7)] + [f"/a?m={n}".encode() for n in range(5)]
    )


async def test_rotation_at_the_hour_boundary(
    start_edge: StartEdge, make_origin: Callable[..., Awaitable[Origin]], tmp_path: Path
) -> None:
    origin = await make_origin({"/a": fixed(b"a", {"Cache-Control": "max-age=60"})})
    clock = Clock(H13 + 3600 - 0.5)
    edge = await start_edge(origin.url, clock=clock)
    for n in range(3):
        await get(edge, f"/a?before={n}")
    clock.now = H13 + 3600  # 14:00:00.000: the next lines are the next hour's
    for n in range(4):
        await get(edge, f"/a?after={n}")
    after = await lines_of(edge, log_dir(tmp_path) / f"{HOUR14}.0.jsonl", 4)
    closed = log_dir(tmp_path) / f"{HOUR13}.0.jsonl.gz"
    assert closed.exists() and not (log_dir(tmp_path) / f"{HOUR13}.0.jsonl").exists()
    before = read_lines(closed)
    assert [r.url for r in before] == [f"/a?before={n}".encode() for n in range(3)]
    assert [r.url for r in after] == [f"/a?after={n}".encode() for n in range(4)]
    assert all(r.time.strftime("%Y-%m-%dT%H") == HOUR13 for r in before)
    assert all(r.time.strftime("%Y-%m-%dT%H") == HOUR14 for r in after)


async def test_logging_disabled_writes_nothing(
    start_edge: StartEdge, make_origin: Callable[..., Awaitable[Origin]], tmp_path: Path
) -> None:
    origin = await make_origin({"/a": fixed(b"a")})
    edge = await start_edge(origin.url, logs="enabled = false")
    assert edge.access_log is None and edge.server.access_log is None
    assert (await get(edge, "/a")).status == 200
    assert not (tmp_path / "edge" / "logs").exists()


async def wait_until(check: Callable[[], bool]) -> None:
    for _ in range(300):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met")


async def test_full_disk_with_serve_keeps_serving_and_counts_lost_lines(
    start_edge: StartEdge,
    make_origin: Callable[..., Awaitable[Origin]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logwriter, "MAX_PENDING_LINES", 2)
    origin = await make_origin({"/a": fixed(b"a", {"Cache-Control": "max-age=60"})})
    edge = await start_edge(origin.url, clock=Clock(H13 + 10))
    hour_file = log_dir(tmp_path) / f"{HOUR13}.0.jsonl"
    hour_file.parent.mkdir(parents=True)
    hour_file.symlink_to("/dev/full")
    for n in range(5):
        assert (await get(edge, f"/a?{n}")).status == 200
    await wait_until(lambda: edge.stats.log_lines_lost == 3)
    ready = await admin_get(edge, "/readyz")
    assert ready.status == 200  # "serve": traffic first
    assert b"access log failing in 1 worker(s), serving on; 3 lines lost" in ready.body
    metrics = (await admin_get(edge, "/metrics")).body.decode()
    assert "cdn_edge_log_lines_lost_total 3.0" in metrics
    assert "cdn_edge_log_writers_failing 1.0" in metrics
    hour_file.unlink()  # the disk works again: the two lines kept are written
    await wait_until(lambda: not edge.stats.log_failure)
    records = await lines_of(edge, hour_file, 2)
    assert [r.url for r in records] == [b"/a?3", b"/a?4"]
    ready = await admin_get(edge, "/readyz")
    assert ready.status == 200 and b"access log writing; 3 lines lost since start" in ready.body


async def test_full_disk_with_refuse_answers_503_until_it_recovers(
    start_edge: StartEdge, make_origin: Callable[..., Awaitable[Origin]], tmp_path: Path
) -> None:
    origin = await make_origin({"/a": fixed(b"a", {"Cache-Control": "max-age=60"})})
    edge = await start_edge(origin.url, clock=Clock(H13 + 10), logs='on_log_failure = "refuse"')
    hour_file = log_dir(tmp_path) / f"{HOUR13}.0.jsonl"
    hour_file.parent.mkdir(parents=True)
    hour_file.symlink_to("/dev/full")
    assert (await get(edge, "/a?first")).status == 200  # the failure is not known yet
    await wait_until(lambda: bool(edge.stats.log_failure))
    refused = await get(edge, "/a?second")
    assert (refused.status, refused.body) == (503, b"access log unavailable\n")
    assert refused.header("retry-after") == "10"
    ready = await admin_get(edge, "/readyz")
    assert ready.status == 503 and b"refusing requests" in ready.body
    hour_file.unlink()
    await wait_until(lambda: not edge.stats.log_failure)
    assert (await get(edge, "/a?third")).status == 200
    assert (await admin_get(edge, "/readyz")).status == 200
    records = await lines_of(edge, hour_file, 3)  # nothing was lost: kept, then written
    assert [(r.url, r.status) for r in records[:2]] == [(b"/a?first", 200), (b"/a?second", 503)]
    assert (records[1].cache, records[2].url) == ("refused", b"/a?third")


# --- under the supervisor: real worker processes ------------------------------------------


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_supervised_workers_log_every_request_in_their_slot_files(
    make_origin: Callable[..., Awaitable[Origin]], tmp_path: Path
) -> None:
    from tests.integration.test_supervisor import ROUTES, EdgeProcess

    origin = await make_origin(ROUTES)
    process = EdgeProcess(tmp_path, origin, workers=2, loop="uvloop")
    hour = time.strftime("%Y-%m-%dT%H", time.gmtime())
    if time.time() % 3600 > 3590:  # not across an hour boundary: this test reads one hour
        await asyncio.sleep(3600 - time.time() % 3600 + 0.5)
        hour = time.strftime("%Y-%m-%dT%H", time.gmtime())
    directory = process.state / "logs" / HOST
    directory.mkdir(parents=True)
    # Slot 1's disk is full: /readyz says so (and stays 200: "serve").
    (directory / f"{hour}.1.jsonl").symlink_to("/dev/full")
    await process.start()
    try:
        for n in range(40):  # a connection each: the kernel spreads them over both workers
            assert (await process.get(f"/obj?n={n}")).status == 200

        async def failing() -> bool:
            return b"access log failing in 1 worker(s)" in (await process.admin("/readyz")).body

        await process.until(failing, "/readyz never said the log fails")
        ready = await process.admin("/readyz")
        assert ready.status == 200, ready.body
        metrics = await process.metrics()
        assert metrics["cdn_edge_log_writers_failing"] == 1
        assert metrics["cdn_edge_log_files_pending"] == 0
        (directory / f"{hour}.1.jsonl").unlink()  # the disk works again

        async def recovered() -> bool:
            return (await process.metrics())["cdn_edge_log_writers_failing"] == 0

        await process.until(recovered, "the log never recovered")
    finally:
        assert await process.stop() == 0  # a graceful stop writes every line
    zero = read_lines(directory / f"{hour}.0.jsonl")
    one = read_lines(directory / f"{hour}.1.jsonl")
    assert zero and one
    assert sorted(r.url for r in zero + one) == sorted(f"/obj?n={n}".encode() for n in range(40))


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_reload_under_traffic_logs_every_request_once(
    make_origin: Callable[..., Awaitable[Origin]], tmp_path: Path
) -> None:
    """Old and new generation share the slot's file for a moment (edge.logwriter: flock)."""
    from tests.integration.test_supervisor import ROUTES, EdgeProcess

    origin = await make_origin(ROUTES)
    process = EdgeProcess(tmp_path, origin, workers=1, loop="uvloop")
    if time.time() % 3600 > 3580:  # not across an hour boundary: this test reads one hour
        await asyncio.sleep(3600 - time.time() % 3600 + 0.5)
    hour = time.strftime("%Y-%m-%dT%H", time.gmtime())
    await process.start()
    sent = 0
    done = asyncio.Event()

    async def client() -> None:
        nonlocal sent
        while not done.is_set():
            resp = await process.get(f"/obj?n={sent}")
            assert resp.status == 200
            sent += 1

    task = asyncio.create_task(client())
    try:
        await asyncio.sleep(0.3)
        process.write_config("[logs]\nkeep_days = 3\n")  # the shipper restarts too
        process.signal(signal.SIGHUP)
        await process.until_logged("reloaded: generation 2")
        await process.until_logged("of generation 1 exited with code 0")
        await asyncio.sleep(0.3)
        assert (await process.metrics())["cdn_edge_log_files_pending"] == 0
    finally:
        done.set()
        await task
        assert await process.stop() == 0
    records = read_lines(process.state / "logs" / HOST / f"{hour}.0.jsonl")
    assert sorted(r.url for r in records) == sorted(f"/obj?n={n}".encode() for n in range(sent))
