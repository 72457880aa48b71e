"""Purges as bans, Varnish's ban list: a purge by prefix, domain or tag cannot know which
objects it hits without reading each one, so it becomes a predicate with a wall time, and a
stored object counts as absent once a ban issued after it was stored matches it.

- Every worker keeps the bans (`BanList`, read by `edge.tiers.Tiers.lookup`). An object stored
  after the newest ban passes with one float comparison; an older one is checked against the
  bans newer than its last check (`CachedObject.ban_checked`), once each; a match removes it.
- Every worker drops its matching memory objects at once (`edge.request.EdgeProxy.purge`).
- The lead worker (the supervisor's `lead`) walks the disk tier in the background, the
  "lurker" (`DiskStore.sweep`), removing the objects stored before a ban that matches. Until
  the walk is done its bans sit in `state_dir/control/bans.json` (written atomically), so that a
  restart does not bring purged disk objects back; a finished walk drops its bans.
- The other workers drop a ban once that file shows the lead has applied it (`version`) and no
  longer lists it, checked on each change (the file read again only when it changed). A ban of
  everything (a flushed snapshot, after which versions may start over) they keep until a newer
  one replaces it: it costs one check per object stored before it.
- The file is written and read in a thread, off the request loop; a burst of changes makes one
  write, and the lead answers a change `applied` only once the write holding it is durable.

A url purge is also a ban, though it needs no walk: the lead removes the key's files at once,
and the ban covers, for URL_BAN_KEEP seconds, what another worker fetched in the instant before
it heard of the purge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge.controlstate import Purge
from edge.disk import ObjectMeta
from edge.files import write_atomically
from edge.slices import SLICE_MARK

if TYPE_CHECKING:
    from edge.tiers import Tiers

log = logging.getLogger("edge.purge")

BAN_FILE = Path("control") / "bans.json"  # under state_dir
TAGS = "tags"  # ObjectMeta.extra key of an object's purge tags (one per line)
NEVER = float("-inf")  # `BanList.banned(..., since=NEVER)`: whatever the ban times
URL_BAN_KEEP = 60.0  # seconds the lead keeps a url ban (its files went at once)


@dataclass(frozen=True, slots=True)
class Ban:
    version: int  # of the change that issued it
    kind: str  # as Purge.kind
    key: str
    tag: str
    time: float  # wall time it was issued: objects stored before it are its to match

    def matches(self, key: str, tags: str) -> bool:
        """Whether an object stored under `key` with `tags` (one per line) falls under it."""
        if self.kind == "url":
            return key.partition(SLICE_MARK)[0] == self.key
        if not key.startswith(self.key):
            return False
        return self.kind == "prefix" or (bool(tags) and self.tag in tags.split("\n"))

    def as_json(self) -> dict[str, str | int | float]:
        """Its fields by name, as `Ban(**fields)` takes them (dataclasses.asdict is several
        times slower, and the lead writes every ban it holds on every purge)."""
        return {
            "version": self.version,
            "kind": self.kind,
            "key": self.key,
            "tag": self.tag,
            "time": self.time,
        }

    @property
    def everything(self) -> bool:
        """A ban of every object of every domain (a flushed snapshot)."""
        return self.kind == "prefix" and not self.key

    @property
    def ident(self) -> tuple[int, str, str, str]:
        """The ban across workers, whose clocks issued it at slightly different times."""
        return self.version, self.kind, self.key, self.tag


class BanList:
    """A worker's bans; `newest` is the time of the newest (-inf with none), the hit path's
    whole cost: an object stored after it needs no check."""

    def __init__(self, bans: Iterable[Ban] = ()) -> None:
        self.newest = NEVER
        self._urls: dict[str, Ban] = {}  # url bans by key, the newest per key
        self._others: list[Ban] = []
        for ban in bans:
            self.add(ban)

    def add(self, ban: Ban) -> None:
        if ban.kind == "url":
            old = self._urls.get(ban.key)
            if old is None or old.time <= ban.time:
                self._urls[ban.key] = ban
        else:
            if ban.everything:  # covers every older ban of everything
                self._others = [b for b in self._others if not b.everything or b.time > ban.time]
            self._others.append(ban)
        self.newest = max(self.newest, ban.time)

    def banned(self, key: str, tags: str, since: float) -> bool:
        """Whether a ban issued after `since` (the object's store time or last check) matches
        the object stored under `key` with `tags`."""
        if self._urls:
            ban = self._urls.get(key.partition(SLICE_MARK)[0])
            if ban is not None and ban.time > since:
                return True
        return any(b.time > since and b.matches(key, tags) for b in self._others)

    def banned_meta(self, meta: ObjectMeta) -> bool:
        """`banned` for a disk object (its metadata)."""
        return self.banned(meta.key, meta.extra.get(TAGS, ""), meta.response_time)

    @property
    def walks(self) -> bool:
        """Whether some ban needs a walk of the disk (a url ban's files are known)."""
        return bool(self._others)

    def __iter__(self) -> Iterator[Ban]:
        yield from self._urls.values()
        yield from self._others

    def __len__(self) -> int:
        return len(self._urls) + len(self._others)


def bans_for(purges: Iterable[tuple[int, Purge]], now: float) -> list[Ban]:
    """Bans of (change version, purge) pairs, issued `now`: a purge's ban is never older than
    the purge (a later one bans more, never less)."""
    return [Ban(version, p.kind, p.key, p.tag, now) for version, p in purges]


class BanKeeper:
    """A worker's ban list over time: adding bans, the lead's lurker and ban file, and the
    other workers' pruning by that file. The file is written and read in a thread, never on
    the request loop, one write for a burst of changes (`written` says when a change is
    durable). Owns its background tasks (`close` writes what is pending, then stops)."""

    def __init__(self, tiers: Tiers, state_dir: str) -> None:
        self.tiers = tiers
        self.path = Path(state_dir) / BAN_FILE
        self._lurk: asyncio.Task[None] | None = None
        self._lead = False
        # The newest version of a ban this worker applied (since the last ban of everything,
        # which starts versions over: `_reset`), the lead's file's version.
        self._version = -1
        self._reset = False
        self._next: asyncio.Future[None] | None = None  # done by the next write to start
        self._writer: asyncio.Task[None] | None = None
        self._prune_asked = False
        self._pruner: asyncio.Task[None] | None = None
        # The file as last read, (inode, size, mtime) and contents: one assignment, as two
        # threads may read it (a worker that stopped or started leading).
        self._read: tuple[tuple[int, int, int] | None, tuple[int, list[Ban]]] = (None, (-1, []))

    def load(self) -> None:
        """At start: the bans a lead left unfinished (its disk walk did not end)."""
        left = self._read_changed()[1]
        for ban in left:
            self.tiers.bans.add(ban)
        if left:
            log.info("%d bans left from before the restart", len(left))

    def add(self, bans: list[Ban], *, lead: bool) -> asyncio.Future[None] | None:
        """Enforce `bans` from now on (called on every change, with or without bans). The lead
        persists them and walks the disk for them; another worker prunes its list. Returns
        what is done once the lead's file holds them, None when there is nothing to write."""
        became_lead, self._lead = lead and not self._lead, lead
        for ban in bans:
            self.tiers.bans.add(ban)
            if ban.everything:  # a flush: the control plane's versions may have started over
                self._version, self._reset = ban.version, True
            else:
                self._version = max(self._version, ban.version)
        if not lead:
            self._prune_soon()
            return None
        current = self.tiers.bans
        expired = time.time() - URL_BAN_KEEP
        if any(b.kind == "url" and b.time < expired for b in current):
            self.tiers.bans = BanList(b for b in current if b.kind != "url" or b.time >= expired)
        if self.tiers.bans.walks and (self._lurk is None or self._lurk.done()):
            self._lurk = asyncio.create_task(self._lurker(), name="ban-lurker")
        if bans or len(self.tiers.bans) < len(current) or (became_lead and len(current)):
            return self._persist()
        return None

    async def close(self) -> None:
        for task in (self._lurk, self._pruner):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._writer is not None:  # the bans of the last changes reach the file
            await self._writer

    def _prune_soon(self) -> None:
        """Drop, in the background, the bans the lead has finished with (applied, and gone
        from its file). Without the file (no lead yet) every ban stays."""
        if not len(self.tiers.bans):
            return
        self._prune_asked = True
        if self._pruner is None or self._pruner.done():
            self._pruner = asyncio.create_task(self._prune(), name="ban-prune")

    async def _prune(self) -> None:
        while self._prune_asked:
            self._prune_asked = False
            version, pending = await asyncio.to_thread(self._read_changed)
            kept = {b.ident for b in pending}
            bans = self.tiers.bans
            left = [b for b in bans if b.version > version or b.ident in kept or b.everything]
            if len(left) < len(bans):
                self.tiers.bans = BanList(left)

    async def _lurker(self) -> None:
        """Walk the disk for the current bans (url ones ride along); drop them when done;
        again while bans that need a walk came meanwhile."""
        disk = self.tiers.disk
        while self.tiers.bans.walks:
            batch = BanList(self.tiers.bans)
            started = time.monotonic()
            removed = 0
            if disk is not None:
                try:
                    removed = await disk.sweep(batch.banned_meta)
                except OSError as e:  # the bans stay (checked at lookup), persisted
                    log.warning("purge: disk walk failed: %s", e)
                    return
            # Not by ident: a flush again at the same version is newer. URL bans stay for their
            # keep period even though the walk covered them (see URL_BAN_KEEP), as in `add`.
            kept_since = time.time() - URL_BAN_KEEP
            done = {b for b in batch if b.kind != "url" or b.time < kept_since}
            self.tiers.bans = BanList(b for b in self.tiers.bans if b not in done)
            self._persist()
            log.info(
                "purge: %d bans done, %d disk objects removed in %.1f s",
                len(batch),
                removed,
                time.monotonic() - started,
            )

    def _persist(self) -> asyncio.Future[None]:
        """Have the lead's bans written; one write covers every ask made before it starts."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all(), name="ban-writer")
        return self._next

    async def _write_all(self) -> None:
        while (done := self._next) is not None:
            self._next = None
            reset, self._reset = self._reset, False
            try:
                bans = list(self.tiers.bans)
                await asyncio.to_thread(self._write, bans, self._version, reset)
            finally:
                done.set_result(None)  # a failed write is logged: the change still applies

    def _read_changed(self) -> tuple[int, list[Ban]]:
        """The lead's file, read again only when it changed: the last version it applied
        and its unfinished bans."""
        try:
            st = os.stat(self.path)
            seen = (st.st_ino, st.st_size, st.st_mtime_ns)
            if seen != self._read[0]:
                raw = json.loads(self.path.read_bytes())
                self._read = seen, (int(raw["version"]), [Ban(**b) for b in raw["bans"]])
        except FileNotFoundError:
            self._read = None, (-1, [])
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable %s: %s", self.path, e)
            self._read = None, (-1, [])
        return self._read[1]

    def _write(self, bans: list[Ban], version: int, reset: bool) -> None:
        """Persist this lead's bans: temp file, fsync, rename, fsync of the directory (never
        half a file, and durable once this returns). In a thread. The version never goes
        back (another worker may have led before), unless `reset` by a flush."""
        if not reset:
            version = max(version, self._read_changed()[0])
        data = json.dumps(
            {"version": version, "bans": [b.as_json() for b in bans]}, separators=(",", ":")
        ).encode()
        try:
            write_atomically(self.path, data)
        except OSError as e:
            log.warning("cannot persist bans to %s: %s", self.path, e)
