"""The router in PD mode, end to end: a real ``sglctl router --mode pd`` subprocess in front of
real simulated prefill and decode workers that hand KV over (``sglctl/sim/disagg.py``).

Every test starts its own processes on free ports (the ``procs`` fixture stops them). Waits
are polls with deadlines; nothing asserts on speed.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest

from sglctl.net import find_free_port
from sglctl.router.pd import LogprobMerge
from sglctl.spawn import ManagedProcess
from tests.support import wait_until

FAST = ("--speedup", "10")
PREFILL_HEADER = "x-sglctl-prefill-worker"


def start_prefill(procs: Any, *extra: str) -> tuple[ManagedProcess, int]:
    port = find_free_port()
    worker = procs.sim_worker(
        "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(port),
        *FAST, *extra,
    )  # fmt: skip
    return worker, port


def start_decode(procs: Any, *extra: str) -> ManagedProcess:
    return procs.sim_worker("--disaggregation-mode", "decode", *FAST, *extra)  # type: ignore[no-any-return]


def start_router(procs: Any, *flags: str) -> ManagedProcess:
    """A router subprocess in PD mode with its own metrics port (tests run side by side)."""
    return procs.router([], *flags, "--metrics-port", str(find_free_port()))  # type: ignore[no-any-return]


def pd_router(
    procs: Any, prefills: Sequence[str], decodes: Sequence[str], *extra: str
) -> ManagedProcess:
    """``--mode pd --prefill-urls ... --decode-urls ...``: no bootstrap ports given, so the
    router asks each prefill's /get_server_info."""
    return start_router(
        procs, "--mode", "pd", "--prefill-urls", *prefills, "--decode-urls", *decodes, *extra
    )


def disagg(worker: ManagedProcess) -> dict[str, Any]:
    info = httpx.get(worker.url + "/get_server_info", timeout=10).json()
    return info["disaggregation"]  # type: ignore[no-any-return]


def settled(prefill: ManagedProcess) -> bool:
    """No room and no held KV left on the prefill side."""
    stats = disagg(prefill)
    return stats["rooms"] == 0 and stats["held_kv_tokens"] == 0


def sse_events(lines: Any) -> list[str]:
    return [line[6:] for line in lines if line.startswith("data: ")]


