"""Bench statistics, worker counters, pacing and the report, on made-up numbers."""

from __future__ import annotations

import itertools
import math
import statistics

import orjson
import pytest
from rich.console import Console

from sglctl.bench.ideal import IdealHitRatio
from sglctl.bench.report import comparison_table, markdown_table, summary_dict, summary_table
from sglctl.bench.runner import send_times
from sglctl.bench.stats import (
    RequestResult,
    WorkerShare,
    max_over_mean,
    percentile,
    summarize,
)
from sglctl.bench.workers import parse_counters, worker_shares
from sglctl.bench.workload import BenchRequest, Segment


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert percentile([4, 1, 3, 2], 0) == 1 and percentile([4, 1, 3, 2], 100) == 4
    assert percentile([7], 99) == 7
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_max_over_mean() -> None:
    assert max_over_mean([10, 10, 10, 10]) == 1.0
    assert max_over_mean([30, 10, 0, 0]) == 3.0
    assert math.isnan(max_over_mean([])) and math.isnan(max_over_mean([0, 0]))


def ok(
    index: int, ttft: float, latency: float, prompt: int = 100, out: int = 10, cached: int = 0
) -> RequestResult:
    return RequestResult(
        index,
        start=0.0,
        ok=True,
        ttft=ttft,
        latency=latency,
        prompt_tokens=prompt,
        output_tokens=out,
        cached_tokens=cached,
        status=200,
    )


def test_summarize_counts_throughputs_and_hit_ratio() -> None:
    results = [
        ok(0, 0.1, 1.0, cached=0),
        ok(1, 0.2, 2.0, cached=50),
        ok(2, 0.3, 3.0, cached=100),
        RequestResult(3, 0.0, status=503, error="HTTP 503: no healthy worker"),
        RequestResult(4, 0.0, error="ReadTimeout: timed out"),
        RequestResult(5, 0.0, cancelled=True),
    ]
    ideal = IdealHitRatio(hit_tokens=200, input_tokens=400, hit_blocks=0, blocks=0)
    workers = [WorkerShare("a", 2, 200, 20, 50), WorkerShare("b", 1, 100, 10, 100)]
    s = summarize(results, duration=2.0, workers=workers, ideal=ideal)
    assert (s.requests, s.completed, s.errors, s.cancelled) == (6, 3, 2, 1)
    assert s.error_kinds == {"HTTP 503": 1, "ReadTimeout": 1}
    assert s.request_throughput == 1.5
    assert s.output_throughput == 15.0 and s.input_throughput == 150.0
    assert s.ttft_p50 == pytest.approx(0.2) and s.latency_p50 == 2.0
    assert s.ttft_mean == pytest.approx(0.2)
    assert s.hit_ratio == pytest.approx(150 / 300)
    assert s.hit_ratio_of_ideal == pytest.approx(1.0)
    assert s.request_imbalance == pytest.approx(2 / 1.5)
    assert s.token_imbalance == pytest.approx(220 / 165)


def test_summarize_nothing_completed_is_nan_not_zero() -> None:
    s = summarize([RequestResult(0, 0.0, error="ConnectError: refused")], duration=1.0)
    assert s.completed == 0 and s.errors == 1
    assert math.isnan(s.ttft_p50) and math.isnan(s.latency_p99)
    assert math.isnan(s.hit_ratio_of_ideal) and math.isnan(s.request_imbalance)


def test_summarize_falls_back_to_worker_counters_for_hit_ratio() -> None:
    res = [ok(0, 0.1, 0.2, prompt=0)]
    s = summarize(res, 1.0, workers=[WorkerShare("a", 1, 100, 1, 25)])
    assert s.hit_ratio == 0.25


METRICS = """\
# HELP sglang:num_requests_total Number of requests.
# TYPE sglang:num_requests_total counter
sglang:num_requests_total{model_name="sim"} 12.0
sglang:num_requests_total{model_name="other"} 3.0
# HELP sglang:prompt_tokens_total Prompt tokens.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="sim"} 4000.0
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{model_name="sim"} 300.0
# TYPE sglang:cached_tokens_total counter
sglang:cached_tokens_total{model_name="sim"} 1000.0
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="sim"} 2.0
"""


