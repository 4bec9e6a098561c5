"""The callback-driven whole answer: from the client's bytes to the worker and back, no task.

Why: at one connection nothing batches, and a whole request on the task path
(:mod:`~sglctl.router.fastpath`'s ``LeanCycle._serve``) paid for a task, its first step, a
chain of coroutines (``run`` → ``attempt`` → ``open`` → ``request``) resumed once when the
worker's answer came, plus every piece of book-keeping (metrics, retry counters, the load
slot, the in-flight watch, the policy's ticket) *before* the worker had the request or the
client its answer (``benchmarks/RESULTS.md``, "Critical path"). The floor proxy
(``benchmarks/floor_proxy.py``) shows what a Python proxy pays with plain callbacks.

How: when a lean request's whole body arrived with its head (nearly always), the protocol
calls ``LeanCycle.start_whole`` inside ``on_message_complete``; it parses, admits (a free
slot only: :meth:`~sglctl.router.admission.AdmissionController.try_acquire`), chooses the
worker (:meth:`~sglctl.router.proxy.Forwarder.choose`) and :func:`start` writes the request
on an idle keep-alive connection (:meth:`~sglctl.router.upstream_native.UpstreamPool.send_now`).
Only then are the metrics observation, the retry book-keeping, the load slot, the watch and
the policy's ticket made. A :class:`WholeAttempt` is the answer's sink: when the worker's
answer is complete (its ``on_message_complete``), the client's answer is written at once
and the book-keeping (load slot, watch, breaker, ticket with the ``cached_tokens`` tail,
metrics, admission slot) runs after that write.

Every rule of the task path holds, re-expressed for callbacks; whenever one needs to wait,
the request moves to a task on the task path, where it continues with the same attempt
book-keeping (:meth:`~sglctl.router.proxy.Forwarder.run`'s keyword arguments):

- a stream asked for (``"stream": true``), a body larger than
  :data:`~sglctl.router.request.OFF_LOOP_BYTES`, an admission queue to wait in, no idle
  connection to the chosen worker (connecting needs a task), the httpx client, https
  workers: the task path from where the request stands;
- a retryable status, a connection error, the deadline (504), an interruption by
  :mod:`~sglctl.router.inflight` (the watcher calls :meth:`WholeAttempt.cancel`, the
  ``Task.cancel`` it would call on a task), all before any byte reached the client: the
  worker is blamed (:meth:`~sglctl.router.proxy.Forwarder.settle`), and the retry runs in a
  task after its backoff, or the 502/504 is written at once;
- a reused connection that fails before any byte of answer (the worker closed it as we
  reused it): resent on a new connection, unblamed, as the upstream client does;
- the client going away (:meth:`WholeAttempt.abort`, from the cycle's ``disconnected``):
  the worker connection is closed (the worker learns its client is gone), the slots freed,
  the request recorded as 499;
- an event stream answering a request that did not ask for one: relayed from a task.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Coroutine
from time import monotonic
from typing import TYPE_CHECKING, Any, Protocol

from sglctl.router import inference
from sglctl.router.errors import RouterError
from sglctl.router.metrics import note_attempt  # [observability]
from sglctl.router.policies.base import RouteKey, Ticket
from sglctl.router.proxy import (
    PASS_RAW,
    TICKET_TAIL,
    WORKER_HEADER_RAW,
    AttemptFailure,
    Finish,
    Forwarder,
    Head,
    SinglePlan,
)
from sglctl.router.responses import Reply
from sglctl.router.retry import RetryAttempts, retryable_status
from sglctl.router.upstream import UpstreamError, UpstreamTimeout
from sglctl.router.upstream_native import NativeResponse, UpstreamPool

if TYPE_CHECKING:
    from sglctl.router.inflight import Watch
    from sglctl.router.router import Router
    from sglctl.router.workers import Worker

log = logging.getLogger(__name__)

_ERROR_TEXT_LIMIT = 300
_EVENT_STREAM = b"text/event-stream"


class Cycle(Protocol):
    """What this module needs of :class:`~sglctl.router.fastpath.LeanCycle` (which imports
    this module, so it is named by its shape here)."""

    route: str
    protocol: Any
    direct: WholeAttempt | None

    def write_whole(
        self, status: int, raw_headers: list[tuple[bytes, bytes]], body: bytes | memoryview
    ) -> None: ...

    def write_formatted(self, status: int, lines: bytes, body: bytes) -> None: ...

    def write_error(self, exc: RouterError) -> None: ...

    def spawn(
        self,
        finish: Finish,
        reply: Coroutine[Any, Any, Reply],
        ctx: contextvars.Context,
        cleanup: Callable[[], None] | None = None,
    ) -> None: ...


def available(router: Router) -> bool:
    """Whether ``router``'s hot path can be driven by callbacks (the native client)."""
    forwarder = router.forwarder
    return forwarder is not None and type(forwarder.upstream) is UpstreamPool


