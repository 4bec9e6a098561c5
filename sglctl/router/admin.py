"""Admin endpoints: worker membership, loads and cache flushing.

Both generations of the SGLang Router's API: ``/add_worker?url=``, ``/remove_worker?url=``,
``/list_workers`` (documented) and ``GET/POST /workers``, ``DELETE /workers/{url-or-id}``
(0.3.2). Calls that change something require ``Authorization: Bearer <--api-key>`` when a key
is set; reading (list, loads) does not, so that dashboards work without the key. Without a
key, anyone who reaches the port can add workers (the router warns at start-up when it
binds a non-loopback address without one).

Bodies are read incrementally under :data:`ADMIN_BODY_LIMIT` (64 KiB, or
``--max-payload-size`` if smaller): a 300 MB body is refused (413) before it is buffered.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import orjson
from starlette.requests import Request
from starlette.responses import Response

from sglctl.polling import PollTimeout, poll
from sglctl.router.api_key import check_api_key
from sglctl.router.errors import RouterError
from sglctl.router.request import read_body
from sglctl.router.responses import json_response
from sglctl.router.router import Router
from sglctl.router.urls import InvalidWorkerURL, parse_worker_url
from sglctl.router.workers import DuplicateWorkerError, UnknownWorkerError, Worker

log = logging.getLogger(__name__)

#: Largest admin request body: a URL and a few fields fit many times over.
ADMIN_BODY_LIMIT = 64 * 1024
#: How long ``POST /add_worker`` without ``wait`` probes the new worker before answering.
ADMIN_PROBE_SECS = 5.0


async def _url_from(request: Request, limit: int) -> str:
    """The worker URL of an add call: query parameter ``url``, else JSON field ``url``."""
    where = "query parameter 'url'"
    url: object = request.query_params.get("url")
    if url is None and request.method == "POST":
        body = await read_body(request, min(limit, ADMIN_BODY_LIMIT))
        if body:
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise RouterError(400, "request body is not valid JSON") from None
            if not isinstance(payload, dict):
                raise RouterError(400, "request body must be a JSON object with a 'url' field")
            url, where = payload.get("url"), "JSON field 'url'"
    if url is None:
        raise RouterError(
            400, "a worker URL is required (query parameter 'url' or JSON field 'url')"
        )
    try:
        return parse_worker_url(url, where)
    except InvalidWorkerURL as exc:
        raise RouterError(400, str(exc)) from None


def _wait_secs(request: Request, startup_timeout: float) -> float | None:
    """``?wait=SECS`` (``wait=true``: the startup timeout), capped by it; None if absent."""
    raw = request.query_params.get("wait")
    if raw is None or raw.lower() in ("", "0", "false", "no"):
        return None
    if raw.lower() in ("true", "yes"):
        return startup_timeout
    try:
        secs = float(raw)
    except ValueError:
        raise RouterError(400, f"query parameter 'wait' must be seconds, got {raw!r}") from None
    if not secs >= 0:
        raise RouterError(400, f"query parameter 'wait' must be >= 0, got {raw!r}")
    return min(secs, startup_timeout)


async def _healthy(client: httpx.AsyncClient, url: str, timeout: float) -> bool | None:
    """One health probe: True when it answered 200; None (not yet) otherwise."""
    response = await client.get(url, timeout=timeout)
    if response.status_code == 200:
        return True
    raise httpx.HTTPStatusError(
        f"HTTP {response.status_code}", request=response.request, response=response
    )


async def wait_until_healthy(router: Router, url: str, timeout: float) -> str | None:
    """Poll ``url``'s health endpoint for up to ``timeout`` s; None, or why it never passed."""
    config, client = router.config, router.client
    assert client is not None
    probe_timeout = max(min(config.health_check_timeout_secs, timeout), 0.5)
    try:
        await poll(
            lambda: _healthy(client, url + config.health_check_endpoint, probe_timeout),
            timeout,
            what=f"worker {url} health check",
            interval=max(min(config.worker_startup_check_interval, 5.0), 0.05),
            retry_on=(httpx.HTTPError,),
        )
    except PollTimeout as exc:
        return exc.last or "no answer"
    return None


