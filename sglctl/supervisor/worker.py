"""One worker's life under supervision: start, become healthy, serve, crash, back off, restart.

Each :class:`SupervisedWorker` runs as one asyncio task on the supervisor's loop and owns one
slot of the shared-memory table. Every state change is written to that slot the moment it
happens -- in particular a process exit is published from the exit future's callback, before
anything else runs, because the router must stop sending to a dead worker within 100 ms.

States (``WorkerState``): STARTING (first start, until the health check passes), HEALTHY,
UNHEALTHY (alive but failing the supervisor's probes), RESTARTING (exited or being replaced;
covers the backoff and the next start-up), FAILED (crash loop: given up), REMOVED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from sglctl.state_table import StateTable, WorkerSlot, WorkerState
from sglctl.supervisor.backoff import CrashHistory, RestartPolicy
from sglctl.supervisor.logfile import RotatingLog
from sglctl.supervisor.plan import WorkerSpec
from sglctl.supervisor.process import ChildProcess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthSettings:
    """How the supervisor decides a worker is up, and later whether it is still up."""

    path: str = "/health"
    startup_timeout: float = 1800.0
    #: Seconds between probes of a running worker; 0 watches the process only.
    interval: float = 5.0
    failures: int = 3
    #: Alive but unhealthy this long: restart it (0 = never).
    unhealthy_restart_after: float = 300.0
    probe_timeout: float = 5.0


#: ``listener(worker, state, detail)``: the start-up display and the control server use it.
Listener = Callable[["SupervisedWorker", WorkerState, str], None]


class SupervisedWorker:
    """Keeps one worker process alive and its table slot current."""

    def __init__(
        self,
        spec: WorkerSpec,
        slot_index: int,
        table: StateTable,
        client: httpx.AsyncClient,
        *,
        policy: RestartPolicy,
        health: HealthSettings,
        log_dir: Path,
        log_max_bytes: int = 50 * 2**20,
        log_backups: int = 3,
        stop_timeout: float = 30.0,
        listener: Listener | None = None,
    ) -> None:
        self.spec = spec
        self.slot_index = slot_index
        self.table = table
        self.client = client
        self.health = health
        self.crashes = CrashHistory(policy)
        self.stop_timeout = stop_timeout
        self.listener = listener
        self.log = RotatingLog(log_dir / f"worker-{spec.worker_id}.log", log_max_bytes, log_backups)
        self.slot = WorkerSlot(worker_id=spec.worker_id, url=spec.url, gpus=spec.gpus_label)
        self.child: ChildProcess | None = None
        self.stopping = False
        self.task: asyncio.Task[None] | None = None
        #: Resolved once: True at the first HEALTHY, False if it fails or is removed first.
        self.settled: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._healthy_at: float | None = None  # monotonic, while HEALTHY/UNHEALTHY

    # -- public ----------------------------------------------------------------------------
    @property
    def worker_id(self) -> int:
        return self.spec.worker_id

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def state(self) -> WorkerState:
        return self.slot.state

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"worker-{self.worker_id}")

    def begin_stop(self) -> None:
        """No more restarts; cancel the lifecycle task (the process is stopped separately)."""
        self.stopping = True
        if self.task is not None:
            self.task.cancel()

    async def stop(self, final_state: WorkerState | None = None) -> None:
        """Stop for good: no restart, process tree terminated, slot set to ``final_state``."""
        self.begin_stop()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.child is not None:
            await self.child.stop(self.stop_timeout)
            await asyncio.to_thread(self.child.drain)
            self.log.mark(f"stopped (exit code {self.child.returncode})")
        if final_state is not None:
            self._publish(final_state, "stopped")
        self._settle(False)
        self.log.close()

    def kill_now(self) -> None:
        self.begin_stop()
        if self.child is not None:
            self.child.kill_now()

    # -- lifecycle -------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._lifecycle()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("worker %d: supervision failed; marking it failed", self.worker_id)
            self._publish(WorkerState.FAILED, "supervisor error")
            self._settle(False)

    async def _lifecycle(self) -> None:
        first = True
        while not self.stopping:
            child = self._spawn(WorkerState.STARTING if first else WorkerState.RESTARTING)
            first = False
            if child is None:
                outcome = "could not be started"
            else:
                outcome = await self._until_healthy(child)
                if outcome == "healthy":
                    self._healthy_at = time.monotonic()
                    self._publish(WorkerState.HEALTHY, "", healthy_since=time.time())
                    self._settle(True)
                    outcome = await self._watch(child)
            if self.stopping:
                return
            healthy_for = (
                time.monotonic() - self._healthy_at if self._healthy_at is not None else 0.0
            )
            self._healthy_at = None
            if child is not None:
                if child.alive():
                    log.warning(
                        "worker %d (pid %d) %s; stopping it", self.worker_id, child.pid, outcome
                    )
                    self._publish(WorkerState.RESTARTING, outcome)
                await child.stop(self.stop_timeout)
                await asyncio.to_thread(child.drain)
                outcome = _describe_exit(child.returncode) if outcome == "exited" else outcome
            delay = self.crashes.record_crash(healthy_for)
            tail = self.log.tail(30)
            if delay is None:
                log.error(
                    "worker %d %s; %d crashes within %.0f s: giving up on it (log: %s)\n%s",
                    self.worker_id,
                    outcome,
                    self.crashes.recent_crashes,
                    self.crashes.policy.window,
                    self.log.path,
                    tail,
                )
                self.log.mark(f"{outcome}; failed (crash loop)")
                self._publish(WorkerState.FAILED, f"{outcome}; crash loop", tail=tail)
                self._settle(False)
                return
            log.warning(
                "worker %d %s%s; restarting in %.1f s (%d recent crashes, limit %d)",
                self.worker_id,
                outcome,
                f" after {healthy_for:.1f} s healthy" if healthy_for else "",
                delay,
                self.crashes.recent_crashes,
                self.crashes.policy.max_crashes,
            )
            self.log.mark(f"{outcome}; restarting in {delay:.1f} s")
            self._publish(
                WorkerState.RESTARTING, f"{outcome}; restarting in {delay:.1f} s", tail=tail
            )
            await asyncio.sleep(delay)

    def _spawn(self, state: WorkerState) -> ChildProcess | None:
        try:
            child = ChildProcess.start(
                f"worker-{self.worker_id}", self.spec.argv, self.log, env=self.spec.env
            )
        except OSError as exc:
            log.error("worker %d could not be started: %s", self.worker_id, exc)
            self.log.mark(f"could not be started: {exc}")
            return None
        if self.child is not None:
            self.slot.restarts += 1
        self.child = child
        self.slot.pid = child.pid
        self.slot.pid_create_time = child.create_time
        self.slot.started_at = time.time()
        self.slot.exit_code = 0
        self.slot.healthy_since = 0.0
        child.exited.add_done_callback(self._on_exit)
        self._publish(state, f"pid {child.pid}")
        return child

    def _on_exit(self, exited: asyncio.Future[int]) -> None:
        """Runs on the loop the instant the exit is seen: take the worker out of routing."""
        if (
            self.stopping
            or exited.cancelled()
            or self.child is None
            or exited is not self.child.exited
        ):
            return
        self.slot.exit_code = exited.result()
        self._publish(WorkerState.RESTARTING, _describe_exit(exited.result()))

    async def _until_healthy(self, child: ChildProcess) -> str:
        """Probe until healthy; 'healthy', 'exited' or a timeout description."""
        deadline = time.monotonic() + self.health.startup_timeout
        interval = 0.05
        while True:
            if not child.alive():
                return "exited"
            if await self._probe():
                return "healthy"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"did not pass its health check within {self.health.startup_timeout:g} s"
            await asyncio.wait({child.exited}, timeout=min(interval, remaining))
            interval = min(interval * 1.5, 1.0)

    async def _watch(self, child: ChildProcess) -> str:
        """While it runs: probe now and then; return 'exited' or why it is being replaced."""
        if self.health.interval <= 0:
            await asyncio.wait({child.exited})
            return "exited"
        failures = 0
        unhealthy_since: float | None = None
        while True:
            await asyncio.wait({child.exited}, timeout=self.health.interval)
            if not child.alive():
                return "exited"
            ok = await self._probe()
            if not child.alive():
                return "exited"
            if ok:
                failures = 0
                if self.state == WorkerState.UNHEALTHY:
                    log.info("worker %d passes its health check again", self.worker_id)
                    self._publish(WorkerState.HEALTHY, "recovered")
                unhealthy_since = None
                continue
            failures += 1
            if failures >= self.health.failures and self.state == WorkerState.HEALTHY:
                log.warning(
                    "worker %d failed %d health checks in a row: unhealthy",
                    self.worker_id,
                    failures,
                )
                self._publish(WorkerState.UNHEALTHY, f"{failures} failed health checks")
                unhealthy_since = time.monotonic()
            limit = self.health.unhealthy_restart_after
            if (
                unhealthy_since is not None
                and limit > 0
                and time.monotonic() - unhealthy_since >= limit
            ):
                return f"was unhealthy for {limit:.0f} s"

    async def _probe(self) -> bool:
        try:
            response = await self.client.get(
                self.url + self.health.path, timeout=self.health.probe_timeout
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    # -- publishing ------------------------------------------------------------------------
    def _publish(
        self, state: WorkerState, detail: str, *, healthy_since: float | None = None, tail: str = ""
    ) -> None:
        previous = self.slot.state
        self.slot.state = state
        self.slot.changed_at = time.time()
        if healthy_since is not None:
            self.slot.healthy_since = healthy_since
        self.table.write_slot(self.slot_index, self.slot)
        if state != previous:
            if previous == WorkerState.EMPTY:
                log.info("worker %d %s at %s (%s)", self.worker_id, state.label, self.url, detail)
            else:
                log.info(
                    "worker %d %s -> %s %s", self.worker_id, previous.label, state.label, detail
                )
        if self.listener is not None:
            self.listener(self, state, tail or detail)

    def _settle(self, ok: bool) -> None:
        if not self.settled.done():
            self.settled.set_result(ok)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"
