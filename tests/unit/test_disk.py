"""edge.disk: the file format, atomic commits, corruption, the cross-process fill lock and
read-while-write (with real child processes), LRU eviction, the shared budget, rebuild after a
restart and disk failures. Real files under tmp_path."""

from __future__ import annotations

import asyncio
import errno
import logging
import multiprocessing as mp
import os
import signal
import struct
import time
from collections.abc import Callable, Iterator
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import pytest

from edge.disk import (
    HEADER_SIZE,
    MAGIC,
    UNKNOWN_LENGTH,
    VARY_STUB,
    DiskError,
    DiskFollower,
    DiskStore,
    DiskWriter,
    FillAborted,
    ObjectMeta,
    object_id,
)

BLOCK = 4096


def meta(key: str = "http://a.test/x") -> ObjectMeta:
    return ObjectMeta(
        key=key, vary_names=("accept-encoding",), vary_values=("gzip",), status=200,
        fields=[("Content-Type", "text/plain; charset=utf-8"), ("X-Ünï", "ç")],
        request_time=1000.0, response_time=1000.5, initial_age=2.0, lifetime=60.0,
    )


def put(store: DiskStore, oid: str, body: bytes, length: int | None = -1) -> None:
    writer = store.begin(oid, meta(oid), len(body) if length == -1 else length)
    assert writer is not None
    writer.append(body)
    entry = writer.commit()
    assert entry is not None
    entry.close()


def read_body(store: DiskStore, oid: str) -> bytes | None:
    entry = store.lookup(oid)
    if entry is None:
        return None
    try:
        return os.pread(entry.fd, entry.body_length + 1, entry.body_offset)
    finally:
        entry.close()


def files(root: Path) -> list[str]:
    """Every file under objects/, relative names."""
    objects = root / "objects"
    return sorted(str(p.relative_to(objects)) for p in objects.rglob("*") if p.is_file())


def oid_of(n: int) -> str:
    return object_id(f"http://a.test/{n}")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DiskStore]:
    s = DiskStore(tmp_path, 1 << 30)
    yield s
    s.close()


async def collect(
    follower: DiskFollower, start: int = 0, end: int | None = None, chunk: int = 256 << 10
) -> bytes:
    return b"".join([c async for c in follower.chunks(start, end, chunk=chunk, poll=0.002)])


# ------------------------------------------------------------------------------ format


def test_object_id_names_one_variant() -> None:
    a = object_id("k")
    assert len(a) == 64 and int(a, 16) >= 0
    assert a == object_id("k", ())
    assert len({a, object_id("k", ("",)), object_id("k", ("gzip",)), object_id("k2")}) == 4


