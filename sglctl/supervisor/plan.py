"""Turn ``sglctl up``'s flags and the detected GPUs into a list of worker specs.

Planning is pure (no processes, no sockets except the port check), so every rule is unit
tested with a fake NVML: which backend runs, which GPUs each worker gets, which port it
listens on, and the exact command line and environment it is started with.

GPU assignment follows SGLang's own ``--base-gpu-id`` convention: worker ``i`` gets the
``tp_size`` GPUs starting at ``base_gpu_id + i * tp_size``, counted in the list of GPUs
sglctl may use (all NVML indices, or those ``CUDA_VISIBLE_DEVICES`` names), and is told so
with ``CUDA_VISIBLE_DEVICES`` -- the worker itself then sees GPUs ``0..tp_size-1``.

A PD layout (``--prefill-dp P --decode-dp D``) is the same plan over ``P + D`` workers, the
P prefill workers first: they get the first GPU groups and ports, then the decode workers.
Each worker is told its role (``--disaggregation-mode prefill|decode``, the flag SGLang and
the sim share) and each prefill worker its own ``--disaggregation-bootstrap-port``
(``--bootstrap-base-port + j``), the port decode workers fetch its KV from. A spec is fixed
for the worker's life, so a restarted prefill comes back on the same bootstrap port: the
router and in-flight decode requests keep pointing at the right place.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sglctl.gpus import GpuReport
from sglctl.net import port_is_free
from sglctl.supervisor.config import UpConfig, has_flag

WORKER_HOST = "127.0.0.1"


class PlanError(ValueError):
    """The requested plan cannot run here; the message says what to change."""


@dataclass(frozen=True)
class WorkerSpec:
    """How to start one worker: its command, environment additions, port and GPUs."""

    worker_id: int
    port: int
    argv: tuple[str, ...]
    gpu_ids: tuple[int, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    #: "regular", "prefill" or "decode" (``sglctl.state_table.ROLES``).
    role: str = "regular"
    #: A prefill worker's bootstrap port; None for the other roles.
    bootstrap_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{WORKER_HOST}:{self.port}"

    @property
    def gpus_label(self) -> str:
        return ",".join(map(str, self.gpu_ids))


@dataclass
class Plan:
    """The backend chosen (and why) and one spec per worker."""

    backend: str
    backend_reason: str
    model: str
    workers: list[WorkerSpec]


def sglang_importable() -> bool:
    """True when ``import sglang`` would work (checked without importing it: that is slow)."""
    return importlib.util.find_spec("sglang") is not None


def sim_default_model() -> str:
    """The sim worker's default model name (its config module is light to import)."""
    from sglctl.sim.config import DEFAULT_MODEL_PATH

    return DEFAULT_MODEL_PATH


def choose_backend(requested: str, gpus: GpuReport, has_sglang: bool) -> tuple[str, str]:
    """Resolve ``--backend`` to ``sglang`` or ``sim``, with the one line that explains it."""
    if requested == "sim":
        return "sim", "running simulated SGLang workers (--backend sim)"
    if requested == "sglang":
        if gpus.problem:
            raise PlanError(
                f"--backend sglang needs GPUs, but {gpus.problem}; use --backend sim to try without"
            )
        if not has_sglang:
            raise PlanError(
                "--backend sglang needs the sglang package in this Python environment "
                f"({sys.executable}); install it (pip install 'sglang[all]') or use --backend sim"
            )
        return "sglang", f"running SGLang workers on {len(gpus.gpus)} detected GPU(s)"
    if requested != "auto":
        raise PlanError(f"unknown backend {requested!r}; choose auto, sglang or sim")
    if gpus.problem:
        return "sim", f"{gpus.problem}: running simulated SGLang workers instead (--backend sim)"
    if not has_sglang:
        return "sim", (
            f"{len(gpus.gpus)} GPU(s) found but sglang is not installed: running simulated SGLang "
            "workers instead (pip install 'sglang[all]' for real ones)"
        )
    return "sglang", f"running SGLang workers on {len(gpus.gpus)} detected GPU(s)"


