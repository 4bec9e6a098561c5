"""Multi-turn chat: every turn resends the whole conversation so far, plus a new question.

Turn ``t`` of a conversation is ``system + (user_1 + answer_1) + ... + user_t``; it is sent
only once turn ``t - 1`` has finished (``BenchRequest.after``), as a person waits for the
answer before typing the next question. The answers in the history are fixed text of
``output_len`` tokens rather than what the worker generated: the workload stays the same from
run to run, so the hit ratio of two routers can be compared and its ideal computed. A real
server caches its own output; the sim caches only what it was sent, so each answer counts as
a miss the first time it is resent (the ideal ratio counts it the same way).

Requests are ordered turn by turn across conversations (all first turns, then all second
turns ...): under a closed loop with fewer slots than conversations, a slot rarely has to
wait for a previous turn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sglctl.bench.workload import BenchRequest, Segment, Workload


@dataclass(frozen=True)
class MultiTurnConfig:
    """Shape of the conversations."""

    conversations: int = 32
    turns: int = 8
    system_prompt_len: int = 512
    user_len: int = 256
    output_len: int = 128
    seed: int = 1

    def __post_init__(self) -> None:
        for name in ("conversations", "turns", "user_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"multi-turn {name} must be at least 1")
        if self.system_prompt_len < 0:
            raise ValueError("multi-turn system_prompt_len must not be negative")


def multi_turn_workload(config: MultiTurnConfig | None = None) -> Workload:
    """``conversations * turns`` requests, each turn after the previous one of its conversation."""
    config = config or MultiTurnConfig()
    prefix = f"mt{config.seed}"
    system = (
        (Segment(f"{prefix}-sys", config.system_prompt_len),) if config.system_prompt_len else ()
    )
    requests: list[BenchRequest] = []
    last_index: dict[int, int] = {}
    for turn in range(config.turns):
        for conv in range(config.conversations):
            history: list[Segment] = list(system)
            for earlier in range(turn):
                history.append(Segment(f"{prefix}-c{conv}-u{earlier}", config.user_len))
                history.append(Segment(f"{prefix}-c{conv}-a{earlier}", config.output_len))
            history.append(Segment(f"{prefix}-c{conv}-u{turn}", config.user_len))
            index = len(requests)
            requests.append(
                BenchRequest(
                    index=index,
                    segments=tuple(history),
                    output_tokens=config.output_len,
                    after=last_index.get(conv),
                    tags={"conversation": str(conv), "turn": str(turn)},
                )
            )
            last_index[conv] = index
    return Workload("multi-turn", tuple(requests), asdict(config))
