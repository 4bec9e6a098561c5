#!/usr/bin/env python3
"""Routing quality and router overhead: sglctl's policies against the SGLang Router, same run.

What it does, in order:

1. Starts N sim workers with a finite KV cache (``--kv-cache-tokens``), a ``--speedup`` and a
   ``--stream-interval``.
2. Replays the same workload (by default the first requests of the Mooncake conversation
   trace, at its own timestamps divided by the speed-up) through, in turn: sglctl's router
   with each policy, and the SGLang Router from PyPI (``sglang-router``, in its own virtual
   environment, created here if missing) with ``cache_aware`` and ``round_robin``. The worker
   caches are flushed before each run, so every router starts cold.
3. Prints one table, a row per router and policy, plus the ideal hit ratio of exactly the
   requests replayed (one unlimited cache: no router can beat it).
4. Measures router overhead: tiny streaming requests straight to the workers, through
   sglctl and through the SGLang Router, at concurrency 1, 16 and 64, and prints the ratios.

Everything runs on 127.0.0.1 and every process started here is stopped at the end, also on
Ctrl-C. Figures: see the "Routing quality" section of benchmarks/RESULTS.md.

    python benchmarks/compare_routers.py --quick        # a couple of minutes
    python benchmarks/compare_routers.py                # the recorded full run (~10 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sglctl.bench.ideal import ideal_hit_ratio  # noqa: E402
from sglctl.bench.overhead import OverheadResult, measure  # noqa: E402
from sglctl.bench.report import (  # noqa: E402
    COMPARISON_COLUMNS,
    comparison_row,
    comparison_table,
    fmt_ms,
    markdown_table,
    result_dict,
    write_json,
)
from sglctl.bench.runner import BenchResult, RunConfig, run_workload  # noqa: E402
from sglctl.bench.textgen import PromptBuilder  # noqa: E402
from sglctl.bench.workload import Workload  # noqa: E402
from sglctl.bench.workloads import SharedPrefixConfig, shared_prefix_workload, trace_workload  # noqa: E402
from sglctl.net import find_free_port  # noqa: E402
from sglctl.spawn import ManagedProcess, spawn, spawn_router, spawn_sim_worker  # noqa: E402

log = logging.getLogger("compare_routers")
# Wide tables even when the output goes to a file or a pipe (rich assumes 80 columns then).
console = Console(width=None if sys.stdout.isatty() else 200)

DEFAULT_TRACE = REPO.parent / "shared" / "traces" / "conversation_trace.jsonl"
DEFAULT_SGLANG_VENV = REPO / "bench-out" / "sglang-router-venv"
SGLANG_ROUTER_PACKAGE = "sglang-router"
SGLCTL_POLICIES = (
    "cache_aware",
    "least_ttft",
    "round_robin",
    "random",
    "power_of_two",
    "shortest_queue",
)
SGLANG_POLICIES = ("cache_aware", "round_robin")
OVERHEAD_CONCURRENCY = (1, 16, 64)
# Closed-loop concurrency for a workload without timestamps (the fallback without the trace).
UNTIMED_CONCURRENCY = 32


@dataclass(frozen=True)
class Settings:
    """One profile (quick or full) after the command-line overrides."""

    workers: int
    max_requests: int
    speedup: float
    load_factor: float
    kv_cache_tokens: int
    stream_interval: int
    sglctl_policies: tuple[str, ...]
    sglang_policies: tuple[str, ...]
    overhead_requests: int
    overhead_workers: int
    sglang_defaults_row: bool

    @property
    def sim_speedup(self) -> float:
        """The sim workers' ``--speedup``: the trace runs ``load_factor`` times faster than it."""
        return self.speedup / self.load_factor


