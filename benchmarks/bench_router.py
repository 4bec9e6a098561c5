#!/usr/bin/env python3
"""Router speed: routing decisions, tree memory, and the router's added latency.

Three measurements, each against a baseline taken in the same run:

1. **Decision time** of the cache-aware policy (hash the prompt, longest match over every
   worker's tree, then record the prompt) for 1 KB and 32 KB prompts, against trees of 10k and
   1M entries (blocks of 64 characters, spread over 4 workers). Target: <= 50 us at 32 KB.
2. **Tree memory**: 1M distinct prompts routed through a policy with ``--max-tree-size``
   (eviction every 10k prompts, standing in for ``--eviction-interval-secs``); RSS growth
   and tree size, next to what the same prompts take with no bound.
3. **Added latency**: one sim worker, tiny ``/generate`` requests straight to it and through
   ``python -m sglctl.router`` (with its native upstream client, and with
   ``--upstream-client httpx``), at concurrency 1, 16 and 64; p50/p99 latency, requests/s and
   the router process's CPU time per request. Target: p50 added <= 0.5 ms at concurrency 1.
   Client, router and worker share the machine's cores, so requests/s is a ratio to compare,
   not a capacity.

Everything runs on 127.0.0.1, bounded in count and time; every process started here is stopped
at the end (also on Ctrl-C).

    python benchmarks/bench_router.py            # full run (~3 minutes)
    python benchmarks/bench_router.py --quick    # smaller trees and fewer requests
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import statistics
import string
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sglctl.net import find_free_port
from sglctl.router.policies import CacheAwarePolicy, RouteKey
from sglctl.router.workers import Worker
from sglctl.spawn import spawn_router, spawn_sim_worker

console = Console(width=130)
TENANTS = 4


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(string.ascii_letters + " ", k=n))


# -- 1. decision time ---------------------------------------------------------------------
def build_policy(entries: int, rng: random.Random) -> tuple[CacheAwarePolicy, list[Worker]]:
    """A cache-aware policy whose trees hold ``entries`` blocks in all (1 KB prompts)."""
    workers = [Worker(f"http://w{i}") for i in range(TENANTS)]
    policy = CacheAwarePolicy(max_tree_size=2**62, eviction_interval_secs=0)
    for w in workers:
        policy.on_worker_added(w)
    block = policy.tree.block
    per_prompt = 1024 // block
    base = random_text(rng, 1024)
    with progress() as bar:
        task = bar.add_task(f"filling a tree of {entries:,} entries", total=entries)
        i = 0
        while policy.tree.total_size() // block < entries:
            # Distinct prompts (a distinct first block), cheap to make.
            text = f"{i:012d}" + base[12:]
            policy.tree.insert(policy.hasher.text(text), workers[i % TENANTS].url)
            i += 1
            if i % 1000 == 0:
                bar.update(task, completed=min(i * per_prompt, entries))
    return policy, workers


def time_per_call(fn: Callable[[], object], repeat: int) -> float:
    """Best-of-5 mean seconds per call (the minimum is the least noisy on a shared machine)."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - start) / repeat)
    return best


def measure_decision(
    policy: CacheAwarePolicy, workers: list[Worker], prompt: str, repeat: int
) -> dict[str, float]:
    """Per-call costs of routing ``prompt``: hash, match, insert, and the whole select()."""
    key = RouteKey(text=prompt)
    prefixes = policy.hasher.text(prompt)
    names = [w.url for w in workers]
    target = workers[1].url
    return {
        "hash_us": time_per_call(lambda: policy.hasher.text(prompt), repeat) * 1e6,
        "match_us": time_per_call(lambda: policy.tree.match(prefixes, names), repeat) * 1e6,
        "insert_us": time_per_call(lambda: policy.tree.insert(prefixes, target), repeat) * 1e6,
        "select_us": time_per_call(lambda: policy.select(workers, key), repeat) * 1e6,
    }


