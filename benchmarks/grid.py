#!/usr/bin/env python3
"""Issue 14's evaluation grid: trace x slice x KV cache x load, every router in the same run.

Each point starts 8 sim workers with that KV cache per worker, replays a slice of a trace
(the whole trace or ``--slice`` requests from its middle) at ``--load`` times the trace's own
rate, and runs it through, in turn (caches flushed between routers, so each starts cold):

* sglctl ``least_ttft``;
* sglctl ``cache_aware``, without and with the workers' corrections
  (``--cached-tokens-correction --worker-load-correction``);
* sglctl ``cache_aware --placement tree`` (a miss goes to the smallest tree, the SGLang
  Router's documented rule, instead of the default: the least loaded worker, which is what
  the SGLang Router 0.3.x does);
* sglctl ``round_robin``;
* the SGLang Router's ``cache_aware`` (its venv: ``--sglang-venv``).

Besides the routers' rows, each point gets the hit-ratio bound of its cache size: one LRU
cache as big as all the workers' caches together (workers x KV tokens) over the same
requests, leaves evicted first (as SGLang's radix cache does), the share of that bound's
hits that fall on prefixes shared across conversations (continued two or more ways), and
what 8 *separate* LRU caches reach under an oracle cache-aware router (exact knowledge of
every cache, load ignored): whether the 95%-of-bound target is reachable at all. Per point
it prints a table with the issue's metrics, and at the end a verdict per target and point
for each sglctl row against the SGLang Router's ``cache_aware`` of the same point:

* TTFT p99 <= 0.75x the SGLang Router's; TTFT p50 and end-to-end p50 no worse;
* hit ratio >= the SGLang Router's - 0.005, and >= 95% of the one-big-LRU bound;
* max/mean requests per worker <= 1.25.

    python benchmarks/grid.py --quick                      # 2 points, a few minutes
    python benchmarks/grid.py --sglang-venv /work/sglang-router-venv \\
        --point conversation:444000:1 --point conversation:444000:3 --plot

Points default to both traces x ``--kv`` x ``--load``; ``--point TRACE:KV:LOAD`` adds one
(TRACE: ``conversation`` or ``synthetic``, a file name in ``--traces-dir``, or a path).
Everything runs on 127.0.0.1; every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import compare_routers as cr  # noqa: E402

from sglctl.bench.ideal import ideal_hit_ratio  # noqa: E402
from sglctl.bench.report import COMPARISON_COLUMNS, comparison_row, markdown_table  # noqa: E402
from sglctl.bench.stats import Summary as BenchSummary  # noqa: E402
from sglctl.bench.stats import percentile  # noqa: E402
from sglctl.bench.workload import BenchRequest, Workload  # noqa: E402
from sglctl.bench.workloads import trace_workload  # noqa: E402
from sglctl.sim.timing import DEFAULT_CHUNKED_PREFILL_SIZE, TimingModel  # noqa: E402

# ../shared/traces from the main checkout; from a worktree under wt/ it is one level further up.
TRACES_DIR = next(
    (
        d
        for d in (REPO.parent / "shared" / "traces", REPO.parent.parent / "shared" / "traces")
        if d.is_dir()
    ),
    REPO.parent / "shared" / "traces",
)
TRACE_NAMES = {"conversation": "conversation_trace.jsonl", "synthetic": "synthetic_trace.jsonl"}
CORRECTIONS = ("--cached-tokens-correction", "--worker-load-correction")
SGLANG_LABEL = "SGLang Router cache_aware"


@dataclass(frozen=True)
class Point:
    trace: str
    kv_tokens: int
    load: float

    @property
    def name(self) -> str:
        return f"{Path(self.trace).stem} KV {self.kv_tokens:,} load x{self.load:g}"


# --- workloads and the bound --------------------------------------------------------------


def middle_slice(workload: Workload, count: int | None) -> Workload:
    """``count`` requests from the middle of ``workload`` (all for None), arrivals from 0."""
    reqs = workload.requests
    if count is None or count >= len(reqs):
        return workload
    start = (len(reqs) - count) // 2
    kept = reqs[start : start + count]
    t0 = kept[0].arrival or 0.0
    out = tuple(
        replace(r, index=i, after=None, arrival=None if r.arrival is None else r.arrival - t0)
        for i, r in enumerate(kept)
    )
    return Workload(
        f"{workload.name}[{start}:{start + count}]",
        out,
        {**workload.params, "slice": [start, start + count]},
    )


class PrefixLRU:
    """One LRU prefix cache of ``capacity_tokens``, over requests' segment chains.

    The cache holds chains of segments (a node per segment under its parent, as a radix cache
    holds blocks). A request hits the leading segments it finds; then its whole chain is
    touched, its last segment first, so a parent is always used more recently than its
    children and eviction (least recently used first) takes leaves before their prefixes.
    Node ids come from ``ids``, which several caches may share (then a node is the same
    prefix in all of them).
    """

    def __init__(self, capacity_tokens: int, ids: dict[tuple[int, str], int]) -> None:
        self.capacity = capacity_tokens
        self.ids = ids
        self.held: OrderedDict[int, int] = OrderedDict()  # node -> tokens held, LRU first
        self.used = 0

    def chain(self, req: BenchRequest) -> list[tuple[int, int]]:
        """(node, tokens) of each segment of ``req``, its first segment first."""
        parent, out = 0, []
        for seg in req.segments:
            node = self.ids.setdefault((parent, seg.key), len(self.ids) + 1)
            out.append((node, seg.tokens))
            parent = node
        return out

    def hit_nodes(self, chain: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """The leading (node, tokens hit) this cache holds for ``chain`` (no side effects)."""
        out = []
        for node, tokens in chain:
            have = self.held.get(node, 0)
            if not have:
                break
            out.append((node, min(tokens, have)))
            if tokens > have:
                break
        return out

    def touch(self, chain: Sequence[tuple[int, int]]) -> None:
        """Hold and touch every node of ``chain``, then evict down to the capacity."""
        for node, tokens in reversed(chain):
            have = self.held.pop(node, 0)
            keep = max(have, tokens)
            self.used += keep - have
            self.held[node] = keep
        while self.used > self.capacity and self.held:
            _, tokens = self.held.popitem(last=False)
            self.used -= tokens


def lru_hit_ratio(requests: Iterable[BenchRequest], capacity_tokens: int) -> float:
    """Token-weighted hit ratio of one LRU prefix cache of ``capacity_tokens`` over ``requests``
    (:class:`PrefixLRU`): the issue's "one big LRU" bound with ``workers x KV`` tokens."""
    return lru_bound_parts(requests, capacity_tokens)[0]


