"""Health state through a real router: /workers, /metrics, /health, /readiness, the API key,
and the defaults that keep a router private (127.0.0.1, admin behind the key)."""

from __future__ import annotations

import re

import httpx
import pytest
from support import wait_until

from sglctl.net import find_free_port
from sglctl.router.flags import parse_args

pytestmark = pytest.mark.timeout(120)

FAST = [
    "--health-check-interval-secs",
    "0.1",
    "--health-check-timeout-secs",
    "0.5",
    "--health-failure-threshold",
    "2",
    "--health-success-threshold",
    "2",
]


def gauge(client: httpx.Client, name: str, worker: str) -> float:
    text = client.get("/metrics").text
    match = re.search(rf'^{re.escape(name)}\{{worker="{re.escape(worker)}"\}} (\S+)$', text, re.M)
    assert match, f"{name} for {worker} missing from /metrics"
    return float(match.group(1))


def is_healthy(client: httpx.Client, url: str) -> bool:
    workers = client.get("/workers").json()["workers"]
    return bool(next(w for w in workers if w["url"] == url)["is_healthy"])


def test_a_dead_worker_leaves_and_a_revived_one_returns(procs) -> None:  # type: ignore[no-untyped-def]
    stays = procs.sim_worker("--speedup", "100")
    port = find_free_port()
    flaky = procs.sim_worker("--speedup", "100", port=port)
    router = procs.router([stays.url, flaky.url], "--metrics-port", str(find_free_port()), *FAST)
    with httpx.Client(base_url=router.url, timeout=10, trust_env=False) as client:
        assert is_healthy(client, flaky.url)
        assert gauge(client, "sglang_router_worker_healthy", flaky.url) == 1
        assert client.get("/readiness").json()["healthy_workers"] == 2

        flaky.popen.kill()
        wait_until(lambda: not is_healthy(client, flaky.url), timeout=20)
        assert gauge(client, "sglang_router_worker_healthy", flaky.url) == 0
        readiness = client.get("/readiness").json()
        assert (readiness["healthy_workers"], readiness["total_workers"]) == (1, 2)
        assert client.get("/health").status_code == 200  # one worker is still healthy
        # the dead worker gets no traffic: every request is served by the other one
        for i in range(10):
            response = client.post(
                "/generate", json={"text": f"x{i}", "sampling_params": {"max_new_tokens": 1}}
            )
            assert response.status_code == 200
            assert response.headers.get("x-sglctl-worker") == stays.url

        revived = procs.sim_worker("--speedup", "100", port=port)
        assert revived.url == flaky.url
        wait_until(lambda: is_healthy(client, flaky.url), timeout=20)
        assert gauge(client, "sglang_router_worker_healthy", flaky.url) == 1


def test_no_healthy_worker_means_503_everywhere(procs) -> None:  # type: ignore[no-untyped-def]
    only = procs.sim_worker("--speedup", "100")
    router = procs.router([only.url], "--metrics-port", str(find_free_port()), *FAST)
    with httpx.Client(base_url=router.url, timeout=10, trust_env=False) as client:
        only.popen.kill()
        wait_until(lambda: not is_healthy(client, only.url), timeout=20)
        assert client.get("/health").status_code == 503
        assert client.get("/readiness").json()["status"] == "not_ready"
        assert client.get("/liveness").status_code == 200  # the router itself is fine
        response = client.post("/generate", json={"text": "x"})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == 503


def test_admin_endpoints_require_the_api_key(procs) -> None:  # type: ignore[no-untyped-def]
    worker = procs.sim_worker("--speedup", "100")
    spare = procs.sim_worker("--speedup", "100")
    router = procs.router(
        [worker.url], "--metrics-port", str(find_free_port()), "--api-key", "s3cret"
    )
    good = {"authorization": "Bearer s3cret"}
    calls = [
        ("POST", "/add_worker", {"url": spare.url}),
        ("POST", "/remove_worker", {"url": spare.url}),
        ("POST", "/flush_cache", None),
    ]
    with httpx.Client(base_url=router.url, timeout=30, trust_env=False) as client:
        for method, path, params in calls:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
                response = client.request(method, path, params=params, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.json()["error"]["code"] == 401
        assert client.post("/workers", json={"url": spare.url}).status_code == 401
        assert client.delete(f"/workers/{worker.url}").status_code == 401
        assert client.get("/list_workers").json()["urls"] == [worker.url]  # nothing changed

        for method, path, params in calls:
            response = client.request(method, path, params=params, headers=good)
            assert response.status_code == 200, (method, path, response.text)
        # inference does not need the router's key
        response = client.post(
            "/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}}
        )
        assert response.status_code == 200


def test_add_worker_accepts_only_http_urls(procs) -> None:  # type: ignore[no-untyped-def]
    worker = procs.sim_worker("--speedup", "100")
    router = procs.router([worker.url], "--metrics-port", str(find_free_port()))
    bad = [
        "ftp://127.0.0.1:21",
        "file:///etc/passwd",
        "127.0.0.1:8000",
        "localhost",
        "unix:///tmp/sock",
        "http://",
        "http://[::1",
        "http://127.0.0.1:99999",
        "",
    ]
    with httpx.Client(base_url=router.url, timeout=30, trust_env=False) as client:
        for url in bad:
            response = client.post("/add_worker", params={"url": url})
            assert response.status_code == 400, (url, response.text)
            response = client.post("/workers", json={"url": url})
            assert response.status_code == 400, (url, response.text)
        assert client.get("/list_workers").json()["urls"] == [worker.url]


def test_router_binds_loopback_by_default() -> None:
    assert parse_args([]).host == "127.0.0.1"
    assert parse_args(["--host", "0.0.0.0"]).host == "0.0.0.0"
