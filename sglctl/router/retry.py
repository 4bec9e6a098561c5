"""Retry policy: which failures are retried, how long to wait, and how many times.

What is retried (on *another* worker when one is available), and only while nothing has been
sent to the client yet — once the first byte of a response went out, a retry would duplicate
or splice output, so the error is reported to the client instead:

- connection failures: refused, reset, DNS, connect timeout, a connection closed before the
  response head (the worker crashed mid-request) — :func:`is_retryable_exception`;
- timeouts waiting for the worker (read/write/pool timeouts): a stalled worker;
- these statuses from the worker (:func:`retryable_status`): 408 and 429 (the *worker* is
  busy or slow, another one may not be), 500, 502, 503, 504 (the worker is broken or
  overloaded).

What is not retried:

- every other 4xx: the request itself is wrong (bad JSON, unknown model, too long a prompt);
  another worker would say the same, so the worker's answer goes back to the client as is;
- 501, 505 and other 5xx: the worker does not support the request; all workers run the same
  server, so retrying only multiplies the load;
- errors that are ours, not the worker's: an invalid URL, a protocol violation we made, a
  response we could not decode; and cancellation (the client went away).

Limits, per request: a worker receives the request at most ``1 + max_worker_retries`` times,
and there are at most ``max_total_retries`` retries in all (so at most
``1 + max_total_retries`` attempts). :class:`RetryBudget` adds Envoy/linkerd's fleet-wide
limit on top, so that when every worker fails the router does not multiply the load on them
by the retry count.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import httpx

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Worker statuses worth another attempt elsewhere (see the module docstring for why).
RETRYABLE_STATUSES: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504})

# Transport errors that mean "this worker did not serve the request": safe to send elsewhere,
# since nothing reached the client. Order matters only for readability.
_RETRYABLE_EXCEPTIONS: tuple[type[BaseException], ...] = (
    httpx.ConnectError,  # refused, unreachable, DNS
    httpx.TimeoutException,  # connect / read / write / pool timeouts: a stalled worker
    httpx.RemoteProtocolError,  # connection dropped before a full response head: a crash
    httpx.ReadError,  # connection reset while reading
    httpx.WriteError,  # connection reset while sending the body
    ConnectionError,  # raw socket errors from lower layers
    TimeoutError,  # asyncio.wait_for around an attempt
    asyncio.TimeoutError,  # the same, on Python 3.10 where it is a distinct class
)

# Subclasses of the classes above that are our own mistakes, not the worker's.
_NEVER_RETRY: tuple[type[BaseException], ...] = (
    httpx.LocalProtocolError,
    httpx.UnsupportedProtocol,
)


def retryable_status(code: int) -> bool:
    """Whether a worker answer with this status should be retried on another worker."""
    return code in RETRYABLE_STATUSES


def is_retryable_exception(exc: BaseException) -> bool:
    """Whether an exception raised while talking to a worker should be retried elsewhere.

    ``asyncio.CancelledError`` is never retryable: it means the client left or the router is
    shutting down, and swallowing it would keep dead requests alive.
    """
    if isinstance(exc, (asyncio.CancelledError, *_NEVER_RETRY)):
        return False
    return isinstance(exc, _RETRYABLE_EXCEPTIONS)


@dataclass
class RetryPolicy:
    """How the forwarding loop retries; built once from the router flags."""

    max_worker_retries: int = 3
    max_total_retries: int = 6
    initial_backoff_ms: float = 50.0
    max_backoff_ms: float = 30_000.0
    multiplier: float = 1.5
    jitter: float = 0.2
    enabled: bool = True
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_worker_retries < 0 or self.max_total_retries < 0:
            raise ValueError("retry limits must be >= 0")
        if self.initial_backoff_ms < 0 or self.max_backoff_ms < 0:
            raise ValueError("backoff times must be >= 0")
        if self.multiplier < 1.0:
            raise ValueError(f"backoff multiplier must be >= 1, not {self.multiplier}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter factor must be within [0, 1], not {self.jitter}")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0 for the first retry).

        ``initial * multiplier**attempt``, capped at ``max_backoff_ms``, then spread by
        ``±jitter`` so that requests failed by the same crash do not all come back at once.
        """
        base = self.initial_backoff_ms * self.multiplier ** max(attempt, 0)
        base = min(base, self.max_backoff_ms)
        if self.jitter:
            base *= 1.0 + self.rng.uniform(-self.jitter, self.jitter)
        return max(base, 0.0) / 1000.0

    def new_attempts(self) -> RetryAttempts:
        """Book-keeping for one client request."""
        return RetryAttempts(self)


