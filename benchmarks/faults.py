"""Fault benchmark: requests lost when workers are killed; time to bypass a dead or hung worker.

Not a test: it prints figures for ``benchmarks/RESULTS.md``. Everything runs on 127.0.0.1 with
sim workers and a bounded closed-loop client.

1. **Kill sequence**: ``--workers`` sim workers behind the router under steady load; all but
   one are SIGKILLed one after another (each after ``--between`` requests). Reported: requests
   sent and lost (any answer but 200), retries, time from each kill to the router marking the
   worker unhealthy, and the latency p50/p99 of requests before the kills vs during them. Run
   twice in the same invocation, with retries on (sglctl's default) and with
   ``--disable-retries`` as the baseline, to show what the retry loop buys.
2. **Stall**: two workers, one with ``--stall-after N`` (stops answering anything, /health
   included, like a hung GPU). Reported: time from the stall to the router marking the worker
   unhealthy, requests lost, and the slowest request (those that were waiting on the staller
   when it hung).

    .venv/bin/python benchmarks/faults.py
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sglctl.net import find_free_port
from sglctl.spawn import ManagedProcess, spawn_router, spawn_sim_worker

console = Console(width=120)


@dataclass
class Load:
    """Closed-loop ``/generate`` load with per-request latency and outcome."""

    url: str
    concurrency: int
    tokens: int = 16
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (end time, seconds)
    errors: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    sent: int = 0

    @property
    def done(self) -> int:
        return sum(self.statuses.values())

    @property
    def lost(self) -> int:
        return self.done - self.statuses["200"]

    async def run(self, max_requests: int) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=120, trust_env=False) as client:

            async def loop() -> None:
                while not self.stop.is_set() and self.sent < max_requests:
                    i = self.sent
                    self.sent += 1
                    body = {
                        "text": f"fault benchmark request {i}",
                        "sampling_params": {"max_new_tokens": self.tokens},
                    }
                    started = time.monotonic()
                    try:
                        response = await client.post("/generate", json=body)
                        outcome = str(response.status_code)
                        if response.status_code != 200 and len(self.errors) < 10:
                            self.errors.append(f"{outcome}: {response.text[:160]}")
                    except httpx.HTTPError as exc:
                        outcome = type(exc).__name__
                        if len(self.errors) < 10:
                            self.errors.append(f"{outcome}: {exc}")
                    end = time.monotonic()
                    self.statuses[outcome] += 1
                    self.latencies.append((end, end - started))

            await asyncio.gather(*(loop() for _ in range(self.concurrency)))


async def wait_for(predicate, timeout: float, interval: float = 0.01) -> float:  # type: ignore[no-untyped-def]
    """Poll an async predicate; seconds until it held (or ``nan`` on timeout)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await predicate():
            return time.monotonic() - started
        await asyncio.sleep(interval)
    return float("nan")


async def is_unhealthy(client: httpx.AsyncClient, url: str) -> bool:
    workers = (await client.get("/workers")).json()["workers"]
    return any(w["url"] == url and not w["is_healthy"] for w in workers)


async def retries_total(client: httpx.AsyncClient) -> float:
    total = 0.0
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith("sglang_router_retries_total"):
            total += float(line.split()[-1])
    return total


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def health_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--health-check-interval-secs",
        str(args.health_interval),
        "--health-check-timeout-secs",
        str(args.health_timeout),
        "--health-failure-threshold",
        str(args.health_failures),
        "--health-success-threshold",
        "1",
    ]


