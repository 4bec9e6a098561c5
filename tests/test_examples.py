"""The examples in examples/ run as their docstrings say (they are documentation that must work)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sglctl.net import find_free_port, find_free_port_block

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_openai_chat_example_runs_through_the_router(procs) -> None:  # type: ignore[no-untyped-def]
    workers = [procs.sim_worker("--speedup", "50") for _ in range(2)]
    router = procs.router([w.url for w in workers], "--metrics-port", str(find_free_port()))
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "openai_chat.py"), "--base-url", f"{router.url}/v1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "tokens" in run.stdout and "streamed: " in run.stdout
    streamed = run.stdout.split("streamed: ", 1)[1].strip()
    assert streamed, "the streamed answer was empty"


@pytest.mark.timeout(200)
def test_compare_policies_example_runs_every_policy(tmp_path: Path) -> None:
    base = find_free_port_block(6)  # router, its metrics, then four workers
    env = {
        **os.environ,
        "SGLCTL": f"{sys.executable} -m sglctl",
        "PORT": str(base),
        "WORKER_BASE_PORT": str(base + 2),
    }
    # Its own process group, so that a hang or a failed assertion cannot orphan the script's
    # background workers: the whole group is killed whatever happens.
    script = subprocess.Popen(
        ["bash", str(EXAMPLES / "compare_policies.sh")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        stdout, stderr = script.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(script.pid, signal.SIGKILL)
        script.wait()
    assert script.returncode == 0, stdout[-2000:] + stderr[-2000:]
    for policy in ("cache_aware", "round_robin", "power_of_two"):
        assert f"== {policy}" in stdout
