"""edge.logwriter.LogFiles: hourly files by each line's own time, closed and gzipped when the
hour ends, crash leftovers, a failing disk (real: /dev/full, a file where a directory belongs)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
from pathlib import Path

import pytest

from edge import logwriter
from edge.accesslog import Ended, Entry, LineFormatter, parse_line
from edge.http1 import parse_head
from edge.logwriter import AccessLogWriter, LogFiles, readiness
from edge.metrics import EdgeStats, Snapshot

H13 = 1_795_698_000.0  # 2026-11-26T13:00:00 UTC
H14 = H13 + 3600
D = "www.example.com"


def entry(at: float, n: int, domain: str = D) -> Entry:
    head = parse_head(f"GET /{n} HTTP/1.1\r\nHost: {domain}\r\n\r\n".encode())
    ended = Ended(0.5, 0.75, "192.0.2.1", domain, head, 200, 100, 10, "hit",
                  b"Content-Type: text/plain\r\n", None, None)  # fmt: skip
    return at, 1.0, ended


def files(tmp_path: Path, slot: int = 0) -> LogFiles:
    return LogFiles(tmp_path / "logs", slot, LineFormatter("e1", "-"))


def urls(data: bytes) -> list[bytes]:
    out = []
    for line in data.splitlines(keepends=True):
        url = parse_line(line).url
        assert url is not None
        out.append(url)
    return out


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_rotation_by_each_line_time_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    logs = files(tmp_path)
    batch = [entry(H14 - 0.002, 1), entry(H14 - 0.001, 2), entry(H14, 3), entry(H14 + 0.4, 4)]
    result = logs.write(batch, now=H14 + 0.5)
    assert (result.written, result.lost, result.problem) == (4, 0, "")
    directory = tmp_path / "logs" / D
    # The ended hour was closed in the same flush; the current one stays open.
    assert listing(directory) == ["2026-11-26T13.0.jsonl.gz", "2026-11-26T14.0.jsonl"]
    closed = gzip.decompress((directory / "2026-11-26T13.0.jsonl.gz").read_bytes())
    assert urls(closed) == [b"/1", b"/2"]
    logs.write([entry(H14 + 1, 5)], now=H14 + 1)
    logs.write([], now=H14 + 3600)
    assert listing(directory) == ["2026-11-26T13.0.jsonl.gz", "2026-11-26T14.0.jsonl.gz"]
    later = gzip.decompress((directory / "2026-11-26T14.0.jsonl.gz").read_bytes())
    assert urls(later) == [b"/3", b"/4", b"/5"]


def test_an_hour_stays_open_until_it_ends(tmp_path: Path) -> None:
    logs = files(tmp_path)
    logs.write([entry(H13 + 10, 1)], now=H13 + 10)
    logs.write([entry(H14 - 0.001, 2)], now=H14 - 0.001)
    directory = tmp_path / "logs" / D
    assert listing(directory) == ["2026-11-26T13.0.jsonl"]
    logs.write([], now=H14)
    assert listing(directory) == ["2026-11-26T13.0.jsonl.gz"]


def test_domains_and_slots_have_their_own_files(tmp_path: Path) -> None:
    zero, one = files(tmp_path, 0), files(tmp_path, 1)
    zero.write([entry(H13, 1), entry(H13, 2, "other.example")], now=H13)
    one.write([entry(H13, 3)], now=H13)
    one.write([entry(H13, 4, "-")], now=H13)  # no routed domain
    assert listing(tmp_path / "logs") == ["_", "other.example", D]
    assert listing(tmp_path / "logs" / D) == ["2026-11-26T13.0.jsonl", "2026-11-26T13.1.jsonl"]
    assert urls((tmp_path / "logs" / "_" / "2026-11-26T13.1.jsonl").read_bytes()) == [b"/4"]


def test_lines_after_the_close_become_a_new_piece(tmp_path: Path) -> None:
    logs = files(tmp_path)
    logs.write([entry(H13 + 1, 1)], now=H14)
    logs.write([entry(H13 + 2, 2)], now=H14 + 1)  # the clock stepped back: a late line
    directory = tmp_path / "logs" / D
    assert listing(directory) == ["2026-11-26T13.0-1.jsonl.gz", "2026-11-26T13.0.jsonl.gz"]
    assert urls(gzip.decompress((directory / "2026-11-26T13.0-1.jsonl.gz").read_bytes())) == [b"/2"]


def test_crash_leftovers_are_recovered(tmp_path: Path) -> None:
    directory = tmp_path / "logs" / D
    directory.mkdir(parents=True)
    one = files(tmp_path)
    one.write([entry(H13, 1), entry(H13, 2)], now=H13)
    one.close_all()
    past = (directory / "2026-11-26T13.0.jsonl").read_bytes()
    # A crash cut the last line short, and left a gzip temp file.
    (directory / "2026-11-26T13.0.jsonl").write_bytes(past + b'{"time":"2026-11-')
    (directory / ".2026-11-26T12.0.gz.tmp").write_bytes(b"half")
    (directory / "2026-11-26T14.0.jsonl").write_bytes(past[: len(past) // 2 + 3])
    # Slot 1's file is slot 1's business.
    (directory / "2026-11-26T12.1.jsonl").write_bytes(b"x")
    again = files(tmp_path)
    again.recover(now=H14 + 5)
    assert listing(directory) == [
        "2026-11-26T12.1.jsonl", "2026-11-26T13.0.jsonl.gz", "2026-11-26T14.0.jsonl",
    ]  # fmt: skip
    assert gzip.decompress((directory / "2026-11-26T13.0.jsonl.gz").read_bytes()) == past
    # The current hour is appended to, after its partial line is cut.
    again.write([entry(H14 + 6, 3)], now=H14 + 6)
    assert urls((directory / "2026-11-26T14.0.jsonl").read_bytes()) == [b"/1", b"/3"]


def test_a_crash_between_rename_and_unlink_ships_no_duplicate(tmp_path: Path) -> None:
    directory = tmp_path / "logs" / D
    logs = files(tmp_path)
    logs.write([entry(H13, 1)], now=H13)
    logs.close_all()
    data = (directory / "2026-11-26T13.0.jsonl").read_bytes()
    (directory / "shipped").mkdir()
    (directory / "shipped" / "2026-11-26T13.0.jsonl.gz").write_bytes(gzip.compress(data))
    files(tmp_path).recover(now=H14 + 1)
    assert listing(directory) == ["shipped"]


def test_a_full_disk_keeps_lines_and_writes_them_once_it_recovers(tmp_path: Path) -> None:
    directory = tmp_path / "logs" / D
    directory.mkdir(parents=True)
    hour_file = directory / "2026-11-26T13.0.jsonl"
    hour_file.symlink_to("/dev/full")  # every write: ENOSPC
    logs = files(tmp_path)
    result = logs.write([entry(H13, 1), entry(H13, 2)], now=H13)
    assert result.written == 0 and result.lost == 0
    assert "No space left on device" in result.problem
    result = logs.write([entry(H13, 3)], now=H13 + 1)
    assert "No space left" in result.problem and logs.pending_lines == 3
    hour_file.unlink()  # the disk works again
    result = logs.write([entry(H13, 4)], now=H13 + 2)
    assert (result.written, result.lost, result.problem) == (4, 0, "")
    assert urls(hour_file.read_bytes()) == [b"/1", b"/2", b"/3", b"/4"]


def test_a_failing_directory_and_the_pending_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logwriter, "MAX_PENDING_LINES", 3)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / D).write_bytes(b"")  # a file where the domain directory belongs
    logs = files(tmp_path)
    result = logs.write([entry(H13, n) for n in range(5)], now=H13)
    assert result.written == 0 and result.lost == 2 and result.problem
    (tmp_path / "logs" / D).unlink()
    result = logs.write([], now=H13 + 1)
    assert (result.written, result.problem) == (3, "")
    assert urls((tmp_path / "logs" / D / "2026-11-26T13.0.jsonl").read_bytes()) == [
        b"/2", b"/3", b"/4",
    ]  # fmt: skip
    assert logs.drop_pending() == 0


def test_two_processes_of_one_slot_share_its_file_safely(tmp_path: Path) -> None:
    """A reload: the old generation's worker drains while the new one serves."""
    old, new = files(tmp_path), files(tmp_path)
    old.write([entry(H13, 1)], now=H13)
    new.write([entry(H13, 2)], now=H13)
    old.write([entry(H13, 3)], now=H13)
    new.write([], now=H14)  # the new one closes the hour
    old.write([entry(H13 + 5, 4)], now=H14)  # the old one's last line for it: a new piece
    directory = tmp_path / "logs" / D
    assert listing(directory) == ["2026-11-26T13.0-1.jsonl.gz", "2026-11-26T13.0.jsonl.gz"]
    first = urls(gzip.decompress((directory / "2026-11-26T13.0.jsonl.gz").read_bytes()))
    second = urls(gzip.decompress((directory / "2026-11-26T13.0-1.jsonl.gz").read_bytes()))
    assert (first, second) == ([b"/1", b"/2", b"/3"], [b"/4"])


