#!/usr/bin/env python3
"""Router replicas: the cache hits lost when 3 routers, each with its own prefix tree, share
the same workers (issue 11 item 6).

In a cluster the router runs as a Deployment of 3 replicas behind one Service
(``examples/k8s/router.yaml``); each replica discovers the same worker pods but learns only
from the requests it routes itself, so a conversation whose turns land on different replicas
may be sent to a worker that does not hold its prefix. The SGLang gateway's docs put the loss
at 10-20% of the hits. This script measures it on sglctl:

1. Starts N sim workers (default 8) with a finite KV cache and a ``--speedup``.
2. Replays the same slice of the Mooncake conversation trace (``sglctl.bench``, at the
   trace's own timestamps divided by ``--speedup``) through 1 router, then through R routers
   (default 3) with the requests spread over the replicas as a Service's clients would be,
   two ways (``--spread``): ``request`` -- each request to the next replica, round-robin (the
   worst case for the trees: consecutive turns of one conversation go to different
   replicas); ``session`` -- each conversation (the trace's first two blocks) stays on one
   replica, as long-lived client connections or ``sessionAffinity`` give. Worker caches are
   flushed before each setup, so every setup starts cold.
3. Prints one row per setup -- hit ratio (the workers' ``cached_tokens`` over prompt tokens),
   TTFT p50/p99, max/mean requests per worker, errors -- and the ratio of each R-replica hit
   ratio to the 1-router one.

The routers take their workers from static ``--worker-urls`` (discovery gives them the same
list; what is measured is routing, not membership). Everything runs on 127.0.0.1 and every
process started here is stopped at the end, also on Ctrl-C. Figures: the "Router replicas"
section of benchmarks/RESULTS.md.

    python benchmarks/replicas.py --quick     # about a minute and a half
    python benchmarks/replicas.py             # the recorded run (a few minutes)
    python benchmarks/replicas.py --placement hash --spread request   # replicas that agree
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sglctl.bench.report import fmt_ms  # noqa: E402
from sglctl.bench.runner import BenchResult, RunConfig, run_workload  # noqa: E402
from sglctl.bench.textgen import PromptBuilder  # noqa: E402
from sglctl.bench.workload import Workload  # noqa: E402
from sglctl.bench.workloads import trace_workload  # noqa: E402
from sglctl.net import find_free_port, wait_for_http  # noqa: E402
from sglctl.polling import poll_sync  # noqa: E402
from sglctl.spawn import ManagedProcess, spawn_router, spawn_sim_worker  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 160)
#: The trace beside the checkout (shared/ next to it; a worktree sits one level deeper).
DEFAULT_TRACE = (
    next(
        (
            p
            for p in (REPO.parent / "shared", REPO.parent.parent / "shared")
            if (p / "traces" / "conversation_trace.jsonl").exists()
        ),
        REPO.parent / "shared",
    )
    / "traces"
    / "conversation_trace.jsonl"
)


@dataclass(frozen=True)
class Settings:
    workers: int
    replicas: int
    max_requests: int
    speedup: float
    load_factor: float
    kv_cache_tokens: int

    @property
    def sim_speedup(self) -> float:
        """The sims' ``--speedup``: the trace runs ``load_factor`` times faster than them."""
        return self.speedup / self.load_factor


QUICK = Settings(
    workers=8, replicas=3, max_requests=500, speedup=10.0, load_factor=2.0,
    kv_cache_tokens=600_000,
)  # fmt: skip
FULL = Settings(
    workers=8, replicas=3, max_requests=1500, speedup=8.0, load_factor=2.0,
    kv_cache_tokens=600_000,
)  # fmt: skip


#: How clients reach the replicas: ``request`` -- every request picks the next replica
#: (round-robin); ``session`` -- a conversation stays on one replica (what long-lived client
#: connections or ``sessionAffinity`` give behind a Service).
SPREADS = ("request", "session")
Picker = Callable[[bytes], int | None]


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def session_picker(workload: Workload, builder: PromptBuilder, replicas: int) -> Picker:
    """Replica of each prompt by its conversation: the trace's first two blocks.

    A conversation's later turns repeat its earlier prompt (same leading hash ids), so
    ``hash_ids[:2]`` -- the shared system block and the conversation's first own block --
    names it. The transport sees only the body, so prompts are mapped by their digest.
    """
    by_prompt: dict[bytes, int] = {}
    for req in workload.requests:
        session = "/".join(seg.key for seg in req.segments[:2])
        replica = int.from_bytes(_digest(session)[:4], "big") % replicas
        by_prompt[_digest(builder.prompt(req))] = replica

    def pick(body: bytes) -> int | None:
        try:
            text = orjson.loads(body).get("text")
        except (orjson.JSONDecodeError, AttributeError):
            return None
        return by_prompt.get(_digest(text)) if isinstance(text, str) else None

    return pick