def metric(text: str, name: str, worker: str | None = None) -> float:
    """One sample of the router's /metrics (the sum over labels when ``worker`` is None)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{[^}}]*\}})? (\S+)$", line)
        if m is None:
            continue
        if worker is not None and f'worker="{worker}"' not in (m.group(1) or ""):
            continue
        total += float(m.group(2))
    return total


def metrics(router: ManagedProcess) -> str:
    return httpx.get(router.url + "/metrics", timeout=10).text


def test_every_endpoint_streamed_and_not(procs) -> None:  # type: ignore[no-untyped-def]
    prefill, _ = start_prefill(procs)
    decode = start_decode(procs)
    router = pd_router(procs, [prefill.url], [decode.url])
    chat = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
    calls: list[tuple[str, dict[str, Any]]] = [
        ("/generate", {"text": "a native prompt", "sampling_params": {"max_new_tokens": 5}}),
        ("/v1/completions", {"model": "m", "prompt": "a completion prompt", "max_tokens": 5}),
        ("/v1/chat/completions", {**chat, "max_tokens": 5}),
    ]
    with httpx.Client(base_url=router.url, timeout=60) as c:
        for path, body in calls:
            r = c.post(path, json=body)
            assert r.status_code == 200, (path, r.text)
            assert r.headers["x-sglctl-worker"] == decode.url
            assert r.headers[PREFILL_HEADER] == prefill.url
            answer = r.json()
            if path == "/generate":
                assert answer["meta_info"]["completion_tokens"] == 5
            else:
                assert answer["usage"]["completion_tokens"] == 5
            streamed = {**body, "stream": True}
            if path != "/generate":
                streamed["stream_options"] = {"include_usage": True}
            with c.stream("POST", path, json=streamed) as s:
                assert s.status_code == 200, path
                assert s.headers["content-type"].startswith("text/event-stream")
                events = sse_events(s.iter_lines())
            assert events[-1] == "[DONE]", (path, events)
            last = orjson.loads(events[-2])
            tokens = (last.get("meta_info") or last.get("usage") or {})["completion_tokens"]
            assert tokens == 5, (path, last)
        # The bootstrap port came from the prefill's /get_server_info.
        workers = {w["url"]: w for w in c.get("/workers").json()["workers"]}
        assert workers[prefill.url]["bootstrap_port"] == disagg_port(prefill)
        assert all(w["load"] == 0 for w in workers.values())
    assert disagg(prefill)["transfers_ok"] == 6 and disagg(decode)["transfers_ok"] == 6
    assert settled(prefill)
    text = metrics(router)
    assert metric(text, "sglang_router_pd_prefill_requests_total", prefill.url) == 6
    assert metric(text, "sglang_router_pd_decode_requests_total", decode.url) == 6
    assert metric(text, "sglang_router_pd_prefill_duration_seconds_count") == 6
    assert metric(text, "sglang_router_pd_transfer_failures_total") == 0


def disagg_port(worker: ManagedProcess) -> int:
    info = httpx.get(worker.url + "/get_server_info", timeout=10).json()
    return int(info["disaggregation_bootstrap_port"])


def test_logprobs_of_the_prompt_come_from_the_prefill(procs) -> None:  # type: ignore[no-untyped-def]
    prefill, _ = start_prefill(procs)
    decode = start_decode(procs)
    plain = procs.sim_worker(*FAST)  # what one whole worker answers for the same request
    router = pd_router(procs, [prefill.url], [decode.url])
    body = {"text": "logprobs " * 6, "sampling_params": {"max_new_tokens": 4}}
    body["return_logprob"] = True
    expected = httpx.post(plain.url + "/generate", json=body, timeout=30).json()["meta_info"]
    assert len(expected["input_token_logprobs"]) == expected["prompt_tokens"] > 1
    with httpx.Client(base_url=router.url, timeout=60) as c:
        meta = c.post("/generate", json=body).json()["meta_info"]
        assert meta["input_token_logprobs"] == expected["input_token_logprobs"]
        assert meta["output_token_logprobs"] == expected["output_token_logprobs"]
        with c.stream("POST", "/generate", json={**body, "stream": True}) as s:
            chunks = [orjson.loads(e) for e in sse_events(s.iter_lines()) if e != "[DONE]"]
        assert chunks
        for chunk in chunks:
            assert chunk["meta_info"]["input_token_logprobs"] == expected["input_token_logprobs"]
        assert (
            chunks[-1]["meta_info"]["output_token_logprobs"] == (expected["output_token_logprobs"])
        )
        # A batch: each prompt gets its own prefill's prompt logprobs.
        batch = {**body, "text": ["first one", "the second prompt"]}
        plain_batch = httpx.post(plain.url + "/generate", json=batch, timeout=30).json()
        answers = c.post("/generate", json=batch).json()
        assert [a["meta_info"]["input_token_logprobs"] for a in answers] == [
            a["meta_info"]["input_token_logprobs"] for a in plain_batch
        ]
    assert settled(prefill)


def test_a_batch_gets_one_room_per_prompt(procs) -> None:  # type: ignore[no-untyped-def]
    prefill, port = start_prefill(procs)
    decode = start_decode(procs)
    router = start_router(
        procs, "--pd-disaggregation", "--prefill", prefill.url, str(port), "--decode", decode.url
    )
    body = {"text": ["one", "two", "three"], "sampling_params": {"max_new_tokens": 3}}
    r = httpx.post(router.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert [a["meta_info"]["completion_tokens"] for a in r.json()] == [3, 3, 3]
    # Three rooms handed over (the sim refuses one room for several prompts).
    assert disagg(prefill)["transfers_ok"] == 3 and disagg(decode)["transfers_ok"] == 3
    ids = {"input_ids": [[1, 2, 3], [4, 5]], "sampling_params": {"max_new_tokens": 2}}
    r = httpx.post(router.url + "/generate", json={**ids, "stream": True}, timeout=60)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    assert disagg(prefill)["transfers_ok"] == 5
    assert settled(prefill)


def test_decode_cache_aware_policy_gets_the_routing_text(procs) -> None:  # type: ignore[no-untyped-def]
    # The prefill policy needs no text; the decode one does: the router must still extract it.
    prefill, _ = start_prefill(procs)
    decodes = [start_decode(procs), start_decode(procs)]
    router = pd_router(
        procs, [prefill.url], [d.url for d in decodes],
        "--prefill-policy", "round_robin", "--decode-policy", "cache_aware",
    )  # fmt: skip
    body = {"text": "a long shared system prompt " * 8, "sampling_params": {"max_new_tokens": 2}}
    served = set()
    for _ in range(4):
        r = httpx.post(router.url + "/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        served.add(r.headers["x-sglctl-worker"])
    assert len(served) == 1  # the prefix stays on one decode worker
    text = metrics(router)
    assert metric(text, "sglang_router_tree_size_chars") > 0
    assert metric(text, "sglang_router_cache_hits_total") >= 3


def test_pair_retry_never_reuses_a_failed_worker(procs) -> None:  # type: ignore[no-untyped-def]
    # Two prefill URLs nobody listens on, one live prefill; retries must walk past the dead
    # ones without trying either twice for one request.
    dead = [f"http://127.0.0.1:{find_free_port()}" for _ in range(2)]
    prefill, port = start_prefill(procs)
    decode = start_decode(procs)
    flags = ["--pd-disaggregation", "--decode", decode.url]
    for url in [*dead, prefill.url]:
        flags += ["--prefill", url, str(port)]
    router = start_router(
        procs, *flags, "--prefill-policy", "round_robin", "--disable-health-check",
        "--disable-circuit-breaker", "--retry-initial-backoff-ms", "1",
    )  # fmt: skip
    dead_attempts = 0
    for i in range(6):
        before = metrics(router)
        r = httpx.post(
            router.url + "/generate",
            json={"text": f"request {i}", "sampling_params": {"max_new_tokens": 2}},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.headers[PREFILL_HEADER] == prefill.url
        after = metrics(router)
        for url in dead:
            tried = metric(after, "sglang_router_pd_prefill_requests_total", url) - metric(
                before, "sglang_router_pd_prefill_requests_total", url
            )
            assert tried <= 1, (i, url, tried)
            dead_attempts += int(tried)
        live = metric(after, "sglang_router_pd_prefill_requests_total", prefill.url)
        assert live - metric(before, "sglang_router_pd_prefill_requests_total", prefill.url) == 1
    assert dead_attempts >= 6  # the dead workers really were tried (and skipped)
    assert metric(metrics(router), "sglang_router_retries_total") == dead_attempts
    # The decode halves of the failed attempts were closed: nothing waits there.
    wait_until(lambda: disagg(decode)["rooms_waiting"] == 0, timeout=20, what="decode idle")
    assert settled(prefill)


def test_the_surviving_half_is_aborted(procs) -> None:  # type: ignore[no-untyped-def]
    # One decode answers 500 at once: the prefill half of that attempt (holding the prompt's
    # KV for a decode that will never fetch it) must be closed by the router, not left to the
    # prefill's 120 s --disaggregation-timeout.
    prefill, _ = start_prefill(procs, "--disaggregation-timeout", "120")
    bad = start_decode(procs, "--error-rate", "1")
    good = start_decode(procs)
    router = pd_router(
        procs, [prefill.url], [bad.url, good.url], "--decode-policy", "round_robin",
        "--disable-circuit-breaker",
    )  # fmt: skip
    for i in range(4):
        r = httpx.post(
            router.url + "/generate",
            json={"text": f"prompt {i} " * 20, "sampling_params": {"max_new_tokens": 2}},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-sglctl-worker"] == good.url
    wait_until(lambda: settled(prefill), timeout=20, what="prefill rooms and KV freed")
    text = metrics(router)
    assert metric(text, "sglang_router_pd_decode_requests_total", bad.url) >= 2
    assert metric(text, "sglang_router_worker_errors_total", bad.url) >= 2
    assert metric(text, "sglang_router_worker_errors_total", prefill.url) == 0  # not blamed


def test_kill_a_prefill_then_a_decode_under_load(procs) -> None:  # type: ignore[no-untyped-def]
    prefills = [start_prefill(procs)[0] for _ in range(2)]
    decodes = [start_decode(procs) for _ in range(2)]
    router = pd_router(
        procs, [p.url for p in prefills], [d.url for d in decodes],
        "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
        "--retry-initial-backoff-ms", "10",
    )  # fmt: skip
    statuses: list[int] = []
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(n: int) -> None:
        with httpx.Client(base_url=router.url, timeout=120) as c:
            i = 0
            while not stop.is_set() and i < 400:  # bounded in count and (below) in time
                body = {"text": f"client {n} request {i} " * 4, "sampling_params": {}}
                body["sampling_params"] = {"max_new_tokens": 6}
                try:
                    r = c.post("/generate", json=body)
                    with lock:
                        statuses.append(r.status_code)
                        if r.status_code != 200:
                            errors.append(r.text[:300])
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(repr(exc))
                i += 1

    def count() -> int:
        with lock:
            return len(statuses)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, n) for n in range(4)]
        try:
            wait_until(lambda: count() >= 20, timeout=60, what="load running")
            prefills[0].popen.kill()  # kill -9
            at = count()
            wait_until(lambda: count() >= at + 30, timeout=60, what="load after the prefill")
            decodes[0].popen.kill()
            at = count()
            wait_until(lambda: count() >= at + 30, timeout=60, what="load after the decode")
        finally:
            stop.set()
            for f in futures:
                f.result(timeout=150)
    assert not errors, errors[:5]
    assert statuses and set(statuses) == {200}
    # Nothing left behind on the survivors.
    wait_until(lambda: settled(prefills[1]), timeout=20, what="prefill rooms freed")
    wait_until(lambda: disagg(decodes[1])["rooms_waiting"] == 0, timeout=20, what="decode idle")
    loads = httpx.get(router.url + "/get_loads", timeout=10).json()["workers"]
    assert all(item["load"] == 0 for item in loads), loads


@pytest.mark.parametrize("stream", [False, True])
def test_no_pair_is_a_503_naming_the_pools(procs, stream: bool) -> None:  # type: ignore[no-untyped-def]
    prefill, port = start_prefill(procs)
    dead = f"http://127.0.0.1:{find_free_port()}"
    router = start_router(
        procs, "--pd-disaggregation", "--prefill", prefill.url, str(port), "--decode", dead,
        "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
    )  # fmt: skip
    body = {"text": "x", "stream": stream, "sampling_params": {"max_new_tokens": 2}}

    def answer() -> httpx.Response:
        return httpx.post(router.url + "/generate", json=body, timeout=60)

    wait_until(lambda: answer().status_code == 503, timeout=30, what="decode ejected")
    error = answer().json()["error"]
    assert "1 prefill, 0 decode" in error["message"] and error["code"] == 503
    assert settled(prefill)


def test_logprob_merge_reframes_events_split_across_chunks() -> None:
    prefill = orjson.dumps(
        [
            {"meta_info": {"input_token_logprobs": [[None, 1, None], [-0.5, 2, None]]}},
            {"meta_info": {"input_token_logprobs": [[None, 7, None]]}},
        ]
    )
    merge = LogprobMerge(prefill)
    event = b'data: {"index": 1, "meta_info": {"input_token_logprobs": []}}\n\n'
    out = merge.chunk(event[:10]) + merge.chunk(event[10:] + b"data: [DONE]") + merge.chunk(b"\n\n")
    first, done = out.split(b"\n\n")[:2]
    assert orjson.loads(first[6:])["meta_info"]["input_token_logprobs"] == [[None, 7, None]]
    assert done == b"data: [DONE]" and merge.end() == b""
    whole = merge.whole(orjson.dumps({"meta_info": {"input_token_logprobs": [[-1.0, 3, None]]}}))
    assert orjson.loads(whole)["meta_info"]["input_token_logprobs"] == [
        [None, 1, None], [-0.5, 2, None], [-1.0, 3, None],
    ]  # fmt: skip
    assert merge.whole(b"not json") == b"not json"
    assert merge.chunk(b"data: {broken\n\n") == b"data: {broken\n\n"


def test_a_hung_prefill_is_interrupted_and_the_pair_retried(procs) -> None:  # type: ignore[no-untyped-def]
    # The hung prefill (after two answers) accepts connections and never answers, /health
    # included. Its health checks failing must interrupt the PD attempt stuck on it (in-flight
    # interruption, shared with the regular path) and retry the pair on the other prefill,
    # well before the decode's 120 s wait for the KV or the client's 60 s patience run out.
    hung, _ = start_prefill(procs, "--stall-after", "2", "--disaggregation-timeout", "120")
    good, _ = start_prefill(procs)
    decode = start_decode(procs, "--disaggregation-timeout", "120")
    router = pd_router(
        procs, [hung.url, good.url], [decode.url], "--prefill-policy", "round_robin",
        "--health-check-interval-secs", "0.3", "--health-check-timeout-secs", "2",
        "--health-failure-threshold", "2", "--request-timeout-secs", "300",
    )  # fmt: skip
    with httpx.Client(base_url=router.url, timeout=60) as c:
        for i in range(6):
            body = {"text": f"request {i} " * 10, "sampling_params": {"max_new_tokens": 2}}
            r = c.post("/generate", json=body)
            assert r.status_code == 200, r.text
    text = metrics(router)
    assert metric(text, "sglang_router_worker_errors_total", hung.url) >= 1
    assert metric(text, "sglang_router_worker_healthy", hung.url) == 0
    # The decode half of the interrupted attempt was closed, not left waiting for the KV.
    wait_until(lambda: disagg(decode)["rooms_waiting"] == 0, timeout=20, what="decode idle")
    assert settled(good)
