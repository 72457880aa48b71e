"""edge.meter: per-domain 5-minute usage buckets, exact to the byte, on an explicit clock."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.meter import (
    FIELDS,
    HIT,
    MISS,
    OUTCOME_KINDS,
    PASS,
    REFUSED,
    WINDOW,
    Bucket,
    Meter,
    merge,
    window_start,
)
from edge.metrics import OUTCOMES

A, B = "a.example.com", "b.example.com"
T0 = 1_764_150_000  # a window boundary (a multiple of 300), 2025-11-26 09:40 UTC


def test_fields_are_the_bucket_counters_in_order() -> None:
    names = [field.name for field in dataclasses.fields(Bucket)]
    assert names == ["domain", "start", *FIELDS]


def test_every_cache_outcome_has_a_kind() -> None:
    assert set(OUTCOME_KINDS) == set(OUTCOMES)
    assert {OUTCOME_KINDS["hit"], OUTCOME_KINDS["miss"], OUTCOME_KINDS["bypass"]} == {
        HIT,
        MISS,
        PASS,
    }
    assert OUTCOME_KINDS["refused"] == REFUSED


@pytest.mark.parametrize(
    ("now", "start"),
    [
        (0.0, 0),
        (299.999, 0),
        (299.9999999, 0),
        (300.0, 300),
        (300.001, 300),
        (599.999, 300),
        (T0 - 0.001, T0 - WINDOW),
        (float(T0), T0),
        (T0 + 299.999, T0),
    ],
)
def test_window_start(now: float, start: int) -> None:
    assert window_start(now) == start


def test_request_at_299_999_and_at_300_fall_in_adjacent_buckets() -> None:
    meter = Meter()
    meter.record(A, 299.999, HIT, 200, 100, 60)
    meter.record(A, 300.000, HIT, 200, 10, 6)
    assert meter.take_all() == [
        Bucket(A, 0, requests=1, bytes_sent=100, body_bytes=60, hits=1, status_2xx=1),
        Bucket(A, 300, requests=1, bytes_sent=10, body_bytes=6, hits=1, status_2xx=1),
    ]


def test_counts_are_exact_per_domain() -> None:
    meter = Meter()
    meter.record(A, T0 + 1, HIT, 200, 1000, 800)
    meter.record(A, T0 + 2, MISS, 206, 500, 300)
    meter.record(A, T0 + 3, MISS, 304, 120, 0)
    meter.record(A, T0 + 4, PASS, 502, 90, 20)
    meter.record(A, T0 + 5, REFUSED, 403, 70, 10)
    meter.record(A, T0 + 6, PASS, 101, 80, 0)
    meter.record(A, T0 + 7, PASS, 404, 0, 0)  # aborted before a byte was written
    meter.add_origin(A, T0 + 2, 300)
    meter.add_origin(A, T0 + 8, 4096)  # a fill whose clients all left
    meter.record(B, T0 + 9, HIT, 200, 5, 1)
    meter.add_origin(B, T0 + WINDOW - 0.5, 7)
    assert meter.take_all() == [
        Bucket(
            A,
            T0,
            requests=7,
            bytes_sent=1860,
            body_bytes=1130,
            origin_bytes=4396,
            hits=1,
            misses=2,
            passes=3,
            refused=1,
            status_1xx=1,
            status_2xx=2,
            status_3xx=1,
            status_4xx=2,
            status_5xx=1,
        ),
        Bucket(B, T0, requests=1, bytes_sent=5, body_bytes=1, origin_bytes=7, hits=1, status_2xx=1),
    ]
    assert meter.take_all() == []


def test_status_outside_100_599_counts_in_requests_only() -> None:
    meter = Meter()
    meter.record(A, T0, PASS, 999, 10, 0)
    meter.record(A, T0, PASS, 0, 0, 0)
    (bucket,) = meter.take_all()
    assert (bucket.requests, bucket.passes, bucket.bytes_sent) == (2, 2, 10)
    assert sum(getattr(bucket, f"status_{n}xx") for n in range(1, 6)) == 0


def test_take_closed_waits_for_the_end_of_the_window_and_the_grace() -> None:
    meter = Meter(grace=1.0)
    meter.record(A, T0 + 10, HIT, 200, 1, 1)
    meter.record(A, T0 + WINDOW + 10, HIT, 200, 2, 2)  # the next window, still open
    assert meter.take_closed(T0 + WINDOW - 0.001) == []
    assert meter.take_closed(T0 + WINDOW + 0.999) == []
    closed = meter.take_closed(T0 + WINDOW + 1.0)
    assert [(b.start, b.bytes_sent) for b in closed] == [(T0, 1)]
    assert meter.take_closed(T0 + WINDOW + 1.0) == []  # forgotten once taken
    assert [(b.start, b.bytes_sent) for b in meter.take_all()] == [(T0 + WINDOW, 2)]


def test_take_closed_returns_every_closed_window_oldest_first() -> None:
    meter = Meter(grace=0.0)
    for i in (3, 1, 2):
        meter.record(B, T0 + i * WINDOW, HIT, 200, i, 0)
        meter.record(A, T0 + i * WINDOW, HIT, 200, i, 0)
    closed = meter.take_closed(T0 + 3 * WINDOW)
    assert [(b.start, b.domain) for b in closed] == [
        (T0 + WINDOW, A),
        (T0 + WINDOW, B),
        (T0 + 2 * WINDOW, A),
        (T0 + 2 * WINDOW, B),
    ]


def test_recording_after_a_take_starts_new_buckets_that_add_up() -> None:
    meter = Meter()
    meter.record(A, T0 + 1, HIT, 200, 10, 5)
    first = meter.take_all()  # a periodic flush of the open window
    meter.record(A, T0 + 2, MISS, 200, 20, 15)
    # A late record for a window already taken: counted, in a bucket of its own.
    meter.record(A, T0 - 1, HIT, 200, 1, 1)
    second = meter.take_all()
    assert [(b.start, b.requests) for b in second] == [(T0 - WINDOW, 1), (T0, 1)]
    (total, late) = sorted(merge(first + second), key=lambda b: -b.start)
    assert total == Bucket(
        A, T0, requests=2, bytes_sent=30, body_bytes=20, hits=1, misses=1, status_2xx=2
    )
    assert late.start == T0 - WINDOW


def test_merge_sums_same_domain_and_window_and_orders_by_window_then_domain() -> None:
    workers = [Meter() for _ in range(3)]
    for n, worker in enumerate(workers, start=1):
        worker.record(B, T0 + n, HIT, 200, 100 * n, 10 * n)
        worker.record(A, T0 + n, MISS, 500, n, 0)
        worker.add_origin(A, T0 + WINDOW + n, 1000 * n)
    merged = merge(bucket for worker in workers for bucket in worker.take_all())
    assert merged == [
        Bucket(A, T0, requests=3, bytes_sent=6, misses=3, status_5xx=3),
        Bucket(B, T0, requests=3, bytes_sent=600, body_bytes=60, hits=3, status_2xx=3),
        Bucket(A, T0 + WINDOW, origin_bytes=6000),
    ]


REQUESTS = st.lists(
    st.tuples(
        st.integers(0, 3),  # worker
        st.sampled_from([A, B, "c.example.com"]),
        st.floats(T0 - 10, T0 + 3 * WINDOW),  # now
        st.sampled_from([HIT, MISS, PASS, REFUSED]),
        st.sampled_from([100, 200, 206, 304, 404, 416, 500, 503]),
        st.integers(0, 2**40),  # bytes sent
        st.integers(0, 2**40),  # body bytes
        st.integers(0, 2**30),  # origin bytes
    ),
    max_size=200,
)


@given(REQUESTS, st.floats(T0, T0 + 4 * WINDOW))
def test_workers_flushed_at_any_time_merge_to_the_exact_totals(
    requests: list[tuple[int, str, float, int, int, int, int, int]], cut: float
) -> None:
    """However requests spread over workers and whenever closed windows are taken, the merged
    buckets are what one meter counting everything holds, and every total is the plain sum."""
    one, workers = Meter(), [Meter() for _ in range(4)]
    taken: list[Bucket] = []
    for worker_no, domain, now, kind, status, sent, body, origin in sorted(
        requests, key=lambda r: r[2]
    ):
        for meter in (one, workers[worker_no]):
            meter.record(domain, now, kind, status, sent, body)
            meter.add_origin(domain, now, origin)
        if now > cut:  # a take in the middle of the stream
            for worker in workers:
                taken += worker.take_closed(now)
    merged = merge(taken + [b for worker in workers for b in worker.take_all()])
    assert merged == one.take_all()
    assert sum(b.requests for b in merged) == len(requests)
    assert sum(b.bytes_sent for b in merged) == sum(r[5] for r in requests)
    assert sum(b.body_bytes for b in merged) == sum(r[6] for r in requests)
    assert sum(b.origin_bytes for b in merged) == sum(r[7] for r in requests)
    for b in merged:
        assert b.requests == b.hits + b.misses + b.passes + b.refused
        assert b.requests == sum(getattr(b, f"status_{n}xx") for n in range(1, 6))
        assert b.start % WINDOW == 0


def test_json_round_trip() -> None:
    meter = Meter()
    meter.record(A, T0, HIT, 200, 2**53 + 1, 7)  # beyond a double's exact integers
    (bucket,) = meter.take_all()
    data = json.loads(json.dumps(bucket.to_json()))
    assert data == {
        "domain": A,
        "start": T0,
        "requests": 1,
        "bytes_sent": 2**53 + 1,
        "body_bytes": 7,
        "origin_bytes": 0,
        "hits": 1,
        "misses": 0,
        "passes": 0,
        "refused": 0,
        "status_1xx": 0,
        "status_2xx": 1,
        "status_3xx": 0,
        "status_4xx": 0,
        "status_5xx": 0,
    }
    assert Bucket.from_json(data) == bucket


GOOD = Bucket(A, T0, requests=1).to_json()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([GOOD], "must be an object"),
        ({k: v for k, v in GOOD.items() if k != "hits"}, "differ.*hits"),
        ({**GOOD, "extra": 1}, "differ.*extra"),
        ({**GOOD, "domain": ""}, "domain"),
        ({**GOOD, "domain": 5}, "domain"),
        ({**GOOD, "start": T0 + 1}, "multiple of 300"),
        ({**GOOD, "start": -300}, "multiple of 300"),
        ({**GOOD, "start": float(T0)}, "multiple of 300"),
        ({**GOOD, "requests": -1}, "requests"),
        ({**GOOD, "bytes_sent": 1.0}, "bytes_sent"),
        ({**GOOD, "hits": True}, "hits"),
        ({**GOOD, "status_2xx": "1"}, "status_2xx"),
    ],
)
def test_from_json_refuses_anything_else(data: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Bucket.from_json(data)
