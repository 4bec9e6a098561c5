"""The forwarding loop: pick workers, send the request, retry elsewhere, relay the answer.

One loop (:meth:`Forwarder.run`) serves every inference request; what differs between a
regular request and a prefill/decode (PD) one is a *plan* (:class:`Plan`): which workers one
attempt goes to and how it is sent. A regular request's plan (:class:`SinglePlan`, behind
:meth:`Forwarder.forward`) sends it to one worker; the PD plan (:mod:`~sglctl.router.pd`)
sends it to a prefill and a decode worker at once. Both use the same pieces here: the
breaker check (:meth:`Forwarder.choose`), the load slot and in-flight watch of each leg
(:meth:`Forwarder.open`), the failure bookkeeping and retries (:meth:`Forwarder.run`), and
the relay of the answer (:meth:`Forwarder.deliver`).

One request's life here:

1. The plan's policy picks among ``registry.routable()`` (minus workers this request already
   used up, see :class:`~sglctl.router.retry.RetryAttempts`); the chosen worker's circuit
   breaker must ``allow()`` it (in half-open it lets one probe through at a time).
2. The body goes to the worker over the shared upstream client
   (:mod:`~sglctl.router.upstream`: pooled keep-alive connections). The worker's load
   counter (``in_flight``) is held from here until its last byte, a failure or the client
   going away; the attempt is registered with :mod:`~sglctl.router.inflight` so that health
   checks ejecting the worker interrupt it.
3. A connect error, a timeout, an interruption or a retryable status
   (:func:`~sglctl.router.retry.retryable_status`) *before any byte reached the client*
   raises :class:`AttemptFailure` naming the workers to blame: each gets a breaker failure, and the
   request is retried after a backoff, within the retry limits and the fleet-wide retry
   budget. Once streaming began there is no retry: a mid-stream failure ends the stream
   (with an SSE error event for event streams) and is logged.
4. Every other answer (2xx, and 4xx, which another worker would repeat) goes back as is:
   event streams chunk by chunk as they arrive, other bodies whole.

Errors: 503 when no worker is routable at all, 502 when every attempt failed (the last
worker error in the message), 504 when ``--request-timeout-secs`` ran out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from time import monotonic  # byte stamps for the stall detector (stall.py)
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import orjson

from sglctl.router.errors import RouterError
from sglctl.router.inflight import InFlightWatcher, Watch
from sglctl.router.metrics import note_attempt, note_chunk  # [observability]
from sglctl.router.policies.base import NO_KEY, Policy, RouteKey, Ticket
from sglctl.router.responses import Answer, Reply, whole_headers
from sglctl.router.retry import RetryAttempts, RetryBudget, RetryPolicy, retryable_status
from sglctl.router.upstream import Upstream, UpstreamError, UpstreamResponse, UpstreamTimeout
from sglctl.router.upstream_native import NativeResponse
from sglctl.router.workers import Worker, WorkerRegistry

if TYPE_CHECKING:
    from sglctl.router.metrics import RouterMetrics

log = logging.getLogger(__name__)

#: Response headers passed back from the worker (hop-by-hop and length headers are not).
_PASS_HEADERS = ("content-type", "x-request-id", "cache-control")
#: Header naming the worker that served a request (an sglctl extension; tests and debugging).
WORKER_HEADER = "x-sglctl-worker"
_ERROR_TEXT_LIMIT = 300
#: Bytes of a whole answer's end handed to the policy's ticket (cached_tokens is there).
TICKET_TAIL = 1024


def _url(worker: Worker) -> str:
    return worker.url


#: The pass-through names as bytes (the native client's raw headers are lower-case bytes).
PASS_RAW = frozenset(name.encode("latin-1") for name in _PASS_HEADERS)
WORKER_HEADER_RAW = WORKER_HEADER.encode("latin-1")
#: Worker URLs as header values, encoded once per URL (every answer names its worker).
_URL_BYTES: dict[str, bytes] = {}


def answer_headers(
    worker: Worker, response: UpstreamResponse, extra: dict[str, str] | None
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The client's headers for ``response`` (the worker's name, ``extra``, the passed ones)
    and whether it is an event stream.

    One pass over the worker's raw headers (the first of each passed name wins, as a lookup
    by name would); the content type is read in the same pass, which saves the caller a
    second scan.
    """
    url = _URL_BYTES.get(worker.url)
    if url is None:
        if len(_URL_BYTES) > 4096:  # workers come and go: bounded
            _URL_BYTES.clear()
        url = _URL_BYTES[worker.url] = worker.url.encode("latin-1")
    out = [(WORKER_HEADER_RAW, url)]
    if extra:
        out += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
    stream = False
    raw: list[tuple[bytes, bytes]] | None = getattr(response, "raw_headers", None)
    if raw is None:  # a client without raw headers (the httpx adapter): by name
        for name in _PASS_HEADERS:
            value = response.header(name)
            if value is not None:
                out.append((name.encode("latin-1"), value.encode("latin-1")))
                if name == "content-type":
                    stream = value.startswith("text/event-stream")
    else:
        seen: tuple[bytes, ...] = ()
        for raw_name, raw_value in raw:
            if raw_name in PASS_RAW and raw_name not in seen:
                seen += (raw_name,)
                out.append((raw_name, raw_value))
                if raw_name == b"content-type":
                    stream = raw_value.startswith(b"text/event-stream")
    return out, stream


