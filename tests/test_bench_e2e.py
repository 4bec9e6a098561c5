"""End to end: ``sglctl bench`` through a real router to real sim workers (seconds, tiny loads)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from sglctl.bench.runner import RunConfig, run_workload
from sglctl.bench.workloads import trace_workload

FAST = ("--speedup", "50", "--log-level", "warning")


def test_bench_cli_through_router_reports_everything(procs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    workers = [procs.sim_worker(*FAST) for _ in range(2)]
    router = procs.router([w.url for w in workers], "--policy", "round_robin")
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, "-m", "sglctl", "bench",
        "--router", router.url,
        "--workload", "shared-prefix",
        "--gsp-num-groups", "3", "--gsp-prompts-per-group", "4",
        "--gsp-system-prompt-len", "256", "--gsp-question-len", "16", "--gsp-output-len", "8",
        "--concurrency", "4", "--json", str(out), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "prefix cache hit ratio" in proc.stdout and "Per worker" in proc.stdout
    assert "shared-prefix: 12 requests at --concurrency 4, about" in proc.stderr
    data = json.loads(out.read_text())
    s = data["summary"]
    assert (s["requests"], s["completed"], s["errors"]) == (12, 12, 0)
    assert s["output_tokens"] == 12 * 8 and s["prompt_tokens"] == 12 * 272
    assert 0 < s["ttft_p50"] <= s["latency_p50"]
    # Round robin over two workers: an even split, seen in the workers' own counters.
    assert len(s["workers"]) == 2
    assert [w["requests"] for w in s["workers"]] == [6, 6]
    assert s["request_imbalance"] == 1.0
    assert s["ideal"]["token_weighted"] > 0
    assert len(data["requests"]) == 12


def test_one_worker_in_order_reaches_the_ideal_hit_ratio(procs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # One worker with a cache larger than the trace, one request at a time: the worker's
    # cached_tokens must add up to the ideal computed from the hash ids (less at most one
    # token a request, which SGLang always recomputes).
    rows = [
        {"timestamp": 0, "input_length": 1100, "output_length": 4, "hash_ids": [0, 1, 2]},
        {"timestamp": 0, "input_length": 1300, "output_length": 4, "hash_ids": [0, 1, 3]},
        {"timestamp": 0, "input_length": 600, "output_length": 4, "hash_ids": [0, 4]},
        {"timestamp": 0, "input_length": 1536, "output_length": 4, "hash_ids": [0, 1, 3]},
        {"timestamp": 0, "input_length": 700, "output_length": 4, "hash_ids": [5, 1]},
    ]
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    worker = procs.sim_worker(*FAST)
    work = trace_workload(path)
    config = RunConfig(
        url=worker.url, mode="concurrency", concurrency=1, worker_urls=[worker.url], progress=False
    )
    result = asyncio.run(run_workload(work, config))
    s = result.summary
    assert s.completed == 5 and s.errors == 0
    assert s.ideal is not None
    # Request 4 resends block 3 in full, but only its first 276 tokens were ever sent.
    assert s.ideal.hit_tokens == 1024 + 512 + 1024 + 276
    assert s.ideal.hit_tokens - 5 <= s.cached_tokens <= s.ideal.hit_tokens
    assert [r.prompt_tokens for r in result.results] == [r["input_length"] for r in rows]
    assert s.workers[0].cached_tokens == s.cached_tokens
