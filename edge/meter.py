"""Usage metering: what each domain was served, per 5-minute window (issue 5).

Bills are computed from these counts, so they are exact integers, never sampled. A worker holds
one `Meter`; `record` runs once per answered request (hit path included), so it is one window
check, one dict lookup and integer adds into a list. Buckets leave the worker as `Bucket`s, whose
JSON form (`Bucket.to_json`) crosses the supervisor's control socket and, in batches, the network
to the control plane (edge/spool.py); counts are additive, so buckets of the same (domain, window)
from several workers, flushes or edges are summed (`merge`), never replaced.

A bucket covers [start, start + WINDOW) with start a multiple of WINDOW seconds since the UTC
epoch. A request is counted in the window of the `now` given to `record` (the time it ended);
the bytes of a long response are counted as they are sent (`add_sent`, every second, by
edge.server.HttpServer.meter_progress), so per-window bandwidth is right across boundaries.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

WINDOW = 300  # seconds; bandwidth of a bucket = bytes_sent * 8 / WINDOW
GRACE = 1.0  # a window is closed this long after its end (clock skew between processes)

# Every counter of a bucket, in the order of `Meter`'s lists; the names are the JSON keys.
FIELDS = (
    "requests",
    "bytes_sent",  # status lines, header blocks and bodies as written, aborted transfers too
    "body_bytes",  # body bytes only (the `bytes_sent` of a HEAD or a 304 has none)
    "origin_bytes",  # body bytes fetched from the origin (a fill shared by many counts once)
    "hits",
    "misses",
    "passes",  # neither hit nor miss: bypassed, not a GET/HEAD, origin errors
    "refused",  # answered by the edge itself: suspended or blocked domain, bad request
    "status_1xx",
    "status_2xx",
    "status_3xx",
    "status_4xx",
    "status_5xx",
)

# What the cache did for a request: exactly one per request, so that
# requests = hits + misses + passes + refused.
HIT, MISS, PASS, REFUSED = range(4)

# The kind of each Cache-Status outcome that edge.metrics.EdgeStats.account is given. "stale" is
# a hit when a stale response was served; a request forwarded because its stored response was
# stale must be recorded as MISS by its caller.
OUTCOME_KINDS: Mapping[str, int] = {
    "hit": HIT,
    "stale": HIT,
    "revalidated": HIT,  # the body came from the cache; the origin only said 304
    "miss": MISS,
    "uri-miss": MISS,
    "vary-miss": MISS,
    "request": MISS,  # fetched because the request's directives refused the stored response
    "bypass": PASS,
    "method": PASS,
    "error": PASS,
    "refused": REFUSED,
}


def window_start(now: float) -> int:
    """The start of the window holding `now` (seconds since the epoch): 299.999 -> 0, 300 -> 300."""
    return math.floor(now) // WINDOW * WINDOW


@dataclass(frozen=True, slots=True)
class Bucket:
    """One domain's counts in one window, or a part of them (several parts add up)."""

    domain: str
    start: int  # seconds since the UTC epoch, a multiple of WINDOW
    requests: int = 0
    bytes_sent: int = 0
    body_bytes: int = 0
    origin_bytes: int = 0
    hits: int = 0
    misses: int = 0
    passes: int = 0
    refused: int = 0
    status_1xx: int = 0
    status_2xx: int = 0
    status_3xx: int = 0
    status_4xx: int = 0
    status_5xx: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.domain, self.start)

    def counts(self) -> list[int]:
        return [getattr(self, name) for name in FIELDS]

    def to_json(self) -> dict[str, str | int]:
        """{"domain": D, "start": S, "requests": N, ...every name of FIELDS...}."""
        out: dict[str, str | int] = {"domain": self.domain, "start": self.start}
        for name in FIELDS:
            out[name] = getattr(self, name)
        return out

    @classmethod
    def from_json(cls, data: object) -> Bucket:
        """A bucket from `to_json`'s form; ValueError unless it is exactly that form (every
        field, no other, counts non-negative integers, start on a window boundary)."""
        if not isinstance(data, dict):
            raise ValueError("a bucket must be an object")
        expected = {"domain", "start", *FIELDS}
        if set(data) != expected:
            diff = sorted(set(data) ^ expected)
            raise ValueError(f"bucket fields differ from the expected ones: {', '.join(diff)}")
        domain, start = data["domain"], data["start"]
        if not isinstance(domain, str) or not domain:
            raise ValueError("bucket domain must be a non-empty string")
        if not _count(start) or start % WINDOW:
            raise ValueError(f"bucket start must be a multiple of {WINDOW}: {start!r}")
        counts = [data[name] for name in FIELDS]
        for name, value in zip(FIELDS, counts, strict=True):
            if not _count(value):
                raise ValueError(f"bucket {name} must be a non-negative integer: {value!r}")
        return cls(domain, start, *counts)


