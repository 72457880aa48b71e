"""Writing a file so that a crash at any moment leaves the old one or the new one, never half.

Used for everything the edge must find intact after a crash: the control-plane state
(`edge.follow`), the lead worker's bans (`edge.purge`) and usage batches (`edge.spool`).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


def write_atomically(path: Path, data: bytes, *, temp: Path | None = None) -> None:
    """Replace `path` by `data`: a temp file in the same directory (`temp`, or a unique name),
    fsync, rename over, fsync the directory; durable once this returns. OSError on failure,
    with the temp file removed and `path` as it was. The file is its owner's only (mode 0600,
    whatever an older one had): the control state holds the domains' signing keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp or path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """fsync a directory, so that a rename or unlink in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
