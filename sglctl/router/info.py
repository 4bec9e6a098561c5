"""Health, readiness, model/server information, metrics and stats endpoints.

Model and server information come from a routable worker (the next one is tried if it
fails); ``/get_server_info`` adds which router answered and how many workers it has.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import httpx
import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sglctl import __version__
from sglctl.router.admin import json_response
from sglctl.router.errors import RouterError

if TYPE_CHECKING:
    from sglctl.router.app import Router

log = logging.getLogger(__name__)


async def get_from_worker(router: Router, path: str, timeout: float) -> tuple[str, httpx.Response]:
    """GET ``path`` from the first routable worker that answers 200 (503/502 otherwise)."""
    client = router.client
    assert client is not None
    workers = router.registry.routable()
    if not workers:
        raise RouterError(503, "no healthy worker available")
    last = ""
    for worker in sorted(workers, key=lambda w: w.in_flight):
        try:
            response = await client.get(worker.url + path, timeout=timeout)
        except httpx.HTTPError as exc:
            last = f"{worker.url}: {type(exc).__name__}: {exc}"
            continue
        if response.status_code == 200:
            return worker.url, response
        last = f"{worker.url}: HTTP {response.status_code}"
    raise RouterError(502, f"no worker answered {path}; last error: {last}")


def routes(router: Router) -> list[Route]:
    registry = router.registry
    config = router.config
    info_timeout = max(config.health_check_timeout_secs, 1.0) * 2

    async def health(request: Request) -> Response:
        healthy = len(registry.routable())
        if healthy:
            return json_response(
                {"status": "healthy", "healthy_workers": healthy, "total_workers": len(registry)}
            )
        raise RouterError(503, f"no healthy worker ({len(registry)} registered)")

    async def liveness(request: Request) -> Response:
        return json_response({"status": "alive"})

    async def readiness(request: Request) -> Response:
        healthy = len(registry.routable())
        body = {
            "status": "ready" if healthy else "not_ready",
            "healthy_workers": healthy,
            "total_workers": len(registry),
        }
        return json_response(body, 200 if healthy else 503)

    async def health_generate(request: Request) -> Response:
        # A one-token generation; a worker that cannot do it in a minute is not healthy.
        timeout = min(config.request_timeout_secs, 60.0)
        url, _ = await get_from_worker(router, "/health_generate", timeout)
        return json_response({"status": "healthy", "worker": url})

    async def passthrough(request: Request) -> Response:
        _, response = await get_from_worker(router, request.scope["path"], info_timeout)
        return Response(
            response.content,
            status_code=200,
            media_type=response.headers.get("content-type", "application/json"),
        )

    async def server_info(request: Request) -> Response:
        url, response = await get_from_worker(router, "/get_server_info", info_timeout)
        try:
            data: dict[str, Any] = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise RouterError(502, f"{url} answered /get_server_info with invalid JSON") from None
        if not isinstance(data, dict):
            data = {"worker_info": data}
        data["router"] = {
            "name": "sglctl",
            "version": __version__,
            "policy": router.policy.name,
            "workers": len(registry),
            "healthy_workers": len(registry.routable()),
            "worker_urls": [w.url for w in registry.all()],
            "answered_by": url,
        }
        return json_response(data)

    async def metrics(request: Request) -> Response:
        return Response(router.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def stats(request: Request) -> Response:
        data: dict[str, Any] = router.stats.snapshot()
        data.update(
            workers=len(registry),
            healthy_workers=len(registry.routable()),
            policy=router.policy.name,
            uptime_secs=round(time.time() - router.started_at, 3),
            in_flight=sum(w.in_flight for w in registry.all()),
        )
        return json_response(data)

    return [
        Route("/health", health, methods=["GET"]),
        Route("/liveness", liveness, methods=["GET"]),
        Route("/readiness", readiness, methods=["GET"]),
        Route("/health_generate", health_generate, methods=["GET"]),
        Route("/v1/models", passthrough, methods=["GET"]),
        Route("/get_model_info", passthrough, methods=["GET"]),
        Route("/get_server_info", server_info, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
    ]
