"""The router as a real process in front of real sim workers, on 127.0.0.1 sockets."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from support import wait_until

from sglctl.net import find_free_port

FAST = ("--speedup", "50")


def router_flags(*extra: str) -> tuple[str, ...]:
    """Every router in a test gets its own metrics port (never the 29000 default)."""
    return ("--metrics-port", str(find_free_port()), *extra)


def test_every_endpoint_through_the_router(procs) -> None:
    w1, w2 = procs.sim_worker(*FAST), procs.sim_worker(*FAST)
    metrics_port = find_free_port()
    router = procs.router([w1.url, w2.url], "--metrics-port", str(metrics_port))
    with httpx.Client(base_url=router.url, timeout=30) as c:
        r = c.post("/generate", json={"text": "Hello", "sampling_params": {"max_new_tokens": 8}})
        assert r.status_code == 200, r.text
        assert r.json()["meta_info"]["completion_tokens"] == 8
        r = c.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
        chat = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        assert c.get("/v1/models").json()["data"]
        assert "model_path" in c.get("/get_model_info").json()
        info = c.get("/get_server_info").json()
        assert info["router"]["workers"] == 2
        assert c.get("/health").status_code == 200
        assert c.get("/health_generate").status_code == 200
        assert c.get("/liveness").status_code == 200
        assert c.get("/readiness").json() == {
            "status": "ready",
            "healthy_workers": 2,
            "total_workers": 2,
        }
        assert set(c.get("/list_workers").json()["urls"]) == {w1.url, w2.url}
        assert len(c.get("/workers").json()["workers"]) == 2
        assert {w["worker"] for w in c.get("/get_loads").json()["workers"]} == {w1.url, w2.url}
        flushed = c.post("/flush_cache").json()
        assert flushed["status"] == "success" and flushed["workers_flushed"] == 2
        stats = c.get("/stats").json()
        assert stats["requests_total"] == 3 and stats["healthy_workers"] == 2
        assert "sglang_router_requests_total" in c.get("/metrics").text
        assert c.get("/nope").status_code == 404
    separate = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
    assert separate.status_code == 200
    ok = 'sglang_router_requests_total{code="200",route="/generate",status="success"}'
    assert ok in separate.text


def test_streaming_is_relayed_as_it_is_generated(procs) -> None:
    worker = procs.sim_worker("--speedup", "1")
    router = procs.router([worker.url], *router_flags())
    body = {"text": "Tell me a story", "stream": True, "sampling_params": {"max_new_tokens": 100}}
    arrivals: list[float] = []
    lines: list[bytes] = []
    start = time.monotonic()
    with httpx.stream("POST", router.url + "/generate", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                arrivals.append(time.monotonic() - start)
                lines.append(line.encode())
    assert lines[-1] == b"data: [DONE]"
    assert len(lines) > 10
    # Chunk by chunk: the events arrive spread over the generation (100 decode steps, about
    # 0.5 s at --speedup 1), not at once at the end. A buffering router would deliver them
    # within a few ms; a loaded machine only spreads them further, never closer.
    assert arrivals[-1] - arrivals[0] > 0.2, arrivals


def test_openai_client_through_the_router(procs) -> None:
    worker = procs.sim_worker(*FAST)
    router = procs.router([worker.url], *router_flags())
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    models = client.models.list()
    model = models.data[0].id
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=5
    )
    assert chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens == 5
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text
    completion = client.completions.create(model=model, prompt="Once upon", max_tokens=4)
    assert completion.choices[0].text
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages="not a list", max_tokens=4)  # type: ignore[arg-type]


def test_cache_affinity_groups_stick_and_every_worker_is_used(procs) -> None:
    workers = [procs.sim_worker(*FAST) for _ in range(2)]
    router = procs.router([w.url for w in workers], *router_flags())
    groups = [
        f"[group {g}] " + f"system prompt number {g} with shared context. " * 40 for g in range(8)
    ]
    served: dict[int, set[str]] = {g: set() for g in range(8)}
    cached: list[int] = []
    with httpx.Client(base_url=router.url, timeout=30) as c:
        for round_ in range(3):
            for g, prefix in enumerate(groups):
                r = c.post(
                    "/generate",
                    json={
                        "text": prefix + f"question {round_}",
                        "sampling_params": {"max_new_tokens": 2},
                    },
                )
                assert r.status_code == 200
                served[g].add(r.headers["x-sglctl-worker"])
                if round_ > 0:
                    cached.append(r.json()["meta_info"]["cached_tokens"])
    assert all(len(urls) == 1 for urls in served.values()), served
    assert set().union(*served.values()) == {w.url for w in workers}
    # The workers really had those prefixes cached on repeats.
    assert min(cached) > 0


def _loaded_burst(router_url: str, n: int) -> Counter[str]:
    body = {"text": "one hot prefix " * 60, "sampling_params": {"max_new_tokens": 60}}

    def send(_: int) -> str:
        r = httpx.post(router_url + "/generate", json=body, timeout=30)
        assert r.status_code == 200
        return r.headers["x-sglctl-worker"]

    with ThreadPoolExecutor(n) as pool:
        return Counter(pool.map(send, range(n)))


def test_imbalance_falls_back_to_the_shortest_queue(procs) -> None:
    workers = [procs.sim_worker("--speedup", "2") for _ in range(2)]
    urls = [w.url for w in workers]
    sticky = procs.router(urls, *router_flags())  # default thresholds: 32 in flight
    balanced = procs.router(
        urls, *router_flags("--balance-abs-threshold", "1", "--balance-rel-threshold", "1.0")
    )
    # The same burst of one hot prefix: the default router keeps it on one worker (cache),
    # the low-threshold router spreads it once the load difference passes 1.
    assert len(_loaded_burst(sticky.url, 8)) == 1
    spread = _loaded_burst(balanced.url, 8)
    assert len(spread) == 2, spread


def test_add_and_remove_while_requests_run_loses_nothing(procs) -> None:
    w1, w2, w3 = (procs.sim_worker("--speedup", "10") for _ in range(3))
    router = procs.router([w1.url, w2.url], *router_flags("--policy", "round_robin"))
    results: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def client_loop(i: int) -> None:
        with httpx.Client(base_url=router.url, timeout=30) as c:
            n = 0
            while not stop.is_set() or n < 5:
                n += 1
                r = c.post(
                    "/generate",
                    json={"text": f"client {i} req {n}", "sampling_params": {"max_new_tokens": 16}},
                )
                results.append(r.status_code)
                if r.status_code != 200:
                    errors.append(r.text)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) >= 10)
        added = httpx.post(router.url + "/add_worker", params={"url": w3.url}, timeout=30)
        assert added.status_code == 200
        wait_until(
            lambda: any(
                w["url"] == w3.url and w["requests_total"] > 0
                for w in httpx.get(router.url + "/workers").json()["workers"]
            )
        )
        # Remove w1 while it has requests in flight (round robin keeps it busy).
        removed = httpx.post(router.url + "/remove_worker", params={"url": w1.url}, timeout=30)
        assert removed.status_code == 200
        count = len(results)
        wait_until(lambda: len(results) >= count + 20)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert errors == []
    assert all(code == 200 for code in results)
    assert set(httpx.get(router.url + "/list_workers").json()["urls"]) == {w2.url, w3.url}


def test_client_disconnect_mid_stream_cancels_upstream_and_frees_load(procs) -> None:
    worker = procs.sim_worker("--speedup", "1")
    router = procs.router([worker.url], *router_flags())
    body = {"text": "long story", "stream": True, "sampling_params": {"max_new_tokens": 2000}}
    with httpx.stream("POST", router.url + "/generate", json=body, timeout=30) as r:
        lines = r.iter_lines()  # keep a reference: a dropped iterator closes the response
        assert next(line for line in lines if line.startswith("data:"))
        loads = httpx.get(router.url + "/get_loads").json()["workers"]
        assert loads[0]["load"] == 1
    # 2000 tokens take ~13 s at speedup 1; the abort must come long before.
    started = time.monotonic()
    wait_until(
        lambda: httpx.get(router.url + "/get_loads").json()["workers"][0]["load"] == 0, timeout=5
    )
    wait_until(lambda: httpx.get(worker.url + "/get_load").json()[0]["num_reqs"] == 0, timeout=5)
    assert time.monotonic() - started < 5


def test_upstream_timeout_is_504(procs) -> None:
    worker = procs.sim_worker(*FAST, "--stall-after", "1")
    httpx.post(
        worker.url + "/generate",
        json={"text": "x", "sampling_params": {"max_new_tokens": 1}},
        timeout=10,
    )
    router = procs.router(
        [worker.url], *router_flags("--request-timeout-secs", "0.5", "--disable-health-check")
    )
    started = time.monotonic()
    r = httpx.post(router.url + "/generate", json={"text": "x"}, timeout=30)
    assert r.status_code == 504
    assert r.json()["error"]["code"] == 504
    assert time.monotonic() - started < 10


def test_errors_over_real_sockets(procs) -> None:
    worker = procs.sim_worker(*FAST)
    router = procs.router([worker.url], *router_flags("--max-payload-size", "2048"))
    with httpx.Client(base_url=router.url, timeout=30) as c:
        assert c.post("/generate", content=b"{oops").status_code == 400
        assert c.post("/generate", json={"text": ["ok", 3]}).status_code == 400
        assert c.post("/generate", json={"text": "x" * 5000}).status_code == 413
        assert c.delete("/generate").status_code == 405
    empty = procs.router([], *router_flags())
    r = httpx.post(empty.url + "/generate", json={"text": "x"}, timeout=10)
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "service_unavailable"


def test_cli_admin_commands(procs) -> None:
    w1, w2 = procs.sim_worker(*FAST), procs.sim_worker(*FAST)
    router = procs.router([w1.url], *router_flags())
    sglctl = [sys.executable, "-m", "sglctl"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*sglctl, *args, "--router", router.url], capture_output=True, text=True, timeout=60
        )

    assert run("add-worker", w2.url).returncode == 0
    listed = run("list-workers")
    assert w1.url in listed.stdout and w2.url in listed.stdout
    duplicate = run("add-worker", w2.url)
    assert duplicate.returncode == 1 and "409" in duplicate.stderr
    assert run("remove-worker", w1.url).returncode == 0
    assert w1.url not in run("list-workers").stdout


def test_unsupported_flag_fails_at_start_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sglctl.router", "--dp-aware"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--dp-aware is not supported" in result.stderr


def test_pd_mode_with_prefill_and_decode_sim_workers(procs) -> None:
    # A free bootstrap port, not the default 8998 every prefill worker on the host would bind.
    bootstrap = str(find_free_port())
    prefill = procs.sim_worker(
        *FAST, "--role", "prefill", "--disaggregation-bootstrap-port", bootstrap
    )
    decode = procs.sim_worker(*FAST, "--role", "decode")
    router = procs.router(
        [],
        *router_flags(
            "--pd-disaggregation", "--prefill", prefill.url, bootstrap, "--decode", decode.url
        ),
    )
    with httpx.Client(base_url=router.url, timeout=30) as c:
        r = c.post("/generate", json={"text": "PD hello", "sampling_params": {"max_new_tokens": 4}})
        assert r.status_code == 200, r.text
        assert r.headers["x-sglctl-worker"] == decode.url
        chunks = []
        stream_body = {
            "text": "PD stream",
            "stream": True,
            "sampling_params": {"max_new_tokens": 4},
        }
        with c.stream("POST", "/generate", json=stream_body) as s:
            chunks = [line for line in s.iter_lines() if line]
        assert chunks[-1] == "data: [DONE]"
        served = {w["url"]: w["requests_total"] for w in c.get("/workers").json()["workers"]}
        assert served == {prefill.url: 2, decode.url: 2}


def test_client_giving_up_on_a_non_streamed_request_cancels_it_upstream(procs) -> None:
    worker = procs.sim_worker("--speedup", "1")
    router = procs.router([worker.url], *router_flags())
    body = {"text": "long answer", "sampling_params": {"max_new_tokens": 2000}}  # ~13 s
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(router.url + "/generate", json=body, timeout=httpx.Timeout(30, read=0.5))
    wait_until(
        lambda: httpx.get(router.url + "/get_loads").json()["workers"][0]["load"] == 0, timeout=5
    )
    wait_until(lambda: httpx.get(worker.url + "/get_load").json()[0]["num_reqs"] == 0, timeout=5)
    stats = httpx.get(router.url + "/stats").json()
    assert stats["errors_total"] == 1


def test_busy_metrics_port_is_one_clear_error(procs) -> None:
    port = find_free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "sglctl.router",
                "--port",
                str(find_free_port()),
                "--metrics-port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert (
        f"cannot listen for metrics (--metrics-host/--metrics-port) on 127.0.0.1:{port}"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
