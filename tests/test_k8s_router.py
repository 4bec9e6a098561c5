"""End to end: a real ``sglctl router`` process discovering sim-worker "pods" from the emulator.

Everything is a separate process, as in a cluster: the Kubernetes API (``tests/kmock_server.py``,
reached through a kubeconfig in ``KUBECONFIG``), sim workers on 127.0.0.2, 127.0.0.3, ... all
on one port (pod IPs), and ``python -m sglctl.router`` started with the flags a script or the
manifests pass. The test plays kubelet (creates pods, patches podIP and Ready, deletes them)
and checks what the router does through its HTTP API only: ``/workers``, the
``x-sglctl-worker`` header of each answer, ``/readiness``, ``/metrics`` and ``sglctl status``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from sglctl.net import find_free_port, port_is_free
from sglctl.spawn import ManagedProcess, spawn, stop_together
from tests.support import wait_until
from tests.test_k8s_discovery import NS, KubeApi  # skips this module without kmock

#: Pod addresses: three regular workers, then a prefill and a decode worker.
REGULAR_IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
PREFILL_IP, DECODE_IP = "127.0.0.5", "127.0.0.6"
#: A change (pod created/ready/unready/deleted) must reach routing within this.
FOLLOW_SECS = 1.0
#: Tokens of the streams in flight while their pod is deleted.
STREAM_TOKENS = 600
#: The environment of a process that must not find any cluster credentials.
NO_CLUSTER_ENV = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}


def url(ip: str, port: int) -> str:
    return f"http://{ip}:{port}"


def common_port(ips: tuple[str, ...]) -> int:
    """One port free on every address in ``ips`` (pods all listen on the same port)."""
    for _ in range(50):
        port = find_free_port(ips[0])
        if all(port_is_free(ip, port) for ip in ips):
            return port
    pytest.fail(f"no port free on every one of {ips}")


def sim(ip: str, port: int, log_dir: Path, *extra: str) -> ManagedProcess:
    args = [sys.executable, "-m", "sglctl", "sim-worker", "--host", ip, "--port", str(port)]
    return spawn(f"sim-{ip}", [*args, *extra], url=url(ip, port), log_dir=log_dir)


@pytest.fixture(scope="module")
def pod_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Sim workers on the regular pod addresses, sharing one port."""
    log_dir = tmp_path_factory.mktemp("pods")
    port = common_port(REGULAR_IPS)
    started: list[ManagedProcess] = []
    try:
        for ip in REGULAR_IPS:
            started.append(sim(ip, port, log_dir))
        yield port
    finally:
        stop_together(started)


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeApi]:
    api = KubeApi(tmp_path / "kube")
    api.start()
    try:
        yield api
    finally:
        api.client.close()
        api.stop()


class Routers:
    """``sglctl router`` processes pointed at the emulator; all stopped at the end."""

    def __init__(self, kube: KubeApi, log_dir: Path) -> None:
        self.kube = kube
        self.log_dir = log_dir
        self.started: list[ManagedProcess] = []

    def start(self, *flags: str) -> ManagedProcess:
        port = find_free_port()
        args = [sys.executable, "-m", "sglctl.router", "--host", "127.0.0.1", "--port", str(port)]
        args += ["--metrics-port", str(find_free_port()), "--log-level", "debug", *flags]
        proc = spawn(
            f"router-{port}",
            args,
            url=f"http://127.0.0.1:{port}",
            log_dir=self.log_dir,
            health_path="/liveness",
            env={"KUBECONFIG": str(self.kube.kubeconfig)},
        )
        self.started.append(proc)
        return proc

    def stop(self) -> None:
        stop_together(self.started)
        for proc in self.started:
            print(f"----- {proc.name} log tail -----\n{proc.log_tail(60)}")


@pytest.fixture
def routers(kube: KubeApi, tmp_path: Path) -> Iterator[Routers]:
    r = Routers(kube, tmp_path / "routers")
    try:
        yield r
    finally:
        r.stop()


