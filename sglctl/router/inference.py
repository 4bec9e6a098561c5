"""The inference endpoints: check the body once, admit, route, forward.

``POST /generate``, ``/v1/chat/completions``, ``/v1/completions`` (and the other OpenAI
POST endpoints a worker serves, without a routing key). The body is read under the payload
limit and parsed once; the original bytes are what the worker receives.

Two servers share this: the Starlette route (:func:`forward`, used with CORS, PD mode and by
in-process tests) and the lean path of :mod:`~sglctl.router.fastpath`, which reads the body
and writes the answer on the connection itself. Both call :func:`begin` (metrics, rolling
stats) and :func:`admit_and_forward` (parse, admission, headers, forwarding), so the rules
live once; each maps errors to answers in its own way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from sglctl.router.admission import DEFAULT_PRIORITY, AdmissionRejected, parse_priority
from sglctl.router.errors import RouterError
from sglctl.router.metrics import RequestObservation, RouterMetrics
from sglctl.router.pd import forward_pd
from sglctl.router.proxy import Finish
from sglctl.router.request import (
    OFF_LOOP_BYTES,
    ParsedRequest,
    parse_inference,
    parse_inference_async,
    read_body,
)
from sglctl.router.responses import Answer, Reply
from sglctl.router.router import Router
from sglctl.router.stats import RollingStats

log = logging.getLogger(__name__)

KEYED_ROUTES = ("/generate", "/v1/chat/completions", "/v1/completions")
UNKEYED_ROUTES = ("/v1/embeddings", "/v1/rerank", "/v1/score", "/classify", "/encode")
#: Status recorded for requests whose client went away before the answer (nginx's 499).
CLIENT_CLOSED = 499
_JSON = (b"content-type", b"application/json")
#: The headers of a request that carries none worth passing on: one shared list, read only.
_JSON_ONLY = [_JSON]


class DisconnectWatcher:
    """Cancels the current task when the client disconnects (until :meth:`stop`)."""

    __slots__ = ("_disconnected", "_task", "_watch")

    def __init__(self, request: Request) -> None:
        self._task = asyncio.current_task()
        self._disconnected = False
        self._watch = asyncio.ensure_future(self._wait(request))

    async def _wait(self, request: Request) -> None:
        # The body has been read: the next ASGI message is the disconnect.
        message = await request.receive()
        if message["type"] == "http.disconnect" and self._task is not None:
            self._disconnected = True
            self._task.cancel()

    def absorb_cancel(self) -> bool:
        """On CancelledError: True when it was our cancel (swallowed), False to re-raise."""
        if not self._disconnected:
            return False
        uncancel = getattr(self._task, "uncancel", None)  # Python >= 3.11
        return not (uncancel is not None and uncancel() > 0)

    def stop(self) -> None:
        self._watch.cancel()


def forward_headers(
    raw: Iterable[tuple[bytes, bytes]], passed: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """Headers for the worker: JSON content type, the caller's credentials, request ids.

    ``raw`` are the request's (lower-case name, value) pairs. Most requests carry none of
    ``passed``; they all share one list (nobody writes to it), which saves an allocation.
    """
    headers: list[tuple[bytes, bytes]] | None = None
    for name, value in raw:
        if name in passed:
            if headers is None:
                headers = [_JSON]
            headers.append((name, value))
    return _JSON_ONLY if headers is None else headers


def begin(router: Router, route: str, started: float | None = None) -> Finish:
    """Start one request's observation; the returned :class:`Finish` records its end.

    ``started`` (``time.perf_counter()``) is when the request arrived, if that was earlier:
    the callback path (:mod:`~sglctl.router.direct`) begins the observation only after the
    worker has the request.
    """
    if started is None:
        started = time.perf_counter()
    metrics = router.metrics
    obs = metrics.begin(route, started)  # the task's current request (TTFT, retries, worker)
    return _Observed(metrics, router.stats, obs, started)


class _Observed(Finish):
    """A request's :class:`Finish` that records it (metrics, rolling stats) before its other
    callbacks: what a ``record`` closure passed to ``Finish`` did, without the closure, its
    four cells and the callbacks' tuple made per request."""

    __slots__ = ("_metrics", "_obs", "_started", "_stats")

    def __init__(
        self, metrics: RouterMetrics, stats: RollingStats, obs: RequestObservation, started: float
    ) -> None:
        self.callbacks = []
        self.done = False
        self._metrics = metrics
        self._stats = stats
        self._obs = obs
        self._started = started

    def __call__(self, status: int, ok: bool) -> None:
        if self.done:
            return
        self.done = True
        try:
            elapsed = time.perf_counter() - self._started
            self._metrics.finish(self._obs, status, elapsed)
            self._stats.record(elapsed, ok)
        except Exception:
            log.exception("request completion callback failed")
        for callback in self.callbacks:
            try:
                callback(status, ok)
            except Exception:
                log.exception("request completion callback failed")


