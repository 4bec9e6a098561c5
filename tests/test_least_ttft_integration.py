"""The tree follows a worker that evicts: a real sim worker with a small KV cache behind a
real ``sglctl router`` (``--policy least_ttft``, or ``cache_aware --cached-tokens-correction``),
both subprocesses on free ports."""

from __future__ import annotations

import random
import re
import string
from typing import Any

import httpx
import pytest

from sglctl.net import find_free_port
from tests.support import wait_until

#: Room for one 1200-token flood prompt, not for it and the two small ones besides.
KV_TOKENS = 1500


def text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters) for _ in range(n))


def tree_chars(router_url: str, worker: str) -> float:
    body = httpx.get(router_url + "/metrics", timeout=10).text
    for line in body.splitlines():
        m = re.match(r'^sglang_router_tree_size_chars\{worker="([^"]+)"\} (\S+)$', line)
        if m and m.group(1) == worker:
            return float(m.group(2))
    raise AssertionError(f"no tree size for {worker} in /metrics")


def send(client: httpx.Client, prompt: str, stream: bool) -> None:
    body = {"text": prompt, "sampling_params": {"max_new_tokens": 2}, "stream": stream}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text


POLICIES = {
    "least_ttft": ("--policy", "least_ttft"),
    "cache_aware": ("--policy", "cache_aware", "--cached-tokens-correction"),
}


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("stream", [False, True])
def test_tree_forgets_what_the_worker_evicted(procs: Any, stream: bool, policy: str) -> None:
    worker = procs.sim_worker("--kv-cache-tokens", str(KV_TOKENS), "--speedup", "10")
    router = procs.router(
        [worker.url],
        *POLICIES[policy],
        "--metrics-port",
        str(find_free_port()),
        "--log-level",
        "debug",
    )
    b, a = text(1280, 1), text(1280, 2)  # 320 tokens, 20 tree blocks each
    with httpx.Client(base_url=router.url, timeout=60) as client:
        send(client, b, stream)
        send(client, a, stream)
        for i in range(3):  # 1200 tokens each: the worker evicts A and B to hold them
            send(client, text(4800, 10 + i), stream)
        before = tree_chars(router.url, worker.url)
        assert before == 2 * 1280 + 3 * 4800  # the router's tree still believes all of it
        # A again: the tree predicts 20 blocks, the worker reports (almost) nothing cached.
        send(client, a, stream)
        # B, used before A, is forgotten; A (prefilled again) and the floods stay.
        wait_until(
            lambda: tree_chars(router.url, worker.url) == before - 1280,
            timeout=20,
            what="the router's tree to drop B after the worker's short cached_tokens",
        )
