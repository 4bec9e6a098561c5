"""Kubernetes discovery without a server: flags -> config, selectors, what a Pod object means."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from lightkube.models.core_v1 import PodCondition, PodStatus
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Pod

from sglctl.router.discovery import K8sDiscoveryConfig, config_from_namespace, parse_selector
from sglctl.router.discovery.k8s import load_kube_config
from sglctl.router.discovery.k8s_pods import pod_worker
from sglctl.router.flags import build_parser, parse_args


# -- selectors -----------------------------------------------------------------------------
def test_parse_selector_accepts_k8s_spellings():
    assert parse_selector(["app=sglang", "tier=gpu"]) == {"app": "sglang", "tier": "gpu"}
    assert parse_selector("app=sglang,tier==gpu") == {"app": "sglang", "tier": "gpu"}
    assert parse_selector(["sglang.ai/role=prefill"]) == {"sglang.ai/role": "prefill"}
    assert parse_selector(["app="]) == {"app": ""}
    assert parse_selector(None) == {}


@pytest.mark.parametrize(
    ("items", "needle"),
    [
        (["app"], "is not a k=v label selector"),
        (["=sglang"], "is not a valid label key"),
        (["app=sg lang"], "is not a valid label value"),
        (["app!=sglang"], "only equality selectors"),
        (["app in (a,b)"], "only equality selectors"),
        (["app=a", "app=b"], "given twice"),
        (["Bad_Prefix!/x=y"], "is not a valid label key"),
        ([f"app={'x' * 64}"], "is not a valid label value"),
    ],
)
def test_malformed_selector_is_a_value_error_naming_the_flag(items, needle):
    with pytest.raises(ValueError, match=needle) as info:
        parse_selector(items, flag="--prefill-selector")
    assert str(info.value).startswith("--prefill-selector: ")


# -- flags -> config -----------------------------------------------------------------------
def ns_of(argv: list[str]) -> argparse.Namespace:
    """What the router's own parser makes of ``argv`` (the dests the wiring will pass)."""
    return build_parser().parse_args(argv)


def test_no_discovery_flags_means_no_config():
    assert config_from_namespace(ns_of(["--worker-urls", "http://127.0.0.1:1"])) is None


def test_current_gateway_flags():
    cfg = config_from_namespace(
        ns_of(
            [
                "--service-discovery",
                "--selector",
                "app=sglang",
                "tier=gpu",
                "--service-discovery-port",
                "8000",
                "--service-discovery-namespace",
                "inference",
            ]
        )
    )
    assert cfg == K8sDiscoveryConfig(
        selector={"app": "sglang", "tier": "gpu"}, port=8000, namespace="inference"
    )
    assert not cfg.pd_mode
    assert cfg.api_selector() == {"app": "sglang", "tier": "gpu"}


def test_seed_flags_start_discovery_and_mean_the_same():
    seed = config_from_namespace(
        ns_of(["--k8s-namespace", "inference", "--k8s-pod-selector", "app=sglang"])
    )
    assert seed == K8sDiscoveryConfig(selector={"app": "sglang"}, namespace="inference")
    assert seed is not None and seed.port == 30000  # SGLang's port, not the gateway's 80


def test_pd_selectors_and_the_common_api_selector():
    cfg = config_from_namespace(
        ns_of(
            [
                "--service-discovery",
                "--prefill-selector",
                "app=sglang",
                "role=prefill",
                "--decode-selector",
                "app=sglang",
                "role=decode",
            ]
        )
    )
    assert cfg is not None and cfg.pd_mode
    assert [role for role, _ in cfg.roles()] == ["prefill", "decode"]
    assert cfg.api_selector() == {"app": "sglang"}, "only the common labels go to the server"
    assert cfg.bootstrap_port_annotation == "sglang.ai/bootstrap-port"


def test_config_reads_either_dest_name():
    ns = argparse.Namespace(
        service_discovery=True,
        selector=["app=x"],
        service_discovery_port=31000,
        bootstrap_port_annotation="example.com/bport",
    )
    cfg = config_from_namespace(ns)
    assert cfg == K8sDiscoveryConfig(
        selector={"app": "x"}, port=31000, bootstrap_port_annotation="example.com/bport"
    )


def test_usage_errors_name_the_flag():
    with pytest.raises(ValueError, match=r"^--selector/--k8s-pod-selector: 'app' is not"):
        config_from_namespace(ns_of(["--service-discovery", "--selector", "app"]))
    with pytest.raises(ValueError, match="needs a label selector"):
        config_from_namespace(ns_of(["--service-discovery"]))


def test_a_bad_discovery_port_is_a_usage_error_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        ns_of(["--selector", "app=x", "--service-discovery-port", "0"])
    assert info.value.code == 2
    assert "--service-discovery-port" in capsys.readouterr().err


