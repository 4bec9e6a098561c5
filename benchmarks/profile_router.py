#!/usr/bin/env python3
"""Where the sglctl router's CPU goes per request, under the router-bound wrk load.

Starts the same set-up as ``bench_throughput.py`` (stub upstreams and wrk on one CPU, the
router alone on another), samples the router with py-spy (``--nonblocking``, so the sampler
does not pause the router it measures) while wrk drives it, and sorts the samples into
buckets by the *leaf* frame's module (self time; C code such as orjson, httptools or uvloop's
socket calls counts for the Python frame that called it). Stdlib plumbing (asyncio helpers,
contextlib, typing ...) is charged to its nearest non-stdlib caller, so that e.g. an
``asynccontextmanager`` inside Starlette counts as Starlette. Samples are turned into µs per
request with the router's CPU per request measured in the same run (psutil).

    .venv/bin/pip install py-spy        # once, into the venv (not a project dependency)
    python benchmarks/profile_router.py                 # whole + streamed, 2 runs each
    python benchmarks/profile_router.py --duration 5 --runs 1

Writes ``bench-out/profile_router/`` (raw py-spy stacks, ``profile.json``, ``profile.md``);
the reading is in benchmarks/PROFILE.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_throughput as bt  # noqa: E402

# (bucket, substrings of a frame's "function (file:line)" text), first match wins.
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("uvicorn HTTP protocol (httptools_impl: parse, scope, send/receive)", ("uvicorn/",)),
    ("Starlette Request/headers objects", ("starlette/requests.py", "starlette/datastructures.py")),
    ("Starlette response writing", ("starlette/responses.py", "starlette/background.py")),
    ("Starlette routing (route match)", ("starlette/routing.py", "starlette/_utils.py")),
    (
        "Starlette app + middleware (errors, exceptions)",
        ("starlette/applications.py", "starlette/middleware/", "starlette/_exception_handler.py"),
    ),
    ("anyio (task groups, cancel scopes)", ("anyio/", "starlette/concurrency.py")),
    (
        "lean server path (fastpath, http_server protocol)",
        ("sglctl/router/fastpath.py", "sglctl/router/http_server.py"),
    ),
    ("routing decision (policy, tree)", ("sglctl/router/policies/", "sglctl/router/tree.py")),
    ("body read + JSON parse + checks", ("sglctl/router/request.py", "sglctl/router/admission.py")),
    ("inference handler (headers, disconnect watch)", ("sglctl/router/inference.py",)),
    (
        "forwarding (proxy, retry, load slot, breaker, in-flight)",
        (
            "sglctl/router/proxy.py",
            "sglctl/router/retry.py",
            "sglctl/router/workers.py",
            "sglctl/router/health.py",
            "sglctl/router/circuit_breaker.py",
        ),
    ),
    ("upstream client (sglctl/router/upstream*.py)", ("sglctl/router/upstream",)),
    (
        "metrics (prometheus_client, rolling stats)",
        ("sglctl/router/metrics.py", "prometheus_client/", "sglctl/router/stats.py"),
    ),
    ("logging", ("logging/",)),
    ("event loop (uvloop C: epoll, socket I/O, callbacks)", ("asyncio/runners.py", "uvloop/")),
)
# Frames charged to their caller (generic plumbing).
GENERIC = (
    "asyncio/",
    "contextlib.py",
    "functools.py",
    "typing.py",
    "enum.py",
    "abc.py",
    "<frozen",
    "collections/",
    "dataclasses.py",
    "threading.py",
    "reprlib.py",
    "weakref.py",
    "_weakrefset.py",
    "<string>",  # dataclass-generated __init__
    "sniffio/",
    "numpy/",  # only the prefix hasher uses numpy on the hot path
)
OTHER = "other"


@dataclass
class Profile:
    mode: str
    run: int
    requests: int
    seconds: float
    cpu_us_per_request: float
    samples: int
    buckets: dict[str, int]
    self_top: list[tuple[str, int]]
    inclusive_top: list[tuple[str, int]]


def parse_raw(path: Path) -> list[tuple[list[str], int]]:
    """py-spy ``--format raw``: ``frame;frame;...;leaf COUNT`` a line."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def bucket_of(frames: Sequence[str]) -> str:
    for frame in reversed(frames):
        if any(g in frame for g in GENERIC) and "asyncio/runners.py" not in frame:
            continue
        for name, needles in BUCKETS:
            if any(n in frame for n in needles):
                return name
        return OTHER
    return OTHER


