"""Print a run's figures (rich tables) and save them (JSON).

The JSON file holds the run's configuration, the summary (with derived figures such as
max/mean load and the share of the ideal hit ratio) and one compact record per request, so
that plots or later comparisons never need a re-run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from rich.console import Console
from rich.table import Table

from sglctl.bench.stats import Summary

if TYPE_CHECKING:
    from sglctl.bench.runner import BenchResult


def fmt_ms(seconds: float) -> str:
    """Milliseconds, or "-" when unknown."""
    return "-" if math.isnan(seconds) else f"{seconds * 1000:,.0f} ms"


def fmt_num(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def fmt_ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def summary_dict(summary: Summary) -> dict[str, Any]:
    """The summary as plain data, with the derived figures added (NaN becomes None)."""
    data = asdict(summary)
    data["request_imbalance"] = summary.request_imbalance
    data["token_imbalance"] = summary.token_imbalance
    data["hit_ratio_of_ideal"] = summary.hit_ratio_of_ideal
    if summary.ideal is not None:
        data["ideal"]["token_weighted"] = summary.ideal.token_weighted
        data["ideal"]["block_weighted"] = summary.ideal.block_weighted
    return _without_nan(data)


def _without_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nan(v) for v in value]
    return value


def result_dict(result: BenchResult) -> dict[str, Any]:
    """Everything of one run as JSON-ready data."""
    return {
        "config": asdict(result.config),
        "workload": {
            "name": result.workload.name,
            "params": result.workload.params,
            "requests": len(result.workload.requests),
        },
        "summary": summary_dict(result.summary),
        "max_client_lag_secs": result.max_lag,
        "requests": [_without_nan(asdict(r)) for r in result.results],
    }


def write_json(path: str | Path, data: Any) -> None:
    Path(path).write_bytes(
        orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )


def summary_table(summary: Summary, title: str = "Benchmark") -> Table:
    """The final table of one run: one figure a row."""
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("requests completed / sent", f"{summary.completed} / {summary.requests}")
    errors = str(summary.errors)
    if summary.error_kinds:
        errors += (
            " (" + ", ".join(f"{k}: {v}" for k, v in sorted(summary.error_kinds.items())) + ")"
        )
    table.add_row("errors", errors)
    if summary.cancelled:
        table.add_row("cancelled at the time limit", str(summary.cancelled))
    table.add_row("duration", f"{summary.duration:.1f} s")
    table.add_row("requests/s", fmt_num(summary.request_throughput, 2))
    table.add_row("output tokens/s", fmt_num(summary.output_throughput, 0))
    table.add_row("input tokens/s", fmt_num(summary.input_throughput, 0))
    table.add_row("TTFT p50 / p99", f"{fmt_ms(summary.ttft_p50)} / {fmt_ms(summary.ttft_p99)}")
    table.add_row(
        "end-to-end p50 / p99", f"{fmt_ms(summary.latency_p50)} / {fmt_ms(summary.latency_p99)}"
    )
    hit = fmt_ratio(summary.hit_ratio)
    if summary.ideal is not None:
        hit += (
            f" (ideal {summary.ideal.token_weighted:.3f}, "
            f"{fmt_num(summary.hit_ratio_of_ideal * 100, 0)}% of it)"
        )
    table.add_row("prefix cache hit ratio", hit)
    table.add_row(
        "load max/mean: requests, tokens",
        f"{fmt_num(summary.request_imbalance, 2)}, {fmt_num(summary.token_imbalance, 2)}",
    )
    return table


def workers_table(summary: Summary) -> Table:
    """Per-worker share of requests and tokens, and each worker's own hit ratio."""
    table = Table(title="Per worker", header_style="bold")
    for name in ("worker", "requests", "share", "tokens", "share", "hit ratio"):
        table.add_column(name, justify="left" if name == "worker" else "right")
    total_req = sum(w.requests for w in summary.workers) or 1.0
    total_tok = sum(w.tokens for w in summary.workers) or 1.0
    for w in summary.workers:
        table.add_row(
            w.url,
            f"{w.requests:,.0f}",
            f"{100 * w.requests / total_req:.1f}%",
            f"{w.tokens:,.0f}",
            f"{100 * w.tokens / total_tok:.1f}%",
            fmt_ratio(w.hit_ratio),
        )
    return table


def print_result(result: BenchResult, console: Console | None = None) -> None:
    console = console or Console()
    title = f"{result.workload.name} via {result.config.url} ({describe_pacing(result)})"
    console.print(summary_table(result.summary, title))
    if result.summary.workers:
        console.print(workers_table(result.summary))


def describe_pacing(result: BenchResult) -> str:
    cfg = result.config
    if cfg.mode == "concurrency":
        return f"concurrency {cfg.concurrency}"
    if cfg.mode == "rate":
        return f"Poisson {cfg.rate:g} req/s"
    return f"trace times / {cfg.speedup:g}"


COMPARISON_COLUMNS = (
    "router",
    "ok/sent",
    "err",
    "req/s",
    "out tok/s",
    "TTFT p50",
    "TTFT p99",
    "E2E p50",
    "E2E p99",
    "hit ratio",
    "of ideal",
    "max/mean req",
    "max/mean tok",
)


def comparison_row(label: str, summary: Summary) -> list[str]:
    return [
        label,
        f"{summary.completed}/{summary.requests}",
        str(summary.errors),
        fmt_num(summary.request_throughput, 2),
        fmt_num(summary.output_throughput, 0),
        fmt_ms(summary.ttft_p50),
        fmt_ms(summary.ttft_p99),
        fmt_ms(summary.latency_p50),
        fmt_ms(summary.latency_p99),
        fmt_ratio(summary.hit_ratio),
        "-" if math.isnan(summary.hit_ratio_of_ideal) else f"{summary.hit_ratio_of_ideal:.0%}",
        fmt_num(summary.request_imbalance, 2),
        fmt_num(summary.token_imbalance, 2),
    ]


def comparison_table(rows: Sequence[tuple[str, Summary]], title: str) -> Table:
    """One row per router/policy, same workload."""
    table = Table(title=title, header_style="bold")
    for name in COMPARISON_COLUMNS:
        table.add_column(name, justify="left" if name == "router" else "right")
    for label, summary in rows:
        table.add_row(*comparison_row(label, summary))
    return table


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table, for RESULTS.md."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
