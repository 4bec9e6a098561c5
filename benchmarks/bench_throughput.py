#!/usr/bin/env python3
"""Router throughput where the router is the bottleneck: sglctl against the SGLang Router.

The other benchmarks put sim workers and a Python client around the router, and those cost
more per request than the router itself, which hides it. Here everything around the router
is close to free:

- **upstreams**: ``--upstreams`` processes of ``benchmarks/upstream_stub.py`` (raw asyncio,
  pre-built answers: a small JSON body, or an SSE stream of 32 events for ``"stream":true``);
- **load**: ``wrk`` (C, one thread, keep-alive) with ``benchmarks/wrk/post.lua``, cycling
  through 1024 pre-formatted ``/generate`` bodies that share a long prefix;
- **routers**: sglctl and the SGLang Router 0.3.2 (PyPI wheel, its own venv), one after the
  other in front of the *same* upstreams, both with default flags (``cache_aware``) and
  warning-level logs; each point is preceded by a short unmeasured warm-up.

Per router, mode (whole answers / streamed) and concurrency (1, 64, 256) it reports req/s,
p50/p99 latency (wrk's latency distribution), the router's CPU per request (psutil CPU times
of the router's process tree before and after the run, user + system) and, for streams, per
relayed upstream event, and the ratios sglctl / SGLang Router. The "direct" rows are wrk
straight at one upstream: they show the upstream is not what limits the router rows.

CPU placement (``--placement``), on a machine with 2+ CPUs:

- ``pinned`` (default): the router under test alone on the last CPU (``taskset``), wrk and the
  upstreams on the others. Both routers get the same single core, so req/s compares work
  per request; the Rust router's runtime sizes its thread pool from the affinity mask.
- ``shared``: nothing pinned; the OS spreads everything over all CPUs (the SGLang Router may
  then use several cores while sglctl runs one process).

Other processes on the machine are not controlled: the load average is recorded with every
point (JSON) and printed, so a busy machine is visible next to its figures.

    python benchmarks/bench_throughput.py --quick      # about a minute
    python benchmarks/bench_throughput.py              # the recorded run (~9 minutes, 3 rounds)

Writes ``bench-out/bench_throughput/bench_throughput.{json,md}``; figures and the reading of
them: benchmarks/RESULTS.md, "Router throughput (router-bound)"; the CPU profile of sglctl
under this load: benchmarks/PROFILE.md (``benchmarks/profile_router.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from compare_routers import sglang_router_python, spawn_sglang_router, wait_ready  # noqa: E402
from upstream_stub import GENERATE_BODY, stream_events  # noqa: E402

from sglctl.net import find_free_port  # noqa: E402
from sglctl.spawn import ManagedProcess, spawn  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 200)

STUB = HERE / "upstream_stub.py"
LUA = HERE / "wrk" / "post.lua"
SHARED_SGLANG_VENV = Path("/work/sglang-router-venv")
LOCAL_SGLANG_VENV = REPO / "bench-out" / "sglang-router-venv"
CHUNKS = 32
DISTINCT_PROMPTS = 1024
ROUTERS = ("sglctl", "SGLang Router", "floor")
#: ``--floor``: the least any Python proxy costs here (benchmarks/floor_proxy.py).
FLOOR = HERE / "floor_proxy.py"
MODES = ("whole", "stream")


@dataclass(frozen=True)
class Settings:
    duration: float  # whole seconds (wrk's unit)
    warmup: float
    concurrencies: tuple[int, ...]
    rounds: int
    upstreams: int
    placement: str


QUICK = Settings(
    duration=2.0,
    warmup=1.0,
    concurrencies=(1, 64, 256),
    rounds=1,
    upstreams=4,
    placement="pinned",
)
FULL = Settings(
    duration=10.0,
    warmup=2.0,
    concurrencies=(1, 64, 256),
    rounds=3,
    upstreams=4,
    placement="pinned",
)


@dataclass
class Point:
    """One wrk run against one target."""

    target: str  # "sglctl", "SGLang Router", "floor" or "direct"
    mode: str  # "whole" or "stream"
    concurrency: int
    round: int
    requests: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    latency_us: dict[str, float] = field(default_factory=dict)
    cpu_secs: float | None = None  # router process tree, user + system, during the run
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.cpu_secs is None or not self.requests:
            return None
        return self.cpu_secs / self.requests * 1e6

    @property
    def cpu_us_per_chunk(self) -> float | None:
        per_request = self.cpu_us_per_request
        if per_request is None or self.mode != "stream":
            return None
        return per_request / CHUNKS

    @property
    def cpu_load(self) -> float | None:
        """Router CPU seconds per wall second: ~1.0 means its core was saturated."""
        if self.cpu_secs is None or not self.seconds:
            return None
        return self.cpu_secs / self.seconds

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


# --- tools and placement ------------------------------------------------------------------


def ensure_wrk() -> str:
    """Path of ``wrk``; installs Debian's package with apt-get when it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    console.print("[bold]wrk not found: installing Debian's package (apt-get install wrk)[/]")
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise SystemExit(
            "wrk is needed and could not be installed here (no apt-get, or not root): "
            "install it (Debian/Ubuntu: sudo apt-get install wrk) and run again"
        )
    for cmd in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "wrk"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-800:]}")
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("apt-get installed wrk but it is not on PATH")
    return found