# -- credentials ---------------------------------------------------------------------------
def test_credentials_from_kubeconfig_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "config"
    path.write_text(
        yaml.safe_dump(
            {
                "clusters": [{"name": "c", "cluster": {"server": "https://10.9.9.9:6443"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(path))
    single = load_kube_config().get()
    assert single is not None and single.cluster.server == "https://10.9.9.9:6443"


def test_in_cluster_service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name, text in {"token": "tok", "namespace": "sglang", "ca.crt": "x"}.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    single = load_kube_config(service_account_dir=tmp_path).get()
    assert single is not None
    assert single.cluster.server == "https://10.96.0.1:443"
    assert single.namespace == "sglang"
    # no token mounted: not in a pod after all, so KUBECONFIG is used (missing here)
    with pytest.raises(ValueError, match="KUBECONFIG"):
        load_kube_config(service_account_dir=tmp_path / "nothing")


def test_no_credentials_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="KUBECONFIG"):
        load_kube_config()


# -- what a pod means ----------------------------------------------------------------------
CFG = K8sDiscoveryConfig(selector={"app": "sglang"}, namespace="ns", port=30000)


def pod(
    *,
    ip: str | None = "10.0.0.5",
    phase: str = "Running",
    ready: bool = True,
    labels: dict[str, str] | None = None,
    namespace: str = "ns",
    deleting: bool = False,
) -> Pod:
    meta = ObjectMeta(
        name="w0",
        namespace=namespace,
        labels=labels if labels is not None else {"app": "sglang"},
        deletionTimestamp="2026-12-01T10:00:00Z" if deleting else None,  # type: ignore[arg-type]
    )
    status = PodStatus(
        podIP=ip,
        phase=phase,
        conditions=[PodCondition(type="Ready", status="True" if ready else "False")],
    )
    return Pod(metadata=meta, status=status)


def test_a_running_ready_matching_pod_is_a_worker():
    w = pod_worker(pod(), CFG)
    assert w is not None
    assert (w.url, w.role, w.ready, w.name, w.namespace) == (
        "http://10.0.0.5:30000",
        "regular",
        True,
        "w0",
        "ns",
    )
    assert pod_worker(pod(ip="fd00::5"), CFG).url == "http://[fd00::5]:30000"  # type: ignore[union-attr]
    unready = pod_worker(pod(ready=False), CFG)
    assert unready is not None and not unready.ready


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ip": None},
        {"phase": "Pending"},
        {"phase": "Succeeded"},
        {"deleting": True},
        {"labels": {"app": "other"}},
        {"labels": {}},
        {"namespace": "elsewhere"},
    ],
)
def test_not_a_worker(kwargs):
    assert pod_worker(pod(**kwargs), CFG) is None


# -- the router's parse_args: discovery wired into RouterConfig ------------------------------
def test_parse_args_sets_discovery_and_refuses_nothing():
    cfg = parse_args(["--service-discovery", "--selector", "app=sglang"])
    assert cfg.k8s_discovery == K8sDiscoveryConfig(selector={"app": "sglang"})
    assert cfg.unsupported == [] and not cfg.is_pd
    assert parse_args([]).k8s_discovery is None


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--service-discovery", "--selector", "app"], "--selector/--k8s-pod-selector"),
        (["--k8s-pod-selector", "app!=x"], "--selector/--k8s-pod-selector"),
        (["--prefill-selector", "a=b", "--decode-selector", "=x"], "--decode-selector"),
        (["--service-discovery"], "--service-discovery needs a label selector"),
    ],
)
def test_malformed_discovery_flags_are_usage_errors_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert flag in capsys.readouterr().err


def test_pd_rule_static_urls_or_a_running_source():
    # PD through discovery alone: --pd-disaggregation with role selectors, no URL at all.
    cfg = parse_args(
        ["--pd-disaggregation", "--prefill-selector", "r=p", "--decode-selector", "r=d"]
    )
    assert cfg.is_pd and cfg.k8s_discovery is not None and cfg.k8s_discovery.pd_mode
    assert parse_args(["--prefill-selector", "r=p", "--decode-selector", "r=d"]).is_pd
    # PD from the supervisor's table (sglctl up --prefill-dp/--decode-dp): no URL either.
    assert parse_args(["--pd-disaggregation", "--state-table", "sglctl-30000"]).is_pd
    # Discovered workers and static ones combine, in PD mode too.
    mixed = parse_args(
        ["--pd-disaggregation", "--prefill", "http://10.0.0.1:30000", "8998",
         "--prefill-selector", "r=p", "--decode-selector", "r=d"]
    )  # fmt: skip
    assert [p.url for p in mixed.prefill_servers] == ["http://10.0.0.1:30000"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--pd-disaggregation"], "at least one prefill and one decode worker"),
        (["--pd-disaggregation", "--prefill", "http://p:1"], "at least one prefill"),
        (["--pd-disaggregation", "--selector", "app=sglang"], "--prefill-selector and --decode"),
        (["--decode", "http://d:1"], "need --pd-disaggregation"),
    ],
)
def test_pd_rule_refusals(argv, needle, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert needle in capsys.readouterr().err