def bench_decisions(sizes: list[int], repeat: int) -> list[dict[str, object]]:
    rng = random.Random(1)
    rows: list[dict[str, object]] = []
    for entries in sizes:
        policy, workers = build_policy(entries, rng)
        for length in (1024, 32 * 1024):
            cached = random_text(rng, length)
            policy.tree.insert(policy.hasher.text(cached), workers[1].url)
            # A new question on a cached prefix: the realistic case (long match, then a miss).
            prompt = cached[: length - 64] + random_text(rng, 64)
            costs = measure_decision(policy, workers, prompt, repeat)
            rows.append({"entries": entries, "prompt": f"{length // 1024} KB", **costs})
        policy.tree.clear()
        gc.collect()
    return rows


# -- 2. tree memory -----------------------------------------------------------------------
def bench_memory(prompts: int, max_tree_size: int) -> dict[str, float]:
    workers = [Worker(f"http://w{i}") for i in range(TENANTS)]
    policy = CacheAwarePolicy(max_tree_size=max_tree_size, eviction_interval_secs=0)
    for w in workers:
        policy.on_worker_added(w)
    base = random_text(random.Random(2), 256)
    gc.collect()
    before = rss_mb()
    peak_tree = 0
    with progress() as bar:
        task = bar.add_task(f"routing {prompts:,} distinct prompts", total=prompts)
        for i in range(prompts):
            policy.select(workers, RouteKey(text=f"{i:012d}" + base))
            if i % 10_000 == 9_999:
                peak_tree = max(peak_tree, policy.tree.total_size())
                policy.evict_once()
                bar.update(task, completed=i + 1)
    policy.evict_once()
    gc.collect()
    after = rss_mb()
    unbounded_chars = prompts * (-(-268 // policy.tree.block)) * policy.tree.block
    return {
        "prompts": prompts,
        "max_tree_size_per_worker": max_tree_size,
        "bound_chars": max_tree_size * TENANTS,
        "tree_chars_after_eviction": policy.tree.total_size(),
        "tree_chars_peak_before_eviction": peak_tree,
        "unbounded_chars": unbounded_chars,
        "rss_growth_mb": after - before,
    }


# -- 3. added latency ---------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def run_load(
    url: str, concurrency: int, total: int, label: str, bar: Progress, router_pid: int | None
) -> dict[str, float]:
    body = b'{"text": "Hi", "sampling_params": {"max_new_tokens": 1}}'
    latencies: list[float] = []
    task = bar.add_task(f"{label} c={concurrency}", total=total)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        for _ in range(concurrency):  # warm the connections
            await client.post("/generate", content=body)
        remaining = total

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                r = await client.post("/generate", content=body)
                latencies.append(time.perf_counter() - start)
                if r.status_code != 200:
                    raise RuntimeError(f"{label}: HTTP {r.status_code}: {r.text[:200]}")
                bar.advance(task)

        cpu_before = cpu_seconds(router_pid) if router_pid else 0.0
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu_after = cpu_seconds(router_pid) if router_pid else 0.0
    bar.remove_task(task)
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1e3,
        "rps": len(latencies) / elapsed,
        "cpu_us": (cpu_after - cpu_before) / len(latencies) * 1e6,
    }


def bench_latency(requests: int, log_dir: Path) -> list[dict[str, object]]:
    """Direct, through the router (native client) and through the router (httpx client)."""
    quiet = ("--log-level", "warning")
    worker = spawn_sim_worker(log_dir, "--speedup", "1000", "--min-tick-ms", "0.05", *quiet)
    routers = []
    try:
        for client in ("native", "httpx"):
            routers.append(
                spawn_router(
                    log_dir,
                    [worker.url],
                    "--metrics-port",
                    str(find_free_port()),
                    "--disable-health-check",
                    "--upstream-client",
                    client,
                    *quiet,
                    name=f"router-{client}",
                )
            )
        targets = [("direct", worker.url, None)] + [
            (name, r.url, r.pid) for name, r in zip(("native", "httpx"), routers, strict=True)
        ]
        rows: list[dict[str, object]] = []
        with progress() as bar:
            for concurrency in (1, 16, 64):
                # Interleave the targets, twice, so that drift on a shared machine hits all alike.
                runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in targets}
                for _ in range(2):
                    for name, url, pid in targets:
                        load = run_load(url, concurrency, requests, name, bar, pid)
                        runs[name].append(asyncio.run(load))
                row: dict[str, object] = {"concurrency": concurrency}
                for name, results in runs.items():
                    row[name] = {k: statistics.median(r[k] for r in results) for k in results[0]}
                rows.append(row)
        return rows
    finally:
        for router in routers:
            router.stop()
        worker.stop()


