"""Each worker's access-log writer: the data path's entries to hourly files, off the loop.

The data path (edge.server) hands each exchange as it ends to `AccessLogWriter.record`,
which makes it a line at once and appends it to a buffer per file
(nothing of the request stays alive until the flush: kept objects cost the garbage collector,
and fresh memory for each, more than the formatting). Every FLUSH_INTERVAL s, and once more
when the worker stops (a graceful stop loses nothing), the writer hands the lines to a thread
(`LogFiles.write`), which appends them to

    state_dir/logs/<domain>/<YYYY-MM-DDTHH>.<slot>.jsonl   (UTC hour of the line's `time`)

(`_` for requests no domain was routed for), one write per file and batch. A file whose hour
has ended (by the writer's clock, the clock the lines' times come from) is closed within a
flush: gzipped to a temp file, fsynced, renamed to `<hour>.<slot>.jsonl.gz`, and the `.jsonl`
removed. Lines that arrive for an hour already closed (the clock stepped back) go to a new file
of that hour, closed as `<hour>.<slot>-<n>.jsonl.gz`: a separate piece, never lost, never
merged into what may have been shipped.

Crashes: at start, a `.jsonl` of this slot for a past hour is compressed (after its partial last
line is cut, and unless a `.gz` with its exact content exists: the crash came between rename and
unlink); one for the current hour is appended to, after its partial last line is cut.

Two processes may share a slot for a moment (during a reload the old generation drains while
the new one serves): every append, cut and close holds an flock on the `.jsonl`, and an append
that finds its file closed by the other process opens a new one.

A write that fails (full or failing disk: ENOSPC, EIO, EACCES...) is cut back to where it
started; its lines are kept and tried again on every flush, up to MAX_PENDING_LINES in all;
lines past that, and those still unwritten when the worker stops, are lost and counted
(`cdn_edge_log_lines_lost_total`). A write that hangs (a disk not answering) makes the writer
failing too after FLUSH_INTERVAL, and lines collected past MAX_PENDING_LINES meanwhile are
lost and counted. A worker killed hard loses what it collected since its last flush (0.5 s).
While the writer is *failing* (`EdgeStats.log_failure`), what the worker does is
`[logs] on_log_failure` (edge.worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gzip
import logging
import os
import re
import stat
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edge.accesslog import Entry, Exchanged, LineFormatter
from edge.files import sync_directory
from edge.metrics import EdgeStats, Snapshot
from edge.server import Exchange, Handler, synth_fields

log = logging.getLogger("edge.logwriter")

FLUSH_INTERVAL = 0.5
RETRY_AFTER = 10  # seconds, in the 503 of on_log_failure = "refuse"
MAX_PENDING_LINES = 50_000  # lines kept in memory while the disk fails (~20 MB)
OPEN_SUFFIX = ".jsonl"
CLOSED_SUFFIX = ".jsonl.gz"
SHIPPED = "shipped"
# A closed file: hour, and tag (the slot, or "<slot>-<n>" for lines that came after the close).
CLOSED_NAME = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2})\.(\d+(?:-\d+)?)\.jsonl\.gz")
_OPEN_NAME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}\.(\d+)\.jsonl")
ORPHAN_AFTER = 60.0  # s after its hour's end, an open file no worker closed is closed for it
_SCAN_BLOCK = 1 << 16

Key = tuple[str, str]  # (domain directory, hour)


@dataclass(slots=True)
class Lines:
    """Whole lines bound for one file, and how many. Counted as they are added: counting the
    newlines later cost as much as a tenth of making the lines (and held the GIL)."""

    data: bytearray = field(default_factory=bytearray)
    count: int = 0

    def drop_oldest(self, count: int) -> int:
        """Drop up to `count` first lines; how many were."""
        left, cut = drop_lines(bytes(self.data), count)
        self.data, self.count = bytearray(left), self.count - cut
        return cut


@dataclass(frozen=True, slots=True)
class WriteResult:
    written: int
    lost: int
    problem: str  # "" when every line was written


class LogFiles:
    """The files of one worker slot under `root` (state_dir/logs). Synchronous: called from one
    thread at a time (`AccessLogWriter` awaits each call before the next)."""

    def __init__(self, root: Path, slot: int, formatter: LineFormatter) -> None:
        self.root = root
        self.slot = slot
        self.formatter = formatter
        self._open: dict[Key, int] = {}
        # Lines not yet written, by file; kept across failed writes.
        self._pending: dict[Key, Lines] = {}

    @property
    def pending_lines(self) -> int:
        return sum(lines.count for lines in self._pending.values())

    def _path(self, key: Key) -> Path:
        return self.root / key[0] / f"{key[1]}.{self.slot}{OPEN_SUFFIX}"

    # --- start ----------------------------------------------------------------------------
    def recover(self, now: float, *, temps: bool = True) -> None:
        """What a crash left of this slot: temp files removed (unless not `temps`: another
        process may be writing them), hours before `now`'s closed."""
        if not self.root.is_dir():
            return
        current = self.formatter.hour(now)
        for directory in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for temp in directory.glob(f".*.{self.slot}.gz.tmp") if temps else ():
                temp.unlink(missing_ok=True)
            for path in sorted(directory.glob(f"*.{self.slot}{OPEN_SUFFIX}")):
                hour = path.name.split(".", 1)[0]
                if hour >= current:
                    continue  # appended to (its partial line cut) when first written
                try:
                    fd = self._open_locked(path)
                except OSError as exc:
                    log.error("access log: cannot recover %s: %s", path, exc)
                    continue
                try:
                    self._close_locked(path, fd, recovering=True)
                except OSError as exc:
                    log.error("access log: cannot compress %s: %s", path, exc)
                finally:
                    os.close(fd)

    # --- writing --------------------------------------------------------------------------
    def add(self, entries: list[Entry]) -> int:
        """Format `entries` into the lines to write; how many could not be (lost)."""
        batch: dict[Key, Lines] = {}
        lost = 0
        for entry in entries:
            try:
                directory, hour, line = self.formatter.format(*entry)
            except Exception:  # a bug must not stop logging: that line only is lost
                log.exception("access log: cannot format an entry")
                lost += 1
                continue
            lines = batch.setdefault((directory, hour), Lines())
            lines.data += line
            lines.count += 1
        self.add_lines(batch)
        return lost

    def add_lines(self, batch: Mapping[Key, Lines]) -> None:
        """Take lines to write, by the file (directory, hour) they go to (no longer the
        caller's to change)."""
        for key, lines in batch.items():
            pending = self._pending.get(key)
            if pending is None:
                self._pending[key] = lines
            else:  # lines a failed write left
                pending.data += lines.data
                pending.count += lines.count

    def write(self, entries: list[Entry], now: float) -> WriteResult:
        """Format `entries` (`add`), append every pending line, close ended hours."""
        lost = self.add(entries)
        pending = self._pending
        written = 0
        problems: list[str] = []
        for key in sorted(pending, key=lambda k: k[1]):
            lines = pending[key]
            try:
                self._append(key, lines.data)
            except OSError as exc:
                problems.append(f"{self._path(key)}: {exc.strerror or exc}")
                continue
            written += lines.count
            del pending[key]
        lost += self._bound()
        current = self.formatter.hour(now)
        for key in [k for k in self._open if k[1] < current and k not in pending]:
            fd = self._open.pop(key)
            try:
                self._lock(fd)
                self._close_locked(self._path(key), fd)
            except OSError as exc:
                problems.append(f"closing {self._path(key)}: {exc.strerror or exc}")
            finally:
                os.close(fd)
        return WriteResult(written, lost, "; ".join(problems))

    def _bound(self) -> int:
        """Drop the oldest pending lines past MAX_PENDING_LINES; how many."""
        return drop_oldest(self._pending, MAX_PENDING_LINES)

    def drop_pending(self) -> int:
        """Forget what could not be written (the worker stops); how many lines."""
        count = self.pending_lines
        self._pending.clear()
        return count

    def close_all(self) -> None:
        """Close the open files, leaving them open-hour files (the next start appends)."""
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()

    def _append(self, key: Key, data: bytes | bytearray) -> None:
        fd = self._open.get(key)
        if fd is None:
            fd = self._open_locked(self._path(key))
            self._open[key] = fd
        else:
            self._lock(fd)
            if os.fstat(fd).st_nlink == 0:  # the other process of this slot closed the hour
                os.close(fd)
                del self._open[key]
                fd = self._open_locked(self._path(key))
                self._open[key] = fd
        try:
            start = _end_offset(fd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                # Nothing of this batch may stay: it is retried whole.
                if start is not None:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, start)
                raise
        except OSError:
            del self._open[key]
            os.close(fd)  # the next open cuts a partial line, if the cut above failed
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)

    @staticmethod
    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _open_locked(self, path: Path) -> int:
        """`path` opened for appending and locked, a partial last line cut off."""
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                self._lock(fd)
                info = os.fstat(fd)
                if info.st_nlink == 0:  # closed by the other process meanwhile: anew
                    os.close(fd)
                    continue
                if stat.S_ISREG(info.st_mode):
                    _cut_partial_line(fd, info.st_size)
            except BaseException:
                os.close(fd)
                raise
            return fd

    def _close_locked(self, path: Path, fd: int, *, recovering: bool = False) -> None:
        """Compress the locked open file `path` (`fd`) into its closed name, then remove it."""
        info = os.fstat(fd)
        if info.st_nlink == 0:
            return  # closed by the other process of this slot
        if info.st_size == 0:
            path.unlink()
            return
        hour = path.name.split(".", 1)[0]
        if recovering and _compressed_before(fd, info.st_size, path.parent, hour, self.slot):
            path.unlink()
            return
        final = _closed_name(path.parent, hour, self.slot)
        temp = path.parent / f".{hour}.{self.slot}.gz.tmp"
        try:
            with open(temp, "wb") as raw:
                # mtime=0 and no name: the bytes depend on the lines only (a retry is identical).
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as packed:
                    offset = 0
                    while chunk := os.pread(fd, 1 << 20, offset):
                        packed.write(chunk)
                        offset += len(chunk)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        sync_directory(path.parent)
        path.unlink()


