"""Deterministic output text of the simulated model, and where a request stops.

The "model" reads a fixed English-looking corpus in a loop, 4 characters (one token) at a time.
Where it starts reading depends only on the prompt's first tokens and the worker's ``--seed``,
so the same request on the same worker configuration always gets the same answer, and two
different prompts usually get different ones. The sim never samples an end-of-sequence token:
a request ends at ``max_new_tokens`` or at a stop string / stop token id, all of which can be
decided when the request is admitted, so no per-token Python work is needed while decoding.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from sglctl.fourchar import CHARS_PER_TOKEN, encode  # output text and ids: always the rule

_CORPUS = (
    "The simulated model answers in plain words. It has no weights and no GPU, yet it "
    "keeps time like one: prefill grows with the prompt, decoding slows as the batch grows, "
    "and a cached prefix makes the first token come sooner. Requests that share a system "
    "prompt should land on the same worker, because the radix cache there already holds "
    "those tokens. A router that knows this can save most of the prefill work of a long "
    "conversation. Each turn repeats the history, so the prefix keeps growing and the cache "
    "keeps paying off, until memory runs short and the least recently used branches are "
    "evicted to make room for new ones. "
)
# Pad to a whole number of tokens so that every token boundary falls on the same characters.
_CORPUS += " " * (-len(_CORPUS) % CHARS_PER_TOKEN)
_CORPUS_TOKENS = len(_CORPUS) // CHARS_PER_TOKEN


@dataclass(frozen=True)
class OutputPlan:
    """The whole future of one request's output, decided at admission."""

    start: int  # token offset into the corpus
    length: int  # tokens the request will generate
    finish_type: str  # "length" or "stop"
    matched: str | int | None  # the stop string or stop token id that ended it
    trim_chars: int | None  # with a stop string: cut the final text to this many characters

    def text(self, n_tokens: int) -> str:
        """Text of the first ``n_tokens`` output tokens (before stop trimming)."""
        return corpus_text(self.start, n_tokens)

    def final_text(self) -> str:
        text = self.text(self.length)
        return text if self.trim_chars is None else text[: self.trim_chars]

    def visible_text(self, n_tokens: int) -> str:
        """What a client may see after ``n_tokens``: never a partial stop string."""
        if n_tokens >= self.length:
            return self.final_text()
        text = self.text(n_tokens)
        if self.trim_chars is not None:
            text = text[: self.trim_chars]
        return text

    def ids(self, n_tokens: int) -> list[int]:
        return encode(self.text(n_tokens))


def corpus_text(start: int, n_tokens: int) -> str:
    """``n_tokens`` tokens of the looping corpus from token ``start``."""
    if n_tokens <= 0:
        return ""
    begin = (start % _CORPUS_TOKENS) * CHARS_PER_TOKEN
    end = begin + n_tokens * CHARS_PER_TOKEN
    repeats = -(-end // len(_CORPUS))
    return (_CORPUS * repeats)[begin:end] if repeats > 1 else _CORPUS[begin:end]


def start_offset(input_ids: Sequence[int], seed: int) -> int:
    """Deterministic corpus offset for a prompt (stable across processes, unlike ``hash``)."""
    head = ",".join(str(token) for token in input_ids[:32])
    return zlib.crc32(f"{seed}:{len(input_ids)}:{head}".encode()) % _CORPUS_TOKENS


def plan_output(
    input_ids: Sequence[int],
    *,
    seed: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    no_stop_trim: bool = False,
) -> OutputPlan:
    """Decide how many tokens a request generates and why it stops."""
    start = start_offset(input_ids, seed)
    best = OutputPlan(start, max_new_tokens, "length", None, None)
    if max_new_tokens <= 0 or not (stop or stop_token_ids):
        return best
    text = corpus_text(start, max_new_tokens)
    for s in stop:
        if not s:
            continue
        index = text.find(s)
        while index != -1:
            end_token = -(-(index + len(s)) // CHARS_PER_TOKEN)
            if end_token >= max(min_new_tokens, 1):
                if end_token < best.length or (end_token == best.length and best.matched is None):
                    trim = index + len(s) if no_stop_trim else index
                    best = OutputPlan(start, end_token, "stop", s, trim)
                break
            index = text.find(s, index + 1)
    if stop_token_ids:
        wanted = set(stop_token_ids)
        ids = encode(text)
        for position, token in enumerate(ids[: best.length], start=1):
            if token in wanted and position >= max(min_new_tokens, 1):
                if position < best.length or best.matched is None:
                    trim = (
                        position * CHARS_PER_TOKEN
                        if no_stop_trim
                        else (position - 1) * CHARS_PER_TOKEN
                    )
                    best = OutputPlan(start, position, "stop", token, trim)
                break
    return best
