"""What NVML sees: GPU index, name, memory and utilisation -- or why it sees nothing.

``sglctl up`` plans workers over this list, ``sglctl gpus`` prints it and ``sglctl status``
samples it every frame. NVML (``pynvml``, from the nvidia-ml-py package) is the only thing
touched, and only through :class:`NvmlSession`, so tests can hand in a fake module with the
same few functions (``tests/fakes/fake_nvml.py``).

Indices are NVML's, i.e. physical ones -- the numbers ``CUDA_VISIBLE_DEVICES`` takes. When
sglctl itself runs with ``CUDA_VISIBLE_DEVICES`` set, only those GPUs are offered to the plan
(in that order), so a user can fence sglctl off part of a node the usual way.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import asdict, dataclass, field
from types import ModuleType, TracebackType
from typing import Any

log = logging.getLogger(__name__)

MIB = 1024 * 1024

#: ``pynvml`` or anything with the same few functions (the tests' fake).
NvmlModule = Any


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it. Utilisation is None when the driver does not say."""

    index: int
    name: str
    memory_total: int
    memory_used: int
    utilization: int | None = None
    uuid: str = ""

    @property
    def memory_total_mib(self) -> int:
        return self.memory_total // MIB

    @property
    def memory_used_mib(self) -> int:
        return self.memory_used // MIB

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "memory_total_mib": self.memory_total_mib,
            "memory_used_mib": self.memory_used_mib,
        }


@dataclass
class GpuReport:
    """The GPUs found, or -- when there are none -- one line saying why."""

    gpus: list[GpuInfo] = field(default_factory=list)
    problem: str | None = None

    def by_index(self) -> dict[int, GpuInfo]:
        return {gpu.index: gpu for gpu in self.gpus}


def load_nvml() -> ModuleType | None:
    """Import pynvml, or None when nvidia-ml-py is not installed."""
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


def _text(value: object) -> str:
    # Old pynvml returns bytes, new returns str.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlSession:
    """An initialised NVML library; open once, :meth:`snapshot` as often as needed.

    ``problem`` is set (and ``snapshot`` returns nothing) when NVML cannot be used, so
    callers never need their own try/except around the driver.
    """

    def __init__(self, nvml: NvmlModule | None = None) -> None:
        self._nvml = nvml if nvml is not None else load_nvml()
        self._open = False
        self.problem: str | None = None
        if self._nvml is None:
            self.problem = "NVML is not available (the nvidia-ml-py package is not installed)"
            return
        try:
            self._nvml.nvmlInit()
        except Exception as exc:  # NVMLError subclasses; the module's own class varies
            self.problem = f"NVML found no usable GPU driver ({_describe(exc)})"
            return
        self._open = True

    def __enter__(self) -> NvmlSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._open and self._nvml is not None:
            self._open = False
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                log.debug("nvmlShutdown failed: %s", exc)

    def snapshot(self) -> GpuReport:
        """Every GPU NVML sees right now (memory and utilisation are current values)."""
        if not self._open or self._nvml is None:
            return GpuReport(problem=self.problem)
        nvml = self._nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            return GpuReport(problem=f"NVML could not count GPUs ({_describe(exc)})")
        gpus = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = _text(nvml.nvmlDeviceGetName(handle))
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:
                log.warning("NVML could not read GPU %d, leaving it out: %s", index, _describe(exc))
                continue
            gpus.append(
                GpuInfo(
                    index=index,
                    name=name,
                    memory_total=int(memory.total),
                    memory_used=int(memory.used),
                    utilization=_utilization(nvml, handle),
                    uuid=_uuid(nvml, handle),
                )
            )
        if not gpus:
            return GpuReport(problem="NVML is working but reports no GPU")
        return GpuReport(gpus=gpus)


def _utilization(nvml: NvmlModule, handle: object) -> int | None:
    try:
        return int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:  # not supported on some boards (and in MIG mode)
        return None


def _uuid(nvml: NvmlModule, handle: object) -> str:
    try:
        return _text(nvml.nvmlDeviceGetUUID(handle))
    except Exception:
        return ""


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__


def visible_devices(env: dict[str, str] | None = None) -> list[int] | None:
    """The GPU indices ``CUDA_VISIBLE_DEVICES`` restricts sglctl to, or None when unset.

    UUID or MIG entries cannot be mapped to NVML indices here; they are ignored with a
    warning (then every GPU NVML sees is offered).
    """
    value = (env if env is not None else os.environ).get("CUDA_VISIBLE_DEVICES")
    if value is None or value.strip() == "":
        return None if value is None else []
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        log.warning(
            "CUDA_VISIBLE_DEVICES=%r is not a list of indices; ignoring it for planning", value
        )
        return None


def detect_gpus(nvml: NvmlModule | None = None, env: dict[str, str] | None = None) -> GpuReport:
    """The GPUs sglctl may use: what NVML sees, narrowed by ``CUDA_VISIBLE_DEVICES``."""
    with NvmlSession(nvml) as session:
        report = session.snapshot()
    visible = visible_devices(env)
    if visible is None or report.problem:
        return report
    found = report.by_index()
    kept = [found[i] for i in visible if i in found]
    if not kept:
        return GpuReport(
            problem=f"CUDA_VISIBLE_DEVICES={','.join(map(str, visible))} hides every GPU"
        )
    return GpuReport(gpus=kept)


def render_report(report: GpuReport, as_json: bool = False) -> None:
    """Print what ``sglctl gpus`` shows: a table, the one-line reason, or JSON."""
    import json

    from rich.console import Console
    from rich.table import Table

    console = Console()
    if as_json:
        payload = {"gpus": [g.to_json() for g in report.gpus], "problem": report.problem}
        console.print_json(json.dumps(payload))
        return
    if report.problem:
        console.print(f"No GPU: {report.problem}.", highlight=False)
        return
    table = Table(title=f"{len(report.gpus)} GPU(s) visible to NVML", title_justify="left")
    for column, justify in (("index", "right"), ("name", "left"), ("memory used / total", "right"),
                            ("util", "right"), ("uuid", "left")):  # fmt: skip
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for gpu in report.gpus:
        util = "n/a" if gpu.utilization is None else f"{gpu.utilization}%"
        memory = f"{gpu.memory_used_mib:,} / {gpu.memory_total_mib:,} MiB"
        table.add_row(str(gpu.index), gpu.name, memory, util, gpu.uuid)
    console.print(table)
