"""The real SGLang Router (Rust, sglang-router on PyPI) accepts sim workers as SGLang workers.

The router is looked for at ``SGLANG_ROUTER_PYTHON``, the venv the project machine has at
/work/sglang-router-venv, or the one ``benchmarks/compare_routers.py`` creates in
``bench-out/``; when none is there, the tests install it from PyPI into ``bench-out/`` (once,
~30 s), as the Prometheus tests install Prometheus. Skipped only when that install fails
(no package index), with pip's words.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest

from sglctl.net import find_free_port

_BENCH_VENV = Path(__file__).resolve().parent.parent / "bench-out/sglang-router-venv"
_CANDIDATES = [
    os.environ.get("SGLANG_ROUTER_PYTHON", ""),
    "/work/sglang-router-venv/bin/python",
    str(_BENCH_VENV / "bin/python"),
]


def _imports_router(python: Path) -> bool:
    probe = [str(python), "-c", "import sglang_router.launch_router"]
    return subprocess.run(probe, capture_output=True, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def router_python() -> Path:
    """A python that runs ``sglang_router.launch_router``, installed if need be."""
    for candidate in _CANDIDATES:
        if candidate and Path(candidate).exists() and _imports_router(Path(candidate)):
            return Path(candidate)
    python = _BENCH_VENV / "bin/python"
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(_BENCH_VENV)], check=True,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        subprocess.run([str(python), "-m", "pip", "install", "-q", "sglang-router"], check=True,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = str(getattr(exc, "stderr", None) or exc).strip()[-400:]
        pytest.skip(f"the Rust sglang-router could not be installed from PyPI: {detail}")
    return python


def test_rust_router_routes_to_sim_workers(procs, router_python: Path) -> None:  # type: ignore[no-untyped-def]
    workers = [procs.sim_worker("--speedup", "100") for _ in range(2)]
    port = find_free_port()
    args = [str(router_python), "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
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


def test_rust_router_in_pd_mode_hands_kv_between_sim_workers(procs, router_python: Path) -> None:  # type: ignore[no-untyped-def]
    """The SGLang Router's own PD path pairs a sim prefill and decode: real handovers."""
    bootstrap = find_free_port()
    prefill = procs.sim_worker(
        "--speedup", "10", "--disaggregation-mode", "prefill",
        "--disaggregation-bootstrap-port", str(bootstrap),
    )  # fmt: skip
    decode = procs.sim_worker("--speedup", "10", "--disaggregation-mode", "decode")
    port = find_free_port()
    args = [str(router_python), "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
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