async def kill_sequence(
    args: argparse.Namespace, log_dir: Path, retries: bool
) -> dict[str, object]:
    procs: list[ManagedProcess] = []
    try:
        workers = [
            spawn_sim_worker(log_dir, "--speedup", str(args.speedup)) for _ in range(args.workers)
        ]
        procs += workers
        extra = ["--metrics-port", str(find_free_port()), "--log-level", "warning"]
        extra += ["--policy", "round_robin", *health_flags(args)]
        if not retries:
            extra.append("--disable-retries")
        router = spawn_router(log_dir, [w.url for w in workers], *extra)
        procs.append(router)
        load = Load(router.url, args.concurrency)
        total = args.between * args.workers
        runner = asyncio.create_task(load.run(max_requests=50_000))  # stopped by the sequence
        detections: list[float] = []
        kill_times: list[float] = []
        label = "kill sequence" + ("" if retries else " (--disable-retries)")
        async with httpx.AsyncClient(base_url=router.url, timeout=10, trust_env=False) as client:
            with Progress(
                TextColumn(f"[bold]{label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            ) as progress:
                task = progress.add_task(label, total=total)

                async def progressed(n: int) -> bool:
                    progress.update(task, completed=min(load.done, total))
                    return load.done >= n

                for victim in workers[:-1]:
                    target = load.done + args.between
                    await wait_for(lambda t=target: progressed(t), timeout=120)
                    victim.popen.kill()
                    killed = time.monotonic()
                    kill_times.append(killed)
                    detections.append(
                        await wait_for(lambda v=victim: is_unhealthy(client, v.url), timeout=30)
                    )
                target = load.done + args.between
                await wait_for(lambda: progressed(target), timeout=120)
                load.stop.set()
                await runner
                progress.update(task, completed=total)
            retried = await retries_total(client)
        first_kill = kill_times[0]
        before = [lat for end, lat in load.latencies if end < first_kill]
        during = [lat for end, lat in load.latencies if end >= first_kill]
        return {
            "retries": retries,
            "requests": load.done,
            "lost": load.lost,
            "retried": int(retried),
            "detect": detections,
            "p50_before": percentile(before, 0.5),
            "p99_before": percentile(before, 0.99),
            "p50_during": percentile(during, 0.5),
            "p99_during": percentile(during, 0.99),
            "errors": load.errors,
        }
    finally:
        for proc in reversed(procs):
            proc.stop()


async def stall(args: argparse.Namespace, log_dir: Path) -> dict[str, object]:
    procs: list[ManagedProcess] = []
    try:
        staller = spawn_sim_worker(log_dir, "--speedup", str(args.speedup), "--stall-after", "30")
        healthy = spawn_sim_worker(log_dir, "--speedup", str(args.speedup))
        procs += [staller, healthy]
        extra = ["--metrics-port", str(find_free_port()), "--log-level", "warning"]
        extra += ["--policy", "round_robin", "--request-timeout-secs", "120", *health_flags(args)]
        router = spawn_router(log_dir, [staller.url, healthy.url], *extra)
        procs.append(router)
        load = Load(router.url, args.concurrency)
        runner = asyncio.create_task(load.run(max_requests=50_000))  # stopped below

        async def stalled() -> bool:
            # The worker's own /health stops answering at the moment it stalls.
            try:
                async with httpx.AsyncClient(timeout=0.2, trust_env=False) as probe:
                    await probe.get(staller.url + "/health")
                return False
            except httpx.TimeoutException:
                return True

        await wait_for(stalled, timeout=60, interval=0.02)
        stalled_at = time.monotonic()
        async with httpx.AsyncClient(base_url=router.url, timeout=10, trust_env=False) as client:
            await wait_for(lambda: is_unhealthy(client, staller.url), timeout=60)
            detect = time.monotonic() - stalled_at
            mark = load.done

            async def more() -> bool:
                return load.done >= mark + args.between

            await wait_for(more, timeout=120)
            load.stop.set()
            await runner
        lat = [lat for _, lat in load.latencies]
        return {
            "requests": load.done,
            "lost": load.lost,
            "detect": detect,
            "p50": percentile(lat, 0.5),
            "max": max(lat) if lat else float("nan"),
            "errors": load.errors,
        }
    finally:
        for proc in reversed(procs):
            proc.stop()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


async def main_async(args: argparse.Namespace) -> int:
    log_dir = Path(tempfile.mkdtemp(prefix="sglctl-faults-"))
    try:
        with_retries = await kill_sequence(args, log_dir, retries=True)
        baseline = await kill_sequence(args, log_dir, retries=False)
        stalled = await stall(args, log_dir)
    finally:
        if not args.keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)

    console.print(
        f"health checks: every {args.health_interval}s, timeout {args.health_timeout}s, "
        f"unhealthy after {args.health_failures} failures; {args.workers} workers, "
        f"concurrency {args.concurrency}, speedup {args.speedup}"
    )
    table = Table(title="kill sequence: all workers but one SIGKILLed under load")
    for col in (
        "retries",
        "requests",
        "lost",
        "retried",
        "detect s (each kill)",
        "p50/p99 before ms",
        "p50/p99 during ms",
    ):
        table.add_column(col, justify="right")
    for run in (with_retries, baseline):
        table.add_row(
            "on" if run["retries"] else "off (baseline)",
            str(run["requests"]),
            str(run["lost"]),
            str(run["retried"]),
            ", ".join(f"{d:.2f}" for d in run["detect"]),  # type: ignore[attr-defined]
            f"{ms(run['p50_before'])}/{ms(run['p99_before'])}",  # type: ignore[arg-type]
            f"{ms(run['p50_during'])}/{ms(run['p99_during'])}",  # type: ignore[arg-type]
        )
    console.print(table)
    for line in with_retries["errors"]:  # type: ignore[attr-defined]
        console.print(f"  with retries: {line}")
    ratio = (
        (with_retries["p99_during"] / with_retries["p99_before"])
        if with_retries["p99_before"]
        else float("nan")
    )  # type: ignore[operator]
    console.print(f"p99 during kills / p99 before kills (retries on): {ratio:.2f}x")
    console.print(
        f"stall: detected {stalled['detect']:.2f}s after the worker hung; "
        f"{stalled['requests']} requests, {stalled['lost']} lost; "
        f"p50 {ms(stalled['p50'])} ms, slowest {ms(stalled['max'])} ms"  # type: ignore[arg-type]
    )
    for line in stalled["errors"]:  # type: ignore[attr-defined]
        console.print(f"  stall: {line}")
    detections = with_retries["detect"]
    console.print(
        f"mean time to bypass a dead worker: {statistics.mean(detections):.2f}s"  # type: ignore[arg-type]
    )
    return 0 if with_retries["lost"] == 0 and stalled["lost"] == 0 else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--between", type=int, default=300, help="requests between kills")
    parser.add_argument("--speedup", type=float, default=20.0)
    parser.add_argument("--health-interval", type=float, default=0.5)
    parser.add_argument("--health-timeout", type=float, default=1.0)
    parser.add_argument("--health-failures", type=int, default=2)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    if args.workers < 2 or args.workers > 8 or args.concurrency > 64 or args.between > 5000:
        parser.error("keep it bounded: 2..8 workers, concurrency <= 64, --between <= 5000")
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
