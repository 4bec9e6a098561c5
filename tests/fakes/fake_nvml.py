"""A stand-in for ``pynvml`` with the few functions sglctl calls, for GPU-less tests.

``FakeNvml([("NVIDIA H100 80GB HBM3", 80), ...])`` behaves like a node with those GPUs;
``FakeNvml(init_error="...")`` like a machine without a driver. It is a module-like object:
pass it wherever sglctl accepts an ``nvml`` module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

GIB = 1024**3


class NVMLError(Exception):
    """Mirrors ``pynvml.NVMLError``."""


class NVMLError_LibraryNotFound(NVMLError):
    pass


@dataclass
class FakeGpu:
    name: str
    memory_gib: int
    used_gib: float = 0.5
    utilization: int | None = 0


class FakeNvml:
    """Module-like fake of pynvml. Counts init/shutdown calls so leaks show up in tests."""

    NVMLError = NVMLError

    def __init__(
        self,
        gpus: Sequence[tuple[str, int] | FakeGpu] = (),
        init_error: str | None = None,
        broken_index: int | None = None,
    ) -> None:
        self.gpus = [g if isinstance(g, FakeGpu) else FakeGpu(*g) for g in gpus]
        self.init_error = init_error
        self.broken_index = broken_index
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error:
            raise NVMLError_LibraryNotFound(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index == self.broken_index:
            raise NVMLError("GPU is lost")
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self.gpus[handle].name.encode()

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        gpu = self.gpus[handle]
        total = gpu.memory_gib * GIB
        used = int(gpu.used_gib * GIB)
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        util = self.gpus[handle].utilization
        if util is None:
            raise NVMLError("Not Supported")
        return SimpleNamespace(gpu=util, memory=0)

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-fake-{handle:04d}"


def h100s(count: int) -> FakeNvml:
    """A node with ``count`` 80 GB H100s."""
    return FakeNvml([("NVIDIA H100 80GB HBM3", 80)] * count)
