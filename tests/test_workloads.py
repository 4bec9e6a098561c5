"""Workload generators: determinism, exact lengths, shared blocks really shared, ideal ratio."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from sglctl.bench.ideal import ideal_hit_ratio
from sglctl.bench.textgen import PromptBuilder
from sglctl.bench.workload import BenchRequest, Segment, check_dependencies
from sglctl.bench.workloads import (
    MultiTurnConfig,
    SharedPrefixConfig,
    TraceFormatError,
    build_workload,
    load_trace,
    multi_turn_workload,
    shared_prefix_workload,
    trace_workload,
)
from sglctl.sim import tokenizer

TRACES = Path("/work/shared/traces")
CONVERSATION = TRACES / "conversation_trace.jsonl"
SYNTHETIC = TRACES / "synthetic_trace.jsonl"
needs_traces = pytest.mark.skipif(not CONVERSATION.exists(), reason="Mooncake traces not present")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def write_trace(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- trace ------------------------------------------------------------------------------


def test_trace_lengths_arrivals_and_segments(tmp_path: Path) -> None:
    path = write_trace(
        tmp_path / "t.jsonl",
        [
            {"timestamp": 1000, "input_length": 1100, "output_length": 7, "hash_ids": [0, 1, 2]},
            {"timestamp": 4000, "input_length": 600, "output_length": 0, "hash_ids": [0, 3]},
        ],
    )
    work = trace_workload(path)
    first, second = work.requests
    assert [s.tokens for s in first.segments] == [512, 512, 76]
    assert first.input_tokens == 1100 and second.input_tokens == 600
    assert first.arrival == 0.0 and second.arrival == 3.0  # relative to the first request
    assert first.output_tokens == 7
    assert second.output_tokens == 1  # a 0-token answer has no first token to time
    assert work.timed


def test_trace_prompts_are_exact_deterministic_and_share_blocks(tmp_path: Path) -> None:
    path = write_trace(
        tmp_path / "t.jsonl",
        [
            {"timestamp": 0, "input_length": 1100, "output_length": 1, "hash_ids": [0, 1, 2]},
            {"timestamp": 0, "input_length": 1300, "output_length": 1, "hash_ids": [0, 1, 4]},
            {"timestamp": 0, "input_length": 300, "output_length": 1, "hash_ids": [0]},
            {"timestamp": 0, "input_length": 700, "output_length": 1, "hash_ids": [5, 1]},
        ],
    )
    reqs = trace_workload(path).requests
    builder = PromptBuilder()
    ids = [tokenizer.encode(builder.prompt(r)) for r in reqs]
    assert [len(t) for t in ids] == [1100, 1300, 300, 700]
    # Same ids, same text: a fresh builder (empty block cache) gives identical prompts.
    assert [builder.prompt(r) for r in reqs] == [
        PromptBuilder(max_blocks=1).prompt(r) for r in reqs
    ]
    # Requests 0 and 1 share exactly their first two blocks.
    assert common_prefix(ids[0], ids[1]) == 1024
    # A partial block is a prefix of the full block of the same id.
    assert ids[2] == ids[0][:300]
    # Block 1 after a different parent is the same text, but the prefix differs from token 0.
    assert common_prefix(ids[3], ids[0]) == 0
    assert ids[3][512:] == ids[0][512:700]


@needs_traces
def test_real_trace_prefix_builds_exact_prompts() -> None:
    work = trace_workload(CONVERSATION, limit=30)
    assert len(work.requests) == 30
    builder = PromptBuilder()
    rows = [json.loads(line) for line in CONVERSATION.read_text().splitlines()[:30]]
    for req, row in zip(work.requests, rows, strict=True):
        assert tokenizer.count_tokens(builder.prompt(req)) == row["input_length"]
        assert req.arrival == pytest.approx(row["timestamp"] / 1000)
    # The first two requests of the trace share their first block (hash id 0).
    a, b = (tokenizer.encode(builder.prompt(r)) for r in work.requests[:2])
    assert common_prefix(a, b) == 512


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 1}', "missing field 'hash_ids'"),
        (
            '{"timestamp": 0, "input_length": 1000, "output_length": 1, "hash_ids": [1]}',
            "1 hash ids for 1000",
        ),
        ('{"timestamp": 0, "input_length": "x", "output_length": 1, "hash_ids": [1]}', "bad field"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_trace_format_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    ok = '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}'
    path.write_text(ok + "\n\n" + line + "\n")
    with pytest.raises(TraceFormatError, match=rf"line 3: .*{message}"):
        load_trace(path)


def test_trace_limit_reads_only_the_prefix(tmp_path: Path) -> None:
    ok = '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\n'
    path = tmp_path / "t.jsonl"
    path.write_text(ok * 3 + "garbage\n")
    assert len(load_trace(path, limit=3)) == 3  # the bad line is never read
    with pytest.raises(TraceFormatError):
        load_trace(path)


# --- ideal hit ratio --------------------------------------------------------------------


def req(index: int, *keys_and_tokens: tuple[str, int]) -> BenchRequest:
    return BenchRequest(index, tuple(Segment(k, n) for k, n in keys_and_tokens), 1)


def test_ideal_stops_at_the_first_unseen_segment() -> None:
    reqs = [
        req(0, ("a", 10), ("b", 10)),
        req(1, ("a", 10), ("c", 10), ("b", 10)),  # hits a only; b sits under a different parent
        req(2, ("a", 10), ("c", 10), ("b", 5)),  # hits all three (partial b counts its 5 tokens)
        req(3, ("x", 10), ("a", 10)),  # a at another position is not a prefix hit
        req(4, ("y", 4)),  # only the 4 tokens sent of y are cached ...
        req(5, ("y", 10), ("a", 10)),  # ... so the chain breaks inside y: 4 hit tokens
    ]
    ideal = ideal_hit_ratio(reqs)
    assert ideal.hit_tokens == 10 + 25 + 4
    assert ideal.input_tokens == 20 + 30 + 25 + 20 + 4 + 20
    assert (ideal.hit_blocks, ideal.blocks) == (1 + 3 + 1, 2 + 3 + 3 + 2 + 1 + 2)
    assert ideal_hit_ratio([]).token_weighted == 0.0


@needs_traces
@pytest.mark.parametrize(
    ("path", "token_weighted", "block_weighted"),
    [(CONVERSATION, 0.374, 0.366), (SYNTHETIC, 0.651, 0.640)],
)
def test_ideal_matches_the_traces_readme(
    path: Path, token_weighted: float, block_weighted: float
) -> None:
    ideal = ideal_hit_ratio(trace_workload(path).requests)
    assert round(ideal.token_weighted, 3) == token_weighted
    assert round(ideal.block_weighted, 3) == block_weighted


@needs_traces
def test_ideal_of_a_prefix_is_lower_than_of_the_whole_trace() -> None:
    # Early requests have had less history to share with: the ceiling grows with the prefix.
    short = ideal_hit_ratio(trace_workload(CONVERSATION, limit=500).requests).token_weighted
    longer = ideal_hit_ratio(trace_workload(CONVERSATION, limit=2000).requests).token_weighted
    assert 0 < short < longer < 0.374


# --- shared-prefix ----------------------------------------------------------------------


def test_shared_prefix_defaults_are_sglangs() -> None:
    cfg = SharedPrefixConfig()
    assert (cfg.num_groups, cfg.prompts_per_group, cfg.system_prompt_len) == (64, 16, 2048)
    assert (cfg.question_len, cfg.output_len) == (128, 256)


def test_shared_prefix_groups_share_exactly_their_system_prompt() -> None:
    cfg = SharedPrefixConfig(
        num_groups=3, prompts_per_group=4, system_prompt_len=40, question_len=8, output_len=5
    )
    work = shared_prefix_workload(cfg)
    assert len(work.requests) == 12
    builder = PromptBuilder()
    by_group: dict[str, list[list[int]]] = {}
    for r in work.requests:
        assert r.output_tokens == 5 and r.input_tokens == 48
        ids = tokenizer.encode(builder.prompt(r))
        assert len(ids) == 48
        by_group.setdefault(r.segments[0].key, []).append(ids)
    assert sorted(len(v) for v in by_group.values()) == [4, 4, 4]
    groups = list(by_group.values())
    for members in groups:
        for other in members[1:]:
            assert common_prefix(members[0], other) == 40  # the system prompt, not the question
    assert common_prefix(groups[0][0], groups[1][0]) == 0
    ideal = ideal_hit_ratio(work.requests)
    assert ideal.hit_tokens == 3 * 3 * 40  # every prompt but the first of its group hits


def test_shared_prefix_is_shuffled_deterministically() -> None:
    cfg = SharedPrefixConfig(num_groups=4, prompts_per_group=4)
    keys = [r.segments[1].key for r in shared_prefix_workload(cfg).requests]
    assert keys == [r.segments[1].key for r in shared_prefix_workload(cfg).requests]
    grouped = [
        r.segments[1].key
        for r in shared_prefix_workload(SharedPrefixConfig(4, 4, shuffle=False)).requests
    ]
    assert keys != grouped and sorted(keys) == sorted(grouped)
    other_seed = SharedPrefixConfig(num_groups=4, prompts_per_group=4, seed=2)
    assert not {r.segments[0].key for r in shared_prefix_workload(other_seed).requests} & {
        r.segments[0].key for r in shared_prefix_workload(cfg).requests
    }


def test_shared_prefix_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="num_groups"):
        SharedPrefixConfig(num_groups=0)


# --- multi-turn -------------------------------------------------------------------------


def test_multi_turn_resends_the_growing_history() -> None:
    cfg = MultiTurnConfig(conversations=3, turns=4, system_prompt_len=16, user_len=8, output_len=4)
    work = multi_turn_workload(cfg)
    check_dependencies(work.requests)
    assert len(work.requests) == 12
    builder = PromptBuilder()
    by_conv: dict[str, list[BenchRequest]] = {}
    for r in work.requests:
        by_conv.setdefault(r.tags["conversation"], []).append(r)
    for turns in by_conv.values():
        assert [t.after for t in turns[1:]] == [t.index for t in turns[:-1]]
        assert turns[0].after is None
        for number, (prev, cur) in enumerate(itertools.pairwise(turns), start=1):
            assert cur.input_tokens == 16 + number * (8 + 4) + 8
            prev_ids = tokenizer.encode(builder.prompt(prev))
            cur_ids = tokenizer.encode(builder.prompt(cur))
            assert cur_ids[: len(prev_ids)] == prev_ids  # the whole previous turn is resent
    convs = list(by_conv.values())
    first_a = tokenizer.encode(builder.prompt(convs[0][1]))
    first_b = tokenizer.encode(builder.prompt(convs[1][1]))
    assert common_prefix(first_a, first_b) == 16  # only the shared system prompt
    # Turn-major order: all first turns come before any second turn.
    assert [r.tags["turn"] for r in work.requests[:3]] == ["0", "0", "0"]
    ideal = ideal_hit_ratio(work.requests)
    # First turns: only the system prompt hits (not for the very first request). Turn t >= 1
    # hits everything turn t - 1 sent; the previous answer and the new question are new.
    expected = 16 * 2 + 3 * sum(16 + (t - 1) * (8 + 4) + 8 for t in range(1, 4))
    assert ideal.hit_tokens == expected


def test_multi_turn_without_system_prompt() -> None:
    work = multi_turn_workload(MultiTurnConfig(conversations=2, turns=2, system_prompt_len=0))
    assert all(r.segments[0].key.endswith("-u0") for r in work.requests)


# --- build_workload ---------------------------------------------------------------------


def test_build_workload_spellings_and_limits(tmp_path: Path) -> None:
    assert len(build_workload("shared-prefix", max_requests=5).requests) == 5
    mt = build_workload(
        "multi-turn", max_requests=7, multi_turn=MultiTurnConfig(conversations=3, turns=3)
    )
    check_dependencies(mt.requests)
    assert len(mt.requests) == 7
    with pytest.raises(ValueError, match="unknown workload"):
        build_workload("sharegpt")
    with pytest.raises(ValueError, match="needs a path"):
        build_workload("trace:")
    with pytest.raises(OSError):
        build_workload(f"trace:{tmp_path / 'missing.jsonl'}")


def test_check_dependencies_rejects_forward_waits() -> None:
    bad = [BenchRequest(0, (Segment("a", 1),), 1, after=1), BenchRequest(1, (Segment("b", 1),), 1)]
    with pytest.raises(ValueError, match="not earlier"):
        check_dependencies(bad)
    assert math.isfinite(ideal_hit_ratio(bad).token_weighted)