def start(
    cycle: Cycle,
    router: Router,
    target: str,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    key: RouteKey,
    started: float,
    admitted: bool,
    ctx: contextvars.Context,
) -> None:
    """Choose, write the request to the worker, then do the book-keeping (module docstring).

    ``admitted``: an admission slot was taken for this request (released by its finish).
    Runs inside ``ctx``, the request's own context (the metrics' current request).
    """
    fw = router.forwarder
    assert fw is not None, "router not started"
    pool: UpstreamPool = fw.upstream  # type: ignore[assignment]  # available() said so
    path = target.encode("latin-1")
    candidates = fw.registry.routable()
    try:
        worker = fw.choose(candidates, key) if candidates else None
    except Exception as exc:  # a bug in a policy: a 500, and the admission slot given back
        log.error("choosing a worker for POST %s failed", cycle.route, exc_info=exc)
        finish = _begin(router, cycle.route, started, admitted)
        _write_error(
            cycle, finish, RouterError(500, f"internal router error: {type(exc).__name__}")
        )
        return
    if worker is None:
        finish = _begin(router, cycle.route, started, admitted)
        plan = SinglePlan(fw, b"POST", path, body, headers, key)
        _write_error(cycle, finish, RouterError(503, plan.unavailable()))
        return
    loop = cycle.protocol.loop
    deadline = loop.time() + fw.request_timeout_secs
    attempt = WholeAttempt(cycle, fw, worker, path, body, headers, key, deadline, ctx)
    try:
        response = pool.send_now(worker.url, b"POST", path, headers, body, deadline, attempt, loop)
    except UpstreamError:  # an unusable URL: the task path reports it as the attempt's error
        response = None
    # -- the worker has the request: the book-keeping runs while it works ------------------
    finish = attempt.finish = _begin(router, cycle.route, started, admitted)
    if fw.budget is not None:
        fw.budget.record_request()
    note_attempt(fw.policy, candidates, key, worker)  # [observability]
    attempt.ticket = fw.policy.begin_attempt(worker)  # [policy feedback]
    if response is None:  # no idle connection: connecting needs a task
        attempt.resend()
        return
    attempt.response = response
    # interrupt() cancels through the attempt, as through a task
    watch = attempt.watch = fw.in_flight.watch(worker.url, attempt)  # type: ignore[arg-type]
    watch.reading = True
    attempt.release = worker.take_load_slot()
    cycle.direct = attempt


def _begin(router: Router, route: str, started: float, admitted: bool) -> Finish:
    finish = inference.begin(router, route, started)
    if admitted:
        admission = router.admission
        router.metrics.observe_queue_wait(0.0)  # admitted at once
        finish.add(lambda status, ok: admission.release())
    return finish


def _write_error(cycle: Cycle, finish: Finish, exc: RouterError) -> None:
    cycle.write_error(exc)
    finish(exc.status, False)


#: ``x-sglctl-worker: <url>\r\n`` per worker URL, formatted once (every answer names its
#: worker); bounded, as workers come and go.
_WORKER_LINES: dict[str, bytes] = {}


def _head_lines(url: str, response: NativeResponse, status: int, length: int) -> bytes:
    """The client's header lines for a whole answer, formatted in one pass: the worker's
    name, the passed headers (:func:`~sglctl.router.proxy.answer_headers`'s rule: the first
    of each passed name), the framing header (:func:`~sglctl.router.responses.whole_headers`'s
    rule). The same headers, in the same order, as the task path's answer."""
    line = _WORKER_LINES.get(url)
    if line is None:
        if len(_WORKER_LINES) > 4096:
            _WORKER_LINES.clear()
        line = _WORKER_LINES[url] = b"%s: %s\r\n" % (WORKER_HEADER_RAW, url.encode("latin-1"))
    lines = [line]
    seen: tuple[bytes, ...] = ()
    for name, value in response.raw_headers:
        if name in PASS_RAW and name not in seen:
            seen += (name,)
            lines += (name, b": ", value, b"\r\n")
    if status >= 200 and status != 204 and status != 304:
        lines.append(b"content-length: %d\r\n" % length)
    return b"".join(lines)


