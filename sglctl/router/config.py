"""The router's command line and its one typed configuration object.

The flag names are the SGLang Router's, in both generations (the documented ones first, the
names of the sglang-router 0.3.2 wheel as aliases), so that a script written for
``python -m sglang_router.launch_router`` runs unchanged against ``sglctl router``. Defaults
are sglctl's (CONTRACT.md section 1); where one differs from the SGLang Router the help says
why.

Everything is parsed once into :class:`RouterConfig` and passed down; nothing deeper reads
``sys.argv`` or the environment. Flags that are accepted for compatibility but that sglctl
cannot honour are reported by :func:`unsupported_features` so that start-up fails with one
clear line instead of silently ignoring them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from sglctl import argtypes
from sglctl.router import http_server  # hardening-server: HTTP limits and their flags
from sglctl.router.http_server import HttpLimits  # hardening-server

POLICIES = ("cache_aware", "round_robin", "random", "power_of_two", "shortest_queue")
#: Policy names the SGLang Router knows but sglctl does not implement (rejected at start-up).
UNSUPPORTED_POLICIES = ("manual", "bucket")
LOG_LEVELS = ("debug", "info", "warn", "warning", "error")


@dataclass(frozen=True)
class PrefillServer:
    """A prefill worker of a PD deployment and its KV bootstrap port (None: worker default)."""

    url: str
    bootstrap_port: int | None = None


@dataclass
class RouterConfig:
    """Every router setting, typed. Built by :func:`parse_args`, or directly by ``sglctl up``."""

    host: str = "127.0.0.1"
    port: int = 30000
    worker_urls: list[str] = field(default_factory=list)

    # Routing policy and the cache-aware tree.
    policy: str = "cache_aware"
    prefill_policy: str | None = None
    decode_policy: str | None = None
    cache_threshold: float = 0.5
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.0001
    eviction_interval_secs: float = 60.0
    max_tree_size: int = 16_777_216

    # Limits.
    max_payload_size: int = 10_485_760
    request_timeout_secs: float = 1800.0
    shutdown_grace_period_secs: float = 180.0

    # Worker membership.
    worker_startup_timeout_secs: float = 600.0
    worker_startup_check_interval: float = 1.0
    state_table: str | None = None
    #: sglctl only: the hot path's HTTP client, "native" (sglctl.router.upstream) or "httpx".
    upstream_client: str = "native"

    # Prefill/decode disaggregation.
    pd_disaggregation: bool = False
    prefill_servers: list[PrefillServer] = field(default_factory=list)
    decode_urls: list[str] = field(default_factory=list)

    # Retries.
    max_worker_retries: int = 3
    max_total_retries: int = 6
    retry_initial_backoff_ms: int = 50
    retry_max_backoff_ms: int = 30_000
    retry_backoff_multiplier: float = 1.5
    retry_jitter_factor: float = 0.2
    disable_retries: bool = False

    # Circuit breaker.
    cb_failure_threshold: int = 10
    cb_success_threshold: int = 3
    cb_timeout_duration_secs: float = 60.0
    cb_window_duration_secs: float = 120.0
    disable_circuit_breaker: bool = False

    # Health checks.
    health_check_interval_secs: float = 10.0
    health_check_timeout_secs: float = 5.0
    health_failure_threshold: int = 3
    health_success_threshold: int = 2
    health_check_endpoint: str = "/health"
    disable_health_check: bool = False

    # Admission control.
    max_concurrent_requests: int = -1
    queue_size: int = 100
    queue_timeout_secs: float = 60.0

    # Metrics.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 29000
    prometheus_duration_buckets: list[float] | None = None

    # Misc.
    api_key: str | None = None
    log_level: str = "info"
    log_dir: str | None = None
    request_id_headers: list[str] = field(default_factory=list)
    cors_allowed_origins: list[str] = field(default_factory=list)

    # hardening-server: header/body limits and timeouts of the HTTP server (http_server.py).
    http_limits: HttpLimits = field(default_factory=HttpLimits)

    #: Flags the user set that sglctl cannot honour: ``(flag, reason)``; see
    #: :func:`unsupported_features`.
    unsupported: list[tuple[str, str]] = field(default_factory=list)

    @property
    def is_pd(self) -> bool:
        return self.pd_disaggregation


def build_parser(prog: str = "sglctl router") -> argparse.ArgumentParser:
    """The argparse parser with the SGLang Router's flag names (both generations)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Cache-aware router in front of SGLang workers; a drop-in for "
        "`python -m sglang_router.launch_router`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = RouterConfig()

    g = p.add_argument_group("workers")
    g.add_argument("--host", default=d.host, help="address to bind the router to")
    g.add_argument("--port", type=int, default=d.port, help="port to bind the router to")
    g.add_argument("--worker-urls", nargs="*", default=[], metavar="URL", help="worker base URLs")
    g.add_argument(
        "--worker-startup-timeout-secs",
        type=argtypes.non_negative_float,
        default=d.worker_startup_timeout_secs,
        help="how long /add_worker waits for a new worker to pass its health check "
        "(sglang-router 0.3.2 uses 1800)",
    )
    g.add_argument(
        "--worker-startup-check-interval",
        type=argtypes.non_negative_float,
        default=d.worker_startup_check_interval,
        help="seconds between health probes of a starting worker (0.3.2 uses 30, which makes "
        "a fresh worker wait up to half a minute for no reason)",
    )
    g.add_argument(
        "--state-table",
        default=None,
        metavar="NAME",
        help="sglctl only: take worker membership from the supervisor's shared-memory table NAME",
    )

    g.add_argument(
        "--upstream-client",
        choices=("native", "httpx"),
        default=d.upstream_client,
        help="sglctl only: HTTP client for forwarding requests to workers (native: sglctl's "
        "lean keep-alive client; httpx: the httpx transport, slower at high concurrency)",
    )

    g = p.add_argument_group("routing policy")
    every_policy = (*POLICIES, *UNSUPPORTED_POLICIES)
    g.add_argument("--policy", choices=every_policy, default=d.policy)
    g.add_argument("--prefill-policy", choices=every_policy, default=None)
    g.add_argument("--decode-policy", choices=every_policy, default=None)
    g.add_argument("--cache-threshold", type=float, default=d.cache_threshold)
    g.add_argument("--balance-abs-threshold", type=int, default=d.balance_abs_threshold)
    g.add_argument("--balance-rel-threshold", type=float, default=d.balance_rel_threshold)
    g.add_argument(
        "--eviction-interval-secs",
        type=argtypes.non_negative_float,
        default=d.eviction_interval_secs,
        help="seconds between trims of the cache-aware tree to --max-tree-size (0: never)",
    )
    g.add_argument(
        "--max-tree-size",
        type=argtypes.positive_int,
        default=d.max_tree_size,
        help="characters kept per worker in the approximate prefix tree",
    )
    g.add_argument("--max-payload-size", type=argtypes.positive_int, default=d.max_payload_size)
    # Only used by the manual and bucket policies, which are rejected at start-up.
    g.add_argument("--bucket-adjust-interval-secs", type=int, default=5, help=argparse.SUPPRESS)
    g.add_argument("--max-idle-secs", type=int, default=14400, help=argparse.SUPPRESS)
    g.add_argument(
        "--assignment-mode",
        choices=("random", "min_load", "min_group"),
        default="random",
        help=argparse.SUPPRESS,
    )
    g.add_argument("--dp-aware", action="store_true", help="not supported by sglctl")
    g.add_argument("--enable-igw", action="store_true", help="not supported by sglctl")

    g = p.add_argument_group("prefill/decode disaggregation")
    g.add_argument("--mode", choices=("regular", "pd"), default="regular")
    g.add_argument("--pd-disaggregation", action="store_true", help="alias of --mode pd")
    g.add_argument("--prefill-urls", nargs="+", default=[], metavar="URL")
    g.add_argument("--decode-urls", nargs="+", default=[], metavar="URL")
    g.add_argument(
        "--prefill",
        nargs="+",
        action="append",
        default=[],
        metavar="URL [BOOTSTRAP_PORT]",
        help="a prefill worker and its optional bootstrap port (repeatable)",
    )
    g.add_argument(
        "--decode", action="append", default=[], metavar="URL", help="a decode worker (repeatable)"
    )
    g.add_argument("--mini-lb", action="store_true", help="not supported by sglctl")

    g = p.add_argument_group("Kubernetes service discovery (not supported by sglctl)")
    g.add_argument("--service-discovery", action="store_true")
    g.add_argument(
        "--k8s-namespace", "--service-discovery-namespace", dest="k8s_namespace", default=None
    )
    g.add_argument(
        "--k8s-pod-selector", "--selector", dest="k8s_pod_selector", nargs="+", default=[]
    )
    g.add_argument(
        "--k8s-port", "--service-discovery-port", dest="k8s_port", type=int, default=30000
    )
    g.add_argument("--prefill-selector", nargs="+", default=[])
    g.add_argument("--decode-selector", nargs="+", default=[])

    g = p.add_argument_group("logging")
    g.add_argument("--log-level", choices=LOG_LEVELS, default=d.log_level)
    g.add_argument("--log-dir", default=None)

    g = p.add_argument_group("metrics")
    g.add_argument(
        "--metrics-port", "--prometheus-port", dest="metrics_port", type=int, default=d.metrics_port
    )
    g.add_argument(
        "--metrics-host", "--prometheus-host", dest="metrics_host", default=d.metrics_host
    )
    g.add_argument("--prometheus-duration-buckets", type=float, nargs="+", default=None)

    g = p.add_argument_group("request handling")
    g.add_argument("--request-id-headers", nargs="*", default=[])
    g.add_argument(
        "--request-timeout-secs",
        type=argtypes.non_negative_float,
        default=d.request_timeout_secs,
        help="whole-request limit; 1800 as in sglang-router 0.3.2, because the documented 90 s "
        "cuts off long generations",
    )
    g.add_argument(
        "--shutdown-grace-period-secs",
        type=argtypes.non_negative_float,
        default=d.shutdown_grace_period_secs,
    )
    g.add_argument("--cors-allowed-origins", nargs="*", default=[])
    g.add_argument(
        "--api-key", default=None, help="admin endpoints require `Authorization: Bearer KEY`"
    )

    http_server.add_flags(p)  # hardening-server: --max-request-header-bytes, ... timeouts

    g = p.add_argument_group("admission control")
    g.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests)
    g.add_argument("--queue-size", type=int, default=d.queue_size)
    g.add_argument(
        "--queue-timeout-secs", type=argtypes.non_negative_float, default=d.queue_timeout_secs
    )
    g.add_argument(
        "--rate-limit-tokens-per-second", type=int, default=None, help="not supported by sglctl"
    )

    g = p.add_argument_group("retries")
    g.add_argument("--max-worker-retries", type=int, default=d.max_worker_retries)
    g.add_argument(
        "--max-total-retries",
        "--retry-max-retries",
        dest="max_total_retries",
        type=int,
        default=d.max_total_retries,
    )
    g.add_argument("--retry-initial-backoff-ms", type=int, default=d.retry_initial_backoff_ms)
    g.add_argument("--retry-max-backoff-ms", type=int, default=d.retry_max_backoff_ms)
    g.add_argument("--retry-backoff-multiplier", type=float, default=d.retry_backoff_multiplier)
    g.add_argument("--retry-jitter-factor", type=float, default=d.retry_jitter_factor)
    g.add_argument("--disable-retries", action="store_true")

    g = p.add_argument_group("circuit breaker")
    g.add_argument(
        "--cb-failure-threshold", type=argtypes.positive_int, default=d.cb_failure_threshold
    )
    g.add_argument(
        "--cb-success-threshold", type=argtypes.positive_int, default=d.cb_success_threshold
    )
    g.add_argument(
        "--cb-timeout-duration-secs",
        type=argtypes.non_negative_float,
        default=d.cb_timeout_duration_secs,
    )
    g.add_argument(
        "--cb-window-duration-secs",
        type=argtypes.non_negative_float,
        default=d.cb_window_duration_secs,
    )
    g.add_argument("--disable-circuit-breaker", action="store_true")

    g = p.add_argument_group("health checks")
    g.add_argument(
        "--health-check-interval-secs",
        type=argtypes.positive_float,
        default=d.health_check_interval_secs,
        help="0.3.2 uses 60; 10 notices a dead worker before many requests are retried",
    )
    g.add_argument(
        "--health-check-timeout-secs",
        type=argtypes.positive_float,
        default=d.health_check_timeout_secs,
    )
    g.add_argument(
        "--health-failure-threshold", type=argtypes.positive_int, default=d.health_failure_threshold
    )
    g.add_argument(
        "--health-success-threshold", type=argtypes.positive_int, default=d.health_success_threshold
    )
    g.add_argument("--health-check-endpoint", default=d.health_check_endpoint)
    g.add_argument("--disable-health-check", action="store_true")

    g = p.add_argument_group("accepted for compatibility, not supported by sglctl")
    for flag in (
        "--model-path",
        "--tokenizer-path",
        "--chat-template",
        "--reasoning-parser",
        "--tool-call-parser",
        "--mcp-config-path",
        "--tls-cert-path",
        "--tls-key-path",
        "--client-cert-path",
        "--client-key-path",
        "--otlp-traces-endpoint",
        "--jwt-issuer",
        "--jwt-audience",
        "--jwt-jwks-uri",
    ):
        g.add_argument(flag, default=None, help=argparse.SUPPRESS)
    g.add_argument("--ca-cert-paths", nargs="*", default=None, help=argparse.SUPPRESS)
    g.add_argument("--control-plane-api-keys", nargs="*", default=None, help=argparse.SUPPRESS)
    g.add_argument("--enable-trace", action="store_true", help=argparse.SUPPRESS)
    g.add_argument(
        "--backend", choices=("sglang", "openai"), default="sglang", help=argparse.SUPPRESS
    )
    g.add_argument(
        "--history-backend",
        choices=("memory", "none", "oracle", "postgres", "redis"),
        default="memory",
        help=argparse.SUPPRESS,
    )
    return p