def test_parse_counters_sums_label_sets() -> None:
    counters = parse_counters(METRICS)
    assert counters == {
        "sglang:num_requests_total": 15.0,
        "sglang:prompt_tokens_total": 4000.0,
        "sglang:generation_tokens_total": 300.0,
        "sglang:cached_tokens_total": 1000.0,
    }


def test_worker_shares_are_deltas_and_skip_unreadable_workers() -> None:
    before = {"a": parse_counters(METRICS), "b": {}, "c": parse_counters(METRICS)}
    after_text = (
        METRICS.replace("12.0", "22.0").replace("4000.0", "9000.0").replace("1000.0", "3000.0")
    )
    after = {"a": parse_counters(after_text), "b": parse_counters(METRICS), "c": {}}
    shares = worker_shares(before, after)
    assert [s.url for s in shares] == ["a", "b"]
    a = shares[0]
    assert (a.requests, a.prompt_tokens, a.generation_tokens, a.cached_tokens) == (
        10,
        5000,
        0,
        2000,
    )
    assert a.hit_ratio == 0.4
    # "b" could not be read before: its whole counter value counts (from zero).
    assert shares[1].requests == 15


def reqs(arrivals: list[float | None]) -> list[BenchRequest]:
    return [BenchRequest(i, (Segment("k", 1),), 1, arrival=a) for i, a in enumerate(arrivals)]


def test_send_times_trace_rate_and_closed_loop() -> None:
    trace = reqs([0.0, 1.0, None, 3.0])
    assert send_times(trace, "trace", rate=None, speedup=2.0, seed=0) == [0.0, 0.5, 0.5, 1.5]
    assert send_times(trace, "concurrency", rate=None, speedup=1.0, seed=0) == [None] * 4
    many = reqs([None] * 4000)
    poisson = send_times(many, "rate", rate=20.0, speedup=1.0, seed=3)
    assert poisson == send_times(many, "rate", rate=20.0, speedup=1.0, seed=3)
    assert poisson != send_times(many, "rate", rate=20.0, speedup=1.0, seed=4)
    gaps = [b - a for a, b in itertools.pairwise(poisson)]  # type: ignore[operator]
    assert poisson[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(1 / 20, rel=0.1)


def render(table: object) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_report_tables_and_json() -> None:
    ideal = IdealHitRatio(hit_tokens=100, input_tokens=200, hit_blocks=1, blocks=2)
    s = summarize(
        [
            ok(0, 0.012, 0.5, cached=30),
            ok(1, 0.020, 0.7, cached=40),
            RequestResult(2, 0.0, status=502, error="x"),
        ],
        duration=2.0,
        workers=[
            WorkerShare("http://127.0.0.1:1", 2, 200, 20, 70),
            WorkerShare("http://127.0.0.1:2", 0, 0, 0, 0),
        ],
        ideal=ideal,
    )
    text = render(summary_table(s, "run"))
    assert "2 / 3" in text and "HTTP 502: 1" in text
    assert "16 ms" in text  # TTFT p50 of 12 and 20 ms
    assert "0.350 (ideal 0.500, 70% of it)" in text
    assert "2.00" in text  # max/mean requests with one idle worker
    table = render(comparison_table([("sglctl cache_aware", s), ("round_robin", s)], "cmp"))
    assert "sglctl cache_aware" in table and "70%" in table
    data = summary_dict(s)
    assert data["ideal"]["token_weighted"] == 0.5
    orjson.dumps(data)  # JSON-ready: no NaN, no custom objects
    empty = summary_dict(summarize([], 0.0))
    assert empty["ttft_p50"] is None and empty["request_imbalance"] is None
    assert markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_plot_writes_a_png_when_matplotlib_is_there(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    from sglctl.bench.plot import plot_result
    from sglctl.bench.runner import BenchResult, RunConfig
    from sglctl.bench.workloads import shared_prefix_workload

    results = [ok(i, 0.01 * (i + 1), 0.1 + 0.01 * i) for i in range(10)]
    summary = summarize(results, 1.0, workers=[WorkerShare("http://127.0.0.1:1", 10, 100, 10, 5)])
    result = BenchResult(
        RunConfig(url="http://x", concurrency=2), shared_prefix_workload(), results, summary
    )
    out = tmp_path / "run.png"
    plot_result(result, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
