"""The usage spool: metered buckets on local disk until the control plane has them (issue 5).

Usage is money, so the edge keeps it on disk, fsynced, until the control plane acknowledges it,
and the control plane counts a batch once however often it arrives (it stores batches by id).
Hence: every batch has an id unique across restarts (a uuid4), every file is written whole or
not at all (temp file, write, fsync, rename, fsync the directory), a pending batch is never
changed and is deleted only after a 2xx answer, and re-sending is always safe.

Two ways in. `append` writes buckets as one batch at once. `add` sums buckets into the *open*
batch, rewritten durably on each call (the supervisor adds its workers' counts every USAGE_TICK
s, so a hard kill loses at most that), and `seal` makes the open batch a pending one by renaming
its file; an open batch left by a crash is sealed when the spool is opened.

Layout of `directory` (state_dir/usage): `<ns>-<id>.json` pending batches (ns: nanoseconds since
the epoch at sealing, so names sort oldest first), `open.json` the open batch, `.tmp-*` files
being written (a crash leaves them: removed at open), `*.bad` unreadable files set aside (never
shipped, kept for a person to look at). A file holds exactly the body POSTed for it:
{"batch": ID, "edge": EDGE_ID, "buckets": [BUCKET...]} (BUCKET: edge.meter.Bucket.to_json).

`Shipper` POSTs pending batches to `{control_url}/v1/edge/usage`, oldest first, and deletes
each on a 2xx answer; otherwise it retries with a jittered backoff capped at BACKOFF_MAX.

A batch holds at most MAX_BATCH_BUCKETS buckets, so that its body stays well under the control
plane's 8 MiB request cap (a bucket is ~330 bytes of JSON): `add` seals the open batch before it
would grow past that, and splits what is bigger on its own.

`UsageSink` is the supervisor's side (edge/supervisor.py): workers' usage in, every USAGE_TICK s
to the open batch, sealed as each window closes, shipped when there is a control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from edge.backoff import retry_rounds, stop_shipping
from edge.files import sync_directory, write_atomically
from edge.meter import GRACE, Bucket, merge, window_start

log = logging.getLogger("edge.spool")

OPEN = "open.json"
_TEMP = ".tmp-"
_SUFFIX = ".json"

USAGE_PATH = "/v1/edge/usage"
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
TIMEOUT = 30.0  # one POST, connection included
BATCHES_PER_ROUND = 100  # pending batches read from disk at a time
# A bucket is at most ~620 bytes of JSON (a 253-character domain, 15-digit counts): 10000 keep a
# batch under the control plane's 8 MiB request body limit, which would refuse it forever.
MAX_BATCH_BUCKETS = 10000
# The supervisor writes the workers' usage to the open batch this often; workers report every
# edge.worker.USAGE_INTERVAL s. A hard kill loses what was metered in the last USAGE_INTERVAL +
# USAGE_TICK s plus the time to write and fsync the batch and to be scheduled: the promise is at
# most 1 s, so the two intervals add up to 0.5 s and leave the other half for the rest (at 0.5 s
# each, the worst case alone was the whole second, and a write on a busy disk went past it).
USAGE_TICK = 0.25


class SpoolError(Exception):
    """A batch could not be written (full or failing disk): nothing already spooled changed,
    and the caller still holds (or, for `add`, the spool still holds in memory) the buckets."""


@dataclass(frozen=True, slots=True)
class Batch:
    id: str
    edge: str
    buckets: tuple[Bucket, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "batch": self.id,
            "edge": self.edge,
            "buckets": [bucket.to_json() for bucket in self.buckets],
        }

    @classmethod
    def from_json(cls, data: object) -> Batch:
        """ValueError unless `data` is `to_json`'s form."""
        if not isinstance(data, dict) or set(data) != {"batch", "edge", "buckets"}:
            raise ValueError('a batch must be an object of "batch", "edge" and "buckets"')
        batch_id, edge, buckets = data["batch"], data["edge"], data["buckets"]
        if not isinstance(batch_id, str) or not batch_id or not isinstance(edge, str):
            raise ValueError("batch and edge must be strings")
        if not isinstance(buckets, list):
            raise ValueError("buckets must be a list")
        return cls(batch_id, edge, tuple(Bucket.from_json(bucket) for bucket in buckets))


