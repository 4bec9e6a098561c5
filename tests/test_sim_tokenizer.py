"""The sim tokenizer's rule and the deterministic output plans (stop strings, stop ids)."""

from __future__ import annotations

import time

import pytest

from sglctl.sim.output import corpus_text, plan_output
from sglctl.sim.tokenizer import CHARS_PER_TOKEN, count_tokens, decode, encode, text_for_tokens


@pytest.mark.parametrize("text", ["", "a", "hello", "héllo wörld", "日本語のテキスト", "a😀bc"])
def test_round_trip(text: str) -> None:
    assert decode(encode(text)) == text
    assert len(encode(text)) == count_tokens(text) == -(-len(text) // CHARS_PER_TOKEN)


def test_tokens_depend_only_on_their_own_chunk() -> None:
    assert encode("abcdefgh")[:1] == encode("abcdxyz")[:1]
    assert encode("日本語のabcd")[1] == encode("abcd")[0]  # wide and narrow paths agree


def test_text_for_tokens_is_deterministic_and_concatenates() -> None:
    a, b = text_for_tokens(512, seed=1), text_for_tokens(512, seed="block-2")
    assert a == text_for_tokens(512, seed=1) and a != b
    assert len(encode(a)) == 512
    assert encode(a + b) == encode(a) + encode(b)
    with pytest.raises(ValueError):
        text_for_tokens(-1)


def test_encode_is_fast_on_long_prompts() -> None:
    text = text_for_tokens(126_000, seed=3)
    # Relative, not absolute: encoding must beat the naive way, a Python loop slicing one
    # chunk a token (prompts reach 126k tokens, and 8 workers share 2 cores).
    start = time.perf_counter()
    ids = encode(text)
    encode_time = time.perf_counter() - start
    start = time.perf_counter()
    naive = [text[i : i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN)]
    loop_time = time.perf_counter() - start
    assert len(naive) == len(ids)
    assert len(ids) == 126_000
    assert encode_time < loop_time


def test_plan_length_without_stop() -> None:
    plan = plan_output([1, 2, 3], seed=0, max_new_tokens=7)
    assert (plan.length, plan.finish_type, plan.matched) == (7, "length", None)
    assert len(plan.final_text()) == 7 * CHARS_PER_TOKEN
    assert plan_output([1, 2, 3], seed=0, max_new_tokens=7) == plan  # deterministic


def test_plan_stop_string_is_trimmed() -> None:
    base = plan_output([5], seed=0, max_new_tokens=64)
    full = base.text(64)
    word = full[30:34]
    stop = plan_output([5], seed=0, max_new_tokens=64, stop=[word])
    index = full.find(word)
    assert stop.finish_type == "stop" and stop.matched == word
    assert stop.final_text() == full[:index]
    assert stop.length == -(-(index + len(word)) // CHARS_PER_TOKEN)
    kept = plan_output([5], seed=0, max_new_tokens=64, stop=[word], no_stop_trim=True)
    assert kept.final_text().endswith(word)


def test_plan_stop_token_id() -> None:
    base = plan_output([5], seed=0, max_new_tokens=32)
    target = base.ids(32)[10]
    plan = plan_output([5], seed=0, max_new_tokens=32, stop_token_ids=[target])
    first = base.ids(32).index(target) + 1
    assert (plan.finish_type, plan.matched, plan.length) == ("stop", target, first)


def test_corpus_loops() -> None:
    long = corpus_text(0, 10_000)
    assert len(long) == 10_000 * CHARS_PER_TOKEN
    assert corpus_text(0, 0) == ""