def print_latency(rows: list[dict[str, object]], requests: int) -> None:
    table = Table(
        title=f"3. Added latency, tiny /generate ({requests} requests a round, median of 2 rounds)"
    )
    for col in (
        "conc.",
        "target",
        "p50",
        "added p50",
        "p99",
        "req/s",
        "vs direct",
        "router CPU/req",
    ):
        table.add_column(col, justify="right")
    for row in rows:
        direct: dict[str, float] = row["direct"]  # type: ignore[assignment]
        for name in ("direct", "native", "httpx"):
            r: dict[str, float] = row[name]  # type: ignore[assignment]
            table.add_row(
                str(row["concurrency"]) if name == "direct" else "",
                "direct" if name == "direct" else f"router, {name} client",
                f"{r['p50_ms']:.2f} ms",
                "" if name == "direct" else f"{r['p50_ms'] - direct['p50_ms']:+.2f} ms",
                f"{r['p99_ms']:.2f} ms",
                f"{r['rps']:.0f}",
                f"{r['rps'] / direct['rps']:.2f}",
                "" if name == "direct" else f"{r['cpu_us']:.0f} us",
            )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller trees, fewer prompts and requests"
    )
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()

    sizes = [10_000, 100_000] if args.quick else [10_000, 1_000_000]
    prompts = 100_000 if args.quick else 1_000_000
    requests = 300 if args.quick else 2000
    console.print(
        f"[bold]sglctl router benchmark[/] (python {sys.version.split()[0]}, {os.cpu_count()} cpus)"
    )

    table = Table(title="1. Cache-aware routing decision (best-of-5 mean per call)")
    for col in ("tree entries", "prompt", "hash", "match (4 workers)", "insert", "select() total"):
        table.add_column(col, justify="right")
    for row in bench_decisions(sizes, repeat=200 if args.quick else 1000):
        table.add_row(
            f"{row['entries']:,}",
            str(row["prompt"]),
            f"{row['hash_us']:.1f} us",
            f"{row['match_us']:.1f} us",
            f"{row['insert_us']:.1f} us",
            f"{row['select_us']:.1f} us",
        )
    console.print(table)

    if not args.skip_memory:
        max_tree = 16_777_216 // 16 if args.quick else 16_777_216
        mem = bench_memory(prompts, max_tree)
        table = Table(
            title=f"2. Tree memory after {mem['prompts']:,} distinct 268-char prompts, 4 workers"
        )
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_row("--max-tree-size per worker (chars)", f"{mem['max_tree_size_per_worker']:,}")
        table.add_row("bound over 4 workers (chars)", f"{mem['bound_chars']:,}")
        table.add_row("tree size after eviction (chars)", f"{mem['tree_chars_after_eviction']:,}")
        table.add_row(
            "tree size peak between evictions", f"{mem['tree_chars_peak_before_eviction']:,}"
        )
        table.add_row("same prompts with no bound (chars)", f"{mem['unbounded_chars']:,}")
        table.add_row("RSS growth (MB)", f"{mem['rss_growth_mb']:.0f}")
        console.print(table)

    if not args.skip_latency:
        with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
            rows = bench_latency(requests, Path(tmp))
        print_latency(rows, requests)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        console.print("interrupted")
