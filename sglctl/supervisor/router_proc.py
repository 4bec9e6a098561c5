"""The router as a supervised child of ``sglctl up``.

The router runs as its own process (``python -m sglctl.router ... --state-table NAME``) so a
bug in request handling cannot take the supervisor -- and with it every worker -- down, and
so that it can be restarted on its own: it rebuilds its view of the workers from the table.
A router that keeps crashing is fatal for the run (nothing could be served). Restarts go
through the same loop as the workers' (:func:`~sglctl.supervisor.backoff.keep_restarting`).
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

from sglctl.polling import PollTimeout, poll
from sglctl.supervisor.backoff import Attempt, CrashHistory, RestartPolicy, keep_restarting
from sglctl.supervisor.logfile import RotatingLog
from sglctl.supervisor.process import ChildProcess

log = logging.getLogger(__name__)


def router_command(
    router_args: Sequence[str], state_table: str, python: str = sys.executable, pd: bool = False
) -> list[str]:
    """The router's argv: the user's router flags unchanged, plus the table to follow (and,
    for a PD layout, PD mode: the table gives each worker's role and bootstrap port)."""
    pd_flag = ["--pd-disaggregation"] if pd else []
    return [python, "-m", "sglctl.router", *router_args, *pd_flag, "--state-table", state_table]


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

        async def ready() -> bool | None:
            response = await self.client.get(self.url + "/readiness", timeout=2.0)
            ok = response.status_code == 200 and response.json().get("status") == "ready"
            return True if ok else None

        try:
            return await poll(
                ready,
                timeout,
                what="the router's /readiness",
                retry_on=(httpx.HTTPError, ValueError),
            )
        except PollTimeout:
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
        async def live() -> bool | None:
            response = await self.client.get(self.url + "/liveness", timeout=2.0)
            return True if response.status_code == 200 else None

        try:
            return await poll(
                live,
                timeout,
                what="the router's /liveness",
                retry_on=(httpx.HTTPError,),
                alive=child.alive,
            )
        except PollTimeout:
            return False

    # -- lifecycle (driven by keep_restarting) ---------------------------------------------
    async def _keep_alive(self) -> None:
        await keep_restarting(self, self.crashes, lambda: self.stopping)

    async def attempt(self, first: bool) -> Attempt:
        """Run the router until it exits; the first run is the one :meth:`start` began."""
        if first and self.child is not None:
            child = self.child
        else:
            child = self._spawn()
            if not await self._wait_live(child, 60.0):
                await child.stop(5.0)
                return Attempt("did not answer /liveness within 60 s", pid=child.pid)
        await child.wait()
        await child.stop(5.0)
        return Attempt(child.describe_exit(), time.monotonic() - self._started_at, child.pid)

    def restarting(self, attempt: Attempt, delay: float, crashes: CrashHistory) -> None:
        log.error(
            "the router (pid %d) %s after %.1f s; restarting in %.1f s:\n%s",
            attempt.pid,
            attempt.outcome,
            attempt.up_for,
            delay,
            self.log.tail(30),
        )

    def given_up(self, attempt: Attempt, crashes: CrashHistory) -> None:
        self.on_fatal(
            f"the router keeps crashing ({crashes.recent_crashes} times within "
            f"{crashes.policy.window:.0f} s; last: {attempt.outcome}); "
            f"see {self.log.path}:\n{self.log.tail(30)}"
        )
