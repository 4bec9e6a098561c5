"""``--placement hash``: router replicas agree on where a new prefix goes, by construction."""

from __future__ import annotations

import time

import pytest

from sglctl.router.flags import parse_args
from sglctl.router.load_poll import WorkerLoad
from sglctl.router.policies import CacheAwarePolicy, RouteKey, make_policy
from sglctl.router.policies import placement as pl
from sglctl.router.tree import PrefixHasher
from sglctl.router.workers import Worker

SYSTEM = "You are a helpful assistant. Answer briefly and cite sources. " * 40  # ~2.5k chars


def workers(n: int) -> list[Worker]:
    return [Worker(f"http://10.0.0.{i}:30000") for i in range(2, 2 + n)]


def conversation(i: int, turns: int = 1) -> str:
    """A prompt sharing SYSTEM with every other, then conversation ``i``'s own turns."""
    own = "".join(
        f"[conv {i} turn {t}] " + f"user {i} asks about topic {t}. " * 100 for t in range(turns)
    )
    return SYSTEM + own


def hashed(**kwargs: object) -> CacheAwarePolicy:
    return CacheAwarePolicy(placement="hash", **kwargs)  # type: ignore[arg-type]


def test_two_replicas_place_the_same_new_prefix_on_the_same_worker() -> None:
    pool = workers(8)
    a, b = hashed(), hashed()
    # Replica b has routed other traffic first and lists the workers in another order: its
    # tree sizes and loads differ, yet it must agree on every prefix new to it.
    for i in range(100, 140):
        b.select(pool, RouteKey(text=conversation(i)))
    chosen_a = [a.select(pool, RouteKey(text=conversation(i))).url for i in range(40)]
    chosen_b = [b.select(pool[::-1], RouteKey(text=conversation(i))).url for i in range(40)]
    assert chosen_a == chosen_b
    assert len(set(chosen_a)) >= 6, "new prefixes must spread over the workers"
    # The control: placing by tree size, the same two histories disagree.
    ta, tb = CacheAwarePolicy(), CacheAwarePolicy()
    for i in range(100, 140):
        tb.select(pool, RouteKey(text=conversation(i)))
    tree_a = [ta.select(pool, RouteKey(text=conversation(i))).url for i in range(40)]
    tree_b = [tb.select(pool[::-1], RouteKey(text=conversation(i))).url for i in range(40)]
    assert tree_a != tree_b


def test_later_turns_share_the_key_but_conversations_behind_one_system_prompt_do_not() -> None:
    hasher = PrefixHasher()

    def key_of(text: str) -> int | None:
        return pl.placement_key(hasher.text(text))

    assert key_of(conversation(1, turns=1)) == key_of(conversation(1, turns=3))
    keys = {key_of(conversation(i)) for i in range(50)}
    assert len(keys) == 50, "the key must reach past the shared system prompt"
    assert key_of("") is None
    # A short prompt (no full block) still gets a key: its only, partial block.
    assert key_of("hi") is not None


def test_a_worker_leaving_moves_only_its_own_keys_and_a_joining_one_takes_only_new_ones() -> None:
    pool = workers(8)
    keys = [pl._mix(k + 1) for k in range(2000)]
    before = {k: pl.ranked(k, pool)[0].url for k in keys}
    gone = pool[3]
    after = {k: pl.ranked(k, [w for w in pool if w is not gone])[0].url for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == gone.url for k in moved)
    assert len(moved) == sum(1 for k in keys if before[k] == gone.url)
    # Every worker owns a fair share (rendezvous spreads keys evenly): 250 expected each.
    shares = [sum(1 for k in keys if before[k] == w.url) for w in pool]
    assert min(shares) > 150 and max(shares) < 350, shares
    newcomer = Worker("http://10.0.0.99:30000")
    joined = {k: pl.ranked(k, [*pool, newcomer])[0].url for k in keys}
    taken = [k for k in keys if joined[k] != before[k]]
    assert taken and all(joined[k] == newcomer.url for k in taken)


def test_bounded_load_skips_an_overloaded_owner_for_its_second_choice() -> None:
    pool = workers(4)
    key = pl.placement_key(PrefixHasher().text(conversation(7)))
    assert key is not None
    first, second = pl.ranked(key, pool)[:2]
    assert pl.choose(key, pool, epsilon=0.25) is first
    # Loads 5,5,5,5: the owner may take one more (cap = ceil(1.25 * 21 / 4) = 7).
    for w in pool:
        w.in_flight = 5
    assert pl.choose(key, pool, epsilon=0.25) is first
    # The owner at 9, the others at 3: cap = ceil(1.25 * 19 / 4) = 6, so it is skipped.
    for w in pool:
        w.in_flight = 3
    first.in_flight = 9
    assert pl.choose(key, pool, epsilon=0.25) is second
    # A huge epsilon never skips.
    assert pl.choose(key, pool, epsilon=10.0) is first