async def close_response(response: UpstreamResponse) -> None:
    """Close a worker's answer even when the current task is being cancelled.

    The native client closes synchronously (:meth:`NativeResponse.release`), so there is no
    await to protect and no need for anyio's shielded ``CancelScope`` (a few µs per request);
    other clients get the shield.
    """
    if type(response) is NativeResponse:
        response.release()
        return
    with anyio.CancelScope(shield=True):
        await response.aclose()


class Finish:
    """Callbacks run exactly once when a request is over (last byte, error or cancel).

    One per request: a plain slotted class (a dataclass with a ``default_factory`` list cost
    more to make than what it does).
    """

    __slots__ = ("callbacks", "done")

    def __init__(self, *callbacks: Callable[[int, bool], None]) -> None:
        self.callbacks: list[Callable[[int, bool], None]] = list(callbacks)
        self.done = False

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


class AttemptFailure(Exception):
    """A retryable failure of one attempt.

    ``blamed`` are the workers whose breaker records it (the attempt's other workers get
    their half-open probe slot back); ``status`` is the worker's HTTP status, None for a
    transport error or an interruption (the worker itself is gone or stuck).
    """

    def __init__(
        self,
        message: str,
        timed_out: bool = False,
        *,
        status: int | None = None,
        blamed: Sequence[Worker] = (),
    ) -> None:
        super().__init__(message)
        self.timed_out = timed_out
        self.status = status
        self.blamed = list(blamed)


#: The public name for plans in other modules (pd.py raises it too).
AttemptFailed = AttemptFailure


class Head:
    """A worker's answer whose status is not retryable: the head is in, the body is not.

    Holds the worker's load slot (``release``) and its in-flight ``watch`` until
    :meth:`Forwarder.deliver` relays it or :meth:`abandon` closes it. (One per attempt: a
    slotted class, not a dataclass.)
    """

    __slots__ = ("release", "response", "ticket", "watch", "worker")

    def __init__(
        self,
        worker: Worker,
        response: UpstreamResponse,
        release: Callable[[int, bool], None],
        watch: Watch,
        ticket: Ticket | None = None,
    ) -> None:
        self.worker = worker
        self.response = response
        self.release = release
        self.watch = watch
        #: The policy's ticket for this attempt (told of its first byte and end), if any.
        self.ticket = ticket

    @property
    def status(self) -> int:
        return self.response.status

    async def abandon(self, in_flight: InFlightWatcher) -> None:
        """Close it unread: the connection is closed, so the worker sees its client gone."""
        self.release(self.response.status, False)
        in_flight.unwatch(self.watch)
        await close_response(self.response)


