"""``sglctl status``: rates, metric parsing, rendering, and the remote (HTTP) mode."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
from rich.console import Console

from sglctl.net import find_free_port
from sglctl.status import RouterRow, Snapshot, WorkerRow, parse_metric, render, with_rates


def _snap(at: float, served: int, requests: int, state: str = "healthy") -> Snapshot:
    return Snapshot(
        source="test",
        taken_at=at,
        router=RouterRow(url="http://r:1", alive=True, requests=requests),
        workers=[WorkerRow(url="http://w:1", state=state, worker_id=0, served=served)],
    )


def test_rates_come_from_counter_deltas_and_survive_resets() -> None:
    rated = with_rates(_snap(10.0, 100, 500), _snap(12.0, 140, 600))
    assert rated.workers[0].requests_per_second == 20.0
    assert rated.router.requests_per_second == 50.0
    reset = with_rates(_snap(10.0, 100, 500), _snap(11.0, 3, 600))
    assert reset.workers[0].requests_per_second == 0.0
    assert with_rates(None, _snap(1.0, 1, 1)).workers[0].requests_per_second is None


def test_parse_metric_ignores_labels_and_similar_names() -> None:
    text = (
        "# HELP sglang:cache_hit_rate x\n"
        "sglang:cache_hit_rate_total 9\n"
        'sglang:cache_hit_rate{model_name="m"} 0.25\n'
    )
    assert parse_metric(text, "sglang:cache_hit_rate") == 0.25
    assert parse_metric("sglang:cache_hit_rate 0.5\n", "sglang:cache_hit_rate") == 0.5
    assert parse_metric("other 1\n", "sglang:cache_hit_rate") is None


def test_render_shows_states_and_gpu_columns_only_with_gpus() -> None:
    snap = _snap(0.0, 5, 5, state="failed")
    console = Console(width=120, record=True)
    console.print(render(snap))
    text = console.export_text()
    assert "failed" in text and "w:1" in text and "util" not in text
    snap.workers[0].gpus = "0,1"
    snap.workers[0].gpu_utilization = 42
    console = Console(width=120, record=True)
    console.print(render(snap))
    assert "42%" in console.export_text()


def test_role_column_only_in_a_pd_layout_and_roles_in_json() -> None:
    snap = _snap(0.0, 5, 5)
    console = Console(width=140, record=True)
    console.print(render(snap))
    assert "role" not in console.export_text()  # a regular layout: no column to waste
    snap.workers = [
        WorkerRow(url="http://w:1", state="healthy", worker_id=0, role="prefill",
                  bootstrap_port=8998),
        WorkerRow(url="http://w:2", state="healthy", worker_id=1, role="decode"),
    ]  # fmt: skip
    console = Console(width=140, record=True)
    console.print(render(snap))
    lines = console.export_text().splitlines()
    header = next(line for line in lines if " worker " in line)
    assert header.split()[:3] == ["id", "worker", "role"]
    assert any("prefill:8998" in line for line in lines)
    assert any("w:2" in line and "decode" in line for line in lines)
    workers = snap.to_json()["workers"]
    assert [(w["role"], w["bootstrap_port"]) for w in workers] == [
        ("prefill", 8998),
        ("decode", None),
    ]


def test_remote_status_over_http(procs) -> None:  # type: ignore[no-untyped-def]
    workers = [procs.sim_worker("--speedup", "50") for _ in range(2)]
    # Its own metrics port: the default 29000 is shared with every other router on the host.
    router = procs.router([w.url for w in workers], "--metrics-port", str(find_free_port()))
    with httpx.Client(timeout=10) as client:
        for i in range(4):
            body = {"text": f"prompt {i}", "sampling_params": {"max_new_tokens": 2}}
            assert client.post(router.url + "/generate", json=body).status_code == 200
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sglctl",
            "status",
            "--router",
            router.url,
            "--json",
            "--sample-secs",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    assert snapshot["source"] == f"HTTP {router.url}"
    assert sorted(w["url"] for w in snapshot["workers"]) == sorted(w.url for w in workers)
    assert {w["state"] for w in snapshot["workers"]} == {"healthy"}
    assert sum(w["served"] for w in snapshot["workers"]) == 4 == snapshot["router"]["requests"]
    assert all(w["cache_hit_rate"] is not None for w in snapshot["workers"])


def test_status_says_when_no_router_answers() -> None:

    url = f"http://127.0.0.1:{find_free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "sglctl", "status", "--router", url, "--once"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "no router answering" in result.stdout


def _busy_snapshot() -> Snapshot:
    """Wide but realistic figures: a long-running router, six-digit counters."""
    return Snapshot(
        source="shared memory sglctl_30000 (supervisor pid 123456)",
        taken_at=0.0,
        router=RouterRow(
            url="http://127.0.0.1:30000",
            alive=True,
            pid=123457,
            requests=123456,
            errors=12,
            in_flight=17,
            requests_per_second=1234.5,
            latency_p50_ms=123.4,
            latency_p99_ms=1234.5,
        ),
        workers=[
            WorkerRow(
                url="http://127.0.0.1:31000",
                state="healthy",
                worker_id=0,
                pid=123456,
                uptime_secs=4000,
                restarts=1,
                in_flight=12,
                served=123456,
                errors=3,
                requests_per_second=617.2,
                cache_hit_rate=0.87,
            )
        ],
        model="meta-llama/Llama-3.1-8B-Instruct",
        backend="sim",
    )


def test_an_80_column_terminal_gets_whole_lines_never_broken_items() -> None:
    console = Console(width=80, record=True)
    console.print(render(_busy_snapshot()))
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    # Lines break between items only: every item is whole on one line.
    for item in (
        "router http://127.0.0.1:30000 up",
        "p99 1234.5 ms",
        "in-flight 17",
        "requests 123456",
        "errors 12",
        "meta-llama/Llama-3.1-8B-Instruct (sim)",
        "shared memory sglctl_30000 (supervisor pid 123456)",
        "hit: prefix cache hit rate",
    ):
        assert any(item in line for line in lines), (item, lines)
    # The worker table itself is not squeezed (no cell cut short).
    assert not any("…" in line for line in lines), lines
    assert len(lines) <= 9, lines


def test_served_excludes_failed_attempts_in_both_modes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A request that failed on A and was retried on B is served once, by B: the router
    counts every attempt, so served = attempts - errors (what list-workers shows too)."""
    import asyncio
    import uuid

    from sglctl.state_table import RouterColumns, StateTable, WorkerSlot, WorkerState
    from sglctl.status import LocalCollector, served_count

    assert served_count(5, 2) == 3 and served_count(1, 3) == 0
    name = f"sglctl_test_{uuid.uuid4().hex[:10]}"
    table, _ = StateTable.create(name, n_slots=2)
    try:
        dead = f"http://127.0.0.1:{find_free_port()}"  # nothing listens: no hit rate, fast
        table.write_slot(0, WorkerSlot(state=WorkerState.HEALTHY, pid=1, url=dead))
        table.write_router_columns(0, RouterColumns(in_flight=0, served=5, errors=2))

        async def collect() -> Snapshot:
            async with httpx.AsyncClient(trust_env=False) as client:
                collector = LocalCollector(StateTable.attach(name), client)
                try:
                    return await collector.collect()
                finally:
                    collector.close()

        snapshot = asyncio.run(collect())
        assert [(w.served, w.errors) for w in snapshot.workers] == [(3, 2)]
    finally:
        table.unlink()
        table.close()
