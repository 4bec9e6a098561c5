"""Routing policies and the worker registry, without a network."""

from __future__ import annotations

import random

import pytest
from support import async_wait_until

from sglctl.router.circuit_breaker import CircuitBreaker
from sglctl.router.config import RouterConfig
from sglctl.router.policies import (
    CacheAwarePolicy,
    PowerOfTwoPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    RouteKey,
    ShortestQueuePolicy,
    make_policy,
)
from sglctl.router.workers import DuplicateWorkerError, UnknownWorkerError, Worker, WorkerRegistry


def workers(n: int) -> list[Worker]:
    return [Worker(f"http://w{i}") for i in range(n)]


def key(text: str) -> RouteKey:
    return RouteKey(text=text)


# -- registry -------------------------------------------------------------------------------
def test_registry_add_remove_duplicate_unknown() -> None:
    reg = WorkerRegistry()
    events: list[tuple[str, str]] = []
    reg.add_listener(lambda event, w: events.append((event, w.url)))
    w = reg.add("http://a:1/")
    assert w.url == "http://a:1"
    assert reg.get("http://a:1") is w
    assert reg.find(w.id) is w
    with pytest.raises(DuplicateWorkerError):
        reg.add("http://a:1")
    with pytest.raises(UnknownWorkerError):
        reg.remove("http://b:1")
    assert reg.remove("http://a:1") is w
    assert events == [("added", "http://a:1"), ("removed", "http://a:1")]
    assert reg.all() == []


def test_routable_needs_health_availability_and_breaker() -> None:
    reg = WorkerRegistry(lambda url: CircuitBreaker(failure_threshold=1, timeout_secs=60))
    a, b, c, d = (reg.add(f"http://{n}") for n in "abcd")
    b.health_ok = False
    reg.set_available("http://c", False)
    d.breaker.record_failure()  # opens after one failure
    assert reg.routable() == [a]
    reg.set_available("http://c", True)
    assert reg.routable() == [a, c]


# -- simple policies ------------------------------------------------------------------------
def test_load_slot_counts_until_released_and_frees_only_once() -> None:
    worker = Worker("http://127.0.0.1:1")
    release = worker.take_load_slot()
    other = worker.take_load_slot()
    assert (worker.in_flight, worker.requests_total) == (2, 2)
    release(200, True)
    release(200, True)  # a second exit path of the same request must not free another slot
    assert worker.in_flight == 1
    other(0, False)
    assert (worker.in_flight, worker.requests_total) == (0, 2)


def test_round_robin_cycles() -> None:
    ws = workers(3)
    policy = RoundRobinPolicy()
    assert [policy.select(ws).url for _ in range(6)] == [w.url for w in ws] * 2  # type: ignore[union-attr]


def test_random_uses_every_worker() -> None:
    ws = workers(3)
    policy = RandomPolicy(random.Random(1))
    assert {policy.select(ws).url for _ in range(100)} == {w.url for w in ws}  # type: ignore[union-attr]


def test_power_of_two_prefers_the_less_loaded_of_two() -> None:
    ws = workers(2)
    ws[0].in_flight = 5
    policy = PowerOfTwoPolicy(random.Random(0))
    assert all(policy.select(ws) is ws[1] for _ in range(20))


def test_shortest_queue_picks_minimum() -> None:
    ws = workers(4)
    for w, load in zip(ws, [3, 1, 2, 1], strict=True):
        w.in_flight = load
    policy = ShortestQueuePolicy(random.Random(0))
    assert {policy.select(ws).url for _ in range(50)} == {"http://w1", "http://w3"}  # type: ignore[union-attr]


def test_empty_list_gives_none() -> None:
    for policy in (
        RoundRobinPolicy(),
        RandomPolicy(),
        PowerOfTwoPolicy(),
        ShortestQueuePolicy(),
        CacheAwarePolicy(),
    ):
        assert policy.select([], key("x")) is None


def test_factory_builds_every_policy() -> None:
    config = RouterConfig()
    names = ["cache_aware", "round_robin", "random", "power_of_two", "shortest_queue"]
    assert [make_policy(n, config).name for n in names] == names
    with pytest.raises(ValueError):
        make_policy("manual", config)


# -- cache-aware ----------------------------------------------------------------------------
def cache_aware(**kwargs: object) -> CacheAwarePolicy:
    return CacheAwarePolicy(block=8, **kwargs)  # type: ignore[arg-type]


