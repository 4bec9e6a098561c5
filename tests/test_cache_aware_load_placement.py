"""cache_aware ``--placement load`` (the default): a miss goes to the least loaded worker (ties:
the smallest tree), as the SGLang Router 0.3.x does, instead of the smallest tree whatever its
load (``--placement tree``).

The smallest-tree rule piled most of a trace's misses on one busy worker (issue 14, the E2E p50
gap); these tests pin the difference down on the policy alone.
"""

from __future__ import annotations

import time

import pytest

from sglctl.router.flags import parse_args
from sglctl.router.load_poll import WorkerLoad
from sglctl.router.policies import CacheAwarePolicy, make_policy
from sglctl.router.policies.base import RouteKey
from sglctl.router.workers import Worker


def fleet(n: int, **kwargs: object) -> tuple[CacheAwarePolicy, list[Worker]]:
    policy = CacheAwarePolicy(block=8, **kwargs)  # type: ignore[arg-type]
    workers = [Worker(f"http://127.0.0.{i + 2}:8000") for i in range(n)]
    for w in workers:
        policy.on_worker_added(w)
    return policy, workers


def key(text: str) -> RouteKey:
    return RouteKey(text=text)


def test_a_miss_goes_to_the_least_loaded_worker_even_with_the_biggest_tree() -> None:
    policy, ws = fleet(3, placement="load")
    policy.select(ws, key("a" * 4000))  # a big tree, somewhere
    big = max(ws, key=lambda w: policy.tree.size(w.url))
    for w in ws:
        w.in_flight = 0 if w is big else 5
    chosen = policy.select(ws, key("fresh prompt " * 20))
    assert chosen is big
    assert policy.last_decision == "cache_miss"
    assert policy.cache_misses == 2


def test_the_smallest_tree_rule_ignores_load() -> None:
    """``tree`` keeps the documented rule: the same situation, the other answer."""
    policy, ws = fleet(3, placement="tree")
    policy.select(ws, key("a" * 4000))
    big = max(ws, key=lambda w: policy.tree.size(w.url))
    for w in ws:
        w.in_flight = 0 if w is big else 5
    assert policy.select(ws, key("fresh prompt " * 20)) is not big


def test_ties_in_load_go_to_the_smallest_tree_so_an_idle_fleet_still_spreads() -> None:
    policy, ws = fleet(4, placement="load")
    chosen = {policy.select(ws, key(f"conversation {i} " * 30)) for i in range(4)}
    assert chosen == set(ws)  # all idle: four new prefixes, four workers


def test_a_match_above_the_threshold_still_follows_the_tree() -> None:
    policy, ws = fleet(2, placement="load")
    system = "You are a terse assistant that answers in French. " * 6
    owner = policy.select(ws, key(system + "What is 2+2?"))
    assert owner is not None
    owner.in_flight = 7  # busier, but below the imbalance threshold (32)
    assert policy.select(ws, key(system + "Capital of Spain?")) is owner
    assert policy.last_decision == "cache_hit"


def test_load_placement_reads_the_workers_own_load_when_corrected() -> None:
    """With ``--worker-load-correction`` the load that picks the worker is the corrected one."""
    policy, ws = fleet(2, placement="load", load_from_workers=True)
    now = time.monotonic()
    # Nothing in flight from this router, but the first worker reports 9 requests of its own.
    policy.worker_loads = {
        ws[0].url: WorkerLoad(num_reqs=9, num_waiting_reqs=0, num_tokens=0, at=now)
    }
    assert policy.select(ws, key("fresh prompt " * 20)) is ws[1]


def test_load_is_the_default_and_tree_still_a_flag() -> None:
    for argv, expected in (([], "load"), (["--placement", "tree"], "tree")):
        config = parse_args(["--worker-urls", "http://127.0.0.2:1", *argv])
        policy = make_policy("cache_aware", config)
        assert isinstance(policy, CacheAwarePolicy)
        assert policy.placement == expected
    with pytest.raises(ValueError, match="placement must be one of"):
        CacheAwarePolicy(placement="nearest")


def test_with_router_peers_misses_spread_over_near_least_loaded_workers_not_one() -> None:
    """Router peers (``tie_rng``): replicas hold the same trees and learn each other's
    dispatches a moment late, so the smallest-tree tie-break sent concurrent misses of two
    replicas to one worker. With the jitter, two replicas that see the same loads place the
    same misses on different workers most of the time, and never on a worker two requests
    above the least loaded."""
    import random

    def replica(seed: int) -> tuple[CacheAwarePolicy, list[Worker]]:
        policy, ws = fleet(8, placement="load")
        policy.tie_rng = random.Random(seed)
        for i, w in enumerate(ws):
            w.in_flight = 2 if i < 4 else 4  # four least loaded, four two above
        return policy, ws

    (a, wa), (b, wb) = replica(1), replica(2)
    same = 0
    for i in range(200):
        text = f"fresh conversation {i} " * 20
        pa, pb = a.select(wa, key(text)), b.select(wb, key(text))
        assert pa is not None and pb is not None
        assert wa.index(pa) < 4 and wb.index(pb) < 4  # never two above the least loaded
        same += wa.index(pa) == wb.index(pb)
        a.tree.clear()
        b.tree.clear()
    # Without the jitter both pick the same (smallest tree, then order): 200 of 200.
    assert same < 100, same
