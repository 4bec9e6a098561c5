"""``benchmarks/replicas.py --rounds``: each point's figures over all rounds, the TTFT p99 of
every round's requests together, against its one router."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import replicas


def row(setup: str, round_no: int, ttfts: list[float], hit: float) -> dict[str, Any]:
    from sglctl.bench.stats import percentile

    return {
        "trace": "t.jsonl",
        "kv_cache_tokens": 600_000,
        "setup": setup,
        "baseline": "one" if setup == "three" else None,
        "round": round_no,
        "ttfts_s": ttfts,
        "hit_ratio_raw": hit,
        "ttft_p99_raw": percentile(ttfts, 99),
    }


def test_rounds_pool_every_request_and_compare_with_the_one_router() -> None:
    fast = [0.1] * 95
    rows = [
        row("one", 1, [*fast, *[1.0] * 5], 0.20),
        row("three", 1, [*fast, *[2.0] * 5], 0.18),  # round 1: its tail twice one router's
        row("one", 2, [*fast, *[3.0] * 5], 0.20),
        row("three", 2, [*fast, *[1.5] * 5], 0.20),  # round 2: half
    ]
    summary = {s["setup"]: s for s in replicas.print_over_rounds(rows, 2)}
    three = summary["three"]
    assert three["hits_kept"] == pytest.approx(0.95)
    by_round = [rows[1]["ttft_p99_raw"] / rows[0]["ttft_p99_raw"],
                rows[3]["ttft_p99_raw"] / rows[2]["ttft_p99_raw"]]  # fmt: skip
    assert three["p99_vs_one_by_round"] == pytest.approx(by_round)
    assert by_round[0] > 1.0 > by_round[1]
    # Together, 200 requests each: the p99 is the slower round's tail, 3.0 s against 2.0 s.
    assert summary["one"]["ttft_p99_s"] == pytest.approx(3.0)
    assert three["ttft_p99_s"] == pytest.approx(2.0)
    assert three["p99_vs_one"] == pytest.approx(2.0 / 3.0)
    assert three["verdict"].startswith("hits met")
    assert summary["one"]["verdict"] == "-"


def test_a_restarted_replica_is_judged_on_its_requests_from_a_minute_after_it_rejoined() -> None:
    """``--restart``'s "settled" figure: only the requests from ``after_trace_s`` after the
    rejoin count, the restarted replica's against its own unrestarted on the same requests;
    the misses of its first seconds back do not (the cumulative figure keeps them)."""
    from sglctl.bench.stats import RequestResult

    def result(index: int, start: float, cached: int) -> RequestResult:
        return RequestResult(index, start, ok=True, prompt_tokens=100, cached_tokens=cached)

    up_at, speedup = 10.0, 8.0  # 60 trace-s after the rejoin is 7.5 s of wall clock
    early = [result(i, up_at + 1.0, 0) for i in range(5)]  # cold: nothing cached
    late = [result(5 + i, up_at + 8.0, 40) for i in range(5)]
    itself = [result(i, up_at + 1.0, 50) for i in range(5)]
    itself += [result(5 + i, up_at + 8.0, 41) for i in range(5)]
    settled = replicas._settled([*early, *late], itself, up_at, 60.0, speedup)
    assert settled["requests"] == 5
    assert settled["restarted_hit"] == pytest.approx(0.40)
    assert settled["unrestarted_hit"] == pytest.approx(0.41)
    assert settled["kept"] == pytest.approx(40 / 41)  # within 5%; since the rejoin, 44%
    assert replicas._ratio([*early, *late]) / replicas._ratio(itself) < 0.5


def test_hit_diff_tells_which_long_reuses_the_replicas_lost() -> None:
    one = {1: 60_000, 2: 50_000, 3: 100, 4: 200}
    three = {1: 60_000, 3: 100, 5: 7_000}  # lost request 2's 50k-token hit, gained 5's
    diff = replicas.hit_diff(one, three, top=2)
    assert diff == {
        "top": 2,
        "kept": 1,
        "top_tokens": 110_000,
        "kept_tokens": 60_000,
        "only_one": 50_200,
        "only_replicas": 7_000,
    }
