"""``sglctl bench``: replay a workload through a router and print the figures.

Only Typer is imported at module level: ``sglctl --help`` must stay fast, so the benchmark's
own modules are imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

DEFAULT_CONCURRENCY = 16


def bench(
    router: str = typer.Option(
        "http://127.0.0.1:30000", "--router", help="Router (or worker) URL."
    ),
    workload: str = typer.Option(
        ..., "--workload", help="trace:PATH (a Mooncake JSONL trace), shared-prefix or multi-turn."
    ),
    rate: float | None = typer.Option(
        None, "--rate", help="Open loop: Poisson arrivals at this many requests/s."
    ),
    concurrency: int | None = typer.Option(
        None, "--concurrency", help="Closed loop: keep this many requests in flight."
    ),
    speedup: float = typer.Option(
        1.0, "--speedup", help="Divide a trace's timestamps by this (use the sim's --speedup too)."
    ),
    max_requests: int | None = typer.Option(
        None, "--max-requests", help="Send at most N requests."
    ),
    duration: float | None = typer.Option(
        None,
        "--duration",
        help="Send nothing new after S seconds (running requests get --drain-timeout more).",
    ),
    drain_timeout: float = typer.Option(
        30.0, "--drain-timeout", help="Seconds to let requests finish after --duration."
    ),
    request_timeout: float = typer.Option(
        600.0, "--request-timeout", help="Per-request timeout, seconds."
    ),
    json_out: Path | None = typer.Option(
        None, "--json", help="Write summary and per-request records here."
    ),
    plot: Path | None = typer.Option(
        # Rich markup would eat "[plot]" as a style tag: escaped.
        None,
        "--plot",
        help="Write a PNG figure here (needs sglctl\\[plot]).",
    ),
    worker_urls: str | None = typer.Option(
        None,
        "--worker-urls",
        help="Comma-separated worker URLs for per-worker shares (default: ask the router).",
    ),
    seed: int = typer.Option(
        1, "--seed", help="Seed for generated workloads and Poisson arrivals."
    ),
    gsp_num_groups: int = typer.Option(
        64, "--gsp-num-groups", help="shared-prefix: number of system prompts."
    ),
    gsp_prompts_per_group: int = typer.Option(
        16, "--gsp-prompts-per-group", help="shared-prefix: prompts per group."
    ),
    gsp_system_prompt_len: int = typer.Option(
        2048, "--gsp-system-prompt-len", help="shared-prefix: system prompt tokens."
    ),
    gsp_question_len: int = typer.Option(
        128, "--gsp-question-len", help="shared-prefix: question tokens."
    ),
    gsp_output_len: int = typer.Option(
        256, "--gsp-output-len", help="shared-prefix: output tokens."
    ),
    mt_conversations: int = typer.Option(
        32, "--mt-conversations", help="multi-turn: number of conversations."
    ),
    mt_turns: int = typer.Option(8, "--mt-turns", help="multi-turn: turns per conversation."),
    mt_system_prompt_len: int = typer.Option(
        512, "--mt-system-prompt-len", help="multi-turn: shared system prompt tokens (0: none)."
    ),
    mt_user_len: int = typer.Option(
        256, "--mt-user-len", help="multi-turn: tokens of each user message."
    ),
    mt_output_len: int = typer.Option(
        128, "--mt-output-len", help="multi-turn: tokens of each answer."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    log_level: str = typer.Option("warning", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Replay a workload through a router: throughput, TTFT, latency, hit ratio, load balance."""
    import asyncio

    from rich.console import Console

    from sglctl.bench.estimate import estimate_seconds, notice
    from sglctl.bench.plot import PlotUnavailableError, plot_result
    from sglctl.bench.report import print_result, result_dict, write_json
    from sglctl.bench.runner import RunConfig, run_workload
    from sglctl.bench.workloads import (
        MultiTurnConfig,
        SharedPrefixConfig,
        TraceFormatError,
        build_workload,
    )
    from sglctl.logs import configure_logging

    err = Console(stderr=True)
    configure_logging(log_level)
    if rate is not None and concurrency is not None:
        raise typer.BadParameter("give --rate or --concurrency, not both")
    try:
        work = build_workload(
            workload,
            max_requests=max_requests,
            shared_prefix=SharedPrefixConfig(
                gsp_num_groups,
                gsp_prompts_per_group,
                gsp_system_prompt_len,
                gsp_question_len,
                gsp_output_len,
                seed,
            ),
            multi_turn=MultiTurnConfig(
                mt_conversations, mt_turns, mt_system_prompt_len, mt_user_len, mt_output_len, seed
            ),
        )
    except (OSError, TraceFormatError, ValueError) as exc:
        err.print(f"[red]cannot build workload {workload!r}: {exc}")
        raise typer.Exit(2) from None
    if not work.requests:
        err.print(f"[red]workload {workload!r} has no requests")
        raise typer.Exit(2)
    if concurrency is not None:
        mode = "concurrency"
    elif rate is not None:
        mode = "rate"
    elif work.timed:
        mode = "trace"
    else:
        mode, concurrency = "concurrency", DEFAULT_CONCURRENCY
        err.print(f"no --rate or --concurrency: running closed loop at --concurrency {concurrency}")
    secs = estimate_seconds(
        work, mode, concurrency=concurrency, rate=rate, speedup=speedup, duration=duration
    )
    err.print(notice(work, mode, secs, concurrency), markup=False, highlight=False)
    try:
        config = RunConfig(
            url=router,
            mode=mode,
            rate=rate,
            concurrency=concurrency,
            speedup=speedup,
            max_requests=max_requests,
            duration=duration,
            drain_timeout=drain_timeout,
            request_timeout=request_timeout,
            seed=seed,
            worker_urls=[u.strip() for u in (worker_urls or "").split(",") if u.strip()],
            progress=progress,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    result = asyncio.run(run_workload(work, config, console=err))
    print_result(result)
    if json_out is not None:
        write_json(json_out, result_dict(result))
        err.print(f"wrote {json_out}")
    if plot is not None:
        try:
            plot_result(result, plot)
            err.print(f"wrote {plot}")
        except PlotUnavailableError as exc:
            err.print(f"[yellow]{exc}")
    if result.summary.completed == 0:
        err.print("[red]no request completed")
        raise typer.Exit(1)
