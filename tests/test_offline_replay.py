"""``benchmarks/offline_replay.py``: the virtual-time replay is exact on a hand-made trace,
deterministic on a real slice, and its oracle beats round robin there."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import grid
import offline_replay as replay

from sglctl.sim.timing import TimingModel

MODEL = TimingModel()  # speed-up 1: the replay's seconds are the timing model's own


def prefill(cached: int, new: int) -> float:
    return MODEL.prefill_seconds([(cached, new)])


def job(index: int, at: float, ids: list[int]) -> replay.Job:
    # Negative ids never collide with the sim's output ids; one output token: no decode.
    return replay.Job(index, at, "", ids, output_tokens=1)


def test_hand_made_trace_gives_the_timing_models_figures() -> None:
    a = [-i for i in range(1, 1001)]
    b = [-i for i in range(2001, 3001)]
    c = [*a, *(-i for i in range(5001, 5101))]  # a's prompt, then 100 new tokens
    jobs = [job(0, 0.0, a), job(1, 0.001, b), job(2, 1.0, c)]
    oracle = replay.replay(jobs, "oracle", workers=2, kv_tokens=10_000, sim_speedup=1.0)
    # a on an idle worker; b avoids a's queue (the other worker is idle); c follows a's cache.
    assert oracle.ttfts == pytest.approx(
        [1000 * prefill(0, 1000), 1000 * prefill(0, 1000), 1000 * prefill(1000, 100)]
    )
    assert oracle.hit_ratio == pytest.approx(1000 / 3100)
    assert oracle.imbalance == pytest.approx(2 / 1.5)
    # Prefill work: a's 1,000 tokens and c's 100 new on worker 0, b's 1,000 on worker 1.
    assert oracle.work_imbalance == pytest.approx(1100 / 1050)
    # Round robin over 3 workers: a, b, b again (idle worker 2: no queue), then c back on
    # worker 0, which holds a's prompt.
    rr = replay.replay(
        [jobs[0], jobs[1], job(3, 0.0015, b), jobs[2]],
        "round_robin",
        workers=3,
        kv_tokens=10_000,
        sim_speedup=1.0,
    )
    assert rr.ttfts == pytest.approx([1000 * prefill(0, 1000)] * 3 + [1000 * prefill(1000, 100)])


def test_a_queued_request_waits_for_the_prefill_ahead() -> None:
    a = [-i for i in range(1, 1001)]
    b = [-i for i in range(2001, 3001)]
    # One worker: b arrives while a's prefill runs, so it starts when a's batch ends.
    res = replay.replay(
        [job(0, 0.0, a), job(1, 0.001, b)],
        "round_robin",
        workers=1,
        kv_tokens=10_000,
        sim_speedup=1.0,
    )
    first = prefill(0, 1000)
    assert res.ttfts == pytest.approx([1000 * first, 1000 * (first + prefill(0, 1000) - 0.001)])
    # And the oracle predicts exactly that wait before sending b (the engine's real state).
    clock = replay.VirtualClock()
    (engine,) = replay.make_engines(1, 10_000, 1.0, clock)
    from sglctl.sim.engine import SimRequest
    from sglctl.sim.output import plan_output

    engine.submit(SimRequest("a", a, plan_output(a, seed=0, max_new_tokens=1), stream=True))
    engine._advance(0.0)
    predicted, cached, alone = replay.predicted_first_token(engine, b, 0.001)
    assert predicted == pytest.approx(first + prefill(0, 1000) - 0.001)
    assert (cached, alone) == (0, pytest.approx(prefill(0, 1000)))


def test_chunked_prefill_is_timed_per_chunk() -> None:
    # 20,000 uncached tokens: chunks of 8,192, 8,192 and 3,616, each paying attention to
    # what the earlier chunks put in the KV.
    done = replay.prefill_done_at(0.0, [[0, 20_000]], MODEL, 8192)
    assert done == [pytest.approx(prefill(0, 8192) + prefill(8192, 8192) + prefill(16_384, 3616))]


TRACE = grid.TRACES_DIR / grid.TRACE_NAMES["synthetic"]


@pytest.mark.skipif(not TRACE.exists(), reason="the shared traces are not on this machine")
def test_real_slice_is_deterministic_and_the_oracle_beats_round_robin() -> None:
    point = grid.Point(str(TRACE), 444_000, 2.0)
    _, jobs = replay.point_jobs(point, 80, 10.0)
    speed = 10.0 / point.load
    runs = {
        name: [replay.replay(jobs, name, 8, point.kv_tokens, speed) for _ in range(2)]
        for name in ("round_robin", "cache_aware", "least_ttft", "oracle", "oracle_stay")
    }
    for first, second in runs.values():
        assert first == second  # same figures, request by request
    assert runs["oracle"][0].ttft_p99 <= runs["round_robin"][0].ttft_p99
    assert runs["oracle"][0].hit_ratio > runs["round_robin"][0].hit_ratio


def test_diagnose_logs_the_policys_terms_beside_the_oracles() -> None:
    a = [-i for i in range(1, 3001)]
    b = [-i for i in range(4001, 7001)]
    jobs = [replay.Job(0, 0.0, "x" * 12_000, a, 1), replay.Job(1, 0.001, "y" * 12_000, b, 1)]
    records: list[dict[str, object]] = []
    replay.replay(jobs, "least_ttft", workers=2, kv_tokens=20_000, sim_speedup=1.0, records=records)
    assert [r["job"] for r in records] == [0, 1]
    first, second = records
    # The oracle's terms add up; the second request sees the first one's prefill in flight
    # on the worker it went to, and its actual first token is what the oracle predicted.
    for rec in records:
        for row in rec["workers"]:  # type: ignore[attr-defined]
            o = row["oracle"]
            assert o["busy"] + o["ahead"] + o["own"] == pytest.approx(o["first"])
    busy = second["workers"][first["chosen"]]["oracle"]["busy"]  # type: ignore[index]
    assert busy == pytest.approx(prefill(0, 3000) - 0.001)
    chosen = second["workers"][second["chosen"]]["oracle"]  # type: ignore[index]
    assert second["actual"] == pytest.approx(chosen["first"])
    assert "| own vs own | 4 |" in replay.summarize(records)
