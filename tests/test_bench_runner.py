"""The runner's pacing, dependencies, limits and error handling, against an in-process fake.

The fake stands in for a router with httpx's MockTransport (no sockets, no processes): these
tests are about the client's scheduling; the end-to-end test with real processes is in
``test_bench_e2e.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from sglctl.bench.runner import RunConfig, run_workload
from sglctl.bench.workloads import (
    MultiTurnConfig,
    SharedPrefixConfig,
    multi_turn_workload,
    shared_prefix_workload,
)


class FakeRouter:
    """Answers ``/generate`` by streaming ``max_new_tokens`` chunks after ``delay`` seconds."""

    def __init__(self, delay: float = 0.01, fail_every: int = 0, chunk_gap: float = 0.0) -> None:
        self.delay = delay
        self.fail_every = fail_every
        self.chunk_gap = chunk_gap
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls = 0
        self.prompts: list[tuple[float, float, str]] = []  # (start, end, prompt)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != "/generate":
            return httpx.Response(404, json={"error": {"message": "no", "type": "x", "code": 404}})
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            return httpx.Response(
                503, json={"error": {"message": "no healthy worker", "type": "x", "code": 503}}
            )
        body = orjson.loads(request.content)
        prompt = body["text"]
        n = body["sampling_params"]["max_new_tokens"]
        return httpx.Response(200, content=self.stream(prompt, n))

    async def stream(self, prompt: str, n: int) -> AsyncIterator[bytes]:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        start = time.perf_counter()
        await asyncio.sleep(self.delay)
        for i in range(1, n + 1):
            meta = {"prompt_tokens": len(prompt) // 4, "completion_tokens": i, "cached_tokens": 4}
            chunk = b"data: " + orjson.dumps({"text": "abcd" * i, "meta_info": meta}) + b"\n\n"
            if i == n:
                # Account before the last yield: the client closes the stream after [DONE]
                # and the generator is not resumed (nor finalised) promptly.
                self.in_flight -= 1
                self.prompts.append((start, time.perf_counter(), prompt))
            yield chunk
            if self.chunk_gap:
                await asyncio.sleep(self.chunk_gap)
        yield b"data: [DONE]\n\n"


def run(workload, fake: FakeRouter, **cfg):  # type: ignore[no-untyped-def]
    config = RunConfig(url="http://router.test", progress=False, **cfg)
    transport = httpx.MockTransport(fake.handle)
    return asyncio.run(run_workload(workload, config, transport=transport))


SMALL_GSP = SharedPrefixConfig(
    num_groups=4, prompts_per_group=5, system_prompt_len=64, question_len=8, output_len=3
)


def test_closed_loop_keeps_the_concurrency_and_reports_tokens() -> None:
    fake = FakeRouter(delay=0.02)
    result = run(shared_prefix_workload(SMALL_GSP), fake, mode="concurrency", concurrency=3)
    s = result.summary
    assert s.completed == 20 and s.errors == 0
    assert fake.max_in_flight == 3
    assert s.output_tokens == 20 * 3 and s.prompt_tokens == 20 * 72
    assert s.cached_tokens == 20 * 4
    assert all(
        r.ttft is not None and r.latency is not None and r.ttft <= r.latency for r in result.results
    )
    assert s.ideal is not None and s.ideal.hit_tokens == 4 * 4 * 64


def test_max_requests_caps_the_run() -> None:
    fake = FakeRouter(delay=0.0)
    result = run(
        shared_prefix_workload(SMALL_GSP), fake, mode="concurrency", concurrency=2, max_requests=7
    )
    assert result.summary.requests == 7 and fake.calls == 7
    # The ideal is computed over what was sent, not the whole workload.
    assert result.summary.ideal is not None
    assert result.summary.ideal.input_tokens == 7 * 72


def test_poisson_open_loop_does_not_wait_for_answers() -> None:
    # 20 requests at 200 req/s each lasting 0.3 s: an open loop has many in flight at once.
    fake = FakeRouter(delay=0.3)
    result = run(shared_prefix_workload(SMALL_GSP), fake, mode="rate", rate=200.0)
    assert result.summary.completed == 20
    assert fake.max_in_flight >= 10


def test_next_turn_waits_for_the_previous_answer() -> None:
    fake = FakeRouter(delay=0.01, chunk_gap=0.005)
    work = multi_turn_workload(
        MultiTurnConfig(conversations=3, turns=3, system_prompt_len=8, user_len=4, output_len=2)
    )
    result = run(work, fake, mode="rate", rate=1000.0)
    assert result.summary.completed == 9
    by_index = {r.index: r for r in result.results}
    for req in work.requests:
        if req.after is not None:
            prev = by_index[req.after]
            assert prev.latency is not None
            assert by_index[req.index].start >= prev.start + prev.latency


def test_duration_stops_sending_and_cancels_after_the_drain() -> None:
    fake = FakeRouter(delay=5.0)
    started = time.perf_counter()
    result = run(
        shared_prefix_workload(SMALL_GSP),
        fake,
        mode="rate",
        rate=20.0,
        duration=0.3,
        drain_timeout=0.2,
    )
    assert time.perf_counter() - started < 3.0
    s = result.summary
    assert 1 <= s.requests < 20  # only what was due within 0.3 s was sent
    assert s.cancelled == s.requests and s.errors == 0 and s.completed == 0


def test_errors_are_counted_by_kind_not_raised() -> None:
    fake = FakeRouter(delay=0.0, fail_every=4)
    result = run(shared_prefix_workload(SMALL_GSP), fake, mode="concurrency", concurrency=2)
    s = result.summary
    assert s.errors == 5 and s.completed == 15
    assert s.error_kinds == {"HTTP 503": 5}
    failed = next(r for r in result.results if not r.ok)
    assert failed.error == "HTTP 503: no healthy worker"


def test_trace_mode_respects_arrival_times(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sglctl.bench.workloads import trace_workload

    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"timestamp": 0, "input_length": 8, "output_length": 1, "hash_ids": [0]}\n'
        '{"timestamp": 1000, "input_length": 8, "output_length": 1, "hash_ids": [0]}\n'
    )
    fake = FakeRouter(delay=0.0)
    result = run(trace_workload(path), fake, mode="trace", speedup=4.0)
    first, second = result.results
    assert second.start - first.start == pytest.approx(0.25, abs=0.1)


def test_connection_errors_are_results() -> None:
    async def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    config = RunConfig(url="http://router.test", mode="concurrency", concurrency=2, progress=False)
    work = shared_prefix_workload(SMALL_GSP).head(4)
    result = asyncio.run(run_workload(work, config, transport=httpx.MockTransport(refuse)))
    assert result.summary.errors == 4 and result.summary.error_kinds == {"ConnectError": 4}


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="rate"):
        RunConfig(url="u", mode="rate")
    with pytest.raises(ValueError, match="concurrency"):
        RunConfig(url="u", mode="concurrency", concurrency=0)
    with pytest.raises(ValueError, match="mode"):
        RunConfig(url="u", mode="burst")
