"""The billing clock and the periodic job that settles what is due.

Billing reads time only through `Clock`, so tests run a month in milliseconds by setting and
advancing it; the scheduler wakes every `settle_every` seconds of real time and runs the job at
the clock's instant. It is a background task owned by the app's lifecycle (started on startup,
cancelled and awaited on cleanup).
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
    (control.billing takes a PostgreSQL advisory lock, SQLite serialises writers).
    """

    def __init__(self, job: Job, clock: Clock, every: float) -> None:
        self.job = job
        self.clock = clock
        self.every = every
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def tick(self) -> None:
        async with self._lock:
            await self.job(self.clock.now())

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="billing-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_at_safe_point(self._task, self._stopping, STOP_GRACE)
            self._task = None

    async def _loop(self) -> None:
        while not await sleep_unless_stopping(self._stopping, self.every):
            try:
                await self.tick()
            except Exception:  # the next run retries; settlement is idempotent
                log.exception("billing run failed")


CLOCK = web.AppKey("clock", Clock)
SCHEDULER = web.AppKey("scheduler", Scheduler)
