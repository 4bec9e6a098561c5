"""Admin endpoints: worker membership, loads and cache flushing.

Both generations of the SGLang Router's API: ``/add_worker?url=``, ``/remove_worker?url=``,
``/list_workers`` (documented) and ``GET/POST /workers``, ``DELETE /workers/{url-or-id}``
(0.3.2). Calls that change something require ``Authorization: Bearer <--api-key>`` when a key
is set; reading (list, loads) does not, so that dashboards work without the key.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sglctl.router.errors import RouterError
from sglctl.router.workers import DuplicateWorkerError, UnknownWorkerError, normalize_url

if TYPE_CHECKING:
    from sglctl.router.app import Router

log = logging.getLogger(__name__)


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def check_api_key(router: Router, request: Request) -> None:
    """401 unless the request carries the configured API key (no-op without a key)."""
    key = router.config.api_key
    if not key:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise RouterError(401, "this admin endpoint requires 'Authorization: Bearer <api key>'")


def validate_worker_url(raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise RouterError(
            400, "a worker URL is required (query parameter 'url' or JSON field 'url')"
        )
    # An explicit http(s) scheme is required here (unlike --worker-urls): a bare name would
    # otherwise be resolved and probed, letting an admin call reach arbitrary hosts by DNS.
    try:
        parts = urlsplit(raw.strip())
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise RouterError(400, f"invalid worker URL {raw!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise RouterError(400, f"invalid worker URL {raw!r}: expected http://host:port")
    url = normalize_url(raw)
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
        httpx.URL(url)  # refuses what the client could not connect to (bad IDNA host, ...)
    except (ValueError, httpx.InvalidURL):
        raise RouterError(400, f"invalid worker URL {raw!r}") from None
    return url


async def _url_from(request: Request) -> str:
    url = request.query_params.get("url")
    if url is None and request.method == "POST":
        body = await request.body()
        if body:
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise RouterError(400, "request body is not valid JSON") from None
            if not isinstance(payload, dict):
                raise RouterError(400, "request body must be a JSON object with a 'url' field")
            url = payload.get("url")
    return validate_worker_url(url)


async def wait_until_healthy(router: Router, url: str) -> str | None:
    """Poll ``url``'s health endpoint until it answers 200; None, or why it never did."""
    config = router.config
    client = router.client
    assert client is not None
    deadline = time.monotonic() + config.worker_startup_timeout_secs
    interval = max(min(config.worker_startup_check_interval, 5.0), 0.05)
    probe_timeout = max(config.health_check_timeout_secs, 0.5)
    last = "no answer"
    while True:
        try:
            response = await client.get(url + config.health_check_endpoint, timeout=probe_timeout)
            if response.status_code == 200:
                return None
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if time.monotonic() + interval > deadline:
            return last
        await asyncio.sleep(interval)


async def add_worker(router: Router, url: str) -> Response:
    if url in router.registry:
        raise RouterError(409, f"worker {url} is already registered")
    problem = await wait_until_healthy(router, url)
    if problem is not None:
        raise RouterError(
            503,
            f"worker {url} did not pass its health check within "
            f"{router.config.worker_startup_timeout_secs:g}s: {problem}",
        )
    try:
        worker = router.registry.add(url)
    except DuplicateWorkerError:  # added by a concurrent call while we waited
        raise RouterError(409, f"worker {url} is already registered") from None
    return json_response(
        {"status": "ok", "url": worker.url, "id": worker.id, "message": f"added worker {url}"}
    )


def remove_worker(router: Router, url_or_id: str) -> Response:
    worker = router.registry.find(url_or_id)
    if worker is None:
        raise RouterError(404, f"no worker {url_or_id} is registered")
    try:
        router.registry.remove(worker.url)
    except UnknownWorkerError:
        raise RouterError(404, f"no worker {url_or_id} is registered") from None
    return json_response(
        {"status": "ok", "url": worker.url, "message": f"removed worker {worker.url}"}
    )


def routes(router: Router) -> list[Route]:
    registry = router.registry

    async def add_worker_query(request: Request) -> Response:
        check_api_key(router, request)
        return await add_worker(router, await _url_from(request))

    async def remove_worker_query(request: Request) -> Response:
        check_api_key(router, request)
        url = request.query_params.get("url")
        if not url:
            raise RouterError(400, "query parameter 'url' is required")
        return remove_worker(router, url)

    async def delete_worker(request: Request) -> Response:
        check_api_key(router, request)
        return remove_worker(router, request.path_params["worker"])

    async def get_worker(request: Request) -> Response:
        worker = registry.find(request.path_params["worker"])
        if worker is None:
            raise RouterError(404, f"no worker {request.path_params['worker']} is registered")
        return json_response(worker.to_json())

    async def list_workers(request: Request) -> Response:
        return json_response({"urls": [w.url for w in registry.all()]})

    async def workers(request: Request) -> Response:
        items = [w.to_json() for w in registry.all()]
        healthy = sum(1 for w in registry.all() if w.is_routable())
        return json_response(
            {
                "workers": items,
                "total": len(items),
                "stats": {"healthy_count": healthy, "unhealthy_count": len(items) - healthy},
            }
        )

    async def get_loads(request: Request) -> Response:
        return json_response(
            {"workers": [{"worker": w.url, "load": w.in_flight} for w in registry.all()]}
        )

    async def flush_cache(request: Request) -> Response:
        check_api_key(router, request)
        client = router.client
        assert client is not None
        targets = registry.all()

        async def flush(url: str) -> str | None:
            try:
                response = await client.post(
                    url + "/flush_cache", timeout=router.config.health_check_timeout_secs
                )
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__}: {exc}"
            return None if response.status_code < 300 else f"HTTP {response.status_code}"

        results = await asyncio.gather(*(flush(w.url) for w in targets))
        failed = [
            {"worker": w.url, "error": err} for w, err in zip(targets, results, strict=True) if err
        ]
        for policy in (router.policy, router.decode_policy):
            if policy is not None:
                policy.flush()
        flushed = len(targets) - len(failed)
        if failed:
            log.warning(
                "flush_cache failed on %d of %d workers: %s", len(failed), len(targets), failed
            )
        return json_response(
            {
                "status": "success" if not failed else "partial_success",
                "message": f"flushed {flushed} of {len(targets)} workers",
                "workers_flushed": flushed,
                "total_workers": len(targets),
                "failed": failed,
            }
        )

    return [
        Route("/add_worker", add_worker_query, methods=["POST"]),
        Route("/remove_worker", remove_worker_query, methods=["POST", "DELETE"]),
        Route("/list_workers", list_workers, methods=["GET"]),
        Route("/workers", workers, methods=["GET"]),
        Route("/workers", add_worker_query, methods=["POST"]),
        Route("/workers/{worker:path}", get_worker, methods=["GET"]),
        Route("/workers/{worker:path}", delete_worker, methods=["DELETE"]),
        Route("/get_loads", get_loads, methods=["GET"]),
        Route("/flush_cache", flush_cache, methods=["POST"]),
    ]