def _parse_prefill(items: list[list[str]], parser: argparse.ArgumentParser) -> list[PrefillServer]:
    servers = []
    for item in items:
        if len(item) > 2:
            parser.error(f"--prefill takes URL [BOOTSTRAP_PORT], got {' '.join(item)}")
        port: int | None = None
        if len(item) == 2 and item[1].lower() != "none":
            try:
                port = int(item[1])
            except ValueError:
                parser.error(
                    f"--prefill bootstrap port must be a number or 'none', got {item[1]!r}"
                )
        servers.append(PrefillServer(item[0].rstrip("/"), port))
    return servers


def _checked_url(raw: str, flag: str, parser: argparse.ArgumentParser) -> str:
    """A worker URL as the registry will hold it, or a usage error naming the flag."""
    url = raw.strip()
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        parser.error(f"{flag}: invalid worker URL {raw!r}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        parser.error(f"{flag}: invalid worker URL {raw!r} (expected http://host:port)")
    del port
    return url


def _unsupported(ns: argparse.Namespace) -> list[tuple[str, str]]:
    """Flags set by the user that sglctl cannot honour, each with the reason."""
    found: list[tuple[str, str]] = []
    k8s = (
        "Kubernetes service discovery is not supported by sglctl; "
        "pass --worker-urls or use add-worker"
    )
    if (
        ns.service_discovery
        or ns.k8s_namespace
        or ns.k8s_pod_selector
        or ns.prefill_selector
        or ns.decode_selector
    ):
        found.append(("--service-discovery/--k8s-*", k8s))
    for name in (ns.policy, ns.prefill_policy, ns.decode_policy):
        if name in UNSUPPORTED_POLICIES:
            found.append((f"--policy {name}", f"the {name!r} policy is not implemented by sglctl"))
    for flag, attr in (
        ("--dp-aware", "dp_aware"),
        ("--enable-igw", "enable_igw"),
        ("--mini-lb", "mini_lb"),
    ):
        if getattr(ns, attr):
            found.append((flag, f"{flag} is not supported by sglctl"))
    for attr in (
        "model_path",
        "tokenizer_path",
        "chat_template",
        "reasoning_parser",
        "tool_call_parser",
        "mcp_config_path",
        "tls_cert_path",
        "tls_key_path",
        "client_cert_path",
        "client_key_path",
        "otlp_traces_endpoint",
        "jwt_issuer",
        "jwt_audience",
        "jwt_jwks_uri",
        "ca_cert_paths",
        "control_plane_api_keys",
        "rate_limit_tokens_per_second",
    ):
        if getattr(ns, attr) is not None:
            flag = "--" + attr.replace("_", "-")
            found.append(
                (flag, f"{flag} is not supported by sglctl (HTTP routing to SGLang workers only)")
            )
    if ns.enable_trace:
        found.append(("--enable-trace", "OpenTelemetry tracing is not supported by sglctl"))
    if ns.backend != "sglang":
        found.append(("--backend", "only the sglang backend is supported by sglctl"))
    if ns.history_backend not in ("memory", "none"):
        found.append(
            ("--history-backend", "conversation history storage is not supported by sglctl")
        )
    return found


def parse_args(argv: Sequence[str] | None = None, prog: str = "sglctl router") -> RouterConfig:
    """Parse router flags into a :class:`RouterConfig` (exits with a usage error on bad flags)."""
    parser = build_parser(prog)
    ns = parser.parse_args(argv)
    pd = ns.mode == "pd" or ns.pd_disaggregation
    prefill = [
        PrefillServer(_checked_url(p.url, "--prefill", parser), p.bootstrap_port)
        for p in [PrefillServer(u) for u in ns.prefill_urls] + _parse_prefill(ns.prefill, parser)
    ]
    decode = [_checked_url(u, "--decode", parser) for u in [*ns.decode_urls, *ns.decode]]
    if pd and (not prefill or not decode):
        parser.error(
            "PD mode needs at least one prefill and one decode worker (--prefill/--decode)"
        )
    if not pd and (prefill or decode):
        parser.error("--prefill/--decode need --pd-disaggregation (or --mode pd)")
    if not 0.0 <= ns.cache_threshold <= 1.0:
        parser.error(f"--cache-threshold must be within [0, 1], got {ns.cache_threshold}")
    log_level = "warning" if ns.log_level == "warn" else ns.log_level
    return RouterConfig(
        host=ns.host,
        port=ns.port,
        worker_urls=[_checked_url(u, "--worker-urls", parser) for u in ns.worker_urls],
        policy=ns.policy,
        prefill_policy=ns.prefill_policy,
        decode_policy=ns.decode_policy,
        cache_threshold=ns.cache_threshold,
        balance_abs_threshold=ns.balance_abs_threshold,
        balance_rel_threshold=ns.balance_rel_threshold,
        eviction_interval_secs=ns.eviction_interval_secs,
        max_tree_size=ns.max_tree_size,
        max_payload_size=ns.max_payload_size,
        request_timeout_secs=ns.request_timeout_secs,
        shutdown_grace_period_secs=ns.shutdown_grace_period_secs,
        worker_startup_timeout_secs=ns.worker_startup_timeout_secs,
        worker_startup_check_interval=ns.worker_startup_check_interval,
        state_table=ns.state_table,
        upstream_client=ns.upstream_client,
        pd_disaggregation=pd,
        prefill_servers=prefill,
        decode_urls=decode,
        max_worker_retries=ns.max_worker_retries,
        max_total_retries=ns.max_total_retries,
        retry_initial_backoff_ms=ns.retry_initial_backoff_ms,
        retry_max_backoff_ms=ns.retry_max_backoff_ms,
        retry_backoff_multiplier=ns.retry_backoff_multiplier,
        retry_jitter_factor=ns.retry_jitter_factor,
        disable_retries=ns.disable_retries,
        cb_failure_threshold=ns.cb_failure_threshold,
        cb_success_threshold=ns.cb_success_threshold,
        cb_timeout_duration_secs=ns.cb_timeout_duration_secs,
        cb_window_duration_secs=ns.cb_window_duration_secs,
        disable_circuit_breaker=ns.disable_circuit_breaker,
        health_check_interval_secs=ns.health_check_interval_secs,
        health_check_timeout_secs=ns.health_check_timeout_secs,
        health_failure_threshold=ns.health_failure_threshold,
        health_success_threshold=ns.health_success_threshold,
        health_check_endpoint=ns.health_check_endpoint,
        disable_health_check=ns.disable_health_check,
        max_concurrent_requests=ns.max_concurrent_requests,
        queue_size=ns.queue_size,
        queue_timeout_secs=ns.queue_timeout_secs,
        metrics_host=ns.metrics_host,
        metrics_port=ns.metrics_port,
        prometheus_duration_buckets=ns.prometheus_duration_buckets,
        api_key=ns.api_key,
        log_level=log_level,
        log_dir=ns.log_dir,
        request_id_headers=list(ns.request_id_headers or []),
        cors_allowed_origins=list(ns.cors_allowed_origins or []),
        http_limits=http_server.limits_from_args(ns),  # hardening-server
        unsupported=_unsupported(ns),
    )
