"""Turn a request's segments into prompt text, in the sim worker's tokenisation.

A segment key always gives the same text (the key seeds the sim tokenizer's
:func:`~sglctl.sim.tokenizer.text_for_tokens`), and texts made that way concatenate into the
concatenation of their tokens, so two prompts that share their first segments share exactly
those tokens at the worker: the prefix cache sees what the workload means it to see.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from sglctl.bench.workload import BenchRequest, Segment
from sglctl.sim import tokenizer


def key_seed(key: str) -> int:
    """A stable 64-bit seed for ``key`` (Python's ``hash`` of a str changes between runs)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class PromptBuilder:
    """Builds prompt text from segments, keeping recently used block texts.

    Trace prompts reuse the same blocks again and again (that is the point of the trace), so
    a bounded LRU of block texts saves regenerating them; ``max_blocks`` bounds the memory
    (4096 blocks of 512 tokens is about 8 MB).
    """

    def __init__(self, max_blocks: int = 4096) -> None:
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[str, str] = OrderedDict()

    def block_text(self, key: str, tokens: int) -> str:
        """Text of the whole block ``key`` (``tokens`` tokens long)."""
        cache_key = f"{key}/{tokens}"
        text = self._blocks.get(cache_key)
        if text is None:
            text = tokenizer.text_for_tokens(tokens, key_seed(key))
            self._blocks[cache_key] = text
            if len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(cache_key)
        return text

    def segment_text(self, seg: Segment) -> str:
        """The first ``seg.tokens`` tokens of the block's text."""
        text = self.block_text(seg.key, seg.full_tokens)
        if seg.tokens == seg.full_tokens:
            return text
        return tokenizer.decode(tokenizer.encode(text)[: seg.tokens])

    def prompt(self, req: BenchRequest) -> str:
        """The whole prompt of ``req``: exactly ``req.input_tokens`` tokens."""
        return "".join(self.segment_text(seg) for seg in req.segments)