def test_round_trip_meta_and_body_and_file_format(store: DiskStore, tmp_path: Path) -> None:
    oid = object_id("http://a.test/x", ("gzip",))
    m = meta()
    m.forced = True
    m.extra = {"etag": '"v1"', "total": "123"}
    body = os.urandom(100_000)
    writer = store.begin(oid, m, len(body))
    assert writer is not None
    writer.append(body[:10])
    writer.append(memoryview(body)[10:])
    assert writer.written == len(body)
    assert os.pread(writer.fd, 10, writer.body_offset) == body[:10]  # readable while written
    entry = writer.commit()
    assert entry is not None and entry.body_length == len(body)
    assert os.pread(entry.fd, len(body), entry.body_offset) == body
    entry.close()

    path = tmp_path / "objects" / oid[:2] / oid[2:4] / oid
    assert files(tmp_path) == [f"{oid[:2]}/{oid[2:4]}/{oid}"]
    raw = path.read_bytes()
    assert raw[:5] == MAGIC
    length, meta_len = struct.unpack_from("<QI", raw, 5)
    assert length == len(body) and len(raw) == HEADER_SIZE + meta_len + len(body)

    got = store.lookup(oid)
    assert got is not None
    try:
        assert got.meta == m and got.path == path
        assert got.body_offset == HEADER_SIZE + meta_len
        assert os.pread(got.fd, len(body) + 1, got.body_offset) == body
    finally:
        got.close()
    assert store.objects == 1 and store.bytes_used == -(-len(raw) // BLOCK) * BLOCK


def test_a_fill_is_never_looked_up(store: DiskStore, tmp_path: Path) -> None:
    oid = oid_of(1)
    writer = store.begin(oid, meta(), 6)
    assert writer is not None
    writer.append(b"abcdef")
    assert store.lookup(oid) is None
    assert files(tmp_path) == [f"{oid[:2]}/{oid[2:4]}/{oid}.fill"]  # no temp file left
    entry = writer.commit()
    assert entry is not None
    entry.close()
    assert files(tmp_path) == [f"{oid[:2]}/{oid[2:4]}/{oid}"]
    assert read_body(store, oid) == b"abcdef"


def test_unknown_length_is_committed(store: DiskStore, tmp_path: Path) -> None:
    oid = oid_of(1)
    writer = store.begin(oid, meta(), None)
    assert writer is not None
    fill = tmp_path / "objects" / oid[:2] / oid[2:4] / f"{oid}.fill"
    assert struct.unpack_from("<Q", fill.read_bytes(), 5)[0] == UNKNOWN_LENGTH
    writer.append(b"x" * 5000)
    writer.append(b"y" * 3)
    entry = writer.commit()
    assert entry is not None and entry.body_length == 5003
    entry.close()
    assert read_body(store, oid) == b"x" * 5000 + b"yyy"


@pytest.mark.parametrize("written", [b"abc", b"abcdefg"])
def test_body_not_of_the_declared_length_is_not_committed(
    store: DiskStore, tmp_path: Path, written: bytes
) -> None:
    writer = store.begin(oid_of(1), meta(), 5)
    assert writer is not None
    writer.append(written)
    assert writer.commit() is None
    assert files(tmp_path) == [] and store.write_errors == 0


def corrupt_truncate(raw: bytes) -> bytes:
    return raw[:-1]


def corrupt_extend(raw: bytes) -> bytes:
    return raw + b"!"


def corrupt_meta_byte(raw: bytes) -> bytes:
    i = HEADER_SIZE + 3
    return raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1 :]


def corrupt_magic(raw: bytes) -> bytes:
    return b"CDNE\x02" + raw[5:]


def corrupt_length_unknown(raw: bytes) -> bytes:
    return raw[:5] + struct.pack("<Q", UNKNOWN_LENGTH) + raw[13:]


def corrupt_empty(raw: bytes) -> bytes:
    return b""