def test_the_tree_and_load_imbalance_still_come_first() -> None:
    pool = workers(4)
    policy = hashed(balance_abs_threshold=4, balance_rel_threshold=1.0)
    text = conversation(3)
    owner = pl.ranked(pl.placement_key(policy.prefixes(RouteKey(text=text))) or 0, pool)[0]
    other = next(w for w in pool if w is not owner)
    # The prefix is in another worker's tree: a good match follows the tree.
    policy.tree.insert(policy.prefixes(RouteKey(text=text)), other.url)
    assert policy.select(pool, RouteKey(text=text)) is other
    assert policy.last_decision == "cache_hit"
    # Imbalanced loads: the least loaded wins, whatever the tree or the hash say.
    for w in pool:
        w.in_flight = 10
    idle = next(w for w in pool if w is not other and w is not owner)
    idle.in_flight = 0
    assert policy.select(pool, RouteKey(text=conversation(4))) is idle
    assert policy.last_decision == "balance_fallback"


def test_flags_build_a_hash_placing_policy_and_bad_values_are_refused() -> None:
    config = parse_args(["--placement", "hash", "--placement-epsilon", "0.5"])
    policy = make_policy("cache_aware", config)
    assert isinstance(policy, CacheAwarePolicy)
    assert (policy.placement, policy.placement_epsilon) == ("hash", 0.5)
    assert CacheAwarePolicy().placement == "tree"  # the default is unchanged
    with pytest.raises(SystemExit):
        parse_args(["--placement", "ring"])
    with pytest.raises(ValueError, match="placement"):
        CacheAwarePolicy(placement="ring")


# Two real router processes agreeing, and one restarted: tests/test_replicas.py.


def test_the_bound_reads_the_load_it_is_given_and_agrees_across_replicas() -> None:
    """Two replicas with different own counts but the same worker reports skip the same owner."""
    pool_a, pool_b = workers(4), workers(4)
    key = pl.placement_key(PrefixHasher().text(conversation(11)))
    assert key is not None
    owner, second = (w.url for w in pl.ranked(key, pool_a)[:2])
    # Each worker reports 4 requests, the owner 12 (mostly the *other* replicas' traffic).
    reported = {w.url: (12 if w.url == owner else 4) for w in pool_a}

    def shared(w: Worker) -> int:
        return max(w.in_flight, reported[w.url])

    # Replica a alone sees nothing in flight: by its own counts the owner is free...
    assert pl.choose(key, pool_a, epsilon=0.5).url == owner
    # ...but the shared loads put it over ceil(1.5 * 25 / 4) = 10: skipped, on both replicas,
    # whatever each one has in flight itself.
    assert pl.capacity(pool_a, 0.5, shared) == 10
    pool_b[1].in_flight = 3
    assert pl.choose(key, pool_a, epsilon=0.5, load=shared).url == second
    assert pl.choose(key, pool_b, epsilon=0.5, load=shared).url == second


def test_hash_placement_polls_the_workers_and_skips_one_other_replicas_fill() -> None:
    pool = workers(4)
    policy = hashed(placement_epsilon=0.5)
    assert policy.uses_worker_loads, "--placement hash must turn the /get_load poller on"
    assert make_policy("cache_aware", parse_args([])).uses_worker_loads is False
    text = conversation(21)
    key = pl.placement_key(policy.prefixes(RouteKey(text=text)))
    assert key is not None
    owner, second = pl.ranked(key, pool)[:2]
    now = time.monotonic()
    fresh = {w.url: WorkerLoad(12 if w is owner else 4, 0, 0, now) for w in pool}
    policy.worker_loads = fresh
    assert policy.select(pool, RouteKey(text=text)) is second
    # The same reports, stale (the poller is late or the worker stopped answering): the
    # replica's own counts (all 0) decide, and the owner is chosen again.
    other = hashed(placement_epsilon=0.5)
    other.worker_loads = {u: WorkerLoad(r.num_reqs, 0, 0, now - 60.0) for u, r in fresh.items()}
    assert other.select(pool, RouteKey(text=text)) is owner
    # The imbalance check keeps reading the own counts unless --worker-load-correction is on.
    assert policy.load_of()(owner) == 0


def test_a_worker_holding_one_request_is_never_skipped() -> None:
    """At low load a single (perhaps already finished, stale-reported) request must not move
    a conversation off its owner: replicas reading reports a poll apart would disagree."""
    pool = workers(4)
    key = pl.placement_key(PrefixHasher().text(conversation(41)))
    assert key is not None
    owner = pl.ranked(key, pool)[0]
    owner.in_flight = 1  # ceil(2 * 2 / 4) = 1 would skip it
    assert pl.capacity(pool, 1.0) == pl.MIN_CAPACITY
    assert pl.choose(key, pool, epsilon=1.0) is owner
    assert pl.choose(key, pool, epsilon=0.0) is owner
    owner.in_flight = 2  # two while the others hold none: over the floor, skipped at epsilon 0
    assert pl.choose(key, pool, epsilon=0.0) is not owner
