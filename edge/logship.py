"""The supervisor's access-log shipper and janitor (issue 6; contract in control/README.md).

Every SCAN_INTERVAL s it looks for closed hour files, `state_dir/logs/<domain>/<hour>.<tag>
.jsonl.gz` (edge.logwriter closes them within a second of the hour's end), and, with
`[control]`, PUTs each, oldest hour first, to

    {control.url}/v1/edge/logs/{domain}/{hour}/w{tag}

with the edge's bearer token, `Content-Type: application/gzip`, `Content-Length` and
`Content-Digest: sha-256=:<base64>:` (RFC 9530), the body streamed from the file. Answers:

- 201 (stored) or 200 (stored before with the same digest): the file moves to
  `<domain>/shipped/`, where it is deleted `[logs] keep_days` after its hour ended;
- 409 (stored before with another digest) or 413 (too large): the file is kept, renamed
  `<name>.refused-<status>` (never sent again: a person must look), logged and counted;
- anything else (400: damaged on the way, 401, 5xx) or no answer: the round stops and is tried
  again after a backoff of 1 s doubling to 60 s (edge.backoff). A control plane that is down
  delays shipping and loses nothing.

Without `[control]` nothing is shipped, and closed files are deleted `[logs] retention_days`
after their hour ended. With it, an unshipped file is never deleted.

An hour file still open 5 minutes after its hour ended belongs to no running worker (a reload
to fewer workers, a slot that keeps crashing): the shipper closes it
(`edge.logwriter.close_orphans`), so no hour stays unshipped.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from edge.backoff import retry_rounds, stop_shipping
from edge.config import ControlSettings, LogSettings
from edge.logwriter import CLOSED_NAME, CLOSED_SUFFIX, SHIPPED, close_orphans

log = logging.getLogger("edge.logship")

LOGS_PATH = "/v1/edge/logs"
SCAN_INTERVAL = 2.0  # a closed hour is on its way within this (plus the worker's second)
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
DAY = 86400
_FINAL = frozenset({409, 413})  # refused for good: kept aside, not retried


def hour_end(hour: str) -> float:
    """The end of a "YYYY-MM-DDTHH" hour, in seconds since the epoch."""
    return datetime.strptime(hour, "%Y-%m-%dT%H").replace(tzinfo=UTC).timestamp() + 3600


def closed_files(root: Path) -> list[tuple[str, Path]]:
    """(hour, path) of every closed, unshipped file under `root`, oldest hour first."""
    found: list[tuple[str, Path]] = []
    if not root.is_dir():
        return found
    for directory in root.iterdir():
        if not directory.is_dir():
            continue
        for path in directory.glob(f"*{CLOSED_SUFFIX}"):
            match = CLOSED_NAME.fullmatch(path.name)
            if match is not None:
                found.append((match[1], path))
    found.sort()
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode("ascii")


class LogShipper:
    """Owns its task and HTTP session between `start` and `stop` (module docstring)."""

    def __init__(
        self,
        root: Path,
        logs: LogSettings,
        control: ControlSettings | None,
        *,
        interval: float = SCAN_INTERVAL,
        backoff_first: float = BACKOFF_FIRST,
        backoff_max: float = BACKOFF_MAX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.logs = logs
        self.control = control
        self.interval = interval
        self._backoff_first = backoff_first
        self._backoff_max = backoff_max
        self.clock = clock
        self.shipped = 0  # files the control plane acknowledged
        self.failures = 0  # PUTs not acknowledged (no answer, or not 200/201)
        self.deleted = 0  # files deleted by age (keep_days, or retention_days)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._failing = False  # for logging each outage once

    def start(self) -> None:
        if self.control is not None:
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"Authorization": f"Bearer {self.control.token}"},
                # No total: an hour of a busy domain may take a while to upload.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60),
            )
        self._task = asyncio.create_task(
            retry_rounds(
                self._attempt,
                self._wake,
                first=self._backoff_first,
                maximum=self._backoff_max,
                idle=self.interval,
            ),
            name="log-shipper",
        )

    async def stop(self) -> None:
        await stop_shipping(self._task, self._session)
        self._task, self._session = None, None

    def pending_count(self) -> int:
        return len(closed_files(self.root))

    async def _attempt(self) -> bool:
        try:
            await asyncio.to_thread(self._housekeeping)
            return await self.ship()
        except OSError as exc:  # the disk holding the logs: tried again like a failed PUT
            log.error("access log shipping: %s", exc)
            return False

    async def ship(self) -> bool:
        """PUT every closed file, oldest first; whether none is left to retry."""
        if self._session is None:
            return True
        for hour, path in await asyncio.to_thread(closed_files, self.root):
            status = await self._put(path, hour)
            if status in (200, 201):
                shipped = path.parent / SHIPPED
                shipped.mkdir(exist_ok=True)
                os.replace(path, shipped / path.name)
                self.shipped += 1
                continue
            self.failures += 1
            if status in _FINAL:
                log.error(
                    "access log %s refused by the control plane: HTTP %d; kept as %s.refused-%d,"
                    " not sent again", path, status, path.name, status,
                )  # fmt: skip
                os.replace(path, path.with_name(f"{path.name}.refused-{status}"))
                continue
            return False
        return True

    async def _put(self, path: Path, hour: str) -> int | None:
        """The answer's status; None when there was none (logged once per outage)."""
        assert self._session is not None and self.control is not None
        match = CLOSED_NAME.fullmatch(path.name)
        assert match is not None
        url = f"{self.control.url}{LOGS_PATH}/{path.parent.name}/{hour}/w{match[2]}"
        try:
            digest = await asyncio.to_thread(_sha256, path)
            with open(path, "rb") as body:
                headers = {
                    "Content-Type": "application/gzip",
                    "Content-Digest": f"sha-256=:{digest}:",
                    "Content-Length": str(os.fstat(body.fileno()).st_size),
                }
                async with self._session.put(url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
        except FileNotFoundError:
            return None  # deleted meanwhile (a person tidying up): the next round sees
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._trouble(url, f"{type(exc).__name__}: {exc}")
            return None
        if status in (200, 201):
            if self._failing:
                log.info("access log shipping to %s works again", self.control.url)
                self._failing = False
        elif status not in _FINAL:
            self._trouble(url, f"HTTP {status}")
        return status

    def _trouble(self, url: str, problem: str) -> None:
        if not self._failing:
            log.warning("access log shipping failing (%s: %s); retrying", url, problem)
            self._failing = True

    def _housekeeping(self) -> None:
        """Open files no worker will close (`close_orphans`); deletion of shipped files past
        keep_days, and without a control plane, of closed ones past retention_days."""
        if not self.root.is_dir():
            return
        now = self.clock()
        close_orphans(self.root, now)
        keep = self.logs.keep_days * DAY
        for directory in self.root.iterdir():
            if not directory.is_dir():
                continue
            places = [(directory / SHIPPED, keep)]
            if self.control is None:
                places.append((directory, self.logs.retention_days * DAY))
            for place, age in places:
                for path in place.glob(f"*{CLOSED_SUFFIX}"):
                    match = CLOSED_NAME.fullmatch(path.name)
                    if match is not None and hour_end(match[1]) + age <= now:
                        path.unlink(missing_ok=True)
                        self.deleted += 1


def log_families(shipper: LogShipper) -> Iterator[Metric]:
    """The shipper's metrics (README.md "Access logs")."""
    yield GaugeMetricFamily(
        "cdn_edge_log_files_pending",
        "Closed access-log hour files not shipped yet (kept until retention_days without a "
        "control plane)",
        value=shipper.pending_count(),
    )
    yield CounterMetricFamily(
        "cdn_edge_log_files_shipped",
        "Access-log files the control plane acknowledged",
        value=shipper.shipped,
    )
    yield CounterMetricFamily(
        "cdn_edge_log_ship_failures",
        "Access-log uploads that failed (retried with backoff, except 409 and 413: set aside)",
        value=shipper.failures,
    )
    yield CounterMetricFamily(
        "cdn_edge_log_files_deleted",
        "Access-log files deleted by age (keep_days after shipping, or retention_days)",
        value=shipper.deleted,
    )