QUICK = Settings(
    workers=8,
    max_requests=300,
    speedup=10.0,
    load_factor=2.0,
    kv_cache_tokens=1_500_000,
    stream_interval=16,
    sglctl_policies=("cache_aware", "least_ttft", "round_robin"),
    sglang_policies=("cache_aware",),
    overhead_requests=300,
    overhead_workers=2,
    sglang_defaults_row=False,
)
FULL = Settings(
    workers=8,
    max_requests=1000,
    speedup=6.0,
    load_factor=2.0,
    kv_cache_tokens=1_500_000,
    stream_interval=16,
    sglctl_policies=SGLCTL_POLICIES,
    sglang_policies=SGLANG_POLICIES,
    overhead_requests=1500,
    overhead_workers=2,
    sglang_defaults_row=True,
)
# SGLang Router 0.3.2's cache-aware defaults (sglctl's own defaults are the documented ones:
# --cache-threshold 0.5 --balance-abs-threshold 32 --balance-rel-threshold 1.0001
# --max-tree-size 16777216); the extra row tells the implementation from the defaults.
SGLANG_032_CACHE_AWARE_FLAGS = (
    "--cache-threshold",
    "0.3",
    "--balance-abs-threshold",
    "64",
    "--balance-rel-threshold",
    "1.5",
    "--max-tree-size",
    "67108864",
)


@dataclass(frozen=True)
class RouterSpec:
    kind: str  # "sglctl" or "sglang"
    policy: str
    flags: tuple[str, ...] = ()
    note: str = ""

    @property
    def label(self) -> str:
        name = f"{'sglctl' if self.kind == 'sglctl' else 'SGLang Router'} {self.policy}"
        return f"{name} ({self.note})" if self.note else name


# --- the SGLang Router's virtual environment --------------------------------------------


def sglang_router_python(venv: Path, create: bool) -> Path | None:
    """The venv's python with ``sglang_router`` importable, creating the venv if allowed.

    Returns None (after saying why) when it cannot be had: the rest of the comparison runs.
    """
    python = venv / "bin" / "python"
    if python.exists() and _imports_sglang_router(python):
        return python
    if not create:
        console.print(f"[yellow]no sglang_router in {venv}; skipping the SGLang Router rows")
        return None
    console.print(
        f"[bold]Installing {SGLANG_ROUTER_PACKAGE} from PyPI into {venv}[/] "
        "(once; point --sglang-venv at an existing one to skip this)"
    )
    try:
        if not python.exists():
            subprocess.run(
                [sys.executable, "-m", "venv", str(venv)],
                check=True,
                capture_output=True,
                text=True,
            )
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", SGLANG_ROUTER_PACKAGE],
            check=True,
            capture_output=True,
            text=True,
            timeout=900,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        console.print(
            f"[red]could not install {SGLANG_ROUTER_PACKAGE}:[/] {str(detail).strip()[-800:]}"
        )
        console.print("[yellow]continuing without the SGLang Router rows")
        return None
    if not _imports_sglang_router(python):
        console.print(
            f"[red]{SGLANG_ROUTER_PACKAGE} installed but `import sglang_router` fails; skipping it"
        )
        return None
    return python


def _imports_sglang_router(python: Path) -> bool:
    probe = subprocess.run(
        [str(python), "-c", "import sglang_router.launch_router"], capture_output=True, timeout=60
    )
    return probe.returncode == 0


# --- processes --------------------------------------------------------------------------


def sglang_router_command(
    python: Path,
    port: int,
    worker_urls: Sequence[str],
    metrics_port: str,
    policy: str = "cache_aware",
    extra: Sequence[str] = (),
) -> list[str]:
    """The SGLang Router's command line as every benchmark starts it: its defaults but the policy.

    One place, so that every comparison in RESULTS.md runs the same anchor.
    """
    return [
        str(python), "-m", "sglang_router.launch_router",
        "--host", "127.0.0.1", "--port", str(port),
        "--worker-urls", *worker_urls,
        "--policy", policy,
        "--prometheus-port", metrics_port,
        "--log-level", "warn",
        *extra,
    ]  # fmt: skip


def spawn_sglang_router(
    name: str,
    python: Path,
    worker_urls: Sequence[str],
    log_dir: Path,
    *,
    metrics_port: str | None = None,
    port: int | None = None,
    policy: str = "cache_aware",
    extra: Sequence[str] = (),
    prefix: Sequence[str] = (),
) -> ManagedProcess:
    """Start the SGLang Router (``prefix``: e.g. ``taskset -c 1``) and wait for its liveness."""
    port = port or find_free_port()
    metrics_port = metrics_port or str(find_free_port())
    args = [*prefix, *sglang_router_command(python, port, worker_urls, metrics_port, policy, extra)]
    return spawn(
        name,
        args,
        url=f"http://127.0.0.1:{port}",
        log_dir=log_dir,
        health_path="/liveness",
        ready_timeout=60.0,
    )