def lru_bound_parts(requests: Iterable[BenchRequest], capacity_tokens: int) -> tuple[float, float]:
    """The one-big-LRU hit ratio and the share of its hit tokens on *shared* prefixes.

    A node is shared when requests went on from it along two or more different next
    segments (a system prompt or document that several conversations start with); a node
    only ever continued one way is one conversation's own history. Only a shared node's
    hits can depend on co-locating different conversations: separate caches each hold (and
    first miss) their own copy of it.
    """
    reqs = list(requests)
    ids: dict[tuple[int, str], int] = {}
    chains = [PrefixLRU(0, ids).chain(r) for r in reqs]
    branches: dict[int, set[int]] = {}
    for chain in chains:
        for (node, _), (child, _) in itertools.pairwise(chain):
            branches.setdefault(node, set()).add(child)
    cache = PrefixLRU(capacity_tokens, ids)
    hit = shared = total = 0
    for req, chain in zip(reqs, chains, strict=True):
        for node, tokens in cache.hit_nodes(chain):
            hit += tokens
            if len(branches.get(node, ())) > 1:
                shared += tokens
        total += req.input_tokens
        cache.touch(chain)
    return (hit / total if total else 0.0), (shared / hit if hit else 0.0)


def separate_lru_hit_ratio(
    requests: Iterable[BenchRequest],
    workers: int,
    capacity_tokens: int,
    threshold: float = 0.5,
) -> float:
    """Hit ratio of ``workers`` separate LRU caches of ``capacity_tokens`` each under an
    oracle cache-aware router: it knows every cache exactly and ignores load. A request goes
    to the cache holding its longest prefix when that covers more than ``threshold`` of it
    (cache_aware's rule), else to the cache that took the fewest prompt tokens so far
    (following a shared system prompt alone would put everything on one cache). What 8
    separate caches reach with cache-aware placement, against the one-big-LRU bound of the
    same total size."""
    ids: dict[tuple[int, str], int] = {}
    caches = [PrefixLRU(capacity_tokens, ids) for _ in range(workers)]
    sent = [0] * workers
    hit = total = 0
    for req in requests:
        chain = caches[0].chain(req)
        scores = [sum(t for _, t in c.hit_nodes(chain)) for c in caches]
        best = max(range(workers), key=lambda i: (scores[i], -sent[i]))
        if scores[best] <= threshold * req.input_tokens:
            best = min(range(workers), key=lambda i: (sent[i], -scores[i]))
        hit += scores[best]
        total += req.input_tokens
        sent[best] += req.input_tokens
        caches[best].touch(chain)
    return hit / total if total else 0.0


