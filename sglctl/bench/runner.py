"""Replay a workload against a router: open loop at given times, or closed loop at a concurrency.

One process, one asyncio loop, one httpx client. Three ways to pace requests:

* ``trace``: at the workload's own arrival times divided by the speed-up;
* ``rate``: Poisson arrivals at ``rate`` requests/s (SGLang's bench_serving does the same);
* ``concurrency``: ``concurrency`` requests in flight, the next one sent when one finishes.

In every mode a request whose ``after`` is set waits for that request to finish first, and
``max_requests`` / ``duration`` bound the run: after ``duration`` seconds nothing new is sent,
and what is still running gets ``drain_timeout`` more seconds before it is cancelled (and
counted as cancelled, not as an error).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sglctl.bench.client import generate_body, stream_generate
from sglctl.bench.ideal import ideal_hit_ratio
from sglctl.bench.stats import RequestResult, Summary, summarize
from sglctl.bench.textgen import PromptBuilder
from sglctl.bench.workers import discover_workers, scrape_counters, worker_shares
from sglctl.bench.workload import BenchRequest, Workload, check_dependencies

log = logging.getLogger(__name__)

MODES = ("trace", "rate", "concurrency")
# When the client itself falls this far behind the schedule, the figures measure the client.
LAG_WARNING_SECS = 1.0


@dataclass
class RunConfig:
    """How to run a workload. ``mode`` is one of :data:`MODES`."""

    url: str
    mode: str = "concurrency"
    rate: float | None = None
    concurrency: int | None = None
    speedup: float = 1.0
    max_requests: int | None = None
    duration: float | None = None
    drain_timeout: float = 30.0
    request_timeout: float = 600.0
    seed: int = 0
    worker_urls: list[str] = field(default_factory=list)
    progress: bool = True
    label: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.mode == "rate" and not (self.rate and self.rate > 0):
            raise ValueError("--rate must be a positive number of requests per second")
        if self.mode == "concurrency" and not (self.concurrency and self.concurrency > 0):
            raise ValueError("--concurrency must be at least 1")
        if self.speedup <= 0:
            raise ValueError("--speedup must be positive")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("--duration must be positive")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError("--max-requests must be at least 1")


@dataclass
class BenchResult:
    """Everything one run produced."""

    config: RunConfig
    workload: Workload
    results: list[RequestResult]
    summary: Summary
    max_lag: float = 0.0


def send_times(
    requests: Sequence[BenchRequest], mode: str, *, rate: float | None, speedup: float, seed: int
) -> list[float | None]:
    """Planned send time of each request, in seconds from the start (None: closed loop).

    ``trace`` divides the workload's arrival times by ``speedup`` (requests without one go
    right after their predecessor in the list); ``rate`` draws Poisson gaps from a seeded
    generator, so that two routers compared in one run see the very same schedule.
    """
    if mode == "concurrency":
        return [None] * len(requests)
    if mode == "rate":
        assert rate
        rng = random.Random(seed)
        times: list[float | None] = []
        now = 0.0
        for i in range(len(requests)):
            if i:
                now += rng.expovariate(rate)
            times.append(now)
        return times
    times = []
    last = 0.0
    for req in requests:
        if req.arrival is not None:
            last = max(last, req.arrival / speedup)
        times.append(last)
    return times


class _Run:
    """State of one run: the results so far, completion events, the progress bar."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        workload: Workload,
        config: RunConfig,
        builder: PromptBuilder,
        progress: Progress | None,
    ) -> None:
        self.client = client
        self.requests = workload.requests
        self.config = config
        self.builder = builder
        self.progress = progress
        self.task_id = (
            progress.add_task(config.label or workload.name, total=len(self.requests))
            if progress
            else None
        )
        self.url = config.url.rstrip("/") + "/generate"
        self.results: list[RequestResult] = []
        self.waited_on = {req.after for req in self.requests if req.after is not None}
        self.done: dict[int, asyncio.Event] = {i: asyncio.Event() for i in self.waited_on}
        self.in_flight = 0
        self.finished = 0
        self.errors = 0
        self.max_lag = 0.0
        self.t0 = 0.0

    def _update_progress(self) -> None:
        if self.progress is not None and self.task_id is not None:
            self.progress.update(
                self.task_id,
                completed=self.finished,
                status=f"in flight {self.in_flight}, errors {self.errors}",
            )

    async def one(self, req: BenchRequest) -> None:
        """Wait for the request's predecessor, send it, record the result."""
        try:
            if req.after is not None:
                await self.done[req.after].wait()
            result = RequestResult(index=req.index, start=time.perf_counter() - self.t0)
            self.results.append(result)
            self.in_flight += 1
            try:
                body = generate_body(self.builder.prompt(req), req.output_tokens)
                await stream_generate(self.client, self.url, body, result)
            except asyncio.CancelledError:
                result.cancelled = True
                raise
            finally:
                self.in_flight -= 1
            self.finished += 1
            if not result.ok:
                self.errors += 1
                log.debug("request %d failed: %s", req.index, result.error)
            self._update_progress()
        finally:
            event = self.done.get(req.index)
            if event is not None:
                event.set()

    async def open_loop(
        self, times: Sequence[float | None], deadline: float | None
    ) -> list[asyncio.Task[None]]:
        """Start each request at its time; return the tasks (some may still run)."""
        tasks = []
        for req, planned in zip(self.requests, times, strict=True):
            assert planned is not None
            if deadline is not None and planned >= deadline:
                break
            delay = planned - (time.perf_counter() - self.t0)
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.max_lag = max(self.max_lag, -delay)
            tasks.append(asyncio.create_task(self.one(req)))
        return tasks

    async def closed_loop(
        self, concurrency: int, deadline: float | None
    ) -> list[asyncio.Task[None]]:
        """``concurrency`` slots, each sending the next request when its last one finished."""
        pending = iter(self.requests)

        async def slot() -> None:
            for req in pending:
                if deadline is not None and time.perf_counter() - self.t0 >= deadline:
                    return
                await self.one(req)

        return [asyncio.create_task(slot()) for _ in range(concurrency)]

    async def execute(self) -> float:
        """Run to completion (or the duration and drain limits); return the wall time."""
        cfg = self.config
        self.t0 = time.perf_counter()
        deadline = cfg.duration
        if cfg.mode == "concurrency":
            assert cfg.concurrency
            tasks = await self.closed_loop(cfg.concurrency, deadline)
        else:
            times = send_times(
                self.requests, cfg.mode, rate=cfg.rate, speedup=cfg.speedup, seed=cfg.seed
            )
            # The dispatcher never schedules past the deadline, so it ends by itself.
            tasks = await self.open_loop(times, deadline)
        hard_stop = None if deadline is None else deadline + cfg.drain_timeout
        remaining = (
            None if hard_stop is None else max(hard_stop - (time.perf_counter() - self.t0), 0.0)
        )
        if tasks:
            _, still = await asyncio.wait(tasks, timeout=remaining)
            if still:
                log.warning(
                    "cancelling %d requests still running %.0fs after the duration",
                    len(still),
                    cfg.drain_timeout,
                )
                for task in still:
                    task.cancel()
                await asyncio.gather(*still, return_exceptions=True)
        self._update_progress()
        return time.perf_counter() - self.t0


