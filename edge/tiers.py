"""The cache's storage as one interface: the memory tier in front of the disk tier.

- lookup: memory first; then disk, where a key with Vary has a stub file naming the Vary fields
  and one file per variant. Small disk objects are promoted to memory; large ones are served
  from their file (`CachedObject.file`, sent with sendfile).
- store: every storable response is written to disk when there is a disk tier (a restart keeps
  it, and every worker on the host finds it); responses up to `memory_max_object` are also
  kept in memory.
- remove: a key's every variant in both tiers (invalidation, purge).
- bans (`edge.purge`): an object a ban issued after it matches is absent, and removed.

Only storage mechanics live here; what may be stored and for how long is `edge.policy` and
`edge.request`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from edge import policy
from edge.config import CacheSettings
from edge.disk import (
    VARY_STUB,
    Claim,
    DiskEntry,
    DiskError,
    DiskFollower,
    DiskStore,
    DiskWriter,
    ObjectMeta,
    object_id,
)
from edge.purge import TAGS, BanList
from edge.slices import SLICE_MARK
from edge.store import CachedObject, MemoryTier, forced_directives

log = logging.getLogger("edge.tiers")

COPY_CHUNK = 1 << 20


def disk_id(key: str, vary_values: tuple[str, ...] = ()) -> str:
    """A key's file id. A slice's id extends its object's primary id (like a Vary variant's),
    so that removing the object's key removes its slices too."""
    primary, mark, suffix = key.partition(SLICE_MARK)
    if not mark:
        return object_id(key, vary_values)
    return object_id(primary, (SLICE_MARK + suffix,))


def object_meta(obj: CachedObject) -> ObjectMeta:
    return ObjectMeta(
        key=obj.key,
        vary_names=obj.vary_names,
        vary_values=obj.vary_values,
        status=obj.status,
        fields=obj.fields,
        request_time=obj.request_time,
        response_time=obj.response_time,
        initial_age=obj.initial_age,
        lifetime=obj.lifetime,
        forced=obj.forced,
        extra={TAGS: obj.tags} if obj.tags else {},
    )


def object_from_meta(meta: ObjectMeta, body: bytes, file: DiskEntry | None) -> CachedObject:
    headers = policy.combine_fields(meta.fields)
    rd = policy.response_directives(headers)
    return CachedObject(
        key=meta.key,
        vary_names=tuple(meta.vary_names),
        vary_values=tuple(meta.vary_values),
        status=meta.status,
        fields=[(name, value) for name, value in meta.fields],
        headers=headers,
        body=body,
        directives=forced_directives(rd) if meta.forced else rd,
        lifetime=meta.lifetime,
        request_time=meta.request_time,
        response_time=meta.response_time,
        initial_age=meta.initial_age,
        forced=meta.forced,
        file=file,
        tags=meta.extra.get(TAGS, ""),
    )


