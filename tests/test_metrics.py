"""RouterMetrics on its own: labels, histogram buckets, TTFT/TPOT, hooks, the exposition text."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sglctl.router.admission import AdmissionController
from sglctl.router.metrics import (
    RouterMetrics,
    _Histogram,
    completion_tokens,
    note_attempt,
    note_chunk,
    state_table_reader,
    status_class,
)
from sglctl.router.policies.base import RouteKey
from sglctl.router.policies.cache_aware import CacheAwarePolicy
from sglctl.router.workers import WorkerRegistry
from sglctl.state_table import StateTable, WorkerSlot, WorkerState


def samples(m: RouterMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, parsed back by prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_status_is_success_or_an_error_class_and_the_code_has_its_own_label() -> None:
    assert [status_class(c) for c in (200, 204, 400, 404, 413, 429, 499, 500, 502, 503, 504)] == [
        "success",
        "success",
        "client_error",
        "client_error",
        "client_error",
        "rate_limited",
        "client_closed",
        "server_error",
        "upstream_error",
        "no_healthy_worker",
        "timeout",
    ]
    m = RouterMetrics(WorkerRegistry())
    m.observe("/generate", 200, 0.1)
    m.observe("/generate", 200, 0.2)
    m.observe("/generate", 502, 0.3)
    s = samples(m)
    key = "sglang_router_requests_total"
    ok = (("code", "200"), ("route", "/generate"), ("status", "success"))
    assert s[(key, ok)] == 2
    bad = (("code", "502"), ("route", "/generate"), ("status", "upstream_error"))
    assert s[(key, bad)] == 1


def test_histogram_buckets_are_le_and_cumulative() -> None:
    h = _Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(value)
    # A value equal to a bound belongs to that bound's bucket (Prometheus's "le").
    assert h.cumulative() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert h.total == pytest.approx(8.65)


def test_duration_histogram_renders_with_route_only() -> None:
    m = RouterMetrics(WorkerRegistry(), buckets=[0.5, 1])
    m.observe("/v1/completions", 200, 0.7)
    s = samples(m)
    name = "sglang_router_request_duration_seconds"
    assert s[(f"{name}_bucket", (("le", "0.5"), ("route", "/v1/completions")))] == 0
    assert s[(f"{name}_bucket", (("le", "1.0"), ("route", "/v1/completions")))] == 1
    assert s[(f"{name}_count", (("route", "/v1/completions"),))] == 1


def test_completion_tokens_from_the_last_chunk() -> None:
    chunk = b'data: {"text":"x","meta_info":{"prompt_tokens":3,"completion_tokens": 17}}\n\n'
    assert completion_tokens(chunk) == 17
    assert completion_tokens(b'data: {"usage":{"completion_tokens":5}}') == 5
    assert completion_tokens(b'data: {"text":"no usage"}') is None
    assert completion_tokens(b'"completion_tokens":null') is None


async def _one_request(m: RouterMetrics, chunks: list[bytes] | None, code: int = 200) -> None:
    """Runs in its own task, as the router runs each request."""
    obs = m.begin("/generate")
    obs.started -= 1.0  # the request arrived a second ago
    for chunk in chunks or []:
        note_chunk(chunk)
    m.finish(obs, code)


def test_stream_gives_ttft_at_the_first_chunk_and_tpot_from_completion_tokens() -> None:
    m = RouterMetrics(WorkerRegistry())
    chunks = [
        b'data: {"text":"a","meta_info":{"completion_tokens":1}}\n\n',
        b'data: {"text":"ab","meta_info":{"completion_tokens":11}}\n\n',
        b"data: [DONE]\n\n",
    ]
    asyncio.run(_one_request(m, chunks))
    asyncio.run(_one_request(m, None))  # a whole answer: TTFT = duration, no TPOT
    asyncio.run(_one_request(m, None, code=500))  # errors have no TTFT
    s = samples(m)
    route = (("route", "/generate"),)
    assert s[("sglang_router_time_to_first_token_seconds_count", route)] == 2
    assert s[("sglang_router_request_duration_seconds_count", route)] == 3
    assert s[("sglang_router_time_per_output_token_seconds_count", route)] == 1
    # The stream's first chunk came ~1 s after arrival; the whole answer took ~1 s too.
    assert s[("sglang_router_time_to_first_token_seconds_sum", route)] == pytest.approx(2, abs=0.5)
    # The chunks came right after each other: decode time per token is tiny.
    assert s[("sglang_router_time_per_output_token_seconds_sum", route)] < 0.1


def test_note_attempt_records_the_worker_and_logs_the_decision(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = WorkerRegistry()
    policy = CacheAwarePolicy()
    for url in ("http://a", "http://b"):
        policy.on_worker_added(registry.add(url))
    m = RouterMetrics(registry, access_log=True)
    key = RouteKey(text="x" * 400)

    async def request() -> None:
        obs = m.begin("/generate")
        worker = policy.select(registry.routable(), key)
        assert worker is not None
        note_attempt(policy, registry.routable(), key, worker)
        note_attempt(policy, registry.routable(), key, worker)  # a retry
        assert (obs.worker, obs.attempts) == (worker.url, 2)
        m.finish(obs, 200)

    with caplog.at_level(logging.DEBUG, logger="sglctl"):
        asyncio.run(request())
        asyncio.run(request())
    routes = [r.getMessage() for r in caplog.records if r.name == "sglctl.router.routing"]
    assert "decision=cache_miss" in routes[0] and "policy=cache_aware" in routes[0]
    assert "match_len=0 " in routes[0]
    assert "decision=cache_hit" in routes[2] and "'http://a': 0" in routes[2]
    matched = int(re.search(r"match_len=(\d+)", routes[2]).group(1))  # type: ignore[union-attr]
    assert matched >= 384  # the whole 400-character key but its partial last block
    access = [r for r in caplog.records if r.name == "sglctl.access"]
    assert len(access) == 2
    assert access[0].retries == 1 and access[0].status == 200  # type: ignore[attr-defined]
    assert access[0].worker in ("http://a", "http://b")  # type: ignore[attr-defined]


def test_no_access_log_by_default(caplog: pytest.LogCaptureFixture) -> None:
    m = RouterMetrics(WorkerRegistry())
    with caplog.at_level(logging.DEBUG):
        m.observe("/generate", 200, 0.1)
    assert not [r for r in caplog.records if r.name == "sglctl.access"]


def test_scrape_time_views_of_policy_admission_supervisor_and_discovery() -> None:
    registry = WorkerRegistry()
    policy = CacheAwarePolicy()
    for url in ("http://a", "http://b"):
        policy.on_worker_added(registry.add(url))
    slots = [
        WorkerSlot(state=WorkerState.HEALTHY, url="http://a", restarts=2),
        WorkerSlot(state=WorkerState.FAILED, url="http://b", restarts=5),
        WorkerSlot(state=WorkerState.EMPTY),
    ]
    m = RouterMetrics(
        registry,
        policies=lambda: [policy],
        admission=AdmissionController(4, queue_size=7),
        supervisor_slots=lambda: slots,
    )
    m.discovery_stats = lambda: {"workers": 3, "added_total": 4, "errors_total": 1}
    m.observe_queue_wait(0.2)

    async def routed(code: int) -> None:  # one request routed by the cache-aware policy
        key = RouteKey(text="y" * 320)
        obs = m.begin("/generate")
        worker = policy.select(registry.routable(), key)
        assert worker is not None
        note_attempt(policy, registry.routable(), key, worker)
        m.finish(obs, code)

    for code in (200, 200, 200, 502):  # a miss (new prefix), then hits
        asyncio.run(routed(code))
    s = samples(m)
    ok = (("code", "200"), ("route", "/generate"), ("status", "success"))
    failed = (("code", "502"), ("route", "/generate"), ("status", "upstream_error"))
    # Hits and misses carry requests_total's labels (the seed's hit-ratio query as written).
    assert s[("sglang_router_cache_hits_total", ok)] == 2
    assert s[("sglang_router_cache_misses_total", ok)] == 1
    assert s[("sglang_router_cache_hits_total", failed)] == 1
    tree = {k[1]: v for k, v in s.items() if k[0] == "sglang_router_tree_size_chars"}
    assert sum(tree.values()) == 320 and len(tree) == 2  # 5 blocks of 64
    assert s[("sglang_router_queue_capacity", ())] == 7
    assert s[("sglang_router_queue_wait_seconds_count", ())] == 1
    assert s[("sglang_router_worker_restarts_total", (("worker", "http://b"),))] == 5
    assert s[("sglang_router_worker_state", (("state", "failed"), ("worker", "http://b")))] == 1
    assert s[("sglang_router_worker_state", (("state", "healthy"), ("worker", "http://b")))] == 0
    assert s[("sglang_router_healthy_workers", ())] == 2
    assert s[("sglang_router_discovery_workers", ())] == 3
    assert s[("sglang_router_discovery_added_total", ())] == 4
    assert ("sglang_router_discovery_removed_total", ()) not in s  # not reported: no sample


def test_a_failing_hook_does_not_break_the_scrape() -> None:
    def broken() -> list[SimpleNamespace]:
        raise OSError("segment gone")

    m = RouterMetrics(WorkerRegistry(), supervisor_slots=broken)
    m.discovery_stats = lambda: 1 / 0  # type: ignore[assignment,return-value]
    assert b"sglang_router_requests_total" in m.render()


def test_supervisor_restarts_and_state_come_from_the_shared_memory_table() -> None:
    name = f"sglctl-test-metrics-{os.getpid()}"
    table, _ = StateTable.create(name, n_slots=2)
    try:
        table.write_slot(
            0, WorkerSlot(state=WorkerState.RESTARTING, url="http://127.0.0.2:1", restarts=3)
        )
        m = RouterMetrics(WorkerRegistry(), supervisor_slots=state_table_reader(name))
        s = samples(m)
        worker = (("worker", "http://127.0.0.2:1"),)
        assert s[("sglang_router_worker_restarts_total", worker)] == 3
        assert s[("sglang_router_worker_state", (("state", "restarting"), *worker))] == 1
        # The table going away (sglctl up stopped) leaves the families empty, not an error.
        table.unlink()
        assert ("sglang_router_worker_restarts_total", worker) not in samples(m)
        assert state_table_reader(None)() == []
    finally:
        table.unlink()
        table.close()
