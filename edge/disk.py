"""The disk tier: stored responses as files under a byte budget, shared by the worker processes.

A storage library only (no HTTP): the edge decides what to store and how to answer; this module
keeps bodies and their metadata in files so that they survive restarts, are shared through the
page cache by every worker of a host, and go out with sendfile.

Layout under `root` (the edge passes `<state_dir>/cache`):
    objects/ab/cd/<id>        a committed object; <id> = object_id(), ab and cd its first hex digits
    objects/ab/cd/<id>.fill   an object being written (also the per-host fill lock, see below)
    objects/ab/cd/<id>.<random>.tmp   a writer's file for the instant before it becomes the .fill
    usage, lock               the budget counter shared by the processes, and its liveness lock

File format, integers little-endian:
    MAGIC b"CDNE\\x01" | u64 body_length | u32 meta_len | u32 crc32(meta) | meta | body
meta is an `ObjectMeta` as UTF-8 JSON. body_length is UNKNOWN_LENGTH while a fill without a
declared length is in progress; commit writes the real one. A committed file is valid only when
the magic and the crc match, the length is known and the file is exactly header + meta + body
long: anything else (a crash, a full disk, a bit flip in the metadata) is removed, never served.
Body bytes carry no checksum (nginx's cache files do not either): a truncated body is caught
by the length, silent corruption inside the body is not. Nothing is fsynced: the cache is
disposable, and a file cut short by a power loss fails the length check.

Writes are plain blocking `os.write` calls from the event loop, as nginx's cache writes are:
they land in the page cache and return in microseconds; writeback happens in the kernel. A
disk so slow that the page cache fills stalls the worker, which nginx accepts too. Lookups
(open + one pread of the head) are blocking for the same reason.

Cross-process fill lock and read-while-write. A writer creates its temp file, takes an
exclusive `flock` on it, writes header and meta, then `link`s it to <id>.fill, which fails if
the name exists: the link is the O_EXCL of the protocol (atomic, one winner per host), and a
.fill is never visible unlocked or without its metadata. The lock lives as long as the writer:
the kernel drops it when the process dies, so "lock free and the .fill still there" means the
writer died, and `begin()` removes such a file and takes over at once, without waiting for a
timeout. A writer that is alive but stuck keeps its .fill until it ends (its origin timeout);
taking over a live writer's name would race with its commit. Commit writes the length, renames
the .fill to the final name (atomic) and releases the lock; followers in any process read the
file through their own descriptor as it grows, and finish when the writer is gone and the
body is complete (a known length and that many bytes), which holds even if the object was
evicted or replaced a moment after the commit. The lock requires a local file system with
working flock and hard links (ext4, xfs, btrfs, tmpfs).

Budget across processes. Each process keeps an LRU of the objects it knows (committed, looked
up or found by `rebuild()`) and evicts from it, least recently used first. The bytes on disk
are one counter shared by every process (root/usage, updated under flock by whoever commits or
unlinks a file, with the size it saw): a process evicts while the host-wide total is over the
budget, so the budget holds for the host, not per worker. The first store to open a root marks
the counter untrusted (files may have changed while the edge was down) and the first rebuild to
finish recounts it; until then each process counts its own view. Limits: recency is per
process (each worker's LRU reflects the hits it served; with connections spread over workers
hot objects are recent in every view); a crash between a rename and its count, or a concurrent
replace between a stat and an unlink, can skew the counter by one object until the next full
restart; files being filled are not counted. Usage counts each file rounded up to 4 KiB, about
what a file system allocates, so that many small objects do not overrun the disk.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import itertools
import json
import logging
import os
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path
from secrets import token_hex

log = logging.getLogger("edge.disk")

MAGIC = b"CDNE\x01"
_HEADER = struct.Struct("<5sQII")  # magic, body_length, meta_len, crc32(meta)
_LENGTH = struct.Struct("<Q")
HEADER_SIZE = _HEADER.size
UNKNOWN_LENGTH = 0xFFFF_FFFF_FFFF_FFFF
_MAX_META = 1 << 20
_FIRST_READ = 4096  # header and a typical meta in one pread
_BLOCK = 4096
LOG_INTERVAL = 60.0  # seconds between two "writes failed" lines
_REBUILD_BATCH = 200  # files checked per step of rebuild(), off the event loop


VARY_STUB = "vary-stub"  # ObjectMeta.extra key of a key's Vary stub (meta only, no body)


class DiskError(OSError):
    """The disk failed a write: the response passes through unstored. An OSError, so callers
    that handle any file error (the fill's spool) handle this one."""


class FillAborted(Exception):
    """The object a follower was reading will not be completed (aborted, writer died, stalled)."""


class _Corrupt(Exception):
    """A file that is not a valid object (bad magic, checksum, metadata or length)."""


@dataclass(slots=True)
class ObjectMeta:
    """What the edge needs to rebuild a stored response, kept as JSON before the body."""

    key: str  # primary cache key
    vary_names: tuple[str, ...]
    vary_values: tuple[str, ...]
    status: int
    fields: list[tuple[str, str]]  # response header fields as stored
    request_time: float
    response_time: float
    initial_age: float
    lifetime: float
    forced: bool = False  # a rule overrode the origin's freshness
    extra: dict[str, str] = field(default_factory=dict)  # room for later (slices: etag, total...)


def object_id(key: str, vary_values: tuple[str, ...] = ()) -> str:
    """The file name of one variant: sha256 hex of the key, and for a Vary variant a suffix
    from its values, so that every variant of a key sits in one directory (`remove_key`)."""
    primary = sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    if not vary_values:
        return primary
    values = "\0".join(vary_values).encode("utf-8", "surrogatepass")
    return f"{primary}-{sha256(values).hexdigest()[:32]}"


_ID_LENGTHS = (64, 64 + 1 + 32)


def _encode_head(meta: ObjectMeta, body_length: int | None) -> bytes:
    raw = json.dumps(asdict(meta), ensure_ascii=False, separators=(",", ":")).encode()
    length = UNKNOWN_LENGTH if body_length is None else body_length
    return _HEADER.pack(MAGIC, length, len(raw), zlib.crc32(raw)) + raw


def _decode_meta(raw: bytes) -> ObjectMeta:
    try:
        d = json.loads(raw)
        return ObjectMeta(
            key=str(d["key"]),
            vary_names=tuple(str(v) for v in d["vary_names"]),
            vary_values=tuple(str(v) for v in d["vary_values"]),
            status=int(d["status"]),
            fields=[(str(name), str(value)) for name, value in d["fields"]],
            request_time=float(d["request_time"]),
            response_time=float(d["response_time"]),
            initial_age=float(d["initial_age"]),
            lifetime=float(d["lifetime"]),
            forced=bool(d["forced"]),
            extra={str(k): str(v) for k, v in d["extra"].items()},
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _Corrupt(f"metadata: {e}") from e


def _read_head(fd: int) -> tuple[bytes, int | None, int]:
    """The raw meta, the body length (None while unknown) and the body offset of a file;
    _Corrupt when magic or checksum do not match."""
    first = os.pread(fd, _FIRST_READ, 0)
    if len(first) < HEADER_SIZE:
        raise _Corrupt("short header")
    magic, length, meta_len, crc = _HEADER.unpack_from(first)
    if magic != MAGIC or meta_len > _MAX_META:
        raise _Corrupt("bad magic")
    offset = HEADER_SIZE + meta_len
    raw = first[HEADER_SIZE:offset]
    if len(raw) < meta_len:
        raw += os.pread(fd, meta_len - len(raw), len(first))
    if len(raw) != meta_len or zlib.crc32(raw) != crc:
        raise _Corrupt("metadata checksum")
    return raw, None if length == UNKNOWN_LENGTH else length, offset


def _check_committed(fd: int, size: int) -> tuple[bytes, int, int]:
    """Raw meta, body offset and body length of a committed file of `size` bytes, or _Corrupt."""
    raw, length, offset = _read_head(fd)
    if length is None or size != offset + length:
        raise _Corrupt("truncated or incomplete")
    return raw, offset, length


def _usage(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink_same(path: Path, ino: int | None = None) -> int | None:
    """Unlink `path` (if given `ino`, only while it is still that inode, not a newer file):
    the usage freed, None if it was gone or replaced."""
    try:
        st = os.stat(path)
        if ino is not None and st.st_ino != ino:
            return None
        os.unlink(path)
    except FileNotFoundError:
        return None
    return _usage(st.st_size)


def _writer_gone(fd: int) -> bool:
    """No process holds the writer's lock on this file any more (committed, aborted or died)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def _remove_dead(path: Path) -> bool:
    """Unlink a .fill or .tmp file whose writer died (nobody holds its lock); True if removed.
    The exclusive lock held while checking serialises processes that try the same."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return _unlink_same(path, os.fstat(fd).st_ino) is not None
    except OSError:  # BlockingIOError: the writer is alive
        return False
    finally:
        os.close(fd)


def _older_than(entry: os.DirEntry[str], seconds: float) -> bool:
    try:
        return time.time() - entry.stat().st_mtime > seconds
    except OSError:
        return False


def _claim(tmp: Path, fill: Path) -> bool:
    """Publish `tmp` as the object's .fill unless a live writer holds it."""
    try:
        os.link(tmp, fill)
    except FileExistsError:
        _remove_dead(fill)
        try:
            os.link(tmp, fill)
        except FileExistsError:
            return False
    return True


def _entries(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError:  # vanished, or not a directory
        return []


def _walk(objects: Path) -> Iterator[os.DirEntry[str]]:
    for top in _entries(str(objects)):
        for leaf in _entries(top.path):
            yield from _entries(leaf.path)


def _tally(objects: Path) -> int:
    """Budget usage of every committed object file under `objects` (a stat each)."""
    total = 0
    for entry in _walk(objects):
        if len(entry.name) in _ID_LENGTHS:
            with suppress(OSError):
                total += _usage(entry.stat().st_size)
    return total


def _default_opener(path: str, flags: int) -> int:
    return os.open(path, flags, 0o644)


@dataclass(slots=True)
class DiskEntry:
    """A committed object opened for reading. `fd` is the caller's to close; reading through it
    stays valid after the file is evicted, purged or replaced (an open file outlives its name)."""

    meta: ObjectMeta
    path: Path
    fd: int
    body_offset: int
    body_length: int

    def close(self) -> None:
        os.close(self.fd)


@dataclass(slots=True)
class _Scanned:
    """What one rebuild step found: (mtime, id, usage) of valid objects, and what it removed."""

    objects: list[tuple[float, str, int]] = field(default_factory=list)
    corrupt: int = 0
    freed: int = 0
    stale: int = 0


class _SharedUsage:
    """The bytes of committed files under a root: one counter for every process using it.

    `usage` holds (total, trusted), read and written under an exclusive flock. Every open store
    holds a shared flock on `lock`, so a store that finds nobody holding it is the first since
    the edge started: it marks the counter untrusted until a rebuild recounts it.
    """

    _RECORD = struct.Struct("<qQ")

    def __init__(self, root: Path) -> None:
        self._lock = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._fd = os.open(root / "usage", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            first = True
        except BlockingIOError:
            first = False
        fcntl.flock(self._lock, fcntl.LOCK_SH)
        if first:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._write(self._read()[0], False)
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def total(self) -> int | None:
        """Bytes in use on the host, None while untrusted (or once closed: a stopped worker's
        last metrics snapshot falls back to its own view)."""
        if self._fd < 0:
            return None
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            total, trusted = self._read()
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return total if trusted else None

    def add(self, delta: int) -> None:
        with self.exclusive():
            self.add_locked(delta)

    def add_locked(self, delta: int) -> None:
        """`add` for a caller inside `exclusive()`."""
        total, trusted = self._read()
        self._write(total + delta, trusted)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the counter: a commit renames and counts inside it, and a recount tallies
        inside it, so that each file is counted exactly once."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def recount(self, tally: Callable[[], int]) -> None:
        """Set the total from a tally of the files, unless another process already did."""
        with self.exclusive():
            if not self._read()[1]:
                self._write(tally(), True)

    def close(self) -> None:
        """Idempotent: a worker stopped twice closes once."""
        if self._fd >= 0:
            os.close(self._fd)
            os.close(self._lock)
            self._fd = -1

    def _read(self) -> tuple[int, bool]:
        data = os.pread(self._fd, self._RECORD.size, 0)
        if len(data) < self._RECORD.size:
            return 0, False
        total, trusted = self._RECORD.unpack(data)
        return total, bool(trusted)

    def _write(self, total: int, trusted: bool) -> None:
        os.pwrite(self._fd, self._RECORD.pack(total, int(trusted)), 0)


class DiskStore:
    """Objects in files under `root`, least recently used out when over `budget` bytes.

    `stall_timeout`: a follower gives up on a fill that made no progress for that long.
    `clock`: wall time, for the once-per-interval error log. `opener`: how a writer's file is
    opened, `(path, flags) -> fd` like open()'s opener; a test seam (tests hand out descriptors
    of /dev/full to simulate a full disk).
    """

    def __init__(
        self,
        root: Path,
        budget: int,
        *,
        stall_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
        opener: Callable[[str, int], int] = _default_opener,
    ) -> None:
        self.root = root
        self.budget = budget
        self.stall_timeout = stall_timeout
        self._objects = root / "objects"
        self._objects.mkdir(parents=True, exist_ok=True)
        self._usage = _SharedUsage(root)
        self._clock = clock
        self._opener = opener
        self._lru: OrderedDict[str, int] = OrderedDict()  # id -> usage, least recent first
        self._view_bytes = 0  # sum of the LRU's usages
        self.evictions = 0
        self.corrupt_removed = 0
        self.write_errors = 0
        self._failed_unlogged = 0
        self._last_log: float | None = None

    # --- reading ----------------------------------------------------------------------------
    def lookup(self, oid: str) -> DiskEntry | None:
        """The committed object `oid`, validated and opened, or None. A corrupt or truncated
        file is removed and counted, never returned. Counts as a hit for the LRU."""
        path = self._path(oid)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forget(oid)
            return None
        except OSError:  # EMFILE, EIO...: a miss this time
            return None
        try:
            st = os.fstat(fd)
            raw, offset, length = _check_committed(fd, st.st_size)
            meta = _decode_meta(raw)
        except _Corrupt as e:
            os.close(fd)
            self._drop_corrupt(oid, path, st.st_ino, str(e))
            return None
        except OSError:  # unreadable now (EIO...): a miss, the file may recover
            os.close(fd)
            return None
        self._note(oid, _usage(st.st_size))
        return DiskEntry(meta, path, fd, offset, length)

    def follow(self, oid: str) -> DiskFollower | None:
        """Read another writer's object while it is being written; None when nobody fills it."""
        try:
            fd = os.open(self._fill_path(oid), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            raw, length, offset = _read_head(fd)
            meta = _decode_meta(raw)
        except (OSError, _Corrupt):
            os.close(fd)
            return None
        if meta.extra.get(VARY_STUB):
            os.close(fd)  # a Vary stub being written names variants; it is no body to follow
            return None
        return DiskFollower(meta, length, fd, offset, self.stall_timeout)

    def claim(self, oid: str) -> Claim | None:
        """The host-wide right to fetch `oid` from the origin (coalescing across worker
        processes), held until released; None while another live process holds it. Raises
        DiskError when the disk fails.

        An flock'ed `<id>.busy` file. Releasing unlinks it; a process that opened the old
        file just before may then hold a lock on an unlinked file: the cost is a rare second
        fetch, never a mixed object (`begin` still admits one writer).
        """
        path = self._path(oid).with_name(oid + ".busy")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise self._write_failed(e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return Claim(path, fd)

    def claimed(self, oid: str) -> bool:
        """Whether a live process holds `oid`'s claim."""
        try:
            fd = os.open(self._path(oid).with_name(oid + ".busy"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False

    def record_hit(self, oid: str) -> None:
        """A hit on `oid` served from elsewhere (the memory tier, a follower): keep it recent."""
        if oid in self._lru:
            self._lru.move_to_end(oid)

    # --- writing ----------------------------------------------------------------------------
    def begin(self, oid: str, meta: ObjectMeta, body_length: int | None) -> DiskWriter | None:
        """Start writing `oid`: a writer holding the per-host fill lock, or None when another
        live writer (any process) holds it. A .fill whose writer died is taken over. Raises
        DiskError when the disk fails (counted and logged like append's errors)."""
        final = self._path(oid)
        fill = self._fill_path(oid)
        tmp = final.with_name(f"{oid}.{token_hex(6)}.tmp")
        head = _encode_head(meta, body_length)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd = self._opener(str(tmp), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC)
        except OSError as e:
            raise self._write_failed(e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(fd, head)
            claimed = _claim(tmp, fill)
        except OSError as e:
            os.close(fd)
            raise self._write_failed(e) from e
        finally:
            with suppress(OSError):
                os.unlink(tmp)
        if not claimed:
            os.close(fd)
            return None
        return DiskWriter(self, oid, fd, fill, final, meta, body_length, len(head))

    def remove(self, oid: str) -> bool:
        """Purge the committed object `oid` (readers holding it open finish); True if it was."""
        self._forget(oid)
        return self._unlink(self._path(oid))

    def remove_key(self, key: str) -> int:
        """Purge every committed variant of a cache key; returns how many files went."""
        primary = object_id(key)
        removed = 0
        for entry in _entries(str(self._path(primary).parent)):
            name = entry.name
            if (name == primary or name.startswith(primary + "-")) and len(name) in _ID_LENGTHS:
                removed += self.remove(name)
        return removed

    async def sweep(self, doomed: Callable[[ObjectMeta], bool]) -> int:
        """Remove every committed object whose metadata `doomed` accepts (a purge's walk of
        the disk, `edge.purge`): heads are read in steps off the event loop, so `doomed` runs
        in a thread; returns how many files went."""
        entries = _walk(self._objects)
        removed = 0
        while (step := await asyncio.to_thread(self._sweep_step, entries, doomed)) is not None:
            for oid, freed in step:
                self._forget(oid)
                if isinstance(freed, OSError):
                    self._write_failed(freed)
                elif freed is not None:
                    self._count(-freed)
                    removed += 1
        return removed

    # --- budget -----------------------------------------------------------------------------
    @property
    def bytes_used(self) -> int:
        """Bytes of committed objects on the host (this process's view until counted)."""
        total = self._usage.total()
        return self._view_bytes if total is None else total

    @property
    def objects(self) -> int:
        """Objects this process knows."""
        return len(self._lru)

    async def rebuild(self) -> None:
        """Index what is on disk after a (re)start: validate every file's head, remove corrupt
        files and dead writers' leftovers, add the rest as least recent (by mtime), then evict
        to budget. Runs in steps off the event loop; lookups work meanwhile."""
        started = time.monotonic()
        entries = _walk(self._objects)
        found: list[tuple[float, str, int]] = []
        corrupt = stale = 0
        while (step := await asyncio.to_thread(self._scan, entries)) is not None:
            found.extend(step.objects)
            corrupt += step.corrupt
            stale += step.stale
            if step.freed:
                self._count(-step.freed)
        self.corrupt_removed += corrupt
        found.sort(reverse=True)  # newest first: each moves in front of the previous
        for _mtime, oid, usage in found:
            if oid not in self._lru:  # looked up or committed since start: more recent
                self._lru[oid] = usage
                self._lru.move_to_end(oid, last=False)
                self._view_bytes += usage
        # Count what is on disk now, not what this scan saw: other workers commit into
        # directories the scan had already passed. Their commits wait for this tally (one
        # directory walk of stats, once per start) so that each file counts exactly once.
        objects = self._objects
        await asyncio.to_thread(self._usage.recount, lambda: _tally(objects))
        self._evict()
        log.info(
            "disk tier %s: %d objects, %d bytes in use, %d corrupt and %d stale files removed"
            " in %.1f s",
            self.root, len(self._lru), self.bytes_used, corrupt, stale,
            time.monotonic() - started,
        )

    def close(self) -> None:
        """Release the shared counter (open entries, writers and followers stay usable)."""
        self._usage.close()

    # --- internals --------------------------------------------------------------------------
    def _path(self, oid: str) -> Path:
        return self._objects / oid[:2] / oid[2:4] / oid

    def _fill_path(self, oid: str) -> Path:
        return self._objects / oid[:2] / oid[2:4] / (oid + ".fill")

    def _scan(self, entries: Iterator[os.DirEntry[str]]) -> _Scanned | None:
        """One rebuild step, in a thread: touches only the files, never the store's state."""
        step = _Scanned()
        seen = 0
        for entry in itertools.islice(entries, _REBUILD_BATCH):
            seen += 1
            name = entry.name
            if name.endswith(".fill") or (
                name.endswith((".tmp", ".busy")) and _older_than(entry, 60.0)
            ):
                # A fresh .tmp may be a writer between creating and locking it: leave it.
                step.stale += _remove_dead(Path(entry.path))
            elif len(name) in _ID_LENGTHS:
                self._scan_object(Path(entry.path), step)
        return step if seen else None

    @staticmethod
    def _sweep_step(
        entries: Iterator[os.DirEntry[str]], doomed: Callable[[ObjectMeta], bool]
    ) -> list[tuple[str, int | OSError | None]] | None:
        """One sweep step, in a thread: removes the doomed objects of a batch of files, each
        while its descriptor is open, so that its inode cannot be reused by a newer object
        stored at the same path meanwhile (which stays). (id, usage freed, or the error, or
        None if it was gone or replaced) of each; None when the walk is over. Unreadable and
        corrupt files are left to lookups."""
        found: list[tuple[str, int | OSError | None]] = []
        seen = 0
        for entry in itertools.islice(entries, _REBUILD_BATCH):
            seen += 1
            if len(entry.name) not in _ID_LENGTHS:
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                meta = _decode_meta(_read_head(fd)[0])
                if doomed(meta):
                    freed: int | OSError | None
                    try:
                        freed = _unlink_same(Path(entry.path), os.fstat(fd).st_ino)
                    except OSError as e:
                        freed = e
                    found.append((entry.name, freed))
            except (OSError, _Corrupt):
                pass
            finally:
                os.close(fd)
        return found if seen else None

    @staticmethod
    def _scan_object(path: Path, step: _Scanned) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            _check_committed(fd, st.st_size)
            step.objects.append((st.st_mtime, path.name, _usage(st.st_size)))
        except _Corrupt:
            freed = _unlink_same(path, st.st_ino)
            if freed is not None:
                step.corrupt += 1
                step.freed += freed
        except OSError:
            pass
        finally:
            os.close(fd)

    def _note(self, oid: str, usage: int) -> None:
        old = self._lru.pop(oid, None)
        if old is not None:
            self._view_bytes -= old
        self._lru[oid] = usage
        self._view_bytes += usage

    def _forget(self, oid: str) -> None:
        usage = self._lru.pop(oid, None)
        if usage is not None:
            self._view_bytes -= usage

    def _committed(self, oid: str, usage: int) -> None:
        self._note(oid, usage)
        self._evict()

    def _evict(self) -> None:
        while self._lru and self.bytes_used > self.budget:
            oid, usage = self._lru.popitem(last=False)
            self._view_bytes -= usage
            if self._unlink(self._path(oid)):
                self.evictions += 1

    def _unlink(self, path: Path) -> bool:
        """Unlink a committed file and uncount it; False if it was gone."""
        try:
            freed = _unlink_same(path)
        except OSError as e:
            self._write_failed(e)
            return False
        if freed is None:
            return False
        self._count(-freed)
        return True

    def _drop_corrupt(self, oid: str, path: Path, ino: int, why: str) -> None:
        self._forget(oid)
        try:
            freed = _unlink_same(path, ino)
        except OSError as e:
            self._write_failed(e)
            return
        if freed is not None:
            self.corrupt_removed += 1
            self._count(-freed)
            log.warning("disk tier: removed corrupt object %s (%s)", path, why)

    def _count(self, delta: int) -> None:
        try:
            self._usage.add(delta)
        except OSError as e:
            self._write_failed(e)

    def _write_failed(self, e: OSError) -> DiskError:
        """Count a failed disk write and log it, one line per LOG_INTERVAL; the error to raise."""
        self.write_errors += 1
        self._failed_unlogged += 1
        now = self._clock()
        if self._last_log is None or now - self._last_log >= LOG_INTERVAL:
            since = now if self._last_log is None else self._last_log
            log.warning(
                "%s: %d writes failed since %s (last: %s); responses pass through unstored",
                "disk full" if e.errno == errno.ENOSPC else "disk error",
                self._failed_unlogged,
                datetime.fromtimestamp(since, UTC).isoformat(timespec="seconds"),
                e,
            )
            self._failed_unlogged = 0
            self._last_log = now
        return DiskError(e.errno, f"disk tier: {e.strerror}")


class DiskWriter:
    """One object being written (from `DiskStore.begin`). The owner ends it with `commit()` or
    `abort()`, also after an error. `fd` is open for reading too, so readers in this process
    can read back what is written (`os.pread(fd, n, body_offset + pos)`), also after an error;
    after commit the same descriptor belongs to the returned entry, after abort it is closed."""

    def __init__(
        self,
        store: DiskStore,
        oid: str,
        fd: int,
        fill: Path,
        final: Path,
        meta: ObjectMeta,
        declared: int | None,
        body_offset: int,
    ) -> None:
        self.meta = meta
        self.fd = fd
        self.body_offset = body_offset
        self.written = 0
        self._store = store
        self._oid = oid
        self._fill = fill
        self._final = final
        self._declared = declared
        self._failed = False  # the .fill is gone; the descriptor stays open until abort()
        self._closed = False

    def append(self, data: bytes | memoryview) -> None:
        """Write the next body bytes. On a disk error the writer aborts itself (followers see
        it) and raises DiskError; later appends do nothing."""
        if self._failed or self._closed:
            return
        try:
            _write_all(self.fd, data)
        except OSError as e:
            self._fail()
            raise self._store._write_failed(e) from e
        self.written += len(data)

    def commit(self) -> DiskEntry | None:
        """Make the object visible: final length into the header, atomic rename, LRU, evict.
        The returned entry takes over `fd` (the caller closes it). None when the writer failed,
        or the body is not the declared length (the writer is aborted)."""
        if self._closed:
            return None
        if self._failed or (self._declared is not None and self.written != self._declared):
            self.abort()
            return None
        try:
            if self._declared is None:
                os.pwrite(self.fd, _LENGTH.pack(self.written), len(MAGIC))
            try:
                replaced = _usage(os.stat(self._final).st_size)
            except FileNotFoundError:
                replaced = 0
            usage = _usage(self.body_offset + self.written)
            with self._store._usage.exclusive():  # renamed and counted as one step
                os.rename(self._fill, self._final)
                self._store._usage.add_locked(usage - replaced)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError as e:
            self._store._write_failed(e)
            self.abort()
            return None
        self._closed = True
        self._store._committed(self._oid, usage)
        return DiskEntry(self.meta, self._final, self.fd, self.body_offset, self.written)

    def abort(self) -> None:
        """Drop the object: unlink the .fill (followers then see it) and close. Idempotent."""
        if self._closed:
            return
        if not self._failed:
            self._fail()
        self._closed = True
        os.close(self.fd)

    def _fail(self) -> None:
        self._failed = True
        with suppress(OSError):
            os.unlink(self._fill)
        with suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)


class Claim:
    """A held `DiskStore.claim`; `release()` is idempotent."""

    def __init__(self, path: Path, fd: int) -> None:
        self._path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            with suppress(OSError):
                os.unlink(self._path)
            os.close(self._fd)
            self._fd = -1


class DiskFollower:
    """Reads an object another writer (any process) is still writing, as the file grows.

    Polls: when it has read everything written so far it sleeps `poll` seconds, then checks the
    file size (one fstat) and, when nothing grew, whether the writer is still there (one flock
    probe). Measured on the 2-core box, one poll costs about 0.1 ms of CPU, mostly the event
    loop's timer wake-up: a follower waiting on a stalled origin at the default 5 ms uses about
    2 % of a core, one keeping up with a fast fill much less (it reads whole chunks per wake-up).
    So the edge runs one follower per object per process and fans its bytes out in memory.
    """

    def __init__(
        self, meta: ObjectMeta, body_length: int | None, fd: int, body_offset: int,
        stall_timeout: float,
    ) -> None:
        self.meta = meta
        self.body_length = body_length  # None until known (no declared length, not committed)
        self.fd = fd
        self.body_offset = body_offset
        self._stall_timeout = stall_timeout

    async def chunks(
        self, start: int = 0, end: int | None = None, *, chunk: int = 256 << 10,
        poll: float = 0.005,
    ) -> AsyncIterator[bytes]:
        """Body bytes [start, end) (end None: to the end of the body), as they are written.
        Raises FillAborted when the writer aborts or dies before those bytes exist, or nothing
        new arrives for `stall_timeout` seconds."""
        loop = asyncio.get_running_loop()
        pos = start
        last_progress = loop.time()
        while True:
            limit = os.fstat(self.fd).st_size - self.body_offset
            if self.body_length is not None:
                limit = min(limit, self.body_length)
            if end is not None:
                limit = min(limit, end)
            if pos < limit:
                data = os.pread(self.fd, min(chunk, limit - pos), self.body_offset + pos)
                pos += len(data)
                yield data
                last_progress = loop.time()
                continue
            if (end is not None and pos >= end) or (
                self.body_length is not None and pos >= self.body_length
            ):
                return
            if _writer_gone(self.fd):
                self._finished_or_abort()
                continue
            if loop.time() - last_progress > self._stall_timeout:
                raise FillAborted(f"no progress for {self._stall_timeout:g} s")
            await asyncio.sleep(poll)

    def close(self) -> None:
        os.close(self.fd)

    def _finished_or_abort(self) -> None:
        """The writer is gone: learn the final length if the body is complete, else abort."""
        (length,) = _LENGTH.unpack(os.pread(self.fd, _LENGTH.size, len(MAGIC)))
        if length == UNKNOWN_LENGTH or os.fstat(self.fd).st_size < self.body_offset + length:
            raise FillAborted("the writer stopped before the body was complete")
        self.body_length = length
