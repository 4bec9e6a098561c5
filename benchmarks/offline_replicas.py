#!/usr/bin/env python3
"""Issue 16 offline: N router replicas with ``--router-peers`` against one router, in virtual time.

``benchmarks/replicas.py`` runs the real thing (8 sims, 1 router, then 3 peered replicas, on a
2-core machine): ~3 minutes a point, and one router's own TTFT p99 moves by about 10% between
runs, as large as the target (within 10% of one router). This script replays the same point
(the first ``--max-requests`` of a trace, trace time / ``--speedup``, 8 sim engines at the
benchmark's ``--speedup / load``, the same KV size) in the virtual time of
:mod:`offline_replay`, deterministically, so that one decision rule can be told from another
by a figure that does not move, and the cost of the replicas' late knowledge from the machine's
CPU (the real benchmark has both; this one has only the first).

Each replica is the router's own :class:`~sglctl.router.policies.CacheAwarePolicy`, set up as
``sglctl router --router-peers`` sets it up (``current_loads``, ``stagger_by`` its rank), with
its own :class:`~sglctl.router.workers.Worker` objects (its own in-flight counts). Requests go
to the replicas round-robin (``replicas.py``'s ``--spread request``). What a replica learns of
the others is what :mod:`sglctl.router.peers` tells, when it tells it:

* every link (one per ordered pair of replicas) keeps up to ``POSTS_IN_FLIGHT`` batches out
  at once; a POST arrives ``--latency-ms`` after it leaves and its slot is free again a round
  trip later; a batch holds every route queued and ends with the sender's in-flight counts
  per worker (the ``load`` message);
* an idle link posts its load alone when it changed, ``LOAD_CHANGE_SECS`` after the last post
  at the earliest, and every ``LOAD_REFRESH_SECS`` while it is non-zero;
* the receiver applies routes with ``observe`` (its tree learns the prefix) and keeps each
  sender's last load, summed per worker into ``told_in_flight``.

A replica whose policy defers a miss (``miss_delay``, the stagger) decides it that much later,
as the proxy does; its TTFT still counts from the arrival.

Setups (``--placements``): ``one`` (one router, the benchmark's baseline); ``replicas`` (N
peered replicas, as ``sglctl router --router-peers`` runs them); and, to tell the causes apart,
``replicas_unstaggered`` (no stagger), ``replicas_jitter`` (no stagger, misses to the least
``load + U(0, JITTER)``: the rule before the stagger), ``replicas_shard`` (no stagger, replica r
prefers the workers i with i % N == r by ``SHARD_BIAS`` requests) and ``replicas_instant``
(no stagger, every route and load told at once and for free: what is left is N deciders, not
their lateness; it equals ``one`` exactly). What it showed (RESULTS.md, "Router replicas
offline"): the traces' clients send in bursts (conversation: ~9 requests per timestamp), and
replicas blind to each other's picks within a burst herded its misses onto the least loaded
worker; staggering the misses by rank brings TTFT p50 and p99 back to one router's.
The real replicas wait a measured step a rank (``Peers.restep``: the routes' lateness); here
the step is ``STAGGER_SECS``: ``--latency-ms 6 --set STAGGER_SECS=0.025`` is the 2-core
benchmark machine (routes 12-30 ms late, RESULTS.md "Router replicas wait as long as their
routes take").
``--set NAME=VALUE`` changes a constant of :mod:`sglctl.router.peers`, of
:mod:`sglctl.router.policies.cache_aware` (``STAGGER_SECS``) or of this script for the run.

    .venv/bin/python benchmarks/offline_replicas.py --trace conversation --kv 600000   # ~1 min
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import offline_replay as off  # noqa: E402

from sglctl.bench.workloads import trace_workload  # noqa: E402
from sglctl.router import peers  # noqa: E402
from sglctl.router.policies import CacheAwarePolicy, RouteKey, cache_aware  # noqa: E402
from sglctl.router.workers import Worker  # noqa: E402
from sglctl.sim.engine import Engine, SimRequest  # noqa: E402

TRACES = {
    "conversation": REPO.parent / "shared" / "traces" / "conversation_trace.jsonl",
    "synthetic": REPO.parent / "shared" / "traces" / "synthetic_trace.jsonl",
}
#: name -> (replicas (0: --replicas), miss rule, telling): see the module docstring.
SETUPS = {
    "one": (1, "plain", "late"),
    "replicas": (0, "stagger", "late"),
    "replicas_unstaggered": (0, "plain", "late"),
    "replicas_jitter": (0, "jitter", "late"),
    "replicas_shard": (0, "shard", "late"),
    "replicas_instant": (0, "plain", "instant"),
}
PLACEMENTS = tuple(SETUPS)
#: ``replicas_jitter``: the previous miss rule, least ``load + U(0, JITTER)``.
JITTER = 1.5
#: ``replicas_shard``: replica r prefers the workers i with i % N == r by this many requests.
SHARD_BIAS = 3.0
#: Virtual seconds between two looks at the links (the real links wake on a route at once;
#: here a route waits for the next look, so keep it small against the latency).
TICK_SECS = 0.001


class PreferencePolicy(CacheAwarePolicy):
    """A miss goes to the least ``load + prefer(worker)``: a rule of this replica's own."""

    def __init__(self, prefer: Callable[[Worker], float]) -> None:
        super().__init__(placement="load")
        self.prefer = prefer

    def place(self, prefixes, by_load, load=cache_aware._load):  # type: ignore[no-untyped-def]
        self.last_decision = "cache_miss"
        prefer = self.prefer
        return min(by_load, key=lambda w: load(w) + prefer(w))


