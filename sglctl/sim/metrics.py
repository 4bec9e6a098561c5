"""Prometheus metrics of the simulated worker, under real SGLang's ``sglang:`` names.

Counters and histograms are updated when a request's first token comes out or when it finishes
(as SGLang's tokenizer-manager collector does). Gauges are read from the engine at scrape time,
so the scheduler loop does no metrics work at all. Every series carries the ``model_name``
label, like SGLang's. The benchmark reads the counters to compute each worker's share of
requests and tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sglctl.sim.engine import Engine, SimRequest

HEALTH_CHECK_PREFIX = "HEALTH_CHECK_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
)  # fmt: skip


class _EngineGauges(Collector):
    """Gauges computed from the engine's state when Prometheus scrapes."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterable[GaugeMetricFamily]:
        engine = self.engine
        values = (
            ("sglang:num_running_reqs", "Running requests (admitted, not finished).",
             engine.num_running),
            ("sglang:num_queue_reqs", "Requests waiting for admission.", engine.num_waiting),
            ("sglang:num_used_tokens", "KV cache tokens in use.", engine.cache.used),
            ("sglang:token_usage", "Fraction of the KV cache pool in use.", engine.token_usage),
            ("sglang:gen_throughput", "Generation throughput (tokens/s, last second or more).",
             engine.gen_throughput),
            ("sglang:cache_hit_rate", "Prefix cache hit rate (cached / prompt tokens, cumulative).",
             engine.cache_hit_rate),
        )  # fmt: skip
        for name, doc, value in values:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(value))
            yield family


class _DisaggGauges(Collector):
    """PD hand-over figures, read at scrape time from the role's ``stats()``.

    The queue gauges use SGLang's names (``num_prefill_inflight_queue_reqs``: KV being sent;
    ``num_decode_transfer_queue_reqs``: waiting for KV); the rest are the sim's own.
    """

    def __init__(self, stats: Callable[[], dict[str, Any]], mode: str, model_name: str) -> None:
        self.stats = stats
        self.mode = mode
        self.model_name = model_name

    def collect(self) -> Iterable[GaugeMetricFamily]:
        stats = self.stats()
        if self.mode == "prefill":
            values = [
                ("sglang:num_prefill_inflight_queue_reqs", "KV transfers under way.",
                 stats["transferring"]),
                ("sglang:pd_rooms", "Bootstrap rooms known (held, computing or awaited).",
                 stats["rooms"]),
                ("sglang:pd_held_kv_tokens", "Prompt KV tokens held for a decode worker.",
                 stats["held_kv_tokens"]),
            ]  # fmt: skip
        else:
            values = [
                ("sglang:num_decode_transfer_queue_reqs", "Requests waiting for their KV.",
                 stats["rooms_waiting"]),
            ]  # fmt: skip
        values += [
            ("sglang:pd_transfers_ok", "KV hand-overs completed (cumulative).",
             stats["transfers_ok"]),
            ("sglang:pd_transfers_failed", "KV hand-overs failed (cumulative).",
             stats["transfers_failed"]),
        ]  # fmt: skip
        for name, doc, value in values:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(value))
            yield family


class SimMetrics:
    """The worker's registry; ``render()`` gives the ``/metrics`` body."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        labels = ["model_name"]
        reg = self.registry
        self.prompt_tokens = Counter(
            "sglang:prompt_tokens", "Prompt tokens of finished requests.", labels, registry=reg
        )
        self.generation_tokens = Counter(
            "sglang:generation_tokens", "Generated tokens of finished requests.", labels,
            registry=reg,
        )  # fmt: skip
        self.cached_tokens = Counter(
            "sglang:cached_tokens", "Prompt tokens served from the prefix cache.", labels,
            registry=reg,
        )  # fmt: skip
        self.num_requests = Counter(
            "sglang:num_requests", "Finished requests.", labels, registry=reg
        )
        self.num_aborted = Counter(
            "sglang:num_aborted_requests", "Requests aborted (client gone).", labels, registry=reg
        )
        self.ttft = Histogram(
            "sglang:time_to_first_token_seconds", "Time to first token.", labels,
            buckets=_LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.e2e = Histogram(
            "sglang:e2e_request_latency_seconds", "End-to-end request latency.", labels,
            buckets=_LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.itl = Histogram(
            "sglang:inter_token_latency_seconds", "Mean time between output tokens, a request.",
            labels, buckets=_ITL_BUCKETS, registry=reg,
        )  # fmt: skip
        reg.register(_EngineGauges(engine, model_name))

    def add_disagg(self, stats: Callable[[], dict[str, Any]], mode: str) -> None:
        """Export a PD role's figures (``mode`` prefill or decode)."""
        self.registry.register(_DisaggGauges(stats, mode, self.model_name))

    def first_token(self, req: SimRequest) -> None:
        if req.rid.startswith(HEALTH_CHECK_PREFIX):
            return
        if req.first_token_time is not None:
            self.ttft.labels(self.model_name).observe(req.first_token_time - req.arrival)

    def finished(self, req: SimRequest) -> None:
        if req.rid.startswith(HEALTH_CHECK_PREFIX):
            return  # probes are not traffic: keep per-worker request shares exact
        name = self.model_name
        if req.abort_reason is not None:
            self.num_aborted.labels(name).inc()
            return
        self.num_requests.labels(name).inc()
        self.prompt_tokens.labels(name).inc(req.prompt_tokens)
        self.generation_tokens.labels(name).inc(req.final_output_len)
        self.cached_tokens.labels(name).inc(req.cached_tokens)
        if req.finish_time is not None:
            self.e2e.labels(name).observe(req.finish_time - req.arrival)
            if req.first_token_time is not None and req.final_output_len > 1:
                decode_time = req.finish_time - req.first_token_time
                self.itl.labels(name).observe(decode_time / (req.final_output_len - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
