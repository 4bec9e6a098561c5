"""Soak the router: hold mixed load for a few minutes, report RSS growth and error counts.

Not a test: a measurement. Two sim workers and a router on 127.0.0.1; a bounded client mixes
non-streaming and streaming ``/generate``, OpenAI chat requests, malformed bodies (expected
400) and clients that hang up mid-stream (the router must cancel upstream and free the slot).
The router's RSS is sampled throughout; "before" is taken after a warm-up (imports, pools,
caches filled), "after" at the end, so growth means a leak rather than start-up allocation.

Also checks at the end that the router's in-flight counters went back to zero (a leaked load
slot is a leak too).

    .venv/bin/python benchmarks/soak.py --duration 180 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from sglctl.net import find_free_port
from sglctl.spawn import ManagedProcess, spawn_router, spawn_sim_worker

console = Console(width=120)


def rss_mb(proc: ManagedProcess) -> float:
    """Resident memory of the process and its children, in MiB."""
    try:
        root = psutil.Process(proc.pid)
        total = root.memory_info().rss + sum(
            c.memory_info().rss for c in root.children(recursive=True)
        )
    except psutil.NoSuchProcess:
        return float("nan")
    return total / 2**20


class Soak:
    """Closed-loop mixed traffic with counters per request kind and outcome."""

    def __init__(self, url: str, concurrency: int, seed: int) -> None:
        self.url = url
        self.concurrency = concurrency
        self.rng = random.Random(seed)
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.unexpected: list[str] = []
        self.count = 0
        self.stop = asyncio.Event()

    def _record(self, kind: str, outcome: str, expected: bool, detail: str = "") -> None:
        self.count += 1
        self.outcomes[(kind, outcome)] += 1
        if not expected and len(self.unexpected) < 20:
            self.unexpected.append(f"{kind}: {outcome} {detail[:200]}")

    async def one(self, client: httpx.AsyncClient) -> None:
        r = self.rng.random()
        n = self.count
        prompt = f"soak {n % 500}: " + "shared system prompt for the soak test. " * 8
        try:
            if r < 0.45:
                body = {"text": prompt, "sampling_params": {"max_new_tokens": 16}}
                resp = await client.post("/generate", json=body)
                self._record("generate", str(resp.status_code), resp.status_code == 200, resp.text)
            elif r < 0.70:
                body = {"text": prompt, "sampling_params": {"max_new_tokens": 32}, "stream": True}
                async with client.stream("POST", "/generate", json=body) as resp:
                    last = ""
                    async for line in resp.aiter_lines():
                        if line.strip():
                            last = line
                ok = resp.status_code == 200 and last.strip() == "data: [DONE]"
                self._record("stream", str(resp.status_code) if ok else "bad-end", ok, last)
            elif r < 0.85:
                body = {
                    "model": "sim",
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 16,
                }
                resp = await client.post("/v1/chat/completions", json=body)
                self._record("chat", str(resp.status_code), resp.status_code == 200, resp.text)
            elif r < 0.93:
                bad = self.rng.choice([b"{not json", b"[]", b'{"text": 5}', b"\xff\xfe"])
                resp = await client.post("/generate", content=bad)
                self._record("malformed", str(resp.status_code), resp.status_code == 400, resp.text)
            else:
                # Hang up after the first chunk: the router must cancel upstream.
                body = {"text": prompt, "sampling_params": {"max_new_tokens": 256}, "stream": True}
                async with client.stream("POST", "/generate", json=body) as resp:
                    async for _ in resp.aiter_raw():
                        break
                self._record("disconnect", str(resp.status_code), resp.status_code == 200)
        except httpx.HTTPError as exc:
            self._record("transport", type(exc).__name__, False, str(exc))

    async def loop(self, client: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            await self.one(client)

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency * 2)
        async with httpx.AsyncClient(
            base_url=self.url, timeout=60, limits=limits, trust_env=False
        ) as client:
            await asyncio.gather(*(self.loop(client) for _ in range(self.concurrency)))


async def main_async(args: argparse.Namespace) -> int:
    log_dir = Path(tempfile.mkdtemp(prefix="sglctl-soak-"))
    procs: list[ManagedProcess] = []
    try:
        for _ in range(args.workers):
            procs.append(spawn_sim_worker(log_dir, "--speedup", str(args.speedup)))
        router = spawn_router(
            log_dir,
            [p.url for p in procs],
            "--metrics-port",
            str(find_free_port()),
            "--log-level",
            "warning",
        )
        procs.append(router)
        soak = Soak(router.url, args.concurrency, args.seed)
        runner = asyncio.create_task(soak.run())
        samples: list[tuple[float, float]] = []
        start = time.monotonic()
        warm_rss = None
        columns = (
            TextColumn("[bold]soak"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("soak", total=args.duration, info="")
            while (elapsed := time.monotonic() - start) < args.duration:
                if runner.done():
                    break
                rss = rss_mb(router)
                samples.append((elapsed, rss))
                if warm_rss is None and elapsed >= args.warmup:
                    warm_rss = rss
                progress.update(
                    task,
                    completed=elapsed,
                    info=f"{soak.count} requests, router RSS {rss:.1f} MiB",
                )
                await asyncio.sleep(1.0)
            progress.update(task, completed=args.duration)
        soak.stop.set()
        await runner
        duration = time.monotonic() - start
        # Let cancelled upstream requests settle, then read the router's own counters.
        async with httpx.AsyncClient(base_url=router.url, timeout=10, trust_env=False) as client:
            deadline = time.monotonic() + 10
            loads: list[int] = []
            while time.monotonic() < deadline:
                workers = (await client.get("/workers")).json()["workers"]
                loads = [int(w["load"]) for w in workers]
                if not any(loads):
                    break
                await asyncio.sleep(0.1)
        end_rss = rss_mb(router)
        alive = router.alive()
    finally:
        for proc in reversed(procs):
            proc.stop()
        if not args.keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)

    warm_rss = warm_rss if warm_rss is not None else samples[0][1]
    late = [rss for t, rss in samples if t >= duration * 0.8]
    table = Table(
        title=f"soak: {duration:.0f}s, concurrency {args.concurrency}, {args.workers} workers"
    )
    table.add_column("kind")
    table.add_column("outcome")
    table.add_column("count", justify="right")
    for (kind, outcome), count in sorted(soak.outcomes.items()):
        table.add_row(kind, outcome, str(count))
    console.print(table)
    unexpected = sum(
        c
        for (kind, outcome), c in soak.outcomes.items()
        if not (
            (kind in ("generate", "stream", "chat", "disconnect") and outcome == "200")
            or (kind == "malformed" and outcome == "400")
        )
    )
    console.print(f"requests: {soak.count} ({soak.count / duration:.0f}/s)")
    console.print(f"unexpected outcomes: {unexpected}")
    for line in soak.unexpected[:10]:
        console.print(f"  {line}")
    console.print(
        f"router RSS: start {samples[0][1]:.1f} MiB, after {args.warmup:.0f}s warm-up "
        f"{warm_rss:.1f} MiB, end {end_rss:.1f} MiB "
        f"(growth after warm-up {end_rss - warm_rss:+.1f} MiB, "
        f"{(end_rss / warm_rss - 1) * 100:+.1f}%; "
        f"median of the last 20% {statistics.median(late):.1f} MiB)"
    )
    # The curve tells a leak (keeps climbing) from a pool or cache filling up (levels off).
    marks = [duration * k / 6 for k in range(1, 7)]
    curve = [next((rss for t, rss in samples if t >= m - 1), samples[-1][1]) for m in marks]
    console.print(
        "router RSS over the run: "
        + ", ".join(f"{m:.0f}s {rss:.1f}" for m, rss in zip(marks, curve, strict=True))
        + " MiB"
    )
    console.print(f"in-flight load left on workers after the run: {loads} (must be all 0)")
    console.print(f"router alive at the end: {alive}")
    return 0 if alive and unexpected == 0 and not any(loads) else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    parser.add_argument(
        "--warmup", type=float, default=20.0, help="seconds before the 'before' RSS"
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--speedup", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    if args.duration > 900 or args.concurrency > 64:
        parser.error("keep the soak bounded: --duration <= 900, --concurrency <= 64")
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