async def run_workload(
    workload: Workload,
    config: RunConfig,
    *,
    console: Console | None = None,
    builder: PromptBuilder | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> BenchResult:
    """Run ``workload`` through the router at ``config.url`` and summarise it.

    Worker counters are read before and after (from ``config.worker_urls``, else from the
    router's worker list) for per-worker shares. The ideal hit ratio is computed for exactly
    the requests that were sent. ``transport`` replaces the network (tests).
    """
    workload = workload.head(config.max_requests)
    check_dependencies(workload.requests)
    builder = builder or PromptBuilder()
    limits = httpx.Limits(
        max_connections=max(config.concurrency or 0, 1024), max_keepalive_connections=256
    )
    timeout = httpx.Timeout(config.request_timeout, connect=10.0, pool=None)
    console = console or Console(stderr=True)
    async with httpx.AsyncClient(
        limits=limits, timeout=timeout, trust_env=False, transport=transport
    ) as client:
        worker_urls = list(config.worker_urls) or await discover_workers(client, config.url)
        if not worker_urls:
            log.warning("no worker list from %s: per-worker shares will be missing", config.url)
        before = await scrape_counters(client, worker_urls)
        progress = (
            Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=console,
                transient=False,
            )
            if config.progress
            else None
        )
        run = _Run(client, workload, config, builder, progress)
        if progress is not None:
            progress.update(run.task_id, status="starting")  # type: ignore[arg-type]
            with progress:
                duration = await run.execute()
        else:
            duration = await run.execute()
        after = await scrape_counters(client, worker_urls)
    if run.max_lag > LAG_WARNING_SECS:
        log.warning(
            "the client fell %.1fs behind its schedule: the machine is saturated and the "
            "figures include the client's own delay",
            run.max_lag,
        )
    results = sorted(run.results, key=lambda r: r.index)
    sent = [workload.requests[r.index] for r in results]
    summary = summarize(results, duration, worker_shares(before, after), ideal_hit_ratio(sent))
    return BenchResult(config, workload, results, summary, run.max_lag)
