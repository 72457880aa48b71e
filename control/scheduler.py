"""The control plane's clock and its periodic jobs: billing settles what is due, the log
retention job deletes expired access logs (control.logs).

Billing and logs read time only through `Clock`, so tests run a month in milliseconds by setting
and advancing it; a scheduler wakes every `settle_every` (`log_retention_every`) seconds of real
time and runs its job at the clock's instant. Each is a background task owned by the app's
lifecycle (started on startup, stopped at a safe point on cleanup).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from aiohttp import web

from control.background import sleep_unless_stopping, stop_at_safe_point

log = logging.getLogger("control.scheduler")


class Clock:
    """Now, for billing: the system clock until `set`, then the instant set (and advanced)."""

    def __init__(self) -> None:
        self._fixed: datetime | None = None

    def now(self) -> datetime:
        return datetime.now(UTC) if self._fixed is None else self._fixed

    def set(self, instant: datetime) -> None:
        if instant.tzinfo is None or instant.utcoffset() is None:
            raise ValueError("the billing clock is set to aware instants only")
        self._fixed = instant.astimezone(UTC)

    def advance(self, delta: timedelta) -> None:
        self.set(self.now() + delta)


# How long a stopping scheduler lets a settlement run finish before cancelling it.
STOP_GRACE = 30.0

Job = Callable[[datetime], Awaitable[object]]


class Scheduler:
    """Runs `job(clock.now())` every `every` seconds (the first time `every` after `start`);
    `tick` runs it now.

    Runs never overlap in this process (a lock); across replicas the job itself takes care
    (control.billing takes a PostgreSQL advisory lock, SQLite serialises writers; the log
    retention job's deletions are idempotent).
    """

    def __init__(self, job: Job, clock: Clock, every: float, name: str = "billing") -> None:
        self.job = job
        self.clock = clock
        self.every = every
        self.name = name
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def tick(self) -> None:
        async with self._lock:
            await self.job(self.clock.now())

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"{self.name}-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_at_safe_point(self._task, self._stopping, STOP_GRACE)
            self._task = None

    @property
    def stopping(self) -> asyncio.Event:
        """Set when the scheduler is asked to stop: a long job checks it between its steps."""
        return self._stopping

    async def _loop(self) -> None:
        while not await sleep_unless_stopping(self._stopping, self.every):
            try:
                await self.tick()
            except Exception:  # the next run retries; the jobs are idempotent
                log.exception("%s run failed", self.name)


CLOCK = web.AppKey("clock", Clock)
SCHEDULER = web.AppKey("scheduler", Scheduler)
