"""Closed access-log hours shipped to a real HTTP stand-in of the control plane's
PUT /v1/edge/logs/{domain}/{hour}/{piece} (the contract of control/README.md): checksummed,
moved aside once acknowledged, nothing lost while the control plane is down, every answer
handled as agreed, and local deletion by age (issue 6)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from edge.config import ControlSettings, LogSettings
from edge.logship import LOGS_PATH, LogShipper
from edge.logwriter import ORPHAN_AFTER
from tests.integration.edgetest import Clock
from tests.integration.test_supervisor import free_port, on_one_loop

# What is tested is the shipper's protocol with the control plane (what is sent, kept, retried,
# set aside), not the event loop's transports: one loop, uvloop, as `cdn edge` runs by default.
pytestmark = on_one_loop

TOKEN = "edge-token-123"
H13 = 1_795_698_000.0  # 2026-11-26T13:00:00 UTC
DAY = 86400
FAST: dict[str, Any] = {"interval": 0.05, "backoff_first": 0.02, "backoff_max": 0.1}
_HOUR = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}")
_PIECE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DIGEST = re.compile(r"sha-256=:([A-Za-z0-9+/=]+):")


class ControlPlane:
    """The control plane's side of the upload, as the contract says (stored by (domain, hour,
    piece); a repeat with the same digest is 200, with another 409), plus knobs to fail."""

    def __init__(self, port: int, max_upload: int = 1 << 20) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.max_upload = max_upload
        self.stored: dict[tuple[str, str, str], tuple[str, bytes]] = {}
        self.puts: Counter[tuple[str, str, str]] = Counter()
        self.status = 0  # when set, answered instead of storing
        self.damage = 0  # this many next bodies arrive damaged (one byte flipped)
        self._runner: web.AppRunner | None = None

    async def up(self) -> None:
        app = web.Application(client_max_size=self.max_upload * 2)
        app.router.add_put(LOGS_PATH + "/{domain}/{hour}/{piece}", self._put)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def down(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _put(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.Response(status=401)
        domain, hour, piece = (request.match_info[k] for k in ("domain", "hour", "piece"))
        key = (domain, hour, piece)
        self.puts[key] += 1
        if self.status:
            return web.Response(status=self.status)
        if not _HOUR.fullmatch(hour) or not _PIECE.fullmatch(piece):
            return web.Response(status=400, text="bad hour or piece")
        if request.content_type != "application/gzip" or request.content_length is None:
            return web.Response(status=400, text="gzip with a length expected")
        if request.content_length > self.max_upload:
            return web.Response(status=413)
        match = _DIGEST.fullmatch(request.headers.get("Content-Digest", ""))
        if match is None:
            return web.Response(status=400, text="digest missing")
        hasher, chunks = hashlib.sha256(), []
        async for chunk in request.content.iter_chunked(1 << 16):  # streamed
            if self.damage:
                self.damage -= 1
                chunk = bytes([chunk[0] ^ 1]) + chunk[1:]
            hasher.update(chunk)
            chunks.append(chunk)
        digest = base64.b64encode(hasher.digest()).decode()
        if digest != match[1]:
            return web.Response(status=400, text="digest mismatch")
        before = self.stored.get(key)
        if before is not None:
            return web.Response(status=200 if before[0] == digest else 409)
        self.stored[key] = (digest, b"".join(chunks))
        return web.Response(status=201)


@pytest.fixture
async def control() -> AsyncIterator[ControlPlane]:
    plane = ControlPlane(free_port())
    yield plane
    await plane.down()


@pytest.fixture
async def shippers() -> AsyncIterator[Callable[..., LogShipper]]:
    started: list[LogShipper] = []

    def start(root: Path, url: str | None, **kwargs: Any) -> LogShipper:
        logs = kwargs.pop("logs", LogSettings())
        control = ControlSettings(url=url, token=TOKEN) if url is not None else None
        shipper = LogShipper(root, logs, control, **{**FAST, **kwargs})
        shipper.start()
        started.append(shipper)
        return shipper

    yield start
    for shipper in started:
        await shipper.stop()


def closed(root: Path, domain: str, name: str, lines: int = 3) -> bytes:
    data = gzip.compress(
        b"".join(b'{"n":%d,"name":"%s"}\n' % (n, name.encode()) for n in range(lines))
    )
    (root / domain).mkdir(parents=True, exist_ok=True)
    (root / domain / name).write_bytes(data)
    return data


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_control_plane_down_then_up_loses_nothing(
    tmp_path: Path, control: ControlPlane, shippers: Callable[..., LogShipper]
) -> None:
    root = tmp_path / "logs"
    files = {
        ("a.example.com", "2026-11-26T12", "w0"): closed(root, "a.example.com",
                                                         "2026-11-26T12.0.jsonl.gz"),
        ("a.example.com", "2026-11-26T12", "w1"): closed(root, "a.example.com",
                                                         "2026-11-26T12.1.jsonl.gz"),
        ("a.example.com", "2026-11-26T13", "w0-1"): closed(root, "a.example.com",
                                                           "2026-11-26T13.0-1.jsonl.gz"),
        ("_", "2026-11-26T13", "w0"): closed(root, "_", "2026-11-26T13.0.jsonl.gz"),
    }  # fmt: skip
    (root / "a.example.com" / "2026-11-26T14.0.jsonl").write_bytes(b"open hour\n")
    shipper = shippers(root, control.url, clock=Clock(H13 + 2 * 3600))
    await until(lambda: shipper.failures >= 3)  # down: nothing answers
    assert shipper.pending_count() == 4 and shipper.shipped == 0
    await control.up()
    await until(lambda: shipper.shipped == 4)
    assert {k: v[1] for k, v in control.stored.items()} == files
    assert shipper.pending_count() == 0
    assert sorted(p.name for p in (root / "a.example.com" / "shipped").iterdir()) == [
        "2026-11-26T12.0.jsonl.gz", "2026-11-26T12.1.jsonl.gz", "2026-11-26T13.0-1.jsonl.gz",
    ]  # fmt: skip
    # The open hour is the workers', never shipped.
    assert (root / "a.example.com" / "2026-11-26T14.0.jsonl").exists()
    # A file closed later is shipped within a scan.
    late = closed(root, "b.example.com", "2026-11-26T14.3.jsonl.gz")
    await until(lambda: shipper.shipped == 5)
    assert control.stored[("b.example.com", "2026-11-26T14", "w3")][1] == late


async def test_errors_and_damage_are_retried_409_and_413_set_aside(
    tmp_path: Path, control: ControlPlane, shippers: Callable[..., LogShipper]
) -> None:
    root = tmp_path / "logs"
    control.max_upload = 4000
    await control.up()
    control.stored[("a.example.com", "2026-11-26T10", "w0")] = ("other digest", b"")
    closed(root, "a.example.com", "2026-11-26T10.0.jsonl.gz")  # 409: differs from the stored
    big = gzip.compress(bytes(range(256)) * 400, compresslevel=0)
    (root / "a.example.com" / "2026-11-26T11.0.jsonl.gz").write_bytes(big)  # 413
    good = closed(root, "a.example.com", "2026-11-26T12.0.jsonl.gz")
    control.status = 503
    shipper = shippers(root, control.url, clock=Clock(H13 + 2 * 3600))
    await until(lambda: shipper.failures >= 2)
    assert control.puts[("a.example.com", "2026-11-26T12", "w0")] == 0  # the round stops
    control.status = 0
    control.damage = 1  # the first body that arrives is damaged: 400, retried
    await until(lambda: shipper.shipped == 1)
    assert control.stored[("a.example.com", "2026-11-26T12", "w0")][1] == good
    directory = root / "a.example.com"
    assert sorted(p.name for p in directory.iterdir()) == [
        "2026-11-26T10.0.jsonl.gz.refused-409", "2026-11-26T11.0.jsonl.gz.refused-413", "shipped",
    ]  # fmt: skip
    puts = sum(control.puts.values())
    await asyncio.sleep(0.3)  # further rounds send nothing: the refused are not retried
    assert sum(control.puts.values()) == puts and shipper.pending_count() == 0


async def test_a_repeat_of_a_stored_piece_is_acknowledged(
    tmp_path: Path, control: ControlPlane, shippers: Callable[..., LogShipper]
) -> None:
    """The edge shipped it but crashed before moving it: the retry answers 200."""
    root = tmp_path / "logs"
    await control.up()
    data = closed(root, "a.example.com", "2026-11-26T12.0.jsonl.gz")
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    control.stored[("a.example.com", "2026-11-26T12", "w0")] = (digest, data)
    shipper = shippers(root, control.url)
    await until(lambda: shipper.shipped == 1)
    assert (root / "a.example.com" / "shipped" / "2026-11-26T12.0.jsonl.gz").exists()


async def test_a_bad_token_is_retried_not_dropped(
    tmp_path: Path, control: ControlPlane, shippers: Callable[..., LogShipper]
) -> None:
    root = tmp_path / "logs"
    await control.up()
    closed(root, "a.example.com", "2026-11-26T12.0.jsonl.gz")
    shipper = LogShipper(
        root, LogSettings(), ControlSettings(url=control.url, token="wrong"), **FAST
    )
    shipper.start()
    try:
        await until(lambda: shipper.failures >= 2)
        assert shipper.pending_count() == 1 and not control.stored
    finally:
        await shipper.stop()


async def test_shipped_files_are_deleted_after_keep_days(
    tmp_path: Path, control: ControlPlane, shippers: Callable[..., LogShipper]
) -> None:
    root = tmp_path / "logs"
    await control.up()
    closed(root, "a.example.com", "2026-11-26T12.0.jsonl.gz")
    clock = Clock(H13 + 60)
    shipper = shippers(root, control.url, clock=clock, logs=LogSettings(keep_days=2))
    shipped = root / "a.example.com" / "shipped" / "2026-11-26T12.0.jsonl.gz"
    await until(shipped.exists)
    clock.now = H13 + 2 * DAY - 1  # the hour 12 ended at H13: 2 days less a second
    await asyncio.sleep(0.2)
    assert shipped.exists()
    clock.now = H13 + 2 * DAY
    await until(lambda: not shipped.exists())
    assert shipper.deleted == 1


async def test_without_control_plane_closed_files_are_kept_for_retention_days(
    tmp_path: Path, shippers: Callable[..., LogShipper]
) -> None:
    root = tmp_path / "logs"
    closed(root, "a.example.com", "2026-11-26T12.0.jsonl.gz")
    closed(root, "a.example.com", "2026-11-26T13.0.jsonl.gz")
    clock = Clock(H13 + 180 * DAY - 1)
    shipper = shippers(root, None, clock=clock)
    await asyncio.sleep(0.2)
    assert shipper.pending_count() == 2
    clock.now = H13 + 180 * DAY  # hour 12 is 180 days old, hour 13 not yet
    await until(lambda: shipper.deleted == 1)
    assert [p.name for p in (root / "a.example.com").iterdir()] == ["2026-11-26T13.0.jsonl.gz"]


async def test_an_hour_no_worker_closes_is_closed_and_shipped(
    tmp_path: Path, control: ControlPlane, shippers: Callable[..., LogShipper]
) -> None:
    """Slot 7 is gone (a reload to fewer workers): its open hour is closed for it."""
    root = tmp_path / "logs"
    await control.up()
    directory = root / "a.example.com"
    directory.mkdir(parents=True)
    (directory / "2026-11-26T12.7.jsonl").write_bytes(b'{"n":1}\n{"n":2}\n{"n"')  # cut short
    (directory / "2026-11-26T13.7.jsonl").write_bytes(b'{"n":3}\n')  # its hour is running
    clock = Clock(H13 + ORPHAN_AFTER - 1)  # the hour 12 ended at H13: not orphaned yet
    shipper = shippers(root, control.url, clock=clock)
    await asyncio.sleep(0.2)
    assert shipper.shipped == 0
    clock.now = H13 + ORPHAN_AFTER
    await until(lambda: shipper.shipped == 1)
    stored = control.stored[("a.example.com", "2026-11-26T12", "w7")][1]
    assert gzip.decompress(stored) == b'{"n":1}\n{"n":2}\n'
    assert sorted(p.name for p in directory.iterdir()) == ["2026-11-26T13.7.jsonl", "shipped"]
