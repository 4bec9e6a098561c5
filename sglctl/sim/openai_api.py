"""OpenAI-compatible endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Shapes follow SGLang's OpenAI adapter: responses carry ``matched_stop`` next to
``finish_reason``; usage always has ``prompt_tokens_details.cached_tokens`` (SGLang adds it
with ``--enable-cache-report``; the router and the benchmark rely on it, so the sim always
reports it). Streams send ``data: {chunk}`` events: for chat a first chunk with the assistant
role, content deltas, one chunk a choice with the ``finish_reason`` and an empty delta, then,
with ``stream_options.include_usage``, a chunk with empty ``choices`` and the usage, then
``data: [DONE]``.

Chat prompts are rendered with a Llama-3-style template. It is append-only: a conversation's
next turn starts with exactly the text of the previous turn's prompt, so multi-turn chats hit
the radix cache as they would on SGLang.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sglctl.sim.engine import Phase, SimRequest
from sglctl.sim.errors import APIError
from sglctl.sim.protocol import (
    GenerateItem,
    Sampling,
    new_rid,
    optional_bool,
    optional_int,
    optional_number,
    parse_json,
    require_object,
    string_list,
    token_list,
)
from sglctl.sim.service import SimWorker, aborted, stream_aborted, watch_disconnect
from sglctl.sim.streaming import DONE, EventStream, sse
from sglctl.sim.tokenizer import decode, encode

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _sim(request: Request) -> SimWorker:
    sim: SimWorker = request.app.state.sim
    return sim


# ----- request parsing -----------------------------------------------------------------------


def _sampling(body: dict[str, Any], default_max: int) -> Sampling:
    """OpenAI fields → sampling (validated with SGLang's ranges)."""
    max_tokens = optional_int(body, "max_completion_tokens", minimum=0)
    if max_tokens is None:
        max_tokens = optional_int(body, "max_tokens", minimum=0)
    min_tokens = optional_int(body, "min_tokens", minimum=0) or 0
    max_new = default_max if max_tokens is None else max_tokens
    if min_tokens > max_new:
        raise APIError(f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_new}).")
    temperature = optional_number(body, "temperature")
    if temperature is not None and not 0 <= temperature <= 2:
        raise APIError(f"temperature must be in [0, 2], got {temperature}.")
    top_p = optional_number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise APIError(f"top_p must be in (0, 1], got {top_p}.")
    for key in ("frequency_penalty", "presence_penalty"):
        value = optional_number(body, key)
        if value is not None and not -2 <= value <= 2:
            raise APIError(f"{key} must be in [-2, 2], got {value}.")
    optional_int(body, "seed")
    n = optional_int(body, "n", minimum=1) or 1
    if n > 128:
        raise APIError(f"n must be at most 128, got {n}.")
    stop_ids = body.get("stop_token_ids")
    return Sampling(
        max_new_tokens=max_new,
        min_new_tokens=min_tokens,
        stop=string_list(body.get("stop"), "stop"),
        stop_token_ids=[] if stop_ids is None else token_list(stop_ids, "stop_token_ids"),
        ignore_eos=optional_bool(body, "ignore_eos"),
        no_stop_trim=optional_bool(body, "no_stop_trim"),
        n=n,
    )


def _stream_options(body: dict[str, Any], stream: bool) -> tuple[bool, bool]:
    options = body.get("stream_options")
    if options is None:
        return False, False
    options = require_object(options, "stream_options")
    if not stream:
        raise APIError("stream_options can only be set when stream is true.")
    return (
        optional_bool(options, "include_usage"),
        optional_bool(options, "continuous_usage_stats"),
    )


def _model(body: dict[str, Any], sim: SimWorker) -> str:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError("model must be a string.")
    return model or sim.config.model_name