@dataclass(frozen=True)
class Placement:
    """Which CPUs the router and the load side (wrk + upstreams) may run on."""

    name: str
    router_cpus: tuple[int, ...]
    load_cpus: tuple[int, ...]

    def prefix(self, cpus: tuple[int, ...]) -> list[str]:
        if self.name != "pinned":
            return []
        return ["taskset", "-c", ",".join(map(str, cpus))]

    def describe(self) -> str:
        if self.name != "pinned":
            return f"shared: nothing pinned, all on CPUs {_cpus(self.router_cpus)}"
        return (
            f"pinned: router on CPU {_cpus(self.router_cpus)}, "
            f"wrk + upstreams on CPU {_cpus(self.load_cpus)}"
        )


def _cpus(cpus: Sequence[int]) -> str:
    return ",".join(map(str, cpus))


def make_placement(name: str) -> Placement:
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    if name == "pinned" and len(cpus) >= 2 and shutil.which("taskset"):
        return Placement("pinned", cpus[-1:], cpus[:-1])
    if name == "pinned":
        console.print("[yellow]fewer than 2 CPUs or no taskset: running unpinned")
    return Placement("shared", cpus, cpus)


# --- processes ----------------------------------------------------------------------------


def start_upstreams(count: int, placement: Placement, log_dir: Path) -> list[ManagedProcess]:
    procs: list[ManagedProcess] = []
    try:
        for _ in range(count):
            port = find_free_port()
            args = [
                *placement.prefix(placement.load_cpus),
                sys.executable,
                str(STUB),
                "--port",
                str(port),
                "--chunks",
                str(CHUNKS),
            ]
            procs.append(
                spawn(f"upstream-{port}", args, url=f"http://127.0.0.1:{port}", log_dir=log_dir)
            )
    except Exception:
        for proc in procs:
            proc.stop()
        raise
    return procs


def start_router(
    target: str,
    upstream_urls: Sequence[str],
    placement: Placement,
    log_dir: Path,
    sglang_python: Path | None,
    router_processes: int | None = None,
) -> ManagedProcess:
    """One router, default flags (cache_aware), warning-level logs, pinned as placed;
    ``router_processes``: sglctl's ``--router-processes`` (None: its default)."""
    port = find_free_port()
    metrics_port = str(find_free_port())
    pin = placement.prefix(placement.router_cpus)
    if target == "SGLang Router":
        assert sglang_python is not None
        proc = spawn_sglang_router(
            "sglang-router",
            sglang_python,
            upstream_urls,
            log_dir,
            metrics_port=metrics_port,
            port=port,
            prefix=pin,
        )
    else:
        if target == "floor":
            args = [*pin, sys.executable, str(FLOOR), "--port", str(port)]
            args += ["--worker-urls", *upstream_urls]
        else:
            args = [*pin, sys.executable, "-m", "sglctl.router", "--host", "127.0.0.1"]
            args += ["--port", str(port), "--worker-urls", *upstream_urls]
            args += ["--metrics-port", metrics_port, "--log-level", "warning"]
            if router_processes is not None:
                args += ["--router-processes", str(router_processes)]
        proc = spawn(
            "floor-proxy" if target == "floor" else "sglctl",
            args,
            url=f"http://127.0.0.1:{port}",
            log_dir=log_dir,
            health_path="/liveness",
            ready_timeout=60.0,
        )
    try:
        wait_ready(proc, len(upstream_urls))
        check_relay(proc.url)
    except Exception:
        proc.stop()
        raise
    return proc