def start_workers(log_dir: Path, count: int, *flags: str) -> list[ManagedProcess]:
    """Start ``count`` sim workers at once, then wait for all (start-up is mostly imports)."""
    procs = [spawn_sim_worker(log_dir, *flags, wait=False) for _ in range(count)]
    from sglctl.net import wait_for_http

    for proc in procs:
        if not wait_for_http(proc.url + "/health", 60.0, alive=proc.alive):
            tail = proc.log_tail()
            for p in procs:
                p.stop()
            raise RuntimeError(f"sim worker {proc.url} did not start:\n{tail}")
    return procs


def start_router(
    spec: RouterSpec, worker_urls: Sequence[str], log_dir: Path, sglang_python: Path | None
) -> ManagedProcess:
    """Start one router in front of ``worker_urls`` and wait until it routes to all of them."""
    metrics_port = str(find_free_port())
    if spec.kind == "sglctl":
        proc = spawn_router(
            log_dir,
            worker_urls,
            "--policy",
            spec.policy,
            "--metrics-port",
            metrics_port,
            "--log-level",
            "warning",
            *spec.flags,
            name=f"sglctl-{spec.policy}",
        )
    else:
        assert sglang_python is not None
        proc = spawn_sglang_router(
            f"sglang-{spec.policy}",
            sglang_python,
            worker_urls,
            log_dir,
            metrics_port=metrics_port,
            policy=spec.policy,
            extra=spec.flags,
        )
    try:
        wait_ready(proc, len(worker_urls))
    except Exception:
        proc.stop()
        raise
    return proc


def wait_ready(proc: ManagedProcess, workers: int, timeout: float = 60.0) -> None:
    """Poll ``/readiness`` (both routers have it) until every worker is routable."""
    deadline = time.monotonic() + timeout
    last = ""
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if not proc.alive():
                break
            try:
                resp = client.get(proc.url + "/readiness")
                last = resp.text[:300]
                if resp.status_code == 200:
                    body = resp.json()
                    healthy = body.get("healthy_workers", body.get("workers", {}).get("healthy"))
                    if healthy is None or int(healthy) >= workers:
                        return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
    raise RuntimeError(
        f"{proc.name} not ready with {workers} workers "
        f"(last /readiness: {last}):\n{proc.log_tail()}"
    )


def flush_caches(worker_urls: Sequence[str]) -> None:
    """Empty every worker's prefix cache so that each router starts cold."""
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        for url in worker_urls:
            resp = client.post(url + "/flush_cache")
            if resp.status_code != 200:
                raise RuntimeError(
                    f"flush_cache on {url} answered {resp.status_code}: {resp.text[:200]}"
                )


# --- the comparison ---------------------------------------------------------------------


def choose_workload(args: argparse.Namespace, settings: Settings) -> Workload:
    trace = Path(args.trace)
    if trace.exists():
        return trace_workload(trace, limit=settings.max_requests)
    console.print(f"[yellow]{trace} not found: using the shared-prefix workload instead")
    cfg = SharedPrefixConfig(
        num_groups=32, prompts_per_group=8, system_prompt_len=2048, question_len=128, output_len=64
    )
    return shared_prefix_workload(cfg).head(settings.max_requests)


def default_specs(settings: Settings, sglang_python: Path | None) -> list[RouterSpec]:
    """The routers ``settings`` asks for (SGLang's only when its venv is there)."""
    specs = [RouterSpec("sglctl", p) for p in settings.sglctl_policies]
    if settings.sglang_defaults_row and "cache_aware" in settings.sglctl_policies:
        specs.append(
            RouterSpec("sglctl", "cache_aware", SGLANG_032_CACHE_AWARE_FLAGS, "0.3.2 defaults")
        )
    if sglang_python is not None:
        specs += [RouterSpec("sglang", p) for p in settings.sglang_policies]
    return specs


