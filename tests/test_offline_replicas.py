"""``benchmarks/offline_replicas.py``: router replicas in virtual time place a burst the way
``--router-peers`` does -- blind to each other's picks for a POST's time, unless staggered."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import offline_replay as replay
import offline_replicas as replicas

from sglctl.router.policies.cache_aware import STAGGER_SECS


def burst(n: int, at: float = 0.0) -> list[replay.Job]:
    """``n`` new prompts at the same moment (the traces' clients send such bursts)."""
    return [
        replay.Job(i, at, f"burst prompt {i} " * 40, [-(i * 10_000 + t) for t in range(1, 2001)], 1)
        for i in range(n)
    ]


def run(name: str, jobs: list[replay.Job], workers: int = 2) -> replay.Result:
    build = replicas.make(name, 2, latency_s=0.001)
    return replay.replay(jobs, name, workers, kv_tokens=100_000, sim_speedup=1.0, make=build)


def test_unstaggered_replicas_herd_a_burst_and_staggered_ones_spread_it() -> None:
    # Two prompts at once, one through each replica, two idle workers with the same ties.
    one = run("one", burst(2))
    herd = run("replicas_unstaggered", burst(2))
    staggered = run("replicas", burst(2))
    assert one.imbalance == 1.0  # one router sees its first pick before the second
    assert herd.imbalance == 2.0  # both replicas took the same least loaded worker
    assert staggered.imbalance == 1.0
    # The second rank waited its stagger, then prefilled alone: sooner than in the herd.
    assert max(staggered.ttfts) == pytest.approx(STAGGER_SECS * 1000 + min(one.ttfts), rel=0.01)
    assert max(staggered.ttfts) < max(herd.ttfts)


def test_instant_telling_is_one_router() -> None:
    """Replicas told every route and load at once decide as one router does: the model's
    check that what differs between setups is the telling, not the bookkeeping."""
    jobs = [*burst(5), *burst(3, at=0.05)]
    jobs = [replay.Job(i, j.arrival, j.text, j.ids, 1) for i, j in enumerate(jobs)]
    instant, one = run("replicas_instant", jobs, workers=3), run("one", jobs, workers=3)
    assert replace(instant, placement="one") == one
    assert one.hit_ratio > 0  # the second burst repeats three of the first's prompts
