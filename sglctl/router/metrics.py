"""Prometheus metrics with the SGLang Router's names (``sglang_router_*``), cheap per request.

Why hand-written counters: the request path used prometheus_client's ``Counter`` and
``Histogram`` children, each of which takes a lock and goes through a few layers per update
(about 1.6 µs for one request's counter and histogram, see ``benchmarks/bench_metrics.py``).
The router runs on one asyncio loop, and scrapes are served on that same loop, so plain ints
and lists need no lock at all: a request adds to a dict and a list slot, and the collector
turns those into metric families at scrape time (prometheus_client still does the text
format). Everything that is *state* rather than an event -- each worker's pending requests,
health, breaker, tree size, the supervisor's restarts, the admission queue -- is read from the
live objects at scrape time, so the request path does no gauge bookkeeping.

One request's observations:

* :meth:`RouterMetrics.begin` when the handler starts (also makes it the task's *current*
  request, a context variable, so that the proxy can report the chosen worker and the
  attempts with :func:`note_attempt` and each streamed chunk with :func:`note_chunk`, without
  a parameter threaded through every layer);
* :meth:`RouterMetrics.finish` from the request's completion callback (exactly once: last
  byte, error or cancel). It counts ``requests_total{route,status,code}``, the duration,
  TTFT and TPOT histograms, and writes the access-log line when ``--access-log`` is on.

TTFT at the router: for a stream, the time until its first chunk went to the client; for a
whole (non-streamed) answer, the time until the answer -- the client sees its first token
then, so the whole answer *is* its TTFT. TPOT only for streams whose last chunk reports
``completion_tokens`` (``/generate``'s ``meta_info``, OpenAI's ``usage`` with
``stream_options.include_usage``): ``(last byte - first chunk) / (completion_tokens - 1)``.
A whole answer has no first-token time, so prefill and decode cannot be told apart there:
it is not counted rather than mixed in. TTFT and TPOT count successful requests only. In PD
mode every request is a PD one and goes through the same relay, so these histograms are the
PD TTFT and TPOT; ``sglang_router_pd_*`` adds the pair's own counters and the hand-over time.
"""

from __future__ import annotations

import contextvars
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sglctl.router.policies.base import RouteKey
from sglctl.router.workers import Worker, WorkerRegistry

if TYPE_CHECKING:
    from sglctl.router.admission import AdmissionController
    from sglctl.router.policies.base import Policy

log = logging.getLogger(__name__)
access_log = logging.getLogger("sglctl.access")
route_log = logging.getLogger("sglctl.router.routing")

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 1)
_BREAKER_CODES = {"closed": 0, "open": 1, "half_open": 2}
#: Supervisor worker states (``sglctl.state_table.WorkerState`` labels) exported as
#: ``sglang_router_worker_state{worker,state}`` (1 for the current state, 0 for the others).
WORKER_STATES = ("starting", "healthy", "unhealthy", "restarting", "failed", "removed")
#: Keys a ``discovery_stats()`` hook may return, and the metric each one becomes.
DISCOVERY_METRICS: dict[str, tuple[str, str, str]] = {
    "workers": ("sglang_router_discovery_workers", "gauge", "Workers the discovery source sees"),
    "added_total": (
        "sglang_router_discovery_added",
        "counter",
        "Workers added to the router by service discovery",
    ),
    "removed_total": (
        "sglang_router_discovery_removed",
        "counter",
        "Workers removed from the router by service discovery",
    ),
    "events_total": (
        "sglang_router_discovery_events",
        "counter",
        "Watch events received by service discovery (pods added, changed, deleted)",
    ),
    "errors_total": (
        "sglang_router_discovery_errors",
        "counter",
        "Failed discovery calls (API errors, watch restarts)",
    ),
    "last_sync_timestamp": (
        "sglang_router_discovery_last_sync_timestamp_seconds",
        "gauge",
        "Unix time of the last successful discovery sync",
    ),
}
#: Keys of the ``peer_stats()`` hook (``--router-peers``, peers.py) and their metrics.
PEER_METRICS: dict[str, tuple[str, str, str]] = {
    "sent": (
        "sglctl_peer_routes_sent",
        "counter",
        "Routing decisions sent to router peers (with catch-up rings)",
    ),
    "received": (
        "sglctl_peer_routes_received",
        "counter",
        "Routing decisions received from router peers and applied",
    ),
    "dropped": (
        "sglctl_peer_routes_dropped",
        "counter",
        "Routing decisions not sent: the peer unreachable or its queue full",
    ),
    "connected": ("sglctl_peers_connected", "gauge", "Router peers answering (self excluded)"),
}


