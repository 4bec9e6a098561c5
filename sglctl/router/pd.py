"""Prefill/decode disaggregation: each attempt goes to a prefill *and* a decode worker.

The PD plan for the router's one forwarding loop (:meth:`~sglctl.router.proxy.Forwarder.run`):
retries, circuit breakers, in-flight interruption, load slots, the stream relay and metrics
are the regular path's; what is PD's own is here. One attempt, as the SGLang Router does it:

1. **Pair.** The prefill policy (``--prefill-policy``, default ``--policy``: cache-aware over
   the prefill pool's own tree) picks among the routable prefill workers, the decode policy
   (``--decode-policy``, default power-of-two) among the decode workers; each breaker must
   allow it. A worker that already failed this request is not offered again while another
   one of its pool is left (then the same one, after the backoff, within the retry limits).
2. **Bootstrap.** ``bootstrap_host`` (the prefill's host), ``bootstrap_port`` (from
   ``--prefill URL PORT``, else the worker's ``/get_server_info``, else SGLang's default
   8998) and a fresh random ``bootstrap_room`` -- a list of them, one room a prompt, for a
   batch -- are added to the body. Every attempt has new rooms: the failed pair's rooms may
   be half torn down on the workers.
3. **Both at once.** The decode worker gets the request as sent; the prefill worker the same
   with ``stream`` off, because its answer is only a verdict -- "the KV went over" (SGLang's
   prefill answers once the transfer is done) -- plus the prompt's logprobs: a whole answer
   carries both in its status and body, a streamed one would put the verdict after its head.
4. **Verdict.** The client's answer starts once the decode's head is in *and* the prefill
   answered well; until then nothing reached the client, so a failure of either half is a
   retry of the pair. The other half is closed at once (the worker sees its client gone and
   frees the room and its KV). Blame: a half that failed by itself (connection, timeout,
   interruption, its own 5xx) gets the breaker failure; a decode 5xx right after a prefill
   crash is the crash's consequence and blames the prefill only (the decode is given
   :data:`BLAME_GRACE_S` to let the prefill's failure arrive), while a decode 5xx after a
   *good* prefill is a KV transfer failure (``sglang_router_pd_transfer_failures_total``).
   A 4xx from either half is the client's answer as is (the other would say the same).
5. **Answer.** The decode's, relayed like any answer. With ``return_logprob`` the prefill's
   ``meta_info.input_token_logprobs`` (the prompt's, which the decode never computed) are put
   in front of the decode's, in the whole body or in every streamed event, as the SGLang
   Router does.

Load: each half holds its worker's load slot for as long as it talks to it (the prefill until
its answer, the decode until the last byte).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from starlette.responses import Response

from sglctl.router.metrics import note_attempt
from sglctl.router.proxy import AttemptFailed, Finish, Forwarder, Head
from sglctl.router.request import ParsedRequest
from sglctl.router.responses import Reply
from sglctl.router.retry import RetryAttempts
from sglctl.router.upstream import UpstreamError
from sglctl.router.workers import Worker

if TYPE_CHECKING:
    from sglctl.router.router import Router

log = logging.getLogger(__name__)
_rng = random.SystemRandom()

#: SGLang's default ``--disaggregation-bootstrap-port``.
DEFAULT_BOOTSTRAP_PORT = 8998
#: Header naming the prefill worker of a PD answer (the decode one is ``x-sglctl-worker``).
PREFILL_HEADER = "x-sglctl-prefill-worker"
#: After a decode 5xx, how long the prefill half may take to report its own failure (a crash
#: reaches the decode over the bootstrap link and the router over its own connection; either
#: may come first) before the decode is blamed alone.
BLAME_GRACE_S = 1.0
_SERVER_INFO_TIMEOUT_S = 10.0


def batch_size(payload: dict[str, Any]) -> int | None:
    """The number of prompts of a batch request, or None for a single one."""
    for name in ("text", "prompt"):
        value = payload.get(name)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return len(value)
    for name in ("input_ids", "prompt"):
        ids = payload.get(name)
        if isinstance(ids, list) and ids and all(isinstance(v, list) for v in ids):
            return len(ids)
    return None


def bootstrap_fields(host: str, port: int, batch: int | None) -> dict[str, Any]:
    """New hand-over coordinates: scalars for one prompt, lists (one room each) for a batch."""
    if batch is None:
        return {"bootstrap_host": host, "bootstrap_port": port, "bootstrap_room": _room()}
    return {
        "bootstrap_host": [host] * batch,
        "bootstrap_port": [port] * batch,
        "bootstrap_room": [_room() for _ in range(batch)],
    }


def _room() -> int:
    return _rng.getrandbits(63)


async def bootstrap_port(forwarder: Forwarder, worker: Worker, deadline: float) -> int:
    """``worker``'s bootstrap port: as configured, else asked once from its server info.

    ``--mode pd --prefill-urls URL`` names no port; real SGLang (and the sim) report it as
    ``disaggregation_bootstrap_port`` in ``/get_server_info``. A worker that answers without
    it gets SGLang's default, said once in the log. An unreachable worker fails the attempt
    (blamed on it) and is asked again next time.
    """
    if worker.bootstrap_port is not None:
        return worker.bootstrap_port
    loop = asyncio.get_running_loop()
    limit = min(deadline, loop.time() + _SERVER_INFO_TIMEOUT_S)
    try:
        response = await forwarder.upstream.request(
            worker.url, b"GET", b"/get_server_info", [], b"", limit
        )
        try:
            status, content = response.status, await response.read()
        finally:
            await response.aclose()
    except UpstreamError as exc:
        raise AttemptFailed(
            f"{worker.url}: cannot ask its bootstrap port (/get_server_info): {exc}",
            blamed=[worker],
        ) from None
    port: Any = None
    if status == 200:
        try:
            info = orjson.loads(content)
        except orjson.JSONDecodeError:
            info = None
        if isinstance(info, dict):
            port = info.get("disaggregation_bootstrap_port")
    if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
        log.info("prefill worker %s: bootstrap port %d (its /get_server_info)", worker.url, port)
    else:
        port = DEFAULT_BOOTSTRAP_PORT
        log.warning(
            "prefill worker %s reports no disaggregation_bootstrap_port in /get_server_info "
            "(HTTP %d); using SGLang's default %d. If it listens elsewhere, give it as "
            "--prefill %s PORT",
            worker.url,
            status,
            port,
            worker.url,
        )
    if worker.bootstrap_port is None:
        worker.bootstrap_port = port
    return worker.bootstrap_port


class _Rejected(Exception):
    """The prefill half answered a 4xx: the client's answer as is."""

    def __init__(self, status: int, content: bytes, content_type: str | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.content = content
        self.content_type = content_type


class PDPlan:
    """One PD request's attempts: pairs, bootstrap rooms, the two halves and their verdict."""

    def __init__(
        self,
        forwarder: Forwarder,
        route: str,
        parsed: ParsedRequest,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        self.fw = forwarder
        self.path = route.encode("latin-1")
        self.payload = parsed.payload
        self.key = parsed.key
        self.headers = headers
        self.stream = parsed.stream
        self.batch = batch_size(parsed.payload)
        self.logprobs = parsed.payload.get("return_logprob") is True
        #: Attempts per worker URL (a pair attempt counts once for each of its workers).
        self.used: Counter[str] = Counter()
        #: Workers that failed this request: not offered again while their pool has others.
        self.failed: set[str] = set()
        self._healthy = (0, 0)

    # -- the pair --------------------------------------------------------------------------
    def _candidates(self, pool: Sequence[Worker]) -> list[Worker]:
        limit = self.fw.retry.max_worker_retries
        allowed = [w for w in pool if self.used[w.url] <= limit]
        fresh = [w for w in allowed if w.url not in self.failed]
        return fresh or allowed

    def pick(self, attempts: RetryAttempts) -> Sequence[Worker] | None:
        fw = self.fw
        prefills = fw.registry.routable(role="prefill")
        decodes = fw.registry.routable(role="decode")
        self._healthy = (len(prefills), len(decodes))
        prefill_pool, decode_pool = self._candidates(prefills), self._candidates(decodes)
        if not prefill_pool or not decode_pool:
            return None
        decode_policy = fw.decode_policy or fw.policy
        prefill = fw.choose(prefill_pool, self.key, fw.policy)
        if prefill is None:
            return None
        decode = fw.choose(decode_pool, self.key, decode_policy)
        if decode is None:
            prefill.breaker.release()
            return None
        self.used[prefill.url] += 1
        self.used[decode.url] += 1
        attempts.record(f"{prefill.url} + {decode.url}")
        log.debug(
            "pd pair: prefill %s (policy %s, %s), decode %s (policy %s)",
            prefill.url,
            fw.policy.name,
            fw.policy.last_decision,
            decode.url,
            decode_policy.name,
        )
        note_attempt(decode_policy, decode_pool, self.key, decode)  # [observability]
        if fw.metrics is not None:
            fw.metrics.pd_dispatched(prefill.url, decode.url)
        return (prefill, decode)

    def unavailable(self) -> str:
        prefills, decodes = self._healthy
        return (
            f"no healthy prefill/decode pair ({prefills} prefill, {decodes} decode workers healthy)"
        )

    # -- one attempt -----------------------------------------------------------------------
    async def attempt(self, workers: Sequence[Worker], deadline: float, finish: Finish) -> Reply:
        prefill, decode = workers
        try:
            return await self._attempt(prefill, decode, deadline, finish)
        except AttemptFailed as failure:
            self.failed.update(w.url for w in failure.blamed)
            raise

    def _bodies(self, host: str, port: int) -> tuple[bytes, bytes]:
        """(prefill body, decode body) with the same new rooms."""
        boot = bootstrap_fields(host, port, self.batch)
        decode = orjson.dumps({**self.payload, **boot})
        if not self.stream:
            return decode, decode
        prefill = {**self.payload, **boot, "stream": False}
        prefill.pop("stream_options", None)
        return orjson.dumps(prefill), decode

    async def _prefill(self, worker: Worker, body: bytes, deadline: float) -> bytes:
        """The prefill half: its whole answer (2xx), or :class:`_Rejected` / a failure."""
        head = await self.fw.open(worker, b"POST", self.path, body, self.headers, deadline)
        content_type = head.response.header("content-type")
        content = await self.fw.read_whole(head, deadline)
        if head.status >= 400:
            raise _Rejected(head.status, content, content_type)
        return content

    async def _attempt(
        self, prefill: Worker, decode: Worker, deadline: float, finish: Finish
    ) -> Reply:
        fw = self.fw
        port = await bootstrap_port(fw, prefill, deadline)
        host = urlsplit(prefill.url).hostname or "127.0.0.1"
        prefill_body, decode_body = self._bodies(host, port)
        started = time.perf_counter()
        p_task = asyncio.create_task(self._prefill(prefill, prefill_body, deadline))
        d_task = asyncio.create_task(
            fw.open(decode, b"POST", self.path, decode_body, self.headers, deadline)
        )
        decode_first = False
        try:
            while not (p_task.done() and d_task.done()):
                await asyncio.wait(
                    [t for t in (p_task, d_task) if not t.done()],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if p_task.done() and _raised(p_task):
                    break
                if d_task.done() and (_raised(d_task) or d_task.result().status >= 400):
                    decode_first = not p_task.done()
                    break
            d_error = _error(d_task)
            if decode_first and d_error is not None and d_error.status is not None:
                loop = asyncio.get_running_loop()
                grace = max(min(BLAME_GRACE_S, deadline - loop.time()), 0.0)
                await asyncio.wait([p_task], timeout=grace)
        except BaseException:
            await self._drop(p_task, d_task)  # the client left: close both halves
            raise
        for task in (p_task, d_task):
            if _raised(task) and not isinstance(task.exception(), (AttemptFailed, _Rejected)):
                await self._drop(p_task, d_task)
                raise task.exception()  # type: ignore[misc]  # a bug: not a worker's failure
        p_error, d_error = _error(p_task), _error(d_task)
        if p_error is not None or d_error is not None:
            await self._drop(p_task, d_task)
            raise self._blame(prefill, decode, p_task, p_error, d_error, decode_first)
        if p_task.done() and isinstance(p_task.exception(), _Rejected):
            await self._drop(d_task)
            rejected = p_task.exception()
            assert isinstance(rejected, _Rejected)
            prefill.breaker.record_success()  # a 4xx is the request's fault, not the worker's
            decode.breaker.release()
            finish(rejected.status, False)
            headers = {"x-sglctl-worker": prefill.url, PREFILL_HEADER: prefill.url}
            if rejected.content_type:
                headers["content-type"] = rejected.content_type
            return Response(rejected.content, status_code=rejected.status, headers=headers)
        head: Head = d_task.result()
        if not p_task.done():  # the decode's own 4xx came first: the prefill is moot
            await self._drop(p_task)
            prefill.breaker.release()
            return await fw.deliver(head, deadline, finish, headers={PREFILL_HEADER: prefill.url})
        prefill_answer: bytes = p_task.result()
        prefill.breaker.record_success()
        if fw.metrics is not None:
            fw.metrics.pd_prefill_done(time.perf_counter() - started)
        rewrite = LogprobMerge(prefill_answer) if self.logprobs and head.status < 400 else None
        return await fw.deliver(
            head, deadline, finish, headers={PREFILL_HEADER: prefill.url}, rewrite=rewrite
        )

    def _blame(
        self,
        prefill: Worker,
        decode: Worker,
        p_task: asyncio.Task[bytes],
        p_error: AttemptFailed | None,
        d_error: AttemptFailed | None,
        decode_first: bool,
    ) -> AttemptFailed:
        """The attempt's failure, blaming the half (or halves) that failed by itself."""
        blamed: list[Worker] = []
        if p_error is not None and (
            p_error.status is None or d_error is None or d_error.status is None or not decode_first
        ):
            blamed.append(prefill)
        if d_error is not None and (
            d_error.status is None
            or p_error is None
            or (p_error.status is not None and decode_first)
        ):
            blamed.append(decode)
        prefill_ok = p_task.done() and not p_task.cancelled() and p_task.exception() is None
        if d_error is not None and d_error.status is not None and prefill_ok:
            if self.fw.metrics is not None:
                self.fw.metrics.pd_transfer_failed()
            log.warning(
                "PD transfer failed: decode %s answered HTTP %d after prefill %s handed over",
                decode.url,
                d_error.status,
                prefill.url,
            )
        errors = [e for e in (p_error, d_error) if e is not None]
        message = "; ".join(f"{'prefill' if e is p_error else 'decode'} {e}" for e in errors)
        return AttemptFailed(
            message,
            any(e.timed_out for e in errors),
            status=errors[0].status,
            blamed=blamed or [decode],
        )

    async def _drop(self, *tasks: asyncio.Task[Any]) -> None:
        """Stop the halves still running and close any head already in (abort them)."""
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.wait(tasks)
        for task in tasks:
            if task.cancelled() or task.exception() is not None:
                continue
            result = task.result()
            if isinstance(result, Head):
                await result.abandon(self.fw.in_flight)


def _raised(task: asyncio.Task[Any]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is not None


def _error(task: asyncio.Task[Any]) -> AttemptFailed | None:
    """The task's attempt failure, if it is done with one."""
    if not task.done() or task.cancelled():
        return None
    exc = task.exception()
    return exc if isinstance(exc, AttemptFailed) else None


class LogprobMerge:
    """Puts the prefill's ``input_token_logprobs`` in front of the decode's (``return_logprob``).

    The decode worker never ran the prompt, so its ``meta_info.input_token_logprobs`` is empty;
    the prefill worker's answer has them. As the SGLang Router does, every decode object that
    has the field gets the prefill's list in front: the whole answer, or each streamed event
    (a batch's by its ``index``). Anything that does not parse passes through unchanged.
    """

    def __init__(self, prefill_answer: bytes) -> None:
        self.inputs: list[Any] = []
        try:
            answer = orjson.loads(prefill_answer)
        except orjson.JSONDecodeError:
            answer = None
        for item in answer if isinstance(answer, list) else [answer]:
            meta = item.get("meta_info") if isinstance(item, dict) else None
            inputs = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
            self.inputs.append(inputs if isinstance(inputs, list) else None)
        self._pending = b""

    def _merge(self, obj: Any, index: int) -> bool:
        meta = obj.get("meta_info") if isinstance(obj, dict) else None
        if not isinstance(meta, dict) or not 0 <= index < len(self.inputs):
            return False
        decode, prefill = meta.get("input_token_logprobs"), self.inputs[index]
        if not isinstance(decode, list) or prefill is None:
            return False
        meta["input_token_logprobs"] = prefill + decode
        return True

    def whole(self, content: bytes) -> bytes:
        try:
            answer = orjson.loads(content)
        except orjson.JSONDecodeError:
            return content
        items = answer if isinstance(answer, list) else [answer]
        merged = [self._merge(item, i) for i, item in enumerate(items)]
        return orjson.dumps(answer) if any(merged) else content

    def chunk(self, chunk: bytes) -> bytes:
        """Whole events, rewritten; a partial event waits for its end."""
        data = self._pending + chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return b""
        self._pending = data[end + 2 :]
        events = data[: end + 2].split(b"\n\n")
        return b"".join(self._event(e) for e in events[:-1])

    def end(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    def _event(self, event: bytes) -> bytes:
        if event.startswith(b"data: {"):
            try:
                obj = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                return event + b"\n\n"
            index = obj.get("index", 0) if isinstance(obj, dict) else 0
            if self._merge(obj, index if isinstance(index, int) else 0):
                return b"data: " + orjson.dumps(obj) + b"\n\n"
        return event + b"\n\n"


async def forward_pd(
    router: Router,
    route: str,
    parsed: ParsedRequest,
    headers: list[tuple[bytes, bytes]],
    finish: Finish,
) -> Reply:
    """A PD request through the router's one forwarding loop (the module docstring)."""
    forwarder = router.forwarder
    assert forwarder is not None, "router not started"
    return await forwarder.run(PDPlan(forwarder, route, parsed, headers), finish)
