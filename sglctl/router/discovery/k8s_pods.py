"""What a Pod object means for routing: a pure function, so the rules are testable alone.

A pod is a worker candidate while it has ``status.podIP``, is in phase ``Running``, has no
``deletionTimestamp`` and its labels match a role's selector; its URL is
``http://<podIP>:<port>``. Whether it may take new requests is its ``Ready`` condition. The
source (:mod:`.k8s`) decides what that means over time (a pod joins on its first Ready, an
unready pod is kept but out of rotation); this module only reads one object.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sglctl.router.discovery.k8s_config import K8sDiscoveryConfig, matches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PodWorker:
    """The worker one pod stands for right now."""

    url: str
    role: str
    bootstrap_port: int | None
    ready: bool
    name: str
    namespace: str

    def identity(self) -> tuple[str, str, int | None]:
        """What, when it changes, makes it a different worker (re-registered, fresh state)."""
        return (self.url, self.role, self.bootstrap_port)


def pod_key(pod: Any) -> tuple[str, str]:
    meta = pod.metadata
    return (meta.namespace or "", meta.name or "")


def role_of(pod: Any, config: K8sDiscoveryConfig) -> str | None:
    """The first role whose selector the pod's labels match (prefill before decode), or None."""
    labels = pod.metadata.labels if pod.metadata is not None else None
    if config.namespace and pod.metadata.namespace != config.namespace:
        return None
    for role, selector in config.roles():
        if matches(selector, labels):
            return role
    return None


def is_ready(pod: Any) -> bool:
    conditions = pod.status.conditions if pod.status is not None else None
    return any(c.type == "Ready" and c.status == "True" for c in conditions or ())


def bootstrap_port(pod: Any, annotation: str) -> int | None:
    """The prefill bootstrap port from the pod's annotation; None (and a warning) if unusable."""
    value = (pod.metadata.annotations or {}).get(annotation)
    if value is None:
        return None
    try:
        port = int(str(value).strip())
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        log.warning(
            "k8s: pod %s/%s has annotation %s=%r, which is not a port; registering it "
            "without a bootstrap port (fix the annotation in the pod template)",
            pod.metadata.namespace,
            pod.metadata.name,
            annotation,
            value,
        )
        return None
    return port


def pod_worker(pod: Any, config: K8sDiscoveryConfig) -> PodWorker | None:
    """The worker ``pod`` stands for, or None when it is not (or no longer) one."""
    if pod.metadata is None or pod.metadata.deletionTimestamp is not None:
        return None
    role = role_of(pod, config)
    status = pod.status
    if role is None or status is None or not status.podIP or status.phase != "Running":
        return None
    host = f"[{status.podIP}]" if ":" in status.podIP else status.podIP
    port = bootstrap_port(pod, config.bootstrap_port_annotation) if role == "prefill" else None
    namespace, name = pod_key(pod)
    return PodWorker(
        url=f"http://{host}:{config.port}",
        role=role,
        bootstrap_port=port,
        ready=is_ready(pod),
        name=name,
        namespace=namespace,
    )
