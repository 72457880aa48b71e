"""The edge's counters and their Prometheus view (admin listener `/metrics`).

Counting is plain integer arithmetic on the request path: prometheus-client's Counter takes a
lock per increment, and the hit path should not. A custom collector turns the counters into
metric families at scrape time, which also lets a supervisor add up several workers later.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.store import MemoryTier

# Cache-Status outcomes used as the `cache` label; bounded, never per-domain.
OUTCOMES = (
    "hit", "stale", "revalidated", "uri-miss", "vary-miss", "miss", "request", "bypass",
    "method", "refused", "error",
)

_STATUS_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx", "other", "other", "other", "other")


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

    def account(self, outcome: str, status: int, bytes_sent: int, body_bytes: int) -> None:
        self.requests[outcome] += 1
        self.status_classes[_STATUS_CLASSES[status // 100]] += 1
        self.bytes_sent += bytes_sent
        self.body_bytes_sent += body_bytes


class StatsCollector(Collector):
    def __init__(self, stats: EdgeStats, memory: MemoryTier) -> None:
        self._stats = stats
        self._memory = memory

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        requests = CounterMetricFamily(
            "cdn_edge_requests", "Requests answered, by cache outcome", labels=["cache"]
        )
        for outcome, n in sorted(s.requests.items()):
            requests.add_metric([outcome], n)
        yield requests
        statuses = CounterMetricFamily(
            "cdn_edge_responses", "Responses by status class", labels=["code"]
        )
        for code, n in sorted(s.status_classes.items()):
            statuses.add_metric([code], n)
        yield statuses
        yield CounterMetricFamily(
            "cdn_edge_sent_bytes", "Bytes written to clients (heads and bodies)",
            value=s.bytes_sent,
        )
        yield CounterMetricFamily(
            "cdn_edge_sent_body_bytes", "Body bytes written to clients", value=s.body_bytes_sent
        )
        yield CounterMetricFamily(
            "cdn_edge_origin_fetches", "Requests sent to origins", value=s.origin_fetches
        )
        errors = CounterMetricFamily(
            "cdn_edge_origin_errors", "Origin failures by kind", labels=["kind"]
        )
        for kind, n in sorted(s.origin_errors.items()):
            errors.add_metric([kind], n)
        yield errors
        yield CounterMetricFamily(
            "cdn_edge_origin_body_bytes", "Body bytes read from origins", value=s.origin_bytes
        )
        yield CounterMetricFamily(
            "cdn_edge_coalesced_waits",
            "Requests that joined another request's origin fetch",
            value=s.coalesced_waits,
        )
        yield CounterMetricFamily(
            "cdn_edge_stored_objects", "Responses stored in the cache", value=s.stored_objects
        )
        not_stored = CounterMetricFamily(
            "cdn_edge_not_stored", "Cacheable-method responses not stored, by reason",
            labels=["reason"],
        )
        for reason, n in sorted(s.not_stored.items()):
            not_stored.add_metric([reason], n)
        yield not_stored
        m = self._memory
        yield GaugeMetricFamily(
            "cdn_edge_memory_tier_bytes", "Bytes held by the memory tier", value=m.bytes_used
        )
        yield GaugeMetricFamily(
            "cdn_edge_memory_tier_budget_bytes", "Byte budget of the memory tier", value=m.budget
        )
        yield GaugeMetricFamily(
            "cdn_edge_memory_tier_objects", "Objects in the memory tier", value=len(m)
        )
        yield CounterMetricFamily(
            "cdn_edge_memory_tier_evictions", "Objects evicted from the memory tier",
            value=m.evictions,
        )
