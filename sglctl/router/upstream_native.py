"""A lean HTTP/1.1 client for the router's hot path: keep-alive pools, httptools parsing.

Why not httpx here: the router forwards every inference request, and on this path httpx spent
more CPU than the router's own work -- mostly in httpcore's connection pool, which rescans
every pooled connection (quadratically: ``len([... for c in connections])`` inside a loop over
them) and polls each idle socket on every request, so the cost per request grows with the
concurrency. ``benchmarks/bench_router.py`` measures both clients in the same run (RESULTS.md,
"Router speed"). httpx is still used everywhere off the hot path (health checks, admin, info),
and ``--upstream-client httpx`` switches the hot path back to it
(:mod:`~sglctl.router.upstream_httpx`).

What this client does, and all it does:

- one idle-connection stack per worker origin (LIFO: the warmest connection first), no limit
  on connections (admission control is where concurrency is limited), idle connections
  dropped after ``keepalive_expiry`` seconds;
- requests are written as one buffer; responses parsed by httptools (llhttp, C), with
  Content-Length, chunked and close-delimited bodies;
- a body is either read whole (:meth:`NativeResponse.read`) or iterated as it arrives
  (``async for``; what arrived together comes out as one piece), with back-pressure:
  reading from the worker pauses while more than 1 MiB waits for a slow client;
- every wait has a deadline; closing a response before its end closes the connection, which
  is how the worker learns that the client went away;
- a request that fails on a *reused* connection before any byte of answer came back (the
  worker closed the idle connection at the same moment) is resent once on a new connection.

Errors are :class:`~sglctl.router.upstream.UpstreamError` (connection refused/reset/closed,
malformed answer: the worker did not serve the request) and its subclass ``UpstreamTimeout``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools

from sglctl.router.upstream import Upstream, UpstreamError, UpstreamResponse, UpstreamTimeout

_HIGH_WATER = 1 << 20
_LOW_WATER = 1 << 16


class ResponseSink(Protocol):
    """Who gets a callback-driven answer's events (:meth:`UpstreamPool.send_now`).

    Each is called from the worker connection's protocol callbacks, at most once for the
    head and once for the end or a failure; the sink may :meth:`NativeResponse.release` the
    response (or clear ``response.sink`` to hand it to a task) from any of them.
    """

    def upstream_head(self, response: NativeResponse) -> None:
        """Status and headers are in (``response.status``, ``response.raw_headers``)."""
        ...

    def upstream_done(self, response: NativeResponse) -> None:
        """The whole body is in ``response.chunks``."""
        ...

    def upstream_failed(self, response: NativeResponse, error: UpstreamError) -> None:
        """The connection failed, the answer was malformed, or the deadline passed."""
        ...


class _Origin:
    """A worker origin: where to connect and what to send as ``Host``."""

    __slots__ = ("host", "host_header", "idle", "lines", "port")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise UpstreamError(
                f"unsupported worker URL {url!r} (the native client speaks plain http)"
            )
        self.host = parts.hostname
        self.port = parts.port or 80
        self.host_header = parts.netloc.encode("latin-1")
        self.idle: deque[_Connection] = deque()
        self.lines: dict[tuple[bytes, bytes], bytes] = {}


class _Connection(asyncio.Protocol):
    """One TCP connection to a worker, carrying one request at a time."""

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.response: NativeResponse | None = None
        self.paused = False

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: the connection is unusable
            self.close()
            return
        response.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            response._fail(UpstreamError("worker tried to upgrade the connection"))
            self.close()
        except httptools.HttpParserError as exc:
            response._fail(UpstreamError(f"malformed response from worker: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is not None and not response.complete:
            if response.headers_done and not response.has_length:
                response._finish()  # a close-delimited body ends with the connection
            else:
                reason = f": {exc}" if exc else ""
                response._fail(UpstreamError(f"worker closed the connection{reason}"))

    def pause_writing(self) -> None:  # pragma: no cover - request bodies are small
        pass

    def resume_writing(self) -> None:  # pragma: no cover
        pass

    # -- httptools callbacks ---------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.raw_headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        response.status = self.parser.get_status_code()
        response.keep_alive = self.parser.should_keep_alive()
        for name, _ in response.raw_headers:  # a loop, not any(): no generator per answer
            if name == b"content-length" or name == b"transfer-encoding":
                response.has_length = True
                break
        response.headers_done = True
        response._head_done()

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None
        response.chunks.append(body)
        response.buffered += len(body)
        # Back-pressure for a reader that takes the body piece by piece; a callback-driven
        # answer (a sink) is taken whole at its end, and nobody would resume the reading.
        if (
            response.buffered > _HIGH_WATER
            and response.sink is None
            and not self.paused
            and self.transport is not None
        ):
            self.paused = True
            self.transport.pause_reading()
        if response._waiter is not None:  # a task waits (a callback-driven answer: nobody)
            response._wake()

    def on_message_complete(self) -> None:
        assert self.response is not None
        self.response._finish()

    # -- helpers ---------------------------------------------------------------------------
    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class NativeResponse:
    """A worker's answer: status and headers first, then the body, whole or streamed."""

    __slots__ = (
        "_conn",
        "_deadline",
        "_error",
        "_pool",
        "_released",
        "_timed_out",
        "_timing",
        "_waiter",
        "buffered",
        "chunks",
        "complete",
        "got_bytes",
        "has_length",
        "headers_done",
        "keep_alive",
        "raw_headers",
        "sink",
        "status",
    )

    def __init__(
        self,
        pool: UpstreamPool,
        conn: _Connection,
        deadline: float,
        sink: ResponseSink | None = None,
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._deadline = deadline
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.has_length = False
        self.keep_alive = False
        self.complete = False
        self.got_bytes = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timing = False  # registered with the pool's deadlines
        self._timed_out = False
        self._released = False
        #: Set for a callback-driven answer (:meth:`UpstreamPool.send_now`): the protocol's
        #: events go to it instead of waking a waiting task. Cleared to hand over to a task.
        self.sink = sink

    # -- for the protocol ------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _head_done(self) -> None:
        sink = self.sink
        if sink is not None:
            sink.upstream_head(self)
        else:
            self._wake()

    def _finish(self) -> None:
        self.complete = True
        sink = self.sink
        if sink is not None:
            sink.upstream_done(self)
        else:
            self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None and not self.complete:
            self._error = error
            sink = self.sink
            if sink is not None:
                sink.upstream_failed(self, error)
                return
        self._wake()

    async def _wait(self) -> None:
        """Wait for the protocol's next event, up to the request's deadline.

        The deadline is watched from the first wait to the release by the pool's
        :class:`_Deadlines` (one timer for every response), not by a timer per response: a
        timer armed and cancelled per request cost ~2-3 µs, more than a future.
        """
        loop = asyncio.get_running_loop()
        if not self._timing:
            if self._deadline - loop.time() <= 0:
                raise UpstreamTimeout("worker did not answer within the request timeout")
            self._timing = True
            self._pool._deadlines.add(self, loop)
        elif self._timed_out:
            raise UpstreamTimeout("worker did not answer within the request timeout")
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _expire(self) -> None:
        self._timed_out = True
        if self.sink is not None:
            self._fail(UpstreamTimeout("worker did not answer within the request timeout"))
            return
        waiter = self._waiter
        if waiter is not None:
            _expire(waiter)

    # -- for the caller --------------------------------------------------------------------
    def header(self, name: str) -> str | None:
        key = name.encode("latin-1")
        for n, v in self.raw_headers:
            if n == key:
                return v.decode("latin-1")
        return None

    async def wait_headers(self) -> None:
        while not self.headers_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read(self) -> bytes:
        """The whole body (then the connection goes back to the pool)."""
        while not self.complete:
            if self._error is not None:
                raise self._error
            self._conn.resume()
            await self._wait()
        body = b"".join(self.chunks)
        self.chunks.clear()
        self.release()
        return body

    def __aiter__(self) -> NativeResponse:
        return self

    async def __anext__(self) -> bytes:
        """The next piece of the body: everything that has arrived since the last one.

        Chunks that arrived together (several SSE events in one socket read, which is what a
        busy router gets) come out joined, so that the relay above pays its per-piece cost
        (bookkeeping, one write to the client) once per read, not once per event.
        """
        while True:
            chunks = self.chunks
            if chunks:
                if len(chunks) == 1:
                    chunk = chunks.popleft()
                else:
                    chunk = b"".join(chunks)
                    chunks.clear()
                self.buffered -= len(chunk)
                if self.buffered < _LOW_WATER:
                    self._conn.resume()
                return chunk
            if self.complete:
                self.release()
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            await self._wait()

    async def aclose(self) -> None:
        """Done with the answer: reuse the connection if it ended cleanly, else close it."""
        self.release()

    def release(self) -> None:
        """Done with the answer, synchronously (what :meth:`aclose` does; for the proxy)."""
        if self._released:
            return
        self._released = True
        if self._timing:
            self._pool._deadlines.waiting.discard(self)
        conn = self._conn
        conn.response = None
        if self.complete and self.keep_alive and not conn.closed and self._error is None:
            self._pool._put_idle(conn)
        else:
            conn.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("worker did not answer within the request timeout"))


