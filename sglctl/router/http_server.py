"""The router's HTTP/1.1 connection handling under hostile or broken clients.

uvicorn's httptools protocol parses requests well but puts no bound on what a client may do
before the application sees a request: llhttp has no header-size limit and httptools joins a
header's pieces in memory, so one 64 MiB header was accepted and 4 connections holding 128 MiB
unfinished headers took the router to 672 MB RSS; a silent connection, a half-sent header, a
body trickled at 1 KB/s, a chunked body that never ends or a short Content-Length each held a
connection (and its buffers) forever. :class:`LimitedHttpToolsProtocol` adds, per connection:

- **Head size and count** (431, like the Rust router at 100 headers / 1 MiB): bytes are fed to
  the parser in slices that never take the unfinished head past ``max_header_bytes``, so memory
  per connection is bounded *before* httptools buffers anything; fields are counted in
  ``on_header``.
- **Head timeout** (408): from a connection's first moment, or a keep-alive connection's first
  byte of its next request, until the blank line ending the head. Idle keep-alive time is
  uvicorn's ``timeout_keep_alive``, untouched.
- **Body timeouts** (408): no body byte for ``body_idle_timeout``, or the body not complete
  ``body_timeout`` after the application started waiting for it (a 1 KB/s trickle passes the
  idle check for ever, so both are needed). One timer per connection, re-armed on expiry, so
  a body chunk costs a float store, not a timer.
- **Out of file descriptors** (503): uvloop (libuv) answers EMFILE at ``accept()`` by accepting
  and closing the connection with nothing logged, so a client sees a bare EOF. A connection
  whose descriptor lands in the last :data:`FD_RESERVE` of the soft limit (the kernel hands out
  the lowest free number, so the fd number is a lower bound of the fds in use) gets a 503 with
  a JSON error and ``Retry-After``, and the router logs it once a second at most; the reserve
  keeps descriptors for the worker connections of the requests in flight.

Errors are OpenAI-style JSON with ``Connection: close``; the connection then half-closes and
reads (and drops) what the client is still sending, up to :data:`LINGER_SECS` and
:data:`LINGER_BYTES`, so a client that is still sending its header reads the 431 instead of a
connection reset. The fd-limit 503 closes at once instead: that descriptor is what is short.
A limit hit while an earlier pipelined response is still being written does not interleave:
the connection stops reading and closes after that response. Keep-alive, pipelining and
streaming are uvicorn's. Inference POSTs skip ASGI and Starlette when :func:`protocol_class`
is given a :class:`~sglctl.router.fastpath.FastPath` (that module says how); these limits
apply to them the same way, since their cycle has the attributes used here. A lean request
starts in ``on_message_complete`` when its whole body came in the same read (then it is
served from callbacks, :mod:`~sglctl.router.direct`), else at the end of the read.

:func:`raise_fd_limit` (soft RLIMIT_NOFILE to the hard limit) and :func:`log_accept_errors`
(asyncio's own EMFILE report, when running without uvloop) are the process-wide half.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from sglctl.router.errors import error_body

if TYPE_CHECKING:
    from sglctl.router.fastpath import FastPath

log = logging.getLogger(__name__)

#: A refused connection drains the client's bytes for this long, or this many, then closes.
LINGER_SECS = 2.0
LINGER_BYTES = 1 << 20
#: Descriptors kept free for the worker-side connections of requests in flight.
FD_RESERVE = 32

_ERROR_TYPES = {
    400: "invalid_request_error",
    408: "request_timeout",
    431: "request_header_fields_too_large",
    503: "service_unavailable",
}


@dataclass(frozen=True)
class HttpLimits:
    """Per-connection limits of the router's HTTP server (0 disables a timeout)."""

    max_header_bytes: int = 65_536
    max_headers: int = 100
    header_timeout_secs: float = 10.0
    body_idle_timeout_secs: float = 10.0
    body_timeout_secs: float = 60.0


def limits_of(config: Any) -> HttpLimits:
    """The limits a :class:`~sglctl.router.config.RouterConfig` asks for (its flags)."""
    return HttpLimits(
        max_header_bytes=config.max_request_header_bytes,
        max_headers=config.max_request_headers,
        header_timeout_secs=config.request_header_timeout_secs,
        body_idle_timeout_secs=config.request_body_idle_timeout_secs,
        body_timeout_secs=config.request_body_timeout_secs,
    )


class RateLimitedLog:
    """Log at most one line a second per kind; the next line says how many were dropped.

    A flood of hostile connections must not become a flood of log lines, but the first one of
    each kind is what the operator needs to see.
    """

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def __call__(self, level: int, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self.interval) < self.interval:
            self._dropped[kind] = self._dropped.get(kind, 0) + 1
            return
        self._last[kind] = now
        dropped = self._dropped.pop(kind, 0)
        if dropped:
            msg += f" (and {dropped} more like it since the last such line)"
        self.logger.log(level, msg, *args)


