"""The manifests in examples/k8s load as typed Kubernetes objects and fit together.

lightkube's codecs build typed models (``Deployment``, ``Role``, ...) but silently drop a field
they do not know, so a misspelt field (``replica: 3``) would load fine and then be ignored
by the cluster too. ``strict_load`` therefore compares each document with its typed round
trip: anything the model dropped is an unknown field and fails the test. Custom resources
(ServiceMonitor, PodMonitor) have no model in lightkube: they load as generic resources, so
only their apiVersion, kind and metadata are checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import codecs
from lightkube.generic_resource import create_namespaced_resource

from sglctl.router.discovery import K8sDiscoveryConfig, config_from_namespace
from sglctl.router.discovery.k8s_config import matches
from sglctl.router.flags import build_parser, parse_args

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "k8s"
CRDS = {
    "ServiceMonitor": ("monitoring.coreos.com", "v1", "ServiceMonitor", "servicemonitors"),
    "PodMonitor": ("monitoring.coreos.com", "v1", "PodMonitor", "podmonitors"),
}
for group, version, kind, plural in CRDS.values():
    create_namespaced_resource(group, version, kind, plural)


def unknown_fields(source: Any, typed: Any, path: str = "") -> list[str]:
    """Paths present in ``source`` but missing from the typed round trip ``typed``."""
    if isinstance(source, dict):
        if not isinstance(typed, dict):
            return [path or "."]
        missing = []
        for key, value in source.items():
            if key not in typed:
                missing.append(f"{path}.{key}" if path else key)
            else:
                missing += unknown_fields(value, typed[key], f"{path}.{key}" if path else key)
        return missing
    if isinstance(source, list) and isinstance(typed, list):
        return [
            m
            for i, (s, t) in enumerate(zip(source, typed, strict=False))
            for m in unknown_fields(s, t, f"{path}[{i}]")
        ]
    return []


def strict_load(doc: dict[str, Any]) -> Any:
    """``doc`` as a typed lightkube object; ValueError naming any field the model lacks."""
    obj = codecs.from_dict(doc)
    if doc.get("kind") in CRDS:
        return obj
    missing = unknown_fields(doc, obj.to_dict())
    if missing:
        name = doc.get("metadata", {}).get("name")
        raise ValueError(f"{doc.get('kind')} {name}: unknown fields {', '.join(missing)}")
    return obj


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


ALL = sorted(EXAMPLES.glob("*.yaml"))


def docs_of(kind: str) -> list[dict[str, Any]]:
    return [d for p in ALL for d in load_docs(p) if d["kind"] == kind]


def router_containers() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for dep in docs_of("Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            if c.get("command", [])[:2] == ["sglctl", "router"]:
                out.append((dep["metadata"]["name"], c))
    return out


def discovery_of(container: dict[str, Any]) -> K8sDiscoveryConfig:
    cfg = config_from_namespace(build_parser().parse_args(container["args"]))
    assert cfg is not None, "the router in the examples must use service discovery"
    return cfg


def pod_templates(kind: str = "StatefulSet") -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"]["template"] for d in docs_of(kind)}


# -- loading -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ALL, ids=[p.name for p in ALL])
def test_every_manifest_loads_as_typed_objects(path: Path):
    docs = load_docs(path)
    assert docs, f"{path.name} has no document"
    for doc in docs:
        obj = strict_load(doc)
        assert obj.metadata.name, f"{path.name}: a {doc['kind']} without a name"
        if doc["kind"] != "Namespace":
            assert obj.metadata.namespace == "sglang"


def test_the_expected_objects_are_there():
    kinds = {(d["kind"], d["metadata"]["name"]) for p in ALL for d in load_docs(p)}
    for expected in [
        ("ServiceAccount", "sglctl-router"),
        ("Role", "sglctl-pod-reader"),
        ("RoleBinding", "sglctl-router-pod-reader"),
        ("Deployment", "sglctl-router"),
        ("Service", "sglctl-router"),
        ("StatefulSet", "sglang-worker"),
        ("StatefulSet", "sglang-prefill"),
        ("StatefulSet", "sglang-decode"),
        ("ServiceMonitor", "sglctl-router"),
        ("PodMonitor", "sglang-workers"),
    ]:
        assert expected in kinds


@pytest.mark.parametrize(
    ("broken", "field"),
    [
        ({"spec": {"replica": 3}}, "spec.replica"),
        ({"spec": {"template": {"spec": {"containers": [{"imagePullPolicyy": "Always"}]}}}},
         "spec.template.spec.containers[0].imagePullPolicyy"),
    ],
)  # fmt: skip
def test_a_misspelt_field_fails(broken: dict[str, Any], field: str):
    doc = docs_of("Deployment")[0]
    strict_load(doc)  # the original is fine
    merged = _merge(yaml.safe_load(yaml.safe_dump(doc)), broken)
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        strict_load(merged)


def _merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in patch.items()}}
    if isinstance(base, list) and isinstance(patch, list):
        return [_merge(b, p) for b, p in zip(base, patch, strict=False)]
    return patch


# -- the router's arguments ----------------------------------------------------------------
def test_router_args_are_accepted_by_sglctl_router():
    assert len(router_containers()) == 2  # router.yaml and pd-router.yaml
    for name, container in router_containers():
        config = parse_args(container["args"])
        assert config.unsupported == [], f"{name}: refused {config.unsupported}"
        assert config.k8s_discovery == discovery_of(container), name
        assert config.k8s_discovery.namespace == "sglang", name
        assert config.is_pd == config.k8s_discovery.pd_mode, name
        assert not config.worker_urls and not config.prefill_servers, "discovery alone"


def test_router_selects_the_worker_pods_on_their_port():
    by_mode = {discovery_of(c).pd_mode: c for _, c in router_containers()}
    regular, pd = by_mode[False], by_mode[True]
    cfg = discovery_of(regular)
    worker = pod_templates()["sglang-worker"]
    assert matches(cfg.selector, worker["metadata"]["labels"])
    ports = {p["containerPort"] for p in worker["spec"]["containers"][0]["ports"]}
    assert cfg.port in ports
    assert f"--port={cfg.port}" in worker["spec"]["containers"][0]["args"]

    pd_cfg = discovery_of(pd)
    assert pd_cfg.pd_mode
    prefill, decode = pod_templates()["sglang-prefill"], pod_templates()["sglang-decode"]
    assert matches(pd_cfg.prefill_selector, prefill["metadata"]["labels"])
    assert not matches(pd_cfg.prefill_selector, decode["metadata"]["labels"])
    assert matches(pd_cfg.decode_selector, decode["metadata"]["labels"])
    assert not matches(pd_cfg.decode_selector, prefill["metadata"]["labels"])
    annotation = prefill["metadata"]["annotations"][pd_cfg.bootstrap_port_annotation]
    assert (
        f"--disaggregation-bootstrap-port={annotation}" in prefill["spec"]["containers"][0]["args"]
    )
    for router_doc in docs_of("Deployment"):
        labels = router_doc["spec"]["template"]["metadata"]["labels"]
        assert not matches(cfg.selector, labels), "the router must not select itself"


def test_router_deployment_is_highly_available_and_probed():
    for dep in docs_of("Deployment"):
        spec = dep["spec"]
        assert spec["replicas"] == 3
        pod = spec["template"]["spec"]
        anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
        assert anti[0]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
        c = pod["containers"][0]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readiness"
        assert c["livenessProbe"]["httpGet"]["path"] == "/liveness"
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        assert pod["serviceAccountName"] == "sglctl-router"


def test_workers_get_one_gpu_each():
    for name, template in pod_templates().items():
        c = template["spec"]["containers"][0]
        assert c["command"] == ["python", "-m", "sglang.launch_server"], name
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, name


def test_rbac_is_read_only_pods_in_one_namespace():
    (role,) = docs_of("Role")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    assert not docs_of("ClusterRole") and not docs_of("ClusterRoleBinding")
    (binding,) = docs_of("RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (sa,) = docs_of("ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "sglang"}
    ]
