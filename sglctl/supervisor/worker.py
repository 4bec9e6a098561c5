"""One worker's life under supervision: start, become healthy, serve, crash, back off, restart.

Each :class:`SupervisedWorker` runs as one asyncio task on the supervisor's loop and is the
**only writer of its slot** in the shared-memory table (the supervisor asks it to change state,
it never writes the slot itself). Every state change is written the moment it happens -- in
particular a process exit is published from the exit future's callback, before anything else
runs, because the router must stop sending to a dead worker within 100 ms. The restart loop
(backoff, crash window, crash loop -> failed) is :func:`~sglctl.supervisor.backoff.keep_restarting`,
the same one the router child uses.

States (``WorkerState``): STARTING (first start, until the health check passes), HEALTHY,
UNHEALTHY (alive but failing the supervisor's probes), RESTARTING (exited or being replaced;
covers the backoff and the next start-up), FAILED (crash loop: given up), REMOVED.

**Health under ``sglctl up`` has one source: these probes.** The supervisor must probe anyway
(it decides restarts), so it publishes the verdict in the table and the router follows it
within ~10 ms instead of probing the same workers again. The probe is tuned to notice a hung
worker (SIGSTOPped, deadlocked: it accepts a connection but answers nothing) within seconds:
probe every ``interval`` (1 s), each with a ``probe_timeout`` (1 s for sim workers, so about
2-3 s in all; 3 s for SGLang, whose ``/health`` runs a one-token generation and answers after
about 1 s, so about 5-7 s), a failure re-probed at once, ``failures`` (2) in a row mark it
UNHEALTHY -- because the router interrupts and retries elsewhere the requests of a worker
marked so. Being unhealthy costs the worker only its traffic: it is *restarted* only after
staying unhealthy for ``unhealthy_restart_after`` (300 s), so a worker that is merely slow for
a while (a long prefill, a GC pause) comes back at its next good probe instead of losing its
cache and minutes of model loading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sglctl.polling import PollTimeout, poll
from sglctl.state_table import StateTable, WorkerSlot, WorkerState
from sglctl.supervisor.backoff import Attempt, CrashHistory, RestartPolicy, keep_restarting
from sglctl.supervisor.logfile import RotatingLog
from sglctl.supervisor.plan import WorkerSpec
from sglctl.supervisor.process import ChildProcess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthSettings:
    """How the supervisor decides a worker is up, and later whether it is still up.

    Defaults detect a hung worker in ``interval + failures * probe_timeout`` = about 3 s at
    worst (see the module docstring for why that matters and why restarts wait much longer).
    """

    path: str = "/health"
    startup_timeout: float = 1800.0
    #: Seconds between probes of a running worker; 0 watches the process only.
    interval: float = 1.0
    #: Consecutive failed probes (a failure is re-probed at once) before UNHEALTHY.
    failures: int = 2
    #: Alive but unhealthy this long: restart it (0 = never).
    unhealthy_restart_after: float = 300.0
    #: A probe that has no answer within this many seconds failed.
    probe_timeout: float = 1.0


#: ``listener(worker, state, detail)``: the start-up display and the control server use it.
Listener = Callable[["SupervisedWorker", WorkerState, str], None]


class SupervisedWorker:
    """Keeps one worker process alive and its table slot current (the slot's one writer)."""

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
        self.slot = WorkerSlot(
            worker_id=spec.worker_id,
            url=spec.url,
            gpus=spec.gpus_label,
            role=spec.role,
            bootstrap_port=spec.bootstrap_port or 0,
        )
        self.child: ChildProcess | None = None
        self.stopping = False
        self.task: asyncio.Task[None] | None = None
        #: Resolved once: True at the first HEALTHY, False if it fails or is removed first.
        self.settled: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

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

    def describe(self) -> dict[str, Any]:
        """The worker as the control socket reports it."""
        return {
            "worker_id": self.worker_id,
            "url": self.url,
            "state": self.state.label,
            "pid": self.slot.pid,
            "gpus": self.spec.gpus_label,
            "role": self.spec.role,
            "bootstrap_port": self.spec.bootstrap_port,
            "restarts": self.slot.restarts,
            "log": str(self.log.path),
        }

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"worker-{self.worker_id}")

    def begin_stop(self) -> None:
        """No more restarts; cancel the lifecycle task (the process is stopped separately)."""
        self.stopping = True
        if self.task is not None:
            self.task.cancel()

    async def remove(self) -> None:
        """Take the worker out of routing at once (REMOVED), then stop its process for good."""
        self._publish(WorkerState.REMOVED, "removing")
        await self.stop(final_state=WorkerState.REMOVED)

    async def stop(self, final_state: WorkerState | None = None, *, announce: bool = True) -> None:
        """Stop for good: no restart, process tree terminated, slot set to ``final_state``.

        ``announce=False`` (shutdown of the whole run) writes the slot without telling the
        listener, so Ctrl-C does not print one "removed" line per worker.
        """
        self.begin_stop()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.child is not None:
            await self.child.stop(self.stop_timeout)
            await asyncio.to_thread(self.child.drain)
            self.log.mark(f"stopped (exit code {self.child.returncode})")
        if final_state is not None:
            self._publish(final_state, "stopped", notify=announce)
        self._settle(False)
        self.log.close()

    def kill_now(self) -> None:
        self.begin_stop()
        if self.child is not None:
            self.child.kill_now()

    # -- lifecycle (driven by keep_restarting) ---------------------------------------------
    async def _run(self) -> None:
        try:
            await keep_restarting(self, self.crashes, lambda: self.stopping)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("worker %d: supervision failed; marking it failed", self.worker_id)
            self._publish(WorkerState.FAILED, "supervisor error")
            self._settle(False)

    async def attempt(self, first: bool) -> Attempt:
        """Start the process, wait until healthy, watch it; stop it when it must be replaced."""
        child = self._spawn(WorkerState.STARTING if first else WorkerState.RESTARTING)
        if child is None:
            return Attempt("could not be started")
        healthy_at: float | None = None
        outcome = await self._until_healthy(child)
        if outcome == "healthy":
            healthy_at = time.monotonic()
            log.info(
                "worker %d (pid %d) is healthy at %s after %.1f s",
                self.worker_id,
                child.pid,
                self.url,
                time.time() - self.slot.started_at,
            )
            self._publish(WorkerState.HEALTHY, "", healthy_since=time.time())
            self._settle(True)
            outcome = await self._watch(child)
        up_for = time.monotonic() - healthy_at if healthy_at is not None else 0.0
        if child.alive() and not self.stopping:
            log.warning("worker %d (pid %d) %s; stopping it", self.worker_id, child.pid, outcome)
            self._publish(WorkerState.RESTARTING, outcome)
        await child.stop(self.stop_timeout)
        await asyncio.to_thread(child.drain)
        if outcome == "exited":
            outcome = child.describe_exit()
        return Attempt(outcome, up_for, pid=child.pid)

    def restarting(self, attempt: Attempt, delay: float, crashes: CrashHistory) -> None:
        log.warning(
            "worker %d%s %s%s; restarting in %.1f s (%d crashes in the last %.0f s; failed at %d)",
            self.worker_id,
            f" (pid {attempt.pid})" if attempt.pid else "",
            attempt.outcome,
            f" after {attempt.up_for:.1f} s healthy" if attempt.up_for else "",
            delay,
            crashes.recent_crashes,
            crashes.policy.window,
            crashes.policy.max_crashes,
        )
        self.log.mark(f"{attempt.outcome}; restarting in {delay:.1f} s")
        self._publish(
            WorkerState.RESTARTING,
            f"{attempt.outcome}; restarting in {delay:.1f} s",
            tail=self.log.tail(30),
        )

    def given_up(self, attempt: Attempt, crashes: CrashHistory) -> None:
        tail = self.log.tail(30)
        log.error(
            "worker %d%s %s; %d crashes within %.0f s: giving up on it (log: %s)\n%s",
            self.worker_id,
            f" (pid {attempt.pid})" if attempt.pid else "",
            attempt.outcome,
            crashes.recent_crashes,
            crashes.policy.window,
            self.log.path,
            tail,
        )
        self.log.mark(f"{attempt.outcome}; failed (crash loop)")
        self._publish(WorkerState.FAILED, f"{attempt.outcome}; crash loop", tail=tail)
        self._settle(False)

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
        log.info(
            "worker %d %s at %s (pid %d%s%s)",
            self.worker_id,
            "starting" if state == WorkerState.STARTING else "restarting",
            self.url,
            child.pid,
            f", GPUs {self.spec.gpus_label}" if self.spec.gpus_label else "",
            _role_note(self.spec),
        )
        self._publish(state, f"pid {child.pid}")
        return child

    def _on_exit(self, exited: asyncio.Future[int]) -> None:
        """Runs on the loop the instant the exit is seen: take the worker out of routing.

        It only publishes; the restart loop logs the exit once it knows the restart delay.
        """
        if (
            self.stopping
            or exited.cancelled()
            or self.child is None
            or exited is not self.child.exited
        ):
            return
        self.slot.exit_code = exited.result()
        self._publish(WorkerState.RESTARTING, self.child.describe_exit())

    async def _until_healthy(self, child: ChildProcess) -> str:
        """Probe until healthy; 'healthy', 'exited' or a timeout description."""

        async def passes() -> bool | None:
            return True if await self._probe() is None else None

        timeout = self.health.startup_timeout
        try:
            await poll(
                passes,
                timeout,
                what=f"{self.url}{self.health.path}",
                interval=0.1,
                alive=child.alive,
            )
        except PollTimeout as exc:
            if not child.alive():
                return "exited"
            return f"did not pass its health check within {timeout:g} s (last: {exc.last})"
        return "healthy" if child.alive() else "exited"

    async def _watch(self, child: ChildProcess) -> str:
        """While it runs: probe now and then; return 'exited' or why it is being replaced."""
        if self.health.interval <= 0:
            await asyncio.wait({child.exited})
            return "exited"
        failures = 0
        unhealthy_since: float | None = None
        pause = self.health.interval
        while True:
            await asyncio.wait({child.exited}, timeout=pause)
            if not child.alive():
                return "exited"
            problem = await self._probe()
            if not child.alive():
                return "exited"
            if problem is None:
                failures, pause, unhealthy_since = 0, self.health.interval, None
                if self.state == WorkerState.UNHEALTHY:
                    log.info(
                        "worker %d (pid %d) answers its health check again: back in routing",
                        self.worker_id,
                        child.pid,
                    )
                    self._publish(WorkerState.HEALTHY, "recovered")
                continue
            failures += 1
            # Confirm a failure at once: a hung worker leaves routing after `failures` probe
            # timeouts, not after `failures` intervals.
            pause = 0.0 if failures < self.health.failures else self.health.interval
            limit = self.health.unhealthy_restart_after
            if failures >= self.health.failures and self.state == WorkerState.HEALTHY:
                log.warning(
                    "worker %d (pid %d) failed %d health checks in a row (%s): unhealthy, "
                    "out of routing%s",
                    self.worker_id,
                    child.pid,
                    failures,
                    problem,
                    f"; restarted if still unhealthy after {limit:.0f} s" if limit > 0 else "",
                )
                self._publish(WorkerState.UNHEALTHY, f"{failures} failed health checks ({problem})")
                unhealthy_since = time.monotonic()
            if (
                unhealthy_since is not None
                and limit > 0
                and time.monotonic() - unhealthy_since >= limit
            ):
                return f"was unhealthy for {limit:.0f} s"

    async def _probe(self) -> str | None:
        """One health probe: None when it passed, else what went wrong (for the logs)."""
        try:
            response = await self.client.get(
                self.url + self.health.path, timeout=self.health.probe_timeout
            )
        except httpx.TimeoutException:
            return f"no answer within {self.health.probe_timeout:g} s"
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return None if response.status_code == 200 else f"HTTP {response.status_code}"

    # -- publishing ------------------------------------------------------------------------
    def _publish(
        self,
        state: WorkerState,
        detail: str,
        *,
        healthy_since: float | None = None,
        tail: str = "",
        notify: bool = True,
    ) -> None:
        """Write the slot now and tell the listener. The one place the slot is written.

        The human-readable log line is written by the caller, which knows why (an exit,
        a failed probe, a restart delay); here only a debug line records the transition.
        """
        previous = self.slot.state
        self.slot.state = state
        self.slot.changed_at = time.time()
        if healthy_since is not None:
            self.slot.healthy_since = healthy_since
        self.table.write_slot(self.slot_index, self.slot)
        if state != previous:
            log.debug(
                "worker %d slot %d: %s -> %s (%s)",
                self.worker_id,
                self.slot_index,
                previous.label,
                state.label,
                detail,
            )
        if notify and self.listener is not None:
            self.listener(self, state, tail or detail)

    def _settle(self, ok: bool) -> None:
        if not self.settled.done():
            self.settled.set_result(ok)


def _role_note(spec: WorkerSpec) -> str:
    """``, prefill, bootstrap port 8998`` for the logs; empty for a regular worker."""
    if spec.role == "regular":
        return ""
    port = f", bootstrap port {spec.bootstrap_port}" if spec.bootstrap_port else ""
    return f", {spec.role}{port}"
