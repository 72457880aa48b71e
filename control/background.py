"""Stopping the control plane's background loops at a safe point.

Cancelling a task in the middle of an aiosqlite statement invalidates its connection, and the
engine's disposal then hung for a minute (seen in the test suite). So a loop is asked to stop
first and given time to finish its current step; it is cancelled only if it does not.
"""

from __future__ import annotations

import asyncio
import contextlib


async def stop_at_safe_point(
    task: asyncio.Task[None], stopping: asyncio.Event, grace: float
) -> None:
    """Set `stopping` (the loop checks it between steps), wait up to `grace` seconds, then
    cancel; either way the task has ended when this returns."""
    stopping.set()
    await asyncio.wait({task}, timeout=grace)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def sleep_unless_stopping(stopping: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True if `stopping` was set meanwhile (or already)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
    return stopping.is_set()
