"""The router as a Starlette app: one route table, read top to bottom.

As in :mod:`sglctl.sim.app`: the handlers are module-level functions in
:mod:`~sglctl.router.inference`, :mod:`~sglctl.router.admin` and :mod:`~sglctl.router.info`
that find the shared :class:`~sglctl.router.router.Router` as ``request.app.state.router``;
this module only lists the routes (CONTRACT.md section 2), maps exceptions to the JSON error
shape, and ties the router's start and stop to the app's lifespan.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sglctl import __version__
from sglctl.router import admin, inference, info, peers
from sglctl.router.errors import RouterError, error_response
from sglctl.router.router import Router

log = logging.getLogger(__name__)


class _AnyTextConvertor(Convertor[str]):
    """Like Starlette's ``path``, but also across newlines (``%0A`` in a worker id).

    With ``path`` (``.*``, no DOTALL) such a URL matches no route and gets a 404 before the
    admin handler can say 401 to a caller without the API key; the handler must decide.
    """

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anytext", _AnyTextConvertor())

ROUTES = [
    # Inference: parsed once, admitted, routed, forwarded (inference.py, proxy.py, pd.py).
    *(Route(path, inference.forward, methods=["POST"]) for path in inference.KEYED_ROUTES),
    *(Route(path, inference.forward, methods=["POST"]) for path in inference.UNKEYED_ROUTES),
    # Admin: membership (both API generations), loads, cache flushing.
    Route("/add_worker", admin.add_worker, methods=["POST"]),
    Route("/remove_worker", admin.remove_worker_by_query, methods=["POST", "DELETE"]),
    Route("/list_workers", admin.list_workers, methods=["GET"]),
    Route("/workers", admin.workers, methods=["GET"]),
    Route("/workers", admin.add_worker, methods=["POST"]),
    Route("/workers/{worker:anytext}", admin.get_worker, methods=["GET"]),
    Route("/workers/{worker:anytext}", admin.delete_worker, methods=["DELETE"]),
    Route("/get_loads", admin.get_loads, methods=["GET"]),
    Route("/flush_cache", admin.flush_cache, methods=["POST"]),
    # Health and information.
    Route("/health", info.health, methods=["GET"]),
    Route("/liveness", info.liveness, methods=["GET"]),
    Route("/readiness", info.readiness, methods=["GET"]),
    Route("/health_generate", info.health_generate, methods=["GET"]),
    Route("/v1/models", info.passthrough, methods=["GET"]),
    Route("/get_model_info", info.passthrough, methods=["GET"]),
    Route("/get_server_info", info.server_info, methods=["GET"]),
    Route("/metrics", info.metrics, methods=["GET"]),
    Route("/stats", info.stats, methods=["GET"]),
    # Router replicas (--router-peers): each other's routing decisions.
    Route(peers.PATH, peers.endpoint, methods=["POST"]),
    Route("/peers", peers.info, methods=["GET"]),
]


async def _router_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RouterError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, headers=dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal router error: {type(exc).__name__}")


def create_app(router: Router) -> Starlette:
    """The Starlette app serving ``router`` (started and stopped by the app's lifespan)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    middleware = []
    if router.config.cors_allowed_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=router.config.cors_allowed_origins,
                allow_methods=["*"],
                allow_headers=["*"],
            )
        )
    app = Starlette(
        routes=ROUTES,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            RouterError: _router_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
    app.state.router = router
    app.state.version = __version__
    return app
