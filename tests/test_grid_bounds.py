"""The hit-ratio bounds of ``benchmarks/grid.py`` on toy requests whose answers are known."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

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


def test_ttft_floor_counts_only_uncached_tokens_in_chunks() -> None:
    from sglctl.sim.timing import TimingModel

    model = TimingModel()
    reqs = [req(0, "a", tokens=10_000), req(1, "a", "b", tokens=10_000)]
    first, second = grid.ttft_floor_ms(reqs, sim_speedup=2.0, timing=model, chunk=8192)
    # The first prompt is all new, in two chunks (8192 + 1808), at twice the sim's speed.
    whole = model.prefill_seconds([(0, 8192)]) + model.prefill_seconds([(8192, 1808)])
    assert first == whole / 2 * 1000
    # The second finds "a" cached (seen before): only "b" is prefilled, after 10k in KV.
    again = model.prefill_seconds([(10_000, 8192)]) + model.prefill_seconds([(18_192, 1808)])
    assert second == again / 2 * 1000
    assert second < first * 1.5  # attention over the cached prefix costs, but no re-prefill


def test_ttft_p99_verdict_says_when_the_floor_is_above_the_target() -> None:
    # Only the fields the verdict reads matter: a stand-in for a run's Summary, whose times
    # are seconds, while the floor is in milliseconds (as ttft_floor_ms returns it).
    class Fake:
        ttft_p99, ttft_p50, latency_p50, hit_ratio, request_imbalance = 1.0, 0.1, 1, 0.1, 1.0

    ours: Any = Fake()
    reachable = {n: f for n, f, _ in grid.verdicts(ours, ours, 0.1, floor_p99_ms=700.0)}
    unreachable = {n: f for n, f, _ in grid.verdicts(ours, ours, 0.1, floor_p99_ms=800.0)}
    assert "unreachable" not in reachable["TTFT p99 <= 0.75x SGLang"]
    assert unreachable["TTFT p99 <= 0.75x SGLang"] == "1.00x; unreachable: floor 0.80x"