def close_orphans(root: Path, now: float) -> None:
    """Close the open files of every slot whose hour ended ORPHAN_AFTER s before `now`: their
    worker is gone for good (fewer workers after a reload), or would have closed them."""
    slots = {
        int(match[1])
        for path in root.glob(f"*/*{OPEN_SUFFIX}")
        if (match := _OPEN_NAME.fullmatch(path.name)) is not None
    }
    for slot in sorted(slots):
        LogFiles(root, slot, LineFormatter("-", "-")).recover(now - ORPHAN_AFTER, temps=False)


def _end_offset(fd: int) -> int | None:
    """Where an append starts; None for what is no file (a pipe, a device: nothing to cut)."""
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError as exc:
        if exc.errno == errno.ESPIPE:
            return None
        raise


def _cut_partial_line(fd: int, size: int) -> None:
    """Truncate a file after its last newline (a crash may have cut a line)."""
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(end - _SCAN_BLOCK, 0)
        at = os.pread(fd, end - start, start).rfind(b"\n")
        if at >= 0:
            os.ftruncate(fd, start + at + 1)
            return
        end = start
    os.ftruncate(fd, 0)


def _closed_name(directory: Path, hour: str, slot: int) -> Path:
    """The first free closed name of (hour, slot): in the directory, shipped or set aside."""
    for n in range(10_000):
        tag = str(slot) if n == 0 else f"{slot}-{n}"
        name = f"{hour}.{tag}{CLOSED_SUFFIX}"
        taken = (
            (directory / name).exists()
            or (directory / SHIPPED / name).exists()
            or any(directory.glob(f"{name}.*"))
        )
        if not taken:
            return directory / name
    raise OSError(errno.EEXIST, f"no free name for {hour}.{slot} in {directory}")


