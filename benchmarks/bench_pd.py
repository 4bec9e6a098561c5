#!/usr/bin/env python3
"""PD disaggregation vs regular serving: the same trace replay at the same number of GPUs.

Four simulated GPUs, three layouts, each behind a real ``sglctl router``:

* **regular** -- 4 ordinary sim workers, ``--policy cache_aware``;
* **PD 2+2** -- 2 prefill + 2 decode sim workers (``--mode pd``: prefill cache-aware over the
  prefill pool, decode power-of-two), KV handed over through the sim's bootstrap channel;
* **PD 1+3** -- 1 prefill + 3 decode workers;
* **PD 3+1** -- only with ``--only "PD 3+1"``: the prefill-heavy split.

The workload is the head of the Mooncake conversation trace
(``/work/shared/traces/conversation_trace.jsonl``: real chat traffic, ~14k-token prompts with
shared prefixes, ~360 output tokens) replayed open loop at its own arrival times. Workers,
the KV transfer model (``sglctl/sim/transfer.py`` defaults: Llama-3.1-8B BF16, 128 KiB a
token, one 400 Gb/s link, 1 ms a transfer) and the arrivals all run ``--speedup`` times faster
than real time, and every figure is reported back in simulated (GPU) seconds, i.e. multiplied
by the speed-up; so router and client overheads are magnified by it too (a 1 ms Python cost
reads as ``speedup`` ms) -- the comparison between layouts is what matters.

Reported per layout: TTFT p50/p99, inter-token latency p50/p99 (per request,
``(latency - TTFT) / (output tokens - 1)``: the mean gap between its tokens), output tokens/s
(simulated), errors.

Everything runs on 127.0.0.1, bounded in count and time; every process is stopped at the end
(also on Ctrl-C).

    python benchmarks/bench_pd.py            # 240 requests a layout (~3-4 minutes)
    python benchmarks/bench_pd.py --quick    # 100 requests a layout (~1-2 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sglctl.bench.runner import RunConfig, run_workload
from sglctl.bench.stats import RequestResult, percentile
from sglctl.bench.workloads.trace import trace_workload
from sglctl.net import find_free_port
from sglctl.spawn import ManagedProcess, spawn_router, spawn_sim_worker

console = Console(width=130)
TRACE = Path("/work/shared/traces/conversation_trace.jsonl")
LAYOUTS = (("regular 4", 0, 0), ("PD 2+2", 2, 2), ("PD 1+3", 1, 3))
#: Run only when named with ``--only``: the prefill-heavy split this trace calls for.
EXTRA_LAYOUTS = (("PD 3+1", 3, 1),)


@dataclasses.dataclass
class Row:
    name: str
    requests: int
    errors: int
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    output_tps: float
    duration: float


def _itl(result: RequestResult) -> float | None:
    if not result.ok or result.ttft is None or result.latency is None:
        return None
    if result.output_tokens < 2:
        return None
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def metrics_port() -> tuple[str, str]:
    return ("--metrics-port", str(find_free_port()))


def start_layout(
    log_dir: Path, prefill: int, decode: int, speedup: float, stream_interval: int
) -> tuple[list[ManagedProcess], ManagedProcess]:
    common = ("--speedup", str(speedup), "--stream-interval", str(stream_interval))
    procs: list[ManagedProcess] = []
    try:
        if prefill == 0:
            workers = [spawn_sim_worker(log_dir, *common) for _ in range(4)]
            procs += workers
            router = spawn_router(
                log_dir, [w.url for w in workers], "--policy", "cache_aware", *metrics_port()
            )
        else:
            flags = ["--pd-disaggregation"]
            for _ in range(prefill):
                port = find_free_port()
                w = spawn_sim_worker(
                    log_dir, *common, "--disaggregation-mode", "prefill",
                    "--disaggregation-bootstrap-port", str(port),
                )  # fmt: skip
                procs.append(w)
                flags += ["--prefill", w.url, str(port)]
            for _ in range(decode):
                w = spawn_sim_worker(log_dir, *common, "--disaggregation-mode", "decode")
                procs.append(w)
                flags += ["--decode", w.url]
            router = spawn_router(log_dir, [], *flags, *metrics_port())
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs, router


async def run_layout(
    name: str, prefill: int, decode: int, args: argparse.Namespace, log_dir: Path
) -> Row:
    procs, router = start_layout(log_dir, prefill, decode, args.speedup, args.stream_interval)
    try:
        workload = trace_workload(TRACE, limit=args.requests)
        config = RunConfig(
            url=router.url,
            mode="trace",
            speedup=args.speedup,
            request_timeout=300.0,
            drain_timeout=120.0,
            progress=False,
            label=name,
        )
        result = await run_workload(workload, config, console=console)
    finally:
        router.stop()
        for p in procs:
            p.stop()
    s = args.speedup
    ok = [r for r in result.results if r.ok]
    ttfts = [r.ttft * s for r in ok if r.ttft is not None]
    itls = [x * s for x in (_itl(r) for r in ok) if x is not None]
    summary = result.summary
    return Row(
        name,
        summary.requests,
        summary.errors + summary.cancelled,
        percentile(ttfts, 50) if ttfts else float("nan"),
        percentile(ttfts, 99) if ttfts else float("nan"),
        percentile(itls, 50) if itls else float("nan"),
        percentile(itls, 99) if itls else float("nan"),
        summary.output_throughput / s,
        summary.duration * s,
    )


def show(rows: Sequence[Row], args: argparse.Namespace) -> None:
    table = Table(
        title=f"{args.requests} trace requests a layout, --speedup {args.speedup:g} "
        "(figures in simulated seconds)"
    )
    for col in (
        "layout", "requests", "errors", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
        "ITL p99 ms", "output tok/s", "span s",
    ):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r.name, str(r.requests), str(r.errors), f"{r.ttft_p50 * 1e3:.0f}",
            f"{r.ttft_p99 * 1e3:.0f}", f"{r.itl_p50 * 1e3:.1f}", f"{r.itl_p99 * 1e3:.1f}",
            f"{r.output_tps:.0f}", f"{r.duration:.0f}",
        )  # fmt: skip
    console.print(table)
    console.print("markdown:")
    print("| layout | requests | errors | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
          "| output tok/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.name} | {r.requests} | {r.errors} | {r.ttft_p50 * 1e3:.0f} | "
            f"{r.ttft_p99 * 1e3:.0f} | {r.itl_p50 * 1e3:.1f} | {r.itl_p99 * 1e3:.1f} | "
            f"{r.output_tps:.0f} |"
        )


async def main(args: argparse.Namespace) -> int:
    if not TRACE.exists():
        console.print(f"[red]trace {TRACE} not found[/red]")
        return 2
    console.print(f"load average: {os.getloadavg()} on {os.cpu_count()} cores")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pd-") as tmp:
        for name, prefill, decode in (*LAYOUTS, *EXTRA_LAYOUTS):
            if (args.only and name not in args.only) or (
                not args.only and (name, prefill, decode) in EXTRA_LAYOUTS
            ):
                continue
            console.print(f"[bold]{name}[/bold] ...")
            rows.append(await run_layout(name, prefill, decode, args, Path(tmp) / name))
            console.print(rows[-1])
    show(rows, args)
    console.print(f"load average after: {os.getloadavg()}")
    return 0


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="100 requests a layout")
    p.add_argument("--requests", type=int, default=None, help="trace requests a layout")
    p.add_argument("--speedup", type=float, default=4.0, help="simulated time speed-up")
    p.add_argument(
        "--stream-interval", type=int, default=8, help="tokens per streamed chunk (CPU bound)"
    )
    p.add_argument(
        "--only", nargs="*", default=[], help="layout names to run (default: all but PD 3+1)"
    )
    args = p.parse_args(argv)
    if args.requests is None:
        args.requests = 100 if args.quick else 240
    return args


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
    except KeyboardInterrupt:
        sys.exit(130)
