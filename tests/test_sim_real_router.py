"""The real SGLang Router (Rust, sglang-router on PyPI) accepts sim workers as SGLang workers.

Skipped when that router is not installed: looked for at ``SGLANG_ROUTER_PYTHON``, the venv the
project machine has at /work/sglang-router-venv, or the one ``benchmarks/compare_routers.py``
creates in ``bench-out/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import orjson
import pytest

from sglctl.net import find_free_port

_CANDIDATES = [
    os.environ.get("SGLANG_ROUTER_PYTHON", ""),
    "/work/sglang-router-venv/bin/python",
    # the venv benchmarks/compare_routers.py creates on a machine without one
    str(Path(__file__).resolve().parent.parent / "bench-out/sglang-router-venv/bin/python"),
]
ROUTER_PYTHON = next((Path(c) for c in _CANDIDATES if c and Path(c).exists()), Path("/nonexistent"))

pytestmark = pytest.mark.skipif(
    not ROUTER_PYTHON.exists(), reason="the Rust sglang-router is not installed"
)


def test_rust_router_routes_to_sim_workers(procs) -> None:  # type: ignore[no-untyped-def]
    workers = [procs.sim_worker("--speedup", "100") for _ in range(2)]
    port = find_free_port()
    args = [str(ROUTER_PYTHON), "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
            "--port", str(port), "--worker-urls", *(w.url for w in workers)]  # fmt: skip
    router = procs.spawn("rust-router", args, url=f"http://127.0.0.1:{port}",
                         health_path="/health", ready_timeout=60)  # fmt: skip
    with httpx.Client(base_url=router.url, timeout=20) as c:
        r = c.post("/generate", json={"text": "hello", "sampling_params": {"max_new_tokens": 4}})
        assert r.status_code == 200, r.text
        assert r.json()["meta_info"]["completion_tokens"] == 4
        chat = {"model": "sim/Llama-3.1-8B-Instruct", "max_tokens": 3, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        with c.stream("POST", "/v1/chat/completions", json=chat) as s:
            assert s.status_code == 200
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert orjson.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_rust_router_in_pd_mode_hands_kv_between_sim_workers(procs) -> None:  # type: ignore[no-untyped-def]
    """The SGLang Router's own PD path pairs a sim prefill and decode: real handovers."""
    bootstrap = find_free_port()
    prefill = procs.sim_worker(
        "--speedup", "10", "--disaggregation-mode", "prefill",
        "--disaggregation-bootstrap-port", str(bootstrap),
    )  # fmt: skip
    decode = procs.sim_worker("--speedup", "10", "--disaggregation-mode", "decode")
    port = find_free_port()
    args = [str(ROUTER_PYTHON), "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
            "--port", str(port), "--pd-disaggregation", "--prefill", prefill.url, str(bootstrap),
            "--decode", decode.url]  # fmt: skip
    router = procs.spawn("rust-router-pd", args, url=f"http://127.0.0.1:{port}",
                         health_path="/health", ready_timeout=60)  # fmt: skip
    with httpx.Client(base_url=router.url, timeout=30) as c:
        body = {"text": "hello pd", "sampling_params": {"max_new_tokens": 4}}
        r = c.post("/generate", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["meta_info"]["completion_tokens"] == 4
        with c.stream("POST", "/generate", json={**body, "stream": True}) as s:
            assert s.status_code == 200
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert orjson.loads(events[-2])["meta_info"]["completion_tokens"] == 4
        chat = {"model": "sim/Llama-3.1-8B-Instruct", "max_tokens": 3,
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3
    for worker in (prefill, decode):
        info = httpx.get(worker.url + "/get_server_info", timeout=5).json()["disaggregation"]
        assert info["transfers_ok"] == 3, info
    assert (
        httpx.get(prefill.url + "/get_server_info", timeout=5).json()["disaggregation"][
            "held_kv_tokens"
        ]
        == 0
    )