async def _admit_when_healthy(router: Router, worker: Worker) -> None:
    """A pending worker: into routing once it passes its health check, else forgotten."""
    timeout = router.config.worker_startup_timeout_secs
    problem = await wait_until_healthy(router, worker.url, timeout)
    if router.registry.get(worker.url) is not worker:
        return  # removed (or replaced) meanwhile
    if problem is None:
        worker.health_ok = True
        router.tell_siblings({"t": "health", "w": worker.url, "ok": True, "why": None})
        log.info("pending worker %s passed its health check; now in routing", worker.url)
        return
    log.warning(
        "pending worker %s did not pass its health check within %gs (%s); removed",
        worker.url,
        timeout,
        problem,
    )
    router.registry.remove(worker.url)
    router.tell_siblings({"t": "remove", "w": worker.url})


def _register(router: Router, url: str, *, healthy: bool) -> Worker:
    try:
        worker = router.registry.add(url, source="admin")
    except DuplicateWorkerError:  # added by a concurrent call while we probed
        raise RouterError(409, f"worker {url} is already registered") from None
    worker.health_ok = healthy
    router.tell_siblings({"t": "add", "w": worker.url, "ok": healthy})
    return worker


def _added(worker: Worker, status: int, message: str) -> Response:
    return json_response(
        {
            "status": "ok" if status == 200 else "pending",
            "url": worker.url,
            "id": worker.id,
            "message": message,
        },
        status,
    )


async def add_worker(request: Request) -> Response:
    """``POST /add_worker?url=U`` / ``POST /workers {"url": U}``: add a worker, answer fast.

    Without ``wait``: one probe of U's health endpoint, bounded by
    :data:`ADMIN_PROBE_SECS`. It answers 200 -> 200, the worker is in routing. The
    connection is refused -> 503 at once (nothing listens there: a typo, or the worker is
    not started). Anything else (a slow or still-loading worker) -> 202 with the worker
    *pending*: registered but not routable, admitted by a background check as soon as it
    passes, and removed if it has not within ``--worker-startup-timeout-secs``.

    With ``?wait=SECS`` (``wait=true``: the startup timeout): poll until healthy, up to that
    long, then 200 or 503 (the SGLang Router's behaviour). Either way the wait runs as
    admin work that shutdown cancels, so an abandoned call never holds the router's exit.
    """
    router: Router = request.app.state.router
    config = router.config
    check_api_key(config.api_key, request)
    url = await _url_from(request, config.max_payload_size)
    if url in router.registry:
        raise RouterError(409, f"worker {url} is already registered")
    wait = _wait_secs(request, config.worker_startup_timeout_secs)
    timeout = min(ADMIN_PROBE_SECS if wait is None else wait, config.worker_startup_timeout_secs)
    if wait is None:
        problem = await _first_probe(router, url, timeout)
    else:
        probe = router.spawn_admin(wait_until_healthy(router, url, timeout), f"add {url}")
        try:
            await asyncio.wait({probe})
        except asyncio.CancelledError:  # the client went away
            probe.cancel()
            raise
        if probe.cancelled():
            raise RouterError(503, f"router is shutting down; worker {url} was not added")
        problem = probe.result()
    if problem is None:
        worker = _register(router, url, healthy=True)
        return _added(worker, 200, f"added worker {url}")
    if wait is None and problem.startswith("refused"):
        raise RouterError(
            503,
            f"worker {url} is unreachable (connection refused), so it cannot pass its "
            "health check; is it running, and is the URL right? Nothing was added.",
        )
    if wait is not None:
        raise RouterError(
            503, f"worker {url} did not pass its health check within {timeout:g}s: {problem}"
        )
    worker = _register(router, url, healthy=False)
    router.spawn_admin(_admit_when_healthy(router, worker), f"admit {url}")
    return _added(
        worker,
        202,
        f"worker {url} is pending ({problem}); it joins routing once it passes its health "
        f"check (within {config.worker_startup_timeout_secs:g}s)",
    )


