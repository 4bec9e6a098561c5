"""SGLang's native endpoints: ``/generate``, health, info, load, cache and metrics.

Shapes follow SGLang's ``http_server.py`` (checked against its docs and source):

* ``/generate`` → ``{"text", "output_ids", "meta_info": {"id", "finish_reason",
  "prompt_tokens", "weight_version", "completion_tokens", "cached_tokens", "e2e_latency"}}``
  (a list of those for a batch). Streaming sends ``data: {...}`` events with the cumulative
  text (``finish_reason`` null until the last one), then ``data: [DONE]``; streamed chunks
  leave out ``output_ids`` to stay cheap.
* ``/health`` and ``/health_generate`` answer 200 with an empty body.
* ``/flush_cache`` answers SGLang's text, 200 when flushed, 400 while requests are in flight.
* ``/get_load`` answers a list with one entry per data-parallel rank (one here).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from sglctl.sim.engine import SimRequest
from sglctl.sim.errors import APIError
from sglctl.sim.metrics import CONTENT_TYPE, HEALTH_CHECK_PREFIX
from sglctl.sim.protocol import (
    GenerateItem,
    Sampling,
    new_rid,
    parse_generate,
    parse_json,
    token_list,
)
from sglctl.sim.service import (
    SIM_VERSION,
    SimWorker,
    aborted,
    finish_reason,
    stream_aborted,
    watch_disconnect,
)
from sglctl.sim.streaming import DONE, EventStream, sse
from sglctl.sim.tokenizer import decode, encode

HEALTH_CHECK_TIMEOUT_S = 20.0  # SGLang's HEALTH_CHECK_TIMEOUT default
HEALTH_POLL_S = 0.05

FLUSH_MESSAGE = (
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def sim_of(request: Request) -> SimWorker:
    sim: SimWorker = request.app.state.sim
    return sim


def meta_info(sim: SimWorker, req: SimRequest, n_tokens: int) -> dict[str, Any]:
    return {
        "id": req.rid,
        "finish_reason": finish_reason(req),
        "prompt_tokens": req.prompt_tokens,
        "weight_version": "default",
        "completion_tokens": n_tokens,
        "cached_tokens": req.cached_tokens,
        "e2e_latency": sim.now() - req.arrival,
    }


def native_output(
    sim: SimWorker, req: SimRequest, *, with_ids: bool, logprobs: bool = False
) -> dict[str, Any]:
    n = sim.output_len(req)
    out: dict[str, Any] = {"text": req.plan.visible_text(n)}
    if with_ids:
        out["output_ids"] = req.plan.ids(n)
    out["meta_info"] = meta_info(sim, req, n)
    if logprobs:
        out["meta_info"].update(token_logprobs(req, n))
    return out


def _logprob(token_id: int) -> float:
    """A deterministic stand-in for a log-probability, in [-4, 0)."""
    return -((token_id * 2654435761) % 4000 + 1) / 1000


def token_logprobs(req: SimRequest, n: int) -> dict[str, Any]:
    """SGLang's ``return_logprob`` fields: ``[logprob, token_id, None]`` per token.

    The first input token has no logprob (None), as in SGLang. A PD decode worker never ran
    the prompt, so its ``input_token_logprobs`` is empty: the PD router puts the prefill
    worker's in front (what the SGLang Router does).
    """
    inputs: list[list[Any]] = []
    if not req.preloaded:
        inputs = [[_logprob(t) if i else None, t, None] for i, t in enumerate(req.input_ids)]
    outputs = [[_logprob(t), t, None] for t in req.plan.ids(n)]
    return {"input_token_logprobs": inputs, "output_token_logprobs": outputs}


async def generate(request: Request) -> Response | EventStream:
    sim = sim_of(request)
    body = parse_json(await request.body())
    call = parse_generate(body, sim.config.default_max_new_tokens)
    reqs = await sim.begin(call.items, call.stream, body, request.receive)
    if call.stream:
        chunks = _stream(sim, reqs, call.batched, call.return_logprob)
        return EventStream(chunks, lambda: sim.abort(reqs))
    watcher = watch_disconnect(request.receive, lambda: sim.abort(reqs))
    try:
        await sim.wait_all(reqs)
    finally:
        watcher.cancel()
    if aborted(reqs):
        return json_response({"error": {"message": "aborted", "type": "Aborted", "code": 499}}, 499)
    outs = [native_output(sim, req, with_ids=True, logprobs=call.return_logprob) for req in reqs]
    sim.answered()
    return json_response(outs if call.batched else outs[0])


async def _stream(
    sim: SimWorker, reqs: list[SimRequest], batched: bool, logprobs: bool
) -> AsyncIterator[bytes]:
    """Cumulative chunks, at most one a request per scheduler wake-up, then ``[DONE]``."""
    sent = [-1] * len(reqs)
    final_sent = [False] * len(reqs)
    interval = sim.config.stream_interval
    async for _ in sim.progress(reqs):
        if stream_aborted(reqs):
            return
        for i, req in enumerate(reqs):
            if final_sent[i] or req.first_token_time is None:
                continue
            n = sim.output_len(req)
            if not req.done and (n == sent[i] or (sent[i] >= 0 and n - sent[i] < interval)):
                continue
            chunk = native_output(sim, req, with_ids=False, logprobs=logprobs)
            if batched:
                chunk["index"] = i
            yield sse(orjson.dumps(chunk))
            sent[i] = req.last_notified = n
            final_sent[i] = req.done
    yield DONE
    sim.answered()


async def health(request: Request) -> Response:
    return Response(status_code=200)


async def health_generate(request: Request) -> Response:
    """SGLang's deep health check: a one-token generation through the scheduler.

    As in SGLang, any output of the scheduler while we wait also proves it alive (a worker
    saturated with long requests is healthy even if the probe waits in the queue); nothing
    within ``HEALTH_CHECK_TIMEOUT_S`` means unhealthy: 503. Not counted by fault injection.
    """
    sim = sim_of(request)
    engine = sim.engine
    item = GenerateItem(f"{HEALTH_CHECK_PREFIX}{new_rid()}", [1], Sampling(max_new_tokens=1))
    reqs = sim.submit([item], stream=False)
    generated = engine.generated_tokens
    deadline = sim.now() + HEALTH_CHECK_TIMEOUT_S
    try:
        while not reqs[0].done and engine.generated_tokens == generated:
            if sim.now() > deadline:
                return Response(status_code=503)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(reqs[0].changed.wait(), HEALTH_POLL_S)
    finally:
        sim.abort(reqs, "health check done")
    return Response(status_code=200)


def model_info_body(sim: SimWorker) -> dict[str, Any]:
    config = sim.config
    return {
        "model_path": config.model_path,
        "tokenizer_path": config.tokenizer_path or config.model_path,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": "default",
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
    }


async def model_info(request: Request) -> Response:
    return json_response(model_info_body(sim_of(request)))


def server_args(sim: SimWorker) -> dict[str, Any]:
    config = sim.config
    timing = config.timing
    return {
        "model_path": config.model_path,
        "tokenizer_path": config.tokenizer_path or config.model_path,
        "served_model_name": config.model_name,
        "page_size": config.page_size,
        "kv_events_config": config.kv_events_config,
        "host": config.host,
        "port": config.port,
        "tp_size": config.tp_size,
        "dp_size": config.dp_size,
        "context_length": config.context_length,
        "max_running_requests": config.max_running_requests,
        "max_total_tokens": config.kv_cache_tokens,
        "chunked_prefill_size": config.chunked_prefill_size,
        "max_prefill_tokens": config.max_prefill_tokens,
        "schedule_policy": "fcfs",
        "stream_interval": config.stream_interval,
        "disable_radix_cache": False,
        "disaggregation_mode": config.disaggregation_mode,
        "disaggregation_bootstrap_port": config.bootstrap_port,
        "disaggregation_transfer_backend": "sim",
        "disaggregation_timeout": config.disaggregation_timeout_s,
        "random_seed": config.seed,
        "log_level": config.log_level,
        "sim": {
            "speedup": timing.speedup,
            "prefill_base_s": timing.prefill_base_s,
            "prefill_per_token_s": timing.prefill_per_token_s,
            "prefill_per_pair_s": timing.prefill_per_pair_s,
            "decode_base_s": timing.decode_base_s,
            "decode_per_seq_s": timing.decode_per_seq_s,
            "decode_per_ctx_token_s": timing.decode_per_ctx_token_s,
            "crash_after": config.crash_after,
            "error_rate": config.error_rate,
            "stall_after": config.stall_after,
            "kv_bytes_per_token": config.transfer.kv_bytes_per_token,
            "kv_link_gbps": config.transfer.link_gbps,
            "kv_transfer_latency_ms": config.transfer.latency_ms,
        },
    }


async def server_info(request: Request) -> Response:
    sim = sim_of(request)
    engine = sim.engine
    body = {
        **server_args(sim),
        "max_total_num_tokens": sim.config.kv_cache_tokens,
        "max_req_input_len": sim.config.context_length - 1,
        "internal_states": [
            {
                "last_gen_throughput": engine.gen_throughput,
                "num_running_reqs": engine.num_running,
                "num_queue_reqs": engine.num_waiting,
                "token_usage": engine.token_usage,
                "cache_hit_rate": engine.cache_hit_rate,
            }
        ],
        "version": SIM_VERSION,
    }
    if sim.prefill is not None:
        body["disaggregation"] = sim.prefill.stats()
    elif sim.decode is not None:
        body["disaggregation"] = sim.decode.stats()
    return json_response(body)


async def get_load(request: Request) -> Response:
    engine = sim_of(request).engine
    load = {
        "dp_rank": 0,
        "num_reqs": engine.num_running + engine.num_waiting,
        "num_waiting_reqs": engine.num_waiting,
        "num_tokens": engine.cache.used,
    }
    return json_response([load])


async def flush_cache(request: Request) -> Response:
    flushed = sim_of(request).engine.flush_cache()
    return Response(FLUSH_MESSAGE, status_code=200 if flushed else 400, media_type="text/plain")


async def metrics(request: Request) -> Response:
    return Response(sim_of(request).metrics.render(), media_type=CONTENT_TYPE)


async def tokenize(request: Request) -> Response:
    """SGLang's ``/tokenize``: ``{"prompt": str}`` → ``{"tokens", "count", "max_model_len"}``."""
    sim = sim_of(request)
    body = parse_json(await request.body())
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if not isinstance(prompt, str):
        raise APIError("prompt must be a string.")
    tokens = encode(prompt)
    return json_response(
        {"tokens": tokens, "count": len(tokens), "max_model_len": sim.config.context_length}
    )


async def detokenize(request: Request) -> Response:
    body = parse_json(await request.body())
    tokens = token_list(body.get("tokens") if isinstance(body, dict) else None, "tokens")
    return json_response({"text": decode(tokens)})