async def test_writer_flushes_in_the_background_and_everything_at_stop(tmp_path: Path) -> None:
    stats = EdgeStats()
    changes: list[bool] = []
    now = [H13 + 1]
    writer = AccessLogWriter(
        tmp_path / "logs",
        2,
        "e1",
        "-",
        stats,
        interval=0.05,
        clock=lambda: now[0],
        on_change=changes.append,
    )
    await writer.start()
    writer.record(*entry(H13 + 1, 1))
    hour_file = tmp_path / "logs" / D / "2026-11-26T13.2.jsonl"
    for _ in range(100):
        if hour_file.exists():
            break
        await asyncio.sleep(0.02)
    assert urls(hour_file.read_bytes()) == [b"/1"]
    hour_file.unlink()
    hour_file.symlink_to("/dev/full")
    writer.record(*entry(H13 + 2, 2))
    for _ in range(100):
        if changes:
            break
        await asyncio.sleep(0.02)
    assert changes == [True] and writer.failing and "No space" in stats.log_failure
    hour_file.unlink()
    for _ in range(100):
        if len(changes) == 2:
            break
        await asyncio.sleep(0.02)
    assert changes == [True, False] and not writer.failing
    writer.record(*entry(H13 + 3, 3))
    await writer.stop()  # no wait: stop writes what is left
    assert urls(hour_file.read_bytes()) == [b"/2", b"/3"]
    assert (stats.log_lines_written, stats.log_lines_lost) == (3, 0)
    assert os.listdir(tmp_path / "logs" / D) == ["2026-11-26T13.2.jsonl"]  # open for next start