class RetryAttempts:
    """The attempts made for one request: decides whether and where another one may go.

    Usage in the forwarding loop::

        attempts = policy.new_attempts()
        while True:
            worker = select(attempts.candidates(healthy_workers, key=url_of))
            attempts.record(worker.url)
            ... send; on success return; on a retryable failure:
            if not attempts.can_retry():
                return 502
            await asyncio.sleep(attempts.next_backoff())

    Made for every request, but nearly every request has one attempt: the per-worker counts
    are only kept from the second attempt on (the first one's worker is ``last_url``), and
    the first attempt's candidates are the workers as given, unfiltered and uncopied.
    """

    __slots__ = ("_per_worker", "last_url", "policy", "total")

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.total = 0
        self.last_url: str | None = None
        self._per_worker: dict[str, int] | None = None

    @property
    def per_worker(self) -> Counter[str]:
        """Attempts per worker URL so far."""
        counts: Counter[str] = Counter(self._per_worker or {})
        if self.total and self._per_worker is None and self.last_url is not None:
            counts[self.last_url] = 1
        return counts

    @property
    def retries(self) -> int:
        """Retries made so far (attempts after the first)."""
        return max(self.total - 1, 0)

    def record(self, url: str) -> None:
        """An attempt is about to be sent to ``url``."""
        if self.total:
            counts = self._per_worker
            if counts is None:
                counts = self._per_worker = {self.last_url: 1} if self.last_url else {}
            counts[url] = counts.get(url, 0) + 1
        self.total += 1
        self.last_url = url

    def can_retry(self) -> bool:
        """Whether the policy allows one more attempt after a retryable failure."""
        return self.policy.enabled and self.retries < self.policy.max_total_retries

    def worker_allowed(self, url: str) -> bool:
        """Whether ``url`` may receive another attempt of this request."""
        if not self.total:
            return True
        counts = self._per_worker
        used = (1 if url == self.last_url else 0) if counts is None else counts.get(url, 0)
        return used <= self.policy.max_worker_retries

    def candidates(self, workers: Sequence[T], key: Callable[[T], str]) -> Sequence[T]:
        """Filter ``workers`` for the next attempt.

        Drops workers that used up their per-worker retries, and the worker that just failed
        unless it is the only one left (then retrying it after a backoff is better than
        giving up: it may have been a blip). Before the first attempt that is all of them:
        ``workers`` itself comes back (callers do not modify it).
        """
        if not self.total:
            return workers
        allowed = [w for w in workers if self.worker_allowed(key(w))]
        others = [w for w in allowed if key(w) != self.last_url]
        return others or allowed

    def next_backoff(self) -> float:
        """Seconds to wait before the next retry."""
        return self.policy.backoff(self.retries)


class RetryBudget:
    """Fleet-wide cap on retries, after Envoy's retry budgets and linkerd's token bucket.

    Per-request limits do not stop a retry storm: when every worker fails, each request is
    sent ``1 + max_total_retries`` times and a struggling fleet gets several times its load.
    The budget allows retries only up to ``ratio`` of recent requests (default 20%), plus a
    floor of ``min_per_sec`` retries per second so that a single crash with many requests in
    flight is always absorbed. Requests and retries are counted over ``ttl_secs``.
    """

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_sec: float = 10.0,
        ttl_secs: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ratio < 0 or min_per_sec < 0 or ttl_secs <= 0:
            raise ValueError("ratio and min_per_sec must be >= 0, ttl_secs > 0")
        self.ratio = ratio
        self.min_per_sec = min_per_sec
        self.ttl_secs = ttl_secs
        self._clock = clock
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()
        #: Retries refused because the budget was spent; exported as a counter.
        self.exhausted = 0

    def record_request(self) -> None:
        """A client request arrived (deposits ``ratio`` of a retry)."""
        now = self._clock()
        requests = self._requests
        requests.append(now)
        # Only this queue grows here (retries are expired in try_retry); inline, per request.
        horizon = now - self.ttl_secs
        while requests[0] < horizon:
            requests.popleft()

    def try_retry(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        now = self._clock()
        self._expire(now)
        allowed = self.min_per_sec * self.ttl_secs + self.ratio * len(self._requests)
        if len(self._retries) + 1 > allowed:
            self.exhausted += 1
            if self.exhausted == 1 or self.exhausted % 100 == 0:
                log.warning(
                    "retry budget exhausted (%d retries for %d requests in %.0fs); failing fast",
                    len(self._retries),
                    len(self._requests),
                    self.ttl_secs,
                )
            return False
        self._retries.append(now)
        return True

    def _expire(self, now: float) -> None:
        horizon = now - self.ttl_secs
        for queue in (self._requests, self._retries):
            while queue and queue[0] < horizon:
                queue.popleft()
