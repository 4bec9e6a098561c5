"""Health, readiness, model/server information, metrics and stats endpoints.

Model and server information come from a routable worker (the next one is tried if it
fails); ``/get_server_info`` adds which router answered and how many workers it has.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import httpx
import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from sglctl import __version__
from sglctl.router.config import RouterConfig
from sglctl.router.errors import RouterError
from sglctl.router.responses import json_response
from sglctl.router.router import Router
from sglctl.router.workers import WorkerRegistry

log = logging.getLogger(__name__)


async def get_from_worker(
    registry: WorkerRegistry, client: httpx.AsyncClient | None, path: str, timeout: float
) -> tuple[str, httpx.Response]:
    """GET ``path`` from the first routable worker that answers 200 (503/502 otherwise)."""
    assert client is not None, "router not started"
    workers = registry.routable()
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


def _router(request: Request) -> Router:
    router: Router = request.app.state.router
    return router


def _info_timeout(config: RouterConfig) -> float:
    return max(config.health_check_timeout_secs, 1.0) * 2


async def health(request: Request) -> Response:
    registry = _router(request).registry
    healthy = len(registry.routable())
    if healthy:
        return json_response(
            {"status": "healthy", "healthy_workers": healthy, "total_workers": len(registry)}
        )
    raise RouterError(503, f"no healthy worker ({len(registry)} registered)")


async def liveness(request: Request) -> Response:
    return json_response({"status": "alive"})


async def readiness(request: Request) -> Response:
    """Ready while some worker is routable; with discovery on, also what discovery sees.

    The status follows the workers only: a selector that matches no pod, or an API server
    out of reach, is a ``warning`` (the reason a router has no workers, or why its list may
    be stale), not a reason of its own to take the router out of its Service -- the last
    known workers still serve.
    """
    router = _router(request)
    registry = router.registry
    healthy = len(registry.routable())
    body: dict[str, Any] = {
        "status": "ready" if healthy else "not_ready",
        "healthy_workers": healthy,
        "total_workers": len(registry),
    }
    discovery = router.discovery_status()
    if discovery is not None:
        body["discovery"] = discovery.to_json()
        if not discovery.ok:
            body["warning"] = discovery.message
    return json_response(body, 200 if healthy else 503)


async def health_generate(request: Request) -> Response:
    router = _router(request)
    # A one-token generation; a worker that cannot do it in a minute is not healthy.
    timeout = min(router.config.request_timeout_secs, 60.0)
    url, _ = await get_from_worker(router.registry, router.client, "/health_generate", timeout)
    return json_response({"status": "healthy", "worker": url})


async def passthrough(request: Request) -> Response:
    """``/v1/models``, ``/get_model_info``: the first routable worker's answer, as is."""
    router = _router(request)
    _, response = await get_from_worker(
        router.registry, router.client, request.scope["path"], _info_timeout(router.config)
    )
    return Response(
        response.content,
        status_code=200,
        media_type=response.headers.get("content-type", "application/json"),
    )


async def server_info(request: Request) -> Response:
    router = _router(request)
    registry = router.registry
    url, response = await get_from_worker(
        registry, router.client, "/get_server_info", _info_timeout(router.config)
    )
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
    return Response(await _router(request).render_metrics(), media_type=CONTENT_TYPE_LATEST)


async def stats(request: Request) -> Response:
    router = _router(request)
    registry = router.registry
    data: dict[str, Any] = router.stats.snapshot()
    data.update(
        workers=len(registry),
        healthy_workers=len(registry.routable()),
        policy=router.policy.name,
        uptime_secs=round(time.time() - router.started_at, 3),
        in_flight=sum(w.in_flight for w in registry.all()),
    )
    if router.cluster is not None and router.loads is not None:
        # Which of the --router-processes answered (the counts above are its own, but for
        # in_flight, which is the whole router's), and each process's share of in_flight.
        data["process"] = {
            "index": router.cluster.index,
            "processes": router.cluster.procs,
            "pid": os.getpid(),
            "in_flight_by_process": router.loads.by_process(),
        }
    if router.kv_feed is not None:  # --kv-events: each worker's feed and index
        data["kv_events"] = router.kv_feed.snapshot()
    return json_response(data)
