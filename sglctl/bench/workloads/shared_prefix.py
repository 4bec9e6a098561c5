"""SGLang's "generated-shared-prefix" benchmark: groups of prompts behind one system prompt.

Same parameters and defaults as ``sglang.bench_serving --dataset-name generated-shared-prefix``
(``--gsp-num-groups 64 --gsp-prompts-per-group 16 --gsp-system-prompt-len 2048
--gsp-question-len 128 --gsp-output-len 256``), and, as there, the requests are shuffled, so
a router only keeps a group's prefix together if it recognises it. The text is our own (the
sim tokenizer's pseudo-random text), not SGLang's.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from sglctl.bench.workload import BenchRequest, Segment, Workload


@dataclass(frozen=True)
class SharedPrefixConfig:
    """Shape of the workload; defaults are SGLang's."""

    num_groups: int = 64
    prompts_per_group: int = 16
    system_prompt_len: int = 2048
    question_len: int = 128
    output_len: int = 256
    seed: int = 1
    shuffle: bool = True

    def __post_init__(self) -> None:
        for name in ("num_groups", "prompts_per_group", "system_prompt_len", "question_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"shared-prefix {name} must be at least 1")
        if self.output_len < 1:
            raise ValueError("shared-prefix output_len must be at least 1")


def shared_prefix_workload(config: SharedPrefixConfig | None = None) -> Workload:
    """``num_groups * prompts_per_group`` requests: group system prompt + own question."""
    config = config or SharedPrefixConfig()
    # The seed is part of every key so that two runs with different seeds share nothing.
    prompts = [
        (
            Segment(f"gsp{config.seed}-sys{group}", config.system_prompt_len),
            Segment(f"gsp{config.seed}-q{group}-{number}", config.question_len),
        )
        for group in range(config.num_groups)
        for number in range(config.prompts_per_group)
    ]
    if config.shuffle:
        random.Random(config.seed).shuffle(prompts)
    requests = tuple(
        BenchRequest(index=i, segments=segments, output_tokens=config.output_len)
        for i, segments in enumerate(prompts)
    )
    return Workload("shared-prefix", requests, asdict(config))