def _noop(status: int = 0, ok: bool = False) -> None:
    pass


#: A placeholder until start() sets the real one (one Finish fewer per request).
_UNSET = Finish()
_UNSET.done = True


class WholeAttempt:
    """One attempt of a request on the callback path: the sink of the worker's answer.

    Duck-types the two ``asyncio.Task`` methods :class:`~sglctl.router.inflight.Watch` uses
    (``done``, ``cancel``), so that ejecting the worker interrupts it like a task.
    """

    __slots__ = (
        "body",
        "closed",
        "ctx",
        "cycle",
        "deadline",
        "finish",
        "fw",
        "headers",
        "key",
        "path",
        "release",
        "response",
        "ticket",
        "watch",
        "worker",
    )

    def __init__(
        self,
        cycle: Cycle,
        fw: Forwarder,
        worker: Worker,
        path: bytes,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        key: RouteKey,
        deadline: float,
        ctx: contextvars.Context,
    ) -> None:
        self.cycle = cycle
        self.fw = fw
        self.worker = worker
        self.path = path
        self.body = body
        self.headers = headers
        self.key = key
        self.deadline = deadline
        self.ctx = ctx
        self.closed = False
        # Filled by start() right after the write (nothing can call back before it returns).
        self.finish: Finish = _UNSET
        self.ticket: Ticket | None = None
        self.response: NativeResponse | None = None
        self.watch: Watch | None = None
        self.release: Callable[[int, bool], None] = _noop

    # -- the worker's answer (upstream_native.ResponseSink) ---------------------------------
    def upstream_head(self, response: NativeResponse) -> None:
        if self.closed:
            return
        self.worker.last_byte = monotonic()  # stall detector: the response head arrived
        if retryable_status(response.status):
            return  # a retryable status is judged with its body, at the end
        for name, value in response.raw_headers:
            if name == b"content-type":
                if value.startswith(_EVENT_STREAM):
                    self._hand_over_stream(response)
                return

    def upstream_done(self, response: NativeResponse) -> None:
        if self.closed:
            return
        self.closed = True
        cycle, worker = self.cycle, self.worker
        cycle.direct = None
        status = response.status
        chunks = response.chunks
        content = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if retryable_status(status):
            detail = content[:_ERROR_TEXT_LIMIT].decode(errors="replace")
            message = f"{worker.url}: HTTP {status}" + (f": {detail}" if detail else "")
            self._failed(AttemptFailure(message, status=status, blamed=[worker]), status)
            return
        cycle.write_formatted(
            status, _head_lines(worker.url, response, status, len(content)), content
        )
        # -- the client has its answer: the rest is off the critical path -----------------
        # No reference cycle is left behind (response.sink <-> attempt.response, the watch's
        # task <-> attempt.watch): an attempt left in a cycle kept its ~30 objects (cycle,
        # context, observation, response, ...) for the garbage collector, whose young-
        # generation passes over them were ~9% of a whole request's instructions.
        response.sink = None
        self.response = None
        response.release()  # the connection goes back to the pool
        worker.last_byte = monotonic()  # stall detector: the answer arrived
        ok = status < 400
        self.release(status, True)
        self._unwatch()
        worker.breaker.record_success()
        ticket = self.ticket
        if ticket is not None:  # [policy feedback] the whole answer: first byte and end
            ticket.first_byte(False)
            ticket.done(ok, content[-TICKET_TAIL:])
        self.finish(status, ok)

    def upstream_failed(self, response: NativeResponse, error: UpstreamError) -> None:
        if self.closed:
            return
        worker = self.worker
        if not response.got_bytes and not isinstance(error, UpstreamTimeout):
            # The worker closed the idle connection as we reused it: send again on a new
            # connection (from a task: connecting waits), unblamed, as request() does.
            self.closed = True
            self.cycle.direct = None
            self._drop()
            self.resend()
            return
        timed_out = isinstance(error, UpstreamTimeout) and (
            self.cycle.protocol.loop.time() >= self.deadline
        )
        self._failed(AttemptFailure(f"{worker.url}: {error}", timed_out, blamed=[worker]), 0)

    # -- Task's methods for the in-flight watcher ------------------------------------------
    def done(self) -> bool:
        return self.closed

    def cancel(self, msg: object = None) -> bool:
        """The worker was ejected (:meth:`InFlightWatcher.interrupt`): fail over now."""
        if self.closed:
            return False
        watch = self.watch
        reason = watch.reason if watch is not None else "interrupted"
        self._failed(AttemptFailure(f"{self.worker.url}: {reason}", blamed=[self.worker]), 0)
        return True

    # -- the client ------------------------------------------------------------------------
    def abort(self) -> None:
        """The client went away: close the worker's request, free everything, record 499."""
        if self.closed:
            return
        self.closed = True
        self.cycle.direct = None
        self._drop()
        self.worker.breaker.release()  # no verdict on the worker
        self.finish(inference.CLIENT_CLOSED, False)

    def task_state(self) -> tuple[SinglePlan, RetryAttempts]:
        """The task path's plan and attempt book-keeping for this request, this attempt
        recorded. Made only when the request moves to a task: a request served here whole
        never needs them."""
        fw = self.fw
        plan = SinglePlan(fw, b"POST", self.path, self.body, self.headers, self.key)
        plan.ticket = self.ticket
        attempts = fw.retry.new_attempts()
        attempts.record(self.worker.url)
        return plan, attempts

    def resend(self) -> None:
        """This attempt again from a task (a new connection to the same worker: no retry)."""
        plan, attempts = self.task_state()
        finish = self.finish
        self.cycle.spawn(
            finish,
            self.fw.run(
                plan, finish, attempts=attempts, deadline=self.deadline, workers=(self.worker,)
            ),
            self.ctx,
            cleanup=self.unstarted,
        )

    def unstarted(self) -> None:
        """A continuation task that was cancelled before it ran (the client left at once):
        what the task path would have freed, the breaker's probe slot and the ticket."""
        self.worker.breaker.release()
        if self.ticket is not None:
            self.ticket.done(False, b"")

    def _abandon(self) -> None:
        self._drop()
        self.unstarted()

    # -- internals -------------------------------------------------------------------------
    def _unwatch(self) -> None:
        watch = self.watch
        if watch is not None:
            self.watch = None
            watch.reading = False
            watch.task = None  # the watch <-> attempt cycle: freed by refcount, not the GC
            self.fw.in_flight.unwatch(watch)

    def _drop(self, status: int = 0) -> None:
        """Close the worker's answer and free the load slot, the watch and the ticket."""
        response = self.response
        if response is not None:
            response.sink = None
            response.release()  # closes the connection unless the answer was complete
        self.release(status, False)
        self._unwatch()

    def _failed(self, failure: AttemptFailure, status: int) -> None:
        """A retryable failure before any byte reached the client: blame, then retry or answer."""
        self.closed = True
        cycle = self.cycle
        cycle.direct = None
        self._drop(status)
        ticket = self.ticket
        if ticket is not None:  # [policy feedback] an attempt that failed before its answer
            ticket.done(False, b"")
        plan, attempts = self.task_state()
        fw, finish = self.fw, self.finish
        try:
            last_error, backoff = fw.settle((self.worker,), failure, attempts, self.deadline)
        except RouterError as exc:
            _write_error(cycle, finish, exc)
            return
        cycle.spawn(
            finish,
            fw.run(
                plan,
                finish,
                attempts=attempts,
                deadline=self.deadline,
                last_error=last_error,
                backoff=backoff,
            ),
            self.ctx,
        )

    def _hand_over_stream(self, response: NativeResponse) -> None:
        """An event stream: the task path's relay takes the response, slot and watch."""
        self.closed = True
        self.cycle.direct = None
        response.sink = None  # from now on the response wakes a waiting task
        watch = self.watch
        assert watch is not None
        watch.reading = False
        head = Head(self.worker, response, self.release, watch, self.ticket)
        plan, attempts = self.task_state()
        self.cycle.spawn(
            self.finish,
            _deliver(self.fw, plan, head, attempts, self.deadline, self.finish),
            self.ctx,
            cleanup=self._abandon,
        )


async def _deliver(
    fw: Forwarder,
    plan: SinglePlan,
    head: Head,
    attempts: RetryAttempts,
    deadline: float,
    finish: Finish,
) -> Reply:
    """The task path from a head on (an event stream), with its retry if it was ejected."""
    try:
        return await fw.deliver(head, deadline, finish)
    except AttemptFailure as failure:
        if head.ticket is not None:
            head.ticket.done(False, b"")
        last_error, backoff = fw.settle((head.worker,), failure, attempts, deadline)
    return await fw.run(
        plan, finish, attempts=attempts, deadline=deadline, last_error=last_error, backoff=backoff
    )
