"""GPU detection through NVML, with a fake NVML module at the boundary."""

from __future__ import annotations

from fakes.fake_nvml import FakeGpu, FakeNvml, h100s
from typer.testing import CliRunner

from sglctl.gpus import NvmlSession, detect_gpus, visible_devices


def test_detects_every_gpu_with_memory_and_utilisation() -> None:
    nvml = FakeNvml(
        [FakeGpu("NVIDIA A100-SXM4-40GB", 40, used_gib=2, utilization=37), ("NVIDIA A100", 40)]
    )
    report = detect_gpus(nvml, env={})
    assert report.problem is None
    assert [g.index for g in report.gpus] == [0, 1]
    first = report.gpus[0]
    assert first.name == "NVIDIA A100-SXM4-40GB"  # bytes from old pynvml decoded
    assert first.memory_total_mib == 40 * 1024 and first.memory_used_mib == 2 * 1024
    assert first.utilization == 37
    assert first.uuid == "GPU-fake-0000"
    assert nvml.inits == nvml.shutdowns == 1


def test_missing_driver_is_one_clear_line() -> None:
    report = detect_gpus(FakeNvml(init_error="NVML Shared Library Not Found"), env={})
    assert report.gpus == []
    assert report.problem == "NVML found no usable GPU driver (NVML Shared Library Not Found)"


def test_zero_gpus_and_broken_gpu() -> None:
    assert detect_gpus(FakeNvml([]), env={}).problem == "NVML is working but reports no GPU"
    report = detect_gpus(FakeNvml([("A", 1), ("B", 1), ("C", 1)], broken_index=1), env={})
    assert [g.name for g in report.gpus] == ["A", "C"]


def test_unsupported_utilisation_is_none_not_an_error() -> None:
    report = detect_gpus(FakeNvml([FakeGpu("T4", 16, utilization=None)]), env={})
    assert report.gpus[0].utilization is None


def test_cuda_visible_devices_narrows_and_orders() -> None:
    report = detect_gpus(h100s(8), env={"CUDA_VISIBLE_DEVICES": "6,2"})
    assert [g.index for g in report.gpus] == [6, 2]
    assert detect_gpus(h100s(2), env={"CUDA_VISIBLE_DEVICES": "5"}).problem is not None
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "GPU-abc"}) is None
    assert visible_devices({}) is None


def test_session_reports_problem_instead_of_raising() -> None:
    with NvmlSession(FakeNvml(init_error="boom")) as session:
        assert session.problem is not None
        assert session.snapshot().gpus == []


def test_real_pynvml_on_this_machine_does_not_crash() -> None:
    # This machine has no GPU: whatever the driver says, we get a report, not an exception.
    report = detect_gpus()
    assert report.gpus or report.problem


def test_gpus_command_says_why_there_is_nothing() -> None:
    from sglctl.cli import app

    result = CliRunner().invoke(app, ["gpus"])
    assert result.exit_code == 0, result.output
    assert "NVML" in result.output
    assert len(result.output.strip().splitlines()) == 1
