"""The ideal prefix hit ratio: the ceiling any router over any number of workers can reach.

Requests are taken in order with one prefix cache of unlimited size. A request hits its
first ``k`` segments when that whole chain of segments was seen before (it stops at the first
segment not seen); then its whole chain is remembered. This is the definition the traces'
README uses, generalised from fixed 512-token blocks to segments of any length, so that the
same code gives the ceiling for the trace, shared-prefix and multi-turn workloads.

Token-weighted: hit tokens over input tokens. Block-weighted: hit segments over segments
(a partly hit segment counts as hit).
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
    """Replay ``requests`` in order against one unlimited prefix cache (a trie of keys).

    Each trie node remembers the most tokens of its segment seen so far, so a segment first
    sent partially (a trace's last block) and later in full hits only the part that was
    actually sent, and the match stops there: what a real token-level cache would hold. On the
    Mooncake traces this never happens and the figures equal the README's block definition.
    """
    root: dict[str, _Node] = {}
    hit_tokens = input_tokens = hit_blocks = blocks = 0
    for req in requests:
        children = root
        matching = True
        for seg in req.segments:
            node = children.get(seg.key)
            if matching and node is not None:
                hit_tokens += min(seg.tokens, node.tokens)
                hit_blocks += 1
                matching = seg.tokens <= node.tokens
            else:
                matching = False
            if node is None:
                node = children[seg.key] = _Node()
            node.tokens = max(node.tokens, seg.tokens)
            children = node.children
        input_tokens += req.input_tokens
        blocks += len(req.segments)
    return IdealHitRatio(hit_tokens, input_tokens, hit_blocks, blocks)


class _Node:
    """A trie node: the most tokens of this segment seen so far, and the segments after it."""

    __slots__ = ("children", "tokens")

    def __init__(self) -> None:
        self.tokens = 0
        self.children: dict[str, _Node] = {}
