"""Admission control: a cap on concurrent requests, with a bounded priority queue in front.

Why in the router: an SGLang worker accepts everything and queues it internally, where a burst
turns into minutes of latency for every client alike. Holding the excess here keeps workers at
a productive depth, lets urgent requests overtake bulk ones, and tells clients to come back
later (429 with ``Retry-After``) instead of letting them time out.

Rules:

- ``max_concurrent <= 0`` disables admission control (every request goes straight through).
- A request is admitted at once if a slot is free and nobody waits; otherwise it waits in a
  queue of at most ``queue_size`` requests for at most ``queue_timeout_secs``.
- **Higher priority numbers are served first** (as in SGLang's scheduler by default); within
  one priority, first come first served. Names map to numbers: ``high`` = 10, ``normal`` = 0,
  ``low`` = -10; any integer is accepted, so finer grades fit around the names.
- When the queue is full, a newcomer with a higher priority than the lowest-priority waiter
  takes its place (that waiter gets :class:`QueueFull`); otherwise the newcomer is refused.
- A slot freed by a finished request is handed directly to the best waiter, so a newcomer can
  never overtake the queue.
- A waiter whose client disconnects (task cancelled) leaves the queue at once; if it had just
  been handed a slot, the slot passes on.

Not thread-safe: one asyncio loop, as everywhere in the router.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PRIORITY_NAMES: dict[str, int] = {"high": 10, "normal": 0, "low": -10}
DEFAULT_PRIORITY = PRIORITY_NAMES["normal"]
#: Integers outside this range are refused: they are typos or attempts to overflow something.
PRIORITY_RANGE = (-(2**31), 2**31 - 1)


def parse_priority(value: object) -> int:
    """Turn a request's ``"priority"`` field into a number (higher is served first).

    Accepts ``None`` (field absent: normal), ``"high"``, ``"normal"``, ``"low"`` (any case)
    and integers within 32 bits. Anything else (floats, booleans, numeric strings, lists)
    raises ``ValueError`` with a message fit for a 400 answer.
    """
    if value is None:
        return DEFAULT_PRIORITY
    if isinstance(value, str):
        name = value.strip().lower()
        if name in PRIORITY_NAMES:
            return PRIORITY_NAMES[name]
        raise ValueError(
            f"priority must be 'high', 'normal', 'low' or an integer, not {value[:40]!r}"
        )
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"priority must be 'high', 'normal', 'low' or an integer, not a {type(value).__name__}"
        )
    low, high = PRIORITY_RANGE
    if not low <= value <= high:
        raise ValueError(f"priority must be between {low} and {high}")
    return value


class AdmissionRejected(Exception):
    """The request was not admitted; ``retry_after`` (whole seconds) goes in the header."""

    reason = "rejected"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(AdmissionRejected):
    """All slots are busy and ``queue_size`` requests of equal or higher priority wait."""

    reason = "queue_full"


class QueueTimeout(AdmissionRejected):
    """The request waited ``queue_timeout_secs`` without getting a slot."""

    reason = "queue_timeout"


@dataclass(order=True)
class _Waiter:
    key: tuple[int, int]  # (-priority, arrival sequence): the heap's smallest is served next
    future: asyncio.Future[None] = field(compare=False)


@dataclass
class AdmissionStats:
    """Counters for ``/metrics`` (totals since start) and gauges (current values)."""

    admitted_total: int = 0
    queued_total: int = 0
    rejected_full_total: int = 0
    rejected_timeout_total: int = 0
    cancelled_total: int = 0
    active: int = 0
    queued: int = 0


class AdmissionController:
    """Limits concurrent requests; use ``async with controller.admit(priority): ...``."""

    def __init__(
        self,
        max_concurrent: int,
        queue_size: int = 100,
        queue_timeout_secs: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_concurrent = max_concurrent
        self.queue_size = max(queue_size, 0)
        self.queue_timeout_secs = queue_timeout_secs
        self._clock = clock
        self._active = 0
        self._heap: list[_Waiter] = []
        self._seq = 0
        self._release_gap_ewma: float | None = None  # seconds between slot releases
        self._last_release: float | None = None
        self._stats = AdmissionStats()

    @property
    def enabled(self) -> bool:
        return self.max_concurrent > 0

    @property
    def active(self) -> int:
        """Requests holding a slot now."""
        return self._active

    @property
    def queued(self) -> int:
        """Requests waiting for a slot now."""
        return len(self._heap)

    def stats(self) -> AdmissionStats:
        stats = AdmissionStats(**vars(self._stats))
        stats.active, stats.queued = self._active, len(self._heap)
        return stats

    @asynccontextmanager
    async def admit(self, priority: int = DEFAULT_PRIORITY) -> AsyncIterator[None]:
        """Hold a slot for the body of the ``async with``; raises :class:`AdmissionRejected`."""
        if not self.enabled:
            yield
            return
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()

    def try_acquire(self) -> bool:
        """Take a slot now if one is free and nobody waits (what :meth:`acquire` does without
        waiting); False when the request would have to queue. Pair a True with
        :meth:`release`. For the callback-driven path, which has no task to wait in."""
        if not self.enabled:
            return True
        if self._active < self.max_concurrent and not self._heap:
            self._active += 1
            self._stats.admitted_total += 1
            return True
        return False

    async def acquire(self, priority: int = DEFAULT_PRIORITY) -> None:
        """Wait for a slot (see the module docstring); pair with :meth:`release`."""
        if not self.enabled:
            return
        if self._active < self.max_concurrent and not self._heap:
            self._active += 1
            self._stats.admitted_total += 1
            return
        if self.queue_size == 0 or self.queue_timeout_secs <= 0:
            self._stats.rejected_full_total += 1
            raise QueueFull(
                "too many concurrent requests and queueing is off", self.retry_after_hint()
            )
        waiter = _Waiter((-priority, self._seq), asyncio.get_running_loop().create_future())
        self._seq += 1
        if len(self._heap) >= self.queue_size:
            self._make_room_for(waiter)
        heapq.heappush(self._heap, waiter)
        self._stats.queued_total += 1
        try:
            done, _ = await asyncio.wait({waiter.future}, timeout=self.queue_timeout_secs)
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        if not done:
            self._remove(waiter)
            waiter.future.cancel()
            self._stats.rejected_timeout_total += 1
            raise QueueTimeout(
                f"request waited {self.queue_timeout_secs:g}s in the queue without a free slot",
                self.retry_after_hint(),
            )
        waiter.future.result()  # raises QueueFull if a higher priority took our place

    def release(self) -> None:
        """Give a slot back: to the best waiter if there is one, else to the pool."""
        if not self.enabled:
            return
        self._observe_release()
        while self._heap:
            waiter = heapq.heappop(self._heap)
            if not waiter.future.done():
                waiter.future.set_result(None)
                self._stats.admitted_total += 1
                return
        if self._active <= 0:
            log.error("admission slot released more often than acquired; ignoring")
            return
        self._active -= 1

    def retry_after_hint(self) -> int:
        """Seconds a refused client should wait: the time for the queue ahead to drain.

        Estimated from the recent rate at which slots are released (which already accounts
        for the number of slots); at least 1, at most the queue timeout (beyond that the
        answer would be 'never' anyway).
        """
        if self._release_gap_ewma is None or self.max_concurrent <= 0:
            return 1
        drain = self._release_gap_ewma * (len(self._heap) + 1)
        ceiling = max(1, math.ceil(self.queue_timeout_secs))
        return int(min(max(1, math.ceil(drain)), ceiling))

    # -- internals ------------------------------------------------------------------------
    def _make_room_for(self, newcomer: _Waiter) -> None:
        worst = max(self._heap)
        if worst.key <= newcomer.key:
            self._stats.rejected_full_total += 1
            raise QueueFull(
                f"queue full ({self.queue_size} waiting, {self._active} running)",
                self.retry_after_hint(),
            )
        self._remove(worst)
        self._stats.rejected_full_total += 1
        worst.future.set_exception(
            QueueFull("queue full: displaced by a higher-priority request", self.retry_after_hint())
        )

    def _abandon(self, waiter: _Waiter) -> None:
        """The waiting task was cancelled (client gone): leave the queue, pass on any slot."""
        self._stats.cancelled_total += 1
        future = waiter.future
        if not future.done():
            self._remove(waiter)
            future.cancel()
        elif not future.cancelled() and future.exception() is None:
            # We were handed a slot in the same tick we were cancelled: pass it on.
            self.release()

    def _remove(self, waiter: _Waiter) -> None:
        try:
            self._heap.remove(waiter)
        except ValueError:
            return
        heapq.heapify(self._heap)

    def _observe_release(self) -> None:
        now = self._clock()
        if self._last_release is not None:
            gap = now - self._last_release
            if self._release_gap_ewma is None:
                self._release_gap_ewma = gap
            else:
                self._release_gap_ewma += 0.1 * (gap - self._release_gap_ewma)
        self._last_release = now
