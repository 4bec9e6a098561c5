"""Kubernetes discovery against a real HTTP API server in its own process (kmock's emulator).

The API server is ``tests/kmock_server.py`` on a free port; the tests create, patch and delete
Pod objects through it with lightkube's sync client, as kubelet and the controllers would,
while the discovery source (in-process, on its own event loop thread, with a real
``WorkerRegistry``) follows them over list + watch. Sim workers listen on 127.0.0.2,
127.0.0.3, ... all on one port, as pods do, so the URLs the source builds from pod IPs are
checked against servers that answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest
import yaml
from lightkube import Client, KubeConfig
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Pod
from lightkube.types import PatchType

from sglctl.net import find_free_port, port_is_free
from sglctl.router.discovery import K8sDiscoveryConfig
from sglctl.router.discovery.k8s import K8sDiscoverySource
from sglctl.router.workers import WorkerRegistry
from sglctl.spawn import ManagedProcess, spawn
from tests.support import wait_until

pytest.importorskip("kmock", reason="kmock, the stand-in API server, needs Python 3.11+")

T = TypeVar("T")
NS = "sglang"
LAUNCHER = Path(__file__).with_name("kmock_server.py")
POD_IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


# -- the API server ------------------------------------------------------------------------
class KubeApi:
    """The emulator process plus a client that plays kubelet (creates and patches pods)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.port = find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.kubeconfig = log_dir / "kubeconfig.yaml"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
                    "users": [{"name": "test", "user": {"token": "test"}}],
                    "contexts": [
                        {"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}
                    ],
                    "current-context": "kmock",
                }
            )
        )
        self.proc: ManagedProcess | None = None
        self.client = Client(config=KubeConfig.from_file(self.kubeconfig), trust_env=False)
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.proc = spawn(
            f"kube-api-{self.starts}",
            [sys.executable, str(LAUNCHER), "--host", "127.0.0.1", "--port", str(self.port)],
            url=self.url,
            log_dir=self.log_dir,
            health_path="/version",
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            print(f"----- {self.proc.name} log tail -----\n{self.proc.log_tail()}")
            self.proc = None

    def control(self, what: str, **params: object) -> dict[str, Any]:
        reply = httpx.post(f"{self.url}/_control/{what}", params=params, timeout=10)  # type: ignore[arg-type]
        reply.raise_for_status()
        return dict(reply.json())

    def watches_served(self) -> int:
        return int(httpx.get(f"{self.url}/_control/stats", timeout=10).json()["watches_served"])

    # -- playing kubelet -------------------------------------------------------------------
    def create_pod(
        self,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        finalizers: list[str] | None = None,
        ip: str | None = None,
        ready: bool = False,
        namespace: str = NS,
    ) -> None:
        meta = ObjectMeta(
            name=name,
            namespace=namespace,
            labels=labels if labels is not None else {"app": "sglang"},
            annotations=annotations,
            finalizers=finalizers,
        )
        self.client.create(Pod(metadata=meta))
        if ip is not None:
            self.set_status(name, ip=ip, ready=ready, namespace=namespace)

    def set_status(
        self,
        name: str,
        *,
        ip: str | None,
        ready: bool,
        phase: str = "Running",
        namespace: str = NS,
    ) -> None:
        status = {
            "podIP": ip,
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        }
        self.client.patch(
            Pod.Status,
            name,
            {"status": status},
            namespace=namespace,
            patch_type=PatchType.MERGE,
        )

    def delete_pod(self, name: str, namespace: str = NS) -> None:
        self.client.delete(Pod, name, namespace=namespace)

    def drop_finalizers(self, name: str, namespace: str = NS) -> None:
        self.client.patch(
            Pod, name, {"metadata": {"finalizers": []}}, namespace=namespace,
            patch_type=PatchType.MERGE,
        )  # fmt: skip


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeApi]:
    api = KubeApi(tmp_path / "kube")
    api.start()
    try:
        yield api
    finally:
        api.client.close()
        api.stop()


# -- sim workers: one port on several loopback addresses, like pods -------------------------
@pytest.fixture(scope="module")
def pod_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    log_dir = tmp_path_factory.mktemp("sim-logs")
    for _ in range(20):
        port = find_free_port(POD_IPS[0])
        if all(port_is_free(ip, port) for ip in POD_IPS):
            break
    else:
        pytest.fail("no port free on every pod address")
    started: list[ManagedProcess] = []
    try:
        for ip in POD_IPS:
            args = [sys.executable, "-m", "sglctl", "sim-worker", "--host", ip, "--port", str(port)]
            started.append(spawn(f"sim-{ip}", args, url=f"http://{ip}:{port}", log_dir=log_dir))
        yield port
    finally:
        for proc in started:
            proc.stop()