def assign_gpus(
    available: Sequence[int],
    dp_size: int,
    tp_size: int,
    base_gpu_id: int,
    *,
    pd: tuple[int, int] | None = None,
) -> list[tuple[int, ...]]:
    """GPU ids for each worker: ``available[base + i*tp : base + (i+1)*tp]``.

    ``pd``: (prefill, decode) counts when the ``dp_size`` workers are a PD layout (prefill
    first), so that a plan that does not fit names the flags the user gave.
    """
    needed = base_gpu_id + dp_size * tp_size
    if needed > len(available):
        have = len(available)
        listing = ",".join(map(str, available)) if available else "none"
        fit = max(0, (have - base_gpu_id) // tp_size)
        if pd is None:
            asked = f"--dp-size {dp_size}"
            hint = f"lower --dp-size to {fit}" if fit else "lower --tp-size or --base-gpu-id"
        else:
            prefill, decode = pd
            asked = f"--prefill-dp {prefill} + --decode-dp {decode}"
            if fit > prefill:
                hint = f"lower --decode-dp to {fit - prefill}"
            elif fit >= 2:
                hint = f"at most {fit} workers fit: e.g. --prefill-dp 1 --decode-dp {fit - 1}"
            else:
                hint = "a PD layout needs room for 2 workers: lower --tp-size or --base-gpu-id"
        raise PlanError(
            f"{asked} x --tp-size {tp_size} from --base-gpu-id {base_gpu_id} needs "
            f"{needed} GPUs, but {have} are available ({listing}): {hint}, or use --backend sim"
        )
    return [
        tuple(available[base_gpu_id + i * tp_size : base_gpu_id + (i + 1) * tp_size])
        for i in range(dp_size)
    ]


def role_flags(role: str, bootstrap_port: int | None = None) -> tuple[str, ...]:
    """The PD flags of a worker in ``role`` (none for a regular one); SGLang's names, which
    the sim accepts too. Only prefill workers run a bootstrap server, so only they get a port."""
    if role == "regular":
        return ()
    if role == "decode":
        return ("--disaggregation-mode", "decode")
    if role == "prefill":
        if bootstrap_port is None:
            raise PlanError("a prefill worker needs a bootstrap port")
        return ("--disaggregation-mode", "prefill",
                "--disaggregation-bootstrap-port", str(bootstrap_port))  # fmt: skip
    raise PlanError(f"unknown worker role {role!r}; choose prefill or decode")


#: The page size ``sglctl up`` gives workers that publish KV events, unless ``--page-size``
#: follows ``--``: SGLang sends one event per page, and with its default of 1 a 30k-token
#: prompt would be 30k events for every router to decode.
KV_EVENTS_PAGE_SIZE = 64


def kv_events_flags(
    port: int, worker_args: Sequence[str], host: str = "127.0.0.1"
) -> tuple[str, ...]:
    """SGLang's ``--kv-events-config`` for a worker publishing on ``port`` (replays on
    ``port + 1``), and ``--page-size`` unless the user gave one. The router finds the ports in
    the worker's ``/get_server_info``, so nothing else needs to know them."""
    config = json.dumps(
        {
            "publisher": "zmq",
            "endpoint": f"tcp://{host}:{port}",
            "replay_endpoint": f"tcp://{host}:{port + 1}",
        },
        separators=(",", ":"),
    )
    page = () if has_flag(worker_args, "--page-size") else ("--page-size", str(KV_EVENTS_PAGE_SIZE))
    return ("--kv-events-config", config, *page)


def kv_events_ports(config: UpConfig, n_workers: int) -> list[int]:
    """Worker i's KV events publisher port (its replay port is the next one); none without
    the router's ``--kv-events``."""
    if not has_flag(config.router_args, "--kv-events"):
        return []
    return [config.kv_events_base_port + 2 * i for i in range(n_workers)]


def worker_command(
    backend: str,
    model: str,
    port: int,
    tp_size: int,
    extra: Sequence[str] = (),
    python: str = sys.executable,
    role: str = "regular",
    bootstrap_port: int | None = None,
) -> tuple[str, ...]:
    """The exact argv of one worker (CONTRACT.md section 1); the PD flags come before the
    user's ``extra``, which are passed unchanged (transfer backend, IB device ...)."""
    common = ("--model-path", model, "--host", WORKER_HOST, "--port", str(port))
    pd = role_flags(role, bootstrap_port)
    if backend == "sglang":
        return (python, "-m", "sglang.launch_server", *common, "--tp-size", str(tp_size), *pd,
                *extra)  # fmt: skip
    if backend == "sim":
        return (python, "-m", "sglctl", "sim-worker", "--host", WORKER_HOST, "--port", str(port),
                "--model-path", model, *pd, *extra)  # fmt: skip
    raise PlanError(f"unknown backend {backend!r}")


def make_worker_spec(
    worker_id: int,
    backend: str,
    model: str,
    port: int,
    gpu_ids: Sequence[int],
    tp_size: int,
    extra: Sequence[str],
    role: str = "regular",
    bootstrap_port: int | None = None,
) -> WorkerSpec:
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpu_ids))} if backend == "sglang" else {}
    return WorkerSpec(
        worker_id=worker_id,
        port=port,
        argv=worker_command(
            backend, model, port, tp_size, extra, role=role, bootstrap_port=bootstrap_port
        ),
        gpu_ids=tuple(gpu_ids),
        env=env,
        role=role,
        bootstrap_port=bootstrap_port,
    )


