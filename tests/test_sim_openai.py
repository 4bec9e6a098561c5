"""The official ``openai`` client against a running sim worker (stream and non-stream)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from sglctl.sim.tokenizer import text_for_tokens
from sglctl.spawn import spawn_sim_worker


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    log_dir = tmp_path_factory.mktemp("sim-openai")
    worker = spawn_sim_worker(log_dir, "--speedup", "100", "--served-model-name", "sim-8b")
    try:
        with openai.OpenAI(base_url=worker.url + "/v1", api_key="unused", max_retries=0) as c:
            yield c
    finally:
        worker.stop()
        print(worker.log_tail())


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["sim-8b"]


def test_chat_non_stream_and_cached_tokens(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": text_for_tokens(300, seed="sys")},
        {"role": "user", "content": "What is a radix tree?"},
    ]
    first = client.chat.completions.create(model="sim-8b", messages=messages, max_tokens=12)
    assert first.choices[0].finish_reason == "length"
    assert first.choices[0].message.role == "assistant"
    assert len(first.choices[0].message.content or "") == 48
    assert first.usage is not None and first.usage.completion_tokens == 12
    # Second turn: the history (prompt + answer) is a cached prefix.
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And a trie?"},
    ]
    second = client.chat.completions.create(model="sim-8b", messages=messages, max_tokens=4)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    # (all but the last, partial, token of the first prompt: a 4-character chunk boundary)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="sim-8b",
        messages=[{"role": "user", "content": "stream please"}],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text) == 40
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


def test_completions_stream_and_non_stream(client: openai.OpenAI) -> None:
    full = client.completions.create(model="sim-8b", prompt="Once upon", max_tokens=8)
    assert full.choices[0].finish_reason == "length"
    streamed = client.completions.create(
        model="sim-8b", prompt="Once upon", max_tokens=8, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == full.choices[0].text


def test_stop_sequence(client: openai.OpenAI) -> None:
    full = client.completions.create(model="sim-8b", prompt="stop", max_tokens=30)
    word = full.choices[0].text[40:44]
    stopped = client.completions.create(model="sim-8b", prompt="stop", max_tokens=30, stop=[word])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == full.choices[0].text[: full.choices[0].text.find(word)]


def test_bad_request_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="sim-8b", messages=[], max_tokens=1)
    assert "messages" in str(info.value)
