"""Reading and checking an inference request's body, once.

The body is read with the ``--max-payload-size`` cap (413 past it, even without a
Content-Length), parsed once with orjson, and the few fields the router relies on are
type-checked (400 with a message naming the field). The routing text comes from the same
parse: ``text`` or ``input_ids`` (``/generate``), ``prompt`` (completions), or the
``messages`` contents (chat). The original bytes are what gets forwarded.

Bodies above :data:`OFF_LOOP_BYTES` are parsed in a helper process
(:func:`parse_inference_async`): a 1M-key, 8.8 MB object takes orjson about 0.5 s, and parsed
on the event loop it held every other request for that long (262 ms measured for a concurrent
one). A thread is not enough: orjson builds the objects without giving the GIL back, and the
loop was measured stalled for the whole parse (1.1-1.5 s under load) from the second large
body on. The helper sends back only what the router reads (the routing key, ``stream``,
``priority``), not the parsed object, so the loop pays for copying the bytes, not for
rebuilding a million keys. PD mode re-serialises the whole object (``pd.with_bootstrap``), so
there (``need_payload``) big bodies are parsed in the loop as before.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from typing import Any

import orjson
from starlette.requests import Request

from sglctl.router.errors import RouterError
from sglctl.router.policies.base import NO_KEY, RouteKey

log = logging.getLogger(__name__)


@dataclass
class ParsedRequest:
    """An inference request: the raw body, its parsed JSON object and what routing needs."""

    body: bytes
    payload: dict[str, Any]
    key: RouteKey
    stream: bool


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes without buffering them all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise RouterError(
                    413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes"
                )
        except ValueError:
            raise RouterError(400, "invalid Content-Length header") from None
    chunks: list[bytes] = []
    size = 0
    # A client hanging up mid-body raises ClientDisconnect; the handler answers for it.
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RouterError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise RouterError(400, "request body is empty; expected a JSON object")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RouterError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise RouterError(400, f"request body must be a JSON object, not {_kind(payload)}")
    return payload


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else "null"
    )


def _bad(field: str, expected: str, value: object) -> RouterError:
    return RouterError(400, f"field '{field}' must be {expected}, not {_kind(value)}")


def _is_int_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in value
    )


_OBJECT_FIELDS = ("sampling_params", "stream_options")
_INT_FIELDS = ("max_tokens", "max_completion_tokens", "n")
_NUMBER_FIELDS = ("temperature", "top_p")
#: The fields :func:`_check_common` checks besides ``stream``.
_ORDERED_FIELDS = (*_OBJECT_FIELDS, *_INT_FIELDS, *_NUMBER_FIELDS)
_CHECKED_FIELDS = frozenset(_ORDERED_FIELDS)


def _check_common(payload: dict[str, Any]) -> bool:
    stream = payload.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", "a boolean", stream)
    # Only the checked fields the body has (one C-level intersection), not seven look-ups
    # in Python per request: most bodies carry one of them. Two or more are checked in the
    # fixed order, so that the first bad one named is always the same.
    present = _CHECKED_FIELDS.intersection(payload)
    if len(present) > 1:
        present = [name for name in _ORDERED_FIELDS if name in present]  # type: ignore[assignment]
    for name in present:
        value = payload[name]
        if value is None:
            continue
        if name in _OBJECT_FIELDS:
            if not isinstance(value, dict):
                raise _bad(name, "an object", value)
        elif isinstance(value, bool) or not isinstance(
            value, int if name in _INT_FIELDS else (int, float)
        ):
            raise _bad(name, "an integer" if name in _INT_FIELDS else "a number", value)
    return bool(stream)


def _generate_key(payload: dict[str, Any]) -> RouteKey:
    text = payload.get("text")
    ids = payload.get("input_ids")
    if text is not None:
        if isinstance(text, str):
            return RouteKey(text=text)
        if isinstance(text, list) and all(isinstance(t, str) for t in text):
            # A batch: route it by its first prompt (the whole batch goes to one worker).
            return RouteKey(text=text[0]) if text else NO_KEY
        raise _bad("text", "a string or a list of strings", text)
    if ids is not None:
        if _is_int_list(ids):
            return RouteKey(input_ids=ids)
        if isinstance(ids, list) and all(_is_int_list(x) for x in ids):
            return RouteKey(input_ids=ids[0]) if ids else NO_KEY
        raise _bad("input_ids", "a list of integers (or a list of such lists)", ids)
    if payload.get("input_embeds") is None:
        raise RouterError(400, "one of 'text', 'input_ids' or 'input_embeds' is required")
    return NO_KEY


def _completion_key(payload: dict[str, Any]) -> RouteKey:
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return RouteKey(text=prompt)
    if _is_int_list(prompt):
        return RouteKey(input_ids=prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return RouteKey(text=prompt[0])
    if isinstance(prompt, list) and prompt and all(_is_int_list(p) for p in prompt):
        return RouteKey(input_ids=prompt[0])
    if prompt is None:
        raise RouterError(400, "field 'prompt' is required")
    raise _bad("prompt", "a string, a list of strings or a list of token ids", prompt)


def _message_text(content: object, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict):
                raise _bad(f"messages[{index}].content[]", "an object", part)
            text = part.get("text")
            if isinstance(text, str):
                parts.append(text)
        return "".join(parts)
    raise _bad(f"messages[{index}].content", "a string or a list of parts", content)


def _chat_key(payload: dict[str, Any]) -> RouteKey:
    messages = payload.get("messages")
    if messages is None:
        raise RouterError(400, "field 'messages' is required")
    if not isinstance(messages, list) or not messages:
        raise RouterError(400, "field 'messages' must be a non-empty array of message objects")
    texts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}]", "an object", message)
        role = message.get("role")
        if not isinstance(role, str):
            raise _bad(f"messages[{i}].role", "a string", role)
        texts.append(_message_text(message.get("content"), i))
    return RouteKey(text="\n".join(texts), chat=True)


_KEYS = {
    "/generate": _generate_key,
    "/v1/completions": _completion_key,
    "/v1/chat/completions": _chat_key,
}


def parse_inference(route: str, body: bytes, *, need_key: bool = True) -> ParsedRequest:
    """Check an inference body for ``route`` and extract its routing key."""
    payload = parse_json_object(body)
    stream = _check_common(payload)
    extract = _KEYS.get(route)
    key = extract(payload) if extract is not None else NO_KEY
    return ParsedRequest(body, payload, key if need_key else NO_KEY, stream)


#: Bodies larger than this are parsed off the event loop (about 15 ms of orjson on the loop).
OFF_LOOP_BYTES = 256 * 1024
#: The only payload fields the router reads outside PD mode (inference.py: ``priority``).
_SUMMARY_FIELDS = ("stream", "priority", "model")
_parse_pool: ProcessPoolExecutor | None = None


def _parse_summary(route: str, body: bytes, need_key: bool) -> ParsedRequest:
    """In the helper process: parse and check, and keep only what crosses back cheaply."""
    parsed = parse_inference(route, body, need_key=need_key)
    small = {k: parsed.payload[k] for k in _SUMMARY_FIELDS if k in parsed.payload}
    return ParsedRequest(b"", small, parsed.key, parsed.stream)


def _pool() -> ProcessPoolExecutor:
    global _parse_pool
    if _parse_pool is None:
        # spawn, not fork: the router has threads and sockets a forked child must not share.
        # Two helpers: big bodies queue rather than multiply their parse memory.
        _parse_pool = ProcessPoolExecutor(
            max_workers=2, mp_context=multiprocessing.get_context("spawn")
        )
    return _parse_pool


def shutdown_parse_pool() -> None:
    """Stop the helper processes (the router's shutdown; a later big body starts new ones)."""
    global _parse_pool
    if _parse_pool is not None:
        _parse_pool.shutdown(wait=True, cancel_futures=True)
        _parse_pool = None


async def parse_inference_async(
    route: str, body: bytes, *, need_key: bool = True, need_payload: bool = False
) -> ParsedRequest:
    """:func:`parse_inference`, off the event loop for large bodies (module docstring).

    Off the loop, ``payload`` holds only the fields in ``_SUMMARY_FIELDS``; ``need_payload``
    (PD mode) keeps the whole object and so parses in the loop.
    """
    if len(body) <= OFF_LOOP_BYTES or need_payload:
        return parse_inference(route, body, need_key=need_key)
    global _parse_pool
    loop = asyncio.get_running_loop()
    try:
        parsed = await loop.run_in_executor(_pool(), _parse_summary, route, body, need_key)
    except BrokenProcessPool:
        # A helper died (OOM killer?): start a fresh pool next time, answer this one here.
        log.warning("JSON parse helper process died; parsing this %d-byte body inline", len(body))
        _parse_pool = None
        return parse_inference(route, body, need_key=need_key)
    return replace(parsed, body=body)
