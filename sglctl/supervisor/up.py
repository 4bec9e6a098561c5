"""``sglctl up``: from flags to a running, supervised deployment, and back to nothing.

Order of work, each step failing fast with a message that says what to change:
parse flags (router flags validated by the router's parser) -> detect GPUs -> plan (backend,
GPU groups, ports, command lines) -> create the shared-memory table (replacing a stale one
and stopping what its crashed run left behind) -> check ports -> supervise until Ctrl-C ->
remove the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from sglctl.gpus import detect_gpus
from sglctl.logs import configure_logging
from sglctl.proctree import terminate_tree
from sglctl.state_table import (
    StateTable,
    StateTableError,
    WorkerSlot,
    process_matches,
    remove_stale_segments,
    segment_name_for_port,
)
from sglctl.supervisor.backoff import RestartPolicy
from sglctl.supervisor.config import PROBE_TIMEOUT_SECS, UpConfig, UsageError, parse_up_args
from sglctl.supervisor.core import Supervisor, SupervisorSettings
from sglctl.supervisor.plan import (
    Plan,
    PlanError,
    WorkerFactory,
    check_ports,
    make_plan,
    port_conflicts,
    sglang_importable,
)
from sglctl.supervisor.router_proc import router_command
from sglctl.supervisor.ui import StartupView, announce
from sglctl.supervisor.worker import HealthSettings

log = logging.getLogger(__name__)

#: Unix socket paths are limited to ~107 bytes.
_MAX_SOCKET_PATH = 100


def run_up(argv: Sequence[str]) -> int:
    """The whole command; returns the process exit code."""
    console = Console(stderr=False, highlight=False)
    try:
        config = parse_up_args(argv)
    except UsageError as exc:
        _refuse(console, str(exc))
        return 2
    # Terminal only until the start is certain: a refused start leaves no run directory.
    configure_logging(config.log_level)
    _log_through(console)

    gpus = detect_gpus()
    try:
        plan = make_plan(config, gpus, sglang_importable())
    except PlanError as exc:
        _refuse(console, str(exc))
        return 2
    console.print(plan.backend_reason)

    name = segment_name_for_port(config.port)
    control_path = control_socket_path(config.run_dir, config.port)
    try:
        table, stale = StateTable.create(
            name,
            n_slots=config.max_workers,
            router_url=config.router_url,
            control_path=str(control_path),
            run_dir=str(config.run_dir),
            model=plan.model,
            backend=plan.backend,
        )
    except StateTableError as exc:
        # Most likely another `sglctl up` on the same ports: say every port to move at once.
        conflicts = port_conflicts(config, plan)
        listing = "".join(f"\n  - {line}" for line in conflicts)
        _refuse(console, str(exc) + listing)
        return 1
    try:
        # Our own port's stale table was taken over above (its slots name the orphans to
        # stop); now the tables and control sockets of other runs killed with -9.
        remove_stale_segments()
        stop_orphans(stale)
        try:
            check_ports(config, plan)
        except PlanError as exc:
            _refuse(console, str(exc))
            return 1
        config.run_dir.mkdir(parents=True, exist_ok=True)
        configure_logging(config.log_level, log_dir=str(config.run_dir), name="supervisor")
        _log_through(console)
        return asyncio.run(_supervise(config, plan, table, control_path, console))
    finally:
        table.unlink()
        table.close()


async def _supervise(
    config: UpConfig, plan: Plan, table: StateTable, control_path: Path, console: Console
) -> int:
    settings = SupervisorSettings(
        run_dir=config.run_dir,
        policy=RestartPolicy(
            initial_backoff=config.restart_initial_backoff_secs,
            max_backoff=config.restart_max_backoff_secs,
            reset_after=config.restart_reset_after_secs,
            max_crashes=config.max_worker_crashes,
            window=config.crash_window_secs,
        ),
        health=HealthSettings(
            path=config.worker_health_path,
            startup_timeout=config.worker_startup_timeout_secs,
            interval=config.worker_health_interval_secs,
            probe_timeout=config.worker_health_timeout_secs or PROBE_TIMEOUT_SECS[plan.backend],
            failures=config.worker_health_failures,
            unhealthy_restart_after=config.worker_unhealthy_restart_secs,
        ),
        worker_stop_timeout=config.worker_stop_timeout_secs,
        log_max_bytes=config.log_max_bytes,
        log_backups=config.log_backups,
        router_argv=router_command(config.router_args, table.name, pd=config.is_pd),
        router_url=config.router_url,
        router_grace_period=config.shutdown_grace_period_secs,
        control_path=control_path,
    )
    gpu_pool = [g.index for g in detect_gpus().gpus] if plan.backend == "sglang" else []
    factory = WorkerFactory(
        plan.backend,
        plan.model,
        config.tp_size,
        gpu_pool,
        config.worker_args,
        pd=config.is_pd,
        bootstrap_base_port=config.bootstrap_base_port,
    )
    supervisor = Supervisor(settings, table, plan.workers, factory, config.worker_base_port)
    view = StartupView(console, plan)
    supervisor.listener = view.on_worker

    def started(sup: Supervisor) -> None:
        view.finish()
        announce(console, sup, plan, config.router_url)

    supervisor.on_started = started
    with view:
        code = await supervisor.run()
    if code:
        console.print(f"[red]sglctl up stopped with errors; logs are in {config.run_dir}[/red]")
    return code


def _refuse(console: Console, message: str) -> None:
    """Print why ``sglctl up`` will not start; lines are not re-wrapped (flags stay whole)."""
    console.print(f"[red]sglctl up:[/red] {escape(message)}", soft_wrap=True)


def _log_through(console: Console) -> None:
    """Send the terminal's share of the logs through ``console``, so log lines appear above
    the live start-up display instead of tearing it (the file log stays as it is)."""
    from rich.logging import RichHandler

    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
            rich_handler = RichHandler(
                console=console,
                show_path=False,
                markup=False,
                rich_tracebacks=False,
                log_time_format="%H:%M:%S",
            )
            rich_handler.setLevel(handler.level)
            root.addHandler(rich_handler)


def control_socket_path(run_dir: Path, port: int) -> Path:
    """``<run_dir>/control.sock``, or a short path in the temp dir when that is too long."""
    path = run_dir.resolve() / "control.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    return Path(tempfile.gettempdir()) / f"sglctl-{port}-{os.getpid()}.sock"


def stop_orphans(stale: list[WorkerSlot]) -> None:
    """Stop workers a crashed run left running (same pid *and* start time: never a stranger)."""
    for slot in stale:
        if slot.pid and process_matches(slot.pid, slot.pid_create_time):
            log.warning(
                "stopping worker pid %d (%s) left behind by a crashed run", slot.pid, slot.url
            )
            with contextlib.suppress(Exception):
                terminate_tree(slot.pid, timeout=10.0)


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run_up(sys.argv[1:] if argv is None else argv))