class Plan(Protocol):
    """Where one request's attempts go and how each is sent (regular or PD)."""

    def pick(self, attempts: RetryAttempts) -> Sequence[Worker] | None:
        """The workers of the next attempt (recorded in ``attempts``), None if there are none."""
        ...

    def unavailable(self) -> str:
        """The 503 message when no attempt could be made at all."""
        ...

    async def attempt(self, workers: Sequence[Worker], deadline: float, finish: Finish) -> Reply:
        """Send one attempt; the answer, or raise :class:`AttemptFailure`."""
        ...


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
        decode_policy: Policy | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.registry = registry
        #: The regular policy; in PD mode the prefill policy.
        self.policy = policy
        #: PD mode: the decode workers' policy (None outside PD mode).
        self.decode_policy = decode_policy
        self.upstream = upstream
        self.retry = retry
        self.budget = budget
        self.request_timeout_secs = request_timeout_secs
        self.on_retry = on_retry
        self.metrics = metrics
        #: Attempts in flight per worker, so that ejecting a worker can interrupt them.
        self.in_flight = InFlightWatcher()

    # -- worker choice ---------------------------------------------------------------------
    def choose(
        self, candidates: Sequence[Worker], key: RouteKey, policy: Policy | None = None
    ) -> Worker | None:
        """The policy's pick among ``candidates`` whose breaker lets the request through."""
        policy = policy or self.policy
        pool = candidates  # copied only when a breaker refuses one (rare): no list per request
        while pool:
            worker = policy.select(pool, key)
            if worker is None:
                return None
            if worker.breaker.allow():
                return worker
            if pool is candidates:
                pool = list(candidates)
            pool.remove(worker)  # type: ignore[attr-defined]
        return None

    # -- the loop --------------------------------------------------------------------------
    def forward(
        self,
        path: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        key: RouteKey = NO_KEY,
        finish: Finish | None = None,
        method: str = "POST",
    ) -> Coroutine[Any, Any, Reply]:
        """Send ``body`` to ``path`` on a chosen worker; the answer, or raise :class:`RouterError`.

        ``headers`` are the (lower-case name, value) pairs to pass on, besides Host and
        Content-Length. ``finish(status, ok)`` runs once when the request is completely over:
        at return for a whole body, at the last byte (or cancellation) for a stream.

        Await it like a coroutine function: it returns :meth:`run`'s coroutine rather than
        wrapping it in one of its own, since every resumption of a request's task passes
        through each coroutine of its chain.
        """
        plan = SinglePlan(
            self, method.encode("latin-1"), path.encode("latin-1"), body, headers, key
        )
        delay = self.miss_delay(key) if self.policy.miss_delays else 0.0
        return self.run(plan, finish, backoff=delay)

    def miss_delay(self, key: RouteKey) -> float:
        """Seconds the policy wants to wait before choosing for ``key`` (router replicas'
        staggered misses: :meth:`~sglctl.router.policies.base.Policy.miss_delay`)."""
        return self.policy.miss_delay(self.registry.routable(), key)

    def begin_run(self) -> tuple[RetryAttempts, float]:
        """A request's attempt book-keeping and deadline (and its deposit in the budget)."""
        deadline = asyncio.get_running_loop().time() + self.request_timeout_secs
        attempts = self.retry.new_attempts()
        if self.budget is not None:
            self.budget.record_request()
        return attempts, deadline

    def pick(self, plan: Plan, attempts: RetryAttempts, last_error: str | None) -> Sequence[Worker]:
        """The next attempt's workers; raises the 503 (none routable) or 502 (none left)."""
        workers = plan.pick(attempts)
        if workers is None:
            if last_error is None:
                raise RouterError(503, plan.unavailable())
            raise RouterError(502, f"all attempts failed; last error: {last_error}")
        if attempts.total > 1 and self.on_retry is not None:
            self.on_retry()  # counted when a retry is really sent, not when one is allowed
        return workers

    def settle(
        self,
        workers: Sequence[Worker],
        failure: AttemptFailure,
        attempts: RetryAttempts,
        deadline: float,
    ) -> tuple[str, float]:
        """Book a failed attempt (breakers, error counts); the error text and the backoff
        before the next attempt. Raises the 504 (deadline) or 502 (no retry left)."""
        for worker in workers:
            if worker in failure.blamed:
                worker.errors_total += 1
                worker.breaker.record_failure()
            else:
                worker.breaker.release()
        last_error = str(failure)
        remaining = deadline - asyncio.get_running_loop().time()
        if failure.timed_out or remaining <= 0:
            raise RouterError(
                504,
                f"request timed out after {self.request_timeout_secs:g}s ({last_error})",
            ) from None
        if not attempts.can_retry() or (self.budget is not None and not self.budget.try_retry()):
            raise RouterError(502, f"worker request failed; last error: {last_error}") from None
        log.debug("retrying after failure at %s", last_error)
        return last_error, min(attempts.next_backoff(), remaining)

    async def run(
        self,
        plan: Plan,
        finish: Finish | None = None,
        *,
        attempts: RetryAttempts | None = None,
        deadline: float = 0.0,
        workers: Sequence[Worker] | None = None,
        last_error: str | None = None,
        backoff: float = 0.0,
    ) -> Reply:
        """Attempt ``plan`` until an answer, within the retry limits, budget and deadline.

        The keyword arguments continue a request that began elsewhere (the callback path of
        :mod:`~sglctl.router.direct`): its ``attempts`` and ``deadline``, and either the
        ``workers`` already picked for the next attempt or, after a failure, the
        ``last_error`` and the ``backoff`` to wait first.
        """
        finish = finish or Finish()
        if attempts is None:
            attempts, deadline = self.begin_run()
        if backoff > 0:
            await asyncio.sleep(backoff)
        while True:
            if workers is None:
                workers = self.pick(plan, attempts, last_error)
            try:
                return await plan.attempt(workers, deadline, finish)
            except AttemptFailure as exc:
                failure = exc
            except asyncio.CancelledError:
                _release_probes(workers)  # the client left: no verdict on anyone
                raise
            last_error, pause = self.settle(workers, failure, attempts, deadline)
            workers = None
            await asyncio.sleep(pause)

    # -- one leg: one request to one worker ------------------------------------------------
    async def open(
        self,
        worker: Worker,
        method: bytes,
        path: bytes,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        deadline: float,
    ) -> Head:
        """Send to ``worker`` from the current task; its answer's :class:`Head`.

        Raises :class:`AttemptFailure` (blaming ``worker``) for a transport error, a timeout, a
        retryable status, or an interruption by :mod:`~sglctl.router.inflight`; any other
        cancellation propagates. The load slot and the watch are freed on every exit but the
        returned head, which owns them.
        """
        loop = asyncio.get_running_loop()
        watch = self.in_flight.watch(worker.url)
        release = worker.take_load_slot()
        try:
            watch.reading = True
            try:
                response = await self.upstream.request(
                    worker.url, method, path, headers, body, deadline
                )
                worker.last_byte = monotonic()  # stall detector: the response head arrived
            finally:
                watch.reading = False
        except BaseException as exc:
            release(0, False)
            self.in_flight.unwatch(watch)
            if isinstance(exc, asyncio.CancelledError):
                if not watch.interrupted():
                    raise
                raise AttemptFailure(f"{worker.url}: {watch.reason}", blamed=[worker]) from None
            if isinstance(exc, UpstreamError):
                timed_out = isinstance(exc, UpstreamTimeout) and loop.time() >= deadline
                raise AttemptFailure(f"{worker.url}: {exc}", timed_out, blamed=[worker]) from None
            raise
        status = response.status
        if retryable_status(status):
            try:
                detail = (await response.read())[:_ERROR_TEXT_LIMIT].decode(errors="replace")
            except (UpstreamError, asyncio.CancelledError):
                detail = ""
            finally:
                release(status, False)
                self.in_flight.unwatch(watch)
                await response.aclose()
            message = f"{worker.url}: HTTP {status}" + (f": {detail}" if detail else "")
            raise AttemptFailure(message, status=status, blamed=[worker])
        return Head(worker, response, release, watch)

    async def read_whole(self, head: Head, deadline: float) -> bytes:
        """The whole body of ``head``'s answer, read in the current task; frees the head.

        Raises :class:`AttemptFailure` like :meth:`open` (the body is read before any byte went to
        the client, so a failure here is still retried).
        """
        loop = asyncio.get_running_loop()
        worker, watch, response = head.worker, head.watch, head.response
        watch.task = asyncio.current_task()
        ok = False
        try:
            if watch.reason is not None:  # ejected between the head and this read
                raise AttemptFailure(f"{worker.url}: {watch.reason}", blamed=[worker])
            watch.reading = True
            content = await response.read()
            worker.last_byte = monotonic()  # stall detector: the body arrived
            ok = True
            return content
        except asyncio.CancelledError:
            if not watch.interrupted():
                raise
            raise AttemptFailure(f"{worker.url}: {watch.reason}", blamed=[worker]) from None
        except UpstreamError as exc:
            timed_out = isinstance(exc, UpstreamTimeout) and loop.time() >= deadline
            raise AttemptFailure(f"{worker.url}: {exc}", timed_out, blamed=[worker]) from None
        finally:
            watch.reading = False
            head.release(response.status, ok)
            self.in_flight.unwatch(watch)
            await close_response(response)

    async def deliver(
        self,
        head: Head,
        deadline: float,
        finish: Finish,
        *,
        headers: dict[str, str] | None = None,
        rewrite: Rewrite | None = None,
    ) -> Reply:
        """The client's answer from ``head``: an event stream relayed as it arrives, or the
        whole body. ``rewrite`` edits the body on the way (PD's logprob merge); ``headers``
        are added to the answer's."""
        worker, response = head.worker, head.response
        status = response.status
        if head.watch.reason is not None:  # ejected after its head came (PD: the prefill's wait)
            await head.abandon(self.in_flight)
            raise AttemptFailure(f"{worker.url}: {head.watch.reason}", blamed=[worker])
        worker.breaker.record_success()
        out_headers, stream = answer_headers(worker, response, headers)
        if stream:  # an event stream: relay it as it comes
            finish.add(head.release)
            head.watch.streaming = True  # the relay owns the watch from here
            return Answer(status, out_headers, body_iterator=self._relay(head, finish, rewrite))
        content = await self.read_whole(head, deadline)
        if head.ticket is not None:  # [policy feedback] the whole answer: first byte and end
            head.ticket.first_byte(False)
            head.ticket.done(status < 400, content[-TICKET_TAIL:])
        if rewrite is not None and status < 400:
            content = rewrite.whole(content)
        finish(status, status < 400)
        out_headers.extend(whole_headers(status, len(content)))
        return Answer(status, out_headers, content)

    async def _relay(
        self, head: Head, finish: Finish, rewrite: Rewrite | None
    ) -> AsyncIterator[bytes]:
        """Pass an event stream through chunk by chunk; always release the worker slot.

        A worker that dies or is ejected mid-stream ends the stream with an SSE error event
        (never a retry: part of the answer already reached the client).
        """
        worker, response, watch = head.worker, head.response, head.watch
        ticket, tail, prev = head.ticket, b"", b""  # [policy feedback]
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
                    worker.last_byte = monotonic()  # stall detector: a chunk arrived
                    if rewrite is not None:
                        chunk = rewrite.chunk(chunk)
                        if not chunk:
                            continue
                    note_chunk(chunk)  # [observability] TTFT / TPOT
                    if ticket is not None:  # [policy feedback] first chunk; the last two
                        if not tail:
                            ticket.first_byte(True)
                        prev, tail = tail, chunk
                    yield chunk
                else:
                    problem = watch.reason
                if ok and rewrite is not None:
                    rest = rewrite.end()
                    if rest:
                        yield rest
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
            if ticket is not None:
                ticket.done(ok, prev + tail)
            self.in_flight.unwatch(watch)
            finish(response.status, ok)
            await close_response(response)


