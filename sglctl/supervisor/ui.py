"""What ``sglctl up`` shows on the terminal: start-up progress, failures, the endpoint.

Real models take minutes to load, so start-up shows one live line per worker (state and
elapsed time); a worker that dies while starting gets the tail of its log printed right
there, because that is the first thing anyone would go and look for.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.panel import Panel
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from sglctl.state_table import WorkerState

if TYPE_CHECKING:
    from sglctl.supervisor.core import Supervisor
    from sglctl.supervisor.plan import Plan, WorkerSpec
    from sglctl.supervisor.worker import SupervisedWorker

_STYLE = {
    WorkerState.STARTING: "yellow",
    WorkerState.HEALTHY: "green",
    WorkerState.UNHEALTHY: "red",
    WorkerState.RESTARTING: "yellow",
    WorkerState.FAILED: "bold red",
    WorkerState.REMOVED: "dim",
}


class StartupView:
    """Live start-up progress; afterwards it only prints notable events."""

    def __init__(self, console: Console, plan: Plan) -> None:
        self.console = console
        self.plan = plan
        self.progress = Progress(
            SpinnerColumn(finished_text="•"),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._tasks: dict[int, TaskID] = {}
        self._live = False

    def __enter__(self) -> StartupView:
        for spec in self.plan.workers:
            line = self._line(spec, WorkerState.STARTING, "launching")
            self._tasks[spec.worker_id] = self.progress.add_task(line)
        self.progress.start()
        self._live = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def finish(self) -> None:
        if self._live:
            self.progress.stop()
            self._live = False

    def on_worker(self, worker: SupervisedWorker, state: WorkerState, detail: str) -> None:
        """The supervisor's listener: update the worker's line; print a log tail on failure."""
        tail = detail if "\n" in detail else ""
        summary = detail.splitlines()[0] if detail and not tail else ""
        if self._live:
            task = self._tasks.get(worker.worker_id)
            if task is None:
                task = self._tasks[worker.worker_id] = self.progress.add_task("")
            line = self._line(worker.spec, state, summary)
            done = state in (WorkerState.HEALTHY, WorkerState.FAILED)
            self.progress.update(task, description=line, total=1, completed=1 if done else 0)
            if done:
                self.progress.stop_task(task)
        elif state in (WorkerState.FAILED, WorkerState.HEALTHY, WorkerState.REMOVED):
            stamp = time.strftime("%H:%M:%S")
            self.console.print(self._line(worker.spec, state, stamp))
        # During start-up every failed attempt matters; later only giving up does (each
        # restart is in the supervisor's log already).
        if tail and (
            state == WorkerState.FAILED or (self._live and state == WorkerState.RESTARTING)
        ):
            title = f"worker {worker.worker_id} {state.label}: last lines of {worker.log.path}"
            self.console.print(
                Panel(tail, title=title, title_align="left", border_style=_STYLE[state])
            )

    @staticmethod
    def _line(spec: WorkerSpec, state: WorkerState, detail: str) -> str:
        style = _STYLE.get(state, "")
        where = f"GPU {spec.gpus_label}" if spec.gpus_label else "sim"
        if spec.role != "regular":
            bootstrap = f" bootstrap :{spec.bootstrap_port}" if spec.bootstrap_port else ""
            where = f"{spec.role}{bootstrap}, {where}"
        extra = f" [dim]{detail}[/dim]" if detail else ""
        label = f"[{style}]{state.label}[/{style}]"
        return f"worker {spec.worker_id} [dim]({where}, {spec.url})[/dim] {label}{extra}"


def announce(console: Console, supervisor: Supervisor, plan: Plan, router_url: str) -> None:
    """The lines printed once everything is up."""
    healthy = [w for w in supervisor.workers.values() if w.state == WorkerState.HEALTHY]
    failed = [w for w in supervisor.workers.values() if w.state == WorkerState.FAILED]
    kind = "simulated" if plan.backend == "sim" else "SGLang"
    roles = [w.spec.role for w in healthy]
    if any(role != "regular" for role in roles):  # a PD layout: say both pools
        count = f"{roles.count('prefill')} prefill + {roles.count('decode')} decode {kind}"
        count += " workers, router in PD mode"
    else:
        count = f"{len(healthy)} {kind} worker(s)"
    console.print(
        f"[bold green]sglctl is up:[/bold green] [bold]{router_url}[/bold]  "
        f"({count}, model {plan.model})"
    )
    if failed:
        console.print(f"[red]{len(failed)} worker(s) failed to start and stay down: "
                      f"{', '.join(str(w.worker_id) for w in failed)}[/red]")  # fmt: skip
    console.print(
        f'  try:   curl {router_url}/generate -d \'{{"text": "Hello", "sampling_params": '
        f'{{"max_new_tokens": 8}}}}\'\n'
        f"  watch: sglctl status --router {router_url}\n"
        f"  logs:  {supervisor.settings.run_dir}\n"
        "  stop:  Ctrl-C",
        highlight=False,
        soft_wrap=True,
    )