async def _first_probe(router: Router, url: str, timeout: float) -> str | None:
    """One bounded probe: None (healthy), ``"refused: ..."``, or what else went wrong."""
    config, client = router.config, router.client
    assert client is not None
    try:
        await asyncio.wait_for(
            _healthy(client, url + config.health_check_endpoint, timeout), timeout
        )
    except httpx.ConnectError as exc:
        return f"refused: {exc}" if str(exc) else "refused: connection refused"
    except (httpx.HTTPError, asyncio.TimeoutError) as exc:
        return str(exc) or f"no answer within {timeout:g}s"
    return None


def _remove(router: Router, url_or_id: str) -> Response:
    worker = router.registry.find(url_or_id)
    if worker is None:
        raise RouterError(404, f"no worker {url_or_id} is registered")
    try:
        router.registry.remove(worker.url)
    except UnknownWorkerError:
        raise RouterError(404, f"no worker {url_or_id} is registered") from None
    router.tell_siblings({"t": "remove", "w": worker.url})
    return json_response(
        {"status": "ok", "url": worker.url, "message": f"removed worker {worker.url}"}
    )


async def remove_worker_by_query(request: Request) -> Response:
    """``POST|DELETE /remove_worker?url=U``; in-flight requests to U finish."""
    router: Router = request.app.state.router
    check_api_key(router.config.api_key, request)
    url = request.query_params.get("url")
    if not url:
        raise RouterError(400, "query parameter 'url' is required")
    return _remove(router, url)


async def delete_worker(request: Request) -> Response:
    """``DELETE /workers/{url-or-id}`` (0.3.2)."""
    router: Router = request.app.state.router
    check_api_key(router.config.api_key, request)
    return _remove(router, request.path_params["worker"])


async def get_worker(request: Request) -> Response:
    worker = request.app.state.router.registry.find(request.path_params["worker"])
    if worker is None:
        raise RouterError(404, f"no worker {request.path_params['worker']} is registered")
    return json_response(worker.to_json())


async def list_workers(request: Request) -> Response:
    return json_response({"urls": [w.url for w in request.app.state.router.registry.all()]})


async def workers(request: Request) -> Response:
    """``GET /workers``: every worker with health, load, source and meta (0.3.2 shape)."""
    registry = request.app.state.router.registry
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
    registry = request.app.state.router.registry
    return json_response(
        {"workers": [{"worker": w.url, "load": w.in_flight} for w in registry.all()]}
    )


async def _flush_one(client: httpx.AsyncClient, url: str, timeout: float) -> str | None:
    try:
        response = await client.post(url + "/flush_cache", timeout=timeout)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if response.status_code < 300 else f"HTTP {response.status_code}"


async def flush_cache(request: Request) -> Response:
    """``POST /flush_cache``: fan out to every worker, then forget the policies' cache state."""
    router: Router = request.app.state.router
    check_api_key(router.config.api_key, request)
    client = router.client
    assert client is not None
    targets = router.registry.all()
    timeout = router.config.health_check_timeout_secs
    results = await asyncio.gather(*(_flush_one(client, w.url, timeout) for w in targets))
    failed = [
        {"worker": w.url, "error": err} for w, err in zip(targets, results, strict=True) if err
    ]
    for policy in (router.policy, router.decode_policy):
        if policy is not None:
            policy.flush()
    router.tell_siblings({"t": "flush"})
    flushed = len(targets) - len(failed)
    if failed:
        log.warning("flush_cache failed on %d of %d workers: %s", len(failed), len(targets), failed)
    return json_response(
        {
            "status": "success" if not failed else "partial_success",
            "message": f"flushed {flushed} of {len(targets)} workers",
            "workers_flushed": flushed,
            "total_workers": len(targets),
            "failed": failed,
        }
    )
