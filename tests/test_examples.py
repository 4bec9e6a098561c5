"""The examples in examples/ run as their headers say (they are documentation that must work).

As a newcomer runs them: from the clone, *without an activated venv*. The scripts get a PATH
with no sglctl on it and must find the clone's ``.venv/bin/sglctl`` themselves, or say how to
install it; ``openai_chat.py`` must say how to install ``openai`` when it is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sglctl.net import find_free_port, find_free_port_block
from tests.support import wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _without_venv() -> dict[str, str]:
    """The environment of a shell where the venv was never activated: no VIRTUAL_ENV, no
    SGLCTL, and no PATH entry that holds an ``sglctl`` (nor this Python's bin directory)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "SGLCTL")}
    venv_bin = str(Path(sys.executable).parent)
    entries = os.environ.get("PATH", "").split(os.pathsep)
    kept = [p for p in entries if p and p != venv_bin and not (Path(p) / "sglctl").exists()]
    env["PATH"] = os.pathsep.join(kept or ["/usr/bin", "/bin"])
    return env


@pytest.fixture
def clone_venv() -> Path:
    """The clone's own venv sglctl, as the README's install makes it."""
    sglctl = ROOT / ".venv" / "bin" / "sglctl"
    if not sglctl.exists():
        pytest.skip(f"no {sglctl}: these tests follow the README's `.venv` install")
    return sglctl


class _Script:
    """A script run in its own process group, output to files (a pipe nobody reads would
    block a chatty router). Killed with everything it started when the block ends."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, logs: Path) -> None:
        self.out_path, self.err_path = logs / "script.out", logs / "script.err"
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True
            )

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def __enter__(self) -> _Script:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def test_openai_chat_example_runs_through_the_router(procs) -> None:  # type: ignore[no-untyped-def]
    workers = [procs.sim_worker("--speedup", "50") for _ in range(2)]
    router = procs.router([w.url for w in workers], "--metrics-port", str(find_free_port()))
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "openai_chat.py"), "--base-url", f"{router.url}/v1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_without_venv(),
    )
    assert run.returncode == 0, run.stderr
    assert "tokens" in run.stdout and "streamed: " in run.stdout
    streamed = run.stdout.split("streamed: ", 1)[1].strip()
    assert streamed, "the streamed answer was empty"


def test_openai_chat_example_says_how_to_install_openai(tmp_path: Path) -> None:
    # A Python without openai: a package named openai that fails to import stands in for it.
    (tmp_path / "openai").mkdir()
    (tmp_path / "openai" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'openai'\", name='openai')\n"
    )
    env = {**_without_venv(), "PYTHONPATH": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "openai_chat.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr
    assert "needs the OpenAI client" in run.stderr and "-m pip install openai" in run.stderr


@pytest.mark.timeout(200)
def test_compare_policies_example_runs_every_policy(tmp_path: Path, clone_venv: Path) -> None:
    base = find_free_port_block(6)  # router, its metrics, then four workers
    env = {**_without_venv(), "PORT": str(base), "WORKER_BASE_PORT": str(base + 2)}
    args = ["bash", str(EXAMPLES / "compare_policies.sh")]
    with _Script(args, env, tmp_path, tmp_path) as script:
        returncode = script.proc.wait(timeout=180)
    assert returncode == 0, script.stdout[-2000:] + script.stderr[-2000:]
    for policy in ("least_ttft", "cache_aware", "round_robin", "power_of_two"):
        assert f"== {policy}" in script.stdout


def test_switch_example_starts_the_router_without_an_activated_venv(
    procs,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    clone_venv: Path,
) -> None:
    worker = procs.sim_worker("--speedup", "50")
    port, metrics_port = find_free_port(), find_free_port()
    env = {**_without_venv(), "PORT": str(port), "METRICS_PORT": str(metrics_port)}
    # From the clone's root, where a bare `exec sglctl` used to hit the sglctl/ package
    # directory ("Is a directory").
    args = ["bash", str(EXAMPLES / "switch_from_sglang_router.sh"), worker.url]
    with _Script(args, env, ROOT, tmp_path) as script:

        def healthy() -> bool:
            assert script.proc.poll() is None, f"the example exited: {script.stderr[-2000:]}"
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            return False

        wait_until(healthy, timeout=60, what="the example's router")
    assert "Is a directory" not in script.stderr


def test_example_scripts_say_how_to_install_sglctl_when_there_is_none(tmp_path: Path) -> None:
    # A clone with no .venv, and no sglctl anywhere on PATH.
    copy = tmp_path / "clone" / "examples"
    shutil.copytree(EXAMPLES, copy)
    env = {**_without_venv(), "PATH": "/usr/bin:/bin"}
    for script, args in (
        ("compare_policies.sh", []),
        ("switch_from_sglang_router.sh", ["http://127.0.0.1:1"]),
    ):
        run = subprocess.run(
            ["bash", str(copy / script), *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            cwd=ROOT,
        )
        assert run.returncode == 2, (script, run.stdout, run.stderr)
        assert "sglctl not found" in run.stderr and "pip install -e ." in run.stderr, run.stderr
        assert "command not found" not in run.stderr and "Is a directory" not in run.stderr