def test_same_prefix_goes_to_the_same_worker() -> None:
    ws = workers(2)
    policy = cache_aware()
    system = "You are a terse assistant that answers in French. " * 6
    first = policy.select(ws, key(system + "What is 2+2?"))
    for question in ("Capital of Spain?", "Why is the sky blue?", "Name a prime."):
        assert policy.select(ws, key(system + question)) is first
    assert policy.cache_hits == 3


def test_new_prefixes_spread_to_the_smallest_tree() -> None:
    ws = workers(2)
    policy = cache_aware()
    a = policy.select(ws, key("alpha " * 40))
    b = policy.select(ws, key("bravo " * 40))
    assert a is not b
    assert policy.cache_misses == 2


def test_low_match_rate_below_threshold_is_a_miss() -> None:
    ws = workers(2)
    policy = cache_aware(cache_threshold=0.5)
    shared = "s" * 80
    first = policy.select(ws, key(shared + "a" * 400))
    # Only 80 of 480 characters shared: under the threshold, so the smallest tree (the other one).
    second = policy.select(ws, key(shared + "b" * 400))
    assert second is not first


def test_imbalance_falls_back_to_shortest_queue() -> None:
    ws = workers(2)
    policy = cache_aware(balance_abs_threshold=4, balance_rel_threshold=1.5)
    prompt = "shared prefix " * 30
    hot = policy.select(ws, key(prompt))
    assert hot is not None
    other = ws[1] if hot is ws[0] else ws[0]
    hot.in_flight = 3  # 3 - 0 = 3 <= 4: balanced, stick to the cache
    assert policy.select(ws, key(prompt)) is hot
    hot.in_flight = 10  # 10 - 0 > 4 and 10 > 0 * 1.5: imbalanced
    assert policy.select(ws, key(prompt)) is other
    assert policy.balance_fallbacks == 1


def test_removed_worker_loses_its_tenant() -> None:
    reg = WorkerRegistry()
    policy = cache_aware()
    reg.add_listener(
        lambda e, w: policy.on_worker_added(w) if e == "added" else policy.on_worker_removed(w)
    )
    a, _b = reg.add("http://a"), reg.add("http://b")
    prompt = "remember me " * 20
    chosen = policy.select(reg.routable(), key(prompt))
    assert chosen is not None
    assert policy.tree.size(chosen.url) > 0
    reg.remove(chosen.url)
    assert policy.tree.size(chosen.url) == 0
    assert chosen.url not in policy.tree.tenants()
    del a


def test_groups_each_stick_to_one_worker_and_use_every_worker() -> None:
    ws = workers(3)
    policy = cache_aware()
    rng = random.Random(7)
    prefixes = [f"group {g} system prompt " * 12 for g in range(8)]
    served: dict[int, set[str]] = {g: set() for g in range(8)}
    for _ in range(200):
        g = rng.randrange(8)
        chosen = policy.select(ws, key(prefixes[g] + f"question {rng.random()}"))
        served[g].add(chosen.url)  # type: ignore[union-attr]
    assert all(len(urls) == 1 for urls in served.values()), served
    assert set().union(*served.values()) == {w.url for w in ws}


def test_token_ids_are_routed_by_prefix_too() -> None:
    ws = workers(2)
    policy = cache_aware()
    ids = list(range(500))
    first = policy.select(ws, RouteKey(input_ids=[*ids, 1, 2, 3]))
    assert policy.select(ws, RouteKey(input_ids=[*ids, 9, 9])) is first


def test_requests_without_text_go_to_the_least_loaded() -> None:
    ws = workers(2)
    ws[0].in_flight = 2
    assert cache_aware().select(ws, RouteKey()) is ws[1]


def test_eviction_bounds_every_tree() -> None:
    ws = workers(2)
    policy = cache_aware(max_tree_size=800)
    for i in range(100):
        policy.select(ws, key(f"{i:05d}" + "z" * 100))
    policy.evict_once()
    assert all(policy.tree.size(w.url) <= 800 for w in ws)


def test_background_eviction_task_trims_the_tree() -> None:
    import asyncio

    async def scenario() -> None:
        ws = workers(2)
        policy = CacheAwarePolicy(block=8, max_tree_size=400, eviction_interval_secs=0.01)
        for i in range(50):
            policy.select(ws, key(f"{i:05d}" + "y" * 100))
        assert policy.tree.total_size() > 800
        task = asyncio.create_task(policy.run_background())
        try:
            await async_wait_until(
                lambda: policy.tree.total_size() <= 800, what="the eviction to run"
            )
        finally:
            task.cancel()
        assert all(policy.tree.size(w.url) <= 400 for w in ws)

    asyncio.run(scenario())
