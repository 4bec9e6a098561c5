"""Active health checks: probe every worker on a timer and take the sick ones out of routing.

Request outcomes (retries, circuit breaker) only say something about workers that receive
traffic; a worker that died while idle would otherwise get the next request and cost it a
retry. The checker probes ``GET <worker><endpoint>`` for every worker each ``interval_secs``,
all concurrently, each bounded by ``timeout_secs`` (a stalled worker that accepts the
connection and never answers counts as a failure, not a hang).

Hysteresis, as in Envoy's and the SGLang Router's checkers: a healthy worker is marked
unhealthy after ``failure_threshold`` consecutive failed probes, and an unhealthy one healthy
again after ``success_threshold`` consecutive good ones, so a single lost packet does not
flap a worker in and out of rotation. Transitions are logged (warning when a worker leaves,
info when it returns); individual probes only at debug.

The checker owns no workers: it reads ``registry.all()`` each round and flips
``worker.health_ok`` -- except for workers whose ``source`` is in ``skip_sources``: under
``sglctl up`` the supervisor checks its own workers, and one source of health per worker
keeps the two from disagreeing or doubling the probe traffic. Workers added later are
probed from the next round; state kept for removed workers is dropped.

Evidence from elsewhere goes through :meth:`HealthChecker.eject`: the stall detector
(:mod:`~sglctl.router.stall`) probes a worker that went quiet mid-request with a short
timeout of its own (:meth:`HealthChecker.probe` takes one), and a worker that does not
answer is ejected as if it had failed ``failure_threshold`` rounds -- same callback, same
way back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import httpx

log = logging.getLogger(__name__)


class CheckedWorker(Protocol):
    """What the checker needs from a worker (helper B's ``Worker`` satisfies it)."""

    url: str
    health_ok: bool
    #: Where the worker came from; workers of a source in ``skip_sources`` are not probed.
    source: str


class CheckedRegistry(Protocol):
    """What the checker needs from the registry."""

    def all(self) -> Iterable[CheckedWorker]: ...


@dataclass
class HealthStatus:
    """What the checker knows about one worker, for ``/workers`` and ``sglctl status``."""

    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_check: float | None = None  # wall-clock time (time.time) of the last probe
    last_error: str | None = None
    last_latency_secs: float | None = None
    total_checks: int = 0
    total_failures: int = 0
    #: Latencies of the last few good probes (regular or stall probes): how slow this
    #: worker's health endpoint is when it is fine (SGLang's takes about 1 s).
    good_latencies: deque[float] = field(default_factory=lambda: deque(maxlen=8))

    def slowest_good_secs(self) -> float | None:
        """The slowest of the recent good probes, None before the first one."""
        return max(self.good_latencies) if self.good_latencies else None


ChangeCallback = Callable[[CheckedWorker, bool], None]


class HealthChecker:
    """Background prober of every worker in a registry."""

    def __init__(
        self,
        interval_secs: float = 10.0,
        timeout_secs: float = 5.0,
        failure_threshold: int = 3,
        success_threshold: int = 2,
        endpoint: str = "/health",
        client: httpx.AsyncClient | None = None,
        *,
        enabled: bool = True,
        on_change: ChangeCallback | None = None,
        skip_sources: Collection[str] = (),
    ) -> None:
        """``skip_sources``: worker origins whose health someone else owns (under ``sglctl
        up``, "supervisor": the supervisor probes and restarts those workers itself, see
        :mod:`~sglctl.router.state_table_source`)."""
        if interval_secs <= 0 or timeout_secs <= 0:
            raise ValueError("health check interval and timeout must be > 0")
        self.interval_secs = interval_secs
        self.timeout_secs = timeout_secs
        self.failure_threshold = max(failure_threshold, 1)
        self.success_threshold = max(success_threshold, 1)
        self.endpoint = endpoint if endpoint.startswith("/") else "/" + endpoint
        self.enabled = enabled
        self.on_change = on_change
        self.skip_sources = frozenset(skip_sources)
        self._client = client
        self._own_client = client is None
        self._status: dict[str, HealthStatus] = {}
        self.rounds = 0

    def status(self, url: str) -> HealthStatus:
        """The checker's view of ``url`` (an empty status before its first probe)."""
        return self._status.get(url) or HealthStatus()

    async def run(self, registry: CheckedRegistry) -> None:
        """Probe every worker forever (until cancelled); a no-op loop when disabled.

        A failing round (a bug, not a failing worker) is logged and the loop goes on:
        health checking must never die silently.
        """
        if not self.enabled:
            log.info("health checks disabled")
            return
        log.info(
            "health checks every %gs on %s (timeout %gs; unhealthy after %d failures, "
            "healthy after %d successes)",
            self.interval_secs,
            self.endpoint,
            self.timeout_secs,
            self.failure_threshold,
            self.success_threshold,
        )
        try:
            while True:
                started = time.monotonic()
                try:
                    await self.check_all(registry)
                except Exception:
                    log.exception("health check round failed; continuing")
                elapsed = time.monotonic() - started
                await asyncio.sleep(max(self.interval_secs - elapsed, 0.0))
        finally:
            await self.aclose()

    async def check_all(self, registry: CheckedRegistry) -> None:
        """One round: probe every worker concurrently and apply the thresholds."""
        workers = [w for w in registry.all() if w.source not in self.skip_sources]
        live = {w.url for w in workers}
        for url in list(self._status):
            if url not in live:
                del self._status[url]
        if not workers:
            return
        results = await asyncio.gather(*(self.probe(w.url) for w in workers))
        for worker, (ok, detail, latency) in zip(workers, results, strict=True):
            self.observe(worker, ok, detail, latency)
        self.rounds += 1

    async def probe(
        self, url: str, timeout_secs: float | None = None
    ) -> tuple[bool, str | None, float]:
        """One probe: ``(ok, error detail or None, seconds taken)``; never raises.

        ``timeout_secs`` overrides the checker's timeout (the stall detector's probe is
        shorter: it asks "are you there at all?", see :mod:`~sglctl.router.stall`).
        """
        timeout = self.timeout_secs if timeout_secs is None else timeout_secs
        client = self._get_client()
        started = time.monotonic()
        try:
            # wait_for guards the whole exchange: httpx's timeouts are per phase, and a worker
            # trickling bytes could otherwise hold a probe for far longer than the timeout.
            response = await asyncio.wait_for(
                client.get(url.rstrip("/") + self.endpoint, timeout=timeout), timeout=timeout
            )
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return False, f"no answer within {timeout:g}s", time.monotonic() - started
        except httpx.HTTPError as exc:
            return False, _describe(exc), time.monotonic() - started
        except OSError as exc:
            return False, _describe(exc), time.monotonic() - started
        latency = time.monotonic() - started
        if 200 <= response.status_code < 300:
            return True, None, latency
        return False, f"HTTP {response.status_code}", latency

    def observe(
        self,
        worker: CheckedWorker,
        ok: bool,
        detail: str | None = None,
        latency: float | None = None,
    ) -> bool:
        """Record one probe result; flip ``worker.health_ok`` past a threshold.

        Returns True when the worker changed state. Public so that tests (and a router that
        learns of a worker's state another way) can feed results without a network.
        """
        status = self._status.setdefault(worker.url, HealthStatus())
        status.total_checks += 1
        status.last_check = time.time()
        status.last_latency_secs = latency
        if ok:
            status.consecutive_successes += 1
            status.consecutive_failures = 0
            status.last_error = None
            if latency is not None:
                status.good_latencies.append(latency)
        else:
            status.consecutive_failures += 1
            status.consecutive_successes = 0
            status.total_failures += 1
            status.last_error = detail or "probe failed"
        log.debug("health probe %s: %s", worker.url, "ok" if ok else status.last_error)

        if worker.health_ok and status.consecutive_failures >= self.failure_threshold:
            worker.health_ok = False
            log.warning(
                "worker %s unhealthy after %d failed health checks (%s); removed from routing",
                worker.url,
                status.consecutive_failures,
                status.last_error,
            )
        elif not worker.health_ok and status.consecutive_successes >= self.success_threshold:
            worker.health_ok = True
            log.info(
                "worker %s healthy again after %d good health checks; back in routing",
                worker.url,
                status.consecutive_successes,
            )
        else:
            return False
        self._notify(worker)
        return True

    def record_good_latency(self, url: str, secs: float) -> None:
        """Remember a good probe made by someone else (the stall detector's)."""
        self._status.setdefault(url, HealthStatus()).good_latencies.append(secs)

    def eject(self, worker: CheckedWorker, reason: str) -> bool:
        """Take ``worker`` out now, as if it had failed ``failure_threshold`` probes in a row.

        For evidence gathered elsewhere (the stall detector's failed probe of a worker that
        stopped answering mid-request): the worker gets the same treatment as one this
        checker ejected -- ``on_change`` (the router interrupts its requests in flight), and
        it returns only after ``success_threshold`` good probes of the regular rounds.
        Returns False when the worker was already out.
        """
        if not worker.health_ok:
            return False
        status = self._status.setdefault(worker.url, HealthStatus())
        status.total_checks += 1
        status.total_failures += 1
        status.consecutive_failures = max(status.consecutive_failures + 1, self.failure_threshold)
        status.consecutive_successes = 0
        status.last_check = time.time()
        status.last_error = reason
        worker.health_ok = False
        log.warning(
            "worker %s unhealthy: %s; out of routing until %d good health checks (every %gs)",
            worker.url,
            reason,
            self.success_threshold,
            self.interval_secs,
        )
        self._notify(worker)
        return True

    def _notify(self, worker: CheckedWorker) -> None:
        if self.on_change is not None:
            try:
                self.on_change(worker, worker.health_ok)
            except Exception:
                log.exception("health change callback failed for %s", worker.url)

    async def aclose(self) -> None:
        """Close the HTTP client if the checker created it."""
        if self._own_client and self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            # Probes must not queue behind inference traffic: a pool of their own, no keep-alive
            # surprises from a worker that restarted on the same port.
            self._client = httpx.AsyncClient(
                timeout=self.timeout_secs,
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=0),
                trust_env=False,
            )
        return self._client


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
