"""edge.spool.Spool: batches durable on disk, unique ids, crashes and full disks lose nothing."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from edge.meter import WINDOW, Bucket
from edge.spool import OPEN, Batch, Spool, SpoolError

A, B = "a.example.com", "b.example.com"
T0 = 1_764_150_000
EDGE = "edge-1"


def bucket(domain: str = A, start: int = T0, sent: int = 100) -> Bucket:
    return Bucket(domain, start, requests=1, bytes_sent=sent, hits=1, status_2xx=1)


def files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def disk_full(monkeypatch: pytest.MonkeyPatch, call: str = "fsync") -> None:
    def fail(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, call, fail)


def test_append_writes_one_batch_in_the_posted_form(tmp_path: Path) -> None:
    spool = Spool(tmp_path, EDGE)
    batch_id = spool.append([bucket(A), bucket(B, sent=7)])
    (name,) = files(tmp_path)
    assert name.endswith(f"-{batch_id}.json")
    assert json.loads((tmp_path / name).read_bytes()) == {
        "batch": batch_id,
        "edge": EDGE,
        "buckets": [bucket(A).to_json(), bucket(B, sent=7).to_json()],
    }
    assert spool.pending() == [Batch(batch_id, EDGE, (bucket(A), bucket(B, sent=7)))]


def test_pending_oldest_first_and_acknowledge_deletes(tmp_path: Path) -> None:
    spool = Spool(tmp_path, EDGE)
    ids = [spool.append([bucket(sent=n)]) for n in range(5)]
    assert [b.id for b in spool.pending()] == ids
    assert [b.id for b in spool.pending(limit=2)] == ids[:2]
    spool.acknowledge(ids[1])
    spool.acknowledge(ids[1])  # twice: no error
    spool.acknowledge("unknown")
    assert [b.id for b in spool.pending()] == [ids[0], *ids[2:]]


def test_batches_survive_reopening_and_ids_are_unique_across_restarts(tmp_path: Path) -> None:
    ids: list[str] = []
    for _ in range(3):  # three "restarts"
        spool = Spool(tmp_path, EDGE)
        for _ in range(20):
            ids.append(spool.append([bucket(sent=len(ids))]))
    assert len(set(ids)) == 60
    pending = Spool(tmp_path, EDGE).pending()
    assert [b.id for b in pending] == ids
    assert [b.buckets[0].bytes_sent for b in pending] == list(range(60))


def test_a_write_cut_by_a_crash_is_never_a_batch_and_is_removed_at_open(tmp_path: Path) -> None:
    spool = Spool(tmp_path, EDGE)
    kept = spool.append([bucket()])
    # What a kill between open() and rename() leaves: a partial temp file.
    partial = json.dumps(Batch("x", EDGE, (bucket(),)).to_json())[:30]
    (tmp_path / ".tmp-0123456789abcdef").write_text(partial)
    assert [b.id for b in spool.pending()] == [kept]
    reopened = Spool(tmp_path, EDGE)
    assert [b.id for b in reopened.pending()] == [kept]
    assert files(tmp_path) == [f for f in files(tmp_path) if not f.startswith(".tmp-")]
    assert len(files(tmp_path)) == 1


@pytest.mark.parametrize("call", ["write", "fsync", "replace"])
def test_a_full_disk_raises_and_changes_nothing_spooled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    spool = Spool(tmp_path, EDGE)
    kept = spool.append([bucket()])
    before = {name: (tmp_path / name).read_bytes() for name in files(tmp_path)}
    with monkeypatch.context() as patch:
        disk_full(patch, call)
        with pytest.raises(SpoolError, match=r"cannot write a batch.*No space left on device"):
            spool.append([bucket(B)])
    assert {name: (tmp_path / name).read_bytes() for name in files(tmp_path)} == before
    assert [b.id for b in spool.pending()] == [kept]
    spool.append([bucket(B)])  # the disk has room again
    assert len(spool.pending()) == 2


def test_add_sums_into_the_open_batch_and_seal_makes_it_pending(tmp_path: Path) -> None:
    spool = Spool(tmp_path, EDGE)
    assert spool.seal() is None
    spool.add([])
    assert files(tmp_path) == []
    spool.add([bucket(A, sent=1), bucket(B, sent=2)])
    spool.add([bucket(A, sent=10), bucket(A, start=T0 + WINDOW, sent=5)])
    assert spool.pending() == []  # open: not shipped yet
    expected = [
        Bucket(A, T0, requests=2, bytes_sent=11, hits=2, status_2xx=2),
        Bucket(B, T0, requests=1, bytes_sent=2, hits=1, status_2xx=1),
        bucket(A, start=T0 + WINDOW, sent=5),
    ]
    assert spool.open_buckets == expected
    on_disk = Batch.from_json(json.loads((tmp_path / OPEN).read_bytes()))
    assert list(on_disk.buckets) == expected
    batch_id = spool.seal()
    assert spool.pending() == [Batch(str(batch_id), EDGE, tuple(expected))]
    assert spool.open_buckets == []
    assert OPEN not in files(tmp_path)
    spool.add([bucket()])
    second = spool.seal()
    assert second not in (None, batch_id)
    assert [b.id for b in spool.pending()] == [batch_id, second]


def test_an_open_batch_left_by_a_kill_is_sealed_once_at_open(tmp_path: Path) -> None:
    killed = Spool(tmp_path, EDGE)
    killed.add([bucket(sent=3)])
    killed.add([bucket(sent=4)])
    open_id = json.loads((tmp_path / OPEN).read_bytes())["batch"]
    # The process dies here; a new one opens the spool (twice: a second restart).
    assert [b.id for b in Spool(tmp_path, EDGE).pending()] == [open_id]
    (batch,) = Spool(tmp_path, EDGE).pending()
    assert batch.id == open_id
    assert batch.buckets == (Bucket(A, T0, requests=2, bytes_sent=7, hits=2, status_2xx=2),)


def test_a_failed_add_keeps_the_sum_in_memory_and_the_last_one_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, EDGE)
    spool.add([bucket(sent=1)])
    with monkeypatch.context() as patch:
        disk_full(patch)
        with pytest.raises(SpoolError):
            spool.add([bucket(sent=2)])
        with pytest.raises(SpoolError):
            spool.seal()
    on_disk = Batch.from_json(json.loads((tmp_path / OPEN).read_bytes()))
    assert on_disk.buckets[0].bytes_sent == 1
    assert spool.open_buckets[0].bytes_sent == 3
    batch_id = spool.seal()  # writes what the failed add could not, then seals
    assert [(b.id, b.buckets[0].bytes_sent) for b in spool.pending()] == [(batch_id, 3)]


def test_an_add_whose_seal_fails_keeps_the_new_buckets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full open batch is sealed before new buckets go in; if that seal fails, the new
    buckets must stay in memory too (they were lost: found by a review)."""
    monkeypatch.setattr("edge.spool.MAX_BATCH_BUCKETS", 3)
    spool = Spool(tmp_path, EDGE)
    spool.add([bucket(domain=f"d{n}.example.com", sent=100) for n in range(3)])
    with monkeypatch.context() as patch:
        disk_full(patch, "replace")
        with pytest.raises(SpoolError):
            spool.add([bucket(domain="new.example.com", sent=999)])
    spool.seal()
    total = sum(b.bytes_sent for batch in spool.pending() for b in batch.buckets)
    assert total == 3 * 100 + 999