# -- the source under test, on its own loop thread ----------------------------------------
class Running:
    """A discovery source running in a background event loop, read safely from the test."""

    def __init__(self, source: K8sDiscoverySource, registry: WorkerRegistry | None = None):
        self.source = source
        self.registry = registry if registry is not None else WorkerRegistry()
        self.loop = asyncio.new_event_loop()
        self._task: asyncio.Task[None] | None = None
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._main, name="k8s-source", daemon=True)
        self.thread.start()
        assert self._started.wait(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._task = self.loop.create_task(self.source.run(self.registry))
        self._started.set()
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self._task)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the source's loop (the registry has no locks) and return its result."""

        async def wrapped() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout=10)

    def workers(self) -> dict[str, dict[str, Any]]:
        def snap() -> dict[str, dict[str, Any]]:
            return {
                w.url: {
                    "role": w.role,
                    "available": w.available,
                    "routable": w.is_routable(),
                    "bootstrap_port": w.bootstrap_port,
                    "source": w.source,
                    "meta": dict(w.meta),
                    "obj": w,
                }
                for w in self.registry
            }

        return self.call(snap)

    def routable(self) -> set[str]:
        return {url for url, w in self.workers().items() if w["routable"]}

    def stats(self) -> dict[str, int]:
        return self.call(self.source.stats)

    def status(self) -> tuple[bool, str]:
        st = self.call(self.source.status)
        return st.ok, st.message

    def stop(self) -> None:
        if self._task is not None:
            self.loop.call_soon_threadsafe(self._task.cancel)
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "the discovery source did not stop when cancelled"
        self.loop.close()


@pytest.fixture
def run_source(kube: KubeApi) -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def start(
        cfg: K8sDiscoveryConfig, registry: WorkerRegistry | None = None, **kwargs: Any
    ) -> Running:
        source = K8sDiscoverySource(
            cfg,
            backoff_initial=kwargs.pop("backoff_initial", 0.05),
            backoff_max=kwargs.pop("backoff_max", 0.3),
            **kwargs,
        )
        r = Running(source, registry)
        running.append(r)
        return r

    try:
        yield start
    finally:
        for r in running:
            r.stop()


def config(port: int, **kw: Any) -> K8sDiscoveryConfig:
    kw.setdefault("selector", {"app": "sglang"})
    kw.setdefault("namespace", NS)
    return K8sDiscoveryConfig(port=port, **kw)


def kubeconfig_of(kube: KubeApi) -> str:
    return str(kube.kubeconfig)


def url(ip: str, port: int) -> str:
    return f"http://{ip}:{port}"


# -- tests ---------------------------------------------------------------------------------
def test_pod_joins_when_ready_within_a_second(kube, run_source, pod_port):
    src = run_source(config(pod_port, kubeconfig=kubeconfig_of(kube)))
    wait_until(lambda: src.status()[0] is False and "matches no" in src.status()[1], what="list")

    kube.create_pod("w0")  # scheduled, no IP yet
    kube.set_status("w0", ip=None, ready=False, phase="Pending")
    kube.set_status("w0", ip=POD_IPS[0], ready=False)  # running, not ready yet
    wait_until(lambda: src.stats()["matching_pods"] == 1, what="the pod to be seen")
    assert src.workers() == {}, "a pod that was never Ready must not be a worker"

    start = time.monotonic()
    kube.set_status("w0", ip=POD_IPS[0], ready=True)
    wait_until(lambda: src.routable() == {url(POD_IPS[0], pod_port)}, timeout=10, what="join")
    assert time.monotonic() - start < 1.0, "a Ready pod must be routable within 1 s"

    w = src.workers()[url(POD_IPS[0], pod_port)]
    assert (w["role"], w["source"]) == ("regular", "k8s")
    assert w["meta"] == {"pod": "w0", "namespace": NS}
    # the URL built from podIP:port is a server that answers, like a pod would
    assert httpx.get(url(POD_IPS[0], pod_port) + "/health", timeout=10).status_code == 200
    ok, message = src.status()
    assert ok and "1 workers from 1 matching pods" in message


