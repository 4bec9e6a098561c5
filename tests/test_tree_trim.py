"""Trimming the prefix tree from what the workers report (cached_tokens)."""

from __future__ import annotations

import random
import string

from sglctl.router.policies import LeastTTFTPolicy
from sglctl.router.policies.base import RouteKey
from sglctl.router.policies.reports import cached_tokens, tokens_to_units, units_to_tokens
from sglctl.router.tree import PrefixHasher, PrefixTree
from sglctl.router.workers import Worker

W = "http://127.0.0.2:8000"


def text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters) for _ in range(n))


def test_trim_keeps_the_reported_blocks() -> None:
    hasher, tree = PrefixHasher(64), PrefixTree(64)
    p = hasher.text(text(640, 1))  # 10 blocks
    tree.insert(p, W)
    assert tree.trim(p, W, 4) == 6
    assert tree.match_blocks(p, W) == 4
    assert tree.trim(p, W, 4) == 0  # nothing left to drop
    assert tree.trim(p, "http://unknown:1", 0) == 0


def test_forget_older_drops_what_an_lru_cache_evicted_first() -> None:
    hasher, tree = PrefixHasher(64), PrefixTree(64)
    old, evicted, new = (hasher.text(text(320, s)) for s in (1, 2, 3))
    for p in (old, evicted, new):
        tree.insert(p, W)
    tick = tree.last_use(evicted, W, 5)
    assert tick > tree.last_use(old, W, 5) > 0
    assert tree.forget_older(W, tick) == 10  # old and evicted, 5 blocks each
    assert tree.match_blocks(old, W) == 0
    assert tree.match_blocks(evicted, W) == 0
    assert tree.match_blocks(new, W) == 5
    assert tree.forget_older(W, 0) == 0
    assert tree.last_use(new, W, 0) == 0


def test_cached_tokens_from_answer_tails() -> None:
    native = b'{"text":"hi","meta_info":{"prompt_tokens":9,"cached_tokens": 512,"e2e":0.1}}'
    assert cached_tokens(native) == 512
    openai = b'data: {"usage":{"prompt_tokens_details":{"cached_tokens":7}}}\n\ndata: [DONE]\n\n'
    assert cached_tokens(openai) == 7
    assert cached_tokens(b'{"cached_tokens":null}') is None
    assert cached_tokens(b"data: [DONE]") is None
    assert tokens_to_units(10, text=True) == 40
    assert tokens_to_units(10, text=False) == 10
    assert units_to_tokens(41, text=True) == 11


def answer(cached: int) -> bytes:
    return b'{"text":"x","meta_info":{"cached_tokens":%d,"prompt_tokens":999}}' % cached


def setup_evicted() -> tuple[LeastTTFTPolicy, Worker, str, str, str]:
    """A worker whose tree holds B, then A, then C (all routed there, all answered)."""
    policy = LeastTTFTPolicy()
    worker = Worker(W)
    policy.on_worker_added(worker)
    b, a, c = text(1280, 10), text(1280, 11), text(1280, 12)  # 20 blocks, 320 tokens each
    for prompt in (b, a, c):
        assert policy.select([worker], RouteKey(text=prompt)) is worker
        ticket = policy.begin_attempt(worker)
        assert ticket is not None
        ticket.done(True, answer(0))  # a new prompt: nothing was predicted, nothing to fix
    assert policy.apply_corrections() == 0
    return policy, worker, a, b, c


def test_a_short_report_makes_the_tree_forget_what_the_worker_evicted() -> None:
    policy, worker, a, b, c = setup_evicted()
    hasher = policy.hasher
    assert policy.tree.match_blocks(hasher.text(b), W) == 20
    # A again: the tree predicts all 20 blocks, the worker had only 2 blocks' worth (32
    # tokens) left: it evicted A, and (LRU) B, used before A. C, used after, stays.
    assert policy.select([worker], RouteKey(text=a)) is worker
    ticket = policy.begin_attempt(worker)
    assert ticket is not None
    ticket.done(True, answer(32))
    assert policy.corrections == 1
    assert policy.apply_corrections() == 20  # B's blocks; A's path was refreshed by the pick
    assert policy.tree.match_blocks(hasher.text(b), W) == 0
    assert policy.tree.match_blocks(hasher.text(a), W) == 20  # the worker prefilled it again
    assert policy.tree.match_blocks(hasher.text(c), W) == 20


def test_a_report_within_the_slack_changes_nothing() -> None:
    policy, worker, a, b, _ = setup_evicted()
    policy.select([worker], RouteKey(text=a))
    ticket = policy.begin_attempt(worker)
    assert ticket is not None
    ticket.done(True, answer(19 * 16))  # 19 of 20 blocks: a template or rounding difference
    assert policy.corrections == 0
    assert policy.apply_corrections() == 0
    assert policy.tree.match_blocks(policy.hasher.text(b), W) == 20


def test_a_failed_attempt_is_trimmed_back() -> None:
    policy, worker, a, _, _ = setup_evicted()
    longer = a + text(640, 13)  # 10 more blocks than the tree had
    policy.select([worker], RouteKey(text=longer))
    ticket = policy.begin_attempt(worker)
    assert ticket is not None
    assert policy.tree.match_blocks(policy.hasher.text(longer), W) == 30
    ticket.done(False, b"")
    assert policy.tree.match_blocks(policy.hasher.text(longer), W) == 20


def test_a_stream_broken_after_its_first_chunk_keeps_its_path() -> None:
    policy, worker, a, _, _ = setup_evicted()
    longer = a + text(640, 14)
    policy.select([worker], RouteKey(text=longer))
    ticket = policy.begin_attempt(worker)
    assert ticket is not None
    ticket.first_byte(True)  # the worker prefilled it: the client left later
    ticket.done(False, b"")
    assert policy.tree.match_blocks(policy.hasher.text(longer), W) == 30


def test_a_prompt_still_in_prefill_is_no_eviction() -> None:
    """B shares A's path while A is still in prefill: the worker cannot report it cached yet."""
    policy = LeastTTFTPolicy()
    worker = Worker(W)
    policy.on_worker_added(worker)
    old = text(1280, 20)
    policy.select([worker], RouteKey(text=old))
    first = policy.begin_attempt(worker)
    assert first is not None
    first.done(True, answer(0))
    a = text(1280, 21)
    policy.select([worker], RouteKey(text=a))
    in_prefill = policy.begin_attempt(worker)  # no first byte yet
    policy.select([worker], RouteKey(text=a + "more"))
    follower = policy.begin_attempt(worker)
    assert in_prefill is not None and follower is not None
    follower.done(True, answer(0))  # nothing cached yet: A is still being prefilled
    assert policy.corrections == 0
    assert policy.apply_corrections() == 0
    assert policy.tree.match_blocks(policy.hasher.text(old), W) == 20
