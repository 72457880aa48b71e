"""edge.ratelimit: token buckets with bounded memory, and the speed limit's pacing (issue 7)."""

from __future__ import annotations

import tracemalloc

import pytest

from edge.ratelimit import MAX_CLIENTS, Pace, RateLimit, RateLimiter

LIMIT = RateLimit(rate=2.0, burst=3)


def test_burst_then_rate() -> None:
    limiter = RateLimiter()
    assert [limiter.retry_after("d", "1.1.1.1", LIMIT, 100.0) for _ in range(3)] == [0, 0, 0]
    assert limiter.retry_after("d", "1.1.1.1", LIMIT, 100.0) == 1  # 0.5 s to a token: 1 s
    assert limiter.retry_after("d", "1.1.1.1", LIMIT, 100.5) == 0  # one token back
    assert limiter.retry_after("d", "1.1.1.1", LIMIT, 100.5) == 1
    # Refused requests take nothing: after 0.5 s more there is a token again.
    assert limiter.retry_after("d", "1.1.1.1", LIMIT, 101.0) == 0
    # A long pause refills the burst, not more.
    assert [limiter.retry_after("d", "1.1.1.1", LIMIT, 200.0) for _ in range(4)] == [0, 0, 0, 1]


def test_buckets_are_per_client_and_per_domain() -> None:
    limiter = RateLimiter()
    one = RateLimit(rate=1.0, burst=1)
    assert limiter.retry_after("d", "1.1.1.1", one, 0.0) == 0
    assert limiter.retry_after("d", "1.1.1.1", one, 0.0) == 1
    assert limiter.retry_after("d", "2.2.2.2", one, 0.0) == 0
    assert limiter.retry_after("e", "1.1.1.1", one, 0.0) == 0


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    limiter = RateLimiter()
    slow = RateLimit(rate=0.1, burst=1)  # one request per 10 s
    assert limiter.retry_after("d", "c", slow, 0.0) == 0
    assert limiter.retry_after("d", "c", slow, 0.0) == 10
    assert limiter.retry_after("d", "c", slow, 2.5) == 8  # 7.5 s left: 8
    fast = RateLimit(rate=1000.0, burst=1)
    assert limiter.retry_after("d", "f", fast, 0.0) == 0
    assert limiter.retry_after("d", "f", fast, 0.0) == 1  # never 0 when refusing


def test_flood_of_distinct_addresses_is_bounded() -> None:
    limiter = RateLimiter(max_clients=MAX_CLIENTS)
    tracemalloc.start()
    try:
        for n in range(200_000):
            address = f"{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}.7"
            assert limiter.retry_after("d", address, LIMIT, n * 1e-6) == 0
            if n == 100_000:
                midway = tracemalloc.get_traced_memory()[0]
        total = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(limiter) == MAX_CLIENTS
    # The second 100 000 addresses cost no more memory than the first (allocator noise only),
    # and the whole table stays within its documented size (about 220 bytes a client).
    assert total - midway < 1 << 20
    assert total < MAX_CLIENTS * 300
    # A client seen recently keeps its bucket through the flood.
    limiter2 = RateLimiter(max_clients=1000)
    one = RateLimit(rate=0.001, burst=1)
    assert limiter2.retry_after("d", "abuser", one, 0.0) == 0
    for n in range(5000):
        limiter2.retry_after("d", f"10.0.{n >> 8}.{n & 255}", one, 0.0)
        if n % 500 == 0:
            assert limiter2.retry_after("d", "abuser", one, 0.0) > 0
    assert len(limiter2) == 1000


def test_pace_lets_the_free_bytes_through_then_paces() -> None:
    pace = Pace(rate=100_000, free=50_000)
    assert pace.pieces(30_000) == [(0, 30_000)]
    assert pace.delay(30_000, 10.0) == 0.0
    # 20 000 free bytes left, then pieces of a tenth of a second's worth.
    assert pace.pieces(45_000) == [(0, 20_000), (20_000, 30_000), (30_000, 40_000),
                                   (40_000, 45_000)]
    assert pace.delay(20_000, 10.0) == 0.0
    assert pace.delay(10_000, 10.0) == pytest.approx(0.1)  # 10 000 over the free bytes
    assert pace.delay(10_000, 10.05) == pytest.approx(0.15)
    assert pace.delay(5_000, 11.0) == 0.0  # a slow client: no waiting to catch up
    assert pace.sent == 75_000


def test_pace_without_free_bytes_and_small_rates() -> None:
    pace = Pace(rate=1024, free=0)
    assert pace.piece == 4096  # never pieces smaller than 4 KiB
    assert pace.pieces(10_000) == [(0, 4096), (4096, 8192), (8192, 10_000)]
    assert pace.delay(4096, 0.0) == 4.0


@pytest.mark.parametrize("limit", [RateLimit(0.01, 1), RateLimit(3.0, 2), RateLimit(1000.0, 50)])
def test_a_new_client_is_always_admitted_whatever_the_clock_reads(limit: RateLimit) -> None:
    """Found by the flood test: now + interval - burst * interval was a hair after now for some
    clock readings (1000.003 with rate 0.01), so a client never seen got 429."""
    for step in range(20_000):
        now = 1000.0 + step * 0.001
        assert RateLimiter().retry_after("d", "192.0.2.1", limit, now) == 0, now
