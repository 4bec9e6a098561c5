"""``sglctl up``'s command line and its one typed configuration object.

``sglctl up`` owns a few flags (the model, the GPU plan, the backend, supervision policy);
every other flag belongs to the router and is handed to the router process unchanged, and
whatever follows ``--`` goes to every worker. The router's flags are validated here, before
anything starts, with the router's own parser -- a typo should cost a second, not the minutes
a real model takes to load.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from sglctl import argtypes

if TYPE_CHECKING:
    from sglctl.router.config import RouterConfig

BACKENDS = ("auto", "sglang", "sim")
DEFAULT_WORKER_BASE_PORT = 31000
#: SGLang's own default ``--disaggregation-bootstrap-port``; prefill worker j gets this + j.
DEFAULT_BOOTSTRAP_BASE_PORT = 8998
#: SGLang's own default KV events port (``tcp://*:5557``); with the router's ``--kv-events``,
#: worker i publishes on this + 2i and answers replays on this + 2i + 1.
DEFAULT_KV_EVENTS_BASE_PORT = 5557
#: Worker flags ``sglctl up`` sets itself in a PD layout (one value per worker, not one for
#: all): given after ``--`` they would override the plan, so they are refused.
PLANNED_WORKER_FLAGS = (
    "--disaggregation-mode",
    "--disaggregation-bootstrap-port",
    "--kv-events-config",
)
#: Router flags that name workers: ``sglctl up`` starts its own and tells the router of them.
PLANNED_ROUTER_FLAGS = (
    "--worker-urls",
    "--prefill",
    "--prefill-urls",
    "--decode",
    "--decode-urls",
)
#: The supervisor's probe timeout per backend. A hung worker is out of routing after about
#: interval + failures x this, so it is as short as the backend allows: the sim answers
#: /health at once; SGLang's /health runs a one-token generation through the scheduler and
#: answers only after its first one-second check, so it needs room above 1 s.
PROBE_TIMEOUT_SECS = {"sim": 1.0, "sglang": 3.0}
#: Router flags ``sglctl up --help`` shows (flag, default, help); parsed by the router.
ROUTER_FLAGS_SHOWN = (
    ("--host", "127.0.0.1", "address the router listens on"),
    ("--port", "30000", "the router's port; also names this run (state table sglctl_<port>)"),
    ("--metrics-port", "29000", "Prometheus /metrics port"),
    (
        "--policy",
        "least_ttft; cache_aware in PD mode, with --kv-events, and for `sglctl router`",
        "routing policy (any of the router's)",
    ),
    (
        "--router-processes",
        "one per two usable cores, 1 to 8",
        "router processes on the port, acting as one router",
    ),
)


#: The policy ``sglctl up`` runs when ``--policy`` is not given (``sglctl router`` keeps the
#: SGLang Router's ``cache_aware``, so its scripts behave as documented). ``least_ttft`` beat
#: ``cache_aware`` and the SGLang Router on TTFT p50/p99 and E2E p50 over issue 14's grid
#: (benchmarks/RESULTS.md, "least_ttft prices the stall"). PD mode and ``--kv-events`` (which
#: feeds ``cache_aware``'s tree) keep ``cache_aware``.
UP_DEFAULT_POLICY = "least_ttft"


class UsageError(ValueError):
    """A flag combination that cannot work; the message says how to fix it."""


@dataclass
class UpConfig:
    """Everything ``sglctl up`` needs, built once by :func:`parse_up_args`."""

    model_path: str | None = None
    dp_size: int = 1
    #: A PD layout: this many prefill workers and ``decode_dp`` decode workers instead of
    #: ``dp_size`` regular ones (0 and 0: a regular layout).
    prefill_dp: int = 0
    decode_dp: int = 0
    #: Prefill worker j's ``--disaggregation-bootstrap-port`` is this + j.
    bootstrap_base_port: int = DEFAULT_BOOTSTRAP_BASE_PORT
    #: With the router's ``--kv-events``: worker i's KV events ports are this + 2i, + 2i + 1.
    kv_events_base_port: int = DEFAULT_KV_EVENTS_BASE_PORT
    tp_size: int = 1
    base_gpu_id: int = 0
    worker_base_port: int = DEFAULT_WORKER_BASE_PORT
    backend: str = "auto"
    worker_startup_timeout_secs: float = 1800.0
    worker_health_path: str = "/health"
    #: How often the supervisor probes a running worker (0 = only watch the process). Under
    #: ``sglctl up`` these probes are the one source of health: the router follows the table.
    worker_health_interval_secs: float = 1.0
    #: A probe with no answer within this long failed (a hung worker answers nothing).
    #: None: :data:`PROBE_TIMEOUT_SECS` for the backend.
    worker_health_timeout_secs: float | None = None
    #: Consecutive failed probes (a failure is re-probed at once) before a running worker is
    #: marked unhealthy; with the defaults a hung worker leaves routing within about 3 s.
    worker_health_failures: int = 2
    #: A worker unhealthy (but alive) this long is restarted (0 = never).
    worker_unhealthy_restart_secs: float = 300.0
    restart_initial_backoff_secs: float = 1.0
    restart_max_backoff_secs: float = 60.0
    #: A worker that stays healthy this long has its backoff reset to the initial value.
    restart_reset_after_secs: float = 60.0
    #: This many crashes within ``crash_window_secs`` and the worker is declared failed.
    max_worker_crashes: int = 5
    crash_window_secs: float = 300.0
    worker_stop_timeout_secs: float = 30.0
    max_workers: int = 64
    run_dir: Path = field(default_factory=lambda: default_run_dir(30000))
    log_max_bytes: int = 50 * 2**20
    log_backups: int = 3

    # Router settings the supervisor must know too (they stay in router_args as well).
    host: str = "127.0.0.1"
    port: int = 30000
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 29000
    shutdown_grace_period_secs: float = 180.0
    log_level: str = "info"

    router_args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)

    @property
    def is_pd(self) -> bool:
        return self.prefill_dp > 0

    @property
    def n_workers(self) -> int:
        """Workers the plan starts: ``dp_size``, or prefill + decode for a PD layout."""
        return self.prefill_dp + self.decode_dp if self.is_pd else self.dp_size

    @property
    def router_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"


def default_run_dir(port: int) -> Path:
    """``$XDG_STATE_HOME/sglctl/runs/<time>-<port>`` (``~/.local/state`` by default)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "sglctl" / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{port}"


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``sglctl up``'s own flags (router flags are parsed by the router's)."""
    d = UpConfig()
    p = argparse.ArgumentParser(
        prog="sglctl up",
        description="Start one SGLang worker per GPU group, keep them alive, and route to them. "
        "Every flag not listed here is a router flag (see `sglctl router --help`); "
        "arguments after `--` are passed to every worker.",
        usage="sglctl up [--model-path M] [--dp-size N | --prefill-dp P --decode-dp D] "
        "[--tp-size T] [options] [router flags] [-- worker args]",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        # No abbreviations: an abbreviated router flag must reach the router, not match ours.
        allow_abbrev=False,
    )
    g = p.add_argument_group("workers")
    g.add_argument(
        "--model-path",
        default=argparse.SUPPRESS,
        help="model to serve (required for real SGLang; sim workers default to a simulated Llama)",
    )
    g.add_argument(
        "--dp-size",
        type=argtypes.positive_int,
        default=argparse.SUPPRESS,
        help=f"number of (regular) workers (default: {d.dp_size}; not with --prefill-dp)",
    )
    g.add_argument(
        "--tp-size", type=argtypes.positive_int, default=d.tp_size, help="GPUs per worker"
    )
    g.add_argument(
        "--base-gpu-id",
        type=argtypes.non_negative_int,
        default=d.base_gpu_id,
        help="first GPU to use",
    )
    g.add_argument(
        "--worker-base-port",
        type=argtypes.port,
        default=d.worker_base_port,
        help="worker i listens on this + i",
    )
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default=d.backend,
        help="auto: real SGLang when NVML finds GPUs and sglang is importable, else simulated",
    )
    g.add_argument(
        "--worker-startup-timeout-secs",
        type=argtypes.non_negative_float,
        default=d.worker_startup_timeout_secs,
        help="how long a worker may take to answer its health check (real models load for minutes)",
    )
    g.add_argument(
        "--worker-health-path", default=d.worker_health_path, help="worker health endpoint"
    )
    g.add_argument(
        "--max-workers",
        type=argtypes.positive_int,
        default=d.max_workers,
        help="room for add-worker",
    )

    g = p.add_argument_group(
        "prefill/decode disaggregation (PD layout, instead of --dp-size)",
        "P prefill workers get the first GPU groups, D decode workers the next ones; each "
        "prefill worker gets its own bootstrap port, decode workers fetch the KV from it; "
        "the router runs in PD mode. Transfer-backend flags (such as "
        "--disaggregation-transfer-backend mooncake) go after `--` and reach every worker "
        "unchanged.",
    )
    g.add_argument(
        "--prefill-dp",
        type=argtypes.positive_int,
        default=argparse.SUPPRESS,
        metavar="P",
        help="prefill workers, started with --disaggregation-mode prefill "
        "(default: none, a regular layout; needs --decode-dp)",
    )
    g.add_argument(
        "--decode-dp",
        type=argtypes.positive_int,
        default=argparse.SUPPRESS,
        metavar="D",
        help="decode workers, started with --disaggregation-mode decode "
        "(default: none; needs --prefill-dp)",
    )
    g.add_argument(
        "--bootstrap-base-port",
        type=argtypes.port,
        default=d.bootstrap_base_port,
        metavar="PORT",
        help="prefill worker j's --disaggregation-bootstrap-port is this + j "
        "(kept across its restarts)",
    )
    g.add_argument(
        "--kv-events-base-port",
        type=argtypes.port,
        default=d.kv_events_base_port,
        metavar="PORT",
        help="with the router's --kv-events: worker i publishes its KV cache events on this + 2i "
        "and answers replays on this + 2i + 1 (its --kv-events-config, set by sglctl up)",
    )

    g = p.add_argument_group(
        "supervision",
        "The supervisor probes each running worker itself and publishes the result to the "
        "router, which stops routing to (and retries the requests of) an unhealthy worker.",
    )
    g.add_argument(
        "--worker-health-interval-secs",
        type=argtypes.non_negative_float,
        default=d.worker_health_interval_secs,
        help="seconds between the supervisor's probes of a running worker (0: off)",
    )
    g.add_argument(
        "--worker-health-timeout-secs",
        type=argtypes.positive_float,
        default=argparse.SUPPRESS,
        help="a probe not answered within this many seconds failed (default: "
        f"{PROBE_TIMEOUT_SECS['sim']:g} for sim workers, {PROBE_TIMEOUT_SECS['sglang']:g} for "
        "SGLang, whose /health runs a one-token generation and answers after about 1 s)",
    )
    g.add_argument(
        "--worker-health-failures",
        type=argtypes.positive_int,
        default=d.worker_health_failures,
        help="failed probes in a row (a failure is re-probed at once) that mark a worker "
        "unhealthy: out of routing until a probe passes again",
    )
    g.add_argument(
        "--worker-unhealthy-restart-secs",
        type=argtypes.non_negative_float,
        default=d.worker_unhealthy_restart_secs,
        help="restart a worker that is alive but unhealthy this long (0: never)",
    )
    g.add_argument(
        "--restart-initial-backoff-secs",
        type=argtypes.non_negative_float,
        default=d.restart_initial_backoff_secs,
        help="wait before the first restart of a crashed worker (or router); doubles per crash",
    )
    g.add_argument(
        "--restart-max-backoff-secs",
        type=argtypes.non_negative_float,
        default=d.restart_max_backoff_secs,
        help="the longest wait between restarts",
    )
    g.add_argument(
        "--restart-reset-after-secs",
        type=argtypes.non_negative_float,
        default=d.restart_reset_after_secs,
        help="a worker healthy this long starts its backoff again from the initial value",
    )
    g.add_argument(
        "--max-worker-crashes",
        type=argtypes.positive_int,
        default=d.max_worker_crashes,
        help="crashes within --crash-window-secs after which a worker is declared failed "
        "(it stays down; the others keep serving); the same limit ends the run for the router",
    )
    g.add_argument(
        "--crash-window-secs",
        type=argtypes.non_negative_float,
        default=d.crash_window_secs,
        help="the sliding window --max-worker-crashes counts in",
    )
    g.add_argument(
        "--worker-stop-timeout-secs",
        type=argtypes.non_negative_float,
        default=d.worker_stop_timeout_secs,
        help="how long a worker gets to exit after SIGTERM before SIGKILL",
    )
    g.add_argument(
        "--run-dir",
        default=argparse.SUPPRESS,
        help="where logs and the control socket go "
        "(default: ~/.local/state/sglctl/runs/<time>-<port>)",
    )
    g.add_argument(
        "--log-max-bytes", type=argtypes.positive_int, default=d.log_max_bytes, help="per log file"
    )
    g.add_argument(
        "--log-backups",
        type=argtypes.non_negative_int,
        default=d.log_backups,
        help="rotated files kept",
    )

    # Router flags listed here for --help only: they are handed to the router unchanged.
    g = p.add_argument_group(
        "router (the most used; every `sglctl router` flag works here too)",
    )
    for flag, default, what in ROUTER_FLAGS_SHOWN:
        g.add_argument(flag, default=argparse.SUPPRESS, help=f"{what} (default: {default})")
    return p


def split_worker_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split at the first ``--``: (sglctl args, worker args)."""
    args = list(argv)
    if "--" in args:
        cut = args.index("--")
        return args[:cut], args[cut + 1 :]
    return args, []