@pytest.mark.parametrize(
    "damage",
    [corrupt_truncate, corrupt_extend, corrupt_meta_byte, corrupt_magic, corrupt_length_unknown,
     corrupt_empty],
)
def test_corrupt_files_are_removed_never_served(
    store: DiskStore, tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    oid = oid_of(1)
    put(store, oid, b"hello world")
    path = tmp_path / "objects" / oid[:2] / oid[2:4] / oid
    path.write_bytes(damage(path.read_bytes()))
    assert store.lookup(oid) is None
    assert not path.exists()
    assert store.corrupt_removed == 1 and store.objects == 0
    assert store.lookup(oid) is None and store.corrupt_removed == 1


# ------------------------------------------------------------------------------ fill lock


def test_second_begin_gets_none_until_the_first_ends(store: DiskStore, tmp_path: Path) -> None:
    oid = oid_of(1)
    first = store.begin(oid, meta(), 3)
    assert first is not None
    assert store.begin(oid, meta(), 3) is None
    other = DiskStore(tmp_path, 1 << 30)  # another process's view: its own descriptors
    try:
        assert other.begin(oid, meta(), 3) is None
        first.abort()
        first.abort()  # idempotent
        second = other.begin(oid, meta(), 3)
        assert second is not None
        second.abort()
    finally:
        other.close()
    assert files(tmp_path) == []


def test_dead_writers_fill_is_taken_over(store: DiskStore, tmp_path: Path) -> None:
    """A .fill nobody holds the lock of (its writer died) is replaced at once."""
    oid = oid_of(1)
    fill = tmp_path / "objects" / oid[:2] / oid[2:4] / f"{oid}.fill"
    fill.parent.mkdir(parents=True)
    fill.write_bytes(MAGIC + b"half a header")
    put(store, oid, b"ok")  # the .fill left behind is taken over
    assert read_body(store, oid) == b"ok"


def test_live_writer_is_not_taken_over_even_when_old(store: DiskStore, tmp_path: Path) -> None:
    oid = oid_of(1)
    writer = store.begin(oid, meta(), 2)
    assert writer is not None
    fill = tmp_path / "objects" / oid[:2] / oid[2:4] / f"{oid}.fill"
    os.utime(fill, (time.time() - 3600, time.time() - 3600))
    assert store.begin(oid, meta(), 2) is None
    writer.abort()


# ------------------------------------------------------------------------------ followers


def test_follow_without_a_fill_is_none(store: DiskStore) -> None:
    assert store.follow(oid_of(1)) is None
    put(store, oid_of(1), b"x")
    assert store.follow(oid_of(1)) is None  # committed: a lookup, not a follow


async def write_slowly(writer: DiskWriter, body: bytes, piece: int, delay: float) -> None:
    for i in range(0, len(body), piece):
        writer.append(body[i : i + piece])
        await asyncio.sleep(delay)
    entry = writer.commit()
    assert entry is not None
    entry.close()


@pytest.mark.parametrize("declared", [True, False])
async def test_followers_in_the_same_process(store: DiskStore, declared: bool) -> None:
    oid = oid_of(1)
    body = os.urandom(300_000)
    writer = store.begin(oid, meta(), len(body) if declared else None)
    assert writer is not None
    whole, part, tail = store.follow(oid), store.follow(oid), store.follow(oid)
    assert whole is not None and part is not None and tail is not None
    assert whole.meta == meta() and whole.body_length == (len(body) if declared else None)
    task = asyncio.create_task(write_slowly(writer, body, 7_000, 0.001))
    got = await asyncio.gather(
        collect(whole, chunk=4096), collect(part, 1000, 150_000), collect(tail, 299_990, 10**9)
    )
    await task
    assert list(got) == [body, body[1000:150_000], body[299_990:]]
    assert whole.body_length == len(body)
    for f in (whole, part, tail):
        f.close()


async def test_follower_finishes_when_the_object_is_evicted_right_after_commit(
    tmp_path: Path,
) -> None:
    store = DiskStore(tmp_path, 0)  # nothing fits: commit evicts at once
    oid = oid_of(1)
    writer = store.begin(oid, meta(), None)
    assert writer is not None
    follower = store.follow(oid)
    assert follower is not None
    task = asyncio.create_task(write_slowly(writer, b"abcdefghij" * 1000, 1000, 0.002))
    assert await collect(follower) == b"abcdefghij" * 1000
    await task
    assert store.lookup(oid) is None and store.evictions == 1
    follower.close()
    store.close()


async def test_follower_sees_abort(store: DiskStore) -> None:
    oid = oid_of(1)
    writer = store.begin(oid, meta(), 100)
    assert writer is not None
    follower = store.follow(oid)
    assert follower is not None
    writer.append(b"x" * 40)

    async def abort_later() -> None:
        await asyncio.sleep(0.05)
        writer.abort()

    task = asyncio.create_task(abort_later())
    got = b""
    with pytest.raises(FillAborted):
        async for c in follower.chunks(poll=0.002):
            got += c
    await task
    assert got == b"x" * 40
    follower.close()


async def test_follower_gives_up_on_a_stalled_live_writer(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 1 << 20, stall_timeout=0.2)
    oid = oid_of(1)
    writer = store.begin(oid, meta(), None)
    assert writer is not None
    writer.append(b"abc")
    follower = store.follow(oid)
    assert follower is not None
    started = time.monotonic()
    with pytest.raises(FillAborted, match="no progress"):
        await collect(follower)
    assert 0.2 <= time.monotonic() - started < 2
    follower.close()
    writer.abort()
    store.close()


# ---------------------------------------------------------------- followers across processes


def child_writer(root: str, oid: str, body: bytes, pieces: int, delay: float, end: str,
                 started: Event, written: Event) -> None:
    """A writer in another process: writes `body` in `pieces`, then commits, aborts or hangs."""
    store = DiskStore(Path(root), 1 << 30)
    declared = {"commit-unknown": None, "hang": 2 * len(body)}.get(end, len(body))
    writer = store.begin(oid, meta(), declared)
    assert writer is not None
    started.set()
    step = -(-len(body) // pieces)
    for i in range(0, len(body), step):
        if end == "abort" and i >= len(body) // 2:
            writer.abort()
            return
        time.sleep(delay)
        writer.append(body[i : i + step])
    written.set()
    if end == "hang":
        time.sleep(60)
    else:
        entry = writer.commit()
        assert entry is not None


def spawn_writer(tmp_path: Path, oid: str, body: bytes, end: str) -> tuple[
    mp.process.BaseProcess, Event, Event
]:
    ctx = mp.get_context("spawn")
    started, written = ctx.Event(), ctx.Event()
    proc = ctx.Process(
        target=child_writer, args=(str(tmp_path), oid, body, 20, 0.01, end, started, written)
    )
    proc.start()
    return proc, started, written


async def wait_event(event: Event) -> None:
    assert await asyncio.to_thread(event.wait, 30)


@pytest.mark.parametrize("end", ["commit", "commit-unknown"])
async def test_follow_a_writer_in_another_process(
    store: DiskStore, tmp_path: Path, end: str
) -> None:
    oid = oid_of(1)
    body = os.urandom(1 << 20)
    proc, started, _written = spawn_writer(tmp_path, oid, body, end)
    try:
        await wait_event(started)
        assert store.begin(oid, meta(), len(body)) is None  # the child holds the fill lock
        follower = store.follow(oid)
        assert follower is not None and follower.meta == meta()
        assert await collect(follower) == body
        follower.close()
        await asyncio.to_thread(proc.join, 30)
        assert proc.exitcode == 0
        assert read_body(store, oid) == body
    finally:
        proc.kill()


async def test_writer_in_another_process_aborts(store: DiskStore, tmp_path: Path) -> None:
    oid = oid_of(1)
    proc, started, _written = spawn_writer(tmp_path, oid, b"z" * 100_000, "abort")
    try:
        await wait_event(started)
        follower = store.follow(oid)
        assert follower is not None
        with pytest.raises(FillAborted):
            await collect(follower)
        follower.close()
        await asyncio.to_thread(proc.join, 30)
        assert files(tmp_path) == []
    finally:
        proc.kill()


async def test_writer_killed_mid_write(tmp_path: Path) -> None:
    """SIGKILL releases the writer's lock: followers abort and the next begin() takes over,
    both at once rather than after the stall timeout."""
    store = DiskStore(tmp_path, 1 << 30, stall_timeout=10)
    oid = oid_of(1)
    proc, started, written = spawn_writer(tmp_path, oid, b"k" * 100_000, "hang")
    try:
        await wait_event(started)
        follower = store.follow(oid)
        assert follower is not None
        reading = asyncio.create_task(collect(follower))
        await wait_event(written)
        os.kill(proc.pid or 0, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(FillAborted, match="before the body was complete"):
            await reading
        assert time.monotonic() - killed < 2
        follower.close()
        await asyncio.to_thread(proc.join, 30)
        put(store, oid, b"ok")  # the .fill left behind is taken over
        assert read_body(store, oid) == b"ok"
    finally:
        proc.kill()
        store.close()


# ------------------------------------------------------------------------------ budget


def test_lru_eviction_by_bytes_and_recency(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 3 * BLOCK)
    for n in range(3):
        put(store, oid_of(n), b"x" * 1000)  # one block each
    assert store.bytes_used == 3 * BLOCK and store.objects == 3
    assert read_body(store, oid_of(0)) is not None  # 0 is now the most recent
    store.record_hit(oid_of(1))  # a hit served from the memory tier
    put(store, oid_of(3), b"x" * 1000)
    assert store.evictions == 1 and read_body(store, oid_of(2)) is None
    put(store, oid_of(4), b"x" * (BLOCK + 1))  # two blocks: evicts 0 and 1 (least recent)
    assert [read_body(store, oid_of(n)) is not None for n in range(5)] == [
        False, False, False, True, True
    ]
    assert store.evictions == 3 and store.bytes_used == 3 * BLOCK and store.objects == 2
    store.close()


def test_an_evicted_or_purged_file_stays_readable_through_an_open_entry(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 2 * BLOCK)
    put(store, oid_of(0), b"first")
    entry = store.lookup(oid_of(0))
    assert entry is not None
    put(store, oid_of(1), b"a")
    put(store, oid_of(2), b"b")  # evicts 0
    assert store.lookup(oid_of(0)) is None
    assert os.pread(entry.fd, 100, entry.body_offset) == b"first"
    entry.close()

    held = store.lookup(oid_of(1))
    assert held is not None
    assert store.remove(oid_of(1)) is True
    assert store.remove(oid_of(1)) is False
    assert os.pread(held.fd, 100, held.body_offset) == b"a"
    held.close()
    assert store.bytes_used == BLOCK and store.objects == 1
    store.close()


def test_a_new_version_replaces_the_old_and_its_bytes(store: DiskStore) -> None:
    put(store, oid_of(0), b"v1" * 3000)
    old = store.lookup(oid_of(0))
    assert old is not None
    put(store, oid_of(0), b"v2")
    assert read_body(store, oid_of(0)) == b"v2"
    assert os.pread(old.fd, 2, old.body_offset) == b"v1"
    old.close()
    assert store.bytes_used == BLOCK and store.objects == 1


async def test_one_budget_for_every_process_on_the_host(tmp_path: Path) -> None:
    """Two stores on one root (as two workers): the host holds the budget, not each view."""
    a = DiskStore(tmp_path, 3 * BLOCK)
    await a.rebuild()
    b = DiskStore(tmp_path, 3 * BLOCK)
    await b.rebuild()
    for n in range(8):
        put(a if n % 2 else b, oid_of(n), b"x" * 100)
    on_disk = sum(-(-p.stat().st_size // BLOCK) * BLOCK for p in (tmp_path / "objects").rglob("*")
                  if p.is_file())
    assert on_disk == a.bytes_used == b.bytes_used == 3 * BLOCK
    assert a.evictions + b.evictions == 5
    a.close()
    b.close()


# ------------------------------------------------------------------------------ rebuild


async def test_rebuild_after_restart(tmp_path: Path) -> None:
    first = DiskStore(tmp_path, 1 << 30)
    for n, mtime in enumerate([1000, 3000, 2000, 4000]):
        put(first, oid_of(n), bytes([n]) * 100)
        path = tmp_path / "objects" / oid_of(n)[:2] / oid_of(n)[2:4] / oid_of(n)
        os.utime(path, (mtime, mtime))
    corrupt = tmp_path / "objects" / oid_of(3)[:2] / oid_of(3)[2:4] / oid_of(3)
    corrupt.write_bytes(corrupt.read_bytes()[:-1])
    leaf = tmp_path / "objects" / "00" / "00"
    leaf.mkdir(parents=True)
    (leaf / ("0" * 64 + ".fill")).write_bytes(b"left by a dead writer")
    dead_tmp = leaf / ("0" * 64 + ".abc.tmp")
    dead_tmp.write_bytes(b"left by a dead writer")
    os.utime(dead_tmp, (time.time() - 120, time.time() - 120))  # a fresh one may be mid-begin
    fresh_tmp = leaf / ("0" * 64 + ".def.tmp")
    fresh_tmp.write_bytes(b"a writer between creating and locking it")
    (leaf / "README").write_bytes(b"not ours: left alone")
    live = first.begin(oid_of(9), meta(), 10)  # a writer still running elsewhere
    assert live is not None
    first.close()

    store = DiskStore(tmp_path, 3 * BLOCK)  # the restart
    assert store.bytes_used == 0 and store.objects == 0  # unknown until rebuilt
    assert read_body(store, oid_of(0)) == bytes([0]) * 100  # served meanwhile
    await store.rebuild()
    assert store.objects == 3 and store.bytes_used == 3 * BLOCK
    assert store.corrupt_removed == 1 and not corrupt.exists()
    assert sorted(p.name for p in leaf.iterdir()) == sorted(["README", fresh_tmp.name])
    assert (store.begin(oid_of(9), meta(), 10)) is None  # the live fill survived
    # Least recent first: by mtime (2 then 1), and 0 was looked up before the rebuild.
    put(store, oid_of(5), b"new")
    assert read_body(store, oid_of(2)) is None
    put(store, oid_of(6), b"new")
    assert read_body(store, oid_of(1)) is None
    assert read_body(store, oid_of(0)) is not None
    live.abort()
    store.close()


async def test_rebuild_recounts_what_changed_while_the_edge_was_down(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 1 << 30)
    await store.rebuild()
    for n in range(4):
        put(store, oid_of(n), b"x")
    assert store.bytes_used == 4 * BLOCK
    store.close()
    for n in range(3):  # an operator clears part of the cache
        (tmp_path / "objects" / oid_of(n)[:2] / oid_of(n)[2:4] / oid_of(n)).unlink()
    again = DiskStore(tmp_path, 2 * BLOCK)
    await again.rebuild()
    assert again.bytes_used == BLOCK and again.objects == 1
    put(again, oid_of(5), b"y")  # fits: no eviction from a stale count
    assert again.evictions == 0 and again.bytes_used == 2 * BLOCK
    again.close()


async def test_rebuild_of_a_large_tree_yields_in_steps(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 1 << 30)
    for n in range(450):
        put(store, oid_of(n), b"x")
    store.close()
    again = DiskStore(tmp_path, 1 << 30)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await again.rebuild()
    task.cancel()
    assert again.objects == 450 and ticks >= 3
    again.close()


# ------------------------------------------------------------------------------ disk errors


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_full_disk_at_begin(tmp_path: Path) -> None:
    def full(path: str, flags: int) -> int:
        return os.open("/dev/full", os.O_RDWR)

    store = DiskStore(tmp_path, 1 << 30, opener=full)
    with pytest.raises(DiskError) as raised:
        store.begin(oid_of(0), meta(), 10)
    assert raised.value.errno == errno.ENOSPC and isinstance(raised.value, OSError)
    assert store.write_errors == 1 and files(tmp_path) == []
    store.close()


def test_full_disk_mid_write(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The writer's descriptor is pointed at /dev/full through the opener seam: every failure
    raises DiskError once per writer, is counted, leaves nothing behind, and the log says so
    once per interval."""
    caplog.set_level(logging.WARNING, logger="edge.disk")
    opened: list[int] = []

    def opener(path: str, flags: int) -> int:
        fd = os.open(path, flags, 0o644)
        opened.append(fd)
        return fd

    clock = FakeClock()
    store = DiskStore(tmp_path, 1 << 30, clock=clock, opener=opener)

    def fail_one(declared: int | None) -> None:
        writer = store.begin(oid_of(len(opened)), meta(), declared)
        assert writer is not None
        writer.append(b"before")
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, opened[-1])
        os.close(full)
        if declared is None:  # commit's header write fails
            assert writer.commit() is None
        else:
            with pytest.raises(DiskError) as raised:
                writer.append(b"after")
            assert raised.value.errno == errno.ENOSPC
            writer.append(b"ignored")  # raised once; later appends do nothing
            assert writer.commit() is None
        writer.abort()
        assert files(tmp_path) == []

    for at in (0, 10, 30):
        clock.now = 1_700_000_000.0 + at
        fail_one(10)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("disk full: 1 writes failed since 2023-11-14")
    clock.now = 1_700_000_061.0
    fail_one(None)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[1].startswith("disk full: 3 writes failed since")
    assert store.write_errors == 4
    put(store, oid_of(99), b"the disk recovered")
    assert read_body(store, oid_of(99)) == b"the disk recovered"
    store.close()


def test_remove_key_purges_every_variant_and_only_them(store: DiskStore) -> None:
    key, other = "a.test/v", "a.test/w"
    ids = [object_id(key), object_id(key, ("gzip",)), object_id(key, ("br",))]
    assert all(i.startswith(ids[0]) for i in ids) and len(set(ids)) == 3
    for oid in [*ids, object_id(other)]:
        put(store, oid, b"body of " + oid.encode())
    assert store.remove_key(key) == 3
    assert all(store.lookup(oid) is None for oid in ids)
    assert read_body(store, object_id(other)) == b"body of " + object_id(other).encode()


def _try_claim(root: str, oid: str, result: Any) -> None:
    store = DiskStore(Path(root), 1 << 30)
    claim = store.claim(oid)
    result.put(claim is not None)
    if claim is not None:
        claim.release()
    store.close()


def test_claim_is_host_wide_and_released(store: DiskStore, tmp_path: Path) -> None:
    oid = object_id("a.test/claimed")
    claim = store.claim(oid)
    assert claim is not None and store.claimed(oid)
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    child = ctx.Process(target=_try_claim, args=(str(tmp_path), oid, result))
    child.start()
    child.join(20)
    assert result.get(timeout=5) is False  # another process cannot take it
    claim.release()
    claim.release()  # idempotent
    assert not store.claimed(oid)
    again = store.claim(oid)
    assert again is not None
    again.release()


def test_a_vary_stub_being_written_is_not_followed(store: DiskStore) -> None:
    stub = meta()
    stub.extra = {VARY_STUB: "1"}
    writer = store.begin(object_id("a.test/x"), stub, 0)
    assert writer is not None
    assert store.follow(object_id("a.test/x")) is None  # no body to stream from a stub
    writer.abort()


async def test_rebuild_counts_what_other_workers_commit_meanwhile(tmp_path: Path) -> None:
    first = DiskStore(tmp_path, 1 << 30)
    for n in range(300):
        put(first, object_id(f"before/{n}"), b"x" * 100)
    first.close()
    restarted = DiskStore(tmp_path, 1 << 30)
    other = DiskStore(tmp_path, 1 << 30)  # another worker, committing during the rebuild
    rebuild = asyncio.ensure_future(restarted.rebuild())
    for n in range(300):
        put(other, object_id(f"during/{n}"), b"y" * 100)
        if n % 20 == 0:
            await asyncio.sleep(0)
    await rebuild
    on_disk = sum(
        -(-p.stat().st_size // BLOCK) * BLOCK
        for p in (tmp_path / "objects").rglob("*")
        if p.is_file() and len(p.name) == 64
    )
    assert restarted.bytes_used == on_disk == 600 * BLOCK
    restarted.close()
    other.close()