def test_readiness_flapping_keeps_the_worker_out_of_rotation(kube, run_source, pod_port):
    src = run_source(config(pod_port, kubeconfig=kubeconfig_of(kube)))
    u = url(POD_IPS[0], pod_port)
    kube.create_pod("w0", ip=POD_IPS[0], ready=True)
    wait_until(lambda: src.routable() == {u}, what="join")
    first = src.workers()[u]["obj"]

    for _ in range(3):
        kube.set_status("w0", ip=POD_IPS[0], ready=False)
        wait_until(lambda: src.routable() == set(), what="unready -> out of rotation")
        assert set(src.workers()) == {u}, "an unready pod stays registered"
        assert src.workers()[u]["available"] is False
        kube.set_status("w0", ip=POD_IPS[0], ready=True)
        wait_until(lambda: src.routable() == {u}, what="ready -> back")

    assert src.workers()[u]["obj"] is first, "flapping must keep the same Worker (its state)"
    stats = src.stats()
    assert stats["marked_unavailable_total"] == 3
    assert stats["marked_available_total"] == 3
    assert stats["workers_added_total"] == 1


def test_terminating_pod_leaves_at_once_and_its_request_finishes(kube, run_source, pod_port):
    src = run_source(config(pod_port, kubeconfig=kubeconfig_of(kube)))
    u0, u1 = url(POD_IPS[0], pod_port), url(POD_IPS[1], pod_port)
    kube.create_pod("w0", ip=POD_IPS[0], ready=True, finalizers=["test.sglctl/hold"])
    kube.create_pod("w1", ip=POD_IPS[1], ready=True)
    wait_until(lambda: src.routable() == {u0, u1}, what="two workers")

    # A request dispatched to w0 the way the proxy does it: a load slot, then the stream.
    worker = src.workers()[u0]["obj"]
    release = src.call(worker.take_load_slot)
    n_tokens = 300
    lines: list[bytes] = []
    status: list[int] = []
    first_chunk = threading.Event()

    def stream() -> None:
        body = {"text": "hello", "stream": True, "sampling_params": {"max_new_tokens": n_tokens}}
        with httpx.stream("POST", u0 + "/generate", json=body, timeout=60) as reply:
            status.append(reply.status_code)
            for line in reply.iter_lines():
                if line.strip():
                    lines.append(line.encode())
                    first_chunk.set()

    t = threading.Thread(target=stream)
    t.start()
    try:
        assert first_chunk.wait(30), "the sim worker did not start streaming"
        kube.delete_pod("w0")  # has a finalizer: only a deletionTimestamp is set
        wait_until(lambda: src.routable() == {u1}, what="the terminating pod to leave")
        assert u0 not in src.workers(), "a terminating pod leaves the registry at once"
    finally:
        t.join(60)
    src.call(lambda: release(200, True))

    assert status == [200]
    assert lines[-1] == b"data: [DONE]", "the in-flight request must run to its end"
    last = orjson.loads(lines[-2].removeprefix(b"data: "))
    assert last["meta_info"]["completion_tokens"] == n_tokens
    assert worker.in_flight == 0

    kube.drop_finalizers("w0")  # the object is gone for real now (DELETED event)
    kube.delete_pod("w1")  # no finalizer: deleted at once
    wait_until(lambda: src.workers() == {}, what="w1 removed")
    assert src.stats()["workers_removed_total"] == 2
    assert src.stats()["events_deleted_total"] >= 2


def test_watch_cut_by_the_server_is_reopened(kube, run_source, pod_port):
    src = run_source(config(pod_port, kubeconfig=kubeconfig_of(kube)))
    u0, u1 = url(POD_IPS[0], pod_port), url(POD_IPS[1], pod_port)
    kube.create_pod("w0", ip=POD_IPS[0], ready=True)
    wait_until(lambda: src.routable() == {u0}, what="join")
    before = kube.watches_served()

    for _ in range(2):
        kube.control("cut-watches")
        wait_until(lambda n=before: kube.watches_served() > n, what="a new watch")
        before = kube.watches_served()
    kube.create_pod("w1", ip=POD_IPS[1], ready=True)
    wait_until(lambda: src.routable() == {u0, u1}, what="a pod created after the cuts")
    kube.set_status("w0", ip=POD_IPS[0], ready=False)
    wait_until(lambda: src.routable() == {u1}, what="a change after the cuts")
    assert src.stats()["lists_total"] == 1, "a cleanly ended watch is re-opened, not relisted"


