"""The lean server path for inference requests: from the parser straight to the forwarder.

Why: under load most of a request's CPU went to the framework, not to routing
(``benchmarks/PROFILE.md``): uvicorn's ASGI scope and message dicts, eight Starlette layers
(middleware, routing, ``request_response``), ``Request`` objects, and for streams
``StreamingResponse``'s anyio task group plus one ``send()`` wrapper chain and one socket
write per event. The inference POSTs need none of it: their route is known from the request
line, their body is read once, and their answer is one status line, a few headers and either
one body or a relayed stream.

How: :class:`~sglctl.router.http_server.LimitedHttpToolsProtocol` recognises ``POST`` to an
inference path (exact path, HTTP/1.1) in ``on_headers_complete`` and creates a
:class:`LeanCycle` instead of uvicorn's ``RequestResponseCycle``. The cycle has the
attributes the protocol and uvicorn's connection code use (``body``, ``more_body``,
``message_event``, ``keep_alive``, ``disconnected``, ``response_started``,
``response_complete``, ``run_asgi``), so pipelining, keep-alive, graceful shutdown and the
header/body limits and timeouts of :mod:`~sglctl.router.http_server` apply unchanged. A
body that arrived with its head (nearly always) is served from the protocol's callbacks, no
task at all (:meth:`LeanCycle.start_whole`, :mod:`~sglctl.router.direct`), as long as nothing
has to wait; otherwise the cycle's task reads the body, runs
:func:`~sglctl.router.inference.admit_and_forward` (the same parse, admission, headers and
forwarder as the Starlette route) and writes the answer to the transport itself:

- a whole answer: status line, headers and body in **one write**;
- a stream: the head, then each chunk in chunked encoding; chunks that are ready in the same
  event-loop turn (and the head with the first chunk) are **joined into one write** (a write
  is scheduled with ``call_soon`` and flushed at the turn's end, or at once at the end of the
  stream); when the transport asks to pause, the relay waits for it to drain, so a slow client
  pushes back on the worker connection (:mod:`~sglctl.router.upstream_native` stops reading
  at 1 MiB buffered);
- a client that disconnects cancels the request's task at once (the protocol sets
  ``disconnected``): the upstream request is closed and its load and admission slots freed,
  as the Starlette path's ``DisconnectWatcher`` and ``StreamingResponse`` do, but with a
  callback instead of a second task.

Everything else (admin, info, errors for other methods or paths) still goes through the
Starlette app. With ``--cors-allowed-origins`` or in PD mode the lean path is off
(:func:`enabled_for`): CORS headers come from Starlette's middleware, and PD's pairing lives
on the Starlette route.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from sglctl.router import direct, inference
from sglctl.router.admission import AdmissionRejected
from sglctl.router.errors import RouterError, error_body
from sglctl.router.proxy import Finish
from sglctl.router.request import OFF_LOOP_BYTES
from sglctl.router.responses import Reply
from sglctl.router.router import Router
from sglctl.router.upstream_native import UpstreamPool

log = logging.getLogger(__name__)

#: Raw request paths served by the lean path (the Starlette route table has the same ones).
ROUTES: dict[bytes, str] = {
    p.encode(): p for p in (*inference.KEYED_ROUTES, *inference.UNKEYED_ROUTES)
}
_CLOSE = b"connection: close\r\n"
_CHUNKED = b"transfer-encoding: chunked\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def enabled_for(config: Any) -> bool:
    """Whether a router with ``config`` serves inference on the lean path (module docstring)."""
    return not config.cors_allowed_origins and not config.is_pd


class FastPath:
    """What every lean request needs from its process: the router, cached header bytes."""

    routes = ROUTES
    #: Whole bodies that arrived with their head take the callback path (direct.py); False
    #: sends every lean request down the task path (tests compare the two).
    callback_path = True

    def __init__(self, router: Router) -> None:
        self.router = router
        self._defaults: list[tuple[bytes, bytes]] | None = None
        self._defaults_bytes = b""

    def default_headers(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        """uvicorn's default headers (``date``) as bytes, rebuilt when uvicorn renews them.

        uvicorn replaces the list once a second (the date changes), so an identity check
        tells whether the cached bytes are still right.
        """
        if headers is not self._defaults:
            self._defaults = headers
            self._defaults_bytes = b"".join(b"%s: %s\r\n" % (n, v) for n, v in headers)
        return self._defaults_bytes

    def cycle(
        self,
        protocol: Any,
        route: str,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        expect_100_continue: bool,
    ) -> LeanCycle:
        """The cycle for one lean request (the protocol calls this at the end of the head)."""
        return LeanCycle(protocol, self, route, query, headers, keep_alive, expect_100_continue)


class _ClientGone(Exception):
    """The client hung up (or the body timed out) before the request was read."""


def _noop() -> None:
    pass


class _Signal:
    """``asyncio.Event``'s ``set``/``clear``/``wait`` for one waiter, at a fraction of its cost.

    Every lean request has one (the protocol sets it when body bytes or the body's end
    arrive), but nearly every body arrives with its head, so nobody ever waits: the future
    is only made when someone does. An ``asyncio.Event`` (a deque, a loop lookup) per
    request was measurable.
    """

    __slots__ = ("_flag", "_waiter")

    def __init__(self) -> None:
        self._flag = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._flag = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    async def wait(self) -> None:
        if self._flag:
            return
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None


class LeanCycle:
    """One inference request on the lean path; duck-types uvicorn's ``RequestResponseCycle``."""

    __slots__ = (
        "_disconnected",
        "_event",
        "_flush_handle",
        "_pending",
        "body",
        "direct",
        "fast",
        "flow",
        "headers",
        "keep_alive",
        "more_body",
        "on_response",
        "protocol",
        "query",
        "response_complete",
        "response_started",
        "route",
        "task",
        "transport",
        "waiting_for_100_continue",
    )

    def __init__(
        self,
        protocol: Any,
        fast: FastPath,
        route: str,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        expect_100_continue: bool,
    ) -> None:
        self.protocol = protocol
        self.transport: asyncio.Transport = protocol.transport
        self.flow: FlowControl = protocol.flow
        self.fast = fast
        self.route = route
        self.query = query
        self.headers = headers
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = expect_100_continue
        self.on_response = protocol.on_response_complete
        #: Made only when someone waits for body bytes (:attr:`message_event`): the body
        #: nearly always arrives with its head, and then nobody does.
        self._event: _Signal | None = None
        # Request state (the protocol's on_body / on_message_complete fill these).
        self.body = bytearray()
        self.more_body = True
        # Response state.
        self.response_started = False
        self.response_complete = False
        self._disconnected = False
        #: The request's task (set by the protocol when it creates it).
        self.task: asyncio.Task[Any] | None = None
        self._pending: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        #: The worker attempt of a callback-driven request while it waits (direct.py).
        self.direct: direct.WholeAttempt | None = None

    # -- what the protocol calls -----------------------------------------------------------
    @property
    def message_event(self) -> _Signal:
        """uvicorn's ``message_event`` (set when body bytes or the body's end arrive), made
        on first use. A fresh one starts clear: that is right, since the waiter checks
        ``body`` and ``more_body`` in the same step before it waits (:meth:`_read_body`)."""
        event = self._event
        if event is None:
            event = self._event = _Signal()
        return event

    def wake(self) -> None:
        """Body bytes or the body's end arrived: wake the reader if one waits (the protocol's
        ``on_body`` / ``on_message_complete``)."""
        event = self._event
        if event is not None:
            event.set()

    @property
    def disconnected(self) -> bool:
        return self._disconnected

    @disconnected.setter
    def disconnected(self, value: bool) -> None:
        """The protocol saw the client go (or refused its body): stop this request now."""
        self._disconnected = value
        if not value or self.response_complete:
            return
        attempt = self.direct
        if attempt is not None:  # on the callback path: no task to cancel
            attempt.abort()
        task = self.task
        if task is not None and not task.done():
            task.cancel()

    async def run_asgi(self, app: object) -> None:
        """The request's task (uvicorn's name: the protocol starts and pipelines it)."""
        if self.task is None:
            self.task = asyncio.current_task()
        try:
            if self._disconnected:  # gone before the task ran
                return
            await self._serve()
        finally:
            self.on_response = _noop

    # -- the request -----------------------------------------------------------------------
    async def _serve(self) -> None:
        router = self.fast.router
        finish = inference.begin(router, self.route)
        try:
            body = await self._read_body(router.config.max_payload_size)
            response = await inference.admit_and_forward(
                router, self.route, self.query, body, self.headers, finish
            )
        except BaseException as exc:
            if self._answer_failure(exc, finish):
                raise
            return
        iterator = getattr(response, "body_iterator", None)  # here, not in a helper: one
        if iterator is None:  # coroutine fewer in every resumption of a relayed stream
            self.write_whole(response.status_code, response.raw_headers, response.body)
        else:
            await self._stream(response.status_code, response.raw_headers, iterator)

    def _answer_failure(self, exc: BaseException, finish: Finish) -> bool:
        """Answer (and record) a request that failed before its answer; True to re-raise."""
        if isinstance(exc, RouterError):
            finish(exc.status, False)
            self.write_error(exc)
        elif isinstance(exc, AdmissionRejected):
            finish(429, False)
            self.write_error(inference.rejected(exc))
        elif isinstance(exc, _ClientGone):
            finish(inference.CLIENT_CLOSED, False)
        elif isinstance(exc, asyncio.CancelledError):
            finish(inference.CLIENT_CLOSED, False)
            return not self._absorb_cancel()
        elif isinstance(exc, Exception):
            finish(500, False)
            log.error("unexpected error on POST %s", self.route, exc_info=exc)
            self.write_error(RouterError(500, f"internal router error: {type(exc).__name__}"))
        else:
            return True
        return False

    # -- the callback path (direct.py) ---------------------------------------------------
    def start_whole(self) -> None:
        """The whole body is in (the protocol's ``on_message_complete``): serve it from
        this callback (direct.py) when that is possible, else start the task path."""
        fast = self.fast
        forwarder = fast.router.forwarder
        if (
            not fast.callback_path
            or len(self.body) > OFF_LOOP_BYTES
            or self._disconnected
            or forwarder is None
            or type(forwarder.upstream) is not UpstreamPool  # direct.available(), inlined
        ):
            self.protocol._start_asgi_task(self, None)
            return
        ctx = contextvars.copy_context()
        ctx.run(self._serve_whole, ctx)

    def _serve_whole(self, ctx: contextvars.Context) -> None:
        router = self.fast.router
        started = time.perf_counter()
        route = self.route
        try:
            # The whole body is here, and llhttp held it to its Content-Length: its own
            # length is the check (no scan of the headers for the declared one).
            body = bytes(self.body)
            self.body = bytearray()
            limit = router.config.max_payload_size
            if len(body) > limit:
                raise RouterError(413, f"request body exceeds the limit of {limit} bytes")
            parsed, priority = inference.checked(router, route, body)
            admission = router.admission
            fw = router.forwarder
            if (
                parsed.stream
                or (fw is not None and fw.policy.miss_delays and fw.miss_delay(parsed.key) > 0)
                or not admission.try_acquire()
            ):
                # A stream, a miss to place later (router replicas), or a queue to wait in:
                # the task path from here.
                finish = inference.begin(router, route, started)
                self.spawn(
                    finish,
                    inference.admitted_forward(
                        router, route, self.query, body, parsed, priority, self.headers, finish
                    ),
                    ctx,
                )
                return
            headers = inference.forward_headers(self.headers, router.forwarded_headers)
            direct.start(
                self,
                router,
                inference.target_of(route, self.query),
                body,
                headers,
                parsed.key,
                started,
                admission.enabled,
                ctx,
            )
        except RouterError as exc:
            finish = inference.begin(router, route, started)
            self._answer_failure(exc, finish)
        except Exception as exc:  # a bug: answered (500) and logged as on the task path
            self._answer_failure(exc, inference.begin(router, route, started))

    def spawn(
        self,
        finish: Finish,
        reply: Coroutine[Any, Any, Reply],
        ctx: contextvars.Context,
        cleanup: Callable[[], None] | None = None,
    ) -> None:
        """Continue this request in a task on the task path: ``reply`` gives its answer.

        A task cancelled before its first step (the client left at once) never runs its
        coroutine, hence no ``finally`` of it: ``cleanup`` then frees what the callback path
        handed over, and the request is recorded as 499.
        """
        protocol = self.protocol
        task = protocol.loop.create_task(self._continue(finish, reply), context=ctx)
        self.task = task

        def done(task: asyncio.Task[None]) -> None:
            protocol.tasks.discard(task)
            if task.cancelled():
                reply.close()  # never awaited: no warning about it
                if cleanup is not None:
                    cleanup()
                finish(inference.CLIENT_CLOSED, False)

        task.add_done_callback(done)
        protocol.tasks.add(task)

    async def _continue(self, finish: Finish, reply: Coroutine[Any, Any, Reply]) -> None:
        try:
            try:
                response = await reply
            except BaseException as exc:
                if self._answer_failure(exc, finish):
                    raise
                return
            iterator = getattr(response, "body_iterator", None)  # here, not in a helper: one
            if iterator is None:  # coroutine fewer in every resumption of a relayed stream
                self.write_whole(response.status_code, response.raw_headers, response.body)
            else:
                await self._stream(response.status_code, response.raw_headers, iterator)
        finally:
            self.on_response = _noop

    def _absorb_cancel(self) -> bool:
        """On CancelledError: True when the cancel was ours (the client left), to swallow."""
        if not self._disconnected or self.task is None:
            return False
        uncancel = getattr(self.task, "uncancel", None)  # Python >= 3.11
        return not (uncancel is not None and uncancel() > 0)

    def _check_declared(self, limit: int) -> None:
        """400 for an unreadable Content-Length, 413 for one above ``limit``."""
        declared = None
        for name, value in self.headers:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise RouterError(400, "invalid Content-Length header") from None
        if declared is not None and declared > limit:
            raise RouterError(
                413, f"request body of {declared} bytes exceeds the limit of {limit} bytes"
            )

    async def _read_body(self, limit: int) -> bytes:
        """The body under ``limit`` (413), as :func:`~sglctl.router.request.read_body`."""
        self._check_declared(limit)
        if self.waiting_for_100_continue and self.more_body:
            self.waiting_for_100_continue = False
            if not self.transport.is_closing():
                self.transport.write(_CONTINUE)
        chunks: list[bytes] = []
        size = 0
        event = self.message_event
        while True:
            if self._disconnected:
                raise _ClientGone
            if self.body:
                part = bytes(self.body)
                self.body = bytearray()
                size += len(part)
                if size > limit:
                    raise RouterError(413, f"request body exceeds the limit of {limit} bytes")
                chunks.append(part)
            if not self.more_body:
                break
            self.flow.resume_reading()
            self.protocol.body_wait()  # the body clocks of http_server.py start now
            await event.wait()
            event.clear()
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    # -- writing ---------------------------------------------------------------------------
    def _head(self, status: int, raw_headers: list[tuple[bytes, bytes]]) -> list[bytes]:
        self.response_started = True
        self.waiting_for_100_continue = False
        parts = [
            STATUS_LINE[status],
            self.fast.default_headers(self.protocol.server_state.default_headers),
        ]
        for name, value in raw_headers:
            parts.append(b"%s: %s\r\n" % (name, value))
        if not self.keep_alive:
            parts.append(_CLOSE)
        return parts

    def _complete(self) -> None:
        self.response_complete = True
        if not self.keep_alive:
            self.transport.close()
        self.on_response()  # the protocol: next pipelined request or keep-alive timer

    def write_whole(
        self, status: int, raw_headers: list[tuple[bytes, bytes]], body: bytes | memoryview
    ) -> None:
        if self._disconnected:
            return
        parts = self._head(status, raw_headers)
        parts.append(b"\r\n")
        parts.append(bytes(body))  # the same object when it is bytes already
        self.transport.write(b"".join(parts))
        self._complete()

    def write_formatted(self, status: int, lines: bytes, body: bytes) -> None:
        """:meth:`write_whole` with the header lines already formatted (``name: value\\r\\n``
        each, no blank line): the callback path builds them in one pass over the worker's
        headers (direct.py), without a list of pairs to format again here."""
        if self._disconnected:
            return
        self.response_started = True
        self.waiting_for_100_continue = False
        head = STATUS_LINE[status] + self.fast.default_headers(
            self.protocol.server_state.default_headers
        )
        if self.keep_alive:
            self.transport.write(b"".join((head, lines, b"\r\n", body)))
        else:
            self.transport.write(b"".join((head, lines, _CLOSE, b"\r\n", body)))
        self._complete()

    def write_error(self, exc: RouterError) -> None:
        body = error_body(exc.status, exc.message, exc.error_type)
        headers = [
            (b"content-length", b"%d" % len(body)),
            (b"content-type", b"application/json"),
        ]
        for name, value in exc.headers.items():
            headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
        self.write_whole(exc.status, headers, body)

    def _flush(self) -> None:
        self._flush_handle = None
        pending = self._pending
        if pending:
            data = b"".join(pending)
            pending.clear()
            if not self.transport.is_closing():
                self.transport.write(data)

    async def _stream(
        self, status: int, raw_headers: list[tuple[bytes, bytes]], iterator: Any
    ) -> None:
        """Relay ``iterator``'s chunks in chunked encoding (module docstring: joining, flow)."""
        # No early return when the client is already gone: the relay's ``finally`` (worker
        # slot, in-flight watch, upstream connection) only runs once it has started, so the
        # loop below starts it and leaves at the first piece.
        pending = self._pending
        pending.extend(self._head(status, raw_headers))
        pending.append(_CHUNKED)
        loop = self.protocol.loop
        self._flush_handle = loop.call_soon(self._flush)
        flow = self.flow
        try:
            async for chunk in iterator:
                if not chunk:
                    continue
                if isinstance(chunk, str):
                    chunk = chunk.encode("utf-8")
                pending.append(b"%x\r\n" % len(chunk))
                pending.append(chunk)
                pending.append(b"\r\n")
                if self._flush_handle is None:
                    self._flush_handle = loop.call_soon(self._flush)
                if flow.write_paused or len(pending) > 3 * 64:
                    self._flush_now()
                    if flow.write_paused:
                        await flow.drain()
                if self._disconnected:
                    break
        except asyncio.CancelledError:
            self._drop_pending()
            if self._absorb_cancel():
                return
            raise
        except Exception:
            self._drop_pending()
            log.exception("stream of POST %s failed after it started", self.route)
            self.transport.close()
            return
        finally:
            await iterator.aclose()  # no-op when it ran to its end
        if self._disconnected:
            self._drop_pending()
            return
        pending.append(_LAST_CHUNK)
        self._flush_now()
        self._complete()

    def _flush_now(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush()

    def _drop_pending(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._pending.clear()

    # -- body bytes from the protocol ------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """A piece of the request body (the protocol's ``on_body``)."""
        if self.response_complete:
            return  # answered already (413): the rest is read and dropped
        self.body += data
        if len(self.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        self.wake()
