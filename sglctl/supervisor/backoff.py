"""When to restart a crashed process, and when to give up on it.

Exponential backoff (1 s doubling to 60 s by default) keeps a crash-looping worker from
burning a GPU's worth of start-ups per minute; it starts over once the process has stayed
healthy for a while, so one crash a week always restarts within a second. K crashes inside a
sliding window declare the process failed: it stays down (the others keep serving) until a
human looks at its log.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


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
