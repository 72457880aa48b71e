"""Rate and speed limits of a domain (issue 7): how often a client may ask, how fast a
response goes out. Pure state machines; the caller passes the clock.

Rate limit: a token bucket per (domain, client address): `rate` requests per second on
average, `burst` at once. A request finding the bucket empty is refused with 429 and
`Retry-After` (RFC 9110 10.2.3; RFC 6585 4): the whole seconds until one token is back. The
bucket is kept as one number, the time at which it would be full again (GCRA, the generic cell
rate algorithm: the same decisions as a token bucket, one float per client).

Per worker, honestly: every worker process keeps its own buckets, and the kernel spreads a
client's connections over the workers (SO_REUSEPORT), so an edge with N workers lets a client
through at up to N x `rate` (N x `burst` at once) when it opens several connections; a client on
one keep-alive connection stays on one worker and gets `rate` exactly. Sharing buckets between
processes would cost a round trip on every request; set `rate` with the worker count in mind.

Bounded memory under a flood of distinct addresses: the buckets live in an LRU of at most
`max_clients` entries (per worker, all domains together; about 220 bytes each, so 14 MiB at the
default bound). The bucket evicted is the one least recently used, which is the one most likely
full again anyway; a client whose bucket was evicted comes back with a full burst, so a flood
can at worst give a paused abuser one more burst.

Speed limit (`SpeedLimit`, per path rule): a response goes out at `rate` bytes per second,
after its first `after` bytes at full speed (nginx `limit_rate` / `limit_rate_after`), per
response, which on HTTP/1.1 is also per connection as a connection carries one response at a
time. `Pace` is the per-response state the data path consults (`edge.server.Exchange.write`);
unlimited responses carry no Pace and pay nothing per write.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge.config import CacheRule

__all__ = ["MAX_CLIENTS", "Pace", "RateLimit", "RateLimiter", "SpeedLimit"]

MAX_CLIENTS = 65536  # buckets kept per worker
# A paced write is cut into pieces of this much of a second's allowance, so that the bytes
# flow steadily instead of a burst then a pause.
PIECE_SECONDS = 0.1
MIN_PIECE = 4096


@dataclass(frozen=True, slots=True)
class RateLimit:
    rate: float  # requests per second, > 0
    burst: int  # requests at once, >= 1


class RateLimiter:
    """The token buckets of one worker, every domain's, in one bounded LRU: (domain, client)
    -> the time its bucket is full again (GCRA's theoretical arrival time)."""

    def __init__(self, max_clients: int = MAX_CLIENTS) -> None:
        self.max_clients = max_clients
        self._full_at: OrderedDict[tuple[str, str], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._full_at)

    def retry_after(self, domain: str, client: str, limit: RateLimit, now: float) -> int:
        """Take one token of `client`'s bucket for `domain` at monotonic time `now`: 0 when the
        request may go on, else the whole seconds (>= 1) until a token is back (nothing is
        taken then)."""
        key = (domain, client)
        buckets = self._full_at
        interval = 1.0 / limit.rate  # the time one token takes to come back
        full_at = max(buckets.get(key, now), now)
        # Tokens missing now, in seconds: more than burst - 1 of them and none is left. (Not
        # `full_at + interval - burst * interval > now`: rounding made that true for a bucket
        # that is full, full_at == now.)
        short = full_at - now - (limit.burst - 1) * interval
        if key in buckets:
            buckets.move_to_end(key)
        if short > 0:
            return max(1, math.ceil(short))
        buckets[key] = full_at + interval
        if len(buckets) > self.max_clients:
            buckets.popitem(last=False)
        return 0


@dataclass(frozen=True, slots=True)
class SpeedLimit:
    """`rate` bytes per second after the first `after` bytes, for the paths `match` covers
    (all of them when None)."""

    rate: int
    after: int = 0
    match: CacheRule | None = None

    def pace(self) -> Pace:
        return Pace(self.rate, self.after)


class Pace:
    """One response's allowance: at any moment, at most `free` + `rate` x (seconds since its
    first body byte) bytes handed over."""

    __slots__ = ("free", "piece", "rate", "sent", "start")

    def __init__(self, rate: int, free: int) -> None:
        self.rate = rate
        self.free = free
        self.piece = max(MIN_PIECE, int(rate * PIECE_SECONDS))
        self.sent = 0
        self.start: float | None = None  # the clock starts with the first body byte

    def pieces(self, n: int) -> list[tuple[int, int]]:
        """[start, end) spans of an `n`-byte write: what is still free in one piece, then
        pieces of about PIECE_SECONDS' worth each."""
        spans = []
        offset = 0
        free = max(0, min(n, self.free - self.sent))
        if free:
            spans.append((0, free))
            offset = free
        while offset < n:
            end = min(n, offset + self.piece)
            spans.append((offset, end))
            offset = end
        return spans

    def delay(self, n: int, now: float) -> float:
        """Seconds to wait, at monotonic time `now`, before handing over the next `n` bytes
        (which are then counted as sent)."""
        if self.start is None:
            self.start = now
        self.sent += n
        over = self.sent - self.free
        if over <= 0:
            return 0.0
        return max(0.0, self.start + over / self.rate - now)
