"""When to restart a crashed process, when to give up on it, and the one loop that does it.

Exponential backoff (1 s doubling to 60 s by default) keeps a crash-looping worker from
burning a GPU's worth of start-ups per minute; it starts over once the process has stayed
healthy for a while, so one crash a week always restarts within a second. K crashes inside a
sliding window declare the process failed: it stays down (the others keep serving) until a
human looks at its log.

:func:`keep_restarting` is the restart loop for every supervised child -- each worker and
the router -- so backoff, the crash window and "crash loop: give up" behave the same for
both. The child says how one run went (:meth:`Restartable.attempt`) and what giving up means
for it (a worker is marked failed; a router that keeps crashing ends the run).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff: float = 1.0
    max_backoff: float = 60.0
    #: Healthy this long before a crash: the next restart waits only ``initial_backoff``.
    reset_after: float = 60.0
    #: This many crashes within ``window`` seconds: give up.
    max_crashes: int = 5
    window: float = 300.0


class CrashHistory:
    """One process's crashes; :meth:`record_crash` says how long to wait, or None to give up."""

    def __init__(self, policy: RestartPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._crashes: deque[float] = deque()
        self._next_delay = policy.initial_backoff

    @property
    def recent_crashes(self) -> int:
        self._forget_old(self._clock())
        return len(self._crashes)

    def record_crash(self, healthy_for: float = 0.0) -> float | None:
        """Count a crash after ``healthy_for`` seconds of health; return the restart delay."""
        now = self._clock()
        if healthy_for >= self.policy.reset_after:
            self._next_delay = self.policy.initial_backoff
        self._crashes.append(now)
        self._forget_old(now)
        if len(self._crashes) >= self.policy.max_crashes:
            return None
        delay = self._next_delay
        self._next_delay = min(self.policy.max_backoff, max(delay, 1e-3) * 2)
        return delay

    def _forget_old(self, now: float) -> None:
        while self._crashes and self._crashes[0] < now - self.policy.window:
            self._crashes.popleft()


@dataclass(frozen=True)
class Attempt:
    """How one run of a child ended: why (for logs) and how long it had been up."""

    outcome: str
    up_for: float = 0.0
    #: The process that ran (0: it could not be started).
    pid: int = 0


class Restartable(Protocol):
    """A supervised child as the restart loop sees it."""

    async def attempt(self, first: bool) -> Attempt:
        """Start (or, when ``first`` and already started, adopt) the child and run it until it
        ends or must be replaced; the process is stopped when this returns."""
        ...

    def restarting(self, attempt: Attempt, delay: float, crashes: CrashHistory) -> None:
        """Publish and log that the child restarts in ``delay`` seconds."""
        ...

    def given_up(self, attempt: Attempt, crashes: CrashHistory) -> None:
        """Publish and log that the child crash-loops and stays down."""
        ...


async def keep_restarting(
    child: Restartable, crashes: CrashHistory, stopping: Callable[[], bool]
) -> None:
    """Run ``child`` again after every end, with backoff, until ``stopping()`` or a crash loop."""
    first = True
    while not stopping():
        attempt = await child.attempt(first)
        first = False
        if stopping():
            return
        delay = crashes.record_crash(attempt.up_for)
        if delay is None:
            child.given_up(attempt, crashes)
            return
        child.restarting(attempt, delay, crashes)
        await asyncio.sleep(delay)
