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

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from sglctl.router.tree import Prefixes, PrefixTree

log = logging.getLogger(__name__)

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


#: How often the workers' reported evictions are applied to a tree.
CORRECTION_INTERVAL_SECS = 0.25
#: A report this many blocks short of the prediction is not acted on (the text->token
#: conversion is an estimate, chat templates add tokens).
SLACK_BLOCKS = 1


class TreeCorrector:
    """Trims a prefix tree to what the workers say they still cache (shared by the policies).

    When a worker reports at least a block (plus :data:`SLACK_BLOCKS`) fewer cached tokens than
    the tree predicted, it evicted that prefix and, its cache being LRU, everything it used
    less recently: the worker's tenant forgets every block last used at or before the evicted
    path's last use (:meth:`~sglctl.router.tree.PrefixTree.forget_older`). Reports are only
    recorded here (one dict write); :meth:`apply` does the tree work in the policy's
    background task, so a burst of reports costs one pass per worker.

    A path last sent with a request that is still in prefill on that worker may not be held
    *yet*; a short report then means nothing. :meth:`start` / :meth:`prefilled` track, per
    worker, the tree tick of every attempt not yet past its first byte, to tell.
    """

    def __init__(self, tree: PrefixTree) -> None:
        self.tree = tree
        #: Per worker URL: attempts (by key) still in prefill -> the tick of their insert,
        #: in dispatch order, so the first value is the oldest tick possibly not held yet.
        self.pending: dict[str, dict[int, int]] = {}
        #: Per worker URL, the newest tick whose older blocks are to be forgotten.
        self._forget: dict[str, int] = {}
        #: Answers that fell short of the prediction, and blocks dropped because of them.
        self.corrections = 0
        self.corrected_blocks = 0

    def start(self, url: str, key: int, old_tick: int) -> int:
        """An attempt (``key``, unique while alive) whose path was last used at ``old_tick``
        left for ``url`` after its insert: the tick a short report would forget back to (0:
        none, the path may still be in prefill there)."""
        pending = self.pending.setdefault(url, {})
        if pending and old_tick >= next(iter(pending.values())):
            old_tick = 0
        pending[key] = self.tree.tick
        return old_tick

    def prefilled(self, url: str, key: int) -> None:
        """The attempt is past its prefill (first byte, expiry or end)."""
        pending = self.pending.get(url)
        if pending is not None:
            pending.pop(key, None)

    def report(
        self,
        url: str,
        prefixes: Prefixes,
        predicted_blocks: int,
        old_tick: int,
        text: bool,
        tail: bytes,
    ) -> bool:
        """Read the answer's ``cached_tokens``; True when it shows an eviction (recorded)."""
        if predicted_blocks <= SLACK_BLOCKS or old_tick <= 0:
            return False
        reported = cached_tokens(tail[-TAIL_BYTES:])
        if reported is None:
            return False
        reported_blocks = tokens_to_units(reported, text) // prefixes.block
        if reported_blocks + SLACK_BLOCKS >= predicted_blocks:
            return False
        self.corrections += 1
        log.debug(
            "%s reported %d cached tokens, the tree predicted %d blocks: forgetting its "
            "blocks last used at or before tick %d",
            url,
            reported,
            predicted_blocks,
            old_tick,
        )
        if old_tick > self._forget.get(url, 0):
            self._forget[url] = old_tick
        return True

    def apply(self) -> int:
        """Forget what the workers said they evicted; blocks dropped (background task)."""
        pending, self._forget = self._forget, {}
        dropped = 0
        for url, tick in pending.items():
            dropped += self.tree.forget_older(url, tick)
        self.corrected_blocks += dropped
        return dropped

    def forget_worker(self, url: str) -> None:
        self.pending.pop(url, None)
        self._forget.pop(url, None)

    def clear(self) -> None:
        self._forget.clear()


async def maintain(
    corrector: TreeCorrector,
    evict: Callable[[], Awaitable[object]],
    eviction_interval_secs: float,
    what: str,
) -> None:
    """A policy's background task with corrections on: apply them every
    :data:`CORRECTION_INTERVAL_SECS`, and ``evict`` (the tree's own size bound) every
    ``eviction_interval_secs`` (never when <= 0), until cancelled."""
    last_evict = time.monotonic()
    while True:
        await asyncio.sleep(CORRECTION_INTERVAL_SECS)
        try:
            dropped = corrector.apply()
            if dropped:
                log.debug("%s: corrections dropped %d tree blocks", what, dropped)
            now = time.monotonic()
            if eviction_interval_secs > 0 and now - last_evict >= eviction_interval_secs:
                last_evict = now
                await evict()
        except Exception:
            log.exception("%s tree maintenance failed; retrying next time", what)