def render_chat(messages: Any) -> str:
    """The prompt text of a chat (Llama-3 style template, generation prompt appended)."""
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list of message objects.")
    parts = ["<|begin_of_text|>"]
    for position, message in enumerate(messages):
        message = require_object(message, f"messages[{position}]")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise APIError(
                f"messages[{position}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}."
            )
        content = _content_text(message.get("content"), position, role)
        parts.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>")
    parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def _content_text(content: Any, position: int, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""  # an assistant turn that only called tools
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise APIError(f"messages[{position}].content parts must be objects with a type.")
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise APIError(f"messages[{position}].content text parts need a string text.")
                texts.append(part["text"])
            # image/audio parts: a text-only model ignores them
        return "".join(texts)
    raise APIError(f"messages[{position}].content must be a string or a list of content parts.")


def _completion_prompts(prompt: Any) -> list[tuple[list[int], str | None]]:
    """``prompt`` of /v1/completions: str, [str], [int] or [[int]] → (ids, text) pairs."""
    if isinstance(prompt, str):
        return [(encode(prompt), prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [(encode(p), p) for p in prompt]
        if all(isinstance(p, list) for p in prompt):
            return [(token_list(p, "prompt"), None) for p in prompt]
        return [(token_list(prompt, "prompt"), None)]
    raise APIError("prompt must be a string, a list of strings, or token ids.")


def _items(prompts: list[list[int]], sampling: Sampling, rid: str) -> list[GenerateItem]:
    items: list[GenerateItem] = []
    for ids in prompts:
        for _ in range(sampling.n):
            index = len(items)
            items.append(GenerateItem(f"{rid}-{index}" if index else rid, ids, sampling, index))
    return items


# ----- response pieces -------------------------------------------------------------------------


def _finish(req: SimRequest) -> tuple[str | None, str | int | None]:
    if req.phase is Phase.ABORTED:
        return "abort", None
    if req.phase is not Phase.FINISHED:
        return None, None
    if req.plan.finish_type == "stop":
        return "stop", req.plan.matched
    return "length", None


def _usage(sim: SimWorker, reqs: list[SimRequest]) -> dict[str, Any]:
    # Parallel samples (n > 1) of one prompt count the prompt once, as OpenAI does.
    seen: set[int] = set()
    prompt = cached = 0
    for req in reqs:
        if id(req.input_ids) not in seen:
            seen.add(id(req.input_ids))
            prompt += req.prompt_tokens
            cached += req.cached_tokens
    completion = sum(sim.output_len(req) for req in reqs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


# ----- endpoints -------------------------------------------------------------------------------


async def models(request: Request) -> Response:
    sim = _sim(request)
    return _json(
        {
            "object": "list",
            "data": [
                {
                    "id": sim.config.model_name,
                    "object": "model",
                    "created": int(sim.started_at),
                    "owned_by": "sglang",
                    "root": sim.config.model_path,
                    "max_model_len": sim.config.context_length,
                }
            ],
        }
    )


async def completions(request: Request) -> Response | EventStream:
    sim = _sim(request)
    body = require_object(parse_json(await request.body()))
    stream = optional_bool(body, "stream")
    include_usage, continuous = _stream_options(body, stream)
    sampling = _sampling(body, 16)  # OpenAI's default max_tokens for completions
    echo = optional_bool(body, "echo")
    model = _model(body, sim)
    prompts = _completion_prompts(body.get("prompt"))
    rid = f"cmpl-{new_rid()}"
    items = _items([ids for ids, _ in prompts], sampling, rid)
    prefixes = [
        (text if text is not None else decode(item.input_ids)) if echo else ""
        for item in items
        for text in [prompts[item.index // sampling.n][1]]
    ]
    reqs = await sim.begin(items, stream, body, request.receive)
    created = int(time.time())
    if stream:
        chunks = _completion_stream(
            sim, reqs, rid, model, created, prefixes, include_usage, continuous
        )
        return EventStream(chunks, lambda: sim.abort(reqs))
    if not await _wait(sim, request, reqs):
        return _json({"error": {"message": "aborted", "type": "Aborted", "code": 499}}, 499)
    choices = []
    for index, req in enumerate(reqs):
        reason, matched = _finish(req)
        choices.append(
            {
                "index": index,
                "text": prefixes[index] + req.plan.final_text(),
                "logprobs": None,
                "finish_reason": reason,
                "matched_stop": matched,
            }
        )
    sim.answered()
    return _json(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": _usage(sim, reqs),
        }
    )


async def chat_completions(request: Request) -> Response | EventStream:
    sim = _sim(request)
    body = require_object(parse_json(await request.body()))
    stream = optional_bool(body, "stream")
    include_usage, continuous = _stream_options(body, stream)
    sampling = _sampling(body, sim.config.default_max_new_tokens)
    model = _model(body, sim)
    prompt_ids = encode(render_chat(body.get("messages")))
    rid = f"chatcmpl-{new_rid()}"
    items = _items([prompt_ids], sampling, rid)
    reqs = await sim.begin(items, stream, body, request.receive)
    created = int(time.time())
    if stream:
        chunks = _chat_stream(sim, reqs, rid, model, created, include_usage, continuous)
        return EventStream(chunks, lambda: sim.abort(reqs))
    if not await _wait(sim, request, reqs):
        return _json({"error": {"message": "aborted", "type": "Aborted", "code": 499}}, 499)
    choices = []
    for index, req in enumerate(reqs):
        reason, matched = _finish(req)
        message = {
            "role": "assistant",
            "content": req.plan.final_text(),
            "reasoning_content": None,
            "tool_calls": None,
        }
        choices.append(
            {
                "index": index,
                "message": message,
                "logprobs": None,
                "finish_reason": reason,
                "matched_stop": matched,
            }
        )
    sim.answered()
    return _json(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": _usage(sim, reqs),
        }
    )


async def _wait(sim: SimWorker, request: Request, reqs: list[SimRequest]) -> bool:
    """Wait for every request; False when the client left (the requests are aborted)."""
    watcher = watch_disconnect(request.receive, lambda: sim.abort(reqs))
    try:
        await sim.wait_all(reqs)
    finally:
        watcher.cancel()
    return not aborted(reqs)


async def _deltas(sim: SimWorker, reqs: list[SimRequest]) -> AsyncIterator[list[tuple[int, str]]]:
    """Per scheduler wake-up, the new text of each request that progressed: (index, delta)."""
    shown = [0] * len(reqs)
    interval = sim.config.stream_interval
    last_n = [-1] * len(reqs)
    final = [False] * len(reqs)
    async for _ in sim.progress(reqs):
        if stream_aborted(reqs):
            return
        batch: list[tuple[int, str]] = []
        for i, req in enumerate(reqs):
            if final[i] or req.first_token_time is None:
                continue
            n = sim.output_len(req)
            if not req.done and (n == last_n[i] or (last_n[i] >= 0 and n - last_n[i] < interval)):
                continue
            text = req.plan.visible_text(n)
            batch.append((i, text[shown[i] :]))
            shown[i] = len(text)
            last_n[i] = req.last_notified = n
            final[i] = req.done
        if batch:
            yield batch


def _chunk(rid: str, obj: str, created: int, model: str, choices: list[Any], usage: Any) -> bytes:
    return sse(
        orjson.dumps(
            {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": choices,
                "usage": usage,
            }
        )
    )


async def _chat_stream(
    sim: SimWorker,
    reqs: list[SimRequest],
    rid: str,
    model: str,
    created: int,
    include_usage: bool,
    continuous: bool,
) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk"
    started = [False] * len(reqs)
    async for batch in _deltas(sim, reqs):
        usage = _usage(sim, reqs) if continuous else None
        for i, delta in batch:
            req = reqs[i]
            if not started[i]:
                started[i] = True
                role = {"role": "assistant", "content": ""}
                choice = _chat_choice(i, role, None, None)
                yield _chunk(rid, obj, created, model, [choice], usage)
            if delta:
                choice = _chat_choice(i, {"content": delta}, None, None)
                yield _chunk(rid, obj, created, model, [choice], usage)
            if req.done:
                reason, matched = _finish(req)
                yield _chunk(
                    rid, obj, created, model, [_chat_choice(i, {}, reason, matched)], usage
                )
    if stream_aborted(reqs):
        return
    if include_usage:
        yield _chunk(rid, obj, created, model, [], _usage(sim, reqs))
    yield DONE
    sim.answered()


def _chat_choice(index: int, delta: dict[str, Any], reason: str | None, matched: Any) -> dict:
    return {
        "index": index,
        "delta": delta,
        "logprobs": None,
        "finish_reason": reason,
        "matched_stop": matched,
    }


async def _completion_stream(
    sim: SimWorker,
    reqs: list[SimRequest],
    rid: str,
    model: str,
    created: int,
    prefixes: list[str],
    include_usage: bool,
    continuous: bool,
) -> AsyncIterator[bytes]:
    obj = "text_completion"
    echoed = [False] * len(reqs)
    async for batch in _deltas(sim, reqs):
        usage = _usage(sim, reqs) if continuous else None
        for i, delta in batch:
            req = reqs[i]
            if not echoed[i]:
                echoed[i] = True
                delta = prefixes[i] + delta
            reason, matched = _finish(req)
            choice = {
                "index": i,
                "text": delta,
                "logprobs": None,
                "finish_reason": reason,
                "matched_stop": matched,
            }
            yield _chunk(rid, obj, created, model, [choice], usage)
    if stream_aborted(reqs):
        return
    if include_usage:
        yield _chunk(rid, obj, created, model, [], _usage(sim, reqs))
    yield DONE
    sim.answered()


def routes() -> list[Route]:
    return [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
