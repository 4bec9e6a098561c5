"""Worker membership from Kubernetes pods: list + watch with lightkube, kept in the registry.

One source among the others (static URLs, the supervisor's table): ``run(registry)`` is
started by the router's lifespan and cancelled at shutdown. The life of the loop:

1. **List** the pods (``labelSelector`` sent so a real server filters; the router matches
   each role's selector itself too) and reconcile: pods that are new are applied, pods the
   source knew that are not in the list any more are dropped.
2. **Watch** from the list's resourceVersion and apply each event as it comes. A watch
   stream the server ends cleanly is re-opened by lightkube from the last resourceVersion;
   every ``watch_timeout`` s the source re-opens it itself (from the last version seen), so a
   connection that died silently (no FIN, no RST) costs at most that long.
3. ``410 Gone`` (the version is too old: compacted away) -> back to 1 at once.
   Anything else (API server unreachable, 5xx, 403 from missing RBAC) -> keep the workers we
   have (the pods are most likely still serving), retry with exponential backoff, and back to
   1 once the server answers. One warning per outage and one line on recovery, not one per
   retry.

What a pod means (:mod:`.k8s_pods`): a worker while it has a podIP, phase Running, no
deletionTimestamp, and matching labels. The source is edge-triggered per pod, like the
state-table source: it acts when a pod's derived state changes, so a worker an operator
removed through the admin API stays removed until its pod changes again.

* It joins on its first ``Ready=True`` (``registry.add(..., source="k8s", meta={pod, ns})``).
* ``Ready`` turning False keeps it registered but unavailable: it takes no new request, and
  its cache and health record are still there when it comes back.
* A ``deletionTimestamp`` (terminating), a lost IP, another phase, a label change that no
  longer matches, or the DELETED event -> removed at once. ``registry.remove`` only forgets
  the worker: requests already dispatched hold their own reference and finish.
* A new podIP (or role, or bootstrap port) for the same pod is a new worker: the old URL is
  removed and the new one added.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightkube import AsyncClient, ConfigError, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Pod

from sglctl.router.discovery.k8s_config import K8sDiscoveryConfig
from sglctl.router.discovery.k8s_pods import PodWorker, pod_key, pod_worker
from sglctl.router.workers import DuplicateWorkerError, UnknownWorkerError, WorkerRegistry

log = logging.getLogger(__name__)

ALL_NAMESPACES = "*"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
PodKey = tuple[str, str]


def load_kube_config(
    path: str | None = None, *, service_account_dir: Path = SERVICE_ACCOUNT_DIR
) -> KubeConfig:
    """Credentials as every Kubernetes tool finds them, or a ValueError that says what to do.

    ``path`` given: that kubeconfig. Else the in-cluster service account when
    ``KUBERNETES_SERVICE_HOST`` is set and its token file exists (token, CA and namespace from
    ``service_account_dir``), else the first file of ``KUBECONFIG``, else ``~/.kube/config``.
    """
    try:
        if path:
            return KubeConfig.from_file(path)
        if os.environ.get("KUBERNETES_SERVICE_HOST") and (service_account_dir / "token").is_file():
            return KubeConfig.from_service_account(service_account_dir)
        kubeconfig = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
        return KubeConfig.from_file(kubeconfig or "~/.kube/config")
    except (ConfigError, KeyError, OSError, ValueError) as exc:
        raise ValueError(
            f"--service-discovery: no usable Kubernetes credentials ({type(exc).__name__}: "
            f"{exc}). In a pod, mount the service account token (automountServiceAccountToken) "
            "and keep KUBERNETES_SERVICE_HOST/PORT; elsewhere set KUBECONFIG or create "
            "~/.kube/config"
        ) from exc


@dataclass(frozen=True)
class DiscoveryStatus:
    """One line for ``/readiness`` and ``sglctl status``: is discovery doing its job?"""

    ok: bool
    message: str

    def to_json(self) -> dict[str, object]:
        return {"source": "k8s", "ok": self.ok, "message": self.message}


@dataclass
class _Tracked:
    """What the source last derived for one pod, and whether it put that worker in."""

    worker: PodWorker
    registered: bool = False


@dataclass
class _Counters:
    events: dict[str, int] = field(default_factory=dict)
    workers_added: int = 0
    workers_removed: int = 0
    marked_unavailable: int = 0
    marked_available: int = 0
    lists: int = 0
    watch_restarts: int = 0
    gone: int = 0
    api_errors: int = 0
    outages: int = 0


class K8sDiscoverySource:
    """Follows the pods ``config`` selects; one per router process."""

    def __init__(
        self,
        config: K8sDiscoveryConfig,
        *,
        kube_config: KubeConfig | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        watch_timeout: float = 300.0,
        request_timeout: float = 10.0,
    ) -> None:
        self.config = config
        self.kube_config = kube_config or load_kube_config(config.kubeconfig)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.watch_timeout = watch_timeout
        self.request_timeout = request_timeout
        self._pods: dict[PodKey, _Tracked] = {}
        self._counters = _Counters()
        self._synced = False
        self._down_since: float | None = None
        self._down_reason = ""
        self._failed_attempts = 0
        self._warned_empty = False
        #: Wall-clock time the API server last answered (a list, an event, a watch that
        #: ended cleanly): the metrics' "last sync" gauge.
        self._last_sync: float | None = None
        self._server = self._server_url()

    # -- the loop --------------------------------------------------------------------------
    async def run(self, registry: WorkerRegistry) -> None:
        import httpx2  # lightkube's HTTP client; imported here so only this source needs it

        client = AsyncClient(
            config=self.kube_config,
            timeout=httpx2.Timeout(self.request_timeout),
            trust_env=False,
        )
        log.info(
            "k8s discovery: watching pods (%s) in %s on %s, worker port %d",
            self.config.describe(),
            self.config.where(),
            self._server,
            self.config.port,
        )
        try:
            backoff = self.backoff_initial
            need_list = True
            version: str | None = None
            events_at_last_gone = -1
            while True:
                try:
                    if need_list:
                        version = await self._list(client, registry)
                        need_list = False
                        self._reachable()
                        backoff = self.backoff_initial
                    version = await self._watch(client, registry, version)
                    self._counters.watch_restarts += 1
                    continue
                except ApiError as exc:
                    need_list = True
                    if exc.status.code == 410:
                        self._counters.gone += 1
                        log.info("k8s: watch answered 410 Gone (version too old); relisting")
                        events = sum(self._counters.events.values())
                        routine, events_at_last_gone = events != events_at_last_gone, events
                        if routine:
                            continue  # relist at once; a 410 again with no event between backs off
                    else:
                        self._unreachable(exc)
                except (httpx2.HTTPError, OSError, asyncio.TimeoutError) as exc:
                    need_list = True
                    self._unreachable(exc)
                except Exception as exc:  # a bug here must not take the router down: say, retry
                    need_list = True
                    log.exception("k8s: unexpected error following pods; retrying with backoff")
                    self._unreachable(exc)
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, self.backoff_max)
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    async def _list(self, client: AsyncClient, registry: WorkerRegistry) -> str | None:
        """List and reconcile; the list's resourceVersion to watch from."""
        listing = client.list(Pod, namespace=self._namespace(), labels=self._labels())
        seen: set[PodKey] = set()
        pods = [pod async for pod in listing]
        self._counters.lists += 1
        for pod in pods:
            seen.add(pod_key(pod))
            self._apply(pod_key(pod), pod_worker(pod, self.config), registry)
        for key in [k for k in self._pods if k not in seen]:
            self._apply(key, None, registry)
        self._synced = True
        self._last_sync = time.time()
        self._check_empty()
        log.debug("k8s: listed %d pods, %d tracked", len(pods), len(self._pods))
        try:
            return listing.resourceVersion
        except Exception:  # no version in the reply: watch from "now"
            return None

    async def _watch(
        self, client: AsyncClient, registry: WorkerRegistry, version: str | None
    ) -> str | None:
        """Apply watch events until ``watch_timeout``; the last resourceVersion seen."""
        stream = client.watch(
            Pod, namespace=self._namespace(), labels=self._labels(), resource_version=version
        )
        last = version

        async def consume() -> None:
            nonlocal last
            async for event, pod in stream:
                self._counters.events[event] = self._counters.events.get(event, 0) + 1
                last = (pod.metadata.resourceVersion if pod.metadata else None) or last
                self._last_sync = time.time()
                if event == "BOOKMARK":
                    continue
                worker = None if event == "DELETED" else pod_worker(pod, self.config)
                self._apply(pod_key(pod), worker, registry)
                self._check_empty()

        try:
            await asyncio.wait_for(consume(), self.watch_timeout)
            self._last_sync = time.time()  # the server ended the stream cleanly
        except asyncio.TimeoutError:
            pass
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]
        return last

    # -- applying one pod ------------------------------------------------------------------
    def _apply(self, key: PodKey, new: PodWorker | None, registry: WorkerRegistry) -> None:
        """Move the registry from what ``key`` meant before to what it means now."""
        old = self._pods.get(key)
        if (
            old is not None
            and old.registered
            and (new is None or new.identity() != old.worker.identity())
        ):
            self._remove(old.worker, new, registry)
            old = None
        if new is None:
            self._pods.pop(key, None)
            return
        if old is None or not old.registered:
            registered = new.ready and self._add(new, registry)
            self._pods[key] = _Tracked(new, registered)
            return
        if new.ready != old.worker.ready:
            self._set_available(new, registry)
        self._pods[key] = _Tracked(new, registered=True)

    def _add(self, w: PodWorker, registry: WorkerRegistry) -> bool:
        try:
            registry.add(
                w.url,
                role=w.role,
                bootstrap_port=w.bootstrap_port,
                source="k8s",
                meta={"pod": w.name, "namespace": w.namespace},
            )
        except DuplicateWorkerError:
            log.warning(
                "k8s: pod %s/%s is %s, which is already registered by another source "
                "(--worker-urls or the admin API); leaving that one in charge",
                w.namespace,
                w.name,
                w.url,
            )
            return False
        self._counters.workers_added += 1
        log.info("k8s: pod %s/%s is ready: %s joins as %s", w.namespace, w.name, w.url, w.role)
        return True

    def _remove(self, old: PodWorker, new: PodWorker | None, registry: WorkerRegistry) -> None:
        why = "is gone, terminating or no longer selected" if new is None else "changed address"
        try:
            worker = registry.remove(old.url)
        except UnknownWorkerError:
            log.debug("k8s: %s was already removed (admin API?)", old.url)
            return
        self._counters.workers_removed += 1
        log.info(
            "k8s: pod %s/%s %s: %s leaves routing (%d requests in flight finish)",
            old.namespace,
            old.name,
            why,
            old.url,
            worker.in_flight,
        )

    def _set_available(self, w: PodWorker, registry: WorkerRegistry) -> None:
        try:
            registry.set_available(w.url, w.ready)
        except UnknownWorkerError:
            log.debug("k8s: %s was removed by someone else; not re-adding it", w.url)
            return
        if w.ready:
            self._counters.marked_available += 1
        else:
            self._counters.marked_unavailable += 1
        log.info(
            "k8s: pod %s/%s is %s: %s %s",
            w.namespace,
            w.name,
            "ready again" if w.ready else "not ready",
            w.url,
            "takes requests again" if w.ready else "takes no new requests (kept registered)",
        )

    # -- outage bookkeeping ----------------------------------------------------------------
    def _unreachable(self, exc: BaseException) -> None:
        self._counters.api_errors += 1
        self._failed_attempts += 1
        reason = _describe(exc)
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._down_reason = reason
            self._counters.outages += 1
            kept = sum(1 for t in self._pods.values() if t.registered)
            log.warning(
                "k8s: cannot list/watch pods on %s: %s; keeping the %d workers known so far "
                "and retrying with backoff (up to %g s) until it answers",
                self._server,
                reason,
                kept,
                self.backoff_max,
            )
        else:
            log.debug("k8s: still failing (%s)", reason)

    def _reachable(self) -> None:
        if self._down_since is not None:
            log.warning(
                "k8s: API server %s answers again after %.1f s (%d failed attempts); "
                "pods relisted and reconciled",
                self._server,
                time.monotonic() - self._down_since,
                self._failed_attempts,
            )
        self._down_since = None
        self._failed_attempts = 0

    def _check_empty(self) -> None:
        if self._pods:
            self._warned_empty = False
            return
        if not self._warned_empty:
            self._warned_empty = True
            log.warning("%s; workers are added as matching pods appear", self.status().message)

    # -- what others read ------------------------------------------------------------------
    def status(self) -> DiscoveryStatus:
        """For ``/readiness``: ok, or why discovery is not giving the router workers."""
        where = self.config.where()
        if self._down_since is not None:
            since = time.monotonic() - self._down_since
            kept = sum(1 for t in self._pods.values() if t.registered)
            return DiscoveryStatus(
                False,
                f"k8s: API server {self._server} unreachable for {since:.0f} s "
                f"({self._down_reason}); keeping {kept} last known workers",
            )
        if not self._synced:
            return DiscoveryStatus(
                False, f"k8s: waiting for the first pod list from {self._server}"
            )
        if not self._pods:
            return DiscoveryStatus(
                False, f"k8s: selector {self.config.describe()} matches no running pod in {where}"
            )
        workers = sum(1 for t in self._pods.values() if t.registered)
        return DiscoveryStatus(
            True, f"k8s: {workers} workers from {len(self._pods)} matching pods in {where}"
        )

    def stats(self) -> dict[str, int]:
        """Counters (``*_total``) and gauges for the metrics exporter."""
        c = self._counters
        out = {
            "discovered_workers": sum(1 for t in self._pods.values() if t.registered),
            "matching_pods": len(self._pods),
            "ready_pods": sum(1 for t in self._pods.values() if t.worker.ready),
            "workers_added_total": c.workers_added,
            "workers_removed_total": c.workers_removed,
            "marked_unavailable_total": c.marked_unavailable,
            "marked_available_total": c.marked_available,
            "lists_total": c.lists,
            "watch_restarts_total": c.watch_restarts,
            "gone_total": c.gone,
            "api_errors_total": c.api_errors,
            "outages_total": c.outages,
        }
        for event, n in c.events.items():
            out[f"events_{event.lower()}_total"] = n
        return out

    def metrics_stats(self) -> dict[str, float]:
        """The keys of :data:`sglctl.router.metrics.DISCOVERY_METRICS`, for the router's
        ``metrics.discovery_stats`` hook (``sglang_router_discovery_*``)."""
        c = self._counters
        out: dict[str, float] = {
            "workers": sum(1 for t in self._pods.values() if t.registered),
            "added_total": c.workers_added,
            "removed_total": c.workers_removed,
            "errors_total": c.api_errors + c.gone,
            "events_total": sum(c.events.values()),
        }
        if self._last_sync is not None:
            out["last_sync_timestamp"] = self._last_sync
        return out

    # -- helpers ---------------------------------------------------------------------------
    def _namespace(self) -> str:
        return self.config.namespace or ALL_NAMESPACES

    def _labels(self) -> dict[str, Any] | None:
        return dict(self.config.api_selector()) or None

    def _server_url(self) -> str:
        try:
            single = self.kube_config.get()
        except Exception:
            return "?"
        return str(single.cluster.server) if single is not None else "?"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        code = exc.status.code
        hint = ""
        if code in (401, 403):
            hint = (
                " (the router's service account may not list/watch pods here: apply "
                "examples/k8s/rbac.yaml and set --service-discovery-namespace to its namespace)"
            )
        return f"HTTP {code} {exc.status.reason or ''}: {exc.status.message or ''}{hint}".strip()
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
