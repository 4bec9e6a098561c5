"""Prometheus metrics with the SGLang Router's names (``sglang_router_*``).

Per-request counters and the latency histogram are updated on the request path (label children
are cached so an update is one dict lookup and an add). Everything that is *state* rather than
an event -- each worker's pending requests, health, breaker state, the cache-aware policy's
hit and miss counts, the admission queue -- is read from the live objects at scrape time by a
custom collector, so the request path does no gauge bookkeeping at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sglctl.router.workers import WorkerRegistry

# The ``*_created`` series double the scrape size and nobody graphs them.
disable_created_metrics()

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_BREAKER_CODES = {"closed": 0, "open": 1, "half_open": 2}


class _StateCollector(Collector):
    """Scrape-time view of the registry, the policy and the admission controller."""

    def __init__(self, registry: WorkerRegistry, extra: Callable[[], dict[str, float]]) -> None:
        self._registry = registry
        self._extra = extra

    def collect(self) -> Iterator[Metric]:
        workers = self._registry.all()
        pending = GaugeMetricFamily(
            "sglang_router_worker_pending_requests",
            "Requests in flight to each worker",
            labels=["worker"],
        )
        healthy = GaugeMetricFamily(
            "sglang_router_worker_healthy", "1 when the worker may take requests", labels=["worker"]
        )
        breaker = GaugeMetricFamily(
            "sglang_router_circuit_breaker_state",
            "Circuit breaker state per worker (0 closed, 1 open, 2 half-open)",
            labels=["worker"],
        )
        served = CounterMetricFamily(
            "sglang_router_worker_requests", "Requests dispatched to each worker", labels=["worker"]
        )
        errors = CounterMetricFamily(
            "sglang_router_worker_errors", "Failed attempts at each worker", labels=["worker"]
        )
        for w in workers:
            pending.add_metric([w.url], w.in_flight)
            healthy.add_metric([w.url], 1.0 if w.is_routable() else 0.0)
            breaker.add_metric([w.url], _BREAKER_CODES.get(w.breaker_state, -1))
            served.add_metric([w.url], w.requests_total)
            errors.add_metric([w.url], w.errors_total)
        yield from (pending, healthy, breaker, served, errors)
        yield GaugeMetricFamily(
            "sglang_router_active_workers", "Registered workers", value=len(workers)
        )
        extra = self._extra()
        yield CounterMetricFamily(
            "sglang_router_cache_hits",
            "Requests routed by a cache (prefix) match",
            value=extra.get("cache_hits", 0),
        )
        yield CounterMetricFamily(
            "sglang_router_cache_misses",
            "Requests routed without a cache match (new prefix or load fallback)",
            value=extra.get("cache_misses", 0),
        )
        yield GaugeMetricFamily(
            "sglang_router_tree_size_chars",
            "Characters held by the cache-aware tree",
            value=extra.get("tree_size", 0),
        )
        yield GaugeMetricFamily(
            "sglang_router_queued_requests",
            "Requests waiting for admission",
            value=extra.get("queued", 0),
        )
        yield CounterMetricFamily(
            "sglang_router_rejected_requests",
            "Requests refused by admission control (429)",
            value=extra.get("rejected", 0),
        )


class RouterMetrics:
    """The router's Prometheus registry and the per-request instruments."""

    def __init__(
        self,
        registry: WorkerRegistry,
        extra: Callable[[], dict[str, float]] = dict,
        buckets: Sequence[float] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._requests = Counter(
            "sglang_router_requests_total",
            "Requests answered by the router, by route and HTTP status",
            ["route", "status"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "sglang_router_request_duration_seconds",
            "Time from receiving a request to its last byte, by route",
            ["route"],
            buckets=tuple(buckets) if buckets else DEFAULT_BUCKETS,
            registry=self.registry,
        )
        self._retries = Counter(
            "sglang_router_retries_total",
            "Attempts retried on a worker after a failure",
            registry=self.registry,
        )
        self._request_children: dict[tuple[str, int], object] = {}
        self._duration_children: dict[str, object] = {}
        self.registry.register(_StateCollector(registry, extra))

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one finished request."""
        key = (route, status)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self._requests.labels(route, str(status))
        counter.inc()  # type: ignore[attr-defined]
        hist = self._duration_children.get(route)
        if hist is None:
            hist = self._duration_children[route] = self._duration.labels(route)
        hist.observe(seconds)  # type: ignore[attr-defined]

    def retry(self) -> None:
        self._retries.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
