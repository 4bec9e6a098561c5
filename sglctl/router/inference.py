"""The inference endpoints: check the body once, admit, route, forward.

``POST /generate``, ``/v1/chat/completions``, ``/v1/completions`` (and the other OpenAI
POST endpoints a worker serves, without a routing key). The body is read under the payload
limit and parsed once; the original bytes are what the worker receives.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from sglctl.router.admission import AdmissionRejected, parse_priority
from sglctl.router.errors import RouterError
from sglctl.router.proxy import Finish
from sglctl.router.request import parse_inference_async, read_body

if TYPE_CHECKING:
    from sglctl.router.app import Router

KEYED_ROUTES = ("/generate", "/v1/chat/completions", "/v1/completions")
UNKEYED_ROUTES = ("/v1/embeddings", "/v1/rerank", "/v1/score", "/classify", "/encode")
DEFAULT_REQUEST_ID_HEADERS = ("x-request-id", "x-correlation-id", "x-trace-id", "request-id")
#: Status recorded for requests whose client went away before the answer (nginx's 499).
CLIENT_CLOSED = 499


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


def routes(router: Router) -> list[Route]:
    config = router.config
    limit = config.max_payload_size
    needs_text = router.policy.needs_text
    id_headers = tuple(h.lower() for h in config.request_id_headers) or DEFAULT_REQUEST_ID_HEADERS
    passed = frozenset(h.encode("latin-1") for h in ("authorization", *id_headers))
    admission = router.admission
    metrics = router.metrics
    stats = router.stats

    def forward_headers(request: Request) -> list[tuple[bytes, bytes]]:
        """Headers for the worker: JSON content type, the caller's credentials, request ids."""
        headers = [(b"content-type", b"application/json")]
        for name, value in request.scope["headers"]:  # raw, names already lower-case
            if name in passed:
                headers.append((name, value))
        return headers

    async def handle(request: Request) -> Response:
        route: str = request.scope["path"]
        started = time.perf_counter()
        finish = Finish()

        def record(status: int, ok: bool) -> None:
            elapsed = time.perf_counter() - started
            metrics.observe(route, status, elapsed)
            stats.record(elapsed, ok)

        finish.add(record)
        try:
            body = await read_body(request, limit)
            parsed = await parse_inference_async(
                route, body, need_key=needs_text, need_payload=config.is_pd
            )
            try:
                priority = parse_priority(parsed.payload.get("priority"))
            except ValueError as exc:
                raise RouterError(400, str(exc)) from None
            if admission.enabled:
                await admission.acquire(priority)
                finish.add(lambda status, ok: admission.release())
            headers = forward_headers(request)
            forwarder = router.forwarder
            assert forwarder is not None, "router not started"
            # Until the answer starts, a client that hangs up cancels this task, and with it
            # the request at the worker (a long non-streamed generation must not run on for
            # nobody). From the first byte on, Starlette's streaming response does the same.
            watcher = DisconnectWatcher(request)
            try:
                if config.is_pd:
                    from sglctl.router.pd import forward_pd

                    return await forward_pd(router, route, parsed, headers, finish)
                query = request.scope.get("query_string")
                target = f"{route}?{query.decode('latin-1')}" if query else route
                return await forwarder.forward(target, body, headers, parsed.key, finish)
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
            raise RouterError(
                429, str(exc), headers={"Retry-After": str(exc.retry_after)}
            ) from None
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

    return [Route(path, handle, methods=["POST"]) for path in (*KEYED_ROUTES, *UNKEYED_ROUTES)]
