"""API conformance of the simulated worker (CONTRACT.md section 4), over real HTTP.

One worker serves the whole module (start-up is the slow part); tests that need an empty
cache or special flags start their own through the ``procs`` fixture.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from sglctl.sim.tokenizer import text_for_tokens
from sglctl.spawn import ManagedProcess, spawn_sim_worker

META_KEYS = {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens",
             "e2e_latency"}  # fmt: skip


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    log_dir: Path = tmp_path_factory.mktemp("sim-api")
    proc = spawn_sim_worker(log_dir, "--speedup", "100", "--model-path", "sim/test-model")
    try:
        yield proc
    finally:
        proc.stop()
        print(proc.log_tail())


@pytest.fixture
def client(worker: ManagedProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=worker.url, timeout=10) as c:
        yield c


def sse_events(raw: bytes) -> list[bytes]:
    """Split an SSE body into its ``data:`` payloads, checking the framing on the way."""
    assert raw.endswith(b"\n\n"), raw[-50:]
    events = raw.split(b"\n\n")[:-1]
    payloads = []
    for event in events:
        assert event.startswith(b"data: "), event
        payloads.append(event[len(b"data: ") :])
    return payloads


# ----- /generate -------------------------------------------------------------------------------


def test_generate_shape(client: httpx.Client) -> None:
    r = client.post("/generate", json={"text": "hello", "sampling_params": {"max_new_tokens": 8}})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"text", "output_ids", "meta_info"}
    meta = body["meta_info"]
    assert set(meta) >= META_KEYS
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["completion_tokens"] == len(body["output_ids"]) == 8
    assert meta["prompt_tokens"] == 2  # "hello": 4 + 1 characters
    assert isinstance(body["text"], str) and len(body["text"]) == 32
    assert meta["e2e_latency"] > 0


def test_repeated_long_prompt_reports_cached_tokens(client: httpx.Client) -> None:
    prompt = text_for_tokens(2000, seed="repeat")
    payload = {"text": prompt, "sampling_params": {"max_new_tokens": 2}}
    first = client.post("/generate", json=payload).json()["meta_info"]
    second = client.post("/generate", json=payload).json()["meta_info"]
    assert first["cached_tokens"] == 0
    # As SGLang: at most prompt - 1 tokens can be cached (the last one is always computed).
    assert second["cached_tokens"] == second["prompt_tokens"] - 1 == 1999
    shared = {"text": prompt + text_for_tokens(10, seed="tail"), "sampling_params": payload[
        "sampling_params"]}  # fmt: skip
    assert client.post("/generate", json=shared).json()["meta_info"]["cached_tokens"] == 2000


def test_generate_is_deterministic(client: httpx.Client) -> None:
    payload = {"text": "same prompt", "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
    a = client.post("/generate", json=payload).json()
    b = client.post("/generate", json=payload).json()
    assert a["text"] == b["text"] and a["output_ids"] == b["output_ids"]


def test_generate_stream_framing(client: httpx.Client) -> None:
    payload = {"text": "stream me", "sampling_params": {"max_new_tokens": 20}, "stream": True}
    with client.stream("POST", "/generate", json=payload) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read()
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert chunks, "no data chunk before [DONE]"
    texts = [c["text"] for c in chunks]
    for before, after in itertools.pairwise(texts):
        assert after.startswith(before)  # cumulative text
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    last = chunks[-1]["meta_info"]
    assert last["finish_reason"] == {"type": "length", "length": 20}
    assert last["completion_tokens"] == 20
    full = client.post("/generate", json={**payload, "stream": False}).json()
    assert full["text"] == chunks[-1]["text"]


def test_generate_batch_and_input_ids(client: httpx.Client) -> None:
    r = client.post("/generate", json={"text": ["a b c", "d e f g h"],
                                       "sampling_params": {"max_new_tokens": 3}})  # fmt: skip
    body = r.json()
    assert isinstance(body, list) and len(body) == 2
    assert [b["meta_info"]["prompt_tokens"] for b in body] == [2, 3]
    r = client.post("/generate", json={"input_ids": [11, 12, 13], "rid": "my-rid",
                                       "sampling_params": {"max_new_tokens": 2}})  # fmt: skip
    meta = r.json()["meta_info"]
    assert meta["id"] == "my-rid" and meta["prompt_tokens"] == 3


def test_generate_stop_string(client: httpx.Client) -> None:
    base = client.post(
        "/generate", json={"text": "stop test", "sampling_params": {"max_new_tokens": 40}}
    ).json()
    word = base["text"][20:24]
    r = client.post(
        "/generate",
        json={"text": "stop test", "sampling_params": {"max_new_tokens": 40, "stop": [word]}},
    )
    body = r.json()
    assert body["meta_info"]["finish_reason"] == {"type": "stop", "matched": word}
    assert body["text"] == base["text"][: base["text"].find(word)]
    assert body["meta_info"]["completion_tokens"] < 40


def test_pd_bootstrap_fields_are_accepted(client: httpx.Client) -> None:
    payload = {
        "text": "pd",
        "sampling_params": {"max_new_tokens": 1},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": 8998,
        "bootstrap_room": 7,
    }
    assert client.post("/generate", json=payload).status_code == 200


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "empty"),
        (b"[1, 2]", "JSON object"),
        (b'{"sampling_params": {}}', "text or input_ids"),
        (b'{"text": "a", "input_ids": [1]}', "not both"),
        (b'{"text": 5}', "text must be"),
        (b'{"input_ids": ["x"]}', "input_ids"),
        (b'{"text": "a", "sampling_params": {"max_new_tokens": "8"}}', "max_new_tokens"),
        (b'{"text": "a", "sampling_params": {"max_new_tokens": -1}}', "max_new_tokens"),
        (b'{"text": "a", "sampling_params": {"temperature": -1}}', "temperature"),
        (b'{"text": "a", "sampling_params": {"top_p": 0}}', "top_p"),
        (b'{"text": "a", "sampling_params": {"stop": 3}}', "stop"),
        (b'{"text": "a", "sampling_params": "x"}', "sampling_params"),
        (b'{"text": "a", "stream": "yes"}', "stream"),
        (b'{"text": "", "sampling_params": {}}', "empty"),
        (b'{"input_ids": [1], "sampling_params": {"max_new_tokens": 200000}}', "context length"),
    ],
)
def test_generate_bad_input_is_a_json_400(client: httpx.Client, body: bytes, fragment: str) -> None:
    r = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == 400 and error["type"] == "BadRequestError"
    assert fragment in error["message"]


def test_unknown_path_and_method(client: httpx.Client) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    r = client.get("/generate")
    assert r.status_code == 405 and r.json()["error"]["code"] == 405


# ----- health, info, load, cache, metrics ------------------------------------------------------


def test_health_endpoints(client: httpx.Client) -> None:
    r = client.get("/health")
    assert r.status_code == 200 and r.content == b""
    r = client.get("/health_generate")
    assert r.status_code == 200 and r.content == b""


def test_model_and_server_info(client: httpx.Client) -> None:
    info = client.get("/get_model_info").json()
    assert info["model_path"] == "sim/test-model"
    assert info["tokenizer_path"] == "sim/test-model"
    assert info["is_generation"] is True
    server = client.get("/get_server_info").json()
    assert server["model_path"] == "sim/test-model"
    assert server["max_total_num_tokens"] > 0 and server["tp_size"] == 1
    assert isinstance(server["internal_states"], list) and "version" in server
    assert client.get("/server_info").json()["model_path"] == "sim/test-model"
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "sim/test-model"
    assert models["data"][0]["object"] == "model"


def test_get_load(client: httpx.Client) -> None:
    load = client.get("/get_load").json()
    assert isinstance(load, list) and load[0]["dp_rank"] == 0
    assert {"num_reqs", "num_waiting_reqs", "num_tokens"} <= set(load[0])


def test_metrics_names_and_counters(client: httpx.Client) -> None:
    def scrape() -> dict[str, float]:
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        values = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    label = '{model_name="sim/test-model"}'
    before = scrape()
    client.post("/generate", json={"text": "count me", "sampling_params": {"max_new_tokens": 5}})
    after = scrape()
    for gauge in ("num_running_reqs", "num_queue_reqs", "cache_hit_rate", "token_usage",
                  "gen_throughput"):  # fmt: skip
        assert f"sglang:{gauge}{label}" in after
    assert after[f"sglang:num_requests_total{label}"] == before[
        f"sglang:num_requests_total{label}"] + 1  # fmt: skip
    assert after[f"sglang:generation_tokens_total{label}"] - before[
        f"sglang:generation_tokens_total{label}"] == 5  # fmt: skip
    assert after[f"sglang:prompt_tokens_total{label}"] - before[
        f"sglang:prompt_tokens_total{label}"] == 2  # fmt: skip
    assert f"sglang:cached_tokens_total{label}" in after
    assert f"sglang:time_to_first_token_seconds_count{label}" in after
    assert f"sglang:e2e_request_latency_seconds_count{label}" in after


def test_flush_cache_empties_the_cache(procs) -> None:  # type: ignore[no-untyped-def]
    worker = procs.sim_worker("--speedup", "100")
    payload = {"text": text_for_tokens(300, seed="flush"), "sampling_params": {"max_new_tokens": 1}}
    with httpx.Client(base_url=worker.url, timeout=10) as c:
        c.post("/generate", json=payload)
        assert c.post("/generate", json=payload).json()["meta_info"]["cached_tokens"] == 299
        r = c.post("/flush_cache")
        assert r.status_code == 200 and r.text.startswith("Cache flushed")
        assert c.post("/generate", json=payload).json()["meta_info"]["cached_tokens"] == 0
        assert c.get("/flush_cache").status_code == 200


# ----- OpenAI paths, raw HTTP -------------------------------------------------------------------


def test_chat_completion_shape_and_cached_usage(client: httpx.Client) -> None:
    messages = [{"role": "system", "content": text_for_tokens(200, seed="sys")},
                {"role": "user", "content": "hi"}]  # fmt: skip
    payload = {"model": "sim/test-model", "messages": messages, "max_tokens": 5}
    client.post("/v1/chat/completions", json=payload)
    body = client.post("/v1/chat/completions", json=payload).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1


def test_chat_stream_with_usage(client: httpx.Client) -> None:
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
               "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with client.stream("POST", "/v1/chat/completions", json=payload) as r:
        events = sse_events(r.read())
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len(content) == 6 * 4


def test_completions_stream_and_echo(client: httpx.Client) -> None:
    payload = {"model": "m", "prompt": "echo this", "max_tokens": 4, "echo": True}
    body = client.post("/v1/completions", json=payload).json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"].startswith("echo this")
    with client.stream("POST", "/v1/completions", json={**payload, "stream": True}) as r:
        events = sse_events(r.read())
    assert events[-1] == b"[DONE]"
    text = "".join(orjson.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == body["choices"][0]["text"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", b"{oops"),
        ("/v1/chat/completions", b'{"model": "m", "messages": []}'),
        ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "x", "content": "a"}]}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "n": 0}'),
        ("/v1/completions", b'{"model": "m", "prompt": 3}'),
        ("/v1/completions", b'{"model": "m", "prompt": "a", "max_tokens": "lots"}'),
        ("/v1/completions", b'{"prompt": "a", "stream_options": {"include_usage": true}}'),
    ],
)
def test_openai_bad_input_is_a_400_in_sglang_shape(
    client: httpx.Client, path: str, body: bytes
) -> None:
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    data = r.json()
    assert data["object"] == "error" and data["code"] == 400 and data["type"] == "BadRequestError"
    assert data["error"]["message"] == data["message"]


def test_health_generate_is_not_counted_as_traffic(client: httpx.Client) -> None:
    def requests_total() -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith("sglang:num_requests_total{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError("no sglang:num_requests_total")

    before = requests_total()
    assert client.get("/health_generate").status_code == 200
    assert requests_total() == before


def test_python_dash_m_entry_point(procs) -> None:  # type: ignore[no-untyped-def]
    import sys

    from sglctl.net import find_free_port

    port = find_free_port()
    args = [sys.executable, "-m", "sglctl.sim", "--port", str(port), "--speedup", "100"]
    worker = procs.spawn("sim-dash-m", args, url=f"http://127.0.0.1:{port}")
    r = httpx.post(worker.url + "/generate", json={"text": "hi"}, timeout=5)
    assert r.status_code == 200
    assert r.json()["meta_info"]["completion_tokens"] == 128  # SGLang's default max_new_tokens
