"""Worker membership from the supervisor's shared-memory table (``--state-table NAME``).

``sglctl up`` writes each worker's lifecycle into a slot of the table and bumps a generation
counter; this source polls that counter every 10 ms (one 8-byte read) and, when it moved,
applies what changed to the registry. That keeps the router within ~10 ms of the supervisor:
a killed worker leaves routing well inside the 100 ms budget, with no HTTP round trip.

Mapping of supervisor states to the registry:

* HEALTHY -- registered and available, in the slot's role (``regular``; ``prefill`` with its
  bootstrap port, or ``decode``, in a PD layout). A worker coming back from a restart is
  registered afresh: a new process has an empty KV cache, a clean health record and a closed
  breaker, so the old prefix-tree entries and failure counts would only mislead routing.
* UNHEALTHY (alive but failing the supervisor's probes) -- kept, but unavailable: it may
  recover with its cache intact.
* STARTING, RESTARTING, FAILED, REMOVED, EMPTY -- not registered (removed if it was).
  Requests in flight to a removed worker finish or fail over through the retry logic.

One source of health per worker: the supervisor's. These workers are registered with
``source="supervisor"`` and the router's own ``HealthChecker`` skips them
(``sglctl.router.router.EXTERNALLY_CHECKED``); it keeps probing static and admin-added
workers. Why: the supervisor already probes every worker it starts, because it owns their
restarts, and the table tells the router of each verdict within ~10 ms; a second checker in
the router doubled the probe traffic and could disagree with the supervisor (eject a worker
the supervisor still counts healthy, or keep one it is restarting). A supervisor mark of
UNHEALTHY, or of a state that takes the worker out (restarting, failed, removed), interrupts
the worker's requests in flight exactly as a health ejection does (``on_sick`` ->
``Router.interrupt``): attempts with nothing sent to the client yet are retried on another
worker, streams end with an error event.

Changes are edge-triggered per slot: the source acts when a slot's (url, state, pid) changes,
not on every poll, so a worker an operator removed through the admin API stays removed until
its slot changes again.

The router's columns go the other way: every 250 ms the source writes each worker's
in-flight, served and error counters into its slot (served/errors carry over restarts), and
once a second the router totals (pid, heartbeat, requests, errors, p50/p99 latency) into the
header, for ``sglctl status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sglctl.router.urls import InvalidWorkerURL
from sglctl.router.workers import DuplicateWorkerError, UnknownWorkerError, WorkerRegistry
from sglctl.state_table import (
    RouterColumns,
    RouterTotals,
    StateTable,
    StateTableError,
    WorkerSlot,
    WorkerState,
)

log = logging.getLogger(__name__)


class StatsSource(Protocol):
    """What the source reads for the header totals (the router's ``RollingStats``)."""

    requests_total: int
    errors_total: int

    def snapshot(self) -> dict[str, float | int]: ...


@dataclass
class _Known:
    url: str
    state: WorkerState
    pid: int
    #: Counters of earlier incarnations of this worker (before restarts), carried over.
    served_base: int = 0
    errors_base: int = 0


class StateTableSource:
    """Follows table ``name``; started by the router's lifespan, cancelled at shutdown."""

    def __init__(
        self,
        name: str,
        *,
        stats: StatsSource | None = None,
        poll_interval: float = 0.01,
        columns_interval: float = 0.25,
        totals_interval: float = 1.0,
        attach_timeout: float = 10.0,
        on_sick: Callable[[str, str], object] | None = None,
    ) -> None:
        """``on_sick(url, reason)``: the supervisor marked a worker unhealthy or gone; the
        router interrupts its requests in flight (``Router.interrupt``)."""
        self.name = name
        self.on_sick = on_sick
        self.stats = stats
        self.poll_interval = poll_interval
        self.columns_interval = columns_interval
        self.totals_interval = totals_interval
        self.attach_timeout = attach_timeout
        self._known: dict[int, _Known] = {}
        self._table: StateTable | None = None

    async def run(self, registry: WorkerRegistry) -> None:
        table = await self._attach()
        if table is None:
            return
        self._table = table
        info = table.info()
        log.info(
            "following state table %s (supervisor pid %d, %d slots, backend %s)",
            self.name,
            info.owner_pid,
            info.n_slots,
            info.backend or "?",
        )
        last_generation = -1
        next_columns = next_totals = 0.0
        try:
            while True:
                generation = table.generation()
                if generation != last_generation:
                    last_generation = generation
                    self.sync(registry)
                now = time.monotonic()
                if now >= next_columns:
                    next_columns = now + self.columns_interval
                    self.write_columns(registry)
                if now >= next_totals:
                    next_totals = now + self.totals_interval
                    self.write_totals(registry)
                await asyncio.sleep(self.poll_interval)
        finally:
            with contextlib.suppress(Exception):
                self.write_columns(registry)
            self._table = None
            table.close()

    async def _attach(self) -> StateTable | None:
        """The supervisor creates the table before starting us; wait briefly anyway."""
        deadline = time.monotonic() + self.attach_timeout
        while True:
            try:
                return StateTable.attach(self.name)
            except StateTableError as exc:
                if time.monotonic() >= deadline:
                    log.error(
                        "cannot follow state table %s: %s; no workers will be added from it",
                        self.name,
                        exc,
                    )
                    return None
            await asyncio.sleep(0.1)

    # -- table -> registry -----------------------------------------------------------------
    def sync(self, registry: WorkerRegistry) -> None:
        """Apply every slot whose (url, state, pid) changed since the last call."""
        assert self._table is not None
        for index in range(self._table.n_slots):
            slot = self._table.read_worker(index)
            known = self._known.get(index)
            if known is None and slot.state == WorkerState.EMPTY:
                continue
            if known is not None and (known.url, known.state, known.pid) == (
                slot.url,
                slot.state,
                slot.pid,
            ):
                continue
            self._apply(registry, index, slot, known)

    def _apply(
        self, registry: WorkerRegistry, index: int, slot: WorkerSlot, known: _Known | None
    ) -> None:
        if known is not None and known.url != slot.url:
            # The slot was reused for another worker: forget the old one entirely.
            self._drop(registry, known)
            known = None
        if known is None:
            known = _Known(slot.url, slot.state, slot.pid)
            self._known[index] = known
        restarted = known.pid != slot.pid
        known.state, known.pid = slot.state, slot.pid
        if not slot.url:
            return
        if slot.state == WorkerState.HEALTHY:
            if restarted and slot.url in registry:
                self._drop(registry, known)  # a new process: fresh tree, health and breaker
            if slot.url not in registry:
                try:
                    registry.add(
                        slot.url,
                        role=slot.role,
                        bootstrap_port=slot.bootstrap_port or None,
                        source="supervisor",
                        meta={"slot": str(index)},
                    )
                except DuplicateWorkerError:
                    pass
                except InvalidWorkerURL as exc:  # a supervisor bug; never kill the source
                    log.error("state table slot %d: %s; worker ignored", index, exc)
                    return
                log.info("state table: worker %s (pid %d) is in rotation", slot.url, slot.pid)
            with contextlib.suppress(UnknownWorkerError):
                registry.set_available(slot.url, True)
        elif slot.state == WorkerState.UNHEALTHY:
            with contextlib.suppress(UnknownWorkerError):
                registry.set_available(slot.url, False)
                self._sick(slot.url, f"the supervisor marked worker {slot.url} unhealthy")
        elif slot.url in registry:
            log.info("state table: worker %s is %s; out of rotation", slot.url, slot.state.label)
            self._drop(registry, known)
            self._sick(slot.url, f"the supervisor marked worker {slot.url} {slot.state.label}")
        if slot.state == WorkerState.EMPTY:
            self._known.pop(index, None)

    def _sick(self, url: str, reason: str) -> None:
        if self.on_sick is not None:
            try:
                self.on_sick(url, reason)
            except Exception:
                log.exception("interrupting requests at %s failed", url)

    def _drop(self, registry: WorkerRegistry, known: _Known) -> None:
        """Remove the worker, keeping its counters for the next incarnation."""
        worker = registry.get(known.url)
        if worker is None:
            return
        known.served_base += worker.requests_total
        known.errors_base += worker.errors_total
        with contextlib.suppress(UnknownWorkerError):
            registry.remove(known.url)

    # -- registry -> table -----------------------------------------------------------------
    def write_columns(self, registry: WorkerRegistry) -> None:
        """Each known worker's in-flight, served and error counters into its slot."""
        if self._table is None:
            return
        now = time.time()
        for index, known in self._known.items():
            worker = registry.get(known.url) if known.url else None
            in_flight = worker.in_flight if worker is not None else 0
            served = known.served_base + (worker.requests_total if worker is not None else 0)
            errors = known.errors_base + (worker.errors_total if worker is not None else 0)
            self._table.write_router_columns(index, RouterColumns(in_flight, served, errors, now))

    def write_totals(self, registry: WorkerRegistry) -> None:
        """The router's pid, heartbeat and overall counters into the header."""
        if self._table is None:
            return
        totals = RouterTotals(
            pid=os.getpid(),
            heartbeat=time.time(),
            in_flight=sum(w.in_flight for w in registry.all()),
        )
        if self.stats is not None:
            snap = self.stats.snapshot()
            totals.requests = int(snap.get("requests_total", 0))
            totals.errors = int(snap.get("errors_total", 0))
            totals.p50_ms = float(snap.get("latency_p50_ms", 0.0))
            totals.p99_ms = float(snap.get("latency_p99_ms", 0.0))
        self._table.write_router_totals(totals)
