"""The router as a supervised child of ``sglctl up``.

The router runs as its own process (``python -m sglctl.router ... --state-table NAME``) so a
bug in request handling cannot take the supervisor -- and with it every worker -- down, and
so that it can be restarted on its own: it rebuilds its view of the workers from the table.
A router that keeps crashing is fatal for the run (nothing could be served).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from sglctl.supervisor.backoff import CrashHistory, RestartPolicy
from sglctl.supervisor.logfile import RotatingLog
from sglctl.supervisor.process import ChildProcess

log = logging.getLogger(__name__)


def router_command(
    router_args: Sequence[str], state_table: str, python: str = sys.executable
) -> list[str]:
    """The router's argv: the user's router flags unchanged, plus the table to follow."""
    return [python, "-m", "sglctl.router", *router_args, "--state-table", state_table]


class RouterStartError(RuntimeError):
    """The router did not come up; the message carries the tail of its log."""


class SupervisedRouter:
    """Start the router, restart it when it dies, stop it gracefully (it drains first)."""

    def __init__(
        self,
        argv: Sequence[str],
        url: str,
        log_dir: Path,
        client: httpx.AsyncClient,
        *,
        policy: RestartPolicy,
        grace_period: float,
        on_fatal: Callable[[str], None],
        log_max_bytes: int = 50 * 2**20,
        log_backups: int = 3,
    ) -> None:
        self.argv = list(argv)
        self.url = url
        self.client = client
        self.grace_period = grace_period
        self.on_fatal = on_fatal
        self.log = RotatingLog(log_dir / "router.log", log_max_bytes, log_backups)
        self.crashes = CrashHistory(policy)
        self.child: ChildProcess | None = None
        self.stopping = False
        self._task: asyncio.Task[None] | None = None
        self._started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    async def start(self, timeout: float = 60.0) -> None:
        """Start the router and wait until it answers ``/liveness``; then keep it alive."""
        child = self._spawn()
        if not await self._wait_live(child, timeout):
            code = "still running" if child.alive() else f"exit code {child.returncode}"
            await child.stop(5.0)
            await asyncio.to_thread(child.drain)  # its last words (the error) come last
            tail = self.log.tail(40)
            raise RouterStartError(
                f"the router did not start ({code}; log: {self.log.path}):\n{tail}"
            )
        self._task = asyncio.create_task(self._keep_alive(), name="router")

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until the router reports a healthy worker (``/readiness``), up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                response = await self.client.get(self.url + "/readiness", timeout=2.0)
                if response.status_code == 200 and response.json().get("status") == "ready":
                    return True
            await asyncio.sleep(0.05)
        return False

    async def stop(self) -> None:
        """SIGTERM: the router stops accepting and drains in-flight requests for up to the
        grace period; whatever is left after that (plus a margin) is killed."""
        self.stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.child is not None:
            await self.child.stop(self.grace_period + 5.0)
            await asyncio.to_thread(self.child.drain)
            self.log.mark(f"stopped (exit code {self.child.returncode})")
        self.log.close()

    def kill_now(self) -> None:
        self.stopping = True
        if self.child is not None:
            self.child.kill_now()

    def _spawn(self) -> ChildProcess:
        self.child = ChildProcess.start("router", self.argv, self.log)
        self._started_at = time.monotonic()
        return self.child

    async def _wait_live(self, child: ChildProcess, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and child.alive():
            with contextlib.suppress(httpx.HTTPError):
                if (await self.client.get(self.url + "/liveness", timeout=2.0)).status_code == 200:
                    return True
            await asyncio.wait({child.exited}, timeout=0.05)
        return False

    async def _keep_alive(self) -> None:
        while not self.stopping:
            assert self.child is not None
            code = await self.child.wait()
            if self.stopping:
                return
            await self.child.stop(5.0)
            up_for = time.monotonic() - self._started_at
            delay = self.crashes.record_crash(up_for)
            tail = self.log.tail(30)
            if delay is None:
                self.on_fatal(
                    f"the router keeps crashing (last exit code {code}); "
                    f"see {self.log.path}:\n{tail}"
                )
                return
            log.error(
                "the router exited with code %s after %.1f s; restarting in %.1f s:\n%s",
                code,
                up_for,
                delay,
                tail,
            )
            await asyncio.sleep(delay)
            child = self._spawn()
            if not await self._wait_live(child, 60.0):
                log.error("the restarted router is not answering; will retry")