rate_limited = RateLimitedLog(log)


class _TooManyHeaders(Exception):
    """Raised from ``on_header`` to stop the parser; it surfaces as ``HttpParserCallbackError``."""


def _fd_soft_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, log both; the soft limit now in force.

    Each client connection costs the router two descriptors (client and worker side); the
    usual soft default of 1024 caps it near 500 concurrent requests.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # Linux refuses an infinite soft limit
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = max(soft, 1_048_576)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("file descriptor limit: soft %d -> %d (hard %s)", soft, target, hard)
            return target
        except (OSError, ValueError) as exc:
            log.warning(
                "file descriptor limit: soft %d, hard %s; could not raise the soft limit (%s)",
                soft,
                hard,
                exc,
            )
            return soft
    log.info("file descriptor limit: soft %s, hard %s", soft, hard)
    return soft


def log_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log asyncio's "accept() out of system resource" (EMFILE/ENFILE) once a second at most.

    asyncio stops accepting for a second and reports each failure to the loop's exception
    handler, which would print a traceback per attempt; uvloop reports nothing (see the
    module docstring for what covers it).
    """
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "out of system resource" in str(context.get("message", "")):
            rate_limited(
                logging.ERROR,
                "accept",
                "cannot accept connections: %s (soft fd limit %d); raise `ulimit -n` or lower "
                "the client concurrency",
                context.get("exception"),
                _fd_soft_limit(),
            )
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def protocol_class(limits: HttpLimits, fast: FastPath | None = None) -> type[asyncio.Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` that enforces ``limits``.

    With ``fast``, inference POSTs take the lean path of :mod:`~sglctl.router.fastpath`.
    """
    fd_ceiling = _fd_soft_limit() - FD_RESERVE

    class _Bound(LimitedHttpToolsProtocol):
        pass

    _Bound.limits = limits
    _Bound.fd_ceiling = fd_ceiling
    _Bound.fast = fast
    return _Bound


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of :class:`HttpLimits` (module docstring)."""

    limits = HttpLimits()
    fd_ceiling = 1 << 30
    #: Set by :func:`protocol_class`: inference POSTs skip ASGI and Starlette (fastpath.py).
    fast: FastPath | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # between requests, or inside a request line / headers
        self._head_bytes = 0
        self._header_count = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_started = 0.0
        self._body_last = 0.0
        self._linger_timer: asyncio.TimerHandle | None = None
        self._discarding = False  # refused: drop whatever else the client sends
        self._lingered = 0
        self._lean = False  # the request being parsed is on the lean path
        #: A lean request whose head is in and whose body may still come in this read: it
        #: starts in on_message_complete (callback path) or at the end of the read (a task).
        self._lean_pending: Any = None
        self._at_boundary = True  # the last byte read ended a request (or none came yet)
        self._idle_since: float | None = None  # when the last response ended, if no byte since

    # -- connection lifecycle ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        if fd >= self.fd_ceiling:
            rate_limited(
                logging.ERROR,
                "fd",
                "refusing connections with 503: descriptor %d is within %d of the soft fd limit "
                "%d; raise `ulimit -n` or lower the client concurrency",
                fd,
                FD_RESERVE,
                self.fd_ceiling + FD_RESERVE,
            )
            self._refuse(
                503,
                "the router is out of file descriptors; retry shortly",
                extra_headers=[(b"retry-after", b"1")],
            )
            self.transport.close()  # no lingering: this descriptor is what is short
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        timers = (self._head_timer, self._body_timer, self._linger_timer)
        for timer in (*timers, self.timeout_keep_alive_task):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self._linger_timer = None
        self.timeout_keep_alive_task = None
        super().connection_lost(exc)

    def eof_received(self) -> None:
        if self._discarding:  # the client has sent everything: close now, not after lingering
            self.transport.close()

    # -- reading ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                self.transport.close()
            return
        self._idle_since = None  # _unset_keepalive_if_required(), inlined: every request
        self._at_boundary = False
        try:
            self._feed(data)
        finally:
            if self._lean_pending is not None:
                # A lean request whose body did not arrive whole: its task reads the rest.
                cycle, self._lean_pending = self._lean_pending, None
                if not self._discarding and not cycle.disconnected:
                    self._start_asgi_task(cycle, None)
        if self._in_head and self._head_timer is None and not self._at_boundary:
            # Bytes of a request head that is not complete yet (the first bytes of the next
            # request on a keep-alive connection, or a pipelined one): its clock starts now.
            # Armed after the feed, not before: a head that arrives whole (nearly always)
            # then costs no timer at all.
            self._arm_head_timer()

    def _feed(self, data: bytes) -> None:
        """Feed ``data`` to the parser within the head-size limit (module docstring)."""
        limit = self.limits.max_header_bytes
        while data:
            if self._in_head:
                room = limit - self._head_bytes
                if room <= 0:
                    self._head_too_large(f"request headers exceed {limit} bytes")
                    return
                part, data = (data[:room], data[room:]) if len(data) > room else (data, b"")
                self._head_bytes += len(part)  # reset by on_headers_complete if the head ends
            else:
                part, data = data, b""
            try:
                self.parser.feed_data(part)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
                return
            except httptools.HttpParserError as exc:
                if self._header_count > self.limits.max_headers:
                    self._head_too_large(f"more than {self.limits.max_headers} request headers")
                else:
                    peer = self._peer()
                    rate_limited(logging.WARNING, "parse", "invalid request from %s: %s", peer, exc)
                    self._refuse(400, f"invalid HTTP request: {exc}")
                return
            if self._discarding or self.parser is None:
                return

    # -- parser callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        # uvicorn's, minus the ASGI scope: built in on_headers_complete, only for requests
        # that go to the Starlette app (a lean request never needs one).
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.scope = None  # type: ignore[assignment]
        self._lean = False
        self._at_boundary = False
        self._header_count = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            raise _TooManyHeaders
        # uvicorn's on_header, inlined (called for every header of every request).
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        fast = self.fast
        if fast is not None and self._start_lean(fast):
            return
        self.scope = self._asgi_scope()  # type: ignore[assignment]
        super().on_headers_complete()

    def _start_lean(self, fast: FastPath) -> bool:
        """Start (or queue) a lean request if this is one (fastpath.py); False if not.

        Lean: ``POST`` over HTTP/1.1 to an inference path spelled exactly (no ``%``
        escapes, no absolute form), no upgrade, no uvicorn concurrency limit in force.
        """
        parser = self.parser
        if (
            parser.get_method() != b"POST"
            or parser.get_http_version() != "1.1"
            or parser.should_upgrade()
            or self.limit_concurrency is not None
        ):
            return False
        path, _, query = self.url.partition(b"?")
        route = fast.routes.get(path)
        if route is None:
            return False
        self._lean = True
        cycle = fast.cycle(
            self, route, query, self.headers, parser.should_keep_alive(), self.expect_100_continue
        )
        existing = self.cycle
        self.cycle = cycle  # type: ignore[assignment]
        if existing is None or existing.response_complete:
            self._lean_pending = cycle  # started when its body is in (on_message_complete)
        else:  # pipelined behind a response still going out: uvicorn's queue
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, None))  # type: ignore[arg-type]
        return True

    def _asgi_scope(self) -> dict[str, Any]:
        """The ASGI scope uvicorn's ``on_message_begin`` builds (path etc. are added later)."""
        return {
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": self.root_path,
            "headers": self.headers,
            "state": self.app_state.copy(),
        }

    def on_body(self, body: bytes) -> None:
        self._body_last = self.loop.time()
        if self._lean:
            self.cycle.feed(body)  # type: ignore[attr-defined]
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if self._lean:
            if not cycle.response_complete:
                cycle.more_body = False
                cycle.wake()  # type: ignore[attr-defined]
        else:
            super().on_message_complete()
        self._in_head = True
        self._at_boundary = True
        self._head_bytes = 0
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if self._lean_pending is cycle and cycle is not None:
            # The whole body came with its head: served from here, no task (fastpath.py).
            self._lean_pending = None
            cycle.start_whole()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if app is None:  # a lean cycle: it calls body_wait() if it ever has to wait
            # uvicorn's task bookkeeping, one call shallower; the cycle learns its task here
            # (it cancels it when the client goes) instead of looking it up.
            task = self.loop.create_task(cycle.run_asgi(None))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)
            cycle.task = task
            return
        super()._start_asgi_task(cycle, app)
        # The application now waits for this body (a pipelined request's body is not read
        # while the one before it is answered, so its clock starts here, not at its head).
        # For a request without a body on_message_complete disarms this in the same feed.
        limits = self.limits
        if cycle.more_body and (limits.body_idle_timeout_secs or limits.body_timeout_secs):
            now = self.loop.time()
            self._body_started = self._body_last = now
            self._arm_body_timer(now)

    def body_wait(self) -> None:
        """A lean request waits for more of its body: start the body clocks (once).

        Started when the request really waits, not when its task starts: the body nearly
        always arrives with the head, and then no body timer is armed at all.
        """
        limits = self.limits
        timed = limits.body_idle_timeout_secs or limits.body_timeout_secs
        if timed and self._body_timer is None and not self._in_head:
            now = self.loop.time()
            self._body_started = self._body_last = now
            self._arm_body_timer(now)

    # -- keep-alive -------------------------------------------------------------------------

    def _unset_keepalive_if_required(self) -> None:
        """Bytes arrived: the connection is not idle. (uvicorn cancels its timer here.)

        uvicorn arms a keep-alive timer at the end of every response and cancels it at the
        next request's first bytes: two timer operations per request. Here the timer stays
        armed and checks, when it fires, whether the connection has been idle for the whole
        timeout (:meth:`_keep_alive_check`): at most one timer per timeout per connection.
        """
        self._idle_since = None

    def on_response_complete(self) -> None:
        # uvicorn's, with the keep-alive clock of _unset_keepalive_if_required.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        now = self.loop.time()
        self._idle_since = now
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_at(
                now + self.timeout_keep_alive, self._keep_alive_check
            )

    def _keep_alive_check(self) -> None:
        """Close the connection if it stayed idle ``timeout_keep_alive`` since its last answer."""
        self.timeout_keep_alive_task = None
        idle_since = self._idle_since
        if idle_since is None:
            return  # a request is under way: the end of its answer arms the clock again
        due = idle_since + self.timeout_keep_alive
        if self.loop.time() >= due:
            self.timeout_keep_alive_handler()
        else:
            self.timeout_keep_alive_task = self.loop.call_at(due, self._keep_alive_check)

    # -- timers -----------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        if self.limits.header_timeout_secs:
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout_secs, self._head_timed_out
            )

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._discarding or self.transport.is_closing():
            return
        rate_limited(
            logging.WARNING,
            "head-timeout",
            "closing connection from %s: request head not received within %g s "
            "(%d bytes so far; --request-header-timeout-secs)",
            self._peer(),
            self.limits.header_timeout_secs,
            self._head_bytes,
        )
        self._refuse(
            408,
            f"request headers not received within {self.limits.header_timeout_secs:g} s",
        )

    def _arm_body_timer(self, now: float) -> None:
        deadlines = []
        if self.limits.body_idle_timeout_secs:
            deadlines.append(self._body_last + self.limits.body_idle_timeout_secs)
        if self.limits.body_timeout_secs:
            deadlines.append(self._body_started + self.limits.body_timeout_secs)
        self._body_timer = self.loop.call_at(min(deadlines), self._check_body)

    def _check_body(self) -> None:
        self._body_timer = None
        if self._discarding or self.transport.is_closing() or self._in_head:
            return
        now = self.loop.time()
        if self.flow is not None and self.flow.read_paused:
            self._body_last = now  # we stopped reading, not the client: not idle
        idle, total = self.limits.body_idle_timeout_secs, self.limits.body_timeout_secs
        if idle and now - self._body_last >= idle:
            reason, flag = f"no request body bytes for {idle:g} s", "idle-timeout"
        elif total and now - self._body_started >= total:
            reason, flag = f"request body not complete within {total:g} s", "timeout"
        else:
            self._arm_body_timer(now)
            return
        rate_limited(
            logging.WARNING,
            "body-timeout",
            "closing connection from %s: %s (--request-body-%s-secs)",
            self._peer(),
            reason,
            flag,
        )
        self._refuse(408, reason)

    # -- refusing ---------------------------------------------------------------------------

    def _head_too_large(self, reason: str) -> None:
        rate_limited(
            logging.WARNING,
            "head-size",
            "refusing request from %s with 431: %s (--max-request-header-bytes / "
            "--max-request-headers)",
            self._peer(),
            reason,
        )
        self._refuse(431, f"{reason}; send fewer or smaller headers")

    def _refuse(
        self, status: int, message: str, extra_headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Answer ``status`` and close, unless another answer is already on the wire."""
        self._discarding = True
        cycle = self.cycle
        if self._in_head:
            if cycle is not None and not cycle.response_complete:
                # An earlier (pipelined) response is still going out: let it finish, then the
                # connection closes; the refused request gets no answer of its own.
                cycle.keep_alive = False
                self.flow.pause_reading()
                return
        elif cycle is not None:
            if cycle.response_started:
                self.transport.close()  # the application answered already; cut the rest
                return
            # The application is waiting for this body: it sees a disconnect, we answer.
            cycle.disconnected = True
            cycle.message_event.set()
        self._write_error(status, message, extra_headers or [])
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger_timer = self.loop.call_later(LINGER_SECS, self.transport.close)

    def _write_error(
        self, status: int, message: str, extra_headers: list[tuple[bytes, bytes]]
    ) -> None:
        body = error_body(status, message, _ERROR_TYPES.get(status))
        content = [STATUS_LINE[status]]
        for name, value in [*self.server_state.default_headers, *extra_headers]:
            content += [name, b": ", value, b"\r\n"]
        content += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(content))

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "unknown client"
