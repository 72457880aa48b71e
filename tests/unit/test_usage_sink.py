"""The supervisor's usage path (edge.spool.UsageSink) and the spool's batch size cap, on a
simulated clock: sealed when a window closes, split past MAX_BATCH_BUCKETS, bounded without a
control plane."""

from __future__ import annotations

from pathlib import Path

from edge.meter import GRACE, WINDOW, Bucket, merge
from edge.spool import MAX_BATCH_BUCKETS, Spool, UsageSink

T0 = 1_764_150_000 // WINDOW * WINDOW


def buckets(n: int, start: int = T0, requests: int = 1) -> list[Bucket]:
    return [Bucket(f"d{i}.example.com", start, requests=requests) for i in range(n)]


def test_add_never_makes_a_batch_bigger_than_the_cap(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "edge-1")
    assert spool.add(buckets(MAX_BATCH_BUCKETS - 1)) == 0
    assert spool.add(buckets(2, T0 + WINDOW)) == 1  # the open batch is sealed first
    assert spool.add(buckets(2 * MAX_BATCH_BUCKETS + 5, T0 + 2 * WINDOW)) == 3
    spool.seal()
    batches = spool.pending()
    sizes = [MAX_BATCH_BUCKETS - 1, 2, MAX_BATCH_BUCKETS, MAX_BATCH_BUCKETS, 5]
    assert [len(b.buckets) for b in batches] == sizes
    total = merge(b for batch in batches for b in batch.buckets)
    assert sum(b.requests for b in total) == 3 * MAX_BATCH_BUCKETS + 6


def test_the_open_batch_is_sealed_when_its_window_closes(tmp_path: Path) -> None:
    now = [T0 + 10.0]
    sink = UsageSink(Spool(tmp_path, "edge-1"), None, keep=100, clock=lambda: now[0])
    for second in range(int(WINDOW + GRACE) + 2):
        now[0] = T0 + 10.0 + second
        sink.receive(buckets(2, int(now[0]) // WINDOW * WINDOW))
        sink.tick()
        sealed = sink.spool.pending()
        if now[0] < T0 + WINDOW + GRACE:
            assert not sealed, second
    (batch,) = sink.spool.pending()  # sealed once, at T0 + WINDOW + GRACE
    assert {b.start for b in batch.buckets} == {T0, T0 + WINDOW}
    assert sum(b.requests for b in batch.buckets) == 2 * (WINDOW - 10 + int(GRACE) + 1)
    assert sink.spool.open_buckets  # what came after the seal


def test_without_a_control_plane_the_oldest_batches_are_dropped_and_counted(
    tmp_path: Path,
) -> None:
    now = [float(T0)]
    sink = UsageSink(Spool(tmp_path, "edge-1"), None, keep=3, clock=lambda: now[0])
    for window in range(6):
        sink.receive(buckets(1, T0 + window * WINDOW, requests=window + 1))
        sink.tick(seal=True)
    kept = sink.spool.pending()
    assert sink.dropped == 3
    assert [b.buckets[0].requests for b in kept] == [4, 5, 6]  # the newest are kept


async def test_stop_seals_what_was_received(tmp_path: Path) -> None:
    sink = UsageSink(Spool(tmp_path, "edge-1"), None, keep=10)
    sink.start()
    sink.receive(buckets(3))
    await sink.stop(flush_timeout=1.0)
    (batch,) = Spool(tmp_path, "edge-1").pending()
    assert len(batch.buckets) == 3