# --- targets ----------------------------------------------------------------------------


def ttft_floor_ms(
    requests: Iterable[BenchRequest],
    sim_speedup: float,
    timing: TimingModel | None = None,
    chunk: int = DEFAULT_CHUNKED_PREFILL_SIZE,
) -> list[float]:
    """Each request's TTFT if no router could do better: an idle worker holding every prefix
    any earlier request sent (an unlimited cache), its uncached tokens prefilled alone in
    ``chunk``-token batches by the sim's timing model at ``sim_speedup``, no queue, no network.

    Why: the TTFT p99 target (0.75x the SGLang Router's) is only worth chasing where this
    floor's p99 is under it. Long uncached prompts (30k+ tokens) take their own prefill time
    whatever the routing, and where they make the p99, no placement reaches the target.
    """
    model = replace(timing or TimingModel(), speedup=sim_speedup)
    seen = PrefixLRU(1 << 62, {})
    out = []
    for req in requests:
        chain = seen.chain(req)
        cached = min(sum(tokens for _, tokens in seen.hit_nodes(chain)), req.input_tokens - 1)
        seconds, done = 0.0, cached
        while done < req.input_tokens:
            new = min(chunk, req.input_tokens - done)
            seconds += model.prefill_seconds([(done, new)])
            done += new
        out.append(seconds * 1000)
        seen.touch(chain)
    return out


def verdicts(
    ours: BenchSummary, sglang: BenchSummary | None, bound: float, floor_p99_ms: float = 0.0
) -> list[tuple[str, str, bool | None]]:
    """The issue's targets for one row: (target, measured, met; None when not measurable).

    ``floor_p99_ms`` is the point's :func:`ttft_floor_ms` p99, in milliseconds (the summaries'
    times are seconds): where it is above 0.75x the SGLang Router's p99, the figure says the
    TTFT p99 target is out of any router's reach there.
    """
    floor_p99 = floor_p99_ms / 1000
    out: list[tuple[str, str, bool | None]] = []

    def check(name: str, figure: str, met: bool | None) -> None:
        out.append((name, figure, met))

    if sglang is not None:
        figure = f"{ours.ttft_p99 / sglang.ttft_p99:.2f}x" if sglang.ttft_p99 else "-"
        if sglang.ttft_p99 and floor_p99 > 0.75 * sglang.ttft_p99:
            figure += f"; unreachable: floor {floor_p99 / sglang.ttft_p99:.2f}x"
        check("TTFT p99 <= 0.75x SGLang", figure, ours.ttft_p99 <= 0.75 * sglang.ttft_p99)
        check(
            "TTFT p50 <= SGLang",
            f"{ours.ttft_p50 / sglang.ttft_p50:.2f}x" if sglang.ttft_p50 else "-",
            ours.ttft_p50 <= sglang.ttft_p50,
        )
        check(
            "E2E p50 <= SGLang",
            f"{ours.latency_p50 / sglang.latency_p50:.2f}x" if sglang.latency_p50 else "-",
            ours.latency_p50 <= sglang.latency_p50,
        )
        check(
            "hit >= SGLang - 0.005",
            f"{ours.hit_ratio:.3f} vs {sglang.hit_ratio:.3f}",
            ours.hit_ratio >= sglang.hit_ratio - 0.005,
        )
    else:
        for name in ("TTFT p99 <= 0.75x SGLang", "TTFT p50 <= SGLang", "E2E p50 <= SGLang"):
            check(name, "no SGLang row", None)
        check("hit >= SGLang - 0.005", "no SGLang row", None)
    check(
        "hit >= 95% of LRU bound",
        f"{ours.hit_ratio / bound:.0%}" if bound else "-",
        ours.hit_ratio >= 0.95 * bound if bound else None,
    )
    imbalance = ours.request_imbalance
    check(
        "max/mean load <= 1.25",
        f"{imbalance:.2f}",
        None if math.isnan(imbalance) else imbalance <= 1.25,
    )
    return out


