"""Retrying rounds of work with a jittered, doubling backoff: what the usage shipper
(edge.spool) and the access-log shipper (edge.logship) share."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable

import aiohttp


async def retry_rounds(
    attempt: Callable[[], Awaitable[bool]],
    wake: asyncio.Event,
    *,
    first: float,
    maximum: float,
    idle: float | None = None,
) -> None:
    """Run `attempt` rounds until cancelled. After a round that did everything (True), wait
    for `wake` (or `idle` s, when given); after one that failed (False), a jittered backoff
    that doubles from `first` up to `maximum` on each failed round in a row (`wake` cuts it
    short)."""
    delay = first
    while True:
        wake.clear()
        if await attempt():
            delay = first
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(idle):
                    await wake.wait()
            continue
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(random.uniform(delay / 2, delay)):
                await wake.wait()
        delay = min(delay * 2, maximum)


async def stop_shipping(
    task: asyncio.Task[None] | None, session: aiohttp.ClientSession | None
) -> None:
    """End a shipper's rounds: cancel and await its task, then close its HTTP session."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if session is not None:
        await session.close()
