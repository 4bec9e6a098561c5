"""Start sglctl processes (sim workers, routers) on local ports and stop them reliably.

Used by the integration tests and the benchmarks, which need real processes on real sockets
and must never leave one behind. Each process writes its output to a log file so that a
failure can show what the process said.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sglctl.net import find_free_port, wait_for_http
from sglctl.proctree import terminate_tree

#: How often :func:`spawn` asks a starting process for its health. A refused connection costs
#: well under a millisecond (~0.3 ms CPU), and the suite starts hundreds: at 50 ms each start waited
#: 25 ms on average after the process was ready, at 10 ms 5 ms.
READY_POLL_SECS = 0.01


class ProcessStartError(RuntimeError):
    """A spawned process did not become ready; the message carries the tail of its log."""


@dataclass
class ManagedProcess:
    """One child process with its URL and log file."""

    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log_path: Path
    _log_file: object = field(repr=False, default=None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process tree; kill what does not exit within ``timeout``."""
        if self.alive():
            terminate_tree(self.popen.pid, timeout=timeout)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=5)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None


def stop_together(procs: Sequence[ManagedProcess], timeout: float = 10.0) -> None:
    """Stop ``procs`` at the same time instead of one after the other.

    A uvicorn server takes ~0.2 s from SIGTERM to exit (it notices the signal on its next
    0.1 s tick, then shuts down), so a router and four workers stopped in turn spent a second
    only waiting. Each process is stopped as :meth:`ManagedProcess.stop` does, in a thread.
    """
    if len(procs) <= 1:
        for proc in procs:
            proc.stop(timeout)
        return
    with ThreadPoolExecutor(len(procs), thread_name_prefix="stop") as pool:
        list(pool.map(lambda proc: proc.stop(timeout), procs))


def spawn(
    name: str,
    args: Sequence[str],
    *,
    url: str,
    log_dir: Path,
    health_path: str = "/health",
    ready_timeout: float = 30.0,
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> ManagedProcess:
    """Start ``args`` with output to ``log_dir/name.log``; with ``wait``, block until healthy."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")  # noqa: SIM115 - closed by ManagedProcess.stop
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    popen = subprocess.Popen(
        list(args),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=full_env,
        stdin=subprocess.DEVNULL,
    )
    proc = ManagedProcess(name, popen, url, log_path, log_file)
    if wait and not wait_for_http(
        url + health_path, ready_timeout, interval=READY_POLL_SECS, alive=proc.alive
    ):
        tail = proc.log_tail()
        proc.stop()
        raise ProcessStartError(f"{name} did not become healthy at {url}{health_path}:\n{tail}")
    return proc


def spawn_sim_worker(
    log_dir: Path, *extra: str, port: int | None = None, name: str | None = None, wait: bool = True
) -> ManagedProcess:
    """Start ``sglctl sim-worker`` on 127.0.0.1 (a free port unless one is given)."""
    port = port or find_free_port()
    args = [
        sys.executable,
        "-m",
        "sglctl",
        "sim-worker",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]
    return spawn(
        name or f"sim-{port}", args, url=f"http://127.0.0.1:{port}", log_dir=log_dir, wait=wait
    )


def spawn_router(
    log_dir: Path,
    worker_urls: Sequence[str],
    *extra: str,
    port: int | None = None,
    name: str | None = None,
    health_path: str = "/liveness",
    wait: bool = True,
) -> ManagedProcess:
    """Start ``python -m sglctl.router`` in front of ``worker_urls`` on 127.0.0.1."""
    port = port or find_free_port()
    args = router_command(port, worker_urls, extra)
    return spawn(
        name or f"router-{port}",
        args,
        url=f"http://127.0.0.1:{port}",
        log_dir=log_dir,
        health_path=health_path,
        wait=wait,
    )


def router_command(port: int, worker_urls: Sequence[str], extra: Sequence[str]) -> list[str]:
    """The router's command line for :func:`spawn_router`.

    The router's Prometheus listener defaults to port 29000, shared by every router on the
    host: two test runs (or two routers in one test) would fight over it, and the loser fails
    its start-up. So unless ``extra`` names ``--metrics-port``, the router gets a free one.
    """
    args = [sys.executable, "-m", "sglctl.router", "--host", "127.0.0.1", "--port", str(port)]
    if worker_urls:
        args += ["--worker-urls", *worker_urls]
    if not _names_flag(extra, "--metrics-port"):
        args += ["--metrics-port", str(find_free_port())]
    return args + list(extra)


def _names_flag(args: Sequence[str], flag: str) -> bool:
    """Whether ``args`` gives ``flag`` (as ``--flag value`` or ``--flag=value``)."""
    return any(arg == flag or arg.startswith(flag + "=") for arg in args)
