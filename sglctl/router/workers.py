"""The worker registry: which workers exist, their load, and whether they may take requests.

Every part of the router meets here: worker sources (static ``--worker-urls``, the admin API,
the supervisor's shared-memory table) add and remove workers and flip ``available``; the
health checker flips ``health_ok``; the proxy counts ``in_flight`` and reports outcomes to
each worker's circuit breaker; policies pick from :meth:`WorkerRegistry.routable`, the one
place that decides whether a worker may take a request.

Everything runs on the router's single asyncio loop, so plain attributes are enough; no locks.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from typing import Protocol

from sglctl.router.urls import lookup_key, parse_worker_url

log = logging.getLogger(__name__)


class Breaker(Protocol):
    """Everything the registry, the proxy and the metrics call on a circuit breaker.

    :class:`~sglctl.router.circuit_breaker.CircuitBreaker` and :class:`AlwaysClosed` both
    implement all of it, so no caller needs ``getattr`` to find out.
    """

    @property
    def state(self) -> str: ...

    def is_available(self) -> bool:
        """Whether the worker may be offered to a policy (not open)."""
        ...

    def allow(self) -> bool:
        """Let one request through (in half-open, one probe at a time)."""
        ...

    def release(self) -> None:
        """A request ended with no verdict (client gone): free its half-open probe slot."""
        ...

    def record_success(self) -> None: ...

    def record_failure(self) -> None: ...

    def reset(self) -> None: ...


class AlwaysClosed:
    """A breaker that never opens: used with ``--disable-circuit-breaker``."""

    state = "closed"
    state_code = 0

    def is_available(self) -> bool:
        return True

    def allow(self) -> bool:
        return True

    def release(self) -> None:
        pass

    def record_success(self) -> None:
        pass

    def record_failure(self) -> None:
        pass

    def reset(self) -> None:
        pass


#: Where a worker can come from (``Worker.source``): the command line, the admin API, the
#: supervisor's shared-memory table, Kubernetes discovery.
ORIGINS = ("static", "admin", "supervisor", "k8s")


def worker_id(url: str) -> str:
    """A short stable id for a URL, usable in paths (``DELETE /workers/{id}``)."""
    return hashlib.sha1(url.encode()).hexdigest()[:12]


class Worker:
    """One upstream SGLang worker and its live counters."""

    __slots__ = (
        "available",
        "bootstrap_port",
        "breaker",
        "errors_total",
        "health_ok",
        "id",
        "in_flight",
        "last_byte",
        "meta",
        "requests_total",
        "role",
        "source",
        "suspect",
        "told_in_flight",
        "url",
    )

    def __init__(
        self,
        url: str,
        breaker: Breaker | None = None,
        role: str = "regular",
        bootstrap_port: int | None = None,
        *,
        source: str = "static",
        meta: dict[str, str] | None = None,
    ) -> None:
        self.url = url
        self.id = worker_id(url)
        #: "regular", "prefill" or "decode" (PD mode).
        self.role = role
        self.bootstrap_port = bootstrap_port
        #: Where the worker came from (one of :data:`ORIGINS`): decides who checks its health.
        self.source = source
        #: Labels from its source, e.g. ``{"pod": ..., "namespace": ...}`` for Kubernetes.
        self.meta: dict[str, str] = dict(meta or {})
        #: Requests dispatched to this worker and not yet finished (last byte sent or cancelled).
        self.in_flight = 0
        #: Requests the other router replicas have in flight here, as they last told
        #: (``--router-peers``, :mod:`~sglctl.router.peers`): part of the worker's load
        #: (:func:`~sglctl.router.load_poll.current_load`).
        self.told_in_flight = 0
        self.requests_total = 0
        self.errors_total = 0
        #: Set by the health checker.
        self.health_ok = True
        #: Set by external sources (the supervisor's state table): False takes the worker out
        #: of rotation at once, without forgetting it.
        self.available = True
        self.breaker: Breaker = breaker if breaker is not None else AlwaysClosed()
        #: time.monotonic() of the last byte received from it (set by the proxy), and True
        #: while the stall detector probes it: see :mod:`~sglctl.router.stall`.
        self.last_byte = 0.0
        self.suspect = False

    def take_load_slot(self) -> Callable[[int, bool], None]:
        """Count one request against this worker's load until the returned function is called.

        Load, what the policies balance on, runs from dispatch to the last byte, a failure or
        a cancel. Every exit path of a request calls the returned ``release(status, ok)``;
        only the first call frees the slot, so no path can free it twice or leave it held.
        """
        self.in_flight += 1
        self.requests_total += 1
        released = False

        def release(status: int = 0, ok: bool = False) -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1

        return release

    @property
    def breaker_state(self) -> str:
        return str(self.breaker.state)

    def is_routable(self) -> bool:
        """Healthy, available, not suspected of a stall, not shut off by its circuit breaker."""
        return (
            self.health_ok and not self.suspect and self.available and self.breaker.is_available()
        )

    def to_json(self) -> dict[str, object]:
        """The ``GET /workers`` item (0.3.2 field names plus sglctl's counters)."""
        return {
            "id": self.id,
            "url": self.url,
            "worker_type": self.role,
            "is_healthy": self.health_ok,
            "available": self.available,
            "load": self.in_flight,
            "requests_total": self.requests_total,
            "errors_total": self.errors_total,
            "circuit_breaker_state": self.breaker_state,
            "source": self.source,
            "meta": dict(self.meta),
            **({"bootstrap_port": self.bootstrap_port} if self.role == "prefill" else {}),
        }

    def __repr__(self) -> str:
        return f"Worker({self.url!r}, in_flight={self.in_flight}, routable={self.is_routable()})"


class DuplicateWorkerError(ValueError):
    """``add`` of a URL that is already registered."""


class UnknownWorkerError(KeyError):
    """``remove``/``get`` of a URL that is not registered."""


#: ``listener(event, worker)`` with event "added" or "removed".
Listener = Callable[[str, Worker], None]
BreakerFactory = Callable[[str], Breaker]
#: Builds a :class:`Worker` (``url, breaker, role=..., ...``); the several-process router's
#: :func:`~sglctl.router.shared_loads.worker_factory` counts load in shared memory.
WorkerFactory = Callable[..., Worker]


class WorkerRegistry:
    """The set of workers, keyed by URL, with change listeners."""

    def __init__(
        self,
        breaker_factory: BreakerFactory | None = None,
        worker_factory: WorkerFactory = Worker,
    ) -> None:
        self._workers: dict[str, Worker] = {}
        self._worker_factory = worker_factory
        self._listeners: list[Listener] = []
        self._breaker_factory = breaker_factory

    # -- membership ------------------------------------------------------------------------
    def add(
        self,
        url: str,
        *,
        role: str = "regular",
        bootstrap_port: int | None = None,
        source: str = "static",
        meta: dict[str, str] | None = None,
    ) -> Worker:
        """Register ``url`` (validated by :func:`~sglctl.router.urls.parse_worker_url`).

        Raises :class:`~sglctl.router.urls.InvalidWorkerURL` for a malformed URL and
        :class:`DuplicateWorkerError` if it is already known. ``source`` is one of
        :data:`ORIGINS`; ``meta`` holds the source's labels (shown by ``GET /workers``).
        """
        url = parse_worker_url(url)
        if url in self._workers:
            raise DuplicateWorkerError(f"worker {url} is already registered")
        breaker = self._breaker_factory(url) if self._breaker_factory else None
        worker = self._worker_factory(
            url, breaker, role=role, bootstrap_port=bootstrap_port, source=source, meta=meta
        )
        self._workers[url] = worker
        log.info(
            "worker added: %s (%s, from %s); %d workers", url, role, source, len(self._workers)
        )
        self._notify("added", worker)
        return worker

    def remove(self, url: str) -> Worker:
        """Forget ``url``; raises :class:`UnknownWorkerError`. Requests in flight to it finish."""
        url = lookup_key(url)
        worker = self._workers.pop(url, None)
        if worker is None:
            raise UnknownWorkerError(url)
        log.info(
            "worker removed: %s (%d in flight); %d workers",
            url,
            worker.in_flight,
            len(self._workers),
        )
        self._notify("removed", worker)
        return worker

    def get(self, url: str) -> Worker | None:
        return self._workers.get(lookup_key(url))

    def find(self, url_or_id: str) -> Worker | None:
        """Look a worker up by URL or by its :func:`worker_id`."""
        worker = self._workers.get(lookup_key(url_or_id))
        if worker is not None:
            return worker
        return next((w for w in self._workers.values() if w.id == url_or_id), None)

    def all(self) -> list[Worker]:
        return list(self._workers.values())

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self._workers.values()))

    def __contains__(self, url: object) -> bool:
        return isinstance(url, str) and lookup_key(url) in self._workers

    # -- routing ---------------------------------------------------------------------------
    def routable(self, role: str | None = None) -> list[Worker]:
        """THE list every policy selects from: healthy, available, breaker not open."""
        # is_routable() spelled out: this runs for every worker on every request.
        return [
            w
            for w in self._workers.values()
            if w.health_ok
            and not w.suspect
            and w.available
            and (role is None or w.role == role)
            and w.breaker.is_available()
        ]

    def set_available(self, url: str, available: bool) -> None:
        """Take a worker in or out of rotation; effective for the very next request."""
        worker = self._workers.get(lookup_key(url))
        if worker is None:
            raise UnknownWorkerError(url)
        if worker.available != available:
            log.info("worker %s is now %s", worker.url, "available" if available else "unavailable")
        worker.available = available

    # -- listeners -------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event, worker)`` after every add ("added") and remove ("removed")."""
        self._listeners.append(listener)

    def _notify(self, event: str, worker: Worker) -> None:
        for listener in self._listeners:
            try:
                listener(event, worker)
            except Exception:
                log.exception("worker registry listener failed on %s %s", event, worker.url)
