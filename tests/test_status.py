"""``sglctl status``: rates, metric parsing, rendering, and the remote (HTTP) mode."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
from rich.console import Console

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


def test_remote_status_over_http(procs) -> None:  # type: ignore[no-untyped-def]
    workers = [procs.sim_worker("--speedup", "50") for _ in range(2)]
    router = procs.router([w.url for w in workers])
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
    from sglctl.net import find_free_port

    url = f"http://127.0.0.1:{find_free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "sglctl", "status", "--router", url, "--once"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "no router answering" in result.stdout
