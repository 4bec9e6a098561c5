"""Sim worker calibration and cost: does it keep H100-like time, and is it cheap to run?

Not a test: it prints figures for ``benchmarks/RESULTS.md``. Everything runs on 127.0.0.1
against sim workers this script starts and stops.

1. **Timing** (one worker, ``--speedup`` S; figures are simulated seconds = wall x S):
   single-stream decode rate against the 144 tokens/s of the real SGLang log the model was
   calibrated on; time to first token of cold prompts of several sizes against the same prompt
   with a cached prefix (ratio); aggregate decode throughput at batch sizes 1..128 as a ratio
   of batch 1 (continuous batching should give a large, sub-linear gain).
2. **Cost** (one worker at ``--speedup 20``, bounded closed-loop client): worker CPU
   milliseconds a request for ``/generate`` non-streamed and streamed, against a ``/health``
   request as the baseline (the HTTP floor). Eight workers, a router and a load generator share
   two cores in the benchmarks, so this is the number that matters.

    .venv/bin/python benchmarks/sim_calibration.py [--speedup 1]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sglctl.sim.tokenizer import text_for_tokens
from sglctl.spawn import ManagedProcess, spawn_sim_worker

console = Console()
REAL_SINGLE_STREAM_TOK_S = 144.0  # SGLang docs notebook log, Llama-3.1-8B, 80 GB GPU


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


async def ttft_and_total(client: httpx.AsyncClient, text: str, max_new: int) -> tuple[float, float]:
    """Wall seconds to the first streamed chunk and to the end of the stream."""
    payload = {"text": text, "sampling_params": {"max_new_tokens": max_new}, "stream": True}
    start = time.perf_counter()
    first = None
    async with client.stream("POST", "/generate", json=payload) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: "):
                first = time.perf_counter() - start
    assert first is not None
    return first, time.perf_counter() - start


async def timing_part(log_dir: Path, speedup: float) -> None:
    worker = spawn_sim_worker(log_dir, "--speedup", str(speedup), name="sim-timing")
    s = speedup
    try:
        limits = httpx.Limits(max_connections=256)  # above the largest batch
        async with httpx.AsyncClient(base_url=worker.url, timeout=600, limits=limits) as client:
            with progress() as bar:
                task = bar.add_task("timing", total=3 + 2 * 3 + 5)
                rates = []
                for i in range(3):
                    ttft, total = await ttft_and_total(client, f"decode run {i}", 257)
                    rates.append(256 / ((total - ttft) * s))
                    bar.advance(task)
                table = Table(title=f"Sim timing (simulated seconds; run at --speedup {s:g})")
                for col in ("measure", "sim", "reference", "ratio"):
                    table.add_column(col, justify="right")
                rate = statistics.median(rates)
                table.add_row(
                    "single-stream decode, tok/s",
                    f"{rate:.0f}",
                    f"{REAL_SINGLE_STREAM_TOK_S:.0f} (real SGLang log)",
                    f"{rate / REAL_SINGLE_STREAM_TOK_S:.2f}",
                )
                for size in (1_000, 8_000, 32_000):
                    prefix = text_for_tokens(size, seed=f"cal-{size}")
                    cold, _ = await ttft_and_total(client, prefix + "tail-one", 1)
                    bar.advance(task)
                    warm, _ = await ttft_and_total(client, prefix + "tail-two", 1)
                    bar.advance(task)
                    table.add_row(
                        f"TTFT {size // 1000}k prompt: cold vs cached prefix, ms",
                        f"{cold * s * 1e3:.0f}",
                        f"{warm * s * 1e3:.1f} (cached)",
                        f"{cold / warm:.1f}x",
                    )
                base = None
                for batch in (1, 8, 32, 64, 128):
                    start = time.perf_counter()
                    await asyncio.gather(
                        *(
                            client.post(
                                "/generate",
                                json={
                                    "text": f"batch {batch} request {i}",
                                    "sampling_params": {"max_new_tokens": 128},
                                },
                            )
                            for i in range(batch)
                        )
                    )
                    tok_s = batch * 128 / ((time.perf_counter() - start) * s)
                    base = base or tok_s
                    table.add_row(
                        f"decode throughput, batch {batch}, tok/s",
                        f"{tok_s:.0f}",
                        "batch 1",
                        f"{tok_s / base:.1f}x",
                    )
                    bar.advance(task)
        console.print(table)
    finally:
        worker.stop()


async def closed_loop(client: httpx.AsyncClient, n: int, conc: int, make: object) -> None:
    sem = asyncio.Semaphore(conc)

    async def one(i: int) -> None:
        async with sem:
            await make(client, i)  # type: ignore[operator]

    await asyncio.gather(*(one(i) for i in range(n)))


async def do_health(client: httpx.AsyncClient, i: int) -> None:
    (await client.get("/health")).raise_for_status()


def gen_payload(i: int, stream: bool) -> dict[str, object]:
    text = text_for_tokens(2000, seed=i % 16) + text_for_tokens(64, seed=i)
    return {"text": text, "sampling_params": {"max_new_tokens": 256}, "stream": stream}


async def do_generate(client: httpx.AsyncClient, i: int) -> None:
    (await client.post("/generate", json=gen_payload(i, False))).raise_for_status()


async def do_stream(client: httpx.AsyncClient, i: int) -> None:
    async with client.stream("POST", "/generate", json=gen_payload(i, True)) as r:
        r.raise_for_status()
        async for _ in r.aiter_lines():
            pass


def cpu_seconds(proc: ManagedProcess) -> float:
    times = psutil.Process(proc.pid).cpu_times()
    return times.user + times.system


async def cost_part(log_dir: Path, n: int, conc: int) -> None:
    worker = spawn_sim_worker(log_dir, "--speedup", "20", name="sim-cost")
    rows = []
    try:
        limits = httpx.Limits(max_connections=conc)
        async with httpx.AsyncClient(base_url=worker.url, timeout=120, limits=limits) as client:
            with progress() as bar:
                task = bar.add_task("cost", total=3)
                for label, make in (
                    ("GET /health (baseline)", do_health),
                    ("/generate, 2k prompt, 256 out", do_generate),
                    ("/generate stream, same", do_stream),
                ):
                    cpu0, t0 = cpu_seconds(worker), time.perf_counter()
                    await closed_loop(client, n, conc, make)
                    wall = time.perf_counter() - t0
                    rows.append((label, (cpu_seconds(worker) - cpu0) / n * 1e3, n / wall))
                    bar.advance(task)
    finally:
        worker.stop()
    table = Table(title=f"Sim worker CPU cost ({n} requests, {conc} concurrent, --speedup 20)")
    for col in ("request", "worker CPU ms/request", "vs /health", "requests/s (client-bound)"):
        table.add_column(col, justify="right")
    base = rows[0][1]
    for label, cpu_ms, rate in rows:
        table.add_row(label, f"{cpu_ms:.2f}", f"{cpu_ms / base:.1f}x", f"{rate:.0f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speedup", type=float, default=1.0, help="speed-up of the timing part")
    parser.add_argument("--requests", type=int, default=400, help="requests a cost row")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sim-cal-") as tmp:
        asyncio.run(timing_part(Path(tmp), args.speedup))
        asyncio.run(cost_part(Path(tmp), args.requests, args.concurrency))


if __name__ == "__main__":
    main()