def _compressed_before(fd: int, size: int, directory: Path, hour: str, slot: int) -> bool:
    """Whether a closed file of (hour, slot) holds exactly the open file's bytes (gzip's
    trailer: CRC-32 and length)."""
    crc, offset = 0, 0
    while chunk := os.pread(fd, 1 << 20, offset):
        crc = zlib.crc32(chunk, crc)
        offset += len(chunk)
    trailer = crc.to_bytes(4, "little") + (size & 0xFFFFFFFF).to_bytes(4, "little")
    for place in (directory, directory / SHIPPED):
        pieces = [place / f"{hour}.{slot}{CLOSED_SUFFIX}"]
        pieces += place.glob(f"{hour}.{slot}-*{CLOSED_SUFFIX}")
        for candidate in (p for p in pieces if p.exists()):
            with open(candidate, "rb") as file:
                file.seek(0, os.SEEK_END)
                if file.tell() >= 8:
                    file.seek(-8, os.SEEK_END)
                    if file.read(8) == trailer:
                        return True
    return False


def drop_oldest(batch: dict[Key, Lines], keep: int) -> int:
    """Drop the oldest lines of `batch` (by hour) past the newest `keep`; how many."""
    excess = sum(lines.count for lines in batch.values()) - keep
    dropped = 0
    for key in sorted(batch, key=lambda k: k[1]):
        if excess <= 0:
            break
        lines = batch[key]
        cut = lines.drop_oldest(excess)
        if not lines.count:
            del batch[key]
        excess -= cut
        dropped += cut
    return dropped


