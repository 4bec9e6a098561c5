"""PD disaggregation of the sim: a real prefill and a real decode process hand KV over.

Every test starts its own pair on free ports. Requests carry the bootstrap fields the PD
router adds; the last tests put sglctl's router in front of the pair.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from sglctl.net import find_free_port
from sglctl.sim.disagg import Bootstrap, parse_bootstrap
from sglctl.sim.errors import APIError
from sglctl.sim.transfer import TransferModel
from sglctl.spawn import ManagedProcess
from tests.support import wait_until


@dataclass
class Pair:
    prefill: ManagedProcess
    decode: ManagedProcess
    bootstrap_port: int


def start_pair(procs: Any, *extra: str, prefill_extra: tuple[str, ...] = ()) -> Pair:
    port = find_free_port()
    common = ("--speedup", "10", *extra)
    prefill = procs.sim_worker(
        "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(port),
        *common, *prefill_extra,
    )  # fmt: skip
    decode = procs.sim_worker("--disaggregation-mode", "decode", *common)
    return Pair(prefill, decode, port)


def pd_body(pair: Pair, text: str, max_new: int = 8, room: int | None = None, **kw: Any) -> dict:
    return {
        "text": text,
        "sampling_params": {"max_new_tokens": max_new},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": pair.bootstrap_port,
        "bootstrap_room": random.getrandbits(63) if room is None else room,
        **kw,
    }


def disagg(worker: ManagedProcess) -> dict[str, Any]:
    info = httpx.get(worker.url + "/get_server_info", timeout=5).json()
    return info["disaggregation"]  # type: ignore[no-any-return]


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


def post(url: str, body: dict, timeout: float = 30) -> httpx.Response:
    return httpx.post(url + "/generate", json=body, timeout=timeout)


def test_server_info_and_missing_bootstrap_fields(procs) -> None:  # type: ignore[no-untyped-def]
    pair = start_pair(procs)
    for worker, mode in ((pair.prefill, "prefill"), (pair.decode, "decode")):
        info = httpx.get(worker.url + "/get_server_info", timeout=5).json()
        assert info["disaggregation_mode"] == mode
        assert info["disaggregation_bootstrap_port"] == (
            pair.bootstrap_port if mode == "prefill" else 8998
        )
        r = post(worker.url, {"text": "no room", "sampling_params": {"max_new_tokens": 2}})
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "without bootstrap room id" in message
        assert all(f in message for f in ("bootstrap_host", "bootstrap_port", "bootstrap_room"))
        chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        r = httpx.post(worker.url + "/v1/chat/completions", json=chat, timeout=5)
        assert r.status_code == 400 and "bootstrap_room" in r.json()["error"]["message"]
        model = httpx.get(worker.url + "/get_model_info", timeout=5).json()
        assert model["is_generation"] is True
    # The plain worker still says null.
    plain = procs.sim_worker("--speedup", "10")
    info = httpx.get(plain.url + "/get_server_info", timeout=5).json()
    assert info["disaggregation_mode"] == "null"


def test_decode_first_waits_for_the_prefill_kv(procs, pool) -> None:  # type: ignore[no-untyped-def]
    pair = start_pair(procs)
    text = "x" * 400  # 100 tokens
    body = pd_body(pair, text, max_new=6)
    decode: Future[httpx.Response] = pool.submit(post, pair.decode.url, body)
    wait_until(lambda: disagg(pair.decode)["rooms_waiting"] == 1, what="decode waiting")
    wait_until(lambda: disagg(pair.prefill)["rooms"] == 1, what="prefill knows the room")
    assert not decode.done()  # no KV yet: no answer
    prefill = post(pair.prefill.url, body)
    assert prefill.status_code == 200, prefill.text
    assert prefill.json()["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    r = decode.result(timeout=30)
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    assert meta["completion_tokens"] == 6 and meta["prompt_tokens"] == 100
    assert disagg(pair.decode)["transfers_ok"] == 1
    assert disagg(pair.prefill) | {"kv_bytes_sent": 0} == {
        "rooms": 0, "held_kv_tokens": 0, "transferring": 0, "transfers_ok": 1,
        "transfers_failed": 0, "kv_bytes_sent": 0,
    }  # fmt: skip
    # The decode's text is what a plain worker answers for the same prompt.
    plain = procs.sim_worker("--speedup", "10")
    expected = post(plain.url, {"text": text, "sampling_params": {"max_new_tokens": 6}}).json()
    assert r.json()["text"] == expected["text"]


def test_prefill_first_holds_the_kv_until_the_decode_fetches(procs, pool) -> None:  # type: ignore[no-untyped-def]
    pair = start_pair(procs)
    body = pd_body(pair, "y" * 800, max_new=5, stream=True)  # 200 tokens
    prefill: Future[httpx.Response] = pool.submit(post, pair.prefill.url, body)
    wait_until(lambda: disagg(pair.prefill)["held_kv_tokens"] == 200, what="prefill holds KV")
    assert not prefill.done()  # SGLang's prefill answers only once the KV went over
    with httpx.stream("POST", pair.decode.url + "/generate", json=body, timeout=30) as s:
        assert s.status_code == 200
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = orjson.loads(events[-2])
    assert last["meta_info"]["completion_tokens"] == 5
    assert last["meta_info"]["finish_reason"]["type"] == "length"
    answer = prefill.result(timeout=30)
    assert answer.status_code == 200
    assert disagg(pair.prefill)["held_kv_tokens"] == 0 and disagg(pair.prefill)["rooms"] == 0
    metrics = httpx.get(pair.prefill.url + "/metrics", timeout=5).text
    assert 'sglang:pd_held_kv_tokens{model_name="sim/Llama-3.1-8B-Instruct"} 0.0' in metrics
    assert "sglang:pd_transfers_ok" in metrics
    metrics = httpx.get(pair.decode.url + "/metrics", timeout=5).text
    assert "sglang:num_decode_transfer_queue_reqs" in metrics


def test_transfer_time_follows_the_model(procs) -> None:  # type: ignore[no-untyped-def]
    # 1 Gb/s and no speed-up: 2000 tokens x 128 KiB = 262 MB take ~2.1 s more than 1 token.
    pair = start_pair(
        procs, "--speedup", "1", "--kv-link-gbps", "1", "--kv-transfer-latency-ms", "0"
    )
    model = TransferModel(link_gbps=1, latency_ms=0)
    expected = model.seconds(2000) - model.seconds(1)

    def pd_latency(text: str) -> float:
        body = pd_body(pair, text, max_new=2)
        start = time.monotonic()
        with ThreadPoolExecutor(2) as ex:
            decode = ex.submit(post, pair.decode.url, body)
            prefill = ex.submit(post, pair.prefill.url, body)
            assert decode.result(timeout=60).status_code == 200
            assert prefill.result(timeout=60).status_code == 200
        return time.monotonic() - start

    small = pd_latency("abcd")
    large = pd_latency("z" * 8000)
    assert large - small >= 0.9 * expected, (small, large, expected)
    assert large - small <= expected + 3.0, (small, large, expected)  # generous: shared CPU
    assert expected * 0.95 <= disagg(pair.decode)["last_transfer_s"] <= expected + 1.0


def test_no_kv_within_the_timeout_is_an_error(procs) -> None:  # type: ignore[no-untyped-def]
    pair = start_pair(procs, "--disaggregation-timeout", "1")
    start = time.monotonic()
    r = post(pair.decode.url, pd_body(pair, "nobody prefills this"))
    elapsed = time.monotonic() - start
    assert r.status_code == 500, r.text
    assert "--disaggregation-timeout" in r.json()["error"]["message"]
    assert 0.9 <= elapsed <= 1 + 5
    wait_until(lambda: disagg(pair.prefill)["rooms"] == 0, what="the room forgotten")
    assert disagg(pair.decode)["rooms_waiting"] == 0
    # A prefill that holds KV nobody fetches gives up after the timeout too.
    r = post(pair.prefill.url, pd_body(pair, "nobody decodes this"))
    assert r.status_code == 500 and "disaggregation-timeout" in r.json()["error"]["message"]
    assert disagg(pair.prefill)["held_kv_tokens"] == 0


def test_decode_client_leaving_frees_the_room_on_both_sides(procs) -> None:  # type: ignore[no-untyped-def]
    pair = start_pair(procs)
    body = pd_body(pair, "abandoned" * 10)
    with pytest.raises(httpx.ReadTimeout):
        post(pair.decode.url, body, timeout=0.5)
    wait_until(lambda: disagg(pair.decode)["rooms_waiting"] == 0, what="decode stops waiting")
    wait_until(lambda: disagg(pair.prefill)["rooms"] == 0, what="prefill drops the room")
    # The prefill request that comes late for the abandoned room fails at once.
    r = post(pair.prefill.url, body, timeout=10)
    assert r.status_code == 500 and "aborted" in r.json()["error"]["message"]
    assert disagg(pair.prefill)["held_kv_tokens"] == 0


def test_prefill_client_leaving_frees_the_room_on_both_sides(procs, pool) -> None:  # type: ignore[no-untyped-def]
    pair = start_pair(procs)
    body = pd_body(pair, "q" * 400)
    with pytest.raises(httpx.ReadTimeout):
        post(pair.prefill.url, body, timeout=1.0)  # holds KV (no decode) until we hang up
    wait_until(lambda: disagg(pair.prefill)["held_kv_tokens"] == 0, what="held KV dropped")
    assert disagg(pair.prefill)["rooms"] == 0
    start = time.monotonic()
    r = post(pair.decode.url, body, timeout=10)
    assert r.status_code == 500 and "failed" in r.json()["error"]["message"]
    assert time.monotonic() - start < 3.0  # not the 300 s timeout
    assert disagg(pair.decode)["rooms_waiting"] == 0


def test_prefill_crash_mid_transfer_fails_the_decode_promptly(procs, pool) -> None:  # type: ignore[no-untyped-def]
    # 1000 tokens over 0.1 Gb/s: a 10.5 s transfer, during which the prefill crashes.
    pair = start_pair(
        procs, "--speedup", "1", "--kv-link-gbps", "0.1", prefill_extra=("--crash-after", "2")
    )
    body = pd_body(pair, "c" * 4000, max_new=4)
    decode: Future[httpx.Response] = pool.submit(post, pair.decode.url, body)
    prefill: Future[httpx.Response] = pool.submit(post, pair.prefill.url, body)
    wait_until(lambda: disagg(pair.prefill)["transferring"] == 1, what="transfer under way")
    crashed = time.monotonic()
    with pytest.raises(httpx.TransportError):
        post(pair.prefill.url, pd_body(pair, "the second request crashes it"), timeout=5)
    r = decode.result(timeout=30)
    assert time.monotonic() - crashed < 5.0  # the transfer had ~10 s left: not waited for
    assert r.status_code == 500, r.text
    assert "bootstrap" in r.json()["error"]["message"]
    with pytest.raises(httpx.TransportError):
        prefill.result(timeout=10)
    assert disagg(pair.decode)["rooms_waiting"] == 0
    assert httpx.get(pair.decode.url + "/health", timeout=5).status_code == 200


def test_batch_rooms_and_openai_endpoints(procs, pool) -> None:  # type: ignore[no-untyped-def]
    pair = start_pair(procs)
    rooms = [random.getrandbits(63) for _ in range(2)]
    body = {
        "text": ["first prompt", "second prompt"],
        "sampling_params": {"max_new_tokens": 3},
        "bootstrap_host": ["127.0.0.1"] * 2,
        "bootstrap_port": [pair.bootstrap_port] * 2,
        "bootstrap_room": rooms,
    }
    decode = pool.submit(post, pair.decode.url, body)
    assert post(pair.prefill.url, body).status_code == 200
    r = decode.result(timeout=30)
    assert r.status_code == 200 and [o["meta_info"]["completion_tokens"] for o in r.json()] == [
        3,
        3,
    ]
    chat = {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "bootstrap_host": "127.0.0.1", "bootstrap_port": pair.bootstrap_port,
        "bootstrap_room": random.getrandbits(63),
    }  # fmt: skip
    decode_chat = pool.submit(
        httpx.post, pair.decode.url + "/v1/chat/completions", json=chat, timeout=30
    )
    assert httpx.post(pair.prefill.url + "/v1/chat/completions", json=chat, timeout=30).is_success
    answer = decode_chat.result(timeout=30).json()
    assert answer["usage"]["completion_tokens"] == 4
    # return_logprob: the prefill has the prompt's logprobs, the decode only the output's (the
    # PD router merges the prefill's input_token_logprobs in front).
    body = pd_body(pair, "log" * 4, max_new=3, return_logprob=True)  # 3 tokens
    decode = pool.submit(post, pair.decode.url, body)
    prefill_meta = post(pair.prefill.url, body).json()["meta_info"]
    decode_meta = decode.result(timeout=30).json()["meta_info"]
    assert [x[0] is None for x in prefill_meta["input_token_logprobs"]] == [True, False, False]
    assert decode_meta["input_token_logprobs"] == []
    assert len(decode_meta["output_token_logprobs"]) == 3
    assert decode_meta["output_token_logprobs"][0] == prefill_meta["output_token_logprobs"][0]


def _router_pd(procs, pair: Pair) -> ManagedProcess:  # type: ignore[no-untyped-def]
    return procs.router(
        [], "--pd-disaggregation", "--prefill", pair.prefill.url, str(pair.bootstrap_port),
        "--decode", pair.decode.url,
    )  # fmt: skip


def test_sglctl_router_in_pd_mode_drives_the_pair(procs) -> None:  # type: ignore[no-untyped-def]
    pair = start_pair(procs)
    router = _router_pd(procs, pair)
    wait_until(
        lambda: httpx.get(router.url + "/readiness", timeout=5).json()["status"] == "ready",
        timeout=30,
        what="router ready",
    )
    with httpx.Client(base_url=router.url, timeout=30) as c:
        r = c.post(
            "/generate",
            json={"text": "through the router", "sampling_params": {"max_new_tokens": 5}},
        )
        assert r.status_code == 200, r.text
        assert r.json()["meta_info"]["completion_tokens"] == 5
        payload = {"text": "streamed", "sampling_params": {"max_new_tokens": 4}, "stream": True}
        with c.stream("POST", "/generate", json=payload) as s:
            assert s.status_code == 200
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert orjson.loads(events[-2])["meta_info"]["completion_tokens"] == 4
    assert disagg(pair.prefill)["transfers_ok"] == 2
    assert disagg(pair.decode)["transfers_ok"] == 2
    assert disagg(pair.prefill)["held_kv_tokens"] == 0


def test_transfer_model_figures() -> None:
    model = TransferModel()  # Llama-3.1-8B BF16 over one 400 Gb/s NIC, 1 ms a transfer
    assert model.kv_bytes(1) == 2 * 32 * 8 * 128 * 2 == 131072
    assert model.seconds(4096) == pytest.approx(0.001 + 4096 * 131072 * 8 / 400e9)
    assert TransferModel(speedup=10).seconds(4096) == pytest.approx(model.seconds(4096) / 10)
    with pytest.raises(ValueError, match="--kv-link-gbps"):
        TransferModel(link_gbps=0)


def test_bootstrap_fields_are_validated() -> None:
    body = {"bootstrap_host": "h", "bootstrap_port": 1234, "bootstrap_room": 7}
    assert parse_bootstrap(body, 1, "decode") == [Bootstrap("h", 1234, 7)]
    # A router that does not know the port sends null: SGLang's default port
    assert parse_bootstrap({**body, "bootstrap_port": None}, 1, "decode")[0].port == 8998
    lists = {"bootstrap_host": ["h"] * 2, "bootstrap_port": [1, 2], "bootstrap_room": [3, 4]}
    assert [b.room for b in parse_bootstrap(lists, 2, "prefill")] == [3, 4]
    for bad, prompts, message in [
        ({}, 1, "without bootstrap room id"),
        (body, 2, "one bootstrap_room"),  # two prompts, one room
        ({**lists, "bootstrap_room": 3}, 2, "all be lists"),
        (lists, 3, "one entry per prompt"),
        ({**body, "bootstrap_room": -1}, 1, "non-negative"),
        ({**body, "bootstrap_port": "x"}, 1, "port number"),
    ]:
        with pytest.raises(APIError, match=message) as info:
            parse_bootstrap(bad, prompts, "decode")
        assert info.value.status == 400


def test_client_closed_request_error_has_a_type() -> None:
    """499 (client went away while a decode waited for KV) is not an HTTPStatus member."""
    from sglctl.sim.errors import APIError, error_body

    assert APIError("gone", status=499).type == "ClientClosedRequest"
    assert error_body("gone", 499, openai=False)["error"]["type"] == "ClientClosedRequest"