class Tiers:
    def __init__(self, memory: MemoryTier, settings: CacheSettings, state_dir: str) -> None:
        self.memory = memory
        self.settings = settings
        self.disk = (
            DiskStore(Path(state_dir) / "cache", settings.disk) if settings.disk else None
        )
        self._rebuild: asyncio.Task[None] | None = None
        self.bans = BanList()  # replaced whole by `edge.purge.BanKeeper`

    async def start(self) -> None:
        """Rebuild the disk index in the background; misses are served meanwhile."""
        if self.disk is not None:
            self._rebuild = asyncio.create_task(self.disk.rebuild(), name="disk-rebuild")

    async def close(self) -> None:
        if self._rebuild is not None:
            self._rebuild.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rebuild
        if self.disk is not None:
            self.disk.close()

    # lookup --------------------------------------------------------------------------
    def lookup(self, key: str, request: policy.Headers) -> tuple[CachedObject | None, str]:
        """The stored response for a request, or None and why ("uri-miss" or "vary-miss").

        A returned object with `file` set holds an open descriptor: the caller closes it.
        """
        obj, why = self.memory.lookup(key, request)
        if obj is not None:
            if obj.ban_checked >= self.bans.newest or not self._banned(obj):
                return obj, why
            why = "uri-miss"
        if self.disk is None:
            return None, why
        oid = disk_id(key)
        entry = self.disk.lookup(oid)
        if entry is None:
            return None, why
        if entry.meta.extra.get(VARY_STUB):
            values = policy.vary_values(tuple(entry.meta.vary_names), request)
            entry.close()
            oid = disk_id(key, values)
            entry = self.disk.lookup(oid)
            if entry is None:
                return None, "vary-miss"
        if entry.meta.response_time < self.bans.newest and self.bans.banned_meta(entry.meta):
            entry.close()
            self.disk.remove(oid)
            return None, "uri-miss"
        return self._from_disk(entry), ""

    def _banned(self, obj: CachedObject) -> bool:
        """A memory object older than the newest ban: removed if a ban matches, else marked
        checked, so that each ban costs it one check."""
        bans = self.bans
        if bans.banned(obj.key, obj.tags, obj.ban_checked):
            self.memory.remove(obj.key)
            return True
        obj.ban_checked = bans.newest
        return False

    def _from_disk(self, entry: DiskEntry) -> CachedObject:
        if entry.body_length > self.settings.memory_max_object:
            return object_from_meta(entry.meta, b"", entry)
        try:
            body = os.pread(entry.fd, entry.body_length, entry.body_offset)
        finally:
            entry.close()
        obj = object_from_meta(entry.meta, body, None)
        self.memory.put(obj)  # hot small objects also sit in memory
        return obj

    # store ---------------------------------------------------------------------------
    def spool(self, obj: CachedObject, length: int | None) -> DiskWriter | None:
        """A disk writer for a response about to stream in (`obj` has no body yet), or None
        when there is no disk tier, another process is writing it, or the disk failed."""
        if self.disk is None:
            return None
        try:
            writer = self.disk.begin(
                disk_id(obj.key, obj.vary_values), object_meta(obj), length
            )
        except DiskError:
            return None  # counted and logged (once per interval) by the store
        if writer is not None and obj.vary_names:
            # Now, not at commit: other workers find the variant's file to follow from it.
            self._write_stub(obj)
        return writer

    def commit(self, writer: DiskWriter, obj: CachedObject) -> bool:
        entry = writer.commit()
        if entry is None:
            return False
        entry.close()
        return True

    def keep_in_memory(self, obj: CachedObject) -> bool:
        return self.memory.put(obj)

    def store_complete(self, obj: CachedObject) -> bool:
        """Store an object whose whole body is in memory (a slice): both tiers."""
        kept = obj.body_length <= self.settings.memory_max_object and self.memory.put(obj)
        writer = self.spool(obj, obj.body_length)
        if writer is None:
            return kept
        try:
            writer.append(obj.body)
        except OSError:
            writer.abort()
            return kept
        return self.commit(writer, obj) or kept

    def store_revalidated(self, obj: CachedObject) -> None:
        """Store `obj`: a 304's refreshed fields over a stored body (in `body` or `file`)."""
        if obj.file is None:
            self.memory.put(obj)
        writer = self.spool(obj, obj.body_length)
        if writer is None:
            return
        try:
            if obj.file is None:
                writer.append(obj.body)
            else:
                src = obj.file
                for offset in range(0, src.body_length, COPY_CHUNK):
                    count = min(COPY_CHUNK, src.body_length - offset)
                    writer.append(os.pread(src.fd, count, src.body_offset + offset))
        except OSError:
            writer.abort()
            return
        self.commit(writer, obj)

    def _write_stub(self, obj: CachedObject) -> None:
        """The key's Vary stub: which request fields select the variant file."""
        assert self.disk is not None
        meta = object_meta(obj)
        meta.vary_values = ()
        meta.extra = {VARY_STUB: "1"}
        try:
            writer = self.disk.begin(disk_id(obj.key), meta, 0)
        except DiskError:
            return
        if writer is not None:
            entry = writer.commit()
            if entry is not None:
                entry.close()

    # across worker processes ---------------------------------------------------------
    def claim(self, key: str) -> Claim | None:
        """The host-wide right to fetch `key` (see DiskStore.claim); None without a disk tier
        or while another process holds it; DiskError when the disk fails."""
        return self.disk.claim(disk_id(key)) if self.disk is not None else None

    def claimed_elsewhere(self, key: str) -> bool:
        return self.disk is not None and self.disk.claimed(disk_id(key))

    def follow(self, key: str, request: policy.Headers) -> DiskFollower | None:
        """Another process's object for this request while it is being written: the key's,
        or the variant its Vary stub selects for `request`."""
        if self.disk is None:
            return None
        follower = self.disk.follow(disk_id(key))
        if follower is not None:
            return follower
        entry = self.disk.lookup(disk_id(key))
        if entry is None:
            return None
        try:
            if not entry.meta.extra.get(VARY_STUB):
                return None
            values = policy.vary_values(tuple(entry.meta.vary_names), request)
        finally:
            entry.close()
        return self.disk.follow(disk_id(key, values))

    # remove --------------------------------------------------------------------------
    def forget(self, keys: set[str], *, disk: bool) -> None:
        """Every variant and slice of `keys`: from this process's memory, and from the disk
        when `disk`; one scan of memory for the slices however many keys."""
        for key in keys:
            self.memory.remove(key)
            if disk and self.disk is not None:
                self.disk.remove_key(key)
        self.memory.remove_where(
            lambda obj: SLICE_MARK in obj.key and obj.key.partition(SLICE_MARK)[0] in keys
        )

    def remove(self, key: str) -> None:
        """Every variant and slice of `key`, in both tiers (this process's memory only)."""
        self.memory.remove(key)
        if SLICE_MARK in key:  # one slice
            if self.disk is not None:
                self.disk.remove(disk_id(key))
            return
        self.memory.remove_prefixed(key + SLICE_MARK)
        if self.disk is not None:
            self.disk.remove_key(key)
