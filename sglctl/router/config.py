"""The router's one typed configuration object.

Built once -- by :func:`sglctl.router.flags.parse_args` from the SGLang-compatible command
line, or directly by a test -- and passed down; nothing deeper reads ``sys.argv`` or the
environment. The defaults here are the ones ``--help`` shows (CONTRACT.md section 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the discovery package is only loaded when discovery is on
    from sglctl.router.discovery.k8s_config import K8sDiscoveryConfig
    from sglctl.router.peers import PeerAddress


@dataclass(frozen=True)
class PrefillServer:
    """A prefill worker of a PD deployment and its KV bootstrap port (None: worker default)."""

    url: str
    bootstrap_port: int | None = None


@dataclass
class RouterConfig:
    """Every router setting, typed; each field is the ``dest`` of the flag of the same name."""

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
    #: sglctl only (policies/placement.py, cache_aware.py): where cache_aware puts a prefix no
    #: tree holds. "load" (the least loaded worker, as SGLang Router 0.3.x does) won the
    #: issue-14 grid over "tree" (smallest tree) on E2E p50 (benchmarks/RESULTS.md).
    placement: str = "load"
    placement_epsilon: float = 1.0
    placement_key_blocks: int = 64
    #: sglctl only: seconds between /get_load polls of each worker (load_poll.py); 0: off.
    load_poll_interval_secs: float = 0.5
    #: sglctl only, cache_aware: trim the tree to the workers' reported cached_tokens.
    cached_tokens_correction: bool = False
    #: sglctl only, cache_aware: load = max(in flight, the worker's /get_load num_reqs).
    worker_load_correction: bool = False

    # KV cache events (issue 16: kv_events.py, kv_index.py, tokens.py): cache_aware matches
    # on the exact index the workers' own events build, the same on every router replica.
    #: sglctl only: subscribe to every worker's KV cache events.
    kv_events: bool = False
    #: Where each worker publishes: tcp://<worker host>:<port>; None: its /get_server_info.
    kv_events_port: int | None = None
    kv_events_replay_port: int | None = None
    #: The model's tokenizer.json (or its directory), to tokenize text as the workers do;
    #: None: the sim's 4-character rule. Only used with kv_events.
    tokenizer_path: str | None = None

    # Limits.
    max_payload_size: int = 10_485_760
    request_timeout_secs: float = 1800.0
    shutdown_grace_period_secs: float = 180.0

    # Worker membership.
    worker_startup_timeout_secs: float = 1800.0
    worker_startup_check_interval: float = 1.0
    state_table: str | None = None
    #: sglctl only: the hot path's HTTP client, "native" (sglctl.router.upstream) or "httpx".
    upstream_client: str = "native"

    # Router processes (sglctl only).
    #: --router-processes: processes serving the port; None: one per two usable cores (1-8).
    router_processes: int | None = None
    #: --router-peers (issue 16, peers.py): the other replicas, told every routing decision.
    router_peers: list[PeerAddress] = field(default_factory=list)
    router_peers_refresh_secs: float = 5.0
    #: The least seconds each rank of replica waits before placing a miss (more when routes
    #: are measured to arrive later: peers.Peers.restep; cache_aware.STAGGER_SECS).
    router_peers_stagger_secs: float = 0.005

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
    #: sglctl only (stall.py): probe a worker silent this long mid-request; 0 disables.
    stall_suspect_secs: float = 1.5
    stall_probe_timeout_secs: float = 1.0

    # Admission control.
    max_concurrent_requests: int = -1
    queue_size: int = 100
    queue_timeout_secs: float = 60.0

    # Metrics.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 29000
    prometheus_duration_buckets: list[float] | None = None

    # Kubernetes service discovery: both flag families (--service-discovery/--selector/...
    # and --k8s-*) parsed into one config; None when discovery is off. Discovered workers
    # join the static --worker-urls (and the state table's), they do not replace them.
    k8s_discovery: K8sDiscoveryConfig | None = None

    # Misc.
    api_key: str | None = None
    log_level: str = "info"
    log_dir: str | None = None
    log_json: bool = False
    access_log: bool = False
    request_id_headers: list[str] = field(default_factory=list)
    cors_allowed_origins: list[str] = field(default_factory=list)

    # The HTTP server's defences against slow and hostile clients (http_server.py).
    max_request_header_bytes: int = 65_536
    max_request_headers: int = 100
    request_header_timeout_secs: float = 10.0
    request_body_idle_timeout_secs: float = 10.0
    request_body_timeout_secs: float = 60.0

    #: Flags the user set that sglctl cannot honour: ``(flag, reason)``, the reason saying
    #: what to use instead; see :data:`sglctl.router.flags.REFUSED`.
    unsupported: list[tuple[str, str]] = field(default_factory=list)

    @property
    def is_pd(self) -> bool:
        return self.pd_disaggregation
