"""The supervisor: workers, the router, the control socket, signals, and an orderly shutdown.

Shaped like uvicorn's multiprocess supervisor: signal handlers only record the signal and
wake the loop; everything else happens in coroutines on one asyncio loop, which is also the
only writer of the supervisor's side of the shared-memory table. Each worker has its own
lifecycle task (:class:`~sglctl.supervisor.worker.SupervisedWorker`); the router is one more
supervised child (:class:`~sglctl.supervisor.router_proc.SupervisedRouter`).

Shutdown order matters for "no failed request": the router is stopped first (it stops
accepting and drains in-flight requests for ``--shutdown-grace-period-secs``) while the
workers keep serving; then the workers are stopped (SIGTERM, SIGKILL after a timeout), then
the table is unlinked. A second Ctrl-C kills everything at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sglctl.state_table import StateTable, WorkerState
from sglctl.supervisor.backoff import RestartPolicy
from sglctl.supervisor.control import ControlError, ControlServer
from sglctl.supervisor.plan import PlanError, WorkerFactory, WorkerSpec
from sglctl.supervisor.router_proc import RouterStartError, SupervisedRouter
from sglctl.supervisor.worker import HealthSettings, Listener, SupervisedWorker

log = logging.getLogger(__name__)


@dataclass
class SupervisorSettings:
    """What the supervisor needs besides the table and the worker specs."""

    run_dir: Path
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    health: HealthSettings = field(default_factory=HealthSettings)
    worker_stop_timeout: float = 30.0
    log_max_bytes: int = 50 * 2**20
    log_backups: int = 3
    #: The router's argv and URL; None runs workers only (tests of supervision alone).
    router_argv: list[str] | None = None
    router_url: str = ""
    router_grace_period: float = 180.0
    router_start_timeout: float = 60.0
    control_path: Path | None = None
    install_signal_handlers: bool = True


class Supervisor:
    """Runs one ``sglctl up``: start everything, keep it alive, stop it in order."""

    def __init__(
        self,
        settings: SupervisorSettings,
        table: StateTable,
        specs: list[WorkerSpec],
        factory: WorkerFactory | None = None,
        base_port: int = 31000,
    ) -> None:
        self.settings = settings
        self.table = table
        self.specs = specs
        self.factory = factory
        self.base_port = base_port
        self.workers: dict[int, SupervisedWorker] = {}
        self.router: SupervisedRouter | None = None
        self.client: httpx.AsyncClient | None = None
        self.control: ControlServer | None = None
        self.listener: Listener | None = None
        #: Called with the list of workers once start-up is over (the UI prints the summary).
        self.on_started: Callable[[Supervisor], None] | None = None
        self.exit_code = 0
        self._stop = asyncio.Event()
        self._signals = 0
        self._next_worker_id = max((s.worker_id for s in specs), default=-1) + 1
        self._lock = asyncio.Lock()  # serialises add/remove

    # -- entry point -----------------------------------------------------------------------
    async def run(self) -> int:
        """Start, serve until a signal (or a fatal error), then shut down. Returns the exit code."""
        loop = asyncio.get_running_loop()
        if self.settings.install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_stop, sig)
        self.client = httpx.AsyncClient(trust_env=False)
        try:
            await self.start()
            if not self._stop.is_set():
                await self._stop.wait()
        except (RouterStartError, PlanError) as exc:
            log.error("%s", exc)
            self.exit_code = 1
        finally:
            await self.shutdown()
            if self.settings.install_signal_handlers:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
        return self.exit_code

    def request_stop(self, sig: int | None = None) -> None:
        """Signal handler (and API): first call starts a graceful stop, second forces it."""
        self._signals += 1
        if self._signals == 1:
            if sig is not None:
                log.info(
                    "received %s: shutting down (press Ctrl-C again to kill at once)",
                    signal.Signals(sig).name,
                )
            self._stop.set()
        else:
            log.warning("second stop request: killing every process now")
            self._kill_everything()

    def fatal(self, message: str) -> None:
        log.error("%s", message)
        self.exit_code = 1
        self._stop.set()

    # -- start-up --------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the workers, wait until each is healthy or failed, then start the router."""
        run_dir = self.settings.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.control_path is not None:
            self.control = ControlServer(self.settings.control_path, self.handle_control)
            await self.control.start()
        for index, spec in enumerate(self.specs):
            self._add(spec, index).start()
        pending: set[asyncio.Future[Any]] = {
            asyncio.ensure_future(w.settled) for w in self.workers.values()
        }
        stop_wait = asyncio.ensure_future(self._stop.wait())
        try:
            while pending and not self._stop.is_set():
                _, pending = await asyncio.wait(
                    pending | {stop_wait}, return_when=asyncio.FIRST_COMPLETED
                )
                pending.discard(stop_wait)
        finally:
            stop_wait.cancel()
        if self._stop.is_set():
            return
        healthy = [w for w in self.workers.values() if w.state == WorkerState.HEALTHY]
        if not healthy:
            self.fatal(
                "no worker could be started; see the log tails above and the logs in "
                + str(run_dir)
            )
            return
        _warn_empty_pools(self.specs, healthy)
        if self.settings.router_argv is not None:
            assert self.client is not None
            self.router = SupervisedRouter(
                self.settings.router_argv,
                self.settings.router_url,
                run_dir,
                self.client,
                policy=self.settings.policy,
                grace_period=self.settings.router_grace_period,
                on_fatal=self.fatal,
                log_max_bytes=self.settings.log_max_bytes,
                log_backups=self.settings.log_backups,
            )
            await self.router.start(self.settings.router_start_timeout)
            if not await self.router.wait_ready(10.0):
                log.warning("the router is up but does not report a healthy worker yet")
        if self.on_started is not None:
            self.on_started(self)

    def _add(self, spec: WorkerSpec, slot_index: int) -> SupervisedWorker:
        assert self.client is not None
        worker = SupervisedWorker(
            spec,
            slot_index,
            self.table,
            self.client,
            policy=self.settings.policy,
            health=self.settings.health,
            log_dir=self.settings.run_dir / "workers",
            log_max_bytes=self.settings.log_max_bytes,
            log_backups=self.settings.log_backups,
            stop_timeout=self.settings.worker_stop_timeout,
            listener=self._on_worker_change,
        )
        self.workers[spec.worker_id] = worker
        return worker

    def _on_worker_change(self, worker: SupervisedWorker, state: WorkerState, detail: str) -> None:
        if self.listener is not None:
            self.listener(worker, state, detail)

    # -- run-time membership (control socket) ----------------------------------------------
    async def handle_control(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "list":
            return {"ok": True, "workers": [w.describe() for w in self.workers.values()]}
        if self._stop.is_set():
            raise ControlError("sglctl up is shutting down")
        if op == "add":
            role = request.get("role")
            if role is not None and not isinstance(role, str):
                raise ControlError("role must be a string: prefill, decode or regular")
            worker = await self.add_worker(role)
            ok = await worker.settled
            if not ok:
                raise ControlError(
                    f"worker {worker.worker_id} at {worker.url} did not start "
                    f"({worker.state.label}); see {worker.log.path}"
                )
            return {"ok": True, **worker.describe()}
        if op == "remove":
            url = str(request.get("url", "")).rstrip("/")
            worker = await self.remove_worker(url)
            return {"ok": True, **worker.describe()}
        raise ControlError(f"unknown op {op!r}; expected add, remove or list")

    async def add_worker(self, role: str | None = None) -> SupervisedWorker:
        """Start one more worker on a free GPU group and port (returns before it is healthy).

        ``role``: the pool it joins in a PD layout (prefill, with a free bootstrap port, or
        decode); a regular layout takes only regular workers.
        """
        if self.factory is None:
            raise ControlError("this supervisor cannot add workers")
        async with self._lock:
            slot = self.table.free_slot()
            if slot is None:
                raise ControlError(
                    f"the state table is full ({self.table.n_slots} slots; see --max-workers)"
                )
            live = [
                w
                for w in self.workers.values()
                if w.state not in (WorkerState.REMOVED, WorkerState.FAILED)
            ]
            used_ports = {w.spec.port for w in live}
            used_gpus = {g for w in live for g in w.spec.gpu_ids}
            used_bootstrap = {w.spec.bootstrap_port for w in live if w.spec.bootstrap_port}
            try:
                spec = self.factory.make(
                    self._next_worker_id,
                    used_ports,
                    used_gpus,
                    self.base_port,
                    role=role,
                    used_bootstrap_ports=used_bootstrap,
                )
            except PlanError as exc:
                raise ControlError(str(exc)) from exc
            self._next_worker_id += 1
            # A removed worker's slot may be reused: forget the old object for that slot.
            for old in [w for w in self.workers.values() if w.slot_index == slot]:
                del self.workers[old.worker_id]
            worker = self._add(spec, slot)
            worker.start()
            log.info(
                "adding %s worker %d at %s (GPUs %s%s)",
                spec.role,
                spec.worker_id,
                spec.url,
                spec.gpus_label or "-",
                f", bootstrap port {spec.bootstrap_port}" if spec.bootstrap_port else "",
            )
            return worker

    async def remove_worker(self, url: str) -> SupervisedWorker:
        """Stop a managed worker for good; the router drops it at once (state REMOVED)."""
        async with self._lock:
            worker = next((w for w in self.workers.values() if w.url == url), None)
            if worker is None or worker.state == WorkerState.REMOVED:
                raise ControlError(f"{url} is not a worker of this sglctl up")
            log.info("removing worker %d at %s", worker.worker_id, url)
            await worker.remove()  # out of routing first, then the process is stopped
            return worker

    # -- shutdown --------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Router first (drain), then workers, then the table and the control socket."""
        if self.control is not None:
            await self.control.close()  # first: a pending add/remove must not hold us up
        for worker in self.workers.values():
            worker.begin_stop()
        if self.router is not None:
            log.info(
                "stopping the router (draining for up to %.0f s)", self.settings.router_grace_period
            )
            await self.router.stop()
        live = [w for w in self.workers.values() if w.child is not None]
        if live:
            log.info("stopping %d worker(s)", len(live))
        await asyncio.gather(
            *(
                w.stop(final_state=WorkerState.REMOVED, announce=False)
                for w in self.workers.values()
            ),
            return_exceptions=True,
        )
        if self.client is not None:
            await self.client.aclose()
        log.info("all processes stopped")

    def _kill_everything(self) -> None:
        if self.router is not None:
            self.router.kill_now()
        for worker in self.workers.values():
            worker.kill_now()
        self._stop.set()


def _warn_empty_pools(specs: list[WorkerSpec], healthy: list[SupervisedWorker]) -> None:
    """A PD layout serves nothing without both pools: say so at once rather than let every
    request's 503 be the first sign (the failed workers' logs are what to read)."""
    planned = {spec.role for spec in specs} - {"regular"}
    running = {worker.spec.role for worker in healthy}
    for role in sorted(planned - running):
        log.error(
            "no %s worker could be started: PD requests get 503 until one is "
            "(sglctl add-worker --local --role %s, after reading the failed workers' logs)",
            role,
            role,
        )
