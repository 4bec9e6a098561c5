"""The ideal prefix hit ratio: the ceiling any router over any number of workers can reach.

Requests are taken in order with one prefix cache of unlimited size. A request hits its
first ``k`` segments when that whole chain of segments was seen before (it stops at the first
segment not seen); then its whole chain is remembered. This is the definition the traces'
README uses, generalised from fixed 512-token blocks to segments of any length, so that the
same code gives the ceiling for the trace, shared-prefix and multi-turn workloads.

Token-weighted: hit tokens over input tokens. Block-weighted: hit segments over segments.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sglctl.bench.workload import BenchRequest


@dataclass(frozen=True)
class IdealHitRatio:
    """Result of :func:`ideal_hit_ratio`."""

    hit_tokens: int
    input_tokens: int
    hit_blocks: int
    blocks: int

    @property
    def token_weighted(self) -> float:
        return self.hit_tokens / self.input_tokens if self.input_tokens else 0.0

    @property
    def block_weighted(self) -> float:
        return self.hit_blocks / self.blocks if self.blocks else 0.0


def ideal_hit_ratio(requests: Iterable[BenchRequest]) -> IdealHitRatio:
    """Replay ``requests`` in order against one unlimited prefix cache (a trie of keys)."""
    root: dict[str, dict] = {}
    hit_tokens = input_tokens = hit_blocks = blocks = 0
    for req in requests:
        node = root
        matching = True
        for seg in req.segments:
            child = node.get(seg.key)
            if matching and child is not None:
                hit_tokens += seg.tokens
                hit_blocks += 1
            else:
                matching = False
                if child is None:
                    child = node[seg.key] = {}
            node = child
        input_tokens += req.input_tokens
        blocks += len(req.segments)
    return IdealHitRatio(hit_tokens, input_tokens, hit_blocks, blocks)
