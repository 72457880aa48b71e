"""Micro-benchmark of edge.meter.Meter.record, the per-request cost of metering (issue 5).

Run: .venv/bin/python benchmarks/meter_record.py. Prints ns per call next to an empty method
call and EdgeStats.account, the per-request counting the hit path already does.
"""

from __future__ import annotations

import time
import timeit

from edge.meter import HIT, Meter
from edge.metrics import EdgeStats

N = 1_000_000


class _Empty:
    def call(self, *args: object) -> None:
        pass


def main() -> None:
    meter, stats, empty = Meter(), EdgeStats(), _Empty()
    now = time.time()
    cases = {
        "empty method call": lambda: empty.call("www.example.com", now, HIT, 200, 1234, 1000),
        "EdgeStats.account": lambda: stats.account("hit", 200, 1234, 1000),
        "Meter.record": lambda: meter.record("www.example.com", now, HIT, 200, 1234, 1000),
        "time.time() + Meter.record": lambda: meter.record(
            "www.example.com", time.time(), HIT, 200, 1234, 1000
        ),
    }
    for name, case in cases.items():
        best = min(timeit.repeat(case, number=N, repeat=5))
        print(f"{name:28} {best / N * 1e9:6.0f} ns")


if __name__ == "__main__":
    main()