def checked(router: Router, route: str, body: bytes) -> tuple[ParsedRequest, int]:
    """Parse and check a body of at most :data:`OFF_LOOP_BYTES`; it and its priority.

    Raises :class:`RouterError` (400) for a body a user must fix.
    """
    parsed = parse_inference(route, body, need_key=router.needs_text)
    value = parsed.payload.get("priority")
    if value is None:  # nearly always: no call for the default
        return parsed, DEFAULT_PRIORITY
    try:
        priority = parse_priority(value)
    except ValueError as exc:
        raise RouterError(400, str(exc)) from None
    return parsed, priority


async def admit_and_forward(
    router: Router,
    route: str,
    query: bytes,
    body: bytes,
    raw_headers: Iterable[tuple[bytes, bytes]],
    finish: Finish,
) -> Reply:
    """Parse and check ``body``, wait for admission, forward; the worker's answer.

    Raises :class:`RouterError` (4xx/5xx answers) and :class:`AdmissionRejected` (429);
    the caller turns them into answers and calls ``finish`` for them.
    """
    if len(body) <= OFF_LOOP_BYTES:  # nearly always: parsed here, without a coroutine
        parsed, priority = checked(router, route, body)
    else:
        parsed = await parse_inference_async(
            route, body, need_key=router.needs_text, need_payload=router.config.is_pd
        )
        try:
            priority = parse_priority(parsed.payload.get("priority"))
        except ValueError as exc:
            raise RouterError(400, str(exc)) from None
    return await admitted_forward(router, route, query, body, parsed, priority, raw_headers, finish)


async def admitted_forward(
    router: Router,
    route: str,
    query: bytes,
    body: bytes,
    parsed: ParsedRequest,
    priority: int,
    raw_headers: Iterable[tuple[bytes, bytes]],
    finish: Finish,
) -> Reply:
    """:func:`admit_and_forward` from a checked body on: admission, headers, forwarding."""
    admission = router.admission
    if admission.enabled:
        queued_at = time.perf_counter()
        await admission.acquire(priority)
        router.metrics.observe_queue_wait(time.perf_counter() - queued_at)
        finish.add(lambda status, ok: admission.release())
    headers = forward_headers(raw_headers, router.forwarded_headers)
    if router.config.is_pd:
        return await forward_pd(router, route, parsed, headers, finish)
    forwarder = router.forwarder
    assert forwarder is not None, "router not started"
    return await forwarder.forward(target_of(route, query), body, headers, parsed.key, finish)


def target_of(route: str, query: bytes) -> str:
    """The path and query the worker is sent."""
    return f"{route}?{query.decode('latin-1')}" if query else route


def rejected(exc: AdmissionRejected) -> RouterError:
    """The 429 answer for a request admission control turned away."""
    return RouterError(429, str(exc), headers={"Retry-After": str(exc.retry_after)})


async def forward(request: Request) -> Response:
    """Every inference route on the Starlette app: read the body, admit, route, forward."""
    router: Router = request.app.state.router
    route: str = request.scope["path"]
    finish = begin(router, route)
    try:
        body = await read_body(request, router.config.max_payload_size)
        # Until the answer starts, a client that hangs up cancels this task, and with it
        # the request at the worker (a long non-streamed generation must not run on for
        # nobody). From the first byte on, Starlette's streaming response does the same.
        watcher = DisconnectWatcher(request)
        try:
            reply = await admit_and_forward(
                router,
                route,
                request.scope.get("query_string", b""),
                body,
                request.scope["headers"],
                finish,
            )
            return reply.to_starlette() if isinstance(reply, Answer) else reply
        except asyncio.CancelledError:
            if not watcher.absorb_cancel():
                raise
            finish(CLIENT_CLOSED, False)
            return Response(status_code=CLIENT_CLOSED)
        finally:
            watcher.stop()
    except RouterError as exc:
        finish(exc.status, False)
        raise
    except AdmissionRejected as exc:
        finish(429, False)
        raise rejected(exc) from None
    except ClientDisconnect:
        # The client hung up while sending its body: nobody is left to answer, and an
        # unhandled exception would log a traceback per disconnect.
        finish(CLIENT_CLOSED, False)
        return Response(status_code=CLIENT_CLOSED)
    except asyncio.CancelledError:
        finish(CLIENT_CLOSED, False)
        raise
    except Exception:
        finish(500, False)
        raise