def _count(value: object) -> bool:
    return type(value) is int and value >= 0


def merge(buckets: Iterable[Bucket]) -> list[Bucket]:
    """The sum of `buckets` per (domain, window), ordered by window then domain."""
    sums: dict[tuple[str, int], list[int]] = {}
    for bucket in buckets:
        into = sums.get(bucket.key)
        if into is None:
            sums[bucket.key] = bucket.counts()
        else:
            for i, n in enumerate(bucket.counts()):
                into[i] += n
    return [
        Bucket(domain, start, *counts)
        for (domain, start), counts in sorted(sums.items(), key=lambda item: item[0][::-1])
    ]


class Meter:
    """One process's counts per window and domain, until they are taken."""

    def __init__(self, grace: float = GRACE) -> None:
        self.grace = grace
        self._windows: dict[int, dict[str, list[int]]] = {}
        # The window of the latest record, so that most records skip computing one.
        self._start = 0.0
        self._end = 0.0
        self._current: dict[str, list[int]] = {}

    def record(
        self, domain: str, now: float, kind: int, status: int, bytes_sent: int, body_bytes: int
    ) -> None:
        """Count one answered request: `kind` is HIT, MISS, PASS or REFUSED; `bytes_sent` and
        `body_bytes` are what was written for it (edge.server.Exchange), however it ended."""
        if not self._start <= now < self._end:
            self._enter(now)
        counts = self._current.get(domain)
        if counts is None:
            counts = self._current[domain] = [0] * len(FIELDS)
        # Indexes into FIELDS, as literals: a global's lookup per counter costs 15 % here.
        counts[0] += 1
        counts[1] += bytes_sent
        counts[2] += body_bytes
        counts[4 + kind] += 1  # hits, misses, passes or refused
        if 100 <= status < 600:
            counts[7 + status // 100] += 1  # status_1xx..status_5xx

    def add_origin(self, domain: str, now: float, body_bytes: int) -> None:
        """Count body bytes read from `domain`'s origin (where they are read: one fill may serve
        many requests, or none when every client left)."""
        self._counts(domain, now)[3] += body_bytes

    def add_sent(self, domain: str, now: float, bytes_sent: int, body_bytes: int) -> None:
        """Count bytes a response still in progress has sent since its last count (its request
        is counted by `record` when it ends, with the rest of its bytes)."""
        counts = self._counts(domain, now)
        counts[1] += bytes_sent
        counts[2] += body_bytes

    def _counts(self, domain: str, now: float) -> list[int]:
        if not self._start <= now < self._end:
            self._enter(now)
        counts = self._current.get(domain)
        if counts is None:
            counts = self._current[domain] = [0] * len(FIELDS)
        return counts

    def _enter(self, now: float) -> None:
        start = window_start(now)
        # Floats, as `now` is: a float compared with an int costs a conversion each time (780
        # instructions of every request's record).
        self._start, self._end = float(start), float(start + WINDOW)
        self._current = self._windows.setdefault(start, {})

    def take_closed(self, now: float) -> list[Bucket]:
        """Return and forget the buckets of windows that ended at least `grace` s before `now`."""
        closed = [start for start in self._windows if start + WINDOW + self.grace <= now]
        return self._take(sorted(closed))

    def take_all(self) -> list[Bucket]:
        """Return and forget every bucket, the open window's too (a stop, or a periodic flush:
        the rest of a window is counted into new buckets that add up with these)."""
        return self._take(sorted(self._windows))

    def _take(self, starts: list[int]) -> list[Bucket]:
        out: list[Bucket] = []
        for start in starts:
            for domain, counts in sorted(self._windows.pop(start).items()):
                out.append(Bucket(domain, start, *counts))
        if self._start not in self._windows:  # the next record finds its window again
            self._start = self._end = 0.0
        return out
