"""The forwarding loop: pick a worker, send the request, retry elsewhere, relay the answer.

One request's life here:

1. The policy picks among ``registry.routable()`` (minus workers this request already used up,
   see :class:`~sglctl.router.retry.RetryAttempts`); the chosen worker's circuit breaker must
   ``allow()`` it (in half-open it lets one probe through at a time).
2. The original body bytes go to the worker over the shared upstream client
   (:mod:`~sglctl.router.upstream`: pooled keep-alive connections). The worker's load
   counter (``in_flight``) is held from here until the last byte went to the client, or the
   client went away.
3. A connect error, a timeout or a retryable status (:func:`~sglctl.router.retry.retryable_status`)
   *before any byte reached the client* counts as a failure for that worker's breaker and is
   retried on another worker after a backoff, within the retry limits and the fleet-wide
   retry budget. Once streaming began there is no retry: a mid-stream failure ends the stream
   (with an SSE error event for event streams) and is logged.
4. Every other answer (2xx, and 4xx, which another worker would repeat) goes back as is:
   event streams chunk by chunk as they arrive, other bodies whole.

Errors: 503 when no worker is routable at all, 502 when every attempt failed (the last
worker error in the message), 504 when ``--request-timeout-secs`` ran out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from time import monotonic  # [stall] byte stamps for sglctl/router/stall.py

import anyio
import orjson
from starlette.responses import Response, StreamingResponse

from sglctl.router.errors import RouterError
from sglctl.router.inflight import InFlightWatcher, Watch
from sglctl.router.metrics import note_attempt, note_chunk  # [observability]
from sglctl.router.policies.base import NO_KEY, Policy, RouteKey
from sglctl.router.retry import RetryBudget, RetryPolicy, retryable_status
from sglctl.router.upstream import Upstream, UpstreamError, UpstreamResponse, UpstreamTimeout
from sglctl.router.workers import Worker, WorkerRegistry

log = logging.getLogger(__name__)

#: Response headers passed back from the worker (hop-by-hop and length headers are not).
_PASS_HEADERS = ("content-type", "x-request-id", "cache-control")
#: Header naming the worker that served a request (an sglctl extension; tests and debugging).
WORKER_HEADER = "x-sglctl-worker"
_ERROR_TEXT_LIMIT = 300


def _url(worker: Worker) -> str:
    return worker.url


@dataclass
class Finish:
    """Callbacks run exactly once when a request is over (last byte, error or cancel)."""

    callbacks: list[Callable[[int, bool], None]] = field(default_factory=list)
    done: bool = False

    def add(self, callback: Callable[[int, bool], None]) -> None:
        self.callbacks.append(callback)

    def __call__(self, status: int, ok: bool) -> None:
        if self.done:
            return
        self.done = True
        for callback in self.callbacks:
            try:
                callback(status, ok)
            except Exception:
                log.exception("request completion callback failed")


class _Failure(Exception):
    """A retryable failure of one attempt at one worker."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class Forwarder:
    """Sends inference requests to workers with retries; shared by every request."""

    def __init__(
        self,
        registry: WorkerRegistry,
        policy: Policy,
        upstream: Upstream,
        retry: RetryPolicy,
        *,
        budget: RetryBudget | None = None,
        request_timeout_secs: float = 1800.0,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.upstream = upstream
        self.retry = retry
        self.budget = budget
        self.request_timeout_secs = request_timeout_secs
        self.on_retry = on_retry
        #: Attempts in flight per worker, so that ejecting a worker can interrupt them.
        self.in_flight = InFlightWatcher()

    # -- worker choice ---------------------------------------------------------------------
    def choose(self, candidates: Sequence[Worker], key: RouteKey) -> Worker | None:
        """The policy's pick among ``candidates`` whose breaker lets the request through."""
        pool = list(candidates)
        while pool:
            worker = self.policy.select(pool, key)
            if worker is None:
                return None
            if worker.breaker.allow():
                return worker
            pool.remove(worker)
        return None

    # -- the loop --------------------------------------------------------------------------
    async def forward(
        self,
        path: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        key: RouteKey = NO_KEY,
        finish: Finish | None = None,
        method: str = "POST",
    ) -> Response:
        """Send ``body`` to ``path`` on a chosen worker; the answer, or raise :class:`RouterError`.

        ``headers`` are the (lower-case name, value) pairs to pass on, besides Host and
        Content-Length. ``finish(status, ok)`` runs once when the request is completely over:
        at return for a whole body, at the last byte (or cancellation) for a stream.
        """
        finish = finish or Finish()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout_secs
        attempts = self.retry.new_attempts()
        if self.budget is not None:
            self.budget.record_request()
        raw_method, raw_path = method.encode("latin-1"), path.encode("latin-1")
        last_error: str | None = None
        while True:
            candidates = attempts.candidates(self.registry.routable(), key=_url)
            worker = self.choose(candidates, key) if candidates else None
            if worker is None:
                if last_error is None:
                    raise RouterError(503, "no healthy worker available to serve the request")
                raise RouterError(502, f"all attempts failed; last error: {last_error}")
            if attempts.total and self.on_retry is not None:
                self.on_retry()  # counted when a retry is really sent, not when one is allowed
            attempts.record(worker.url)
            note_attempt(self.policy, candidates, key, worker)  # [observability]
            watch = self.in_flight.watch(worker.url)
            try:
                return await self._attempt(
                    worker, raw_method, raw_path, body, headers, deadline, finish, watch
                )
            except (_Failure, asyncio.CancelledError) as exc:
                # An attempt interrupted because its worker was ejected (health checks) fails
                # over like a connection error; any other cancellation propagates.
                if isinstance(exc, asyncio.CancelledError) and not watch.interrupted():
                    raise
                failure = exc if isinstance(exc, _Failure) else _Failure(str(watch.reason))
            finally:
                watch.reading = False
                if not watch.streaming:
                    self.in_flight.unwatch(watch)
            worker.errors_total += 1
            worker.breaker.record_failure()
            last_error = f"{worker.url}: {failure}"
            remaining = deadline - loop.time()
            if failure.timed_out or remaining <= 0:
                raise RouterError(
                    504,
                    f"request timed out after {self.request_timeout_secs:g}s ({last_error})",
                ) from None
            if not attempts.can_retry() or (
                self.budget is not None and not self.budget.try_retry()
            ):
                raise RouterError(502, f"worker request failed; last error: {last_error}") from None
            log.debug("retrying after failure at %s", last_error)
            await asyncio.sleep(min(attempts.next_backoff(), remaining))

    async def _attempt(
        self,
        worker: Worker,
        method: bytes,
        path: bytes,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        deadline: float,
        finish: Finish,
        watch: Watch,
    ) -> Response:
        loop = asyncio.get_running_loop()
        release = worker.take_load_slot()
        try:
            watch.reading = True
            response = await self.upstream.request(
                worker.url, method, path, headers, body, deadline
            )
            worker.last_byte = monotonic()  # [stall] response head arrived
        except BaseException as exc:
            release(0, False)
            if isinstance(exc, asyncio.CancelledError):
                _release_probe(worker)
                raise
            if isinstance(exc, UpstreamError):
                timed_out = isinstance(exc, UpstreamTimeout) and loop.time() >= deadline
                raise _Failure(str(exc), timed_out=timed_out) from None
            raise

        status = response.status
        if retryable_status(status):
            try:
                detail = (await response.read())[:_ERROR_TEXT_LIMIT].decode(errors="replace")
            except UpstreamError:
                detail = ""
            finally:
                release(status, False)
                await response.aclose()
            raise _Failure(f"HTTP {status}" + (f": {detail}" if detail else ""))

        worker.breaker.record_success()
        out_headers = {WORKER_HEADER: worker.url}
        for name in _PASS_HEADERS:
            value = response.header(name)
            if value is not None:
                out_headers[name] = value
        if out_headers.get("content-type", "").startswith("text/event-stream"):
            finish.add(release)
            watch.reading = False
            watch.streaming = True  # the relay owns the watch from here
            return StreamingResponse(
                self._relay(worker, response, finish, watch),
                status_code=status,
                headers=out_headers,
            )
        try:
            content = await response.read()
            worker.last_byte = monotonic()  # [stall] body arrived
        except BaseException as exc:
            release(status, False)
            await response.aclose()
            if isinstance(exc, UpstreamError):
                timed_out = isinstance(exc, UpstreamTimeout) and loop.time() >= deadline
                raise _Failure(str(exc), timed_out=timed_out) from None
            raise
        release(status, True)
        await response.aclose()
        finish(status, status < 400)
        return Response(content, status_code=status, headers=out_headers)

    async def _relay(
        self, worker: Worker, response: UpstreamResponse, finish: Finish, watch: Watch
    ) -> AsyncIterator[bytes]:
        """Pass an event stream through chunk by chunk; always release the worker slot.

        A worker that dies or is ejected mid-stream ends the stream with an SSE error event
        (never a retry: part of the answer already reached the client).
        """
        ok = False
        problem: str | None = None
        # Starlette iterates the body in a task of its own: interrupts must cancel that one.
        watch.task = asyncio.current_task()
        try:
            try:
                while watch.reason is None:
                    watch.reading = True
                    try:
                        chunk = await response.__anext__()
                    except StopAsyncIteration:
                        ok = True
                        break
                    finally:
                        watch.reading = False
                    worker.last_byte = monotonic()  # [stall] stream chunk arrived
                    note_chunk(chunk)  # [observability] TTFT / TPOT
                    yield chunk
                else:
                    problem = watch.reason
            except asyncio.CancelledError:
                if not watch.interrupted():
                    raise
                problem = watch.reason
            except UpstreamError as exc:
                problem = str(exc)
            if problem is not None:
                worker.errors_total += 1
                worker.breaker.record_failure()
                log.warning("stream from %s broke after it started: %s", worker.url, problem)
                message = f"worker {worker.url} failed mid-stream: {problem}"
                yield b"data: " + orjson.dumps(
                    {"error": {"message": message, "type": "bad_gateway", "code": 502}}
                )
                yield b"\n\n"
        finally:
            self.in_flight.unwatch(watch)
            finish(response.status, ok)
            with anyio.CancelScope(shield=True):
                await response.aclose()


def _release_probe(worker: Worker) -> None:
    """The request ended with no verdict (client gone): free a half-open probe slot."""
    worker.breaker.release()