class Spool:
    """Batches of buckets in `directory`, for `edge_id`; one process owns a directory."""

    def __init__(self, directory: str | os.PathLike[str], edge_id: str) -> None:
        self.directory = Path(directory)
        self.edge_id = edge_id
        self.directory.mkdir(parents=True, exist_ok=True)
        for temp in self.directory.glob(f"{_TEMP}*"):
            temp.unlink(missing_ok=True)  # a write a crash interrupted: never a batch
        self._open_id = ""
        self._open: list[Bucket] = []
        self._open_written = True  # `_open` is what open.json holds
        try:
            self._open_id = self._read(self.directory / OPEN).id
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.error("usage spool: setting aside unreadable open batch: %s", exc)
            os.replace(self.directory / OPEN, self.directory / f"open-{time.time_ns()}.bad")
        self.seal()  # what a crash left open: everything up to its last `add`

    # --- writing ------------------------------------------------------------------------------

    def append(self, buckets: list[Bucket]) -> str:
        """Write `buckets` as one pending batch; its id. SpoolError when the disk fails."""
        batch_id = uuid.uuid4().hex
        self._write(self._pending_path(batch_id), Batch(batch_id, self.edge_id, tuple(buckets)))
        return batch_id

    def add(self, buckets: list[Bucket]) -> int:
        """Sum `buckets` into the open batch and rewrite it durably; how many batches became
        pending on the way (the open one sealed, or parts split off, to stay within
        MAX_BATCH_BUCKETS). SpoolError when the disk fails: the sum stays in memory, and the
        next `add` or `seal` writes it."""
        if not buckets:
            return 0
        made = 0
        merged = merge([*self._open, *buckets])
        if self._open and len(merged) > MAX_BATCH_BUCKETS:
            try:
                self.seal()
            except SpoolError:
                # The new buckets join the open ones in memory: the next add or seal writes them.
                self._open, self._open_written = merged, False
                raise
            made += 1
            merged = merge(buckets)
        if not self._open_id:
            self._open_id = uuid.uuid4().hex
        self._open = merged
        self._open_written = False
        while len(self._open) > MAX_BATCH_BUCKETS:
            self.append(self._open[:MAX_BATCH_BUCKETS])  # SpoolError: all still open
            self._open = self._open[MAX_BATCH_BUCKETS:]
            made += 1
        self._write_open()
        return made

    def seal(self) -> str | None:
        """Make the open batch pending (to be shipped); its id, None when there is none.
        SpoolError when the disk fails: it stays open."""
        if not self._open_id:
            return None
        if not self._open_written:
            self._write_open()
        batch_id = self._open_id
        try:
            os.replace(self.directory / OPEN, self._pending_path(batch_id))
            sync_directory(self.directory)
        except OSError as exc:
            raise SpoolError(f"usage spool {self.directory}: cannot seal a batch: {exc}") from exc
        self._open_id, self._open = "", []
        return batch_id

    @property
    def open_buckets(self) -> list[Bucket]:
        """What the open batch holds (as written, or to be written by the next `add`/`seal`)."""
        return list(self._open)

    def _write_open(self) -> None:
        self._write(self.directory / OPEN, Batch(self._open_id, self.edge_id, tuple(self._open)))
        self._open_written = True

    def _pending_path(self, batch_id: str) -> Path:
        return self.directory / f"{time.time_ns():020d}-{batch_id}{_SUFFIX}"

    def _write(self, path: Path, batch: Batch) -> None:
        """`batch` as `path`, all or nothing: a temp file, fsync, rename, fsync the directory."""
        data = json.dumps(batch.to_json(), separators=(",", ":")).encode()
        try:
            write_atomically(path, data, temp=self.directory / f"{_TEMP}{uuid.uuid4().hex}")
        except OSError as exc:
            raise SpoolError(f"usage spool {self.directory}: cannot write a batch: {exc}") from exc

    # --- reading ------------------------------------------------------------------------------

    def pending(self, limit: int | None = None) -> list[Batch]:
        """Pending batches, oldest first (at most `limit`). A file that cannot be read as a
        batch is renamed to *.bad (logged) and skipped: it is kept, never shipped."""
        out: list[Batch] = []
        for path in sorted(self.directory.glob(f"*-*{_SUFFIX}")):
            if limit is not None and len(out) >= limit:
                break
            try:
                out.append(self._read(path))
            except FileNotFoundError:
                continue  # acknowledged meanwhile
            except (OSError, ValueError) as exc:
                log.error("usage spool: setting aside unreadable batch %s: %s", path.name, exc)
                with contextlib.suppress(OSError):
                    os.replace(path, path.with_suffix(".bad"))
        return out

    def pending_count(self) -> int:
        return sum(1 for _ in self.directory.glob(f"*-*{_SUFFIX}"))

    def trim(self, keep: int) -> int:
        """Delete the oldest pending batches beyond `keep` (a spool no control plane empties);
        how many were deleted."""
        paths = sorted(self.directory.glob(f"*-*{_SUFFIX}"))
        for path in paths[: max(len(paths) - keep, 0)]:
            path.unlink(missing_ok=True)
        return max(len(paths) - keep, 0)

    def acknowledge(self, batch_id: str) -> None:
        """The control plane has the batch: delete it (no fsync: a batch that reappears after a
        crash is sent again, and the control plane counts it once)."""
        for path in self.directory.glob(f"*-{batch_id}{_SUFFIX}"):
            path.unlink(missing_ok=True)

    @staticmethod
    def _read(path: Path) -> Batch:
        batch = Batch.from_json(json.loads(path.read_bytes()))
        if path.name != OPEN and not path.name.endswith(f"-{batch.id}{_SUFFIX}"):
            raise ValueError(f"the file holds batch {batch.id}")
        return batch


