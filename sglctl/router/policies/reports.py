"""What a worker's answer says about its own cache, read from the answer's tail.

SGLang reports the prompt tokens it found in its prefix cache in every answer:
``meta_info.cached_tokens`` on ``/generate`` (each streamed event carries it too) and
``usage.prompt_tokens_details.cached_tokens`` on the OpenAI routes (streams: in the last
chunk with ``stream_options.include_usage``). Both sit at the end of the body, so the figure
is found with one ``rfind`` over the last bytes -- no JSON parse on the hot path, the same way
:func:`sglctl.router.metrics.completion_tokens` reads its number.

Tokens to the router's units: the prefix tree counts characters for text prompts and tokens
for ``input_ids``. For text the conversion is :data:`CHARS_PER_TOKEN` (4): the simulated
worker's tokenizer is exactly one token per 4 characters, and Llama-3-style BPE averages about
4 characters per token on English text. It is an estimate, so corrections keep a block of
slack (:mod:`~sglctl.router.policies.least_ttft`).
"""

from __future__ import annotations

#: Characters per token for text prompts (see the module docstring).
CHARS_PER_TOKEN = 4
#: How many bytes at the end of a whole body to search (the field is in the last object).
TAIL_BYTES = 1024
_CACHED_KEY = b'"cached_tokens":'


def cached_tokens(tail: bytes) -> int | None:
    """The last ``"cached_tokens": N`` in ``tail`` (None when absent or not a number)."""
    at = tail.rfind(_CACHED_KEY)
    if at < 0:
        return None
    start = at + len(_CACHED_KEY)
    end = len(tail)
    while start < end and tail[start] == 0x20:
        start += 1
    stop = start
    while stop < end and 0x30 <= tail[stop] <= 0x39:
        stop += 1
    return int(tail[start:stop]) if stop > start else None


def tokens_to_units(tokens: int, text: bool) -> int:
    """Prompt tokens as tree units: characters for text, tokens for ``input_ids``."""
    return tokens * CHARS_PER_TOKEN if text else tokens


def units_to_tokens(units: int, text: bool) -> int:
    """Tree units (characters or tokens) as prompt tokens, rounded up."""
    return -(-units // CHARS_PER_TOKEN) if text else units
