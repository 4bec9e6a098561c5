"""Per-request cost of the router's metrics: ns per recorded request, before and after.

"before" is what the router did until now: prometheus_client ``Counter`` and ``Histogram``
label children (cached, so one dict lookup each), ``inc()`` and ``observe()`` per request,
each taking the child's lock. "after" is :class:`sglctl.router.metrics.RouterMetrics`:
``begin`` (which also sets the task's current request), one ``note_attempt`` (the proxy's
hook) and ``finish`` (counter, duration and TTFT histograms), plain ints aggregated at scrape
time. "after, streamed" adds 16 ``note_chunk`` calls and the TPOT histogram. The scrape
itself (``render()`` with 8 workers and 5 routes) is timed too: it runs a few times a
minute, not per request.

    .venv/bin/python benchmarks/bench_metrics.py [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from sglctl.router.metrics import DEFAULT_BUCKETS, RouterMetrics, note_attempt, note_chunk
from sglctl.router.policies.base import RouteKey
from sglctl.router.policies.simple import RoundRobinPolicy
from sglctl.router.workers import WorkerRegistry

ROUTES = ("/generate", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/x")
CHUNK = b'data: {"text":"hello","meta_info":{"completion_tokens":16}}\n\n'


def before(n: int) -> float:
    """ns per request with prometheus_client's instruments (the previous implementation)."""
    registry = CollectorRegistry(auto_describe=False)
    requests = Counter("r_total", "r", ["route", "status"], registry=registry)
    duration = Histogram("d_seconds", "d", ["route"], buckets=DEFAULT_BUCKETS, registry=registry)
    req_children: dict[tuple[str, int], object] = {}
    dur_children: dict[str, object] = {}
    start = time.process_time_ns()
    for i in range(n):
        route, status, elapsed = "/generate", 200, (i % 1000) * 0.001
        key = (route, status)
        counter = req_children.get(key)
        if counter is None:
            counter = req_children[key] = requests.labels(route, str(status))
        counter.inc()  # type: ignore[attr-defined]
        hist = dur_children.get(route)
        if hist is None:
            hist = dur_children[route] = duration.labels(route)
        hist.observe(elapsed)  # type: ignore[attr-defined]
    return (time.process_time_ns() - start) / n


async def after(n: int, chunks: int) -> float:
    """ns per request with RouterMetrics, including the proxy's hooks."""
    registry = WorkerRegistry()
    workers = [registry.add(f"http://127.0.0.{i}:30000") for i in range(2, 10)]
    metrics = RouterMetrics(registry)
    policy = RoundRobinPolicy()
    key = RouteKey(text="hello")
    candidates = workers[:2]
    start = time.process_time_ns()
    for _ in range(n):
        obs = metrics.begin("/generate")
        note_attempt(policy, candidates, key, workers[0])
        for _ in range(chunks):
            note_chunk(CHUNK)
        metrics.finish(obs, 200)
    return (time.process_time_ns() - start) / n


def scrape_ms(repeat: int = 50) -> float:
    registry = WorkerRegistry()
    for i in range(2, 10):
        registry.add(f"http://127.0.0.{i}:30000")
    metrics = RouterMetrics(registry)
    for route in ROUTES:
        for code in (200, 400, 502):
            metrics.observe(route, code, 0.05)
    start = time.perf_counter()
    for _ in range(repeat):
        metrics.render()
    return (time.perf_counter() - start) / repeat * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args()
    n = args.requests
    # CPU time (process_time), best of five interleaved runs: on a shared machine wall time
    # counts the neighbours' time slices too.
    old = new = streamed = float("inf")
    for _ in range(5):
        old = min(old, before(n))
        new = min(new, asyncio.run(after(n, 0)))
        streamed = min(streamed, asyncio.run(after(n, 16)))
    print(f"requests recorded per run: {n}")
    print(f"before (prometheus_client Counter + Histogram): {old:7.0f} ns/request")
    print(f"after  (RouterMetrics begin/note_attempt/finish): {new:7.0f} ns/request")
    print(f"after, streamed (+16 note_chunk, TPOT):          {streamed:7.0f} ns/request")
    print(f"scrape (render, 8 workers, 5 routes x 3 codes):   {scrape_ms():7.2f} ms")


if __name__ == "__main__":
    main()
