"""Passive stall detection: notice a worker that stopped answering mid-request in ~2-3 s.

The problem (issue 9, item 3). A hung worker (SIGSTOP, a wedged GPU, a deadlocked process)
still accepts TCP connections -- the kernel queues them -- so requests sent to it simply
never get an answer. Cache-aware routing keeps sending it requests until its load exceeds the
others' by ``--balance-abs-threshold``, and the health checker, with its defaults (a probe
every 10 s, 5 s timeout, 3 failures), takes 20-30 s to eject it: meanwhile all traffic can
stall behind it. Probing every worker every second would fix that at a steady cost; this
module looks at what the router already sees instead.

The signal. The proxy stamps ``worker.last_byte = time.monotonic()`` whenever something
arrives from a worker (a response head, a streamed chunk, a body): one attribute store on
the byte path, no per-request work here. Every ``tick`` the detector walks the registry; a
worker is *suspect* when

* it has requests in flight (``worker.in_flight > 0``),
* it has produced nothing for ``suspect_secs`` (counted from the later of its last byte and
  the moment the detector first saw it busy: an idle worker's old stamp is no evidence), and
* some other worker produced bytes within the last ``suspect_secs`` -- the fleet is alive,
  so this worker's silence is not just everyone being in a long prefill.

What happens to a suspect. It is probed at once on the health endpoint, independent of the
health checker's interval, with a short timeout: ``probe_timeout_secs``, or twice the slowest
of its recent good probes if that is longer (SGLang's ``/health`` takes about 1 s even when
all is well; 3 s before any good probe). It gets no *new* requests while the probe is
pending (``worker.suspect`` makes it not routable -- unless that would leave no routable
worker at all). No answer: the health checker ejects it
(:meth:`~sglctl.router.health.HealthChecker.eject`), exactly as after failed regular probes:
out of routing, its requests in flight interrupted and retried elsewhere when nothing reached
the client yet (:mod:`~sglctl.router.inflight`), and back once the regular rounds see it
healthy. An answer: the worker is merely busy (a long prefill, a long non-streamed
generation); it stays, and is not suspected again before another ``suspect_secs`` of
silence, so a busy worker costs one probe per ``suspect_secs`` at most.

Not judged here: workers whose ``source`` is in ``skip_sources`` (the supervisor owns the
health of its workers), and nothing at all when the health checker is disabled (no one would
bring an ejected worker back) or in PD mode (the PD path does not stamp bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection

from sglctl.router.config import RouterConfig
from sglctl.router.health import HealthChecker
from sglctl.router.workers import Worker, WorkerRegistry

log = logging.getLogger(__name__)

#: Longest wait between two scans; the scan itself is a walk over the registry.
MAX_TICK_SECS = 0.25
#: The probe waits at least this many times the worker's slowest recent good probe: SGLang's
#: ``/health`` runs a one-token generation and answers after about 1 s even when all is well,
#: so a fixed 1 s timeout would eject every busy SGLang worker it suspects.
LATENCY_FACTOR = 2.0
#: ... and at least this long for a worker with no good probe on record yet.
UNKNOWN_LATENCY_TIMEOUT_SECS = 3.0


def stall_disabled_because(config: RouterConfig) -> str | None:
    """Why a router with ``config`` cannot use stall detection, or None when it can."""
    if config.stall_suspect_secs <= 0:
        return "--stall-suspect-secs 0"
    if config.disable_health_check:
        return "--disable-health-check (nothing would bring an ejected worker back)"
    if config.is_pd:
        return "PD mode (its proxy does not record when workers last sent bytes)"
    return None


class StallDetector:
    """Watches ``worker.last_byte`` and probes workers that went quiet mid-request."""

    def __init__(
        self,
        registry: WorkerRegistry,
        health: HealthChecker,
        suspect_secs: float = 1.5,
        probe_timeout_secs: float = 1.0,
        *,
        skip_sources: Collection[str] = (),
        disabled_because: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``suspect_secs <= 0`` or a ``disabled_because`` (said in the log) disables
        detection; ``clock`` must be the one the proxy stamps ``last_byte`` with."""
        self.registry = registry
        self.disabled_because = disabled_because
        if suspect_secs <= 0 and disabled_because is None:
            self.disabled_because = "--stall-suspect-secs 0"
        self.health = health
        self.suspect_secs = suspect_secs
        self.probe_timeout_secs = probe_timeout_secs if probe_timeout_secs > 0 else 1.0
        self.skip_sources = frozenset(skip_sources)
        self.clock = clock
        self.tick_secs = min(MAX_TICK_SECS, max(suspect_secs / 4, 0.01))
        #: Per worker URL: when its current silence began, as far as the detector knows
        #: (first seen busy, or its last probe answered).
        self._quiet_from: dict[str, float] = {}
        #: Suspects found by :meth:`scan` whose :meth:`check` has not finished.
        self._pending: set[str] = set()
        self._probes: dict[str, asyncio.Task[None]] = {}
        # Counters, for tests and for anyone wondering what the detector did.
        self.suspected = 0
        self.ejected = 0
        self.cleared = 0

    @property
    def enabled(self) -> bool:
        return self.disabled_because is None

    def scan(self, now: float) -> list[Worker]:
        """One pass: the workers that just became suspect (marked ``suspect``, not yet probed).

        Pure bookkeeping, no I/O: :meth:`run` probes what this returns. Public so that tests
        can drive it with a fake clock.
        """
        workers = self.registry.all()
        window_start = now - self.suspect_secs
        fleet_alive = any(w.last_byte > window_start for w in workers)
        found: list[Worker] = []
        for worker in workers:
            url = worker.url
            if worker.source in self.skip_sources or not worker.health_ok or worker.in_flight <= 0:
                self._quiet_from.pop(url, None)
                continue
            quiet_from = self._quiet_from.setdefault(url, now)
            if url in self._pending or not fleet_alive:
                continue
            if max(worker.last_byte, quiet_from) > window_start:
                continue
            self.suspected += 1
            self._pending.add(url)
            # No new requests while the probe runs, unless it was the last one routable:
            # better a request waits on a maybe-hung worker than every request gets a 503.
            worker.suspect = any(w.is_routable() for w in workers if w is not worker)
            found.append(worker)
        for url in [u for u in self._quiet_from if u not in self.registry]:
            del self._quiet_from[url]
        return found

    async def check(self, worker: Worker) -> bool:
        """Probe one suspect; eject it if it does not answer. True when ejected."""
        silent = self.clock() - max(worker.last_byte, self._quiet_from.get(worker.url, 0.0))
        in_flight = worker.in_flight
        log.debug(
            "worker %s suspect: %d requests in flight, nothing received for %.1fs while other "
            "workers answer; probing %s",
            worker.url,
            in_flight,
            silent,
            self.health.endpoint,
        )
        try:
            timeout = self.probe_timeout(worker.url)
            ok, detail, latency = await self.health.probe(worker.url, timeout)
        finally:
            worker.suspect = False
            self._pending.discard(worker.url)
        if self.registry.get(worker.url) is not worker:
            return False  # removed while we probed
        if ok:
            self.cleared += 1
            self.health.record_good_latency(worker.url, latency)
            self._quiet_from[worker.url] = self.clock()
            log.debug("worker %s answered its stall probe: busy, not hung", worker.url)
            return False
        reason = (
            f"stalled: {in_flight} requests in flight and nothing received for {silent:.1f}s "
            f"while other workers answered, then its {self.health.endpoint} probe failed "
            f"({detail})"
        )
        if self.health.eject(worker, reason):
            self.ejected += 1
            self._quiet_from.pop(worker.url, None)
            return True
        return False

    def probe_timeout(self, url: str) -> float:
        """``probe_timeout_secs``, or longer for a worker whose health endpoint is slow."""
        slowest = self.health.status(url).slowest_good_secs()
        floor = UNKNOWN_LATENCY_TIMEOUT_SECS if slowest is None else LATENCY_FACTOR * slowest
        return max(self.probe_timeout_secs, floor)

    async def run(self) -> None:
        """Scan every ``tick_secs`` until cancelled; returns at once when disabled."""
        if not self.enabled:
            log.info("stall detection of hung workers disabled: %s", self.disabled_because)
            return
        log.info(
            "stall detection: a worker silent for %gs with requests in flight while others "
            "answer is probed (timeout %gs) and ejected if it does not answer",
            self.suspect_secs,
            self.probe_timeout_secs,
        )
        try:
            while True:
                await asyncio.sleep(self.tick_secs)
                try:
                    for worker in self.scan(self.clock()):
                        self._start_probe(worker)
                except Exception:
                    log.exception("stall scan failed; continuing")
        finally:
            for task in list(self._probes.values()):
                task.cancel()
            for task in list(self._probes.values()):
                with contextlib.suppress(BaseException):
                    await task
            self._probes.clear()

    def _start_probe(self, worker: Worker) -> None:
        url = worker.url

        async def probe() -> None:
            try:
                await self.check(worker)
            except Exception:
                worker.suspect = False
                self._pending.discard(url)
                log.exception("stall probe of %s failed", url)
            finally:
                self._probes.pop(url, None)

        self._probes[url] = asyncio.create_task(probe(), name=f"stall probe {url}")