def test_gone_relists_and_reconciles_what_the_watch_missed(kube, run_source, pod_port):
    src = run_source(config(pod_port, kubeconfig=kubeconfig_of(kube)))
    u0, u1 = url(POD_IPS[0], pod_port), url(POD_IPS[1], pod_port)
    kube.create_pod("w0", ip=POD_IPS[0], ready=True)
    kube.create_pod("w1", ip=POD_IPS[1], ready=True)
    wait_until(lambda: src.routable() == {u0, u1}, what="two workers")

    kube.control("forget", namespace=NS, name="w1")  # gone, and no event says so
    kube.control("gone", count=1)  # the next watch is told its version is too old
    kube.control("cut-watches")
    wait_until(lambda: src.routable() == {u0}, what="the relist to drop w1")
    stats = src.stats()
    assert stats["gone_total"] == 1
    assert stats["lists_total"] == 2
    assert stats["outages_total"] == 0, "410 is routine, not an outage"


def test_api_server_restart_keeps_workers_then_reconciles(kube, run_source, pod_port, caplog):
    caplog.set_level(logging.INFO, logger="sglctl.router.discovery")
    src = run_source(config(pod_port, kubeconfig=kubeconfig_of(kube)))
    u0, u1, u2 = (url(ip, pod_port) for ip in POD_IPS)
    kube.create_pod("w0", ip=POD_IPS[0], ready=True)
    kube.create_pod("w1", ip=POD_IPS[1], ready=True)
    wait_until(lambda: src.routable() == {u0, u1}, what="two workers")

    kube.stop()
    wait_until(lambda: src.stats()["api_errors_total"] >= 4, what="several failed retries")
    assert src.routable() == {u0, u1}, "an unreachable API server must not empty the router"
    ok, message = src.status()
    assert not ok and "unreachable" in message and "keeping 2" in message

    kube.start()  # a fresh, empty server: the cluster as it is now is w0 and w2
    kube.create_pod("w0", ip=POD_IPS[0], ready=True)
    kube.create_pod("w2", ip=POD_IPS[2], ready=True)
    wait_until(lambda: src.routable() == {u0, u2}, timeout=20, what="reconciled after restart")
    assert src.status()[0]

    outage_lines = [r for r in caplog.records if "cannot list/watch pods" in r.getMessage()]
    recovery_lines = [r for r in caplog.records if "answers again" in r.getMessage()]
    assert len(outage_lines) == 1, "one warning per outage, not one per retry"
    assert len(recovery_lines) == 1
    assert src.stats()["outages_total"] == 1


def test_pd_roles_and_bootstrap_port_annotation(kube, run_source, pod_port):
    cfg = config(
        pod_port,
        selector={},
        prefill_selector={"app": "sglang", "role": "prefill"},
        decode_selector={"app": "sglang", "role": "decode"},
        kubeconfig=kubeconfig_of(kube),
    )
    src = run_source(cfg)
    prefill = {"app": "sglang", "role": "prefill"}
    kube.create_pod(
        "p0", labels=prefill, annotations={"sglang.ai/bootstrap-port": "8998"},
        ip=POD_IPS[0], ready=True,
    )  # fmt: skip
    kube.create_pod(
        "p1", labels=prefill, annotations={"sglang.ai/bootstrap-port": "nope"},
        ip=POD_IPS[1], ready=True,
    )  # fmt: skip
    kube.create_pod("d0", labels={"app": "sglang", "role": "decode"}, ip=POD_IPS[2], ready=True)
    kube.create_pod("other", labels={"app": "sglang"}, ip="127.0.0.9", ready=True)
    u0, u1, u2 = (url(ip, pod_port) for ip in POD_IPS)
    wait_until(lambda: set(src.workers()) == {u0, u1, u2}, what="three PD workers")
    w = src.workers()
    assert (w[u0]["role"], w[u0]["bootstrap_port"]) == ("prefill", 8998)
    assert (w[u1]["role"], w[u1]["bootstrap_port"]) == ("prefill", None)  # bad annotation
    assert (w[u2]["role"], w[u2]["bootstrap_port"]) == ("decode", None)


def test_custom_bootstrap_annotation_and_all_namespaces(kube, run_source, pod_port):
    cfg = config(
        pod_port,
        selector={},
        namespace=None,
        prefill_selector={"role": "prefill"},
        decode_selector={"role": "decode"},
        bootstrap_port_annotation="example.com/bport",
        kubeconfig=kubeconfig_of(kube),
    )
    src = run_source(cfg)
    kube.create_pod(
        "p0", labels={"role": "prefill"}, annotations={"example.com/bport": "9000"},
        ip=POD_IPS[0], ready=True, namespace="team-a",
    )  # fmt: skip
    kube.create_pod("d0", labels={"role": "decode"}, ip=POD_IPS[1], ready=True, namespace="b")
    u0, u1 = url(POD_IPS[0], pod_port), url(POD_IPS[1], pod_port)
    wait_until(lambda: set(src.workers()) == {u0, u1}, what="pods of two namespaces")
    assert src.workers()[u0]["bootstrap_port"] == 9000
    assert src.workers()[u0]["meta"] == {"pod": "p0", "namespace": "team-a"}