# -- reading the router ---------------------------------------------------------------------
def workers_of(router: ManagedProcess) -> dict[str, dict[str, Any]]:
    reply = httpx.get(router.url + "/workers", timeout=10)
    reply.raise_for_status()
    return {w["url"]: w for w in reply.json()["workers"]}


def routable(router: ManagedProcess) -> set[str]:
    return {u for u, w in workers_of(router).items() if w["available"] and w["is_healthy"]}


def served_by(router: ManagedProcess, n: int) -> list[str]:
    """The worker of each of ``n`` short generations (the ``x-sglctl-worker`` header)."""
    out = []
    with httpx.Client(base_url=router.url, timeout=30) as c:
        for i in range(n):
            body = {"text": f"request {i}", "sampling_params": {"max_new_tokens": 2}}
            r = c.post("/generate", json=body)
            assert r.status_code == 200, r.text
            out.append(r.headers["x-sglctl-worker"])
    return out


def readiness(router: ManagedProcess) -> tuple[int, dict[str, Any]]:
    r = httpx.get(router.url + "/readiness", timeout=10)
    return r.status_code, r.json()


def follows(predicate: Any, what: str) -> float:
    """Seconds until ``predicate`` holds; fails past ``FOLLOW_SECS`` (polled for up to 10 s so
    that a slow change is reported with its real time, not as a timeout)."""
    took = wait_until(predicate, timeout=10, what=what, interval=0.02)
    assert took < FOLLOW_SECS, f"{what} took {took:.2f} s (> {FOLLOW_SECS} s)"
    return took


