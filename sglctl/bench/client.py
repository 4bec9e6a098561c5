"""Send one streaming ``POST /generate`` and time it.

Time to first token is the time to the first streamed chunk with non-empty text; the
end-to-end latency runs to the end of the stream. Token counts and ``cached_tokens`` come from
the last chunk's ``meta_info`` (SGLang sends cumulative text and meta_info in every chunk).
Only the first chunks (until one has text) and the last one are parsed: a 300-token answer
streams 300 chunks and the client shares two cores with the router and eight workers.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson

from sglctl.bench.stats import RequestResult

DATA_PREFIX = "data:"
DONE = "[DONE]"
MAX_ERROR_CHARS = 300


def generate_body(prompt: str, max_new_tokens: int) -> dict[str, Any]:
    """SGLang-native request: greedy, exactly ``max_new_tokens`` tokens (EOS ignored)."""
    return {
        "text": prompt,
        "sampling_params": {
            "max_new_tokens": max_new_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
        },
        "stream": True,
    }


def error_message(status: int, body: bytes) -> str:
    """The message of an ``{"error": {...}}`` body, else the start of the body."""
    try:
        parsed = orjson.loads(body)
        err = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return f"HTTP {status}: {err['message']}"[:MAX_ERROR_CHARS]
        if isinstance(err, str):
            return f"HTTP {status}: {err}"[:MAX_ERROR_CHARS]
    except orjson.JSONDecodeError:
        pass
    return f"HTTP {status}: {body[:200].decode(errors='replace')}"[:MAX_ERROR_CHARS]


def _payload(line: str) -> str | None:
    """The data of an SSE ``data:`` line, or None for other lines (blank, comments)."""
    if not line.startswith(DATA_PREFIX):
        return None
    return line[len(DATA_PREFIX) :].strip()


def _apply_meta(result: RequestResult, chunk: dict[str, Any]) -> None:
    meta = chunk.get("meta_info") or {}
    result.prompt_tokens = int(meta.get("prompt_tokens") or 0)
    result.output_tokens = int(meta.get("completion_tokens") or 0)
    result.cached_tokens = int(meta.get("cached_tokens") or 0)


async def stream_generate(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], result: RequestResult
) -> None:
    """POST ``body`` to ``url`` (streaming) and fill ``result``; never raises for HTTP trouble."""
    sent = time.perf_counter()
    try:
        async with client.stream(
            "POST", url, content=orjson.dumps(body), headers={"Content-Type": "application/json"}
        ) as resp:
            result.status = resp.status_code
            if resp.status_code != 200:
                result.error = error_message(resp.status_code, await resp.aread())
                return
            last: str | None = None
            async for line in resp.aiter_lines():
                data = _payload(line)
                if not data:
                    continue
                if data == DONE:
                    break
                if result.ttft is None:
                    chunk = orjson.loads(data)
                    if "error" in chunk:
                        result.error = f"stream error: {chunk['error']}"[:MAX_ERROR_CHARS]
                        return
                    if chunk.get("text"):
                        result.ttft = time.perf_counter() - sent
                last = data
            result.latency = time.perf_counter() - sent
        if last is None:
            result.error = "empty stream: no data chunk before the end"
            return
        final = orjson.loads(last)
        if "error" in final:
            result.error = f"stream error: {final['error']}"[:MAX_ERROR_CHARS]
            return
        _apply_meta(result, final)
        if result.ttft is None:
            result.ttft = result.latency
        result.ok = True
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
        result.error = f"BadResponse: {exc}"[:MAX_ERROR_CHARS]