def test_selector_matching_nothing_is_a_warning_and_a_status(kube, run_source, pod_port, caplog):
    caplog.set_level(logging.WARNING, logger="sglctl.router.discovery")
    kube.create_pod("web", labels={"app": "nginx"}, ip=POD_IPS[0], ready=True)
    src = run_source(config(pod_port, kubeconfig=kubeconfig_of(kube)))
    wait_until(lambda: src.stats()["lists_total"] >= 1, what="the first list")
    ok, message = src.status()
    assert not ok
    assert message == f"k8s: selector app=sglang matches no running pod in namespace {NS}"
    assert any("matches no running pod" in r.getMessage() for r in caplog.records)
    assert src.workers() == {}

    kube.create_pod("w0", ip=POD_IPS[1], ready=True)
    wait_until(lambda: src.routable() == {url(POD_IPS[1], pod_port)}, what="a matching pod")
    assert src.status()[0]


def test_static_worker_with_the_same_url_is_left_alone(kube, run_source, pod_port):
    registry = WorkerRegistry()
    u0 = url(POD_IPS[0], pod_port)
    registry.add(u0)  # from --worker-urls
    src = run_source(config(pod_port, kubeconfig=kubeconfig_of(kube)), registry=registry)
    kube.create_pod("w0", ip=POD_IPS[0], ready=True)
    wait_until(lambda: src.stats()["matching_pods"] == 1, what="the pod")
    kube.delete_pod("w0")
    wait_until(lambda: src.stats()["matching_pods"] == 0, what="the pod gone")
    assert src.workers()[u0]["source"] == "static", "discovery must not remove a static worker"


def test_three_router_replicas_discover_the_same_pods(kube, run_source, pod_port):
    replicas = [run_source(config(pod_port, kubeconfig=kubeconfig_of(kube))) for _ in range(3)]
    for i, ip in enumerate(POD_IPS):
        kube.create_pod(f"w{i}", ip=ip, ready=True)
    everyone = {url(ip, pod_port) for ip in POD_IPS}
    for r in replicas:
        wait_until(lambda r=r: r.routable() == everyone, what="every replica sees every pod")
    kube.set_status("w1", ip=POD_IPS[1], ready=False)
    for r in replicas:
        wait_until(lambda r=r: r.routable() == everyone - {url(POD_IPS[1], pod_port)})


def test_new_ip_is_a_new_worker_and_unselected_labels_remove_it(kube, run_source, pod_port):
    src = run_source(config(pod_port, kubeconfig=kubeconfig_of(kube)))
    u0, u1 = url(POD_IPS[0], pod_port), url(POD_IPS[1], pod_port)
    kube.create_pod("w0", ip=POD_IPS[0], ready=True)
    wait_until(lambda: src.routable() == {u0}, what="join")
    kube.set_status("w0", ip=POD_IPS[1], ready=True)  # same pod name, new address
    wait_until(lambda: set(src.workers()) == {u1}, what="the old URL replaced by the new")
    kube.client.patch(
        Pod, "w0", {"metadata": {"labels": {"app": "other"}}}, namespace=NS,
        patch_type=PatchType.MERGE,
    )  # fmt: skip
    wait_until(lambda: src.workers() == {}, what="a pod no longer selected to leave")
    assert src.stats()["workers_removed_total"] == 2


def test_repeated_gone_backs_off_but_recovers(kube, run_source, pod_port):
    src = run_source(config(pod_port, kubeconfig=kubeconfig_of(kube)))
    u0, u1 = url(POD_IPS[0], pod_port), url(POD_IPS[1], pod_port)
    kube.create_pod("w0", ip=POD_IPS[0], ready=True)
    wait_until(lambda: src.routable() == {u0}, what="join")
    kube.control("gone", count=3)  # three watches in a row answered 410
    kube.control("cut-watches")
    wait_until(lambda: src.stats()["gone_total"] == 3, what="three 410s")
    kube.create_pod("w1", ip=POD_IPS[1], ready=True)
    wait_until(lambda: src.routable() == {u0, u1}, what="watching again after the 410s")
    assert src.stats()["lists_total"] == 4
