"""Retries through a real router: where they go, how many, and what is never retried."""

from __future__ import annotations

import re

import httpx
import pytest

from sglctl.net import find_free_port

pytestmark = pytest.mark.timeout(120)

NO_BREAKER = ["--disable-circuit-breaker", "--disable-health-check"]


def body(i: int = 0) -> dict[str, object]:
    return {"text": f"retry test {i}", "sampling_params": {"max_new_tokens": 2}}


def metric(client: httpx.Client, name: str) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        match = re.match(rf"{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if match:
            total += float(match.group(2))
    return total


def worker(client: httpx.Client, url: str) -> dict[str, object]:
    return next(w for w in client.get("/workers").json()["workers"] if w["url"] == url)


def test_a_retry_goes_to_another_worker(procs) -> None:  # type: ignore[no-untyped-def]
    """With a single retry allowed, a failing worker never costs a request: the retry must go
    to the other worker (a retry on the same one would fail again and give a 502)."""
    bad = procs.sim_worker("--speedup", "100", "--error-rate", "1.0")
    good = procs.sim_worker("--speedup", "100")
    router = procs.router(
        [bad.url, good.url],
        "--metrics-port",
        str(find_free_port()),
        "--policy",
        "round_robin",
        "--max-total-retries",
        "1",
        *NO_BREAKER,
    )
    with httpx.Client(base_url=router.url, timeout=30, trust_env=False) as client:
        served_by = [client.post("/generate", json=body(i)) for i in range(20)]
        assert [r.status_code for r in served_by] == [200] * 20
        assert {r.headers.get("x-sglctl-worker") for r in served_by} == {good.url}
        retries = metric(client, "sglang_router_retries_total")
        bad_view = worker(client, bad.url)
    assert retries >= 5, "round robin should have sent several requests to the bad worker first"
    assert bad_view["requests_total"] == bad_view["errors_total"] == retries


def test_single_failing_worker_is_retried_within_its_limit_then_502(procs) -> None:  # type: ignore[no-untyped-def]
    bad = procs.sim_worker("--speedup", "100", "--error-rate", "1.0")
    router = procs.router(
        [bad.url],
        "--metrics-port",
        str(find_free_port()),
        "--max-worker-retries",
        "2",
        "--max-total-retries",
        "6",
        "--retry-initial-backoff-ms",
        "1",
        *NO_BREAKER,
    )
    with httpx.Client(base_url=router.url, timeout=30, trust_env=False) as client:
        response = client.post("/generate", json=body())
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["code"] == 502 and bad.url in error["message"] and "500" in error["message"]
        # 1 attempt + 2 retries at the only worker, although 6 retries were allowed in all
        assert worker(client, bad.url)["requests_total"] == 3
        assert metric(client, "sglang_router_retries_total") == 2


def test_client_errors_from_the_worker_are_not_retried(procs) -> None:  # type: ignore[no-untyped-def]
    w1 = procs.sim_worker("--speedup", "100")
    w2 = procs.sim_worker("--speedup", "100")
    router = procs.router([w1.url, w2.url], "--metrics-port", str(find_free_port()))
    with httpx.Client(base_url=router.url, timeout=30, trust_env=False) as client:
        bad = {"text": "hi", "sampling_params": {"max_new_tokens": -5}}
        response = client.post("/generate", json=bad)
        assert response.status_code == 400
        assert "max_new_tokens" in response.json()["error"]["message"]  # the worker's own words
        assert metric(client, "sglang_router_retries_total") == 0
        total = sum(int(worker(client, u)["requests_total"]) for u in (w1.url, w2.url))
        assert total == 1


def test_disable_retries(procs) -> None:  # type: ignore[no-untyped-def]
    bad = procs.sim_worker("--speedup", "100", "--error-rate", "1.0")
    good = procs.sim_worker("--speedup", "100")
    router = procs.router(
        [bad.url, good.url],
        "--metrics-port",
        str(find_free_port()),
        "--policy",
        "round_robin",
        "--disable-retries",
        *NO_BREAKER,
    )
    with httpx.Client(base_url=router.url, timeout=30, trust_env=False) as client:
        statuses = [client.post("/generate", json=body(i)).status_code for i in range(6)]
        assert sorted(set(statuses)) == [200, 502]
        assert metric(client, "sglang_router_retries_total") == 0
