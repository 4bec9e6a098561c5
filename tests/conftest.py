"""Shared fixtures: real sglctl processes on free 127.0.0.1 ports, always stopped.

``procs.sim_worker(...)`` and ``procs.router(...)`` start subprocesses and wait until they are
healthy; everything started in a test is stopped at teardown, and the tail of each process's
log is printed (pytest shows it only when the test failed).
"""

from __future__ import annotations

import os
import sys
import tempfile

# Bytecode first, before anything below is imported. With PYTHONDONTWRITEBYTECODE set (as on
# the shared dev machine) every process compiles sglctl from source: each of the suite's
# ~1,000 sim workers and routers pays ~0.2 s CPU for it, and pytest re-rewrites the asserts
# of every test module at collection (~10 s). Instead of writing .pyc files beside the
# sources (what the variable forbids), this run and its children keep them under a cache
# directory of their own in the temp dir; a run without the variable is left alone.
if os.environ.get("PYTHONDONTWRITEBYTECODE"):
    _prefix = os.environ.get("PYTHONPYCACHEPREFIX") or os.path.join(
        tempfile.gettempdir(), f"sglctl-pycache-{os.getuid()}"
    )
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    os.environ["PYTHONPYCACHEPREFIX"] = _prefix
    sys.dont_write_bytecode = False
    sys.pycache_prefix = _prefix

from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from sglctl.spawn import (
    ManagedProcess,
    spawn,
    spawn_router,
    spawn_sim_worker,
    stop_together,
)


class Procs:
    """Starts processes for one test and remembers them for teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[ManagedProcess] = []

    def sim_worker(self, *extra: str, **kwargs: object) -> ManagedProcess:
        proc = spawn_sim_worker(self.log_dir, *extra, **kwargs)  # type: ignore[arg-type]
        self.started.append(proc)
        return proc

    def router(self, worker_urls: Sequence[str], *extra: str, **kwargs: object) -> ManagedProcess:
        proc = spawn_router(self.log_dir, worker_urls, *extra, **kwargs)  # type: ignore[arg-type]
        self.started.append(proc)
        return proc

    def spawn(self, name: str, args: Sequence[str], **kwargs: object) -> ManagedProcess:
        proc = spawn(name, args, log_dir=self.log_dir, **kwargs)  # type: ignore[arg-type]
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        started, self.started = list(reversed(self.started)), []
        stop_together(started)  # all at once: each takes ~0.2 s to exit
        for proc in started:
            print(f"----- {proc.name} (pid {proc.pid}) log tail -----\n{proc.log_tail()}")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    launcher = Procs(tmp_path / "logs")
    try:
        yield launcher
    finally:
        launcher.stop_all()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    """A plain HTTP client for the test's requests (no proxy from the environment)."""
    with httpx.Client(timeout=60, trust_env=False) as c:
        yield c