def parse_up_args(argv: Sequence[str]) -> UpConfig:
    """Parse ``sglctl up``'s arguments; router flags are validated by the router's parser.

    Exits with a usage message (status 2) on a bad flag, like every argparse program.
    """
    own, worker_args = split_worker_args(argv)
    ns, router_args = build_parser().parse_known_args(own)
    # The router flags shown in --help were consumed by our parser: hand them back.
    for flag, _, _ in reversed(ROUTER_FLAGS_SHOWN):
        value = getattr(ns, flag[2:].replace("-", "_"), None)
        if value is not None:
            router_args = [flag, value, *router_args]
    _check_layout(ns, router_args, worker_args)
    pd = hasattr(ns, "prefill_dp")
    # --kv-events feeds cache_aware's tree: asked for, it keeps the router's cache_aware.
    if not (pd or has_flag(router_args, "--policy") or has_flag(router_args, "--kv-events")):
        router_args = ["--policy", UP_DEFAULT_POLICY, *router_args]
    router = _validate_router_args(router_args, pd=pd)
    if router.is_pd and not pd:
        raise UsageError(
            "the router's PD mode (--pd-disaggregation, --mode pd) needs prefill and decode "
            "workers: use --prefill-dp P --decode-dp D instead (sglctl up then runs the "
            "router in PD mode itself)"
        )
    port = int(router.port)
    # Our own flags' dests are UpConfig's field names: copy every one the parser set ...
    own_fields = {f.name for f in fields(UpConfig)} - _FROM_ROUTER - {"run_dir", "max_workers"}
    parsed = {name: getattr(ns, name) for name in own_fields if hasattr(ns, name)}
    config = UpConfig(
        **parsed,
        run_dir=Path(ns.run_dir) if getattr(ns, "run_dir", None) else default_run_dir(port),
        # ... and take the shared router settings from the router's own parse.
        host=str(router.host),
        port=port,
        metrics_host=str(router.metrics_host),
        metrics_port=int(router.metrics_port),
        shutdown_grace_period_secs=float(router.shutdown_grace_period_secs),
        log_level=str(router.log_level),
        router_args=list(router_args),
        worker_args=worker_args,
    )
    config.max_workers = max(ns.max_workers, config.n_workers)
    return config


