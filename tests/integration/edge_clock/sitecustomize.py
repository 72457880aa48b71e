"""A movable wall clock for the edge processes a test starts (not a test module).

With this directory on PYTHONPATH, every Python process started with CDN_TEST_CLOCK_FILE in its
environment (`cdn edge` and the workers it starts, which inherit both) reads the wall clock as
the real one plus the offset in seconds written in that file, read at each call: the test moves
the edge's clock as libfaketime would, without touching the edge's code. Only `time.time` and
`time.time_ns` move (what the edge meters and stamps with); monotonic clocks, and so timeouts
and timers, do not. The test writes the file atomically (temp file, rename).
"""

from __future__ import annotations

import os
import time

_FILE = os.environ.get("CDN_TEST_CLOCK_FILE")

if _FILE:
    _real_time = time.time
    _real_time_ns = time.time_ns
    _last = [0.0]  # the last offset read: a missing or unreadable file keeps it

    def _offset() -> float:
        try:
            with open(_FILE) as file:
                _last[0] = float(file.read())
        except (OSError, ValueError):
            pass
        return _last[0]

    def _moved_time() -> float:
        return _real_time() + _offset()

    def _moved_time_ns() -> int:
        return _real_time_ns() + round(_offset() * 1e9)

    time.time = _moved_time
    time.time_ns = _moved_time_ns
