"""The hit-ratio bounds of ``benchmarks/grid.py`` on toy requests whose answers are known."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import grid

from sglctl.bench.workload import BenchRequest, Segment


def req(i: int, *keys: str, tokens: int = 100) -> BenchRequest:
    return BenchRequest(i, tuple(Segment(k, tokens) for k in keys), output_tokens=1)


def test_one_big_lru_hits_repeated_prefixes_and_evicts_least_recent() -> None:
    reqs = [req(0, "a", "b"), req(1, "a", "b", "c")]
    assert grid.lru_hit_ratio(reqs, 10_000) == 200 / 500
    # Room for one segment: the first chain is evicted down to "a" (its leaf goes first).
    assert grid.lru_hit_ratio(reqs, 100) == 100 / 500


def test_shared_share_counts_hits_on_prefixes_continued_two_ways() -> None:
    # "sys" starts two conversations (shared); "x" is only ever continued by "y" (private).
    reqs = [req(0, "sys", "x"), req(1, "sys", "x", "y"), req(2, "sys", "z")]
    ratio, shared = grid.lru_bound_parts(reqs, 10_000)
    assert ratio == 300 / 700  # request 1 hits sys + x, request 2 hits sys
    assert shared == 200 / 300  # the two hits on "sys"


def test_separate_caches_follow_a_conversation_and_spread_new_ones() -> None:
    reqs = [req(0, "a"), req(1, "b"), req(2, "a", "a2"), req(3, "b", "b2")]
    # Turns follow their conversation (50% matched is not > 0.5: misses there)...
    assert grid.separate_lru_hit_ratio(reqs, 2, 10_000, threshold=0.4) == 200 / 600
    # ...while with one cache per conversation nothing is lost against the big LRU.
    assert grid.lru_hit_ratio(reqs, 20_000) == 200 / 600
    # One cache per request at most: a third conversation goes to the emptier cache.
    three = [*reqs, req(4, "c"), req(5, "c", "c2")]
    assert grid.separate_lru_hit_ratio(three, 2, 10_000, threshold=0.4) == 300 / 900