def status_class(code: int) -> str:
    """The ``status`` label: ``success`` or the error class, so that the SGLang Router's
    ``rate(sglang_router_requests_total{status="success"}[5m]) / rate(...[5m])`` works
    as written; the HTTP code itself is in the ``code`` label."""
    if code < 400:
        return "success"
    if code == 429:
        return "rate_limited"
    if code == 499:
        return "client_closed"
    if code < 500:
        return "client_error"
    if code == 502:
        return "upstream_error"
    if code == 503:
        return "no_healthy_worker"
    if code == 504:
        return "timeout"
    return "server_error"


class _Histogram:
    """Per-bucket counts (not cumulative: one increment per observation), sum and bounds."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last slot is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "<= le": the first bound >= value.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((floatToGoString(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


class RequestObservation:
    """What the metrics learn about one request while it runs."""

    __slots__ = (
        "attempts",
        "cache_hit",
        "first_byte",
        "prev",
        "route",
        "started",
        "tail",
        "worker",
    )

    def __init__(self, route: str, started: float) -> None:
        self.route = route
        self.started = started
        #: perf_counter() at the first streamed chunk; 0.0 for whole answers.
        self.first_byte = 0.0
        self.worker = ""
        self.attempts = 0
        #: The routing decision of the attempt that served it: a prefix hit (True), a miss
        #: (False), or None when the policy does no cache-aware routing.
        self.cache_hit: bool | None = None
        #: The last two streamed chunks (the last may be only ``data: [DONE]``):
        #: completion_tokens is read from them.
        self.tail = b""
        self.prev = b""


_current: contextvars.ContextVar[RequestObservation | None] = contextvars.ContextVar(
    "sglctl_request_observation", default=None
)


def note_attempt(
    policy: Policy, candidates: Sequence[Worker], key: RouteKey, worker: Worker
) -> None:
    """The proxy sent an attempt to ``worker`` (chosen by ``policy`` among ``candidates``).

    Records the worker and the attempt count of the current request, and at debug level logs
    the routing decision: policy, chosen worker, the candidates' loads, and for the
    cache-aware policy whether this was a prefix hit, a miss or the imbalance fallback.
    """
    obs = _current.get()
    if obs is not None:
        obs.worker = worker.url
        obs.attempts += 1
        obs.cache_hit = _CACHE_OUTCOME.get(policy.last_decision)
    if route_log.isEnabledFor(logging.DEBUG):
        route_log.debug(
            "route: policy=%s chosen=%s decision=%s key_len=%d match_len=%d loads=%s",
            policy.name,
            worker.url,
            policy.last_decision,
            len(key.text or "") if key.text is not None else len(key.input_ids or ()),
            policy.last_match,
            {w.url: w.in_flight for w in candidates},
        )


#: ``Policy.last_decision`` -> counted as a cache hit / miss (others are not counted).
_CACHE_OUTCOME = {
    "cache_hit": True,
    "cache_miss": False,
    "balance_fallback": False,
    "no_text": False,
}


def note_chunk(chunk: bytes) -> None:
    """The proxy relayed one streamed chunk of the current request to the client."""
    obs = _current.get()
    if obs is None:
        return
    if not obs.first_byte:
        obs.first_byte = time.perf_counter()
    # Two stores, no test: half the cost of checking for "[DONE]" on every chunk.
    obs.prev = obs.tail
    obs.tail = chunk


_TOKENS_KEY = b'"completion_tokens":'


def completion_tokens(chunk: bytes) -> int | None:
    """The last ``"completion_tokens": N`` in ``chunk``, without parsing the JSON."""
    at = chunk.rfind(_TOKENS_KEY)
    if at < 0:
        return None
    start = at + len(_TOKENS_KEY)
    while start < len(chunk) and chunk[start] == 0x20:
        start += 1
    end = start
    while end < len(chunk) and 0x30 <= chunk[end] <= 0x39:
        end += 1
    return int(chunk[start:end]) if end > start else None


DiscoveryStats = Callable[[], Mapping[str, float]]
SlotReader = Callable[[], Iterable[Any]]


def _no_stats() -> Mapping[str, float]:
    return {}


class _StateCollector(Collector):
    """Scrape-time view of the request counters and of the live router objects."""

    def __init__(self, owner: RouterMetrics) -> None:
        self._m = owner

    def collect(self) -> Iterator[Metric]:
        m = self._m
        yield from self._requests(m)
        yield from self._workers(m.workers.all())
        yield from self._policies(m)
        yield from self._admission(m)
        yield from self._supervisor(m)
        yield from self._discovery(m)
        yield from self._peers(m)
        yield from self._pd(m)

    @staticmethod
    def _requests(m: RouterMetrics) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "sglang_router_requests",
            "Requests answered by the router; status is success or the error class, code the "
            "HTTP status",
            labels=["route", "status", "code"],
        )
        for (route, code), count in sorted(m.request_counts.items()):
            requests.add_metric([route, status_class(code), str(code)], count)
        yield requests
        for name, doc, hists in (
            (
                "sglang_router_request_duration_seconds",
                "Time from receiving a request to its last byte, by route",
                m.duration,
            ),
            (
                "sglang_router_time_to_first_token_seconds",
                "Time to the first streamed chunk (a whole answer: to the answer), successes",
                m.ttft,
            ),
            (
                "sglang_router_time_per_output_token_seconds",
                "Streamed requests: (last byte - first chunk) / (completion_tokens - 1)",
                m.tpot,
            ),
        ):
            family = HistogramMetricFamily(name, doc, labels=["route"])
            for route, hist in sorted(hists.items()):
                family.add_metric([route], hist.cumulative(), sum_value=hist.total)
            yield family
        yield CounterMetricFamily(
            "sglang_router_retries",
            "Attempts retried on a worker after a failure",
            value=m.retries,
        )

    @staticmethod
    def _workers(workers: list[Worker]) -> Iterator[Metric]:
        pending = GaugeMetricFamily(
            "sglang_router_worker_pending_requests",
            "Requests in flight to each worker",
            labels=["worker"],
        )
        healthy = GaugeMetricFamily(
            "sglang_router_worker_healthy",
            "1 when the worker may take requests (health checks, availability, breaker)",
            labels=["worker"],
        )
        breaker = GaugeMetricFamily(
            "sglang_router_circuit_breaker_state",
            "Circuit breaker state per worker (0 closed, 1 open, 2 half-open)",
            labels=["worker"],
        )
        served = CounterMetricFamily(
            "sglang_router_worker_requests", "Attempts dispatched to each worker", labels=["worker"]
        )
        errors = CounterMetricFamily(
            "sglang_router_worker_errors", "Failed attempts at each worker", labels=["worker"]
        )
        routable = 0
        for w in workers:
            ok = w.is_routable()
            routable += ok
            pending.add_metric([w.url], w.in_flight)
            healthy.add_metric([w.url], 1.0 if ok else 0.0)
            breaker.add_metric([w.url], _BREAKER_CODES.get(w.breaker_state, -1))
            served.add_metric([w.url], w.requests_total)
            errors.add_metric([w.url], w.errors_total)
        yield from (pending, healthy, breaker, served, errors)
        yield GaugeMetricFamily(
            "sglang_router_active_workers", "Registered workers", value=len(workers)
        )
        yield GaugeMetricFamily(
            "sglang_router_healthy_workers",
            "Workers that may take requests now (0 means every request gets a 503)",
            value=routable,
        )

    @staticmethod
    def _policies(m: RouterMetrics) -> Iterator[Metric]:
        # Hits and misses carry requests_total's labels, so that the seed's query
        # rate(cache_hits_total[5m]) / rate(requests_total[5m]) works as written (one hit
        # ratio per route and outcome); sum() both sides for one figure.
        labels = ["route", "status", "code"]
        hits = CounterMetricFamily(
            "sglang_router_cache_hits",
            "Requests routed to a worker because of a prefix (cache) match, by outcome",
            labels=labels,
        )
        misses = CounterMetricFamily(
            "sglang_router_cache_misses",
            "Requests routed without a cache match (new prefix or load-balance fallback)",
            labels=labels,
        )
        for (route, code, hit), count in sorted(m.cache_counts.items()):
            (hits if hit else misses).add_metric([route, status_class(code), str(code)], count)
        yield hits
        yield misses
        tree = GaugeMetricFamily(
            "sglang_router_tree_size_chars",
            "Characters each worker holds in the cache-aware policy's prefix tree",
            labels=["worker"],
        )
        for policy in m.policies():
            for name, size in policy.tree_sizes().items():
                tree.add_metric([name], size)
        yield tree

    @staticmethod
    def _admission(m: RouterMetrics) -> Iterator[Metric]:
        admission = m.admission
        queued = GaugeMetricFamily(
            "sglang_router_queued_requests", "Requests waiting for admission"
        )
        capacity = GaugeMetricFamily(
            "sglang_router_queue_capacity",
            "--queue-size when admission control is on (--max-concurrent-requests > 0), else 0",
        )
        running = GaugeMetricFamily(
            "sglang_router_admitted_requests",
            "Requests holding an admission slot now (0 when admission control is off)",
        )
        rejected = CounterMetricFamily(
            "sglang_router_rejected_requests",
            "Requests refused by admission control (429), by reason",
            labels=["reason"],
        )
        if admission is not None:
            stats = admission.stats()
            queued.add_metric([], stats.queued)
            capacity.add_metric([], admission.queue_size if admission.enabled else 0)
            running.add_metric([], stats.active)
            rejected.add_metric(["queue_full"], stats.rejected_full_total)
            rejected.add_metric(["queue_timeout"], stats.rejected_timeout_total)
        yield from (queued, capacity, running, rejected)
        wait = HistogramMetricFamily(
            "sglang_router_queue_wait_seconds",
            "Time admitted requests waited for an admission slot (0 when one was free)",
        )
        wait.add_metric([], m.queue_wait.cumulative(), sum_value=m.queue_wait.total)
        yield wait

    @staticmethod
    def _supervisor(m: RouterMetrics) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            "sglang_router_worker_restarts",
            "Restarts of each worker by the sglctl up supervisor",
            labels=["worker"],
        )
        state = GaugeMetricFamily(
            "sglang_router_worker_state",
            "The supervisor's state of each worker (1 for the current state)",
            labels=["worker", "state"],
        )
        try:
            slots = list(m.supervisor_slots())
        except Exception as exc:  # a vanished segment must not break the whole scrape
            log.warning("metrics: cannot read the supervisor's state table: %s", exc)
            slots = []
        for slot in slots:
            url = getattr(slot, "url", "")
            if not url:
                continue
            restarts.add_metric([url], slot.restarts)
            current = slot.state.label
            for name in WORKER_STATES:
                state.add_metric([url, name], 1.0 if name == current else 0.0)
        yield from (restarts, state)

    @staticmethod
    def _pd(m: RouterMetrics) -> Iterator[Metric]:
        """PD mode (``pd.py``): halves sent per worker, KV transfer failures, hand-over time."""
        for role, counts in (("prefill", m.pd_prefill_requests), ("decode", m.pd_decode_requests)):
            family = CounterMetricFamily(
                f"sglang_router_pd_{role}_requests",
                f"PD attempts sent to each {role} worker (retries included)",
                labels=["worker"],
            )
            for url, count in sorted(counts.items()):
                family.add_metric([url], count)
            yield family
        yield CounterMetricFamily(
            "sglang_router_pd_transfer_failures",
            "PD attempts whose decode worker answered 5xx after a good prefill (KV hand-over)",
            value=m.pd_transfer_failures,
        )
        prefill = HistogramMetricFamily(
            "sglang_router_pd_prefill_duration_seconds",
            "PD: from sending the pair to the prefill's answer (its KV handed over)",
        )
        prefill.add_metric([], m.pd_prefill.cumulative(), sum_value=m.pd_prefill.total)
        yield prefill

    @staticmethod
    def _peers(m: RouterMetrics) -> Iterator[Metric]:
        if m.peer_stats is None:
            return
        stats = m.peer_stats()
        for key, (name, kind, doc) in PEER_METRICS.items():
            family: Metric
            if kind == "counter":
                family = CounterMetricFamily(name, doc)
            else:
                family = GaugeMetricFamily(name, doc)
            family.add_metric([], float(stats.get(key, 0)))
            yield family

    @staticmethod
    def _discovery(m: RouterMetrics) -> Iterator[Metric]:
        try:
            stats = m.discovery_stats()
        except Exception as exc:
            log.warning("metrics: discovery_stats() failed: %s", exc)
            stats = {}
        for key, (name, kind, doc) in DISCOVERY_METRICS.items():
            value = stats.get(key)
            family: Metric
            if kind == "counter":
                family = CounterMetricFamily(name, doc)
            else:
                family = GaugeMetricFamily(name, doc)
            if value is not None:
                family.add_metric([], float(value))
            yield family


def state_table_reader(name: str | None) -> SlotReader:
    """Read the supervisor's worker slots of table ``name`` at scrape time (none: no table).

    The router's own :class:`~sglctl.router.state_table_source.StateTableSource` keeps its
    handle private; attaching for a scrape is a few system calls, a scrape comes every few
    seconds, and the metrics keep working while the source restarts.
    """

    def read() -> list[Any]:
        from sglctl.state_table import StateTable, StateTableError

        if not name:
            return []
        try:
            table = StateTable.attach(name)
        except StateTableError:
            return []
        try:
            return [view.worker for view in table.read_slots()]
        finally:
            table.close()

    return read


def _no_slots() -> Iterable[Any]:
    return ()


def _no_policies() -> Sequence[Policy]:
    return ()


class RouterMetrics:
    """The router's Prometheus registry and its per-request instruments.

    ``discovery_stats`` is the service-discovery hook: a function
    returning some of the keys of :data:`DISCOVERY_METRICS` (assign it after construction).
    """

    def __init__(
        self,
        registry: WorkerRegistry,
        buckets: Sequence[float] | None = None,
        *,
        policies: Callable[[], Sequence[Policy]] = _no_policies,
        admission: AdmissionController | None = None,
        supervisor_slots: SlotReader = _no_slots,
        access_log: bool = False,
    ) -> None:
        self.workers = registry
        self.policies = policies
        self.admission = admission
        self.supervisor_slots = supervisor_slots
        self.discovery_stats: DiscoveryStats = _no_stats
        #: --router-peers: the links' counts (peers.py); None: no peers, no metrics.
        self.peer_stats: DiscoveryStats | None = None
        self.access_log = access_log
        self.buckets = tuple(buckets) if buckets else DEFAULT_BUCKETS
        #: (route, HTTP code) -> requests; the status class is derived at scrape time.
        self.request_counts: dict[tuple[str, int], int] = {}
        #: (route, HTTP code, cache hit?) -> requests routed by a cache-aware decision.
        self.cache_counts: dict[tuple[str, int, bool], int] = {}
        self.duration: dict[str, _Histogram] = {}
        self.ttft: dict[str, _Histogram] = {}
        self.tpot: dict[str, _Histogram] = {}
        self.queue_wait = _Histogram(DEFAULT_BUCKETS)
        self.retries = 0
        #: PD mode: attempts per prefill / decode worker, transfer failures, hand-over time.
        self.pd_prefill_requests: dict[str, int] = {}
        self.pd_decode_requests: dict[str, int] = {}
        self.pd_transfer_failures = 0
        self.pd_prefill = _Histogram(TTFT_BUCKETS)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StateCollector(self))

    # -- the request path -----------------------------------------------------------------
    def begin(self, route: str, started: float | None = None) -> RequestObservation:
        """A request on ``route`` starts; it becomes the task's current request."""
        obs = RequestObservation(route, time.perf_counter() if started is None else started)
        _current.set(obs)
        return obs

    def finish(self, obs: RequestObservation, code: int, elapsed: float | None = None) -> None:
        """Count one finished request (call exactly once, from its completion callback)."""
        now = time.perf_counter()
        if elapsed is None:
            elapsed = now - obs.started
        route = obs.route
        key = (route, code)
        counts = self.request_counts
        counts[key] = counts.get(key, 0) + 1
        if obs.cache_hit is not None:
            cache_key = (route, code, obs.cache_hit)
            self.cache_counts[cache_key] = self.cache_counts.get(cache_key, 0) + 1
        hist = self.duration.get(route)
        if hist is None:
            hist = self.duration[route] = _Histogram(self.buckets)
        hist.observe(elapsed)
        ttft = elapsed
        if code < 400:
            if obs.first_byte:
                ttft = obs.first_byte - obs.started
                tokens = completion_tokens(obs.tail)
                if tokens is None:
                    tokens = completion_tokens(obs.prev)
                if tokens is not None and tokens > 1:
                    tpot = self.tpot.get(route)
                    if tpot is None:
                        tpot = self.tpot[route] = _Histogram(TPOT_BUCKETS)
                    tpot.observe((now - obs.first_byte) / (tokens - 1))
            first = self.ttft.get(route)
            if first is None:
                first = self.ttft[route] = _Histogram(TTFT_BUCKETS)
            first.observe(ttft)
        if self.access_log:
            _access(obs, code, elapsed, ttft if code < 400 else None)

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one finished request without a streaming view (older call sites, tests)."""
        self.finish(RequestObservation(route, time.perf_counter() - seconds), status, seconds)

    def observe_queue_wait(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def retry(self) -> None:
        self.retries += 1

    def pd_dispatched(self, prefill: str, decode: str) -> None:
        self.pd_prefill_requests[prefill] = self.pd_prefill_requests.get(prefill, 0) + 1
        self.pd_decode_requests[decode] = self.pd_decode_requests.get(decode, 0) + 1

    def pd_transfer_failed(self) -> None:
        self.pd_transfer_failures += 1

    def pd_prefill_done(self, seconds: float) -> None:
        self.pd_prefill.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _access(obs: RequestObservation, code: int, elapsed: float, ttft: float | None) -> None:
    """One access-log line; the fields also go to ``--log-json`` as keys of their own."""
    retries = max(obs.attempts - 1, 0)
    fields = {
        "method": "POST",
        "path": obs.route,
        "status": code,
        "worker": obs.worker or None,
        "duration_ms": round(elapsed * 1000, 3),
        "ttft_ms": round(ttft * 1000, 3) if ttft is not None else None,
        "retries": retries,
    }
    access_log.info(
        "POST %s %d worker=%s duration=%.1fms ttft=%s retries=%d",
        obs.route,
        code,
        obs.worker or "-",
        elapsed * 1000,
        f"{ttft * 1000:.1f}ms" if ttft is not None else "-",
        retries,
        extra=fields,
    )


#: Gauges that count something each router process holds on its own (``--router-processes``):
#: summed over processes. Every other gauge describes shared state (workers' health, breaker,
#: in flight from the shared counts), already whole in any one process: taken from it.
PER_PROCESS_GAUGES = frozenset(
    {
        "sglang_router_queued_requests",
        "sglang_router_queue_capacity",
        "sglang_router_admitted_requests",
    }
)
_SUMMED_TYPES = ("counter", "histogram", "summary")


def merge_scrapes(local: bytes, others: Sequence[bytes]) -> bytes:
    """One exposition for the whole router from each process's own (``/metrics`` with
    ``--router-processes N``): counters and histograms summed per label set, the gauges of
    :data:`PER_PROCESS_GAUGES` summed, other gauges as this process reports them."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], int]] = {}

    def add(family: Metric, first: bool) -> None:
        summed = family.type in _SUMMED_TYPES or family.name in PER_PROCESS_GAUGES
        mine = families.get(family.name)
        if mine is None:
            if not first and not summed:
                return
            families[family.name] = family
            values[family.name] = {
                (s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(family.samples)
            }
            return
        if not summed:
            return
        index = values[family.name]
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = (sample.name, tuple(sorted(sample.labels.items())))
            at = index.get(key)
            if at is None:
                index[key] = len(mine.samples)
                mine.samples.append(sample)
            else:
                old = mine.samples[at]
                mine.samples[at] = old._replace(value=old.value + sample.value)

    for family in text_string_to_metric_families(local.decode()):
        add(family, True)
    for text in others:
        for family in text_string_to_metric_families(text.decode()):
            add(family, False)

    class _Merged(Collector):
        def collect(self) -> Iterator[Metric]:
            yield from families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)