class SpreadTransport(httpx.AsyncBaseTransport):
    """Sends each request for the front router to one of the replicas.

    The bench runner talks to one URL; this transport plays the Service in front of the
    replicas: ``pick(body)`` chooses the replica (None, or no picker: the next one in turn).
    Requests to anything else (the runner reading the workers' counters) go where they were
    addressed.
    """

    def __init__(self, replicas: Sequence[str], pick: Picker | None = None) -> None:
        self.pick = pick
        self.targets = [httpx.URL(u) for u in replicas]
        self.front = (self.targets[0].host, self.targets[0].port)
        self.turn = itertools.count()
        self.sent = [0] * len(self.targets)
        self.inner = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=2048, max_keepalive_connections=512),
            trust_env=False,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if (request.url.host, request.url.port) == self.front:
            chosen = self.pick(await request.aread()) if self.pick else None
            i = chosen if chosen is not None else next(self.turn) % len(self.targets)
            self.sent[i] += 1
            target = self.targets[i]
            request.url = request.url.copy_with(host=target.host, port=target.port)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def start_workers(log_dir: Path, settings: Settings) -> list[ManagedProcess]:
    flags = [
        "--kv-cache-tokens", str(settings.kv_cache_tokens),
        "--speedup", str(settings.sim_speedup),
        "--stream-interval", "16",
        "--log-level", "warning",
    ]  # fmt: skip
    procs = [spawn_sim_worker(log_dir, *flags, wait=False) for _ in range(settings.workers)]
    for proc in procs:
        if not wait_for_http(proc.url + "/health", 60.0, alive=proc.alive):
            tail = proc.log_tail()
            for p in procs:
                p.stop()
            raise RuntimeError(f"sim worker {proc.url} did not start:\n{tail}")
    return procs


def start_routers(
    log_dir: Path,
    count: int,
    worker_urls: Sequence[str],
    policy: str,
    placement: str = "tree",
    extra: Sequence[str] = (),
) -> list[ManagedProcess]:
    routers: list[ManagedProcess] = []
    try:
        for i in range(count):
            routers.append(
                spawn_router(
                    log_dir,
                    worker_urls,
                    "--policy",
                    policy,
                    "--placement",
                    placement,
                    *extra,
                    "--metrics-port",
                    str(find_free_port()),
                    "--log-level",
                    "warning",
                    name=f"router-{count}x-{i}",
                )
            )
        for router in routers:

            def ready(r: ManagedProcess = router) -> bool | None:
                return True if _healthy(r) >= len(worker_urls) else None

            poll_sync(
                ready, timeout=60, what=f"{router.name} routing to every worker", alive=router.alive
            )
    except BaseException:
        for r in routers:
            r.stop()
        raise
    return routers


def _healthy(router: ManagedProcess) -> int:
    try:
        reply = httpx.get(router.url + "/readiness", timeout=5, trust_env=False)
        return int(reply.json().get("healthy_workers", 0))
    except (httpx.HTTPError, ValueError):
        return 0


def flush(worker_urls: Sequence[str]) -> None:
    with httpx.Client(timeout=30, trust_env=False) as client:
        for url in worker_urls:
            client.post(url + "/flush_cache").raise_for_status()


def run_setup(
    replicas: int,
    spread: str,
    settings: Settings,
    worker_urls: list[str],
    builder: PromptBuilder,
    workload: Workload,
    log_dir: Path,
    policy: str,
    placement: str = "tree",
    extra: Sequence[str] = (),
) -> tuple[BenchResult, list[int]]:
    flush(worker_urls)
    routers = start_routers(log_dir, replicas, worker_urls, policy, placement, extra)
    pick = session_picker(workload, builder, replicas) if spread == "session" else None
    transport = SpreadTransport([r.url for r in routers], pick)
    try:
        config = RunConfig(
            url=routers[0].url,
            mode="trace",
            speedup=settings.speedup,
            worker_urls=worker_urls,
            label=label(replicas, spread),
            duration=900.0,
        )
        result = asyncio.run(
            run_workload(workload, config, console=console, builder=builder, transport=transport)
        )
    finally:
        for r in routers:
            r.stop()
    return result, transport.sent


