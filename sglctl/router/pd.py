"""Prefill/decode disaggregation: one request goes to a prefill *and* a decode worker.

As the SGLang Router does it in PD mode: pick a (prefill, decode) pair (the prefill policy
selects among prefill workers, the decode policy among decode workers), add
``bootstrap_host`` / ``bootstrap_port`` / ``bootstrap_room`` to the request so the two can
find each other to hand over the KV cache, send it to both at once, and answer with the
decode worker's response (streamed as it arrives). The prefill worker's answer is read and
dropped; if it fails, the request fails (502), since the decode worker cannot finish without
it.

Not retried: a retry would have to re-pair and re-send to both workers, and a half-done
bootstrap on the old pair cannot be taken back. Both workers count the request in their load
until the decode answer is finished.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any
from urllib.parse import urlsplit

import anyio
import orjson
from starlette.responses import Response, StreamingResponse

from sglctl.router.errors import RouterError
from sglctl.router.proxy import WORKER_HEADER, Finish
from sglctl.router.request import ParsedRequest
from sglctl.router.router import Router
from sglctl.router.upstream import UpstreamError, UpstreamResponse
from sglctl.router.workers import Worker

log = logging.getLogger(__name__)
_rng = random.SystemRandom()


def _batch_size(payload: dict[str, Any]) -> int | None:
    """The number of prompts of a batch request, or None for a single one."""
    for name in ("text", "prompt"):
        value = payload.get(name)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return len(value)
    ids = payload.get("input_ids")
    if isinstance(ids, list) and ids and all(isinstance(v, list) for v in ids):
        return len(ids)
    return None


def with_bootstrap(payload: dict[str, Any], prefill: Worker) -> bytes:
    """The request body with the KV hand-over coordinates of ``prefill`` added."""
    host = urlsplit(prefill.url).hostname or "127.0.0.1"
    batch = _batch_size(payload)
    body = dict(payload)
    if batch is None:
        body.update(
            bootstrap_host=host,
            bootstrap_port=prefill.bootstrap_port,
            bootstrap_room=_rng.getrandbits(63),
        )
    else:
        body.update(
            bootstrap_host=[host] * batch,
            bootstrap_port=[prefill.bootstrap_port] * batch,
            bootstrap_room=[_rng.getrandbits(63) for _ in range(batch)],
        )
    return orjson.dumps(body)


async def forward_pd(
    router: Router,
    route: str,
    parsed: ParsedRequest,
    headers: list[tuple[bytes, bytes]],
    finish: Finish,
) -> Response:
    registry = router.registry
    prefill_pool = registry.routable(role="prefill")
    decode_pool = registry.routable(role="decode")
    if not prefill_pool or not decode_pool:
        raise RouterError(
            503,
            f"no healthy prefill/decode pair ({len(prefill_pool)} prefill, "
            f"{len(decode_pool)} decode workers healthy)",
        )
    pair = router.policy.select_pair(prefill_pool, decode_pool, parsed.key, router.decode_policy)
    if pair is None:
        raise RouterError(503, "no healthy prefill/decode pair")
    prefill, decode = pair
    body = with_bootstrap(parsed.payload, prefill)
    upstream = router.upstream
    loop = asyncio.get_running_loop()
    deadline = loop.time() + router.config.request_timeout_secs
    path = route.encode("latin-1")
    for worker in pair:
        finish.add(worker.take_load_slot())

    async def drain_prefill() -> None:
        response = await upstream.request(prefill.url, b"POST", path, headers, body, deadline)
        try:
            await response.read()
            if response.status >= 400:
                raise UpstreamError(f"prefill worker answered HTTP {response.status}")
        finally:
            await response.aclose()

    prefill_task = asyncio.create_task(drain_prefill())
    prefill_task.add_done_callback(_retrieve)
    try:
        response = await upstream.request(decode.url, b"POST", path, headers, body, deadline)
    except BaseException as exc:
        prefill_task.cancel()
        if isinstance(exc, UpstreamError):
            decode.errors_total += 1
            decode.breaker.record_failure()
            raise RouterError(502, f"decode worker {decode.url} failed: {exc}") from None
        raise

    out_headers = {WORKER_HEADER: decode.url, "x-sglctl-prefill-worker": prefill.url}
    content_type = response.header("content-type") or "application/json"
    out_headers["content-type"] = content_type
    if content_type.startswith("text/event-stream"):
        return StreamingResponse(
            _relay(response, prefill_task, prefill, decode, finish),
            status_code=response.status,
            headers=out_headers,
        )
    try:
        content = await response.read()
        await prefill_task
    except UpstreamError as exc:
        failed = prefill if prefill_task.done() and prefill_task.exception() else decode
        failed.errors_total += 1
        failed.breaker.record_failure()
        raise RouterError(502, f"PD request failed at {failed.url}: {exc}") from None
    finally:
        if not prefill_task.done():
            prefill_task.cancel()
        await response.aclose()
    for worker in pair:
        worker.breaker.record_success()
    finish(response.status, response.status < 400)
    return Response(content, status_code=response.status, headers=out_headers)


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a prefill task's exception as seen (it is reported where it matters)."""
    if not task.cancelled():
        task.exception()


async def _relay(
    response: UpstreamResponse,
    prefill_task: asyncio.Task[None],
    prefill: Worker,
    decode: Worker,
    finish: Finish,
) -> Any:
    ok = False
    try:
        try:
            async for chunk in response:
                yield chunk
            ok = True
        except UpstreamError as exc:
            decode.errors_total += 1
            log.warning("PD stream from %s broke after it started: %s", decode.url, exc)
            message = f"decode worker {decode.url} failed mid-stream: {exc}"
            yield b"data: " + orjson.dumps(
                {"error": {"message": message, "type": "bad_gateway", "code": 502}}
            )
            yield b"\n\n"
        if prefill_task.done() and not prefill_task.cancelled() and prefill_task.exception():
            prefill.errors_total += 1
            log.warning("PD prefill at %s failed: %s", prefill.url, prefill_task.exception())
    finally:
        finish(response.status, ok)
        if not prefill_task.done():
            prefill_task.cancel()
        with anyio.CancelScope(shield=True):
            await response.aclose()