# --- running -------------------------------------------------------------------------------


#: ``--routers`` names -> the rows they stand for.
ROUTERS = {
    "least_ttft": cr.RouterSpec("sglctl", "least_ttft"),
    "cache_aware": cr.RouterSpec("sglctl", "cache_aware"),
    "cache_aware_corrected": cr.RouterSpec("sglctl", "cache_aware", CORRECTIONS, "corrected"),
    "cache_aware_tree": cr.RouterSpec("sglctl", "cache_aware", ("--placement", "tree"), "tree"),
    "round_robin": cr.RouterSpec("sglctl", "round_robin"),
    "sglang": cr.RouterSpec("sglang", "cache_aware"),
}


def print_floors(points: Sequence[Point], args: argparse.Namespace) -> None:
    """``--floors-only``: each point's TTFT floor, no router or worker started."""
    for point in points:
        workload = middle_slice(trace_workload(point.trace), args.slice or None)
        floor = ttft_floor_ms(workload.requests, args.speedup / point.load)
        print(
            f"{point.name}: {workload.name}, TTFT floor p50 {percentile(floor, 50):,.0f} ms, "
            f"p99 {percentile(floor, 99):,.0f} ms"
        )


def specs(sglang_python: Path | None, names: Sequence[str] = tuple(ROUTERS)) -> list[cr.RouterSpec]:
    """The rows to run, in ``ROUTERS`` order (SGLang's only when its venv is there)."""
    unknown = set(names) - set(ROUTERS)
    if unknown:
        raise SystemExit(f"--routers: unknown {sorted(unknown)}; choose from {list(ROUTERS)}")
    return [
        spec
        for name, spec in ROUTERS.items()
        if name in names and (spec.kind == "sglctl" or sglang_python is not None)
    ]


def trace_path(name: str, traces_dir: Path) -> Path:
    if name in TRACE_NAMES:
        return traces_dir / TRACE_NAMES[name]
    path = Path(name)
    return path if path.exists() else traces_dir / name


def parse_point(text: str, traces_dir: Path) -> Point:
    try:
        trace, kv, load = text.rsplit(":", 2)
        return Point(str(trace_path(trace, traces_dir)), int(kv), float(load))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--point {text!r}: expected TRACE:KV_TOKENS:LOAD, e.g. conversation:444000:2"
        ) from None


