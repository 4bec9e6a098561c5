"""What a benchmark sends: requests described as chains of reusable prompt segments.

A workload is a list of :class:`BenchRequest`. A request's prompt is not stored as text but as
a tuple of :class:`Segment`: each names a piece of text by a key (equal keys give equal text,
see :mod:`sglctl.bench.textgen`) and says how many tokens of it to use. Describing prompts this
way keeps a 12,000-request trace cheap to hold, lets the text be built just before sending,
and lets :mod:`sglctl.bench.ideal` compute the best hit ratio any router could reach from the
same description that produced the traffic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Segment:
    """``tokens`` tokens of the text named ``key``.

    ``block_tokens`` is the length of the whole block the key stands for; a segment may use
    only its first ``tokens`` (a trace's last, partial block), so that a partial block's
    text is a prefix of the full block's text, as it would be in real traffic.
    """

    key: str
    tokens: int
    block_tokens: int = 0

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise ValueError(
                f"segment {self.key!r} must have at least one token, not {self.tokens}"
            )
        if self.block_tokens and self.block_tokens < self.tokens:
            raise ValueError(
                f"segment {self.key!r} uses {self.tokens} tokens "
                f"of a {self.block_tokens}-token block"
            )

    @property
    def full_tokens(self) -> int:
        """Length of the block the text is cut from."""
        return self.block_tokens or self.tokens


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload.

    ``arrival`` is the send time in seconds from the start, in the workload's own clock
    (before any speed-up); None means "as soon as allowed" (closed loop, or the next turn of
    a conversation). ``after`` is the index of a request that must have finished before this
    one is sent: a conversation's next turn waits for the previous answer.
    """

    index: int
    segments: tuple[Segment, ...]
    output_tokens: int
    arrival: float | None = None
    after: int | None = None
    tags: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def input_tokens(self) -> int:
        return sum(seg.tokens for seg in self.segments)


@dataclass(frozen=True)
class Workload:
    """A named list of requests plus how it was made (for the report)."""

    name: str
    requests: tuple[BenchRequest, ...]
    params: dict[str, object] = field(default_factory=dict)

    @property
    def timed(self) -> bool:
        """True when the workload carries its own arrival times (a trace)."""
        return any(req.arrival is not None for req in self.requests)

    def head(self, count: int | None) -> Workload:
        """The first ``count`` requests (all of them for None), dependencies kept consistent."""
        if count is None or count >= len(self.requests):
            return self
        kept = self.requests[: max(count, 0)]
        return Workload(self.name, tuple(kept), {**self.params, "max_requests": count})

    def total_input_tokens(self) -> int:
        return sum(req.input_tokens for req in self.requests)

    def total_output_tokens(self) -> int:
        return sum(req.output_tokens for req in self.requests)


def check_dependencies(requests: Sequence[BenchRequest]) -> None:
    """Raise ValueError unless every ``after`` points to an earlier request of the list.

    The runner relies on it: a request waiting on a later one would wait forever.
    """
    for position, req in enumerate(requests):
        if req.index != position:
            raise ValueError(f"request at position {position} has index {req.index}")
        if req.after is not None and not 0 <= req.after < position:
            raise ValueError(
                f"request {position} waits on request {req.after}, which is not earlier"
            )