def _func(frame: str) -> str:
    """``func (file:line)`` without the line number, so a function's lines add up."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})"


def analyse(stacks: list[tuple[list[str], int]]) -> tuple[Counter[str], Counter[str], Counter[str]]:
    buckets: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        buckets[bucket_of(frames)] += count
        self_time[_func(frames[-1])] += count
        for func in {_func(f) for f in frames}:
            inclusive[func] += count
    return buckets, self_time, inclusive


def profile_once(
    wrk: str,
    py_spy: str,
    url: str,
    pid: int,
    mode: str,
    run: int,
    concurrency: int,
    duration: int,
    rate: int,
    placement: bt.Placement,
    out: Path,
) -> Profile:
    bt.run_wrk(wrk, url, mode, concurrency, 2, placement)  # warm-up, unmeasured
    raw = out / f"{mode}-{run}.txt"
    spy = subprocess.Popen(
        [
            *placement.prefix(placement.load_cpus),
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(rate),
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(raw),
            "--duration",
            str(duration),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    before = bt.tree_cpu_secs(pid)
    summary = bt.run_wrk(wrk, url, mode, concurrency, duration, placement)
    cpu = bt.tree_cpu_secs(pid) - before
    _, err = spy.communicate(timeout=duration + 60)
    if spy.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed (exit {spy.returncode}): {err[-800:]}")
    requests = int(summary["requests"])  # type: ignore[call-overload]
    buckets, self_time, inclusive = analyse(parse_raw(raw))
    return Profile(
        mode=mode,
        run=run,
        requests=requests,
        seconds=int(summary["duration_us"]) / 1e6,  # type: ignore[call-overload]
        cpu_us_per_request=cpu / requests * 1e6 if requests else 0.0,
        samples=sum(buckets.values()),
        buckets=dict(buckets),
        self_top=self_time.most_common(30),
        inclusive_top=inclusive.most_common(40),
    )


def bucket_table(profiles: Sequence[Profile]) -> str:
    names = [name for name, _ in BUCKETS] + [OTHER]
    header = ["bucket"] + [
        f"{p.mode} run {p.run}: % / us per req ({p.cpu_us_per_request:.0f} us/req, "
        f"{p.requests / p.seconds:,.0f} req/s)"
        for p in profiles
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in sorted(
        names, key=lambda n: -sum(p.buckets.get(n, 0) / p.samples for p in profiles)
    ):
        cells = []
        for p in profiles:
            share = p.buckets.get(name, 0) / p.samples if p.samples else 0.0
            cells.append(f"{share:.1%} / {share * p.cpu_us_per_request:.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def top_table(profile: Profile, which: str, limit: int) -> str:
    items = profile.self_top if which == "self" else profile.inclusive_top
    lines = [f"| function ({which}) | % | us per req |", "|---|---:|---:|"]
    for func, count in items[:limit]:
        share = count / profile.samples
        lines.append(f"| `{func}` | {share:.1%} | {share * profile.cpu_us_per_request:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=8, help="Seconds a profiled run.")
    parser.add_argument("--runs", type=int, default=2, help="Profiled runs per mode.")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples a second.")
    parser.add_argument("--modes", default="whole,stream")
    parser.add_argument("--out-dir", type=Path, default=bt.REPO / "bench-out" / "profile_router")
    parser.add_argument(
        "--reanalyse",
        action="store_true",
        help="Only re-sort the raw stacks of an earlier run in --out-dir (no new run).",
    )
    args = parser.parse_args(argv)
    if args.reanalyse:
        write_report(reanalyse(args.out_dir), "re-analysed from " + str(args.out_dir), args.out_dir)
        return 0
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy is needed: .venv/bin/pip install py-spy")
    wrk = bt.ensure_wrk()
    placement = bt.make_placement("pinned")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = args.out_dir / "logs"
    upstreams = bt.start_upstreams(4, placement, log_dir)
    profiles: list[Profile] = []
    try:
        router = bt.start_router("sglctl", [u.url for u in upstreams], placement, log_dir, None)
        try:
            for mode in args.modes.split(","):
                for run in range(1, args.runs + 1):
                    p = profile_once(
                        wrk,
                        py_spy,
                        router.url,
                        router.pid,
                        mode,
                        run,
                        args.concurrency,
                        args.duration,
                        args.rate,
                        placement,
                        args.out_dir,
                    )
                    profiles.append(p)
                    bt.console.print(
                        f"{mode} run {run}: {p.requests / p.seconds:,.0f} req/s, "
                        f"{p.cpu_us_per_request:.0f} us CPU/req, {p.samples} samples"
                    )
        finally:
            router.stop()
    finally:
        for upstream in upstreams:
            upstream.stop()
    write_report(
        profiles,
        f"wrk -t1 -c{args.concurrency}, {args.duration} s a run, py-spy --rate {args.rate} "
        f"--nonblocking; {placement.describe()}",
        args.out_dir,
    )
    return 0


def reanalyse(out: Path) -> list[Profile]:
    """The profiles of ``out/profile.json`` with buckets recomputed from the raw stacks."""
    profiles = []
    for item in json.loads((out / "profile.json").read_text()):
        buckets, self_time, inclusive = analyse(
            parse_raw(out / f"{item['mode']}-{item['run']}.txt")
        )
        item.update(
            samples=sum(buckets.values()),
            buckets=dict(buckets),
            self_top=self_time.most_common(30),
            inclusive_top=inclusive.most_common(40),
        )
        profiles.append(Profile(**item))
    return profiles


def write_report(profiles: Sequence[Profile], caption: str, out: Path) -> None:
    md = [caption + "\n", bucket_table(profiles)]
    for p in profiles:
        if p.run == 1:
            md += [f"\n**{p.mode}: self time**\n", top_table(p, "self", 25)]
            md += [f"\n**{p.mode}: inclusive**\n", top_table(p, "inclusive", 35)]
    (out / "profile.md").write_text("\n".join(md) + "\n")
    (out / "profile.json").write_text(json.dumps([p.__dict__ for p in profiles], indent=2) + "\n")
    bt.console.print("\n".join(md[:2]))
    bt.console.print(f"written to {out}")


if __name__ == "__main__":
    sys.exit(main())
