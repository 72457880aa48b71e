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
  longer lists it, checked on each change.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge.controlstate import Purge
from edge.disk import ObjectMeta
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


def bans_for(purges: Iterable[Purge], version: int, now: float) -> list[Ban]:
    return [Ban(version, p.kind, p.key, p.tag, now) for p in purges]


class BanKeeper:
    """A worker's ban list over time: adding bans, the lead's lurker and ban file, and the
    other workers' pruning by that file. Owns the lurker task (`close` cancels and awaits it)."""

    def __init__(self, tiers: Tiers, state_dir: str) -> None:
        self.tiers = tiers
        self.path = Path(state_dir) / BAN_FILE
        self._lurk: asyncio.Task[None] | None = None

    def load(self) -> None:
        """At start: the bans a lead left unfinished (its disk walk did not end)."""
        self.tiers.bans = BanList(self._read()[1])
        if len(self.tiers.bans):
            log.info("%d bans left from before the restart", len(self.tiers.bans))

    def add(self, bans: list[Ban], *, lead: bool) -> None:
        """Enforce `bans` from now on (called on every change, with or without bans). The lead
        persists them and walks the disk for them; another worker prunes its list."""
        for ban in bans:
            self.tiers.bans.add(ban)
        if not lead:
            self._prune()
            return
        current = self.tiers.bans
        expired = time.time() - URL_BAN_KEEP
        if any(b.kind == "url" and b.time < expired for b in current):
            self.tiers.bans = BanList(b for b in current if b.kind != "url" or b.time >= expired)
        if bans or len(self.tiers.bans) < len(current):
            self._write(max((b.version for b in bans), default=-1))
        if self.tiers.bans.walks and (self._lurk is None or self._lurk.done()):
            self._lurk = asyncio.create_task(self._lurker(), name="ban-lurker")

    def _prune(self) -> None:
        """Drop the bans the lead has finished with (applied, and gone from its file).
        Without the file (no lead yet) every ban stays."""
        bans = self.tiers.bans
        if not len(bans):
            return
        version, pending = self._read()
        kept = {b.ident for b in pending}
        left = [b for b in bans if b.version > version or b.ident in kept]
        if len(left) < len(bans):
            self.tiers.bans = BanList(left)

    async def close(self) -> None:
        if self._lurk is not None:
            self._lurk.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lurk

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
            done = {b.ident for b in batch}
            self.tiers.bans = BanList(b for b in self.tiers.bans if b.ident not in done)
            self._write(max(b.version for b in batch))
            log.info(
                "purge: %d bans done, %d disk objects removed in %.1f s",
                len(batch),
                removed,
                time.monotonic() - started,
            )

    def _read(self) -> tuple[int, list[Ban]]:
        """The lead's file: the last version it applied and its unfinished bans."""
        try:
            raw = json.loads(self.path.read_bytes())
            return int(raw["version"]), [Ban(**b) for b in raw["bans"]]
        except FileNotFoundError:
            return -1, []
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable %s: %s", self.path, e)
            return -1, []

    def _write(self, version: int) -> None:
        """Persist this lead's bans: temp file, fsync, rename (never half a file)."""
        version = max(version, self._read()[0])
        data = json.dumps(
            {"version": version, "bans": [asdict(b) for b in self.tiers.bans]},
            separators=(",", ":"),
        ).encode()
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("cannot persist bans to %s: %s", self.path, e)