#: UpConfig fields that come from the router's parser (or the split), never from ours.
_FROM_ROUTER = frozenset(
    {
        "host",
        "port",
        "metrics_host",
        "metrics_port",
        "shutdown_grace_period_secs",
        "log_level",
        "router_args",
        "worker_args",
    }
)


def _check_layout(
    ns: argparse.Namespace, router_args: Sequence[str], worker_args: Sequence[str]
) -> None:
    """Refuse flag combinations that contradict the plan, each with the fix."""
    pd = hasattr(ns, "prefill_dp") or hasattr(ns, "decode_dp")
    if pd and hasattr(ns, "dp_size"):
        raise UsageError(
            "--dp-size is for a regular layout, --prefill-dp/--decode-dp for a PD layout: "
            "give one or the other (the PD layout starts --prefill-dp + --decode-dp workers)"
        )
    if pd and not (hasattr(ns, "prefill_dp") and hasattr(ns, "decode_dp")):
        given, missing = (
            ("--prefill-dp", "--decode-dp") if hasattr(ns, "prefill_dp") else
            ("--decode-dp", "--prefill-dp")
        )  # fmt: skip
        raise UsageError(
            f"{given} needs {missing} too: a PD layout has both pools "
            "(e.g. --prefill-dp 1 --decode-dp 2)"
        )
    for flag in PLANNED_ROUTER_FLAGS:
        if has_flag(router_args, flag):
            raise UsageError(
                f"sglctl up starts its own workers; drop {flag} (or run `sglctl router "
                f"{flag} ...` for workers started elsewhere)"
            )
    for flag in PLANNED_WORKER_FLAGS:
        if flag == "--kv-events-config" and has_flag(worker_args, flag):
            raise UsageError(
                "--kv-events-config after `--` would give every worker the same ports; pass "
                "the router's --kv-events instead: sglctl up then gives worker i its own "
                "(--kv-events-base-port + 2i, + 2i + 1)"
            )
        if has_flag(worker_args, flag):
            raise UsageError(
                f"{flag} after `--` would give every worker the same value; sglctl up sets it "
                "per worker: drop it and use --prefill-dp P --decode-dp D "
                "(and --bootstrap-base-port for the bootstrap ports)"
            )


def has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _validate_router_args(router_args: list[str], pd: bool = False) -> RouterConfig:
    """Run the router's own parser over the flags we pass it (exits on a bad one).

    ``pd``: the router will run with ``--pd-disaggregation`` (its PD flags then apply).
    Imported lazily: the router's config module is the one piece of the router the
    supervisor may import (the reverse is not allowed).
    """
    from sglctl.router import flags as router_flags

    pd_flag = ["--pd-disaggregation"] if pd else []
    cfg = router_flags.parse_args(
        [*router_args, *pd_flag, "--state-table", "check"], prog="sglctl up"
    )
    if cfg.unsupported:
        raise UsageError("; ".join(reason for _, reason in cfg.unsupported))
    return cfg
