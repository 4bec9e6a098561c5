"""Interrupting requests stuck on a worker that was just taken out of rotation.

Taking a worker out of routing protects new requests only; the ones already waiting on it
would wait for ``--request-timeout-secs`` (30 minutes by default). The proxy registers each
attempt here (:meth:`InFlightWatcher.watch`), and whoever decides a worker is gone -- the
router's health checker, or the supervisor's mark in the shared-memory table -- calls
:meth:`InFlightWatcher.interrupt`: attempts whose answer has not reached the client fail
over to another worker like any connection error, streams already relaying end with an
error event instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


class Watch:
    """One attempt in flight at one worker, as seen by :class:`InFlightWatcher`.

    ``reading`` is True while the attempt's task awaits the worker (sending the request or
    reading the answer); only then is the task cancelled by :meth:`InFlightWatcher.interrupt`,
    so the cancellation always lands inside an upstream read, never in code that talks to the
    client. When the worker is ejected while the attempt does something else (a stream relay
    handing a chunk to the client), ``reason`` is set and the attempt checks it before its next
    read.
    """

    __slots__ = ("_cancelled", "reading", "reason", "streaming", "task", "url")

    def __init__(self, url: str, task: asyncio.Task[object] | None) -> None:
        self.url = url
        self.task = task
        self.reading = False
        #: Set once the answer is being relayed to the client: the relay then owns the watch.
        self.streaming = False
        self.reason: str | None = None
        self._cancelled = False

    def interrupted(self) -> bool:
        """Call on ``CancelledError``: True if the cancel was ours (and then absorb it).

        False means the cancellation came from elsewhere (client gone, shutdown) and must
        propagate. When both happened, the outside cancel wins.
        """
        if not self._cancelled:
            return False
        self._cancelled = False
        uncancel = getattr(self.task, "uncancel", None)  # Python >= 3.11
        return not (uncancel is not None and uncancel() > 0)


class InFlightWatcher:
    """Every attempt in flight, by worker URL, and the means to interrupt them.

    The callers' thresholds (``--health-failure-threshold`` consecutive failed probes, the
    supervisor's own probe failures) are what keeps this from firing on a worker that is
    merely slow.
    """

    def __init__(self) -> None:
        self._watches: dict[str, set[Watch]] = {}

    def watch(self, url: str, task: asyncio.Task[object] | None = None) -> Watch:
        """Register the current task's attempt at ``url`` (or ``task``'s: the callback path
        passes its attempt, which duck-types a task); pair with :meth:`unwatch`."""
        watch = Watch(url, task if task is not None else asyncio.current_task())
        watches = self._watches.get(url)
        if watches is None:  # not setdefault(url, set()): that builds a set on every call
            watches = self._watches[url] = set()
        watches.add(watch)
        return watch

    def unwatch(self, watch: Watch) -> None:
        watches = self._watches.get(watch.url)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[watch.url]

    def count(self, url: str) -> int:
        return len(self._watches.get(url, ()))

    def interrupt(self, url: str, reason: str) -> int:
        """Interrupt every attempt at ``url``; returns how many were interrupted."""
        interrupted = 0
        for watch in list(self._watches.get(url, ())):
            if watch.reason is not None:
                continue
            watch.reason = reason
            interrupted += 1
            if watch.reading and watch.task is not None and not watch.task.done():
                watch._cancelled = True
                watch.task.cancel()
        if interrupted:
            log.warning("interrupted %d requests in flight at %s: %s", interrupted, url, reason)
        return interrupted
