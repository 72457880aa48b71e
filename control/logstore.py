"""Where the control plane keeps the access-log pieces edges ship (issue 6): an interface, and a
local directory that implements it.

`LogStore` is what `control.logs` needs from any store, so an object store can implement it later:
`stage` receives a body as an async byte stream, hashing it on the way and never holding it whole
in memory, into a private place; `commit` makes a staged body the piece at a key (replacing what
is there: keys are deterministic, so a key written by a crash before its database row committed
is simply written again by the retry); `discard` drops a staged body that is not kept; `read`
streams a piece back; `delete` removes it (a missing one is not an error). The database says which
keys exist; the store only holds bytes.

`LocalLogStore`: pieces are files under a directory, `<domain>/<YYYY-MM-DDTHH>/<edge>-<piece>.gz`;
staged bodies are files in `<dir>/.staging/`, fsynced before `commit` renames them into place (and
fsyncs the directory), so a piece that was acknowledged survives a crash. File I/O and hashing run
in threads (hashlib releases the GIL for large buffers), not on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edge.files import sync_directory

CHUNK = 1 << 20  # bytes per read or write call
_STAGING = ".staging"
_STALE_STAGED = 86400.0  # seconds: a staged file this old was left by a crash


class LogStoreError(Exception):
    """The store cannot take or give bytes now (disk full, I/O error): the edge retries later."""


class TooLarge(LogStoreError):
    """The body is longer than the limit given to `stage`."""


@dataclass(frozen=True, slots=True)
class Staged:
    """A received body: the store's own name for it, its size and SHA-256."""

    handle: str
    size: int
    sha256: bytes


class LogStore(Protocol):
    async def stage(self, body: AsyncIterable[bytes], limit: int) -> Staged:
        """Receive `body` (TooLarge beyond `limit` bytes; LogStoreError when it cannot be
        written); nothing is left behind when this raises."""
        ...

    async def commit(self, staged: Staged, key: str) -> None:
        """Make `staged` the piece at `key`, durably (LogStoreError when it cannot)."""
        ...

    async def discard(self, staged: Staged) -> None:
        """Forget `staged` (after `commit` there is nothing left to forget)."""
        ...

    def read(self, key: str) -> AsyncIterator[bytes]:
        """The piece at `key`, in chunks (LogStoreError when it is missing or unreadable)."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the piece at `key`, if it is there (LogStoreError when it cannot)."""
        ...


class LocalLogStore:
    """`LogStore` on a local directory (created when first written)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._staging = root / _STAGING
        self._swept = False

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if any(part in ("", ".", "..", _STAGING) for part in parts) or "\0" in key:
            raise ValueError(f"not a log store key: {key!r}")
        return self.root.joinpath(*parts)

    async def stage(self, body: AsyncIterable[bytes], limit: int) -> Staged:
        path = await asyncio.to_thread(self._new_staged)
        fd = await asyncio.to_thread(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        digest = hashlib.sha256()
        size = 0
        try:
            try:
                buffer = bytearray()
                async for chunk in body:
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge(f"the piece is larger than {limit} bytes")
                    buffer += chunk
                    if len(buffer) >= CHUNK:
                        await asyncio.to_thread(_write, fd, bytes(buffer), digest)
                        buffer.clear()
                await asyncio.to_thread(_write, fd, bytes(buffer), digest)
                await asyncio.to_thread(os.fsync, fd)
            finally:
                os.close(fd)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise LogStoreError(f"cannot write the log store: {_reason(exc)}") from exc
            raise
        return Staged(path.name, size, digest.digest())

    def _new_staged(self) -> Path:
        try:
            self._staging.mkdir(parents=True, exist_ok=True)
            if not self._swept:  # once per process: staged files a crash left behind
                self._swept = True
                _sweep(self._staging, time.time() - _STALE_STAGED)
        except OSError as exc:
            raise LogStoreError(f"cannot write the log store: {_reason(exc)}") from exc
        return self._staging / f"{uuid.uuid4().hex}.part"

    async def commit(self, staged: Staged, key: str) -> None:
        source, target = self._staging / staged.handle, self._path(key)
        try:
            await asyncio.to_thread(_move, source, target)
        except OSError as exc:
            raise LogStoreError(f"cannot write the log store: {_reason(exc)}") from exc

    async def discard(self, staged: Staged) -> None:
        with contextlib.suppress(OSError):
            await asyncio.to_thread((self._staging / staged.handle).unlink, missing_ok=True)

    async def read(self, key: str) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            file = await asyncio.to_thread(path.open, "rb")
        except OSError as exc:
            raise LogStoreError(f"cannot read log piece {key}: {_reason(exc)}") from exc
        try:
            while chunk := await asyncio.to_thread(file.read, CHUNK):
                yield chunk
        except OSError as exc:
            raise LogStoreError(f"cannot read log piece {key}: {_reason(exc)}") from exc
        finally:
            file.close()

    async def delete(self, key: str) -> None:
        try:
            await asyncio.to_thread(_remove, self._path(key), self.root)
        except OSError as exc:
            raise LogStoreError(f"cannot delete log piece {key}: {_reason(exc)}") from exc


def _write(fd: int, data: bytes, digest: hashlib._Hash) -> None:
    digest.update(data)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _move(source: Path, target: Path) -> None:
    for attempt in (1, 2):
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, target)
            break
        except FileNotFoundError:
            if attempt == 2 or not source.exists():
                raise
            # a concurrent delete removed the emptied directory between mkdir and rename
    sync_directory(target.parent)


def _remove(path: Path, root: Path) -> None:
    """Unlink `path`, then its directories up to `root` while they are empty."""
    path.unlink(missing_ok=True)
    directory = path.parent
    while directory != root:
        try:
            directory.rmdir()
        except OSError:  # not empty (or already gone): leave it
            break
        directory = directory.parent


def _sweep(directory: Path, before: float) -> None:
    for entry in directory.iterdir():
        with contextlib.suppress(OSError):
            if entry.stat().st_mtime < before:
                entry.unlink()


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    return exc.strerror or str(exc)