def run_comparison(
    args: argparse.Namespace,
    settings: Settings,
    workload: Workload,
    sglang_python: Path | None,
    log_dir: Path,
    specs: Sequence[RouterSpec] | None = None,
) -> list[tuple[RouterSpec, BenchResult]]:
    """Replay ``workload`` through each router (``specs``, or the ones ``settings`` names)."""
    if specs is None:
        specs = default_specs(settings, sglang_python)
    worker_flags = (
        "--kv-cache-tokens",
        str(settings.kv_cache_tokens),
        "--speedup",
        str(settings.sim_speedup),
        "--stream-interval",
        str(settings.stream_interval),
        "--log-level",
        "warning",
    )
    console.rule(
        f"Routing quality: {workload.name}, {len(workload.requests)} requests, "
        f"{settings.workers} sim workers"
    )
    workers = start_workers(log_dir, settings.workers, *worker_flags)
    urls = [w.url for w in workers]
    builder = PromptBuilder(max_blocks=8192)  # shared by the runs: texts are built once
    results: list[tuple[RouterSpec, BenchResult]] = []
    try:
        for spec in specs:
            flush_caches(urls)
            router = start_router(spec, urls, log_dir, sglang_python)
            try:
                config = RunConfig(
                    url=router.url,
                    mode="trace" if workload.timed else "concurrency",
                    concurrency=None if workload.timed else UNTIMED_CONCURRENCY,
                    speedup=settings.speedup,
                    worker_urls=urls,
                    label=spec.label,
                    duration=args.run_timeout,
                )
                result = asyncio.run(
                    run_workload(workload, config, console=console, builder=builder)
                )
            finally:
                router.stop()
            results.append((spec, result))
            s = result.summary
            console.print(
                f"  {spec.label}: hit {s.hit_ratio:.3f}, TTFT p50 {fmt_ms(s.ttft_p50)}, "
                f"max/mean {s.request_imbalance:.2f}, errors {s.errors}"
            )
    finally:
        for w in workers:
            w.stop()
    return results


def run_overhead(
    settings: Settings, sglang_python: Path | None, log_dir: Path
) -> list[OverheadResult]:
    console.rule(
        f"Router overhead: {settings.overhead_workers} sim workers at --speedup 1000, tiny requests"
    )
    workers = start_workers(
        log_dir, settings.overhead_workers, "--speedup", "1000", "--log-level", "warning"
    )
    urls = [w.url for w in workers]
    targets: list[tuple[str, RouterSpec | None]] = [
        ("direct", None),
        ("sglctl", RouterSpec("sglctl", "cache_aware")),
    ]
    if sglang_python is not None:
        targets.append(("SGLang Router", RouterSpec("sglang", "cache_aware")))
    out: list[OverheadResult] = []
    try:
        for name, spec in targets:
            router = start_router(spec, urls, log_dir, sglang_python) if spec else None
            try:
                for concurrency in OVERHEAD_CONCURRENCY:
                    target_urls = [router.url] if router else urls
                    res = asyncio.run(
                        measure(name, target_urls, concurrency, settings.overhead_requests)
                    )
                    out.append(res)
                    console.print(
                        f"  {name:14} c={concurrency:<3} {res.throughput:8.1f} req/s  "
                        f"p50 {fmt_ms(res.p50)}  errors {res.errors}"
                    )
            finally:
                if router:
                    router.stop()
    finally:
        for w in workers:
            w.stop()
    return out


# --- output -----------------------------------------------------------------------------


def overhead_rows(results: Sequence[OverheadResult]) -> list[list[str]]:
    by = {(r.target, r.concurrency): r for r in results}
    rows = []
    for r in results:
        direct = by.get(("direct", r.concurrency))
        sglang = by.get(("SGLang Router", r.concurrency))
        rows.append(
            [
                r.target,
                str(r.concurrency),
                f"{r.throughput:,.0f}",
                fmt_ms(r.p50),
                fmt_ms(r.p99),
                str(r.errors),
                f"{r.throughput / direct.throughput:.2f}x" if direct and direct.throughput else "-",
                f"{r.throughput / sglang.throughput:.2f}x" if sglang and sglang.throughput else "-",
            ]
        )
    return rows


