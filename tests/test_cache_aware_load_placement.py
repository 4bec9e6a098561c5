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


def test_router_peers_stagger_misses_by_rank_and_never_hits() -> None:
    """Router peers (``stagger_by``): replica r of N waits ``r * secs`` before placing a
    request that no tree holds (a miss, or the imbalance fallback), so that a burst reaching
    every replica at once is placed in turn; a hit, the first rank, a lone replica and an
    unstaggered policy choose at once."""
    from sglctl.router.policies.cache_aware import STAGGER_SECS

    policy, ws = fleet(4, placement="load")
    new, old = key("a new conversation " * 20), key("an old conversation " * 20)
    policy.select(ws, old)
    assert not policy.miss_delays and policy.miss_delay(ws, new) == 0.0  # not staggered
    rank = (2, 3)
    policy.stagger_by(lambda: rank)
    assert policy.miss_delays and policy.stagger_secs == STAGGER_SECS > 0
    assert policy.miss_delay(ws, new) == pytest.approx(2 * STAGGER_SECS)
    assert policy.miss_delay(ws, old) == 0.0  # a hit: its worker is known, nothing to wait
    assert policy.miss_delay(ws[:1], new) == 0.0  # one worker: no choice to make
    assert policy.miss_delay(ws, RouteKey()) == 0.0  # no text: no prefix to place
    ws[0].in_flight = 100  # the fallback places by load too, so it waits its turn as well
    assert policy.miss_delay(ws, old) == pytest.approx(2 * STAGGER_SECS)
    ws[0].in_flight = 0
    rank = (0, 3)
    assert policy.miss_delay(ws, new) == 0.0  # the first rank never waits
    # The select after the delay reuses the prompt's hashes (no second hashing of it) and
    # places it as one router would.
    policy.stagger_by(lambda: (1, 2), secs=0.25)
    assert policy.miss_delay(ws, new) == 0.25
    assert policy.prefixes(new) is policy._hashed[1]  # type: ignore[index]
    chosen = policy.select(ws, new)
    assert chosen is not None and policy.last_decision == "cache_miss"
    policy.stagger_by(lambda: (1, 2), secs=0.0)  # --router-peers-stagger-secs 0: off
    assert not policy.miss_delays and policy.miss_delay(ws, key("another " * 20)) == 0.0


def test_a_staggered_burst_is_placed_as_one_router_places_it() -> None:
    """Two replicas that see the same loads and trees, each given two misses of one burst:
    unstaggered, both place theirs on the same two least loaded workers (each blind to the
    other's picks); staggered, the second rank decides after the first's routes and loads
    reached it, and the four misses land on four workers, as through one router."""

    def burst(staggered: bool) -> set[int]:
        (a, wa), (b, wb) = fleet(4, placement="load"), fleet(4, placement="load")
        for policy, rank in ((a, 0), (b, 1)):
            policy.current_loads = True
            if staggered:
                policy.stagger_by(lambda rank=rank: (rank, 2))  # type: ignore[misc]
        texts = [f"burst prompt {i} " * 20 for i in range(4)]
        picks: list[tuple[int, str]] = []
        later: list[RouteKey] = []
        for i, text in enumerate(texts):  # a gets 0 and 2, b gets 1 and 3, all at once
            policy, ws = (a, wa) if i % 2 == 0 else (b, wb)
            if policy.miss_delay(ws, key(text)) > 0:
                later.append(key(text))
                continue
            w = policy.select(ws, key(text))
            assert w is not None
            w.in_flight += 1
            picks.append((0 if policy is a else 1, w.url))
        # What the peers tell each other: routes (observe) and in-flight counts.
        for src, url in picks:
            for w in wb if src == 0 else wa:
                if w.url == url:
                    w.told_in_flight += 1
        for k in later:  # b's deferred misses, after a's word arrived
            w = b.select(wb, k)
            assert w is not None
            w.in_flight += 1
            picks.append((1, w.url))
        return {int(url.split(".")[3].split(":")[0]) for _, url in picks}

    assert len(burst(staggered=True)) == 4
    assert len(burst(staggered=False)) == 2  # the herd the stagger prevents
