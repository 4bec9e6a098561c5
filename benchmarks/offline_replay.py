#!/usr/bin/env python3
"""Issue 14 offline: replay a grid point in *virtual time* to see what TTFT p99 any router reaches.

``benchmarks/grid.py`` runs real routers against 8 sim workers on a 2-core machine: ~30 s a
point, and figures that move by 20-40% between runs. This script replays the same point
(same trace slice, same load factor, 8 workers, same KV size, the sim's own timing model at
the grid's speed-up) with no sockets, no asyncio and no wall clock:

* the workers are 8 :class:`sglctl.sim.engine.Engine` objects, driven through their
  synchronous core (``submit``, ``_advance(now)``, ``_pending``, the ``on_first_token`` and
  ``on_finish`` hooks) by an event loop over a virtual clock: the next event is the next
  arrival or the next end of a batch, whichever comes first. The seam: ``Engine._now`` is a
  staticmethod (``time.monotonic``); each engine here gets an instance attribute that shadows
  it with the virtual clock (no change to ``engine.py``). The radix caches' LRU stamps still
  read ``time.monotonic``: the replay handles events in virtual-time order, so the order of
  the stamps (all that eviction compares) is the virtual one;
* times are the grid's wall seconds: arrivals are the trace's times / ``--speedup`` (10),
  the engines' timing model runs at ``--speedup / load`` (``grid.py``'s ``sim_speedup``);
* the prompts are the grid's very texts (:class:`~sglctl.bench.textgen.PromptBuilder`) and
  token ids (the sim's tokenizer), so caches match exactly what the real sims matched;
* placements (``--placements``):

  - ``round_robin``, ``cache_aware`` (``sglctl router``'s default: ``placement="load"``, the
    SGLang Router 0.3.x's rule) and ``least_ttft``: the router's own policy objects, given
    :class:`~sglctl.router.workers.Worker` objects (in flight counted from dispatch to the end
    of the answer, as the proxy does), the request's text as the routing key, tickets told
    the first token and the answer's ``cached_tokens``, the corrections applied every
    ``CORRECTION_INTERVAL_SECS`` and, for ``least_ttft``, ``/get_load`` reports every 0.5 s
    (virtual). ``least_ttft`` reads the virtual clock through its ``clock`` attribute (the
    seam added for this script; ``time.monotonic`` by default);
  - ``oracle``: knows every engine's real cache and queue and sends each request where its
    first token comes soonest: the GPU busy until its batch in flight ends, then the prefill
    work queued there (the chunked prompt, the waiting requests' uncached tokens on that
    cache) and this request's uncached tokens, packed into ``chunked_prefill_size`` batches
    and timed by the timing model (:func:`predicted_first_token`); ties to the longer match;
  - ``oracle_delay``: the same, plus this request's own prefill time once more: the delay
    its uncached prompt adds to every later request there (``least_ttft``'s
    ``UNCACHED_WEIGHT`` 2, with exact figures);
  - ``oracle_follow``: ``oracle``, but a request stays on the worker holding at least half
    of its prompt unless that worker's first token would come more than ``FOLLOW_SLACK`` s
    later than the best (future turns hit only where a conversation stays).

Per point and placement it prints TTFT p50/p99, E2E p50/p99 (ms of the grid's wall clock,
as ``grid.py`` prints them), the hit ratio, max/mean requests and prefill work (uncached
prompt tokens) per worker, and the TTFT p99 against the ``cache_aware`` replay of the same
point. It is deterministic: the same point gives the same figures
(``tests/test_offline_replay.py``), whatever else the machine runs.
Deterministic is not robust: a p99 of 350 requests is the 4th-worst TTFT, and moving one
long prompt by a millisecond can move it by 30%. ``--jitter-ms J --seeds N`` replays each
placement N times with every send delayed by up to J ms (seeded) and prints the medians and
the p99's range: compare placements on those, not on one draw. ``--set NAME=VALUE`` changes
a ``least_ttft`` constant for the run (how its variants were tried). ``--diagnose FILE``
replays ``least_ttft`` once more per point and logs, per decision and worker, its predicted
first token cut into its terms beside the oracle's (:func:`diagnose`, :func:`oracle_terms`)
and the pick's actual first token (JSONL), and prints where they part (:func:`summarize`).

    .venv/bin/python benchmarks/offline_replay.py --point synthetic:444000:2      # ~10 s
    .venv/bin/python benchmarks/offline_replay.py --five --jitter-ms 5 --seeds 5  # ~5 min
    .venv/bin/python benchmarks/offline_replay.py --point conversation:444000:2 \
        --placements cache_aware --diagnose /tmp/diag.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import grid  # noqa: E402

from sglctl.bench.runner import send_times  # noqa: E402
from sglctl.bench.stats import max_over_mean, percentile  # noqa: E402
from sglctl.bench.textgen import PromptBuilder  # noqa: E402
from sglctl.bench.workload import Workload  # noqa: E402
from sglctl.bench.workloads import trace_workload  # noqa: E402
from sglctl.router.load_poll import DEFAULT_INTERVAL_SECS, WorkerLoad  # noqa: E402
from sglctl.router.policies import (  # noqa: E402
    CacheAwarePolicy,
    LeastTTFTPolicy,
    Policy,
    RoundRobinPolicy,
    RouteKey,
    least_ttft,
)
from sglctl.router.policies.reports import CORRECTION_INTERVAL_SECS  # noqa: E402
from sglctl.router.workers import Worker  # noqa: E402
from sglctl.sim import tokenizer  # noqa: E402
from sglctl.sim.config import SimConfig  # noqa: E402
from sglctl.sim.engine import (  # noqa: E402
    Engine,
    RequestRejected,
    SimRequest,
    _DecodeStep,
    _PrefillBatch,
)
from sglctl.sim.output import plan_output  # noqa: E402
from sglctl.sim.radix import RadixCache, _common_prefix_len  # noqa: E402
from sglctl.sim.timing import TimingModel  # noqa: E402

#: The five points of issue 14 where the floor leaves room (RESULTS.md, "the floor").
FIVE = (
    "synthetic:444000:2",
    "synthetic:444000:3",
    "synthetic:200000:2",
    "conversation:444000:2",
    "conversation:444000:3",
)
PLACEMENTS = (
    "round_robin",
    "cache_aware",
    "least_ttft",
    "oracle",
    "oracle_delay",
    "oracle_follow",
    "oracle_stay",
)
#: The grid's sims stream every 16 tokens (``compare_routers.QUICK.stream_interval``).
STREAM_INTERVAL = 16
#: ``oracle_follow``: how much later (s) the match holder's first token may come.
FOLLOW_SLACK = 0.05
#: Predicted first-token times this close (s) are a tie.
TIE = 1e-9


@dataclass(frozen=True)
class Job:
    """One request of the replay: its send time (virtual s), text and token ids."""

    index: int
    arrival: float
    text: str
    ids: list[int]
    output_tokens: int


def build_jobs(workload: Workload, speedup: float) -> list[Job]:
    """The grid's requests: its send times (trace time / ``speedup``), texts and token ids."""
    builder = PromptBuilder(max_blocks=8192)
    times = send_times(workload.requests, "trace", rate=None, speedup=speedup, seed=0)
    jobs = []
    for req, at in zip(workload.requests, times, strict=True):
        text = builder.prompt(req)
        jobs.append(Job(req.index, at or 0.0, text, tokenizer.encode(text), req.output_tokens))
    return jobs