OVERHEAD_HEADER = [
    "target",
    "concurrency",
    "req/s",
    "p50",
    "p99",
    "errors",
    "vs direct",
    "vs SGLang Router",
]


def targets_report(
    comparison: Sequence[tuple[RouterSpec, BenchResult]], overhead: Sequence[OverheadResult]
) -> list[tuple[str, str, bool | None]]:
    """The issue's targets, each with the measured figure and whether it is met (None: not run)."""
    by = {spec.label: res.summary for spec, res in comparison}
    ca = by.get("sglctl cache_aware")
    rr = by.get("sglctl round_robin")
    sg = by.get("SGLang Router cache_aware")
    checks: list[tuple[str, str, bool | None]] = []
    if ca is not None:
        checks.append(
            (
                "cache_aware hit ratio >= 90% of ideal",
                f"{ca.hit_ratio_of_ideal:.0%}",
                ca.hit_ratio_of_ideal >= 0.9,
            )
        )
        if sg is not None:
            checks.append(
                (
                    "cache_aware hit ratio > SGLang Router's",
                    f"{ca.hit_ratio:.4f} vs {sg.hit_ratio:.4f}",
                    ca.hit_ratio > sg.hit_ratio,
                )
            )
        checks.append(
            (
                "cache_aware max/mean load <= 1.25",
                f"{ca.request_imbalance:.2f}",
                ca.request_imbalance <= 1.25,
            )
        )
        if rr is not None:
            checks.append(
                (
                    "cache_aware TTFT p50 < round_robin's",
                    f"{fmt_ms(ca.ttft_p50)} vs {fmt_ms(rr.ttft_p50)}",
                    ca.ttft_p50 < rr.ttft_p50,
                )
            )
    ours = next((r for r in overhead if r.target == "sglctl" and r.concurrency == 64), None)
    theirs = next(
        (r for r in overhead if r.target == "SGLang Router" and r.concurrency == 64), None
    )
    if ours and theirs and theirs.throughput:
        ratio = ours.throughput / theirs.throughput
        checks.append(("throughput at c=64 >= 0.8x SGLang Router's", f"{ratio:.2f}x", ratio >= 0.8))
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="Short run (a couple of minutes).")
    parser.add_argument(
        "--trace", default=str(DEFAULT_TRACE), help="Mooncake trace to replay a prefix of."
    )
    parser.add_argument("--workers", type=int, help="Number of sim workers.")
    parser.add_argument(
        "--max-requests", type=int, help="Replay the first N requests of the trace."
    )
    parser.add_argument("--speedup", type=float, help="Trace time compression (wall clock).")
    parser.add_argument(
        "--load-factor",
        type=float,
        help="Replay the trace this many times faster than the sims' clock (sim --speedup is "
        "--speedup / --load-factor): 1 is the trace's own load.",
    )
    parser.add_argument(
        "--no-defaults-row", action="store_true", help="Skip sglctl with SGLang 0.3.2's defaults."
    )
    parser.add_argument("--kv-cache-tokens", type=int, help="KV cache of each sim worker (tokens).")
    parser.add_argument("--policies", help="Comma-separated sglctl policies to run.")
    parser.add_argument("--sglang-policies", help="Comma-separated SGLang Router policies to run.")
    parser.add_argument(
        "--sglang-venv", type=Path, default=DEFAULT_SGLANG_VENV, help="venv with sglang-router."
    )
    parser.add_argument(
        "--no-install", action="store_true", help="Never create the SGLang Router venv."
    )
    parser.add_argument("--no-sglang", action="store_true", help="Skip the SGLang Router.")
    parser.add_argument(
        "--skip-overhead", action="store_true", help="Skip the router-overhead part."
    )
    parser.add_argument(
        "--skip-routing", action="store_true", help="Skip the routing-quality part."
    )
    parser.add_argument("--overhead-requests", type=int, help="Requests per overhead measurement.")
    parser.add_argument(
        "--run-timeout", type=float, default=240.0, help="Cap on one router's run (s)."
    )
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench-out" / "compare_routers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    base = QUICK if args.quick else FULL
    settings = Settings(
        workers=args.workers or base.workers,
        max_requests=args.max_requests or base.max_requests,
        speedup=args.speedup or base.speedup,
        load_factor=args.load_factor or base.load_factor,
        kv_cache_tokens=args.kv_cache_tokens or base.kv_cache_tokens,
        stream_interval=base.stream_interval,
        sglctl_policies=tuple(args.policies.split(",")) if args.policies else base.sglctl_policies,
        sglang_policies=tuple(args.sglang_policies.split(","))
        if args.sglang_policies
        else base.sglang_policies,
        overhead_requests=args.overhead_requests or base.overhead_requests,
        overhead_workers=base.overhead_workers,
        sglang_defaults_row=base.sglang_defaults_row and not args.no_defaults_row,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = args.out_dir / "logs"
    if log_dir.exists():
        shutil.rmtree(log_dir)
    started = time.monotonic()
    sglang_python = (
        None
        if args.no_sglang
        else sglang_router_python(args.sglang_venv, create=not args.no_install)
    )

    comparison: list[tuple[RouterSpec, BenchResult]] = []
    workload: Workload | None = None
    if not args.skip_routing:
        workload = choose_workload(args, settings)
        comparison = run_comparison(args, settings, workload, sglang_python, log_dir)
    overhead = [] if args.skip_overhead else run_overhead(settings, sglang_python, log_dir)

    console.rule("Results")
    md: list[str] = []
    if workload is not None:
        ideal = ideal_hit_ratio(workload.requests)
        title = (
            f"{workload.name}: first {len(workload.requests)} requests, "
            f"{settings.workers} sim workers, "
            f"--kv-cache-tokens {settings.kv_cache_tokens}, "
            + (
                f"trace time / {settings.speedup:g}, sim --speedup {settings.sim_speedup:g} "
                f"(load x{settings.load_factor:g})"
                if workload.timed
                else f"closed loop at concurrency {UNTIMED_CONCURRENCY}, "
                f"sim --speedup {settings.sim_speedup:g}"
            )
        )
        console.print(
            comparison_table([(spec.label, res.summary) for spec, res in comparison], title)
        )
        console.print(
            f"ideal hit ratio of these requests (one unlimited cache): token-weighted "
            f"[bold]{ideal.token_weighted:.3f}[/], block-weighted {ideal.block_weighted:.3f}"
        )
        md.append(f"**{title}** (ideal hit ratio {ideal.token_weighted:.3f})\n")
        md.append(
            markdown_table(
                COMPARISON_COLUMNS,
                [comparison_row(spec.label, res.summary) for spec, res in comparison],
            )
        )
    if overhead:
        table = Table(
            title="Router overhead (tiny streaming requests, closed loop)", header_style="bold"
        )
        for name in OVERHEAD_HEADER:
            table.add_column(name, justify="left" if name == "target" else "right")
        for row in overhead_rows(overhead):
            table.add_row(*row)
        console.print(table)
        md.append("\n**Router overhead** (tiny streaming requests, closed loop)\n")
        md.append(markdown_table(OVERHEAD_HEADER, overhead_rows(overhead)))
    checks = targets_report(comparison, overhead)
    if checks:
        table = Table(title="Targets", header_style="bold")
        for name in ("target", "measured", "met"):
            table.add_column(name)
        for name, figure, met in checks:
            table.add_row(
                name, figure, "-" if met is None else ("[green]yes" if met else "[red]no")
            )
        console.print(table)
        md.append(
            "\n"
            + markdown_table(
                ["target", "measured", "met"], [[n, f, "yes" if m else "no"] for n, f, m in checks]
            )
        )
    elapsed = time.monotonic() - started
    console.print(f"total time {elapsed:.0f} s; logs and JSON in {args.out_dir}")
    write_json(
        args.out_dir / "compare_routers.json",
        {
            "settings": asdict(settings),
            "elapsed_secs": elapsed,
            "runs": [{"router": spec.label, **result_dict(res)} for spec, res in comparison],
            "overhead": [{**asdict(r), "throughput": r.throughput} for r in overhead],
            "targets": [{"target": n, "measured": f, "met": m} for n, f, m in checks],
        },
    )
    (args.out_dir / "compare_routers.md").write_text("\n".join(md) + "\n")
    ok = all(not math.isnan(res.summary.hit_ratio) for _, res in comparison)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