async def test_a_disk_that_hangs_makes_the_writer_failing_and_bounds_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hour file is a FIFO nobody reads: a write blocks once its 64 KiB buffer is full,
    as on a disk that stopped answering."""
    monkeypatch.setattr(logwriter, "MAX_PENDING_LINES", 10)
    stats = EdgeStats()
    changes: list[bool] = []
    directory = tmp_path / "logs" / D
    directory.mkdir(parents=True)
    fifo = directory / "2026-11-26T13.0.jsonl"
    os.mkfifo(fifo)
    writer = AccessLogWriter(
        tmp_path / "logs",
        0,
        "e1",
        "-",
        stats,
        interval=0.05,
        clock=lambda: H13 + 1,
        on_change=changes.append,
    )
    await writer.start()
    drain = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        for n in range(1000):
            writer.record(*entry(H13 + 1, n))  # ~300 KiB: blocks
        await asyncio.sleep(0.3)
        assert changes == [True] and "stalled" in stats.log_failure
        for n in range(25):
            writer.record(*entry(H13 + 1, n))
        for _ in range(100):
            if stats.log_lines_lost == 15:
                break
            await asyncio.sleep(0.02)
        assert stats.log_lines_lost == 15 and writer.lines == 10
        received = b""
        for _ in range(500):  # the disk answers again
            with contextlib.suppress(BlockingIOError):
                received += os.read(drain, 1 << 20)
            if changes == [True, False] and stats.log_lines_written == 1010:
                break
            await asyncio.sleep(0.01)
        assert changes == [True, False]
        assert stats.log_lines_written == 1010
    finally:
        stop = asyncio.ensure_future(writer.stop())
        while not stop.done():
            with contextlib.suppress(BlockingIOError):
                os.read(drain, 1 << 20)
            await asyncio.sleep(0.01)
        os.close(drain)
        await stop


def test_readiness_blocks_only_when_refusing() -> None:
    failing: Snapshot = {"counters": {"log_lines_lost": 7}, "gauges": {"log_writers_failing": 2}}
    assert readiness(failing, refuse=False) == (
        False, "access log failing in 2 worker(s), serving on; 7 lines lost so far",
    )  # fmt: skip
    assert readiness(failing, refuse=True) == (
        True, "access log failing in 2 worker(s), refusing requests; 7 lines lost so far",
    )  # fmt: skip
    recovered: Snapshot = {"counters": {"log_lines_lost": 7}, "gauges": {}}
    assert readiness(recovered, refuse=True) == (
        False, "access log writing; 7 lines lost since start",
    )  # fmt: skip
    assert readiness({"counters": {}, "gauges": {}}, refuse=True) == (False, "")
