"""Per-worker circuit breaker: stop sending requests to a worker that keeps failing.

Health checks run every few seconds; a worker can start failing every request long before
the next probe notices (a wedged GPU answers ``/health`` but 500s on ``/generate``). The
breaker reacts to the request outcomes themselves, so the router stops feeding a failing
worker after ``failure_threshold`` failures instead of after the next health cycle.

States (the usual three, as in Envoy's outlier detection and the SGLang Router):

- **closed**: requests flow. ``failure_threshold`` *consecutive* failures, all within
  ``window_secs`` of the first one, open the breaker. A success resets the streak, and a
  streak older than the window starts over: a busy worker that fails now and then is not
  ejected, a worker failing everything is, however slow the traffic.
- **open**: no requests for ``timeout_secs``.
- **half_open**: after the timeout, exactly one probe request at a time is let through.
  ``success_threshold`` successful probes close the breaker; one failed probe opens it for
  another ``timeout_secs``.

Two ways to ask, on purpose:

- :meth:`CircuitBreaker.is_available` answers "could this worker take a request now?" without
  side effects; use it to build the candidate list for a routing policy.
- :meth:`CircuitBreaker.allow` *claims* the request: in half-open it takes the single probe
  slot. Call it once, for the worker actually chosen, and then report the outcome with
  :meth:`record_success` / :meth:`record_failure` (or :meth:`release` when the request ended
  with no verdict, e.g. the client went away). A probe that never reports back is forgotten
  after ``timeout_secs`` so a lost verdict cannot wedge the worker out of rotation forever.

Not thread-safe: the router runs on one asyncio loop and every method is synchronous.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

log = logging.getLogger(__name__)

State = Literal["closed", "open", "half_open"]

#: Values of the ``sglang_router_circuit_breaker_state`` gauge.
STATE_CODES: dict[str, int] = {"closed": 0, "open": 1, "half_open": 2}


class CircuitBreaker:
    """A three-state breaker for one worker; ``clock`` is injectable for tests."""

    def __init__(
        self,
        failure_threshold: int = 10,
        success_threshold: int = 3,
        timeout_secs: float = 60.0,
        window_secs: float = 120.0,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
        on_open: Callable[[str], None] | None = None,
    ) -> None:
        """``on_open(reason)`` hears every opening decided here (not :meth:`force_open`):
        the several-process router tells the sibling processes (``--router-processes``)."""
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, not {failure_threshold}")
        if success_threshold < 1:
            raise ValueError(f"success_threshold must be >= 1, not {success_threshold}")
        if timeout_secs < 0 or window_secs <= 0:
            raise ValueError("timeout_secs must be >= 0 and window_secs > 0")
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.timeout_secs = timeout_secs
        self.window_secs = window_secs
        self.enabled = enabled
        self.name = name
        self._clock = clock
        self.on_open = on_open
        self._state: State = "closed"
        self._consecutive_failures = 0
        self._streak_started = 0.0
        self._opened_at = 0.0
        self._half_open_successes = 0
        self._probe_started: float | None = None
        #: How many times the breaker opened; exported as a counter.
        self.times_opened = 0
        self.total_failures = 0
        self.total_successes = 0

    # -- reading --------------------------------------------------------------------------
    @property
    def state(self) -> State:
        """Current state; an open breaker whose timeout elapsed reads as ``half_open``."""
        if not self.enabled:
            return "closed"
        self._maybe_half_open()
        return self._state

    @property
    def state_code(self) -> int:
        """Numeric state for the Prometheus gauge (closed 0, open 1, half_open 2)."""
        return STATE_CODES[self.state]

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    def is_available(self) -> bool:
        """Whether :meth:`allow` would say yes right now, without claiming anything."""
        # Closed is the state of nearly every call (every worker, every request): answer it
        # before the ``state`` property, which only matters for an open breaker's timeout.
        if not self.enabled or self._state == "closed":
            return True
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        return not self._probe_in_flight()

    # -- acting ---------------------------------------------------------------------------
    def allow(self) -> bool:
        """Claim permission to send one request; in half-open this takes the probe slot."""
        if not self.enabled or self._state == "closed":
            return True
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._probe_in_flight():
            return False
        self._probe_started = self._clock()
        return True

    def release(self) -> None:
        """The claimed request ended with no verdict (cancelled): free the probe slot."""
        self._probe_started = None

    def record_success(self) -> None:
        """The worker answered well (the router's definition: not a retryable failure)."""
        if not self.enabled:
            return
        self.total_successes += 1
        self._consecutive_failures = 0
        if self.state != "half_open":
            return
        self._probe_started = None
        self._half_open_successes += 1
        if self._half_open_successes >= self.success_threshold:
            self._state = "closed"
            log.info(
                "circuit breaker %s closed after %d successful probes",
                self.name,
                self._half_open_successes,
            )

    def record_failure(self) -> None:
        """The worker failed a request (connect error, timeout, retryable 5xx)."""
        if not self.enabled:
            return
        self.total_failures += 1
        now = self._clock()
        state = self.state
        if state == "half_open":
            self._open(now, "probe failed")
            return
        if state == "open":
            # A request admitted before the breaker opened failed late; nothing new to learn.
            return
        if self._consecutive_failures == 0 or now - self._streak_started > self.window_secs:
            self._consecutive_failures = 0
            self._streak_started = now
        self._consecutive_failures += 1
        if self._consecutive_failures >= self.failure_threshold:
            self._open(now, f"{self._consecutive_failures} consecutive failures")

    def reset(self) -> None:
        """Close the breaker and forget history (e.g. the worker was replaced)."""
        if self._state != "closed":
            log.info("circuit breaker %s reset to closed", self.name)
        self._state = "closed"
        self._consecutive_failures = 0
        self._half_open_successes = 0
        self._probe_started = None

    def force_open(self, reason: str) -> None:
        """Open now because another router process's breaker for this worker opened: the
        router's processes share one verdict, so one process's failures spare the others'
        requests. Not reported to ``on_open`` (it came from there)."""
        if self.enabled and self._state != "open":
            self._open(self._clock(), reason, tell=False)

    # -- internals ------------------------------------------------------------------------
    def _open(self, now: float, reason: str, tell: bool = True) -> None:
        self._state = "open"
        self._opened_at = now
        self._consecutive_failures = 0
        self._half_open_successes = 0
        self._probe_started = None
        self.times_opened += 1
        log.warning(
            "circuit breaker %s opened (%s); no requests for %.1fs",
            self.name,
            reason,
            self.timeout_secs,
        )
        if tell and self.on_open is not None:
            self.on_open(reason)

    def _maybe_half_open(self) -> None:
        if self._state == "open" and self._clock() - self._opened_at >= self.timeout_secs:
            self._state = "half_open"
            self._half_open_successes = 0
            self._probe_started = None
            log.info("circuit breaker %s half-open: letting one probe request through", self.name)

    def _probe_in_flight(self) -> bool:
        if self._probe_started is None:
            return False
        if self._clock() - self._probe_started >= max(self.timeout_secs, 1.0):
            # The probe's verdict never came back (a bug or a lost task): do not wait forever.
            log.warning("circuit breaker %s: probe verdict lost; allowing another", self.name)
            self._probe_started = None
            return False
        return True

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self.state})"
