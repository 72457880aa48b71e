"""The edge's counters and their Prometheus view (admin listener `/metrics`).

Counting is plain integer arithmetic on the request path: prometheus-client's Counter takes a
lock per increment, and the hit path should not. At scrape time the counters become a
`Snapshot`, a JSON-able dict, and the snapshot becomes metric families. A single in-process
worker renders its own snapshot (`StatsCollector`); under the supervisor every worker sends its
snapshot over its control socket and the supervisor renders the sum (`merge_snapshots`), so one
`/metrics` covers all workers without prometheus-client's multiprocess mode (LIBRARIES.md).

Adding a counter: an attribute on `EdgeStats` (an int, or a `Counter` for one bounded label) and
a row in `COUNTERS`. Adding a gauge: a key in `worker_snapshot` and a row in `GAUGES`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, TypedDict

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.tiers import Tiers

# Cache-Status outcomes used as the `cache` label; bounded, never per-domain.
OUTCOMES = (
    "hit", "stale", "revalidated", "uri-miss", "vary-miss", "miss", "request", "bypass",
    "method", "refused", "error",
)

_STATUS_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx", "other", "other", "other", "other")

# A counter is a number, or numbers by one label's values.
CounterValue = int | dict[str, int]


class Snapshot(TypedDict):
    """One worker's metrics (or a sum of several): what crosses the supervisor's socket."""

    counters: dict[str, CounterValue]
    gauges: dict[str, int]


class EdgeStats:
    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.status_classes: Counter[str] = Counter()
        self.bytes_sent = 0
        self.body_bytes_sent = 0
        self.origin_fetches = 0
        self.origin_errors: Counter[str] = Counter()
        self.origin_bytes = 0
        self.coalesced_waits = 0
        self.stored_objects = 0
        self.not_stored: Counter[str] = Counter()
        # Access log (edge.logwriter): lines written, lines lost (disk failing), and what is
        # failing now ("" while writing works: a str, so not a counter).
        self.log_lines_written = 0
        self.log_lines_lost = 0
        self.log_failure = ""

    def account(self, outcome: str, status: int, bytes_sent: int, body_bytes: int) -> None:
        self.requests[outcome] += 1
        self.status_classes[_STATUS_CLASSES[status // 100]] += 1
        self.bytes_sent += bytes_sent
        self.body_bytes_sent += body_bytes

    def snapshot(self) -> dict[str, CounterValue]:
        """Every counter by attribute name, copied, so that a new counter needs no code here."""
        out: dict[str, CounterValue] = {}
        for name, value in vars(self).items():
            if isinstance(value, Counter):
                out[name] = dict(value)
            elif isinstance(value, int):
                out[name] = value
        return out


def worker_snapshot(stats: EdgeStats, tiers: Tiers) -> Snapshot:
    memory, disk = tiers.memory, tiers.disk
    counters = stats.snapshot()
    counters["memory_tier_evictions"] = memory.evictions
    gauges = {
        "memory_tier_bytes": memory.bytes_used,
        "memory_tier_budget_bytes": memory.budget,
        "memory_tier_objects": len(memory),
        "log_writers_failing": int(bool(stats.log_failure)),
    }
    if disk is not None:
        counters["disk_tier_evictions"] = disk.evictions
        counters["disk_tier_write_errors"] = disk.write_errors
        counters["disk_tier_corrupt_removed"] = disk.corrupt_removed
        gauges["disk_tier_bytes"] = disk.bytes_used
        gauges["disk_tier_budget_bytes"] = disk.budget
    return {"counters": counters, "gauges": gauges}


def empty_snapshot() -> Snapshot:
    return {"counters": {}, "gauges": {}}


def merge_snapshots(snapshots: Iterable[Snapshot], *, counters_only: bool = False) -> Snapshot:
    """The sum of `snapshots`: counters add up, and gauges too (by `GAUGES`' merge rule).

    `counters_only` is for workers that have exited: what they counted stays in the totals (so
    that counters never go backwards across restarts and reloads), what they held does not.
    """
    out = empty_snapshot()
    counters = out["counters"]
    gauges = out["gauges"]
    for snap in snapshots:
        for name, value in snap["counters"].items():
            if isinstance(value, dict):
                into = counters.setdefault(name, {})
                if isinstance(into, dict):
                    for label, n in value.items():
                        into[label] = into.get(label, 0) + n
            else:
                total = counters.get(name, 0)
                if isinstance(total, int):
                    counters[name] = total + value
        if counters_only:
            continue
        for name, n in snap["gauges"].items():
            merge = _GAUGE_MERGE.get(name, "sum")
            if merge == "max":
                gauges[name] = max(gauges.get(name, n), n)
            elif merge == "min":
                gauges[name] = min(gauges.get(name, n), n)
            else:
                gauges[name] = gauges.get(name, 0) + n
    return out


def request_count(snapshot: Snapshot) -> int:
    requests = snapshot["counters"].get("requests", {})
    return sum(requests.values()) if isinstance(requests, dict) else requests


@dataclass(frozen=True, slots=True)
class _Family:
    key: str  # in the snapshot
    name: str  # Prometheus name, without the _total that prometheus-client adds to counters
    help: str
    label: str | None = None
    # Gauges only: "sum" for what each worker holds for itself, "max" for a value every worker
    # reports about something they share (a disk tier's size, say), which must not be summed.
    merge: Literal["sum", "max"] = "sum"


COUNTERS = (
    _Family("requests", "cdn_edge_requests", "Requests answered, by cache outcome", "cache"),
    _Family("status_classes", "cdn_edge_responses", "Responses by status class", "code"),
    _Family("bytes_sent", "cdn_edge_sent_bytes", "Bytes written to clients (heads and bodies)"),
    _Family("body_bytes_sent", "cdn_edge_sent_body_bytes", "Body bytes written to clients"),
    _Family("origin_fetches", "cdn_edge_origin_fetches", "Requests sent to origins"),
    _Family("origin_errors", "cdn_edge_origin_errors", "Origin failures by kind", "kind"),
    _Family("origin_bytes", "cdn_edge_origin_body_bytes", "Body bytes read from origins"),
    _Family(
        "coalesced_waits",
        "cdn_edge_coalesced_waits",
        "Requests that joined another request's origin fetch",
    ),
    _Family("stored_objects", "cdn_edge_stored_objects", "Responses stored in the cache"),
    _Family(
        "not_stored",
        "cdn_edge_not_stored",
        "Cacheable-method responses not stored, by reason",
        "reason",
    ),
    _Family(
        "memory_tier_evictions",
        "cdn_edge_memory_tier_evictions",
        "Objects evicted from the memory tier",
    ),
    _Family("disk_tier_evictions", "cdn_edge_disk_tier_evictions", "Files evicted from disk"),
    _Family(
        "disk_tier_write_errors",
        "cdn_edge_disk_tier_write_errors",
        "Disk writes that failed (full or failing disk); those responses passed through",
    ),
    _Family(
        "disk_tier_corrupt_removed",
        "cdn_edge_disk_tier_corrupt_removed",
        "Truncated or corrupt cache files found and removed (never served)",
    ),
    _Family("log_lines_written", "cdn_edge_log_lines_written", "Access-log lines written"),
    _Family(
        "log_lines_lost",
        "cdn_edge_log_lines_lost",
        "Access-log lines lost because the log disk failed (logs.on_log_failure)",
    ),
)

GAUGES = (
    _Family(
        "memory_tier_bytes",
        "cdn_edge_memory_tier_bytes",
        "Bytes held by the memory tier (each worker has its own: the sum over workers)",
    ),
    _Family(
        "memory_tier_budget_bytes",
        "cdn_edge_memory_tier_budget_bytes",
        "Byte budget of the memory tier (each worker has its own: the sum over workers)",
    ),
    _Family(
        "memory_tier_objects",
        "cdn_edge_memory_tier_objects",
        "Objects in the memory tier (each worker has its own: the sum over workers)",
    ),
    _Family(
        "disk_tier_bytes",
        "cdn_edge_disk_tier_bytes",
        "Bytes of cached files on the host's disk tier (shared by the workers)",
        merge="max",
    ),
    _Family(
        "disk_tier_budget_bytes",
        "cdn_edge_disk_tier_budget_bytes",
        "Byte budget of the host's disk tier (shared by the workers)",
        merge="max",
    ),
    _Family(
        "log_writers_failing",
        "cdn_edge_log_writers_failing",
        "Workers that cannot write their access log now (full or failing disk)",
    ),
)

# config_version, the control plane's version a worker enforces, is rendered by the
# supervisor (cdn_edge_config_version): summed it would mean nothing, its least is the version
# every worker enforces.
_GAUGE_MERGE: dict[str, Literal["sum", "max", "min"]] = {
    family.key: family.merge for family in GAUGES
} | {"config_version": "min"}


def families(snapshot: Snapshot) -> Iterator[Metric]:
    """The metric families of a snapshot; every family appears, even while still zero."""
    counters = snapshot["counters"]
    for family in COUNTERS:
        value = counters.get(family.key, {} if family.label else 0)
        if family.label is None:
            yield CounterMetricFamily(
                family.name, family.help, value=value if isinstance(value, int) else 0
            )
            continue
        metric = CounterMetricFamily(family.name, family.help, labels=[family.label])
        if isinstance(value, dict):
            for label, n in sorted(value.items()):
                metric.add_metric([label], n)
        yield metric
    gauges = snapshot["gauges"]
    for family in GAUGES:
        yield GaugeMetricFamily(family.name, family.help, value=gauges.get(family.key, 0))


class StatsCollector(Collector):
    """One process's own counters: the admin listener of an in-process `EdgeWorker`."""

    def __init__(self, stats: EdgeStats, tiers: Tiers) -> None:
        self._stats = stats
        self._tiers = tiers

    def collect(self) -> Iterator[Metric]:
        yield from families(worker_snapshot(self._stats, self._tiers))
