"""Turn ``sglctl up``'s flags and the detected GPUs into a list of worker specs.

Planning is pure (no processes, no sockets except the port check), so every rule is unit
tested with a fake NVML: which backend runs, which GPUs each worker gets, which port it
listens on, and the exact command line and environment it is started with.

GPU assignment follows SGLang's own ``--base-gpu-id`` convention: worker ``i`` gets the
``tp_size`` GPUs starting at ``base_gpu_id + i * tp_size``, counted in the list of GPUs
sglctl may use (all NVML indices, or those ``CUDA_VISIBLE_DEVICES`` names), and is told so
with ``CUDA_VISIBLE_DEVICES`` -- the worker itself then sees GPUs ``0..tp_size-1``.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sglctl.gpus import GpuReport
from sglctl.net import port_is_free
from sglctl.supervisor.config import UpConfig

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
    available: Sequence[int], dp_size: int, tp_size: int, base_gpu_id: int
) -> list[tuple[int, ...]]:
    """GPU ids for each worker: ``available[base + i*tp : base + (i+1)*tp]``."""
    needed = base_gpu_id + dp_size * tp_size
    if needed > len(available):
        have = len(available)
        listing = ",".join(map(str, available)) if available else "none"
        fit = max(0, (have - base_gpu_id) // tp_size)
        hint = f"lower --dp-size to {fit}" if fit else "lower --tp-size or --base-gpu-id"
        raise PlanError(
            f"--dp-size {dp_size} x --tp-size {tp_size} from --base-gpu-id {base_gpu_id} needs "
            f"{needed} GPUs, but {have} are available ({listing}): {hint}, or use --backend sim"
        )
    return [
        tuple(available[base_gpu_id + i * tp_size : base_gpu_id + (i + 1) * tp_size])
        for i in range(dp_size)
    ]


def worker_command(
    backend: str,
    model: str,
    port: int,
    tp_size: int,
    extra: Sequence[str] = (),
    python: str = sys.executable,
) -> tuple[str, ...]:
    """The exact argv of one worker (CONTRACT.md section 1)."""
    common = ("--model-path", model, "--host", WORKER_HOST, "--port", str(port))
    if backend == "sglang":
        return (python, "-m", "sglang.launch_server", *common, "--tp-size", str(tp_size), *extra)
    if backend == "sim":
        return (python, "-m", "sglctl", "sim-worker", "--host", WORKER_HOST, "--port", str(port),
                "--model-path", model, *extra)  # fmt: skip
    raise PlanError(f"unknown backend {backend!r}")


def make_worker_spec(
    worker_id: int,
    backend: str,
    model: str,
    port: int,
    gpu_ids: Sequence[int],
    tp_size: int,
    extra: Sequence[str],
) -> WorkerSpec:
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpu_ids))} if backend == "sglang" else {}
    return WorkerSpec(
        worker_id=worker_id,
        port=port,
        argv=worker_command(backend, model, port, tp_size, extra),
        gpu_ids=tuple(gpu_ids),
        env=env,
    )


def make_plan(config: UpConfig, gpus: GpuReport, has_sglang: bool) -> Plan:
    """The whole plan; raises :class:`PlanError` with a fix when it cannot run here."""
    backend, reason = choose_backend(config.backend, gpus, has_sglang)
    if backend == "sglang" and not config.model_path:
        raise PlanError("real SGLang workers need --model-path (a Hugging Face id or a local path)")
    model = config.model_path or sim_default_model()
    if config.worker_base_port + config.dp_size - 1 > 65535:
        raise PlanError(
            f"--worker-base-port {config.worker_base_port} leaves no room for "
            f"{config.dp_size} workers: lower it"
        )
    if backend == "sglang":
        groups = assign_gpus(
            [g.index for g in gpus.gpus], config.dp_size, config.tp_size, config.base_gpu_id
        )
    else:
        groups = [() for _ in range(config.dp_size)]
    workers = [
        make_worker_spec(
            i,
            backend,
            model,
            config.worker_base_port + i,
            groups[i],
            config.tp_size,
            config.worker_args,
        )
        for i in range(config.dp_size)
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
        if flag == "--worker-base-port":
            suggestion = suggest_port(config.worker_base_port, len(plan.workers), is_free)
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
    the first free port above every port in use.
    """

    backend: str
    model: str
    tp_size: int
    gpu_pool: list[int]
    extra: list[str]
    is_free: PortCheck = port_is_free

    def make(
        self, worker_id: int, used_ports: set[int], used_gpus: set[int], base_port: int
    ) -> WorkerSpec:
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
        port = max([base_port - 1, *used_ports]) + 1
        while port <= 65535 and (port in used_ports or not self.is_free(WORKER_HOST, port)):
            port += 1
        if port > 65535:
            raise PlanError("no free port left for another worker")
        return make_worker_spec(
            worker_id, self.backend, self.model, port, gpu_ids, self.tp_size, self.extra
        )
