"""edge.store (memory tier, replayed heads) and edge.fill (read-while-write) without sockets."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from edge import policy
from edge.fill import Fill, FillError, FillReader
from edge.store import OBJECT_OVERHEAD, CachedObject, MemoryTier, replay_block


def obj(
    key: str, body: bytes = b"x", *, vary: tuple[str, ...] = (), values: tuple[str, ...] = (),
    fields: list[tuple[str, str]] | None = None,
) -> CachedObject:
    fields = fields or [("Cache-Control", "max-age=60")]
    headers = policy.combine_fields(fields)
    return CachedObject(
        key=key, vary_names=vary, vary_values=values, status=200, fields=fields,
        headers=headers, body=body, directives=policy.response_directives(headers),
        lifetime=60.0, request_time=1000.0, response_time=1000.0, initial_age=0.0,
    )


# ------------------------------------------------------------------------------ store


def test_replay_block_drops_per_hop_and_recomputed_fields() -> None:
    fields = [
        ("Content-Type", "text/plain"), ("Age", "5"), ("CDN-Cache-Control", "max-age=9"),
        ("Content-Length", "999"), ("Via", "1.0 a"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
    ]
    block = replay_block(fields, "1.0 a", 3).decode()
    assert block == (
        "Content-Type: text/plain\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        "Via: 1.0 a, 1.1 cdn-edge\r\nContent-Length: 3\r\n"
    )
    assert replay_block([], None, None) == b"Via: 1.1 cdn-edge\r\n"


def test_cached_object_head_and_age() -> None:
    o = obj("k", b"abc")
    assert o.out_block.endswith(b"Content-Length: 3\r\n")
    assert o.size == 3 + len(o.out_block) + OBJECT_OVERHEAD
    assert o.age(1010.0) == 10.0
    assert o.age(900.0) == 0.0  # a clock stepping back never makes it younger


def test_lookup_uri_miss_vary_miss_and_hit() -> None:
    tier = MemoryTier(1 << 20)
    assert tier.lookup("k", {}) == (None, "uri-miss")
    gz = obj("k", b"g", vary=("accept-encoding",), values=("gzip",))
    assert tier.put(gz)
    assert tier.lookup("k", {"accept-encoding": "br"}) == (None, "vary-miss")
    assert tier.lookup("k", {"accept-encoding": " gzip "})[0] is gz
    br = obj("k", b"b", vary=("accept-encoding",), values=("br",))
    tier.put(br)
    assert tier.lookup("k", {"accept-encoding": "br"})[0] is br
    assert tier.lookup("k", {"accept-encoding": "gzip"})[0] is gz
    assert len(tier) == 2
    assert tier.remove("k") == 2
    assert tier.lookup("k", {"accept-encoding": "gzip"}) == (None, "uri-miss")
    assert tier.bytes_used == 0


def test_changed_vary_drops_old_variants() -> None:
    tier = MemoryTier(1 << 20)
    tier.put(obj("k", vary=("accept-encoding",), values=("gzip",)))
    tier.put(obj("k", vary=("accept-encoding",), values=("br",)))
    lang = obj("k", vary=("accept-language",), values=("de",))
    tier.put(lang)
    assert len(tier) == 1
    assert tier.lookup("k", {"accept-language": "de"})[0] is lang


def test_byte_budget_and_lru_order() -> None:
    size = obj("a", b"x" * 1000).size
    tier = MemoryTier(3 * size + 10)
    for key in "abc":
        assert tier.put(obj(key, b"x" * 1000))
    assert tier.lookup("a", {})[0] is not None  # a is now the most recent
    tier.put(obj("d", b"x" * 1000))
    assert tier.lookup("b", {}) == (None, "uri-miss")  # b was least recently used
    assert all(tier.lookup(k, {})[0] is not None for k in "acd")
    assert tier.evictions == 1
    assert tier.bytes_used <= tier.budget


def test_eviction_of_a_last_variant_forgets_the_key() -> None:
    size = obj("a", b"x" * 1000, vary=("x",), values=("1",)).size
    tier = MemoryTier(size + 10)
    tier.put(obj("a", b"x" * 1000, vary=("x",), values=("1",)))
    tier.put(obj("b", b"x" * 1000))
    assert tier.lookup("a", {"x": "1"}) == (None, "uri-miss")
    assert tier.evictions == 1


def test_replacing_an_object_keeps_one_copy() -> None:
    tier = MemoryTier(1 << 20)
    tier.put(obj("a", b"1" * 100))
    tier.put(obj("a", b"2" * 200))
    assert len(tier) == 1
    assert tier.bytes_used == obj("a", b"2" * 200).size


def test_object_over_budget_is_refused() -> None:
    tier = MemoryTier(1000)
    assert not tier.put(obj("big", b"x" * 2000))
    assert len(tier) == 0 and tier.evictions == 0


# ------------------------------------------------------------------------------- fill


async def collect(reader: FillReader) -> bytes:
    return b"".join([bytes(piece) async for piece in reader])


async def test_read_while_write_in_order() -> None:
    fill = Fill("k", {})
    early = fill.reader()
    task = asyncio.create_task(collect(early))
    for i in range(5):
        fill.append(bytes([i]) * 10)
        await asyncio.sleep(0)
    late = fill.reader()  # joins mid-way and still reads from byte 0
    late_task = asyncio.create_task(collect(late))
    fill.append(b"end")
    fill.finish()
    expected = b"".join(bytes([i]) * 10 for i in range(5)) + b"end"
    assert await task == expected
    assert await late_task == expected
    assert fill.body() == expected
    assert not fill.has_readers


async def test_range_reader_across_chunks() -> None:
    fill = Fill("k", {})
    reader = fill.reader()
    reader.seek(3, 12)
    task = asyncio.create_task(collect(reader))
    for chunk in (b"0123", b"4567", b"89ab", b"cdef"):
        fill.append(chunk)
        await asyncio.sleep(0)
    fill.finish()
    assert await task == b"3456789ab"


async def test_range_beyond_a_short_body_fails() -> None:
    fill = Fill("k", {})
    reader = fill.reader()
    reader.seek(2, 10)
    fill.append(b"0123")
    fill.finish()
    with pytest.raises(FillError):
        await collect(reader)


async def test_failure_reaches_waiting_readers() -> None:
    fill = Fill("k", {})
    reader = fill.reader()
    task = asyncio.create_task(collect(reader))
    fill.append(b"part")
    await asyncio.sleep(0)
    fill.fail(ConnectionResetError("origin reset"))
    with pytest.raises(FillError):
        await task
    assert not fill.can_join()


async def test_failure_before_head() -> None:
    fill = Fill("k", {})
    fill.fail(FillError("nope"))
    with pytest.raises(FillError):
        await fill.head


async def test_unretained_fill_trims_and_applies_backpressure() -> None:
    fill = Fill("k", {}, window=100)
    reader = fill.reader()
    fill.stop_retaining()
    for _ in range(3):
        fill.append(b"x" * 50)
    waiting = asyncio.create_task(fill.wait_for_space())
    await asyncio.sleep(0)
    assert not waiting.done()  # 150 bytes ahead of the only reader, window 100
    it = reader.__aiter__()
    await it.__anext__()
    await it.__anext__()
    await asyncio.sleep(0)
    assert waiting.done()
    assert not fill.can_join()  # the first bytes are gone
    with pytest.raises(FillError):
        fill.reader()
    assert sum(len(c) for c in fill._chunks) <= 100
    await it.aclose()
    assert not fill.has_readers


async def test_backpressure_ends_when_the_last_reader_leaves() -> None:
    fill = Fill("k", {}, window=10)
    reader = fill.reader()
    fill.stop_retaining()
    fill.append(b"y" * 100)
    waiting = asyncio.create_task(fill.wait_for_space())
    await asyncio.sleep(0)
    assert not waiting.done()
    reader.close()
    await asyncio.wait_for(waiting, 1)
    assert not fill.has_readers
    assert fill._chunks == []


async def test_slow_and_fast_readers_of_an_unretained_fill() -> None:
    fill = Fill("k", {}, window=64)
    fast, slow = fill.reader(), fill.reader()
    fill.stop_retaining()
    data = bytes(range(256)) * 4

    async def writer() -> None:
        for i in range(0, len(data), 16):
            fill.append(data[i : i + 16])
            await fill.wait_for_space()
        fill.finish()

    async def slow_collect() -> bytes:
        out = []
        async for piece in slow:
            out.append(bytes(piece))
            await asyncio.sleep(0.001)
        return b"".join(out)

    results = await asyncio.gather(collect(fast), slow_collect(), writer())
    assert results[0] == results[1] == data


# ------------------------------------------------------------------------- spooled fills


class FileSpool:
    """A spool onto a real file, failing after `fail_after` bytes when asked to."""

    def __init__(self, path: Path, fail_after: int | None = None) -> None:
        self._write_fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(self._write_fd, b"HEADER")
        self.fd = os.open(path, os.O_RDONLY)
        self.body_offset = 6
        self.written = 0
        self.fail_after = fail_after

    def append(self, data: bytes) -> None:
        if self.fail_after is not None and self.written + len(data) > self.fail_after:
            raise OSError(28, "No space left on device")
        os.write(self._write_fd, data)
        self.written += len(data)

    def close(self) -> None:
        os.close(self._write_fd)
        os.close(self.fd)


async def read_all(reader: FillReader) -> bytes:
    return b"".join([bytes(piece) async for piece in reader])


async def test_spooled_fill_keeps_nothing_in_memory_and_never_waits(tmp_path: Path) -> None:
    spool = FileSpool(tmp_path / "obj")
    fill = Fill("k", {}, window=1 << 20)
    fill.attach_spool(spool)
    fill.stop_retaining()
    slow = fill.reader()  # reads nothing until the end: must not stall the fill
    pieces = [os.urandom(256 << 10) for _ in range(40)]  # 10 MiB, 10x the window
    for piece in pieces:
        fill.append(piece)
        await asyncio.wait_for(fill.wait_for_space(), 0.1)
    fill.finish()
    assert fill._chunks == []
    late = fill.reader()  # joins after the fill: reads from the file from byte 0
    assert fill.can_join()
    assert await read_all(slow) == await read_all(late) == b"".join(pieces)
    spool.close()


async def test_disk_failure_mid_fill_loses_no_byte_for_readers(tmp_path: Path) -> None:
    spool = FileSpool(tmp_path / "obj", fail_after=3 << 20)
    fill = Fill("k", {}, window=8 << 20)
    fill.attach_spool(spool)
    fill.stop_retaining()
    reader = fill.reader()
    pieces = [os.urandom(1 << 20) for _ in range(6)]
    for piece in pieces:
        fill.append(piece)
    fill.finish()
    assert fill.spool_error is not None and fill.spooled == 3 << 20
    assert await read_all(reader) == b"".join(pieces)  # 3 MiB from the file, 3 from memory
    spool.close()
