"""Worker sources: where the registry's membership comes from.

A source is anything with ``async def run(registry) -> None``: the app's lifespan starts each
one as a background task and cancels it at shutdown. Static ``--worker-urls`` (and the PD
``--prefill``/``--decode`` lists) is the simplest: add once and return. The supervisor's
shared-memory table (``--state-table``, :mod:`sglctl.router.state_table_source`) keeps
running and follows the table; a Kubernetes watcher would be one more source, and nothing
else in the router would change.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from sglctl.router.config import PrefillServer
from sglctl.router.workers import DuplicateWorkerError, WorkerRegistry

log = logging.getLogger(__name__)


class WorkerSource(Protocol):
    """Something that feeds the registry: a background task adding, removing and (un)marking
    workers, each registered with its origin (``Worker.source``: "static", "admin",
    "supervisor", "k8s") and the labels it knows (``meta``)."""

    async def run(self, registry: WorkerRegistry) -> None: ...


class StaticSource:
    """The workers named on the command line, registered once at start-up.

    They are assumed healthy until the health checker or their circuit breaker says
    otherwise, as the SGLang Router does once its start-up wait is over: a worker that is
    down costs a retry on another worker, not a failed request.
    """

    def __init__(
        self,
        urls: Sequence[str] = (),
        prefill: Sequence[PrefillServer] = (),
        decode: Sequence[str] = (),
    ) -> None:
        self.urls = list(urls)
        self.prefill = list(prefill)
        self.decode = list(decode)

    async def run(self, registry: WorkerRegistry) -> None:
        entries: list[tuple[str, str, int | None]] = [(u, "regular", None) for u in self.urls]
        entries += [(p.url, "prefill", p.bootstrap_port) for p in self.prefill]
        entries += [(u, "decode", None) for u in self.decode]
        for url, role, port in entries:
            try:
                registry.add(url, role=role, bootstrap_port=port, source="static")
            except DuplicateWorkerError:
                log.warning("worker %s given twice on the command line; using it once", url)