def check_relay(url: str) -> None:
    """One whole and one streamed request through the router, checked byte for byte.

    wrk counts only statuses; this makes sure that both routers really relay the answer
    (the whole body; all 32 events and ``[DONE]``) before their speed is compared.
    """
    body = {"text": "check", "sampling_params": {"max_new_tokens": 8}}
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        whole = client.post(url + "/generate", json=body)
        streamed = client.post(url + "/generate", json={**body, "stream": True})
    expected_events = [f"data: {e}" for e in stream_events(CHUNKS)]
    events = [line for line in streamed.text.split("\n") if line.startswith("data: ")]
    if whole.status_code != 200 or whole.content != GENERATE_BODY:
        raise RuntimeError(f"{url} relayed a wrong answer: {whole.status_code} {whole.text[:200]}")
    if streamed.status_code != 200 or events != expected_events:
        raise RuntimeError(
            f"{url} relayed a wrong stream: {streamed.status_code}, {len(events)} events "
            f"(expected {len(expected_events)}): {streamed.text[:200]}"
        )


def tree_cpu_secs(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


# --- wrk ----------------------------------------------------------------------------------


def run_wrk(
    wrk: str,
    url: str,
    mode: str,
    concurrency: int,
    duration: float,
    placement: Placement,
) -> dict[str, object]:
    """One wrk run; the JSON line the Lua script's ``done()`` prints."""
    args = [
        *placement.prefix(placement.load_cpus),
        wrk,
        "-t1",
        f"-c{concurrency}",
        f"-d{max(round(duration), 1)}s",  # wrk takes whole seconds
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
        "--",
        mode,
        str(DISTINCT_PROMPTS),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60)
    for line in done.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            parsed: dict[str, object] = json.loads(line[len("WRK_JSON ") :])
            return parsed
    raise RuntimeError(
        f"wrk gave no summary (exit {done.returncode}):\n{done.stdout[-800:]}{done.stderr[-800:]}"
    )


def measure(
    wrk: str,
    url: str,
    point: Point,
    settings: Settings,
    placement: Placement,
    router_pid: int | None,
) -> Point:
    """Warm up (unmeasured), then one measured wrk run with the router's CPU around it."""
    if settings.warmup > 0 and router_pid is not None:
        run_wrk(wrk, url, point.mode, point.concurrency, settings.warmup, placement)
    before = tree_cpu_secs(router_pid) if router_pid else None
    summary = run_wrk(wrk, url, point.mode, point.concurrency, settings.duration, placement)
    if router_pid and before is not None:
        point.cpu_secs = tree_cpu_secs(router_pid) - before
    point.requests = int(summary["requests"])  # type: ignore[call-overload]
    point.seconds = int(summary["duration_us"]) / 1e6  # type: ignore[call-overload]
    point.errors = {k: int(v) for k, v in summary["errors"].items() if v}  # type: ignore[attr-defined]
    point.latency_us = {k: float(v) for k, v in summary["latency_us"].items()}  # type: ignore[attr-defined]
    point.loadavg = os.getloadavg()
    return point


# --- the run ------------------------------------------------------------------------------


def plan(settings: Settings, targets: Sequence[str]) -> list[Point]:
    """Direct rows first, then the routers in turn, round after round (drift hits both)."""
    points = [Point("direct", mode, c, 1) for mode in MODES for c in settings.concurrencies]
    for rnd in range(1, settings.rounds + 1):
        for target in targets:
            points += [
                Point(target, mode, c, rnd) for mode in MODES for c in settings.concurrencies
            ]
    return points


def run(
    settings: Settings,
    placement: Placement,
    wrk: str,
    sglang_python: Path | None,
    log_dir: Path,
    floor: bool = False,
    router_processes: int | None = None,
) -> list[Point]:
    targets = [
        t
        for t in ROUTERS
        if t == "sglctl" or (t == "floor" and floor) or (t == "SGLang Router" and sglang_python)
    ]
    points = plan(settings, targets)
    upstreams = start_upstreams(settings.upstreams, placement, log_dir)
    urls = [u.url for u in upstreams]
    done: list[Point] = []
    progress = Progress(
        TextColumn("{task.description:<40}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    )
    try:
        with progress:
            task = progress.add_task("starting", total=len(points))
            i = 0
            while i < len(points):
                first = points[i]
                group = [
                    p for p in points[i:] if (p.target, p.round) == (first.target, first.round)
                ]
                i += len(group)
                router: ManagedProcess | None = None
                if first.target != "direct":
                    progress.update(task, description=f"starting {first.target}")
                    router = start_router(
                        first.target, urls, placement, log_dir, sglang_python, router_processes
                    )
                url = router.url if router else urls[0]
                try:
                    for point in group:
                        progress.update(
                            task,
                            description=f"{point.target} {point.mode} c={point.concurrency}"
                            + (f" r{point.round}" if settings.rounds > 1 else ""),
                        )
                        measure(
                            wrk, url, point, settings, placement, router.pid if router else None
                        )
                        done.append(point)
                        progress.advance(task)
                        progress.console.print(_line(point))
                finally:
                    if router is not None:
                        router.stop()
    finally:
        for upstream in upstreams:
            upstream.stop()
    return done


def _line(p: Point) -> str:
    cpu = p.cpu_us_per_request
    return (
        f"  {p.target:14} {p.mode:6} c={p.concurrency:<4} {p.rps:9,.0f} req/s  "
        f"p50 {_ms(p.latency_us.get('p50'))}  p99 {_ms(p.latency_us.get('p99'))}"
        + (f"  CPU {cpu:6.0f} us/req" if cpu is not None else "")
        + (f"  errors {p.errors}" if p.errors else "")
        + f"  load {p.loadavg[0]:.1f}"
    )


# --- report -------------------------------------------------------------------------------


def _ms(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us / 1000:.2f} ms" if us < 100_000 else f"{us / 1000:.0f} ms"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} us"


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or not theirs:
        return "-"
    return f"{ours / theirs:.2f}"


@dataclass
class Row:
    """The points of one (target, mode, concurrency), over the rounds.

    Its figures are those of its *best* round (most req/s): on a machine shared with other
    work, interference only ever slows a run down, so the fastest round is the one closest
    to what the router can do; every round's req/s is shown next to it.
    """

    target: str
    mode: str
    concurrency: int
    points: list[Point]

    @property
    def best(self) -> Point:
        return max(self.points, key=lambda p: p.rps)

    def value(self, attr: str) -> float | None:
        value: float | None = getattr(self.best, attr)
        return value

    def latency(self, key: str) -> float | None:
        return self.best.latency_us.get(key)


def rows(points: Sequence[Point]) -> list[Row]:
    out: dict[tuple[str, str, int], Row] = {}
    for p in points:
        key = (p.target, p.mode, p.concurrency)
        out.setdefault(key, Row(p.target, p.mode, p.concurrency, [])).points.append(p)
    order = {"direct": 0, "sglctl": 1, "SGLang Router": 2, "floor": 3}
    return sorted(out.values(), key=lambda r: (MODES.index(r.mode), r.concurrency, order[r.target]))


HEADER = [
    "mode",
    "conc.",
    "target",
    "req/s (best round)",
    "req/s each round",
    "p50",
    "p99",
    "router CPU/req",
    "CPU/chunk",
    "router core busy",
    "errors",
    "req/s vs SGLang",
    "p50 vs SGLang",
    "CPU/req vs SGLang",
]


def table_rows(all_rows: Sequence[Row]) -> list[list[str]]:
    by = {(r.target, r.mode, r.concurrency): r for r in all_rows}
    out = []
    for r in all_rows:
        theirs = by.get(("SGLang Router", r.mode, r.concurrency))
        compare = r.target == "sglctl" and theirs is not None
        busy = r.value("cpu_load")
        out.append(
            [
                r.mode,
                str(r.concurrency),
                r.target,
                f"{r.value('rps') or 0:,.0f}",
                " / ".join(f"{p.rps:,.0f}" for p in r.points),
                _ms(r.latency("p50")),
                _ms(r.latency("p99")),
                _us(r.value("cpu_us_per_request")),
                _us(r.value("cpu_us_per_chunk")) if r.mode == "stream" else "-",
                "-" if busy is None else f"{busy:.0%}",
                str(sum(p.error_count for p in r.points)),
                _ratio(r.value("rps"), theirs.value("rps")) if compare and theirs else "-",
                _ratio(r.latency("p50"), theirs.latency("p50")) if compare and theirs else "-",
                _ratio(r.value("cpu_us_per_request"), theirs.value("cpu_us_per_request"))
                if compare and theirs
                else "-",
            ]
        )
    return out


def added_p50(all_rows: Sequence[Row]) -> list[str]:
    """Added p50 at one connection (router p50 minus direct p50), per mode and router."""
    by = {(r.target, r.mode, r.concurrency): r for r in all_rows}
    lines = []
    for mode in MODES:
        direct = by.get(("direct", mode, 1))
        if direct is None or direct.latency("p50") is None:
            continue
        base = direct.latency("p50") or 0.0
        parts = []
        for target in ROUTERS:
            row = by.get((target, mode, 1))
            p50 = row.latency("p50") if row else None
            if p50 is not None:
                parts.append(f"{target} +{(p50 - base) / 1000:.3f} ms")
        if parts:
            lines.append(f"added p50 at c=1, {mode}: " + ", ".join(parts))
    return lines


def load_side_warnings(all_rows: Sequence[Row]) -> list[str]:
    """Rows whose req/s came within half of the direct figure: the load side may limit them."""
    by = {(r.target, r.mode, r.concurrency): r for r in all_rows}
    out = []
    for r in all_rows:
        direct = by.get(("direct", r.mode, r.concurrency))
        rps, base = r.value("rps"), direct.value("rps") if direct else None
        if r.target != "direct" and rps and base and rps > 0.5 * base:
            out.append(
                f"WARNING {r.target} {r.mode} c={r.concurrency}: {rps:,.0f} req/s is more than "
                f"half of the direct {base:,.0f} req/s; wrk + upstreams may limit this row"
            )
    return out


def markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def report(points: Sequence[Point], settings: Settings, placement: Placement, out: Path) -> None:
    all_rows = rows(points)
    body = table_rows(all_rows)
    title = (
        f"Router-bound throughput: {settings.upstreams} stub upstreams, wrk -t1, "
        f"{settings.duration:g} s a point, {settings.rounds} round(s), {placement.describe()}"
    )
    table = Table(title=title, header_style="bold")
    for name in HEADER:
        table.add_column(name, justify="left" if name in ("mode", "target") else "right")
    for row in body:
        table.add_row(*row)
    console.print(table)
    extra = added_p50(all_rows) + load_side_warnings(all_rows)
    loads = [p.loadavg[0] for p in points]
    extra.append(
        f"load average (1 min) during the run: {min(loads):.1f}-{max(loads):.1f} "
        f"on {os.cpu_count()} CPUs (other processes on the machine are not controlled)"
    )
    for line in extra:
        console.print(line)
    (out / "bench_throughput.md").write_text(
        f"**{title}**\n\n"
        + markdown(HEADER, body)
        + "\n\n"
        + "\n".join(f"- {x}" for x in extra)
        + "\n"
    )
    payload = {
        "settings": asdict(settings),
        "placement": asdict(placement),
        "chunks_per_stream": CHUNKS,
        "cpu_count": os.cpu_count(),
        "points": [
            {
                **asdict(p),
                "rps": p.rps,
                "cpu_us_per_request": p.cpu_us_per_request,
                "cpu_us_per_chunk": p.cpu_us_per_chunk,
                "cpu_load": p.cpu_load,
            }
            for p in points
        ],
        "summary": extra,
    }
    (out / "bench_throughput.json").write_text(json.dumps(payload, indent=2) + "\n")
    console.print(f"JSON and markdown in {out}")


def report_from(path: Path, out: Path) -> int:
    """Rebuild the report of an earlier run from its JSON (same tables, same files)."""
    data = json.loads(path.read_text())
    names = {f.name for f in fields(Point)}
    points = []
    for item in data["points"]:
        kwargs = {k: v for k, v in item.items() if k in names}
        kwargs["loadavg"] = tuple(kwargs.get("loadavg", (0.0, 0.0, 0.0)))
        points.append(Point(**kwargs))
    settings = Settings(
        **{**data["settings"], "concurrencies": tuple(data["settings"]["concurrencies"])}
    )
    placement = Placement(
        data["placement"]["name"],
        tuple(data["placement"]["router_cpus"]),
        tuple(data["placement"]["load_cpus"]),
    )
    out.mkdir(parents=True, exist_ok=True)
    report(points, settings, placement, out)
    return 0


def default_sglang_venv() -> Path:
    """The shared wheel venv when this machine has one, else the benchmarks' own."""
    if (SHARED_SGLANG_VENV / "bin" / "python").exists():
        return SHARED_SGLANG_VENV
    return LOCAL_SGLANG_VENV


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="About a minute: short points.")
    parser.add_argument("--duration", type=float, help="Seconds a measured point.")
    parser.add_argument("--warmup", type=float, help="Unmeasured seconds before each point.")
    parser.add_argument("--rounds", type=int, help="Repeat the router sweep this many times.")
    parser.add_argument("--concurrency", help="Comma-separated wrk connection counts.")
    parser.add_argument("--upstreams", type=int, help="Number of stub upstream processes.")
    parser.add_argument(
        "--placement", choices=("pinned", "shared"), help="CPU placement (see above)."
    )
    parser.add_argument(
        "--sglang-venv", type=Path, default=None, help="venv with sglang-router installed."
    )
    parser.add_argument("--no-install", action="store_true", help="Never create that venv.")
    parser.add_argument("--no-sglang", action="store_true", help="Measure sglctl only.")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="Also measure benchmarks/floor_proxy.py: a minimal Python proxy, the floor.",
    )
    parser.add_argument(
        "--router-processes",
        type=int,
        default=None,
        metavar="N",
        help="sglctl's --router-processes (default: the router's own default). With N > 1 "
        "use --placement shared: pinned puts the router on one CPU.",
    )
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench-out" / "bench_throughput")
    parser.add_argument(
        "--report-from", type=Path, help="Print the tables of an earlier run's JSON (no run)."
    )
    args = parser.parse_args(argv)
    if args.report_from:
        return report_from(args.report_from, args.out_dir)
    base = QUICK if args.quick else FULL
    settings = Settings(
        duration=args.duration or base.duration,
        warmup=base.warmup if args.warmup is None else args.warmup,
        concurrencies=tuple(int(c) for c in args.concurrency.split(","))
        if args.concurrency
        else base.concurrencies,
        rounds=args.rounds or base.rounds,
        upstreams=args.upstreams or base.upstreams,
        placement=args.placement or base.placement,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = args.out_dir / "logs"
    if log_dir.exists():
        shutil.rmtree(log_dir)
    wrk = ensure_wrk()
    placement = make_placement(settings.placement)
    sglang_python = (
        None
        if args.no_sglang
        else sglang_router_python(
            args.sglang_venv or default_sglang_venv(), create=not args.no_install
        )
    )
    console.print(f"placement: {placement.describe()}; load average {os.getloadavg()[0]:.1f}")
    started = time.monotonic()
    points = run(
        settings,
        placement,
        wrk,
        sglang_python,
        log_dir,
        floor=args.floor,
        router_processes=args.router_processes,
    )
    report(points, settings, placement, args.out_dir)
    console.print(f"total time {time.monotonic() - started:.0f} s")
    return 0 if all(p.requests > 0 for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