class Shipper:
    """Sends the spool's pending batches to the control plane until each is acknowledged.

    Owns one task between `start` and `stop`. It ships when woken (`wake`, after a batch was
    sealed or appended) and, while batches are left, after a jittered backoff that doubles from
    `backoff_first` up to `backoff_max` on each failed round; a round stops at the first
    failure, except a 4xx that only that batch gets (400, 413, 422...), after which the next
    batches are tried (that batch stays spooled, retried each round, logged).
    """

    def __init__(
        self,
        spool: Spool,
        control_url: str,
        token: str,
        *,
        backoff_first: float = BACKOFF_FIRST,
        backoff_max: float = BACKOFF_MAX,
        timeout: float = TIMEOUT,
    ) -> None:
        self.spool = spool
        self.url = control_url + USAGE_PATH
        self._token = token
        self._backoff_first = backoff_first
        self._backoff_max = backoff_max
        self._timeout = timeout
        self.shipped = 0  # batches acknowledged
        self.failures = 0  # POSTs that failed (no answer, or not 2xx)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._failing = False  # for logging each outage once

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"Authorization": f"Bearer {self._token}"},
            timeout=aiohttp.ClientTimeout(total=self._timeout),
        )
        self._task = asyncio.create_task(self._run(), name="usage-shipper")

    async def stop(self) -> None:
        """Stop shipping (what is pending stays spooled for the next start)."""
        await stop_shipping(self._task, self._session)
        self._task, self._session = None, None

    def wake(self) -> None:
        """A batch was spooled: ship now rather than at the end of a backoff."""
        self._wake.set()

    async def flush(self) -> bool:
        """Try to ship every pending batch now; whether none is left."""
        async with self._lock:
            return await self._round()

    async def _run(self) -> None:
        await retry_rounds(
            self._attempt, self._wake, first=self._backoff_first, maximum=self._backoff_max
        )

    async def _attempt(self) -> bool:
        try:
            return await self.flush()
        except OSError as exc:  # the spool's disk: retried like a failed POST
            log.error("usage spool: %s", exc)
            return False

    async def _round(self) -> bool:
        kept: set[str] = set()  # refused by a 4xx of their own this round
        while True:
            pending = self.spool.pending(len(kept) + BATCHES_PER_ROUND)
            batches = [batch for batch in pending if batch.id not in kept]
            if not batches:
                return not kept
            for batch in batches:
                status = await self._post(batch)
                if status is not None and 200 <= status < 300:
                    self.spool.acknowledge(batch.id)
                    self.shipped += 1
                    continue
                self.failures += 1
                if status is not None and 400 <= status < 500 and status not in _NOT_OWN:
                    log.error("usage batch %s refused: HTTP %d; kept, retried", batch.id, status)
                    kept.add(batch.id)
                    continue
                return False

    async def _post(self, batch: Batch) -> int | None:
        """The answer's status; None when there was none (logged once per outage)."""
        assert self._session is not None, "start() first"
        try:
            async with self._session.post(self.url, json=batch.to_json()) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._trouble(f"{type(exc).__name__}: {exc}")
            return None
        if 200 <= status < 300:
            if self._failing:
                log.info("usage shipping to %s works again", self.url)
                self._failing = False
        else:
            self._trouble(f"HTTP {status}")
        return status

    def _trouble(self, problem: str) -> None:
        if not self._failing:
            log.warning("usage shipping to %s failing (%s); retrying", self.url, problem)
            self._failing = True