def plot(results: list[dict[str, object]], path: Path) -> bool:
    """TTFT p50/p99 and hit ratio per point and router, as a PNG (False without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        cr.console.print(
            "[yellow]--plot needs matplotlib: .venv/bin/pip install matplotlib "
            "(or pip install -e '.[test]')"
        )
        return False
    points = [str(r["point"]) for r in results]
    routers: list[str] = []
    for r in results:
        for row in r["rows"]:  # type: ignore[attr-defined]
            if row["router"] not in routers:
                routers.append(row["router"])
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 1.6 * len(points)), 11), sharex=True)
    width = 0.8 / max(len(routers), 1)
    for k, (metric, title) in enumerate(
        (("ttft_p50", "TTFT p50 (ms)"), ("ttft_p99", "TTFT p99 (ms)"), ("hit_ratio", "hit ratio"))
    ):
        ax = axes[k]
        for j, router in enumerate(routers):
            values = []
            for r in results:
                row = next((x for x in r["rows"] if x["router"] == router), None)  # type: ignore[attr-defined]
                value = float(row[metric]) if row else math.nan
                values.append(value * 1000 if metric != "hit_ratio" else value)
            ax.bar([i + j * width for i in range(len(points))], values, width, label=router)
        if metric == "hit_ratio":
            bounds = [float(r["lru_bound"]) for r in results]  # type: ignore[arg-type]
            ax.plot(
                [i + 0.4 - width / 2 for i in range(len(points))],
                bounds,
                "k_",
                markersize=30,
                label="one-big-LRU bound",
            )
        ax.set_ylabel(title)
        if k == 0:
            ax.legend(fontsize=7, ncol=3)
    axes[-1].set_xticks([i + 0.4 - width / 2 for i in range(len(points))])
    axes[-1].set_xticklabels(points, rotation=20, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--traces-dir", type=Path, default=TRACES_DIR)
    parser.add_argument(
        "--traces", default="conversation,synthetic", help="Comma-separated traces for the grid."
    )
    parser.add_argument(
        "--slice",
        type=int,
        default=350,
        help="Requests from each trace's middle (0: the whole trace).",
    )
    parser.add_argument(
        "--kv", default="200000,444000,1500000", help="Comma-separated KV tokens per worker."
    )
    parser.add_argument("--load", default="2", help="Comma-separated load factors.")
    parser.add_argument(
        "--point",
        action="append",
        default=[],
        help="Extra point TRACE:KV:LOAD (repeatable); --no-grid to run only these.",
    )
    parser.add_argument("--no-grid", action="store_true", help="Only the --point points.")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--speedup", type=float, default=10.0, help="Trace time compression.")
    parser.add_argument("--sglang-venv", type=Path, default=cr.DEFAULT_SGLANG_VENV)
    parser.add_argument("--no-sglang", action="store_true", help="Skip the SGLang Router row.")
    parser.add_argument(
        "--routers",
        default=",".join(ROUTERS),
        help=f"Comma-separated rows to run (default all: {','.join(ROUTERS)}).",
    )
    parser.add_argument("--run-timeout", type=float, default=240.0, help="Cap on one run (s).")
    parser.add_argument("--quick", action="store_true", help="Two points, 200 requests each.")
    parser.add_argument("--plot", action="store_true", help="Write grid.png (needs matplotlib).")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench-out" / "grid")
    parser.add_argument(
        "--floors-only",
        action="store_true",
        help="Print each point's TTFT floor (no queue, every seen prefix cached) and stop.",
    )
    args = parser.parse_args(argv)

    points: list[Point] = []
    if args.quick:
        args.slice = 200
        points = [
            Point(str(trace_path(t, args.traces_dir)), 444_000, 2.0)
            for t in ("conversation", "synthetic")
        ]
    elif not args.no_grid:
        points = [
            Point(str(trace_path(t, args.traces_dir)), int(kv), float(load))
            for t in args.traces.split(",")
            for kv in args.kv.split(",")
            for load in args.load.split(",")
        ]
    points += [parse_point(p, args.traces_dir) for p in args.point]
    if not points:
        parser.error("no points: drop --no-grid or add --point TRACE:KV:LOAD")
    if args.floors_only:
        print_floors(points, args)
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = args.out_dir / "logs"
    if log_dir.exists():
        shutil.rmtree(log_dir)
    sglang_python = (
        None if args.no_sglang else cr.sglang_router_python(args.sglang_venv, create=False)
    )
    started = time.monotonic()
    results: list[dict[str, object]] = []
    md: list[str] = []
    all_verdicts: list[tuple[str, str, list[tuple[str, str, bool | None]]]] = []
    for point in points:
        workload = middle_slice(trace_workload(point.trace), args.slice or None)
        settings = cr.Settings(
            workers=args.workers,
            max_requests=len(workload.requests),
            speedup=args.speedup,
            load_factor=point.load,
            kv_cache_tokens=point.kv_tokens,
            stream_interval=cr.QUICK.stream_interval,
            sglctl_policies=(),
            sglang_policies=(),
            overhead_requests=0,
            overhead_workers=0,
            sglang_defaults_row=False,
        )
        bound, shared = lru_bound_parts(workload.requests, args.workers * point.kv_tokens)
        separate = separate_lru_hit_ratio(workload.requests, args.workers, point.kv_tokens)
        ideal = ideal_hit_ratio(workload.requests).token_weighted
        floor = ttft_floor_ms(workload.requests, settings.sim_speedup)
        floor_p50, floor_p99 = percentile(floor, 50), percentile(floor, 99)
        runs = cr.run_comparison(
            args,
            settings,
            workload,
            sglang_python,
            log_dir,
            specs(sglang_python, args.routers.split(",")),
        )
        title = (
            f"{point.name}: {workload.name}, {len(workload.requests)} requests, "
            f"{args.workers} sim workers, trace time / {args.speedup:g}; "
            f"one-big-LRU bound {bound:.3f} ({shared:.0%} of its hits on shared prefixes), "
            f"{args.workers} separate LRUs under an oracle {separate:.3f}, unlimited {ideal:.3f}; "
            f"TTFT floor p50/p99 {floor_p50:,.0f} / {floor_p99:,.0f} ms"
        )
        cr.console.print(cr.comparison_table([(s.label, r.summary) for s, r in runs], title))
        md.append(f"**{title}**\n")
        md.append(
            markdown_table(
                COMPARISON_COLUMNS, [comparison_row(s.label, r.summary) for s, r in runs]
            )
        )
        by = {s.label: r.summary for s, r in runs}
        sglang = by.get(SGLANG_LABEL)
        for spec, run in runs:
            if spec.kind == "sglctl" and spec.policy != "round_robin":
                all_verdicts.append(
                    (
                        point.name,
                        spec.label,
                        verdicts(run.summary, sglang, bound, floor_p99_ms=floor_p99),
                    )
                )
        results.append(
            {
                "point": point.name,
                "workload": workload.name,
                "lru_bound": bound,
                "lru_bound_shared_share": shared,
                "separate_lru_oracle": separate,
                "ideal": ideal,
                "ttft_floor_p50": floor_p50,
                "ttft_floor_p99": floor_p99,
                "rows": [
                    {
                        "router": s.label,
                        "ttft_p50": r.summary.ttft_p50,
                        "ttft_p99": r.summary.ttft_p99,
                        "e2e_p50": r.summary.latency_p50,
                        "e2e_p99": r.summary.latency_p99,
                        "hit_ratio": r.summary.hit_ratio,
                        "request_imbalance": r.summary.request_imbalance,
                        "token_imbalance": r.summary.token_imbalance,
                        "errors": r.summary.errors,
                    }
                    for s, r in runs
                ],
            }
        )
        (args.out_dir / "grid.json").write_text(json.dumps(results, indent=1, default=str))

    cr.console.rule("Verdicts (against the SGLang Router's cache_aware, same point)")
    names = [n for n, _, _ in all_verdicts[0][2]] if all_verdicts else []
    header = ["point", "router", *names]
    rows = [
        [
            point,
            label,
            *[f"{'met' if m else '-' if m is None else 'MISSED'} ({f})" for _, f, m in v],
        ]
        for point, label, v in all_verdicts
    ]
    table = cr.Table(header_style="bold")
    for name in header:
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    cr.console.print(table)
    md.append("\n**Verdicts** (against the SGLang Router's cache_aware, same point)\n")
    md.append(markdown_table(header, rows))
    (args.out_dir / "grid.md").write_text("\n".join(md) + "\n")
    if args.plot and results and plot(results, args.out_dir / "grid.png"):
        cr.console.print(f"plot: {args.out_dir / 'grid.png'}")
    cr.console.print(
        f"total time {time.monotonic() - started:.0f} s; tables, JSON, logs in {args.out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