def jittered(jobs: Sequence[Job], jitter_s: float, seed: int) -> list[Job]:
    """``jobs`` each sent up to ``jitter_s`` later (uniform, seeded), in the new order: the
    real grid's send times wobble by milliseconds (one client on 2 busy cores), and a p99 of
    350 requests is the 4th-worst, so a placement's figure is only worth the spread it has
    over a few such wobbles."""
    if not jitter_s:
        return list(jobs)
    rng = random.Random(seed)
    moved = [replace(j, arrival=j.arrival + rng.uniform(0.0, jitter_s)) for j in jobs]
    return sorted(moved, key=lambda j: j.arrival)


class VirtualClock:
    """The replay's clock: :attr:`now` only moves when the event loop moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --- what the oracle knows ---------------------------------------------------------------


def cached_prefix(cache: RadixCache, tokens: Sequence[int]) -> int:
    """Tokens of ``tokens`` that ``cache`` holds, *without* touching it (``match_prefix``
    refreshes LRU stamps and splits nodes; an oracle looking must not change the future)."""
    node, pos = cache.root, 0
    while pos < len(tokens):
        child = node.children.get(tokens[pos])
        if child is None:
            break
        shared = _common_prefix_len(child.key, tokens, pos)
        pos += shared
        if shared < len(child.key):
            break
        node = child
    return pos


def prefill_done_at(
    start: float, work: list[list[int]], timing: TimingModel, budget: int
) -> list[float]:
    """When each item of ``work`` ([tokens in KV, tokens to compute], FCFS) has its first
    token, prefilled back to back from ``start`` in batches of ``budget`` new tokens, as
    :meth:`Engine._admit` forms them (the unfinished one first, then in order)."""
    done = [start] * len(work)
    head, t = 0, start
    while head < len(work):
        room, chunks, i = budget, [], head
        while room > 0 and i < len(work):
            have, left = work[i]
            new = min(left, room)
            chunks.append((have, new))
            work[i] = [have + new, left - new]
            room -= new
            i += 1
        t += timing.prefill_seconds(chunks)
        while head < len(work) and work[head][1] == 0:
            done[head] = t
            head += 1
    return done


def predicted_first_token(
    engine: Engine, ids: Sequence[int], now: float
) -> tuple[float, int, float]:
    """(seconds to the first token, cached tokens, own prefill seconds alone) of a request with
    ``ids`` sent to ``engine`` at ``now``: the batch in flight ends, then the prefill queued
    ahead, then this one (prefill has priority over decode; memory waits are ignored)."""
    start, work = queued_work(engine, now)
    cache = engine.cache
    have = cached_prefix(cache, ids[:-1])
    work.append([have, len(ids) - have])
    budget = engine.config.chunked_prefill_size
    first = prefill_done_at(start, work, engine.timing, budget)[-1] - now
    alone = prefill_done_at(0.0, [[have, len(ids) - have]], engine.timing, budget)[-1]
    return first, have, alone


def queued_work(engine: Engine, now: float) -> tuple[float, list[list[int]]]:
    """(when the GPU is free of its batch in flight, the prefill work queued there as
    [tokens in KV, tokens to compute], FCFS)."""
    pending = engine._pending
    start = now if pending is None else max(now, pending.end)
    work: list[list[int]] = []
    in_batch = {}
    if isinstance(pending, _PrefillBatch):
        in_batch = {id(req): new for req, new in pending.entries}
        for req, new in pending.entries:
            left = req.prompt_tokens - req.prefilled - new
            if left > 0:
                work.append([req.prefilled + new, left])
    chunked = engine.chunked
    if chunked is not None and id(chunked) not in in_batch:
        work.append([chunked.prefilled, chunked.prompt_tokens - chunked.prefilled])
    cache = engine.cache
    for req in engine.waiting:
        have = cached_prefix(cache, req.input_ids[:-1])
        work.append([have, req.prompt_tokens - have])
    return start, work


# --- placements ----------------------------------------------------------------------------


class Placement:
    """Decides where each request goes; told its first token and its end."""

    #: Virtual seconds between :meth:`tick` calls (0: never).
    tick_secs = 0.0

    def choose(self, job: Job, now: float) -> int | None:
        """The worker for ``job``, or None to decide later (:meth:`take_due`)."""
        raise NotImplementedError

    def next_due(self) -> float:
        """When the next deferred decision is due (virtual s; inf: none)."""
        return math.inf

    def take_due(self, now: float) -> list[tuple[Job, int]]:
        """The deferred jobs decided by ``now`` and their workers."""
        return []

    def first_token(self, worker: int, job: Job, req: SimRequest) -> None:
        """``req`` (``job``) produced its first token on ``worker``."""

    def finished(self, worker: int, job: Job, req: SimRequest) -> None:
        """``req`` ended on ``worker``."""

    def tick(self, now: float) -> None:
        """Periodic maintenance (the router's background tasks and load poller)."""


class PolicyPlacement(Placement):
    """The router's own policy object, fed the way the proxy feeds it."""

    tick_secs = CORRECTION_INTERVAL_SECS

    def __init__(self, policy: Policy, engines: Sequence[Engine], clock: VirtualClock) -> None:
        self.policy = policy
        self.engines = engines
        self.clock = clock
        self.workers = [Worker(f"http://127.0.0.1:{30000 + i}") for i in range(len(engines))]
        self.index = {w.url: i for i, w in enumerate(self.workers)}
        for worker in self.workers:
            policy.on_worker_added(worker)
        self.tickets: dict[int, object] = {}
        self.next_poll = 0.0
        #: ``--diagnose``: one record per decision (:func:`diagnose`), the actual first token
        #: added when it comes.
        self.records: list[dict[str, object]] | None = None
        self.pending: dict[int, dict[str, object]] = {}

    def choose(self, job: Job, now: float) -> int:
        record = None
        if self.records is not None and isinstance(self.policy, LeastTTFTPolicy):
            record = diagnose(self.policy, self.workers, self.engines, job, now)
        worker = self.policy.select(self.workers, RouteKey(text=job.text))
        assert worker is not None
        if record is not None and self.records is not None:
            record["chosen"] = self.index[worker.url]
            self.records.append(record)
            self.pending[job.index] = record
        ticket = self.policy.begin_attempt(worker)
        if ticket is not None:
            self.tickets[job.index] = ticket
        worker.in_flight += 1
        return self.index[worker.url]

    def first_token(self, worker: int, job: Job, req: SimRequest) -> None:
        record = self.pending.pop(job.index, None)
        if record is not None:
            record["actual"] = req.first_token_time - req.arrival  # type: ignore[operator]
        ticket = self.tickets.get(job.index)
        if ticket is not None:
            ticket.first_byte(True)  # type: ignore[attr-defined]

    def finished(self, worker: int, job: Job, req: SimRequest) -> None:
        self.workers[worker].in_flight -= 1
        ticket = self.tickets.pop(job.index, None)
        if ticket is not None:
            tail = b'"meta_info":{"cached_tokens":%d}}' % req.cached_tokens
            ticket.done(True, tail)  # type: ignore[attr-defined]

    def tick(self, now: float) -> None:
        apply = getattr(self.policy, "apply_corrections", None)
        if apply is not None:
            apply()
        if self.policy.uses_worker_loads and now >= self.next_poll:
            self.next_poll = now + DEFAULT_INTERVAL_SECS
            self.policy.worker_loads = {
                w.url: WorkerLoad(
                    num_reqs=e.num_running + e.num_waiting,
                    num_waiting_reqs=e.num_waiting,
                    num_tokens=e.cache.used,
                    at=now,
                    own_in_flight=w.in_flight,
                )
                for w, e in zip(self.workers, self.engines, strict=True)
            }


class OraclePlacement(Placement):
    """Exact knowledge of every engine: the soonest first token (see the module docstring)."""

    def __init__(self, engines: Sequence[Engine], variant: str = "oracle") -> None:
        self.engines = engines
        self.variant = variant

    def choose(self, job: Job, now: float) -> int:
        best = owner = -1
        best_cost = owner_first = math.inf
        best_have = owner_have = -1
        firsts = []
        for i, engine in enumerate(self.engines):
            first, have, alone = predicted_first_token(engine, job.ids, now)
            firsts.append(first)
            cost = first + alone if self.variant == "oracle_delay" else first
            if cost < best_cost - TIE or (
                cost <= best_cost + TIE
                and (have, -engine.active) > (best_have, -self.engines[best].active)
            ):
                best, best_cost, best_have = i, cost, have
            if have > owner_have or (have == owner_have and first < owner_first):
                owner, owner_have, owner_first = i, have, first
        if (
            self.variant in ("oracle_follow", "oracle_stay")
            and owner != best
            and owner_have >= 0.5 * len(job.ids)
            and (self.variant == "oracle_stay" or owner_first <= firsts[best] + FOLLOW_SLACK)
        ):
            return owner
        return best


def oracle_terms(engine: Engine, ids: Sequence[int], now: float) -> dict[str, float]:
    """:func:`predicted_first_token` cut into its terms (s): the batch in flight (``busy``,
    and whether it is a decode step), the prefill queued ahead (``ahead``: the chunked
    prompt's rest and the waiting requests) and this request's own prefill (``own``)."""
    first, have, _ = predicted_first_token(engine, ids, now)
    pending = engine._pending
    start, work = queued_work(engine, now)
    busy = start - now
    budget = engine.config.chunked_prefill_size
    ahead = prefill_done_at(start, work, engine.timing, budget)[-1] - start if work else 0.0
    return {
        "first": first,
        "busy": busy,
        "decoding": float(isinstance(pending, _DecodeStep)),
        "ahead": ahead,
        "own": first - busy - ahead,
        "cached": float(have),
        "running": float(engine.num_running),
        "waiting": float(engine.num_waiting + (engine.chunked is not None)),
    }


def diagnose(
    policy: LeastTTFTPolicy,
    workers: Sequence[Worker],
    engines: Sequence[Engine],
    job: Job,
    now: float,
) -> dict[str, object]:
    """``least_ttft``'s predicted first token per worker, cut into its terms (s: the queue it
    counts, decode pressure, this prompt's own prefill), beside the oracle's
    (:func:`oracle_terms`): where the estimate departs from the truth."""
    prefixes = policy.prefixes(RouteKey(text=job.text))
    prompt = least_ttft.units_to_tokens(prefixes.length, True)
    rows = []
    for worker, engine in zip(workers, engines, strict=True):
        model = policy.model(worker.url)
        backlog = policy.backlog(worker, model, now)
        decode = model.decode_pressure(_reported_running(policy, worker.url, now))
        blocks = policy.tree.match_blocks(prefixes, worker.url)
        uncached = least_ttft.units_to_tokens(
            prefixes.length - prefixes.matched_length(blocks), True
        )
        own = least_ttft.prefill_work(uncached, prompt) + least_ttft.OVERHEAD_TOKENS
        rate = policy.rate(model)
        rows.append(
            {
                "queue": (backlog - decode) / rate,
                "decode": decode / rate,
                "own": own / rate,
                "predicted": (backlog + own) / rate,
                "rate": rate,
                "tree_cached": float(prompt - uncached),
                "oracle": oracle_terms(engine, job.ids, now),
            }
        )
    return {"job": job.index, "at": now, "prompt": len(job.ids), "workers": rows}


def _reported_running(policy: LeastTTFTPolicy, url: str, now: float) -> int:
    load = policy.worker_loads.get(url)
    if load is None or now - load.at >= least_ttft.LOAD_STALE_SECS:
        return 0
    return load.num_reqs - load.num_waiting_reqs


def make_placement(name: str, engines: Sequence[Engine], clock: VirtualClock) -> Placement:
    if name.startswith("oracle"):
        return OraclePlacement(engines, name)
    policy: Policy
    if name == "round_robin":
        policy = RoundRobinPolicy()
    elif name == "cache_aware":
        policy = CacheAwarePolicy(placement="load")  # RouterConfig's default
    elif name == "cache_aware_tree":
        policy = CacheAwarePolicy(placement="tree")
    elif name == "least_ttft":
        ttft = LeastTTFTPolicy()
        ttft.clock = clock
        policy = ttft
    else:
        raise SystemExit(f"unknown placement {name!r}; choose from {PLACEMENTS}")
    return PolicyPlacement(policy, engines, clock)


# --- the replay ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    placement: str
    ttft_p50: float
    ttft_p99: float
    e2e_p50: float
    e2e_p99: float
    hit_ratio: float
    imbalance: float
    errors: int
    ttfts: tuple[float, ...]
    #: max/mean of the workers' prefill work (prompt tokens not found cached): what a
    #: TTFT-first placement balances, beside ``imbalance`` (requests), which it need not.
    work_imbalance: float = float("nan")


def make_engines(
    count: int, kv_tokens: int, sim_speedup: float, clock: VirtualClock
) -> list[Engine]:
    engines = []
    for _ in range(count):
        config = SimConfig(
            kv_cache_tokens=kv_tokens,
            timing=TimingModel(speedup=sim_speedup),
            stream_interval=STREAM_INTERVAL,
        )
        engine = Engine(config)
        engine._now = clock  # type: ignore[method-assign]  # the seam: shadows the staticmethod
        engines.append(engine)
    return engines


def replay(
    jobs: Sequence[Job],
    placement_name: str,
    workers: int,
    kv_tokens: int,
    sim_speedup: float,
    make: Callable[[str, Sequence[Engine], VirtualClock], Placement] = make_placement,
    records: list[dict[str, object]] | None = None,
) -> Result:
    """Run ``jobs`` (in arrival order) through ``workers`` engines under one placement, in
    virtual time. ``records`` (``least_ttft`` only) receives :func:`diagnose`'s records."""
    if any(b.arrival < a.arrival for a, b in itertools.pairwise(jobs)):
        raise ValueError("jobs must be in arrival order")
    clock = VirtualClock()
    engines = make_engines(workers, kv_tokens, sim_speedup, clock)
    placement = make(placement_name, engines, clock)
    if records is not None and isinstance(placement, PolicyPlacement):
        placement.records = records
    by_rid: dict[str, Job] = {}
    reqs: list[SimRequest] = []
    sent = [0] * workers
    worker_of: dict[str, int] = {}
    errors = 0
    for i, engine in enumerate(engines):
        engine.on_first_token = lambda r, i=i: placement.first_token(i, by_rid[r.rid], r)
        engine.on_finish = lambda r, i=i: placement.finished(i, by_rid[r.rid], r)
    inf = math.inf
    n, nxt = len(jobs), 0
    next_tick = placement.tick_secs or inf

    def submit(job: Job, w: int, t: float) -> None:
        nonlocal errors
        engine = engines[w]
        plan = plan_output(job.ids, seed=engine.config.seed, max_new_tokens=job.output_tokens)
        req = SimRequest(str(job.index), job.ids, plan, stream=True)
        by_rid[req.rid] = job
        try:
            engine.submit(req)
        except RequestRejected:
            errors += 1
            placement.finished(w, job, req)
            return
        sent[w] += 1
        worker_of[req.rid] = w
        reqs.append(req)
        if engine._pending is None:
            engine._gpu_free_at = max(engine._gpu_free_at, t)
            engine._advance(t)

    while True:
        t_arrival = jobs[nxt].arrival if nxt < n else inf
        t_batch = min((e._pending.end for e in engines if e._pending is not None), default=inf)
        t = min(t_arrival, t_batch, placement.next_due())
        if t == inf:
            break
        if next_tick <= t:
            clock.now = next_tick
            placement.tick(next_tick)
            next_tick += placement.tick_secs
            continue
        clock.now = t
        for engine in engines:
            if engine._pending is not None and engine._pending.end <= t:
                engine._advance(t)
        while nxt < n and jobs[nxt].arrival <= t:
            job = jobs[nxt]
            nxt += 1
            w = placement.choose(job, t)
            if w is not None:
                submit(job, w, t)
        for job, w in placement.take_due(t):
            submit(job, w, t)
    done = [r for r in reqs if r.first_token_time is not None and r.finish_time is not None]
    # From the job's arrival, not the engine's: a placement may decide later (take_due).
    sent_at = {r.rid: by_rid[r.rid].arrival for r in done}
    ttfts = [(r.first_token_time - sent_at[r.rid]) * 1000 for r in done]  # type: ignore[operator]
    e2es = [(r.finish_time - sent_at[r.rid]) * 1000 for r in done]  # type: ignore[operator]
    prompt = sum(r.prompt_tokens for r in done)
    work = [0] * workers
    for r in done:
        work[worker_of[r.rid]] += r.prompt_tokens - r.cached_tokens
    return Result(
        placement_name,
        percentile(ttfts, 50),
        percentile(ttfts, 99),
        percentile(e2es, 50),
        percentile(e2es, 99),
        sum(r.cached_tokens for r in done) / prompt if prompt else 0.0,
        max_over_mean(sent),
        errors + len(reqs) - len(done),
        tuple(ttfts),
        max_over_mean(work),
    )


def set_constant(assignment: str, *modules: object) -> bool:
    """``--set NAME=VALUE``: set the first of ``modules``' upper-case constants ``NAME`` to
    ``VALUE`` (of the constant's own type); False when none has it."""
    name, _, value = assignment.partition("=")
    for module in modules:
        if name.isupper() and hasattr(module, name):
            kind = type(getattr(module, name))
            if kind is bool:  # bool("0") is True
                setattr(module, name, value.lower() not in ("0", "false", "no", "off", ""))
            else:
                setattr(module, name, float(value) if kind is int and "." in value else kind(value))
            return True
    return False


def point_jobs(point: grid.Point, slice_count: int | None, speedup: float) -> tuple[str, list[Job]]:
    workload = grid.middle_slice(trace_workload(point.trace), slice_count)
    return workload.name, build_jobs(workload, speedup)


@dataclass(frozen=True)
class Row:
    """One placement on one point: the median over the jitter seeds, and the p99's range."""

    median: Result
    p99_low: float
    p99_high: float
    seeds: int


def median_row(runs: Sequence[Result]) -> Row:
    def mid(field: str) -> float:
        return percentile([getattr(r, field) for r in runs], 50)

    first = runs[0]
    median = Result(
        first.placement,
        mid("ttft_p50"),
        mid("ttft_p99"),
        mid("e2e_p50"),
        mid("e2e_p99"),
        mid("hit_ratio"),
        mid("imbalance"),
        max(r.errors for r in runs),
        first.ttfts,
        mid("work_imbalance"),
    )
    p99s = [r.ttft_p99 for r in runs]
    return Row(median, min(p99s), max(p99s), len(runs))


def run_point(
    point: grid.Point,
    placements: Sequence[str],
    *,
    slice_count: int | None = 350,
    workers: int = 8,
    speedup: float = 10.0,
    jitter_ms: float = 0.0,
    seeds: int = 1,
) -> tuple[str, float, list[Row]]:
    """Every placement on one point: (workload name, TTFT floor p99 in ms, rows). With
    ``jitter_ms``, each placement runs ``seeds`` times over the same wobbled send times."""
    name, jobs = point_jobs(point, slice_count, speedup)
    workload = grid.middle_slice(trace_workload(point.trace), slice_count)
    floor = grid.ttft_floor_ms(workload.requests, speedup / point.load)
    variants = [jittered(jobs, jitter_ms / 1000, seed) for seed in range(seeds if jitter_ms else 1)]
    rows = [
        median_row([replay(v, p, workers, point.kv_tokens, speedup / point.load) for v in variants])
        for p in placements
    ]
    return name, percentile(floor, 99), rows


def table(point: grid.Point, name: str, floor_p99: float, rows: Sequence[Row]) -> str:
    base = next((r.median for r in rows if r.median.placement == "cache_aware"), None)
    spread = any(r.seeds > 1 for r in rows)
    lines = [
        f"**{point.name}** ({name}; TTFT floor p99 {floor_p99:,.0f} ms"
        + (f"; medians of {rows[0].seeds} jittered runs" if spread else "")
        + ")",
        "",
        "| placement | TTFT p50 | TTFT p99 | E2E p50 | E2E p99 | hit | max/mean req "
        "| max/mean prefill | p99 / cache_aware |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row.median
        ratio = f"{r.ttft_p99 / base.ttft_p99:.2f}x" if base and base.ttft_p99 else "-"
        p99 = f"{r.ttft_p99:,.0f}"
        if spread:
            p99 += f" ({row.p99_low:,.0f}-{row.p99_high:,.0f})"
        lines.append(
            f"| {r.placement} | {r.ttft_p50:,.0f} | {p99} | {r.e2e_p50:,.0f} | "
            f"{r.e2e_p99:,.0f} | {r.hit_ratio:.3f} | {r.imbalance:.2f} | "
            f"{r.work_imbalance:.2f} | {ratio} |" + (f" errors {r.errors}" if r.errors else "")
        )
    return "\n".join(lines)


def summarize(records: Sequence[dict[str, object]]) -> str:
    """Where ``least_ttft``'s estimate departs from the oracle's (:func:`diagnose`): per term,
    the median and p90 of predicted - true (ms) over every (decision, worker), and over the
    decisions whose pick was the most costly, what the policy believed of its pick and of
    the oracle's."""
    terms: dict[str, list[float]] = {
        "first (all)": [],
        "queue vs busy+ahead": [],
        "queue vs ahead (idle GPU)": [],
        "decode vs busy (decode step)": [],
        "own vs own": [],
        "actual - oracle (pick)": [],
    }
    regrets = []
    for rec in records:
        rows: list[dict] = rec["workers"]  # type: ignore[assignment]
        for row in rows:
            o = row["oracle"]
            terms["first (all)"].append(1000 * (row["predicted"] - o["first"]))
            terms["queue vs busy+ahead"].append(1000 * (row["queue"] - o["busy"] - o["ahead"]))
            if not o["busy"]:
                terms["queue vs ahead (idle GPU)"].append(1000 * (row["queue"] - o["ahead"]))
            if o["decoding"]:
                terms["decode vs busy (decode step)"].append(1000 * (row["decode"] - o["busy"]))
            terms["own vs own"].append(1000 * (row["own"] - o["own"]))
        chosen = rows[int(rec["chosen"])]  # type: ignore[call-overload]
        if "actual" in rec:
            terms["actual - oracle (pick)"].append(
                1000 * (float(rec["actual"]) - chosen["oracle"]["first"])  # type: ignore[arg-type]
            )
        best = min(rows, key=lambda r: r["oracle"]["first"])
        regrets.append((chosen["oracle"]["first"] - best["oracle"]["first"], rec, chosen, best))
    lines = ["| predicted - true (ms) | n | p10 | median | p90 |", "|---|---|---|---|---|"]
    for name, values in terms.items():
        if values:
            lines.append(
                f"| {name} | {len(values)} | {percentile(values, 10):+,.0f} | "
                f"{percentile(values, 50):+,.0f} | {percentile(values, 90):+,.0f} |"
            )
    regrets.sort(key=lambda x: -x[0])
    lines += [
        "",
        "Costliest picks (ms; pick / oracle's best: queue, decode, own as predicted | busy, "
        "ahead, own as true):",
    ]
    for regret, rec, chosen, best in regrets[:8]:

        def cut(r: dict) -> str:
            o = r["oracle"]
            return (
                f"{1000 * r['queue']:,.0f} {1000 * r['decode']:,.0f} {1000 * r['own']:,.0f} | "
                f"{1000 * o['busy']:,.0f} {1000 * o['ahead']:,.0f} {1000 * o['own']:,.0f}"
                f" (run {o['running']:.0f} wait {o['waiting']:.0f} cached {o['cached']:,.0f})"
            )

        lines.append(
            f"- job {rec['job']} prompt {rec['prompt']:,} regret {1000 * regret:,.0f}: "
            f"pick {cut(chosen)}; best {cut(best)}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--point", action="append", default=[], help="TRACE:KV:LOAD (repeatable)")
    parser.add_argument("--five", action="store_true", help="Issue 14's five points with room.")
    parser.add_argument("--traces-dir", type=Path, default=grid.TRACES_DIR)
    parser.add_argument("--slice", type=int, default=350, help="Middle requests (0: all).")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--speedup", type=float, default=10.0, help="Trace time compression.")
    parser.add_argument("--placements", default=",".join(PLACEMENTS))
    parser.add_argument(
        "--jitter-ms", type=float, default=0.0, help="Delay each send by up to this (seeded)."
    )
    parser.add_argument("--seeds", type=int, default=5, help="Jittered runs (with --jitter-ms).")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="Set a least_ttft module constant for this run (e.g. PAIR_WEIGHT=0: the policy "
        "before the attention term); repeatable.",
    )
    parser.add_argument(
        "--diagnose",
        type=Path,
        metavar="JSONL",
        help="Also replay least_ttft once per point (no jitter) logging, per decision and "
        "worker, its predicted first token by term beside the oracle's and the actual one: "
        "records to JSONL, a summary printed.",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the engines' "KV cache full" warnings: no news
    for item in args.set:
        if not set_constant(item, least_ttft):
            parser.error(f"--set {item!r}: least_ttft has no such constant")
    texts = list(args.point) + (list(FIVE) if args.five else [])
    if not texts:
        parser.error("no points: --point TRACE:KV:LOAD or --five")
    placements = args.placements.split(",")
    for text in texts:
        point = grid.parse_point(text, args.traces_dir)
        started = time.monotonic()
        name, floor_p99, results = run_point(
            point,
            placements,
            slice_count=args.slice or None,
            workers=args.workers,
            speedup=args.speedup,
            jitter_ms=args.jitter_ms,
            seeds=args.seeds,
        )
        print(table(point, name, floor_p99, results))
        if args.diagnose is not None:
            _, jobs = point_jobs(point, args.slice or None, args.speedup)
            records: list[dict[str, object]] = []
            replay(
                jobs,
                "least_ttft",
                args.workers,
                point.kv_tokens,
                args.speedup / point.load,
                records=records,
            )
            with args.diagnose.open("a") as out:
                for rec in records:
                    out.write(json.dumps({"point": point.name, **rec}) + "\n")
            print(f"\nleast_ttft's estimate against the oracle, {point.name}:\n")
            print(summarize(records))
        print(f"({time.monotonic() - started:.1f} s)\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