def make_policy(rule: str, r: int, count: int, workers: Sequence[Worker]) -> CacheAwarePolicy:
    """Replica ``r`` of ``count``'s policy under miss rule ``rule``, set up as
    ``sglctl router --router-peers`` sets it up (with ``count`` > 1)."""
    policy: CacheAwarePolicy
    if rule == "jitter":
        rng = random.Random(f"replica-{r}")
        policy = PreferencePolicy(lambda w: JITTER * rng.random())
    elif rule == "shard":
        mine = {w.url for i, w in enumerate(workers) if i % count == r}
        policy = PreferencePolicy(lambda w: 0.0 if w.url in mine else SHARD_BIAS)
    else:
        policy = CacheAwarePolicy(placement="load")
    if count > 1:
        policy.current_loads = True
        if rule == "stagger":
            policy.stagger_by(lambda: (r, count))
    for w in workers:
        policy.on_worker_added(w)
    return policy


class Link:
    """Replica ``src`` telling replica ``dst``: a queue of routes and one POST at a time."""

    def __init__(self, src: int, dst: int) -> None:
        self.src, self.dst = src, dst
        self.queue: list[tuple[RouteKey, str]] = []
        #: When each POST out on this link is answered (its slot free again).
        self.out: list[float] = []
        self.told: dict[str, int] = {}
        self.told_at = -1e9


Post = tuple[float, int, int, int, list[tuple[RouteKey, str]], dict[str, int]]


class ReplicasPlacement(off.Placement):
    """``count`` peered cache-aware replicas (or one router), telling each other late (as
    :mod:`sglctl.router.peers` does: ``latency_s`` a POST) or at once (None)."""

    tick_secs = TICK_SECS

    def __init__(
        self, engines: Sequence[Engine], count: int, rule: str, latency_s: float | None
    ) -> None:
        self.count = count
        self.latency_s = latency_s
        self.workers = [
            [Worker(f"http://127.0.0.1:{30000 + i}") for i in range(len(engines))]
            for _ in range(count)
        ]
        self.policies = [make_policy(rule, r, count, self.workers[r]) for r in range(count)]
        self.index = {w.url: i for i, w in enumerate(self.workers[0])}
        self.turn = 0
        self.owner: dict[int, int] = {}  # job index -> replica
        self.links = [Link(s, d) for s in range(count) for d in range(count) if s != d]
        self.told: list[dict[int, dict[str, int]]] = [{} for _ in range(count)]
        self.posts: list[Post] = []
        self.deferred: list[tuple[float, int, off.Job, int]] = []
        self.seq = 0
        self.now = 0.0

    # -- deciding -------------------------------------------------------------------------
    def choose(self, job: off.Job, now: float) -> int | None:
        self.tick(now)
        r = self.turn % self.count
        self.turn += 1
        self.owner[job.index] = r
        policy = self.policies[r]
        if policy.miss_delays:
            delay = policy.miss_delay(self.workers[r], RouteKey(text=job.text))
            if delay > 0:
                self.seq += 1
                heapq.heappush(self.deferred, (now + delay, self.seq, job, r))
                return None
        return self._decide(job, r, now)

    def _decide(self, job: off.Job, r: int, now: float) -> int:
        key = RouteKey(text=job.text)
        worker = self.policies[r].select(self.workers[r], key)
        assert worker is not None
        worker.in_flight += 1
        if self.count > 1:
            for link in self.links:
                if link.src == r:
                    link.queue.append((key, worker.url))
            if self.latency_s is None:
                self.tick(now)
        return self.index[worker.url]

    def next_due(self) -> float:
        return self.deferred[0][0] if self.deferred else math.inf

    def take_due(self, now: float) -> list[tuple[off.Job, int]]:
        due = []
        while self.deferred and self.deferred[0][0] <= now:
            _, _, job, r = heapq.heappop(self.deferred)
            self.tick(now)
            due.append((job, self._decide(job, r, now)))
        return due

    def finished(self, worker: int, job: off.Job, req: SimRequest) -> None:
        r = self.owner.pop(job.index)
        self.workers[r][worker].in_flight -= 1
        if self.latency_s is None and self.count > 1:
            self.tick(self.now)

    # -- telling --------------------------------------------------------------------------
    def own_load(self, r: int) -> dict[str, int]:
        return {w.url: w.in_flight for w in self.workers[r] if w.in_flight}

    def tick(self, now: float) -> None:
        self.now = now
        if self.count == 1:
            return
        self._arrive(now)
        for link in self.links:
            if link.out:
                link.out = [t for t in link.out if t > now]
            if len(link.out) >= peers.POSTS_IN_FLIGHT:
                continue
            load = self.own_load(link.src)
            if self.latency_s is None:
                due = bool(link.queue) or load != link.told
            else:
                age = now - link.told_at
                due = (
                    bool(link.queue)
                    or (load != link.told and age >= peers.LOAD_CHANGE_SECS)
                    or (bool(load) and age >= peers.LOAD_REFRESH_SECS)
                )
            if not due:
                continue
            routes, link.queue = link.queue, []
            link.told, link.told_at = load, now
            if self.latency_s is None:
                self._deliver(link.dst, link.src, routes, load)
                continue
            self.seq += 1
            heapq.heappush(
                self.posts, (now + self.latency_s, self.seq, link.dst, link.src, routes, load)
            )
            link.out.append(now + 2 * self.latency_s)
        self._arrive(now)

    def _arrive(self, now: float) -> None:
        while self.posts and self.posts[0][0] <= now:
            _, _, dst, src, routes, load = heapq.heappop(self.posts)
            self._deliver(dst, src, routes, load)

    def _deliver(
        self, dst: int, src: int, routes: list[tuple[RouteKey, str]], load: dict[str, int]
    ) -> None:
        for key, url in routes:
            self.policies[dst].observe(key, url)
        self.told[dst][src] = load
        for w in self.workers[dst]:
            w.told_in_flight = sum(t.get(w.url, 0) for t in self.told[dst].values())


