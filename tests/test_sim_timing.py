"""Timing seen from outside: a cached prefix gives a lower time to first token (same run)."""

from __future__ import annotations

import time

import httpx

from sglctl.sim.tokenizer import text_for_tokens


def time_to_first_chunk(client: httpx.Client, text: str) -> float:
    payload = {"text": text, "sampling_params": {"max_new_tokens": 4}, "stream": True}
    first: float | None = None
    start = time.perf_counter()
    with client.stream("POST", "/generate", json=payload) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if first is None and line.startswith("data: "):
                first = time.perf_counter() - start
    assert first is not None, "no data chunk"
    return first


def test_cached_prefix_gives_lower_ttft(procs) -> None:  # type: ignore[no-untyped-def]
    worker = procs.sim_worker("--speedup", "4")
    shared = text_for_tokens(16_000, seed="system prompt")
    with httpx.Client(base_url=worker.url, timeout=30) as client:
        cold = time_to_first_chunk(client, shared + text_for_tokens(8, seed="question 1"))
        warm = time_to_first_chunk(client, shared + text_for_tokens(8, seed="question 2"))
        other_cold = time_to_first_chunk(client, text_for_tokens(16_008, seed="unrelated"))
    # Within one run: both cold prompts pay the 16k-token prefill, the warm one does not.
    assert warm * 3 < cold, (cold, warm)
    assert warm * 3 < other_cold, (other_cold, warm)
