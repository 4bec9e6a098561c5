"""Worker sources that discover workers from an orchestrator (today: Kubernetes pods).

``K8sDiscoverySource`` has the interface of :class:`sglctl.router.sources.StaticSource`
(``async def run(registry)``); ``config_from_namespace`` turns the parsed router flags into
its config (or None when discovery is off).
"""

from sglctl.router.discovery.k8s import DiscoveryStatus, K8sDiscoverySource, load_kube_config
from sglctl.router.discovery.k8s_config import (
    K8sDiscoveryConfig,
    config_from_namespace,
    parse_selector,
)

__all__ = [
    "DiscoveryStatus",
    "K8sDiscoveryConfig",
    "K8sDiscoverySource",
    "config_from_namespace",
    "load_kube_config",
    "parse_selector",
]