class Rewrite(Protocol):
    """Edits an answer on its way to the client (PD mode's logprob merge)."""

    def whole(self, content: bytes) -> bytes:
        """A whole (non-streamed) body."""
        ...

    def chunk(self, chunk: bytes) -> bytes:
        """One chunk of an event stream as it arrived; what to send now (may be empty)."""
        ...

    def end(self) -> bytes:
        """The stream ended cleanly: whatever is still held back."""
        ...


class SinglePlan:
    """The regular plan: each attempt goes to one worker chosen by the policy."""

    __slots__ = ("body", "forwarder", "headers", "key", "method", "path", "ticket")

    def __init__(
        self,
        forwarder: Forwarder,
        method: bytes,
        path: bytes,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        key: RouteKey,
    ) -> None:
        self.forwarder = forwarder
        self.method = method
        self.path = path
        self.body = body
        self.headers = headers
        self.key = key
        self.ticket: Ticket | None = None

    def pick(self, attempts: RetryAttempts) -> Sequence[Worker] | None:
        fw = self.forwarder
        candidates = attempts.candidates(fw.registry.routable(), key=_url)
        worker = fw.choose(candidates, self.key) if candidates else None
        if worker is None:
            return None
        attempts.record(worker.url)
        note_attempt(fw.policy, candidates, self.key, worker)  # [observability]
        self.ticket = fw.policy.begin_attempt(worker)  # [policy feedback]
        return (worker,)

    def unavailable(self) -> str:
        return "no healthy worker available to serve the request"

    async def attempt(self, workers: Sequence[Worker], deadline: float, finish: Finish) -> Reply:
        fw = self.forwarder
        ticket = self.ticket
        if ticket is None:
            head = await fw.open(
                workers[0], self.method, self.path, self.body, self.headers, deadline
            )
            return await fw.deliver(head, deadline, finish)
        try:  # [policy feedback] an attempt that fails before its answer ends its ticket
            head = await fw.open(
                workers[0], self.method, self.path, self.body, self.headers, deadline
            )
            head.ticket = ticket
            return await fw.deliver(head, deadline, finish)
        except BaseException:
            ticket.done(False, b"")
            raise


def _release_probes(workers: Sequence[Worker]) -> None:
    """The request ended with no verdict (client gone): free any half-open probe slot."""
    for worker in workers:
        worker.breaker.release()