class _Deadlines:
    """The deadlines of every response of a pool, watched by one timer.

    Responses register at their first wait and leave at release. The timer is armed for the
    earliest deadline; since every request of a router has the same timeout, a new deadline
    is nearly always later than the armed one, and a registration is a set insertion. When
    the timer fires, it expires what is due and re-arms for the earliest of the rest.
    """

    __slots__ = ("_at", "_loop", "_timer", "waiting")

    def __init__(self) -> None:
        self.waiting: set[NativeResponse] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._at = float("inf")
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, response: NativeResponse, loop: asyncio.AbstractEventLoop) -> None:
        self.waiting.add(response)
        if response._deadline < self._at or loop is not self._loop:
            self._arm(response._deadline, loop)

    def _arm(self, when: float, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._at, self._loop = when, loop
        self._timer = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        loop = self._loop
        self._timer, self._at = None, float("inf")
        if loop is None:  # pragma: no cover - armed means a loop
            return
        now = loop.time()
        earliest = float("inf")
        for response in list(self.waiting):
            if response._deadline <= now:
                self.waiting.discard(response)
                response._expire()
            elif response._deadline < earliest:
                earliest = response._deadline
        if earliest < float("inf"):
            self._arm(earliest, loop)


class UpstreamPool:
    """Keep-alive connections to every worker; see the module docstring."""

    def __init__(
        self,
        connect_timeout: float = 10.0,
        keepalive_expiry: float = 60.0,
        fallback: Upstream | None = None,
    ) -> None:
        """``fallback`` serves the worker URLs this client does not speak (https)."""
        self.connect_timeout = connect_timeout
        self.keepalive_expiry = keepalive_expiry
        self.fallback = fallback
        self._origins: dict[str, _Origin] = {}
        self._deadlines = _Deadlines()

    def _origin(self, base_url: str) -> _Origin:
        origin = self._origins.get(base_url)
        if origin is None:
            if len(self._origins) > 4096:  # workers come and go; never grow without bound
                self.close_all()
            origin = self._origins[base_url] = _Origin(base_url)
        return origin

    def _put_idle(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        conn.origin.idle.append(conn)

    def _take_idle(self, origin: _Origin) -> _Connection | None:
        now = time.monotonic()
        idle = origin.idle
        while idle:
            conn = idle.pop()
            # A transport can be closing before connection_lost() has marked the connection
            # closed (the worker was just killed): writing to it would raise, so skip it.
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                conn.closed = True
                continue
            if now - conn.idle_since > self.keepalive_expiry:
                conn.close()
                continue
            return conn
        return None

    async def _connect(self, origin: _Origin, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        timeout = min(self.connect_timeout, max(deadline - loop.time(), 0.001))
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(origin), origin.host, origin.port),
                timeout,
            )
        except (asyncio.TimeoutError, TimeoutError):
            raise UpstreamTimeout(f"connecting to {origin.host}:{origin.port} timed out") from None
        except OSError as exc:
            raise UpstreamError(
                f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}"
            ) from None
        return conn

    def _prepare(
        self,
        base_url: str,
        method: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> tuple[_Origin, bytes]:
        """The origin of ``base_url`` and the request as one buffer (head and body)."""
        try:
            origin = self._origin(base_url)
        except ValueError as exc:  # a port that is not a number
            raise UpstreamError(f"invalid worker URL {base_url!r}: {exc}") from None
        line = origin.lines.get((method, path))
        if line is None:  # the request line and host of this origin's few paths, made once
            if len(origin.lines) > 256:  # paths carry query strings: bounded
                origin.lines.clear()
            line = origin.lines[method, path] = b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (
                method,
                path,
                origin.host_header,
            )
        head = [line]
        for name, value in headers:
            head.append(b"%s: %s\r\n" % (name, value))
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        head.append(body)
        return origin, b"".join(head)  # one copy of the body, not two

    def send_now(
        self,
        base_url: str,
        method: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        deadline: float,
        sink: ResponseSink,
        loop: asyncio.AbstractEventLoop,
    ) -> NativeResponse | None:
        """Write the request on an idle keep-alive connection now, without a task.

        The answer's events (head, end, failure, the deadline) go to ``sink``'s callbacks
        (the callback-driven whole-answer path, :mod:`~sglctl.router.direct`). None when this
        cannot be done synchronously: no idle connection to ``base_url`` (connecting needs a
        task), a URL the fallback client serves, or a connection that closed under us; the
        caller then uses :meth:`request`. Every connection used here is a reused one, so a
        failure before any byte of answer is the caller's cue to resend on a new connection,
        as :meth:`request` does.
        """
        if not base_url.startswith("http://"):
            return None
        origin, payload = self._prepare(base_url, method, path, headers, body)
        conn = self._take_idle(origin)
        if conn is None or conn.transport is None:
            return None
        response = NativeResponse(self, conn, deadline, sink)
        conn.response = response
        try:
            conn.transport.write(payload)
        except RuntimeError:  # uvloop: the transport closed under us
            response.sink = None
            response.release()
            return None
        response._timing = True  # the deadline is watched from now on
        self._deadlines.add(response, loop)
        return response

    async def request(
        self,
        base_url: str,
        method: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        deadline: float,
    ) -> UpstreamResponse:
        """Send a request to ``base_url`` + ``path``; returns once the response head arrived.

        ``deadline`` is on the event loop's clock and bounds everything, body reads included.
        """
        if self.fallback is not None and not base_url.startswith("http://"):
            return await self.fallback.request(base_url, method, path, headers, body, deadline)
        origin, payload = self._prepare(base_url, method, path, headers, body)
        for _ in range(2):
            conn = self._take_idle(origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, deadline)
            response = NativeResponse(self, conn, deadline)
            conn.response = response
            try:
                assert conn.transport is not None
                try:
                    conn.transport.write(payload)
                except RuntimeError as exc:  # uvloop: the transport closed under us
                    raise UpstreamError(f"connection to the worker closed: {exc}") from None
                while not response.headers_done:  # wait_headers(), one coroutine shallower
                    if response._error is not None:
                        raise response._error
                    await response._wait()
                return response
            except UpstreamTimeout:
                response.release()
                raise
            except UpstreamError:
                response.release()
                if reused and not response.got_bytes:
                    continue  # the worker closed the idle connection as we reused it
                raise
            except BaseException:
                response.release()
                raise
        raise UpstreamError("worker closed the connection")  # pragma: no cover

    def close_all(self) -> None:
        if self.fallback is not None:
            self.fallback.close_all()
        for origin in self._origins.values():
            while origin.idle:
                origin.idle.pop().close()
        self._origins.clear()