def label(replicas: int, spread: str) -> str:
    return "1 router" if replicas == 1 else f"{replicas} replicas, spread per {spread}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="500 requests, about 1.5 minutes")
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--replicas", type=int)
    parser.add_argument("--max-requests", type=int)
    parser.add_argument("--speedup", type=float, help="trace time compression (wall clock)")
    parser.add_argument("--kv-cache-tokens", type=int)
    parser.add_argument("--policy", default="cache_aware")
    parser.add_argument(
        "--placement",
        choices=("tree", "hash"),
        default="tree",
        help="the routers' --placement: where cache_aware puts a prefix no tree holds",
    )
    parser.add_argument(
        "--spread",
        choices=(*SPREADS, "both"),
        default="both",
        help="how clients reach the replicas: a new replica per request (round-robin), one "
        "per conversation (sticky sessions), or both setups",
    )
    parser.add_argument(
        "--router-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="one more flag for every router, e.g. --router-flag=--placement-epsilon=1 (repeat)",
    )
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    settings = Settings(
        workers=args.workers or base.workers,
        replicas=args.replicas or base.replicas,
        max_requests=args.max_requests or base.max_requests,
        speedup=args.speedup or base.speedup,
        load_factor=base.load_factor,
        kv_cache_tokens=args.kv_cache_tokens or base.kv_cache_tokens,
    )
    if not args.trace.exists():
        console.print(f"[red]trace {args.trace} not found (pass --trace)")
        return 2
    log_dir = REPO / "bench-out" / "replicas-logs"
    load_before = os.getloadavg()
    console.rule(
        f"Router replicas: {settings.max_requests} requests of {args.trace.name}, "
        f"{settings.workers} sim workers (--kv-cache-tokens {settings.kv_cache_tokens}, "
        f"--speedup {settings.sim_speedup:g}), trace time / {settings.speedup:g}, "
        f"policy {args.policy}, --placement {args.placement} {' '.join(args.router_flag)}"
    )
    started = time.monotonic()
    workers = start_workers(log_dir, settings)
    urls = [w.url for w in workers]
    builder = PromptBuilder(max_blocks=8192)
    workload = trace_workload(args.trace, limit=settings.max_requests)
    spreads = SPREADS if args.spread == "both" else (args.spread,)
    setups = [(1, "request"), *((settings.replicas, spread) for spread in spreads)]
    rows: dict[tuple[int, str], tuple[BenchResult, list[int]]] = {}
    try:
        for replicas, spread in setups:
            rows[replicas, spread] = run_setup(
                replicas,
                spread,
                settings,
                urls,
                builder,
                workload,
                log_dir,
                args.policy,
                args.placement,
                args.router_flag,
            )
            s = rows[replicas, spread][0].summary
            console.print(
                f"  {label(replicas, spread)}: hit {s.hit_ratio:.3f}, TTFT p50 "
                f"{fmt_ms(s.ttft_p50)}, max/mean {s.request_imbalance:.2f}, errors {s.errors}"
            )
    finally:
        for w in workers:
            w.stop()

    table = Table(title="1 router vs replicas, same workers, same requests")
    header = ["routers", "ok/sent", "err", "hit ratio", "of ideal", "TTFT p50", "TTFT p99",
              "max/mean req", "requests per replica"]  # fmt: skip
    for name in header:
        table.add_column(name, justify="left" if name == "routers" else "right")
    out: dict[str, object] = {
        "settings": settings.__dict__,
        "policy": args.policy,
        "placement": args.placement,
        "router_flags": args.router_flag,
    }
    for (replicas, spread), (result, sent) in rows.items():
        s = result.summary
        cells = [
            label(replicas, spread),
            f"{s.completed}/{s.requests}",
            str(s.errors),
            f"{s.hit_ratio:.3f}",
            f"{s.hit_ratio_of_ideal:.0%}",
            fmt_ms(s.ttft_p50),
            fmt_ms(s.ttft_p99),
            f"{s.request_imbalance:.2f}",
            "/".join(str(n) for n in sent),
        ]
        table.add_row(*cells)
        out[label(replicas, spread)] = dict(zip(header, cells, strict=True))
    console.print(table)
    one = rows[1, "request"][0].summary.hit_ratio
    for spread in spreads:
        many = rows[settings.replicas, spread][0].summary.hit_ratio
        ratio = many / one if one else float("nan")
        out[f"hit_ratio_ratio_per_{spread}"] = ratio
        console.print(
            f"hit ratio {label(settings.replicas, spread)} / 1 router: [bold]{ratio:.2f}[/] "
            f"({(1 - ratio):.0%} of the hits lost)"
        )
    ideal = rows[1, "request"][0].summary.ideal
    console.print(
        f"ideal (one unlimited cache): {ideal.token_weighted if ideal else float('nan'):.3f}"
    )
    console.print(
        f"took {time.monotonic() - started:.0f} s; load average before "
        f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} (2-core machine)"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
