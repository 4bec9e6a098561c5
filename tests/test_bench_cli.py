"""``sglctl bench`` as a newcomer meets it: readable help, how long the default run takes and
how to shorten it, and a progress bar with the time left."""

from __future__ import annotations

import asyncio
import io

import httpx
from rich.console import Console
from typer.testing import CliRunner

from sglctl.bench.estimate import estimate_seconds, human_duration, notice
from sglctl.bench.runner import RunConfig, run_workload
from sglctl.bench.workloads import SharedPrefixConfig, build_workload, shared_prefix_workload
from sglctl.cli import app
from tests.test_bench_runner import FakeRouter


def test_plot_help_names_the_extra_to_install() -> None:
    # Rich markup used to swallow "[plot]", leaving "needs sglctl)".
    result = CliRunner().invoke(
        app, ["bench", "--help"], env={"COLUMNS": "200"}, terminal_width=200
    )
    assert result.exit_code == 0, result.output
    assert "needs sglctl[plot]" in result.output


def test_the_default_run_is_announced_with_its_length_and_the_flags_to_shorten_it() -> None:
    work = build_workload("shared-prefix")  # the defaults: 64 groups x 16 prompts, 256 tokens out
    secs = estimate_seconds(work, "concurrency", concurrency=16)
    # Measured: a little over 2 minutes against `sglctl up --dp-size 2` (issue 9).
    assert 90 <= secs <= 200
    text = notice(work, "concurrency", secs, 16)
    assert "1024 requests" in text and "about 2 min" in text
    assert "--max-requests" in text and "--duration" in text
    # Shortened runs say so, and a tiny one does not nag about flags.
    assert estimate_seconds(work.head(64), "concurrency", concurrency=16) < secs / 10
    assert estimate_seconds(work, "concurrency", concurrency=16, duration=30) == 30
    tiny = work.head(4)
    assert "--max-requests" not in notice(tiny, "concurrency", 2.0, 4)
    assert human_duration(5400) == "about 1.5 h" and human_duration(0.2) == "about 1 s"


def test_the_progress_bar_shows_done_of_total_and_the_time_left() -> None:
    work = shared_prefix_workload(SharedPrefixConfig(2, 3, 64, 8, 4, 1))
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    config = RunConfig(url="http://router.test", concurrency=2, progress=True)
    transport = httpx.MockTransport(FakeRouter(delay=0.001).handle)
    result = asyncio.run(run_workload(work, config, console=console, transport=transport))
    assert result.summary.completed == 6
    text = out.getvalue()
    assert "6/6" in text and "left" in text