# 4xx answers that are about the edge or the moment, not one batch: the round stops.
_NOT_OWN = frozenset({401, 403, 404, 408, 429})


class UsageSink:
    """The supervisor's usage: the workers' buckets summed into the spool's open batch every
    USAGE_TICK s (`tick`), sealed when a window closes (GRACE after its end: a worker's last second
    of it has arrived by then; later stragglers go into the next batch, which adds up the
    same), then shipped by `shipper` (the spool's, with a control plane), or kept, at most
    `keep` batches, without one. Owns its task and the shipper between `start` and `stop`."""

    def __init__(
        self,
        spool: Spool,
        shipper: Shipper | None,
        *,
        keep: int,
        interval: float = USAGE_TICK,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.shipper = shipper
        self.keep = keep
        self.interval = interval
        self.clock = clock
        self.errors = 0  # spool writes that failed (retried with the next tick)
        self.dropped = 0  # batches deleted unshipped by `keep` (no control plane)
        self._received: list[Bucket] = []
        self._window = window_start(clock() - GRACE)
        self._task: asyncio.Task[None] | None = None

    def receive(self, buckets: list[Bucket]) -> None:
        self._received.extend(buckets)

    def start(self) -> None:
        if self.shipper is not None:
            self.shipper.start()
        self._task = asyncio.create_task(self._run(), name="usage-sink")

    async def stop(self, flush_timeout: float) -> None:
        """Spool and seal everything received, try to ship it for up to `flush_timeout` s (what
        is not shipped stays spooled for the next start), and stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.tick(seal=True)
        if self.shipper is not None:
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(flush_timeout):
                    await self.shipper.flush()
            await self.shipper.stop()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.tick()

    def tick(self, *, seal: bool = False) -> None:
        """Add what was received to the open batch; seal it when a window closed (or `seal`)."""
        made = 0
        window = window_start(self.clock() - GRACE)
        try:
            if self._received:
                received, self._received = self._received, []
                made += self.spool.add(merge(received))  # SpoolError: kept in the spool's memory
            if seal or window != self._window:
                self._window = window
                made += self.spool.seal() is not None
        except SpoolError as exc:
            self.errors += 1
            log.error("%s", exc)
        if not made:
            return
        if self.shipper is not None:
            self.shipper.wake()
        else:
            self.dropped += self.spool.trim(self.keep)
