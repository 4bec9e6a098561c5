"""Worker sources that discover workers from an orchestrator (today: Kubernetes pods).

* ``k8s_config`` - ``K8sDiscoveryConfig`` and ``config_from_namespace`` (the parsed router
  flags -> a config, or None when discovery is off); pure, no Kubernetes client.
* ``k8s_pods`` - what one Pod object means for routing (a pure function).
* ``k8s`` - ``K8sDiscoverySource``: list + watch with lightkube, kept in the registry; it has
  the interface of :class:`sglctl.router.sources.StaticSource` (``async def run(registry)``)
  plus ``status()`` for ``/readiness`` and ``stats()`` for the metrics.

Only the config is re-exported here: the flag parser imports it for every router, and
importing lightkube costs about 200 ms that a router without discovery should not pay. The
router imports :mod:`.k8s` when ``k8s_discovery`` is set.
"""

from sglctl.router.discovery.k8s_config import (
    K8sDiscoveryConfig,
    config_from_namespace,
    parse_selector,
)

__all__ = ["K8sDiscoveryConfig", "config_from_namespace", "parse_selector"]