def make(name: str, replicas: int, latency_s: float) -> Callable[..., off.Placement]:
    """A ``make`` for :func:`offline_replay.replay`: the setup ``name``."""
    if name not in SETUPS:
        raise SystemExit(f"unknown placement {name!r}; choose from {PLACEMENTS}")
    count, rule, telling = SETUPS[name]

    def build(_: str, engines: Sequence[Engine], clock: off.VirtualClock) -> off.Placement:
        late = latency_s if telling == "late" else None
        return ReplicasPlacement(engines, count or replicas, rule, late)

    return build


def run(name: str, jobs: list[off.Job], args: argparse.Namespace) -> off.Result:
    """One replay of ``jobs`` under setup ``name``."""
    build = make(name, args.replicas, args.latency_ms / 1000)
    return off.replay(jobs, name, args.workers, args.kv, args.speedup / args.load, make=build)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trace", choices=tuple(TRACES), default="conversation")
    parser.add_argument("--kv", type=int, default=600_000, help="KV cache tokens per worker")
    parser.add_argument("--max-requests", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--speedup", type=float, default=8.0, help="trace time / this")
    parser.add_argument("--load", type=float, default=2.0, help="replicas.py's load factor")
    parser.add_argument("--latency-ms", type=float, default=1.0, help="one way, per POST")
    parser.add_argument("--placements", nargs="+", default=list(PLACEMENTS))
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    for assignment in args.set:
        if not off.set_constant(assignment, peers, cache_aware, sys.modules[__name__]):
            parser.error(f"--set {assignment!r}: no such constant in peers, cache_aware or here")
    workload = trace_workload(TRACES[args.trace], limit=args.max_requests)
    jobs = off.build_jobs(workload, args.speedup)
    variants = [
        off.jittered(jobs, args.jitter_ms / 1000, seed)
        for seed in range(args.seeds if args.jitter_ms else 1)
    ]
    sim_speedup = args.speedup / args.load
    print(
        f"{len(jobs)} requests of {args.trace}, {args.workers} workers, KV {args.kv}, "
        f"sim speedup {sim_speedup:g}, {args.replicas} replicas, latency {args.latency_ms} ms, "
        f"{len(variants)} send-time draws {' '.join(args.set)}"
    )
    base: float | None = None
    print(f"{'placement':<14} {'hits':>6} {'ttft p50':>9} {'p99':>8} {'p99 range':>15} "
          f"{'e2e p50':>8} {'max/mean':>8} {'vs one':>7}")  # fmt: skip
    for name in args.placements:
        runs = [run(name, v, args) for v in variants]
        row = off.median_row(runs)
        m = row.median
        if name == "one":
            base = m.ttft_p99
        ratio = f"{m.ttft_p99 / base:.2f}x" if base else "-"
        print(
            f"{name:<14} {m.hit_ratio:6.3f} {m.ttft_p50:9.0f} {m.ttft_p99:8.0f} "
            f"{row.p99_low:7.0f}-{row.p99_high:<7.0f} {m.e2e_p50:8.0f} {m.imbalance:8.2f} "
            f"{ratio:>7}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