def metric(router: ManagedProcess, name: str) -> float:
    text = httpx.get(router.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def stream_generate(router: ManagedProcess, tokens: int) -> tuple[int, str, list[bytes]]:
    body = {"text": "a long answer", "stream": True, "sampling_params": {"max_new_tokens": tokens}}
    with httpx.stream("POST", router.url + "/generate", json=body, timeout=60) as reply:
        lines = [line.encode() for line in reply.iter_lines() if line.strip()]
        return reply.status_code, reply.headers.get("x-sglctl-worker", ""), lines


# -- the tests -------------------------------------------------------------------------------
FLAG_FAMILIES = {
    # The current SGLang Router / gateway names, as in the issue: all namespaces.
    "service-discovery": lambda port: [
        "--service-discovery", "--selector", "app=sglang",
        "--service-discovery-port", str(port),
    ],
    # The seed's names, pinned to one namespace.
    "k8s": lambda port: [
        "--k8s-pod-selector", "app=sglang", "--k8s-port", str(port), "--k8s-namespace", NS,
    ],
}  # fmt: skip


@pytest.mark.parametrize("family", list(FLAG_FAMILIES))
def test_router_follows_the_pods_it_discovers(kube, routers, pod_port, family):
    u0, u1, u_static = (url(ip, pod_port) for ip in REGULAR_IPS)
    flags = FLAG_FAMILIES[family](pod_port)
    # A static worker beside the discovered ones: both sources feed one router.
    router = routers.start(*flags, "--worker-urls", u_static, "--policy", "round_robin")

    # No pod yet: the router answers, says why discovery gives it nothing, and stays ready
    # on its static worker (status follows healthy workers, not discovery).
    wait_until(
        lambda: "matches no running pod" in readiness(router)[1].get("warning", ""),
        what="the first pod list to be reported in /readiness",
    )
    code, body = readiness(router)
    assert code == 200 and body["healthy_workers"] == 1
    assert body["warning"].startswith("k8s: selector app=sglang matches no running pod")
    assert body["discovery"]["ok"] is False

    # A pod in another namespace: seen only when all namespaces are watched.
    kube.create_pod("elsewhere", ip=REGULAR_IPS[1], ready=True, namespace="other")
    kube.create_pod("w0", ip=REGULAR_IPS[0], ready=False)
    kube.set_status("w0", ip=REGULAR_IPS[0], ready=True)
    follows(lambda: u0 in routable(router), "a Ready pod to join routing")
    expected = {u0, u_static} | ({u1} if family == "service-discovery" else set())
    wait_until(lambda: routable(router) == expected, what=f"workers {sorted(expected)}")
    if family == "k8s":
        assert u1 not in workers_of(router), "--k8s-namespace must pin the namespace"
    else:
        kube.delete_pod("elsewhere", namespace="other")
        follows(lambda: u1 not in workers_of(router), "a deleted pod to leave")
    kube.create_pod("w1", ip=REGULAR_IPS[1], ready=True)
    follows(lambda: routable(router) == {u0, u1, u_static}, "a second pod to join")

    listed = workers_of(router)
    assert (listed[u0]["source"], listed[u0]["meta"]) == ("k8s", {"pod": "w0", "namespace": NS})
    assert (listed[u1]["source"], listed[u1]["meta"]) == ("k8s", {"pod": "w1", "namespace": NS})
    assert (listed[u_static]["source"], listed[u_static]["meta"]) == ("static", {})
    assert set(served_by(router, 6)) == {u0, u1, u_static}, "round robin over every worker"
    code, body = readiness(router)
    assert code == 200 and "warning" not in body and body["discovery"]["ok"] is True

    # Readiness flapping: out of rotation while unready, back when ready, same worker.
    worker_id = listed[u1]["id"]
    kube.set_status("w1", ip=REGULAR_IPS[1], ready=False)
    follows(lambda: routable(router) == {u0, u_static}, "an unready pod to leave rotation")
    assert u1 in workers_of(router), "an unready pod stays registered"
    assert set(served_by(router, 4)) == {u0, u_static}
    kube.set_status("w1", ip=REGULAR_IPS[1], ready=True)
    follows(lambda: routable(router) == {u0, u1, u_static}, "a ready-again pod to come back")
    assert workers_of(router)[u1]["id"] == worker_id

    # Deletion while requests stream from the pod: none is lost, none goes there afterwards.
    with ThreadPoolExecutor(6) as pool:
        # ~4 s each at the sims' speed: all six are surely in flight together.
        streams = [pool.submit(stream_generate, router, STREAM_TOKENS) for _ in range(6)]
        wait_until(
            lambda: sum(w["load"] for w in workers_of(router).values()) == len(streams),
            what="every stream in flight",
        )
        in_flight = workers_of(router)[u0]["load"]
        kube.delete_pod("w0")
        follows(lambda: u0 not in workers_of(router), "a deleted pod to leave routing")
        results = [s.result(timeout=60) for s in streams]
    for status, _, lines in results:
        assert status == 200
        assert lines[-1] == b"data: [DONE]", "a request in flight at a deleted pod must finish"
        assert (
            orjson.loads(lines[-2].removeprefix(b"data: "))["meta_info"]["completion_tokens"]
            == STREAM_TOKENS
        )
    assert sum(1 for _, worker, _ in results if worker == u0) == in_flight >= 1
    assert u0 not in served_by(router, 4)

    # Prometheus: the discovery gauge and event counter.
    assert metric(router, "sglang_router_discovery_workers") == 1
    assert metric(router, "sglang_router_discovery_events_total") >= 5
    assert metric(router, "sglang_router_discovery_removed_total") >= 1


def test_sglctl_status_shows_source_and_pod(kube, routers, pod_port):
    u0, u_static = url(REGULAR_IPS[0], pod_port), url(REGULAR_IPS[2], pod_port)
    router = routers.start(*FLAG_FAMILIES["k8s"](pod_port), "--worker-urls", u_static)
    kube.create_pod("w0", ip=REGULAR_IPS[0], ready=True)
    wait_until(lambda: u0 in routable(router), what="the pod to join")

    def status(*flags: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "sglctl", "status", "--router", router.url, *flags],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    rows = {w["url"]: w for w in json.loads(status("--json", "--sample-secs", "0"))["workers"]}
    assert (rows[u0]["source"], rows[u0]["pod"]) == ("k8s", f"{NS}/w0")
    assert (rows[u_static]["source"], rows[u_static]["pod"]) == ("static", "")
    table = status("--once", "--sample-secs", "0")
    assert "source" in table and "pod" in table, table
    line = next(x for x in table.splitlines() if u0.removeprefix("http://") in x)
    assert "k8s" in line and f"{NS}/w0" in line, table


def test_pd_pods_through_pd_disaggregation_and_selectors(kube, routers, tmp_path):
    port = common_port((PREFILL_IP, DECODE_IP))
    bootstrap = common_port((PREFILL_IP,))
    log_dir = tmp_path / "pd"
    prefill = sim(
        PREFILL_IP, port, log_dir,
        "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(bootstrap),
    )  # fmt: skip
    decode = sim(DECODE_IP, port, log_dir, "--disaggregation-mode", "decode")
    try:
        # As an SGLang-style script passes it (and as examples/k8s/pd-router.yaml does).
        router = routers.start(
            "--pd-disaggregation", "--service-discovery",
            "--prefill-selector", "app=sglang-pd", "role=prefill",
            "--decode-selector", "app=sglang-pd", "role=decode",
            "--service-discovery-port", str(port), "--service-discovery-namespace", NS,
        )  # fmt: skip
        kube.create_pod(
            "prefill-0", labels={"app": "sglang-pd", "role": "prefill"},
            annotations={"sglang.ai/bootstrap-port": str(bootstrap)},
            ip=PREFILL_IP, ready=True,
        )  # fmt: skip
        kube.create_pod(
            "decode-0", labels={"app": "sglang-pd", "role": "decode"}, ip=DECODE_IP, ready=True
        )
        p_url, d_url = url(PREFILL_IP, port), url(DECODE_IP, port)
        follows(lambda: routable(router) == {p_url, d_url}, "both PD pods to join")
        listed = workers_of(router)
        assert listed[p_url]["worker_type"] == "prefill"
        assert listed[p_url]["bootstrap_port"] == bootstrap
        assert listed[d_url]["worker_type"] == "decode"

        body = {"text": "through a KV hand-over", "sampling_params": {"max_new_tokens": 5}}
        r = httpx.post(router.url + "/generate", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["meta_info"]["completion_tokens"] == 5
        for worker in (prefill, decode):
            info = httpx.get(worker.url + "/get_server_info", timeout=10).json()
            assert info["disaggregation"]["transfers_ok"] == 1, worker.name
    finally:
        prefill.stop()
        decode.stop()


def test_three_router_replicas_discover_the_same_pods(kube, routers, pod_port):
    replicas = [routers.start(*FLAG_FAMILIES["service-discovery"](pod_port)) for _ in range(3)]
    everyone = {url(ip, pod_port) for ip in REGULAR_IPS}
    for i, ip in enumerate(REGULAR_IPS):
        kube.create_pod(f"w{i}", ip=ip, ready=True)
    for r in replicas:
        follows(lambda r=r: routable(r) == everyone, f"{r.name} to list every pod")
        assert {w["meta"]["pod"] for w in workers_of(r).values()} == {"w0", "w1", "w2"}
        assert set(served_by(r, 3)) <= everyone
    kube.delete_pod("w1")
    for r in replicas:
        wait_until(
            lambda r=r: set(workers_of(r)) == everyone - {url(REGULAR_IPS[1], pod_port)},
            what=f"{r.name} to drop the deleted pod",
        )


def test_no_credentials_is_one_line_at_start(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "sglctl.router", "--service-discovery", "--selector", "app=x",
         "--port", str(find_free_port()), "--metrics-port", str(find_free_port())],
        capture_output=True, text=True, timeout=60,
        env={**NO_CLUSTER_ENV, "KUBECONFIG": str(tmp_path / "missing"), "HOME": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 1
    assert "no usable Kubernetes credentials" in done.stderr
    assert "Traceback" not in done.stderr
