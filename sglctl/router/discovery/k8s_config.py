"""What Kubernetes service discovery is told on the command line, parsed and checked once.

Two generations of SGLang Router flags name the same settings (the current gateway's
``--service-discovery --selector ...`` and the seed's ``--k8s-*``); the flag layer maps both
onto one ``argparse`` dest each and :func:`config_from_namespace` turns that namespace into a
:class:`K8sDiscoveryConfig`. Everything a user can get wrong (a selector that is not ``k=v``,
a port out of range, discovery switched on without a selector) is a :class:`ValueError` whose
message names the flag and says what to write instead, so the flag layer can print it as a
usage error before anything starts.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

DEFAULT_PORT = 30000
DEFAULT_BOOTSTRAP_PORT_ANNOTATION = "sglang.ai/bootstrap-port"

#: A label name (the part after an optional ``prefix/``) and a label value, as Kubernetes
#: validates them: at most 63 characters, alphanumeric at both ends, ``-_.`` inside.
_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
#: A DNS subdomain (the optional ``prefix/`` of a label key), at most 253 characters.
_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

Selector = dict[str, str]


@dataclass(frozen=True)
class K8sDiscoveryConfig:
    """One discovery setup: which pods are workers, on which port, in which role.

    ``selector`` picks regular workers. PD mode is on when ``prefill_selector`` or
    ``decode_selector`` is given (as in the SGLang Router): then those two pick prefill and
    decode workers and ``selector`` is not used. ``namespace=None`` watches all namespaces
    (needs a ClusterRole; the example manifests pin one namespace with a Role instead).
    """

    selector: Selector = field(default_factory=dict)
    prefill_selector: Selector = field(default_factory=dict)
    decode_selector: Selector = field(default_factory=dict)
    port: int = DEFAULT_PORT
    namespace: str | None = None
    bootstrap_port_annotation: str = DEFAULT_BOOTSTRAP_PORT_ANNOTATION
    #: A kubeconfig file to use instead of the standard lookup (in-cluster service account,
    #: then ``KUBECONFIG``, then ``~/.kube/config``). Tests point it at the emulator.
    kubeconfig: str | None = None

    def __post_init__(self) -> None:
        if not (self.selector or self.prefill_selector or self.decode_selector):
            raise ValueError(
                "--service-discovery needs a label selector: add --selector k=v (e.g. "
                "--selector app=sglang), or --prefill-selector/--decode-selector in PD mode"
            )
        if not 1 <= self.port <= 65535:
            raise ValueError(
                f"--service-discovery-port/--k8s-port: {self.port} is not a TCP port (1-65535)"
            )
        if not self.bootstrap_port_annotation.strip():
            raise ValueError("--bootstrap-port-annotation: the annotation name is empty")

    @property
    def pd_mode(self) -> bool:
        return bool(self.prefill_selector or self.decode_selector)

    def roles(self) -> list[tuple[str, Selector]]:
        """(role, selector) in the order a pod is matched: prefill before decode."""
        if not self.pd_mode:
            return [("regular", self.selector)]
        found = [("prefill", self.prefill_selector), ("decode", self.decode_selector)]
        return [(role, sel) for role, sel in found if sel]

    def api_selector(self) -> Selector:
        """The labels to send as ``labelSelector``: what every role's selector has in common.

        A real API server then filters for us (less traffic, and RBAC audit logs that say what
        the router reads). In PD mode only the common ``k=v`` pairs can go to the server; the
        router matches each role's full selector itself anyway (the emulator in the tests does
        not filter at all).
        """
        selectors = [sel for _, sel in self.roles()]
        common = dict(selectors[0])
        for sel in selectors[1:]:
            common = {k: v for k, v in common.items() if sel.get(k) == v}
        return common

    def describe(self) -> str:
        """``app=sglang`` or ``prefill: app=p, decode: app=d``, for logs and status lines."""
        if not self.pd_mode:
            return format_selector(self.selector)
        return ", ".join(f"{role}: {format_selector(sel)}" for role, sel in self.roles())

    def where(self) -> str:
        return f"namespace {self.namespace}" if self.namespace else "all namespaces"


def format_selector(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def matches(selector: Mapping[str, str], labels: Mapping[str, str] | None) -> bool:
    """Equality-based selector match, as Kubernetes defines it (every pair present)."""
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def parse_selector(items: str | Iterable[str] | None, flag: str = "--selector") -> Selector:
    """``["app=sglang", "tier=gpu"]`` (or ``"app=sglang,tier=gpu"``) -> ``{"app": "sglang", ...}``.

    Only equality selectors are supported (what the SGLang Router accepts too); ``!=`` and
    set-based expressions are refused with a message rather than half-understood.
    """
    if items is None:
        return {}
    tokens = [items] if isinstance(items, str) else list(items)
    selector: Selector = {}
    for token in tokens:
        for part in str(token).split(","):
            part = part.strip()
            if not part:
                continue
            key, value = _parse_pair(part, flag)
            if selector.get(key, value) != value:
                raise ValueError(
                    f"{flag}: label {key!r} is given twice with different values "
                    f"({selector[key]!r} and {value!r}); a pod has one value per label"
                )
            selector[key] = value
    return selector


def _parse_pair(part: str, flag: str) -> tuple[str, str]:
    hint = "write k=v, e.g. app=sglang"
    if "!=" in part or part.startswith("!") or " in " in part or " notin " in part:
        raise ValueError(f"{flag}: {part!r}: only equality selectors (k=v) are supported")
    if "=" not in part:
        raise ValueError(f"{flag}: {part!r} is not a k=v label selector; {hint}")
    key, _, value = part.partition("=")
    value = value[1:] if value.startswith("=") else value  # k==v is k=v
    key, value = key.strip(), value.strip()
    if not _valid_key(key):
        raise ValueError(
            f"{flag}: {key!r} is not a valid label key (letters, digits, '-', '_', '.', "
            f"at most 63 characters, optionally prefixed by a DNS name and '/'); {hint}"
        )
    if value and not _NAME.match(value):
        raise ValueError(
            f"{flag}: {value!r} (for {key!r}) is not a valid label value (letters, digits, "
            "'-', '_', '.', at most 63 characters, alphanumeric at both ends)"
        )
    return key, value


def _valid_key(key: str) -> bool:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _PREFIX.match(prefix)):
        return False
    return bool(_NAME.match(name))


def _first(ns: argparse.Namespace, *names: str) -> object:
    """The first of ``names`` the namespace has and set (the flag layer may use either dest)."""
    for name in names:
        value = getattr(ns, name, None)
        if value not in (None, [], ""):
            return value
    return None


def config_from_namespace(ns: argparse.Namespace) -> K8sDiscoveryConfig | None:
    """The discovery config the parsed flags ask for, or None when discovery is off.

    Discovery is on with ``--service-discovery`` or when any of its selectors or its namespace
    is given (either flag family starts it, as the issue asks). Reads the dests of both
    families (``selector`` or ``k8s_pod_selector``, ``service_discovery_port`` or ``k8s_port``,
    ``service_discovery_namespace`` or ``k8s_namespace``), so the flag layer can name them
    either way. Raises :class:`ValueError` naming the flag for anything malformed.
    """
    selector_flag = "--selector/--k8s-pod-selector"
    raw_selector = _first(ns, "selector", "k8s_pod_selector")
    raw_prefill = _first(ns, "prefill_selector")
    raw_decode = _first(ns, "decode_selector")
    namespace = _first(ns, "service_discovery_namespace", "k8s_namespace")
    wanted = bool(getattr(ns, "service_discovery", False)) or any(
        v is not None for v in (raw_selector, raw_prefill, raw_decode, namespace)
    )
    if not wanted:
        return None
    port = _first(ns, "service_discovery_port", "k8s_port")
    annotation = _first(ns, "bootstrap_port_annotation")
    return K8sDiscoveryConfig(
        selector=parse_selector(_tokens(raw_selector), selector_flag),
        prefill_selector=parse_selector(_tokens(raw_prefill), "--prefill-selector"),
        decode_selector=parse_selector(_tokens(raw_decode), "--decode-selector"),
        port=int(port) if port is not None else DEFAULT_PORT,  # type: ignore[call-overload]
        namespace=str(namespace) if namespace is not None else None,
        bootstrap_port_annotation=(
            str(annotation) if annotation is not None else DEFAULT_BOOTSTRAP_PORT_ANNOTATION
        ),
        kubeconfig=getattr(ns, "kubeconfig", None),
    )


def _tokens(raw: object) -> list[str] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, Iterable):
        return [str(x) for x in raw]
    return [str(raw)]
