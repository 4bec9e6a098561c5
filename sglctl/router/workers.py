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

log = logging.getLogger(__name__)


class Breaker(Protocol):
    """What the registry and the proxy need from a circuit breaker (helper E's class)."""

    @property
    def state(self) -> str: ...

    def allow(self) -> bool: ...

    def record_success(self) -> None: ...

    def record_failure(self) -> None: ...


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
        "meta",
        "requests_total",
        "role",
        "source",
        "url",
    )

    def __init__(
        self,
        url: str,
        breaker: Breaker | None = None,
        role: str = "regular",
        bootstrap_port: int | None = None,
        source: str = "static",
        meta: dict[str, str] | None = None,
    ) -> None:
        self.url = url
        #: Who registered it ("static", "k8s", "supervisor", ...) and what that source knows
        #: about it (for k8s: the pod name and namespace).
        self.source = source
        self.meta: dict[str, str] = dict(meta or {})
        self.id = worker_id(url)
        #: "regular", "prefill" or "decode" (PD mode).
        self.role = role
        self.bootstrap_port = bootstrap_port
        #: Requests dispatched to this worker and not yet finished (last byte sent or cancelled).
        self.in_flight = 0
        self.requests_total = 0
        self.errors_total = 0
        #: Set by the health checker.
        self.health_ok = True
        #: Set by external sources (the supervisor's state table): False takes the worker out
        #: of rotation at once, without forgetting it.
        self.available = True
        self.breaker: Breaker = breaker if breaker is not None else AlwaysClosed()

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
        """Healthy, available and not shut off by its circuit breaker."""
        if not (self.health_ok and self.available):
            return False
        probe = getattr(self.breaker, "is_available", None)
        return bool(probe()) if probe is not None else self.breaker.state != "open"

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


def normalize_url(url: str) -> str:
    """Strip whitespace and trailing slashes; add ``http://`` when no scheme is given."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


class WorkerRegistry:
    """The set of workers, keyed by URL, with change listeners."""

    def __init__(self, breaker_factory: BreakerFactory | None = None) -> None:
        self._workers: dict[str, Worker] = {}
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
        """Register ``url``; raises :class:`DuplicateWorkerError` if it is already known."""
        url = normalize_url(url)
        if url in self._workers:
            raise DuplicateWorkerError(f"worker {url} is already registered")
        breaker = self._breaker_factory(url) if self._breaker_factory else None
        worker = Worker(
            url, breaker, role=role, bootstrap_port=bootstrap_port, source=source, meta=meta
        )
        self._workers[url] = worker
        log.info("worker added: %s (%s); %d workers", url, role, len(self._workers))
        self._notify("added", worker)
        return worker

    def remove(self, url: str) -> Worker:
        """Forget ``url``; raises :class:`UnknownWorkerError`. Requests in flight to it finish."""
        url = normalize_url(url)
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
        return self._workers.get(normalize_url(url))

    def find(self, url_or_id: str) -> Worker | None:
        """Look a worker up by URL or by its :func:`worker_id`."""
        worker = self._workers.get(normalize_url(url_or_id))
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
        return isinstance(url, str) and normalize_url(url) in self._workers

    # -- routing ---------------------------------------------------------------------------
    def routable(self, role: str | None = None) -> list[Worker]:
        """THE list every policy selects from: healthy, available, breaker not open."""
        return [
            w
            for w in self._workers.values()
            if (role is None or w.role == role) and w.is_routable()
        ]

    def set_available(self, url: str, available: bool) -> None:
        """Take a worker in or out of rotation; effective for the very next request."""
        worker = self._workers.get(normalize_url(url))
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