def plan_roles(config: UpConfig) -> list[tuple[str, int | None]]:
    """(role, bootstrap port) of each planned worker, in worker-id order: prefill first."""
    if not config.is_pd:
        return [("regular", None)] * config.dp_size
    prefill = [("prefill", config.bootstrap_base_port + j) for j in range(config.prefill_dp)]
    decode: list[tuple[str, int | None]] = [("decode", None)] * config.decode_dp
    return [*prefill, *decode]


def make_plan(config: UpConfig, gpus: GpuReport, has_sglang: bool) -> Plan:
    """The whole plan; raises :class:`PlanError` with a fix when it cannot run here."""
    backend, reason = choose_backend(config.backend, gpus, has_sglang)
    if backend == "sglang" and not config.model_path:
        raise PlanError("real SGLang workers need --model-path (a Hugging Face id or a local path)")
    model = config.model_path or sim_default_model()
    n = config.n_workers
    if config.worker_base_port + n - 1 > 65535:
        raise PlanError(
            f"--worker-base-port {config.worker_base_port} leaves no room for {n} workers: lower it"
        )
    if config.is_pd and config.bootstrap_base_port + config.prefill_dp - 1 > 65535:
        raise PlanError(
            f"--bootstrap-base-port {config.bootstrap_base_port} leaves no room for "
            f"{config.prefill_dp} prefill workers: lower it"
        )
    if backend == "sglang":
        pd = (config.prefill_dp, config.decode_dp) if config.is_pd else None
        groups = assign_gpus(
            [g.index for g in gpus.gpus], n, config.tp_size, config.base_gpu_id, pd=pd
        )
    else:
        groups = [() for _ in range(n)]
    events = kv_events_ports(config, n)
    if events and events[-1] + 1 > 65535:
        raise PlanError(
            f"--kv-events-base-port {config.kv_events_base_port} leaves no room for {n} "
            "workers' KV events ports: lower it"
        )
    workers = [
        make_worker_spec(
            i,
            backend,
            model,
            config.worker_base_port + i,
            groups[i],
            config.tp_size,
            [*kv_events_flags(events[i], config.worker_args, WORKER_HOST), *config.worker_args]
            if events
            else config.worker_args,
            role=role,
            bootstrap_port=bootstrap_port,
        )
        for i, (role, bootstrap_port) in enumerate(plan_roles(config))
    ]
    return Plan(backend=backend, backend_reason=reason, model=model, workers=workers)


PortCheck = Callable[[str, int], bool]


def port_conflicts(config: UpConfig, plan: Plan, is_free: PortCheck = port_is_free) -> list[str]:
    """Every port problem of the plan, one line each with the flag (and a value) that fixes it.

    All of them at once: a second ``sglctl up`` on a busy machine collides on the router,
    metrics and worker ports together, and learning them one attempt at a time is three
    failed starts for what one message can say.
    """
    wanted: list[tuple[str, int, str, str]] = [
        (config.host, config.port, "the router", "--port"),
        (config.metrics_host, config.metrics_port, "the router's metrics", "--metrics-port"),
    ]
    wanted += [
        (WORKER_HOST, w.port, f"worker {w.worker_id}", "--worker-base-port") for w in plan.workers
    ]
    wanted += [
        (WORKER_HOST, w.bootstrap_port, f"worker {w.worker_id}'s bootstrap server",
         "--bootstrap-base-port")
        for w in plan.workers
        if w.bootstrap_port is not None
    ]  # fmt: skip
    events = kv_events_ports(config, len(plan.workers))
    wanted += [
        (WORKER_HOST, port + k, f"worker {i}'s KV events {what}", "--kv-events-base-port")
        for i, port in enumerate(events)
        for k, what in ((0, "publisher"), (1, "replay server"))
    ]
    blocks = {
        "--worker-base-port": (config.worker_base_port, len(plan.workers)),
        "--kv-events-base-port": (config.kv_events_base_port, 2 * len(events)),
        "--bootstrap-base-port": (
            config.bootstrap_base_port,
            sum(w.bootstrap_port is not None for w in plan.workers),
        ),
    }
    problems: list[str] = []
    seen: dict[int, str] = {}
    flagged: set[str] = set()
    for host, port, what, flag in wanted:
        if port in seen:
            problems.append(f"port {port} is wanted by both {seen[port]} and {what}: change {flag}")
            continue
        seen[port] = what
        if is_free(host, port):
            continue
        if flag in flagged:  # one suggestion per flag: the worker block moves as a whole
            problems.append(f"port {port} ({what}) is already in use on {host}")
            continue
        flagged.add(flag)
        if flag in blocks:
            suggestion = suggest_port(*blocks[flag], is_free)
        else:
            suggestion = suggest_port(port, 1, is_free)
        problems.append(
            f"port {port} ({what}) is already in use on {host}: pass {flag} {suggestion}"
        )
    return problems


