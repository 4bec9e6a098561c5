"""The router's command line: the SGLang Router's flag table, parsed into a ``RouterConfig``.

The flag names are the SGLang Router's, in both generations (the documented ones first, the
names of the sglang-router 0.3.2 wheel as aliases), so that a script written for
``python -m sglang_router.launch_router`` runs unchanged against ``sglctl router``. Defaults
come from :class:`~sglctl.router.config.RouterConfig` and ``--help`` shows each one; where
one differs from the SGLang Router the help says why.

Every flag's ``dest`` is the name of a ``RouterConfig`` field, so :func:`parse_args` copies
the parsed values by walking the dataclass fields; only the few values that need checking or
merging (worker URLs, the PD lists, the log level) are built by hand.

Flags accepted for compatibility that sglctl cannot honour are listed once, in
:data:`REFUSED`, each with what to use instead; start-up fails with that one line rather
than silently ignoring them.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sglctl import argtypes
from sglctl.router.config import PrefillServer, RouterConfig
from sglctl.router.discovery.k8s_config import (
    DEFAULT_BOOTSTRAP_PORT_ANNOTATION,
    DEFAULT_PORT,
    K8sDiscoveryConfig,
    config_from_namespace,
)
from sglctl.router.urls import InvalidWorkerURL, parse_worker_url

POLICIES = (
    "cache_aware",
    "round_robin",
    "random",
    "power_of_two",
    "shortest_queue",
    "least_ttft",
)
LOG_LEVELS = ("debug", "info", "warn", "warning", "error")
_POLICY_HINT = "use " + ", ".join(POLICIES)


@dataclass(frozen=True)
class Refusal:
    """A flag sglctl accepts for compatibility but cannot honour, and what to do instead."""

    flag: str
    #: True when the parsed namespace shows the flag was used.
    used: Callable[[argparse.Namespace], bool]
    message: str


def _set(dest: str) -> Callable[[argparse.Namespace], bool]:
    return lambda ns: bool(getattr(ns, dest))


def _given(dest: str) -> Callable[[argparse.Namespace], bool]:
    return lambda ns: getattr(ns, dest) is not None


def _policy_is(name: str) -> Callable[[argparse.Namespace], bool]:
    return lambda ns: name in (ns.policy, ns.prefill_policy, ns.decode_policy)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


#: Flags of the SGLang Router about serving models, TLS or auth, which sglctl does not do
#: (one value each / a list of values); accepted so that old scripts get a clear refusal.
_COMPAT_VALUE_DESTS = (
    "model_path",
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
)
_COMPAT_LIST_DESTS = ("ca_cert_paths", "control_plane_api_keys")
_NOT_ROUTING = "sglctl routes HTTP to SGLang workers only; drop it (set it on the workers)"

#: THE list of refused flags (start-up fails on the first one used, with its message).
REFUSED: tuple[Refusal, ...] = (
    Refusal(
        "--policy manual",
        _policy_is("manual"),
        f"the 'manual' policy is not implemented by sglctl; {_POLICY_HINT} "
        "(cache_aware keeps a session's requests on one worker while loads are balanced)",
    ),
    Refusal(
        "--policy bucket",
        _policy_is("bucket"),
        f"the 'bucket' policy is not implemented by sglctl; {_POLICY_HINT}",
    ),
    Refusal(
        "--dp-aware",
        _set("dp_aware"),
        "--dp-aware is not supported by sglctl; run one worker per data-parallel rank "
        "(`sglctl up --dp-size N` does) and route between them with --policy cache_aware",
    ),
    Refusal(
        "--enable-igw",
        _set("enable_igw"),
        "--enable-igw (inference gateway mode) is not supported by sglctl; "
        "run one `sglctl router` per model",
    ),
    Refusal(
        "--mini-lb",
        _set("mini_lb"),
        "--mini-lb is not supported by sglctl; use --pd-disaggregation with "
        "--prefill URL --decode URL",
    ),
    Refusal(
        "--rate-limit-tokens-per-second",
        _given("rate_limit_tokens_per_second"),
        "token rate limiting is not supported by sglctl; "
        "use --max-concurrent-requests with --queue-size",
    ),
    Refusal(
        "--enable-trace",
        _set("enable_trace"),
        "OpenTelemetry tracing is not supported by sglctl; use /metrics and the request-id "
        "headers (--request-id-headers)",
    ),
    Refusal(
        "--backend",
        lambda ns: ns.backend != "sglang",
        "only the sglang backend is supported by sglctl; drop --backend",
    ),
    Refusal(
        "--history-backend",
        lambda ns: ns.history_backend not in ("memory", "none"),
        "conversation history storage is not supported by sglctl; drop --history-backend",
    ),
    Refusal(
        "--tokenizer-path",
        lambda ns: ns.tokenizer_path is not None and not ns.kv_events,
        "--tokenizer-path is only used with --kv-events (to tokenize prompts as the workers "
        "do); add --kv-events or drop it",
    ),
    *(
        Refusal(_flag(dest), _given(dest), f"{_flag(dest)}: {_NOT_ROUTING}")
        for dest in (*_COMPAT_VALUE_DESTS, *_COMPAT_LIST_DESTS)
    ),
)
_REFUSED_POLICIES = ("manual", "bucket")


def policy_name(text: str) -> str:
    """A ``--policy`` value: an accepted policy, or a refused one (reported by REFUSED)."""
    if text in POLICIES or text in _REFUSED_POLICIES:
        return text
    raise argparse.ArgumentTypeError(f"unknown policy {text!r}; {_POLICY_HINT}")


def refusals(ns: argparse.Namespace) -> list[tuple[str, str]]:
    """``(flag, message)`` for every flag in :data:`REFUSED` that ``ns`` shows used."""
    return [(r.flag, r.message) for r in REFUSED if r.used(ns)]


def build_parser(prog: str = "sglctl router") -> argparse.ArgumentParser:
    """The argparse parser with the SGLang Router's flag names (both generations)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Cache-aware router in front of SGLang workers; a drop-in for "
        "`python -m sglang_router.launch_router`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = RouterConfig()
    pf, nnf, pi = argtypes.positive_float, argtypes.non_negative_float, argtypes.positive_int
    policy_choices = "{" + ",".join(POLICIES) + "}"

    g = p.add_argument_group("workers")
    g.add_argument("--host", default=d.host, help="address to bind the router to")
    g.add_argument("--port", type=argtypes.port, default=d.port, help="port to bind the router to")
    g.add_argument(
        "--worker-urls",
        nargs="*",
        default=[],
        metavar="URL",
        help="worker base URLs, http(s)://host[:port]",
    )
    g.add_argument(
        "--worker-startup-timeout-secs",
        type=nnf,
        default=d.worker_startup_timeout_secs,
        help="how long `/add_worker?wait=1` waits for a new worker to pass its health check "
        "(the same as `sglctl up`'s and sglang-router 0.3.2's)",
    )
    g.add_argument(
        "--worker-startup-check-interval",
        type=nnf,
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
    g.add_argument(
        "--policy",
        type=policy_name,
        default=d.policy,
        metavar=policy_choices,
        help="how a worker is chosen per request",
    )
    for role in ("prefill", "decode"):
        g.add_argument(
            f"--{role}-policy",
            type=policy_name,
            default=None,
            metavar=policy_choices,
            help=f"PD mode: policy for the {role} workers (default: "
            + ("--policy)" if role == "prefill" else "power_of_two)"),
        )
    g.add_argument(
        "--cache-threshold",
        type=float,
        default=d.cache_threshold,
        help="cache_aware: least prefix match (fraction of the request) that routes to the "
        "worker holding it; below it, the worker with the smallest tree",
    )
    g.add_argument(
        "--balance-abs-threshold",
        type=int,
        default=d.balance_abs_threshold,
        help="cache_aware: loads count as imbalanced when max - min in-flight exceeds this...",
    )
    g.add_argument(
        "--balance-rel-threshold",
        type=float,
        default=d.balance_rel_threshold,
        help="...and max > min * this; then the least-loaded worker is chosen",
    )
    g.add_argument(
        "--eviction-interval-secs",
        type=nnf,
        default=d.eviction_interval_secs,
        help="seconds between trims of the cache-aware tree to --max-tree-size (0: never)",
    )
    g.add_argument(
        "--max-tree-size",
        type=pi,
        default=d.max_tree_size,
        help="characters kept per worker in the approximate prefix tree",
    )
    g.add_argument(
        "--placement",
        choices=("tree", "hash", "load"),
        default=d.placement,
        help="sglctl only, cache_aware: where a prefix no tree holds goes. load (default): the "
        "fewest requests in flight, ties to the smallest tree (what SGLang Router 0.3.x does); "
        "tree: the smallest tree (SGLang's documented rule); hash: rendezvous hashing of its "
        "leading blocks with bounded loads, the same on every router replica (for replicas)",
    )
    g.add_argument(
        "--placement-epsilon",
        type=nnf,
        default=d.placement_epsilon,
        help="--placement hash: skip a worker whose load (this router's in-flight count, "
        "raised to the worker's own /get_load num_reqs) would exceed (1 + this) x the mean",
    )
    g.add_argument(
        "--placement-key-blocks",
        type=pi,
        default=d.placement_key_blocks,
        help="--placement hash: leading 64-character (or 64-token) blocks that key a prompt; "
        "must reach past a system prompt shared by every request",
    )
    g.add_argument(
        "--load-poll-interval-secs",
        type=nnf,
        default=d.load_poll_interval_secs,
        help="sglctl only: seconds between polls of each worker's /get_load, the workers' own "
        "load that least_ttft (and cache_aware with --worker-load-correction or --placement "
        "hash) adds to the router's counts (0: never poll)",
    )
    g.add_argument(
        "--cached-tokens-correction",
        action="store_true",
        help="sglctl only, cache_aware: when an answer's cached_tokens shows the worker "
        "evicted a prefix, drop what it used less recently from its tree (least_ttft always "
        "does)",
    )
    g.add_argument(
        "--worker-load-correction",
        action="store_true",
        help="sglctl only, cache_aware: count a worker's load as the larger of this router's "
        "in-flight requests and the worker's own num_reqs (/get_load, polled every "
        "--load-poll-interval-secs); use it with router replicas",
    )
    # KV cache events (issue 16): grouped here, additive.
    g.add_argument(
        "--kv-events",
        action="store_true",
        help="sglctl only, cache_aware: subscribe to every worker's KV cache events (SGLang "
        "--kv-events-config) and match prompts on the exact index they build, the same on "
        "every router replica; misses keep --placement, on the workers' shared /get_load",
    )
    g.add_argument(
        "--kv-events-port",
        type=argtypes.port,
        default=d.kv_events_port,
        help="--kv-events: every worker publishes on tcp://<its host>:PORT (default: read "
        "each worker's kv_events_config from its /get_server_info)",
    )
    g.add_argument(
        "--kv-events-replay-port",
        type=argtypes.port,
        default=d.kv_events_replay_port,
        help="--kv-events with --kv-events-port: the workers' replay_endpoint port",
    )
    g.add_argument(
        "--tokenizer-path",
        default=d.tokenizer_path,
        help="--kv-events: the model's tokenizer.json (or its directory) to tokenize text "
        "prompts as the workers do (default: the sim worker's 4-character rule)",
    )
    g.add_argument(
        "--max-payload-size",
        type=pi,
        default=d.max_payload_size,
        help="largest request body in bytes (413 above it); admin bodies are capped at 64 KiB",
    )
    # Only used by the manual and bucket policies, which are refused at start-up.
    g.add_argument("--bucket-adjust-interval-secs", type=int, default=5, help=argparse.SUPPRESS)
    g.add_argument("--max-idle-secs", type=int, default=14400, help=argparse.SUPPRESS)
    g.add_argument(
        "--assignment-mode",
        choices=("random", "min_load", "min_group"),
        default="random",
        help=argparse.SUPPRESS,
    )
    g.add_argument("--dp-aware", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--enable-igw", action="store_true", help=argparse.SUPPRESS)

    g = p.add_argument_group("prefill/decode disaggregation")
    g.add_argument(
        "--mode", choices=("regular", "pd"), default="regular", help="pd: prefill/decode mode"
    )
    g.add_argument(
        "--pd-disaggregation",
        action="store_true",
        help="alias of --mode pd",
    )
    g.add_argument(
        "--prefill-urls", nargs="+", default=[], metavar="URL", help="prefill workers (--mode pd)"
    )
    g.add_argument(
        "--decode-urls", nargs="+", default=[], metavar="URL", help="decode workers (--mode pd)"
    )
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
    g.add_argument("--mini-lb", action="store_true", help=argparse.SUPPRESS)

    g = p.add_argument_group("Kubernetes service discovery")
    g.add_argument(
        "--service-discovery",
        action="store_true",
        help="find workers among Kubernetes pods (any selector or namespace flag below, of "
        "either name, turns it on too); they join the --worker-urls",
    )
    g.add_argument(
        "--k8s-namespace",
        "--service-discovery-namespace",
        dest="k8s_namespace",
        default=None,
        help="namespace to watch (default: all namespaces, which needs a ClusterRole; the "
        "example manifests use one namespace and a Role)",
    )
    g.add_argument(
        "--k8s-pod-selector",
        "--selector",
        dest="k8s_pod_selector",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="label selector of the worker pods (equality only: k=v, several are ANDed)",
    )
    g.add_argument(
        "--k8s-port",
        "--service-discovery-port",
        dest="k8s_port",
        type=argtypes.port,
        default=DEFAULT_PORT,
        help="port of the workers in their pods (30000, SGLang's own; the gateway's default is 80)",
    )
    g.add_argument(
        "--prefill-selector",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="PD mode (turned on by these two): label selector of the prefill pods",
    )
    g.add_argument(
        "--decode-selector",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="PD mode: label selector of the decode pods",
    )
    g.add_argument(
        "--bootstrap-port-annotation",
        default=DEFAULT_BOOTSTRAP_PORT_ANNOTATION,
        help="pod annotation holding a prefill pod's bootstrap port (none: the worker's default)",
    )

    g = p.add_argument_group("logging")
    g.add_argument("--log-level", choices=LOG_LEVELS, default=d.log_level, help="log verbosity")
    g.add_argument("--log-dir", default=None, help="also write logs to files in this directory")
    g.add_argument(
        "--log-json", action="store_true", help="one JSON object per log line (for log shippers)"
    )
    g.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per inference request (method, path, status, worker, duration, "
        "TTFT, retries); off by default",
    )

    g = p.add_argument_group("metrics")
    g.add_argument(
        "--metrics-port",
        "--prometheus-port",
        dest="metrics_port",
        type=argtypes.port,
        default=d.metrics_port,
        help="port of the separate /metrics listener (/metrics is also on --port)",
    )
    g.add_argument(
        "--metrics-host",
        "--prometheus-host",
        dest="metrics_host",
        default=d.metrics_host,
        help="address of the /metrics listener",
    )
    g.add_argument(
        "--prometheus-duration-buckets",
        type=float,
        nargs="+",
        default=None,
        metavar="SECS",
        help="histogram buckets of sglang_router_request_duration_seconds",
    )

    g = p.add_argument_group("router processes (sglctl)")
    g.add_argument(
        "--router-processes",
        type=argtypes.positive_int,
        default=argparse.SUPPRESS,  # RouterConfig's None: chosen from the cores at start
        metavar="N",
        help="router processes serving the port, acting as one (shared loads, routes, admin, "
        "health, breakers, metrics); default: one per two usable cores, 1 to 8",
    )
    g.add_argument(
        "--router-peers",
        nargs="+",
        action="extend",
        default=[],
        metavar="HOST:PORT",
        help="sglctl only: the other router replicas (http://host:port or host:port, comma-"
        "separated or repeated; a name resolving to several addresses, a headless Service, "
        "means all of them; this router's own address is recognised and skipped), told every "
        "routing decision so that replicas route as one",
    )
    g.add_argument(
        "--router-peers-refresh-secs",
        type=argtypes.positive_float,
        default=d.router_peers_refresh_secs,
        metavar="SECS",
        help="--router-peers: seconds between DNS re-resolutions of the peers (and hellos "
        "that notice a restarted peer)",
    )
    g.add_argument(
        "--router-peers-stagger-secs",
        type=argtypes.non_negative_float,
        default=d.router_peers_stagger_secs,
        metavar="SECS",
        help="--router-peers: the least seconds each rank of replica waits before placing a "
        "new prefix, so that a burst reaching every replica at once is placed in turn (0: "
        "off); the replicas wait longer when their routes are measured to arrive later (GET "
        "/peers: stagger_ms, late_ms; 50 ms at most)",
    )

    g = p.add_argument_group("request handling")
    g.add_argument(
        "--request-id-headers",
        nargs="*",
        default=[],
        metavar="NAME",
        help="request headers passed to the worker as request ids "
        "(default: x-request-id, x-correlation-id, x-trace-id, request-id)",
    )
    g.add_argument(
        "--request-timeout-secs",
        type=nnf,
        default=d.request_timeout_secs,
        help="whole-request limit; 1800 as in sglang-router 0.3.2, because the documented 90 s "
        "cuts off long generations",
    )
    g.add_argument(
        "--shutdown-grace-period-secs",
        type=nnf,
        default=d.shutdown_grace_period_secs,
        help="on SIGTERM, how long requests in flight may finish",
    )
    g.add_argument(
        "--cors-allowed-origins",
        nargs="*",
        default=[],
        metavar="ORIGIN",
        help="origins allowed by CORS (none: no CORS headers)",
    )
    g.add_argument(
        "--api-key",
        default=None,
        help="admin endpoints require `Authorization: Bearer KEY`; without it, anyone who "
        "reaches the port can add workers",
    )

    g = p.add_argument_group("slow and hostile clients (sglctl)")
    g.add_argument(
        "--max-request-header-bytes",
        type=argtypes.positive_int,
        default=d.max_request_header_bytes,
        help="request line + headers larger than this get 431",
    )
    g.add_argument(
        "--max-request-headers",
        type=argtypes.positive_int,
        default=d.max_request_headers,
        help="more header fields than this get 431",
    )
    g.add_argument(
        "--request-header-timeout-secs",
        type=argtypes.non_negative_float,
        default=d.request_header_timeout_secs,
        help="a request head not complete this long after the connection opened (or after "
        "its first byte on a keep-alive connection) gets 408; 0 = off",
    )
    g.add_argument(
        "--request-body-idle-timeout-secs",
        type=argtypes.non_negative_float,
        default=d.request_body_idle_timeout_secs,
        help="a request body with no new byte for this long gets 408; 0 = off",
    )
    g.add_argument(
        "--request-body-timeout-secs",
        type=argtypes.non_negative_float,
        default=d.request_body_timeout_secs,
        help="a request body not complete this long after the router started reading it gets "
        "408, however steadily it trickles; 0 = off",
    )

    g = p.add_argument_group("admission control")
    g.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=d.max_concurrent_requests,
        help="requests forwarded at once; more wait in a queue (-1: no limit)",
    )
    g.add_argument(
        "--queue-size",
        type=int,
        default=d.queue_size,
        help="requests that may wait for a slot; more get 429",
    )
    g.add_argument(
        "--queue-timeout-secs",
        type=nnf,
        default=d.queue_timeout_secs,
        help="longest wait in the queue before 429",
    )
    g.add_argument("--rate-limit-tokens-per-second", type=int, default=None, help=argparse.SUPPRESS)

    g = p.add_argument_group("retries")
    g.add_argument(
        "--max-worker-retries",
        type=int,
        default=d.max_worker_retries,
        help="attempts at one worker before trying another",
    )
    g.add_argument(
        "--max-total-retries",
        "--retry-max-retries",
        dest="max_total_retries",
        type=int,
        default=d.max_total_retries,
        help="attempts per request over all workers",
    )
    g.add_argument(
        "--retry-initial-backoff-ms",
        type=int,
        default=d.retry_initial_backoff_ms,
        help="wait before the first retry",
    )
    g.add_argument(
        "--retry-max-backoff-ms",
        type=int,
        default=d.retry_max_backoff_ms,
        help="longest wait between retries",
    )
    g.add_argument(
        "--retry-backoff-multiplier",
        type=float,
        default=d.retry_backoff_multiplier,
        help="backoff growth per retry",
    )
    g.add_argument(
        "--retry-jitter-factor",
        type=float,
        default=d.retry_jitter_factor,
        help="random share of each backoff",
    )
    g.add_argument("--disable-retries", action="store_true", help="never retry a request")

    g = p.add_argument_group("circuit breaker")
    g.add_argument(
        "--cb-failure-threshold",
        type=pi,
        default=d.cb_failure_threshold,
        help="failures within the window that open a worker's breaker",
    )
    g.add_argument(
        "--cb-success-threshold",
        type=pi,
        default=d.cb_success_threshold,
        help="half-open successes that close it again",
    )
    g.add_argument(
        "--cb-timeout-duration-secs",
        type=nnf,
        default=d.cb_timeout_duration_secs,
        help="how long an open breaker waits before letting a probe through",
    )
    g.add_argument(
        "--cb-window-duration-secs",
        type=nnf,
        default=d.cb_window_duration_secs,
        help="window over which failures are counted",
    )
    g.add_argument(
        "--disable-circuit-breaker", action="store_true", help="never take a worker out on errors"
    )

    g = p.add_argument_group("health checks")
    g.add_argument(
        "--health-check-interval-secs",
        type=pf,
        default=d.health_check_interval_secs,
        help="0.3.2 uses 60; 10 notices a dead worker before many requests are retried",
    )
    g.add_argument(
        "--health-check-timeout-secs",
        type=pf,
        default=d.health_check_timeout_secs,
        help="a probe slower than this fails",
    )
    g.add_argument(
        "--health-failure-threshold",
        type=pi,
        default=d.health_failure_threshold,
        help="failed probes in a row that take a worker out",
    )
    g.add_argument(
        "--health-success-threshold",
        type=pi,
        default=d.health_success_threshold,
        help="good probes in a row that bring it back",
    )
    g.add_argument(
        "--health-check-endpoint", default=d.health_check_endpoint, help="path probed on workers"
    )
    g.add_argument("--disable-health-check", action="store_true", help="never probe workers")
    g.add_argument(
        "--stall-suspect-secs",
        type=nnf,
        default=d.stall_suspect_secs,
        help="sglctl only: a worker with requests in flight that sent nothing for this long, "
        "while other workers did, is probed at once and ejected if it does not answer "
        "(a hung worker is bypassed in ~2-3 s instead of the health checks' 20-30 s); "
        "0 disables",
    )
    g.add_argument(
        "--stall-probe-timeout-secs",
        type=pf,
        default=d.stall_probe_timeout_secs,
        help="sglctl only: how long that probe waits at least; it waits twice the worker's "
        "slowest recent good health probe if that is longer (SGLang's /health takes ~1 s), "
        "3 s before the first one",
    )

    g = p.add_argument_group("accepted for compatibility, not supported by sglctl")
    for dest in _COMPAT_VALUE_DESTS:
        g.add_argument(_flag(dest), default=None, help=argparse.SUPPRESS)
    for dest in _COMPAT_LIST_DESTS:
        g.add_argument(_flag(dest), nargs="*", default=None, help=argparse.SUPPRESS)
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


def _urls(items: Sequence[str], flag: str, parser: argparse.ArgumentParser) -> list[str]:
    """Each URL through the one validator; a bad one is a usage error naming the flag."""
    try:
        return [parse_worker_url(u, flag) for u in items]
    except InvalidWorkerURL as exc:
        parser.error(str(exc))


def _prefill(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> list[PrefillServer]:
    """``--prefill-urls`` and ``--prefill URL [BOOTSTRAP_PORT]`` as one list."""
    items: list[tuple[str, int | None]] = [(u, None) for u in ns.prefill_urls]
    for item in ns.prefill:
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
        items.append((item[0], port))
    urls = _urls([u for u, _ in items], "--prefill", parser)
    return [PrefillServer(url, port) for url, (_, port) in zip(urls, items, strict=True)]


def _discovery(
    ns: argparse.Namespace, parser: argparse.ArgumentParser
) -> K8sDiscoveryConfig | None:
    """The Kubernetes discovery config of either flag family; a bad value is a usage error
    naming the flag (``config_from_namespace``'s messages do)."""
    try:
        return config_from_namespace(ns)
    except ValueError as exc:
        parser.error(str(exc))


def _check_pd(
    pd: bool,
    *,
    prefill: Sequence[PrefillServer],
    decode: Sequence[str],
    discovery: K8sDiscoveryConfig | None,
    state_table: str | None,
    parser: argparse.ArgumentParser,
) -> None:
    """THE rule for which workers PD mode needs at start-up, in one place.

    Static ``--prefill``/``--decode`` lists must name both roles, unless the workers come
    from a source that keeps running: Kubernetes discovery (its prefill/decode selectors) or
    the supervisor's ``--state-table`` (``sglctl up --prefill-dp P --decode-dp D``). Then PD
    mode may start with no URL at all and the workers join as they appear.
    """
    if not pd:
        if prefill or decode:
            parser.error("--prefill/--decode need --pd-disaggregation (or --mode pd)")
        return
    if discovery is not None and not discovery.pd_mode:
        parser.error(
            "PD mode with service discovery needs --prefill-selector and --decode-selector "
            "(which pods are prefill and which decode workers); --selector alone selects "
            "regular workers, which PD mode cannot route to"
        )
    if discovery is None and not state_table and (not prefill or not decode):
        parser.error(
            "PD mode needs at least one prefill and one decode worker (--prefill/--decode), "
            "or service discovery (--service-discovery --prefill-selector k=v "
            "--decode-selector k=v)"
        )


def parse_args(argv: Sequence[str] | None = None, prog: str = "sglctl router") -> RouterConfig:
    """Parse router flags into a :class:`RouterConfig` (exits with a usage error on bad flags)."""
    parser = build_parser(prog)
    ns = parser.parse_args(argv)
    discovery = _discovery(ns, parser)
    # PD mode as the SGLang Router turns it on, plus: prefill/decode selectors imply it.
    pd = ns.mode == "pd" or ns.pd_disaggregation or bool(discovery and discovery.pd_mode)
    prefill = _prefill(ns, parser)
    decode = _urls([*ns.decode_urls, *ns.decode], "--decode", parser)
    _check_pd(
        pd,
        prefill=prefill,
        decode=decode,
        discovery=discovery,
        state_table=ns.state_table,
        parser=parser,
    )
    if not 0.0 <= ns.cache_threshold <= 1.0:
        parser.error(f"--cache-threshold must be within [0, 1], got {ns.cache_threshold}")
    if ns.kv_events and (ns.policy != "cache_aware" or pd):
        parser.error("--kv-events is used by --policy cache_aware outside PD mode only")
    if ns.kv_events_replay_port is not None and ns.kv_events_port is None:
        parser.error("--kv-events-replay-port needs --kv-events-port (both, or neither)")
    from sglctl.router.peers import parse_peers

    try:
        router_peers = parse_peers(ns.router_peers)
    except ValueError as exc:
        parser.error(str(exc))
    built: dict[str, Any] = {
        "router_peers": router_peers,
        "worker_urls": _urls(ns.worker_urls, "--worker-urls", parser),
        "pd_disaggregation": pd,
        "prefill_servers": prefill,
        "decode_urls": decode,
        "k8s_discovery": discovery,
        "log_level": "warning" if ns.log_level == "warn" else ns.log_level,
        "unsupported": refusals(ns),
    }
    copied = {
        f.name: getattr(ns, f.name)
        for f in dataclasses.fields(RouterConfig)
        if f.name not in built and hasattr(ns, f.name)
    }
    return RouterConfig(**copied, **built)
