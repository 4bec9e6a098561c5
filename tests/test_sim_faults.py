"""Fault flags of the sim worker (--crash-after, --error-rate, --stall-after, --role) and
cancellation of requests whose client went away."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from sglctl.net import find_free_port
from sglctl.spawn import ManagedProcess

GEN = {"text": "fault", "sampling_params": {"max_new_tokens": 2}}


def poll(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def load(worker: ManagedProcess) -> dict[str, int]:
    return httpx.get(worker.url + "/get_load", timeout=5).json()[0]  # type: ignore[no-any-return]


def test_crash_after_exits_on_the_nth_request(procs) -> None:  # type: ignore[no-untyped-def]
    worker = procs.sim_worker("--speedup", "100", "--crash-after", "2")
    with httpx.Client(base_url=worker.url, timeout=5) as c:
        assert c.post("/generate", json=GEN).status_code == 200
        assert c.get("/health").status_code == 200  # health checks do not count
        with pytest.raises(httpx.TransportError):
            c.post("/generate", json=GEN)
    assert poll(lambda: not worker.alive())
    assert worker.popen.returncode == 1


def test_error_rate_one_answers_500_json(procs) -> None:  # type: ignore[no-untyped-def]
    worker = procs.sim_worker("--speedup", "100", "--error-rate", "1")
    with httpx.Client(base_url=worker.url, timeout=5) as c:
        r = c.post("/generate", json=GEN)
        assert r.status_code == 500
        assert r.json()["error"]["code"] == 500
        chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 500 and r.json()["object"] == "error"
        assert c.get("/health").status_code == 200


def test_error_rate_is_a_seeded_fraction(procs) -> None:  # type: ignore[no-untyped-def]
    outcomes = []
    for _ in range(2):
        worker = procs.sim_worker("--speedup", "100", "--error-rate", "0.5", "--seed", "7")
        with httpx.Client(base_url=worker.url, timeout=5) as c:
            outcomes.append([c.post("/generate", json=GEN).status_code for _ in range(30)])
        worker.stop()
    assert outcomes[0] == outcomes[1]  # same seed, same fate
    assert 0 < outcomes[0].count(500) < 30 and set(outcomes[0]) == {200, 500}


def test_stall_after_stops_answering_everything(procs) -> None:  # type: ignore[no-untyped-def]
    worker = procs.sim_worker("--speedup", "100", "--stall-after", "1")
    with httpx.Client(base_url=worker.url, timeout=0.5) as c:
        assert c.post("/generate", json=GEN).status_code == 200
        with pytest.raises(httpx.ReadTimeout):  # connected, never answered
            c.get("/health")
        with pytest.raises(httpx.ReadTimeout):
            c.post("/generate", json=GEN)
    assert worker.alive()


def test_role_is_validated(procs) -> None:  # type: ignore[no-untyped-def]
    bad = procs.sim_worker("--role", "bogus", wait=False)
    assert poll(lambda: not bad.alive())
    assert bad.popen.returncode == 2
    assert "--disaggregation-mode must be one of null, prefill, decode" in bad.log_tail()
    # --role is the old spelling of --disaggregation-mode; the PD roles are tested in test_sim_pd
    port = str(find_free_port())
    good = procs.sim_worker("--role", "prefill", "--disaggregation-bootstrap-port", port)
    info = httpx.get(good.url + "/get_server_info", timeout=5).json()
    assert info["disaggregation_mode"] == "prefill"


def test_stream_disconnect_frees_the_slot(procs) -> None:  # type: ignore[no-untyped-def]
    worker = procs.sim_worker("--max-running-requests", "1")
    payload = {"text": "long", "sampling_params": {"max_new_tokens": 100_000}, "stream": True}
    with (
        httpx.Client(base_url=worker.url, timeout=5) as c,
        c.stream("POST", "/generate", json=payload) as r,
    ):
        lines = r.iter_lines()  # keep the iterator: dropping it would close the stream
        next(lines)  # the first chunk: the request is running
        assert load(worker)["num_reqs"] == 1
    assert poll(lambda: load(worker)["num_reqs"] == 0)
    assert load(worker)["num_tokens"] < 100  # its KV reservation was released
    r2 = httpx.post(worker.url + "/generate", json=GEN, timeout=5)
    assert r2.status_code == 200  # the slot is free again


def test_non_stream_disconnect_while_queued(procs) -> None:  # type: ignore[no-untyped-def]
    worker = procs.sim_worker("--max-running-requests", "1")
    hog = {"text": "hog", "sampling_params": {"max_new_tokens": 100_000}, "stream": True}
    with (
        httpx.Client(base_url=worker.url, timeout=5) as c,
        c.stream("POST", "/generate", json=hog) as r,
    ):
        lines = r.iter_lines()
        next(lines)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(worker.url + "/generate", json=GEN, timeout=0.3)
        # The queued request was cancelled when its client gave up.
        assert poll(lambda: load(worker)["num_waiting_reqs"] == 0)
        assert load(worker)["num_reqs"] == 1
    assert poll(lambda: load(worker)["num_reqs"] == 0)