def test_a_batch_of_the_largest_buckets_fits_the_control_planes_body_limit() -> None:
    """The control plane refuses bodies over 8 MiB, and a refused batch would never ship."""
    from edge.spool import MAX_BATCH_BUCKETS

    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 57]) + ".com"
    big = Bucket(name, T0, *([10**15] * 13))
    body = json.dumps(
        Batch("f" * 32, "e" * 64, (big,) * MAX_BATCH_BUCKETS).to_json(), separators=(",", ":")
    )
    assert len(body) < 8 * 2**20


def test_unreadable_batches_are_set_aside_not_shipped(tmp_path: Path) -> None:
    spool = Spool(tmp_path, EDGE)
    good = spool.append([bucket()])
    (tmp_path / "00000000000000000001-deadbeef.json").write_text("{not json")
    other = Batch("cafe", EDGE, (bucket(),)).to_json()
    (tmp_path / "00000000000000000002-babe.json").write_text(json.dumps(other))  # id mismatch
    assert [b.id for b in spool.pending()] == [good]
    assert sorted(f for f in files(tmp_path) if f.endswith(".bad")) == [
        "00000000000000000001-deadbeef.bad",
        "00000000000000000002-babe.bad",
    ]
    (tmp_path / OPEN).write_text('{"batch": "x"}')
    assert [b.id for b in Spool(tmp_path, EDGE).pending()] == [good]
    assert [f for f in files(tmp_path) if f.startswith("open-") and f.endswith(".bad")]