def check_ports(config: UpConfig, plan: Plan, is_free: PortCheck = port_is_free) -> None:
    """Refuse to start when a port we need is taken, naming every conflict and its flag."""
    problems = port_conflicts(config, plan, is_free)
    if len(problems) == 1:
        raise PlanError(f"{problems[0]} (or stop what uses it)")
    if problems:
        raise PlanError(
            f"{len(problems)} port problems (stop what uses them, or move sglctl's ports):\n"
            + "\n".join(f"  - {line}" for line in problems)
        )


def suggest_port(start: int, count: int, is_free: PortCheck = port_is_free) -> int:
    """The first port above ``start`` that begins ``count`` consecutive free ports."""
    candidate = start + 100
    while candidate + count <= 65535:
        if all(is_free(WORKER_HOST, candidate + k) for k in range(count)):
            return candidate
        candidate += 100
    return start


@dataclass
class WorkerFactory:
    """Builds specs for workers added at run time (``sglctl add-worker --local``).

    A new worker takes the first ``tp_size`` GPUs of the pool that no live worker holds and
    the first free port above every port in use; a new prefill worker also the first free
    bootstrap port from ``bootstrap_base_port`` up. In a PD layout every new worker needs a
    role (prefill or decode); a regular layout only takes regular workers, since its router
    does not run in PD mode.
    """

    backend: str
    model: str
    tp_size: int
    gpu_pool: list[int]
    extra: list[str]
    is_free: PortCheck = port_is_free
    pd: bool = False
    bootstrap_base_port: int = 8998

    def check_role(self, role: str | None) -> str:
        """The role a new worker gets; PlanError (saying what to pass) when it cannot."""
        if self.pd:
            if role not in ("prefill", "decode"):
                raise PlanError(
                    "this sglctl up runs a PD layout: say which pool the new worker joins "
                    "with --role prefill or --role decode"
                )
            return role
        if role not in (None, "regular"):
            raise PlanError(
                f"--role {role} needs a PD layout (sglctl up --prefill-dp P --decode-dp D); "
                "this run's router serves regular workers: drop --role"
            )
        return "regular"

    def make(
        self,
        worker_id: int,
        used_ports: set[int],
        used_gpus: set[int],
        base_port: int,
        role: str | None = None,
        used_bootstrap_ports: set[int] | None = None,
    ) -> WorkerSpec:
        role = self.check_role(role)
        taken_bootstrap = used_bootstrap_ports or set()
        gpu_ids: tuple[int, ...] = ()
        if self.backend == "sglang":
            free = [g for g in self.gpu_pool if g not in used_gpus]
            if len(free) < self.tp_size:
                listing = ",".join(map(str, free)) or "none"
                raise PlanError(
                    f"no free GPU for another worker: it needs {self.tp_size}, "
                    f"{len(free)} of {len(self.gpu_pool)} are free ({listing})"
                )
            gpu_ids = tuple(free[: self.tp_size])
        port = self._free_port(max([base_port - 1, *used_ports]) + 1, used_ports | taken_bootstrap)
        if port is None:
            raise PlanError("no free port left for another worker")
        bootstrap_port = None
        if role == "prefill":
            bootstrap_port = self._free_port(
                self.bootstrap_base_port, used_ports | taken_bootstrap | {port}
            )
            if bootstrap_port is None:
                raise PlanError(
                    f"no free bootstrap port from --bootstrap-base-port {self.bootstrap_base_port}"
                )
        return make_worker_spec(
            worker_id,
            self.backend,
            self.model,
            port,
            gpu_ids,
            self.tp_size,
            self.extra,
            role=role,
            bootstrap_port=bootstrap_port,
        )

    def _free_port(self, start: int, taken: set[int]) -> int | None:
        """The first port from ``start`` up that no worker uses and nothing listens on."""
        port = start
        while port <= 65535 and (port in taken or not self.is_free(WORKER_HOST, port)):
            port += 1
        return port if port <= 65535 else None