def drop_lines(blob: bytes, count: int) -> tuple[bytes, int]:
    """`blob` (whole lines) without its first `count` lines, and how many were dropped."""
    at = 0
    for dropped in range(count):
        found = blob.find(b"\n", at)
        if found < 0:
            return b"", dropped
        at = found + 1
    return blob[at:], count


class AccessLogWriter:
    """A worker's writer task (module docstring): owns `files` and its task between `start`
    and `stop`. `on_change(failing)` is called when writing starts or stops failing."""

    def __init__(
        self,
        root: Path,
        slot: int,
        edge_id: str,
        unknown_domain: str,
        stats: EdgeStats,
        *,
        interval: float = FLUSH_INTERVAL,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        # What `record` made since the last flush, by file.
        self.batch: dict[Key, Lines] = {}
        self._last_directory: str | None = None  # the key of the last line's `Lines`
        self._last_hour: str | None = None
        self._last_lines = Lines()
        self.files = LogFiles(root, slot, LineFormatter(edge_id, unknown_domain))
        self.stats = stats
        self.interval = interval
        self.clock = clock
        self.on_change = on_change
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()  # one flush at a time: `files` is used by one thread
        self._task: asyncio.Task[None] | None = None

    def record(self, end: float, end_mono: float, ex: Exchanged) -> None:
        """The data path's one call per exchange, as it ends (at `end`, wall clock, and
        `end_mono`, monotonic): its line, kept for the next flush."""
        try:
            directory, hour, line = self.files.formatter.format(end, end_mono, ex)
        except Exception:  # a bug must not fail the request: that line only is lost
            log.exception("access log: cannot format an entry")
            self.stats.log_lines_lost += 1
            return
        # Appended to a buffer, not kept as an object: the line's memory is reused at once.
        # The last line's buffer is found by identity (the same strings: the routed domain,
        # the formatter's hour of the second), cheaper than a tuple key's hash each time.
        if directory is self._last_directory and hour is self._last_hour:
            lines = self._last_lines
        else:
            lines = self._lines_for(directory, hour)
        lines.data += line
        lines.count += 1

    @property
    def lines(self) -> int:
        """Lines made since the last flush."""
        return sum(lines.count for lines in self.batch.values())

    def _lines_for(self, directory: str, hour: str) -> Lines:
        lines = self.batch.get((directory, hour))
        if lines is None:
            lines = self.batch[(directory, hour)] = Lines()
        self._last_directory, self._last_hour, self._last_lines = directory, hour, lines
        return lines

    def _take_batch(self) -> dict[Key, Lines]:
        """What `record` collected since the last call; it starts over."""
        batch, self.batch = self.batch, {}
        self._last_directory = self._last_hour = None
        return batch

    @property
    def failing(self) -> bool:
        return bool(self.stats.log_failure)

    async def start(self) -> None:
        if not self.files.formatter.compiled:
            log.warning(
                "access log: edge/_logline.c is not built (no C compiler at install): every "
                "line is made in Python, several times the CPU (reinstall with gcc to build it)"
            )
        await asyncio.to_thread(self.files.recover, self.clock())
        self._task = asyncio.create_task(self._run(), name="access-log")

    async def stop(self) -> None:
        """Write everything collected (the data path has stopped), then stop; what cannot be
        written is counted lost. Open files stay open-hour files for the next start."""
        self._stopping.set()
        if self._task is not None:
            await self._task  # it ends with a last flush; it is never cancelled mid-write
            self._task = None
        self.stats.log_lines_lost += self.files.drop_pending()
        self.files.close_all()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._stopping.wait()
            try:
                await self.flush()
            except Exception:
                log.exception("access log: flush failed")
            if self._stopping.is_set():
                return

    async def flush(self) -> None:
        """Hand what was collected to the thread that writes it; wait for it."""
        async with self._lock:
            self.files.add_lines(self._take_batch())
            writing = asyncio.ensure_future(asyncio.to_thread(self.files.write, [], self.clock()))
            # A disk that hangs (rather than fails) must not let the entries grow unbounded.
            while not (await asyncio.wait({writing}, timeout=self.interval))[0]:
                self._shed()
            result = writing.result()
            self.stats.log_lines_written += result.written
            self.stats.log_lines_lost += result.lost
            self._set_failure(result.problem)

    def _shed(self) -> None:
        """A write still runs after a whole interval: the writer is failing; entries past
        MAX_PENDING_LINES are lost (counted)."""
        self._last_directory = self._last_hour = None  # some `Lines` may go
        self.stats.log_lines_lost += drop_oldest(self.batch, MAX_PENDING_LINES)
        if not self.stats.log_failure:
            self._set_failure("access log writes stalled (disk not answering)")

    def _set_failure(self, problem: str) -> None:
        was = self.stats.log_failure
        self.stats.log_failure = problem
        if problem and not was:
            log.error("access log: writing fails (%s); lines kept, retried", problem)
        elif was and not problem:
            log.info("access log: writing works again")
        if bool(was) != bool(problem) and self.on_change is not None:
            self.on_change(bool(problem))


class RefuseWhileLogFails:
    """The data path's handler while the access log fails with on_log_failure = "refuse":
    every request is answered 503 (the edge's obligation to log comes first), and logged under
    its domain (`route`: Host -> domain name, None when unknown)."""

    _BODY = b"access log unavailable\n"

    def __init__(self, handler: Handler, route: Callable[[str], str | None]) -> None:
        self.handler = handler
        self.route = route

    def handle(self, exchange: Exchange) -> None:
        domain = self.route(exchange.head.host) if exchange.head.host else None
        if domain is not None:
            exchange.domain = domain
        block = synth_fields(len(self._BODY)) + f"Retry-After: {RETRY_AFTER}\r\n".encode()
        exchange.send(503, block, self._BODY)
        exchange.set_outcome("refused")

    def refused(self, exchange: Exchange | None, peer: str, status: int, reason: str) -> None:
        self.handler.refused(exchange, peer, status, reason)


def readiness(snapshot: Snapshot, *, refuse: bool) -> tuple[bool, str]:
    """What /readyz says about access logs: (whether it blocks readiness, note; "" when fine).

    Failing blocks readiness only with on_log_failure = "refuse" (the edge answers 503 then:
    load balancers must drain it); with "serve" the operator chose traffic over logs, so the
    edge stays ready and the note says how many lines were lost."""
    failing = snapshot["gauges"].get("log_writers_failing", 0)
    lost = snapshot["counters"].get("log_lines_lost", 0)
    if failing:
        what = "refusing requests" if refuse else "serving on"
        return refuse, (
            f"access log failing in {failing} worker(s), {what}; {lost} lines lost so far"
        )
    if lost:
        return False, f"access log writing; {lost} lines lost since start"
    return False, ""
