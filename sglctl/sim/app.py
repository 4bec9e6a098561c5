"""The simulated worker's ASGI application: routes, error handling and the stall switch."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import prometheus_client
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from sglctl.sim import native, openai_api
from sglctl.sim.config import SimConfig
from sglctl.sim.errors import APIError, error_response, is_openai_path
from sglctl.sim.service import SimWorker

log = logging.getLogger(__name__)


class StallMiddleware:
    """Once the worker has stalled (``--stall-after``), hold every new request forever.

    The connection is accepted by the server and then simply never answered, the way a
    worker whose GPU hung behaves. The wait ends only when the server shuts down.
    """

    def __init__(self, app: ASGIApp, sim: SimWorker) -> None:
        self.app = app
        self.sim = sim

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.sim.faults.stalled:
            await _forever()
        await self.app(scope, receive, send)


async def _forever() -> None:
    import asyncio

    await asyncio.Event().wait()


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    if exc.status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    return error_response(
        exc.message, exc.status, exc.type, openai=is_openai_path(request.url.path)
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: f"Not found: {request.url.path}", 405: f"Method {request.method} not allowed"}
    return error_response(
        message.get(exc.status_code, str(exc.detail)),
        exc.status_code,
        openai=is_openai_path(request.url.path),
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(
        f"Internal error: {type(exc).__name__}: {exc}",
        500,
        openai=is_openai_path(request.url.path),
    )


def build_app(config: SimConfig) -> ASGIApp:
    """The full worker app for ``config`` (the engine starts with the app's lifespan)."""
    prometheus_client.disable_created_metrics()
    sim = SimWorker(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await sim.start()
        log.info(
            "sim worker %s ready (disaggregation mode %s): kv %d tokens, max running %d, "
            "speedup %g",
            config.model_name,
            config.disaggregation_mode,
            config.kv_cache_tokens,
            config.max_running_requests,
            config.timing.speedup,
        )
        try:
            yield
        finally:
            await sim.stop()

    get, post, both = ["GET"], ["POST", "PUT"], ["GET", "POST"]
    routes = [
        Route("/generate", native.generate, methods=post),
        Route("/health", native.health, methods=get),
        Route("/health_generate", native.health_generate, methods=get),
        Route("/get_model_info", native.model_info, methods=get),
        Route("/model_info", native.model_info, methods=get),
        Route("/get_server_info", native.server_info, methods=get),
        Route("/server_info", native.server_info, methods=get),
        Route("/get_load", native.get_load, methods=get),
        Route("/flush_cache", native.flush_cache, methods=both),
        Route("/metrics", native.metrics, methods=get),
        Route("/tokenize", native.tokenize, methods=["POST"]),
        Route("/detokenize", native.detokenize, methods=["POST"]),
        *openai_api.routes(),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
    app.state.sim = sim
    return StallMiddleware(app, sim)
