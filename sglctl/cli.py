"""The ``sglctl`` command line.

Each command's implementation lives with its concern (``sglctl.sim``, ``sglctl.router``,
``sglctl.supervisor`` ...); this module only wires names to them, importing lazily so that
``sglctl --help`` and a sim worker's start-up stay fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer

from sglctl import __version__
from sglctl.bench.cli import bench as _bench
from sglctl.sim.cli import EXTRA_ARGS as _SIM_EXTRA_ARGS
from sglctl.sim.cli import sim_worker as _sim_worker

T = TypeVar("T")

app = typer.Typer(
    name="sglctl",
    help="Launch, supervise and cache-aware-route SGLang data-parallel workers.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

# Commands whose flags are the SGLang Router's (argparse, `--worker-urls A B`, `-- extra`):
# Typer hands the raw arguments through untouched.
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}

# `sglctl bench` keeps its Typer signature with its code; it imports only Typer up front.
app.command("bench")(_bench)

# `sglctl sim-worker`: the simulated SGLang worker; its Typer function lives in sglctl.sim.cli
# (which imports only Typer up front). Unknown SGLang server flags are accepted and ignored.
app.command("sim-worker", context_settings=_SIM_EXTRA_ARGS)(_sim_worker)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"sglctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """sglctl: run SGLang data-parallel inference on a node or a cluster."""


@app.command("gpus")
def _gpus(
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Show the GPUs NVML sees (index, name, memory, utilisation), or why it sees none."""
    from sglctl.gpus import detect_gpus, render_report

    render_report(detect_gpus(), as_json=as_json)


@app.command("up", context_settings=PASSTHROUGH, add_help_option=False)
def _up(ctx: typer.Context) -> None:
    """Start a worker per GPU group, supervise them, and route to them (`sglctl up --help`)."""
    import sys

    from sglctl.supervisor.up import run_up

    raise typer.Exit(run_up(_restore_double_dash(ctx.args, sys.argv)))


def _restore_double_dash(args: list[str], argv: list[str]) -> list[str]:
    """Click drops the ``--`` that separates ``sglctl up``'s flags from the workers'; put it
    back where the real command line had it."""
    if "--" not in argv:
        return args
    worker_args = argv[argv.index("--") + 1 :]
    if worker_args and args[-len(worker_args) :] != worker_args:
        return args
    return [*args[: len(args) - len(worker_args)], "--", *worker_args]


@app.command("status")
def _status(
    router: str | None = typer.Option(
        None, "--router", help="Router URL (default: the local `sglctl up`, else :30000)."
    ),
    once: bool = typer.Option(False, "--once", help="Print one frame and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable state and exit."),
    interval: float = typer.Option(1.0, "--interval", min=0.1, help="Seconds between frames."),
    sample_secs: float = typer.Option(
        1.0, "--sample-secs", min=0.0, help="With --once/--json: window for rates (0: none)."
    ),
    api_key: str | None = typer.Option(None, "--api-key", envvar="SGLCTL_API_KEY"),
) -> None:
    """Live dashboard of workers and router (local shared memory, or --router over HTTP)."""
    from sglctl.status import run_status

    raise typer.Exit(run_status(router, once, as_json, interval, sample_secs, api_key))


@app.command("router", context_settings=PASSTHROUGH, add_help_option=False)
def _router(ctx: typer.Context) -> None:
    """Run the cache-aware router alone (the SGLang Router's flags; `sglctl router --help`)."""
    from sglctl.router.main import main as router_main

    router_main(ctx.args, prog="sglctl router")


_ROUTER_OPT = typer.Option("http://127.0.0.1:30000", "--router", help="The router's base URL.")
_API_KEY_OPT = typer.Option(None, "--api-key", help="The router's --api-key (or $SGLCTL_API_KEY).")


def _admin_call(call: Callable[[], T]) -> T:
    """Run one admin API call; an error the router reports becomes one line and exit 1."""
    from sglctl.router.admin_client import AdminError

    try:
        return call()
    except AdminError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


#: ``add-worker``'s waits: a running worker answers its health check in a second or two;
#: a new local one may be a real model that loads for many minutes.
ADD_TIMEOUT_SECS = 30.0
ADD_LOCAL_TIMEOUT_SECS = 1800.0
#: ``add-worker --local --role``: the pools of a PD layout.
LOCAL_ROLES = ("prefill", "decode")


@app.command("add-worker")
def _add_worker(
    url: str | None = typer.Argument(
        None, help="The worker's base URL, e.g. http://127.0.0.1:31003 (not with --local)"
    ),
    router: str = _ROUTER_OPT,
    api_key: str | None = _API_KEY_OPT,
    local: bool = typer.Option(
        False, "--local", help="Have the local `sglctl up` start one more worker (free GPU/port)."
    ),
    role: str | None = typer.Option(
        None,
        "--role",
        help="With --local in a PD layout: the pool it joins, prefill (it gets a free "
        "bootstrap port) or decode.",
        show_default=False,
    ),
    timeout: float | None = typer.Option(
        None,
        "--timeout",
        min=0.1,
        help="Seconds to wait for the worker to be healthy "
        f"\\[default: {ADD_TIMEOUT_SECS:g}; "
        f"with --local {ADD_LOCAL_TIMEOUT_SECS:g}, real models load for minutes].",
        show_default=False,
    ),
) -> None:
    """Add a worker to a running router (returns once the worker is healthy)."""
    if role is not None and role not in LOCAL_ROLES:
        typer.echo(f"error: --role must be prefill or decode, not {role!r}", err=True)
        raise typer.Exit(2)
    if local:
        _add_local_worker(url, router, timeout or ADD_LOCAL_TIMEOUT_SECS, role)
        return
    if role is not None:
        typer.echo(
            "error: --role needs --local (sglctl up starts the worker in that pool); "
            "a worker added by URL joins the router's regular pool",
            err=True,
        )
        raise typer.Exit(2)
    if url is None:
        typer.echo("error: give the worker's URL, or --local to start one", err=True)
        raise typer.Exit(2)
    import time

    from sglctl.router import admin_client
    from sglctl.router.admin_client import AdminError

    wait = timeout or ADD_TIMEOUT_SECS
    typer.echo(
        f"adding {url} to {router} (waiting up to {wait:g} s for its health check) ...", err=True
    )
    started = time.monotonic()
    try:
        # The router itself waits (?wait=): it answers 200 once the worker is healthy, 503
        # with the last probe's error when it is not by then, and at once when refused.
        result = admin_client.add_worker(router, url, api_key=api_key, wait=wait)
    except AdminError as exc:
        hint = ""
        if time.monotonic() - started >= wait * 0.95:
            hint = (
                f" (no answer within {wait:g} s: check the worker is running and "
                "reachable from the router; raise --timeout to wait longer)"
            )
        typer.echo(f"error: {exc}{hint}", err=True)
        raise typer.Exit(1) from None
    pending = result.get("status") == "pending"
    typer.echo(result.get("message", url) if pending else f"added {result.get('url', url)}")


@app.command("remove-worker")
def _remove_worker(
    url: str = typer.Argument(..., help="The worker's URL (or its id from list-workers)."),
    router: str = _ROUTER_OPT,
    api_key: str | None = _API_KEY_OPT,
) -> None:
    """Remove a worker from a running router; its in-flight requests finish."""
    if _remove_managed_worker(url, router):
        return
    from sglctl.router import admin_client

    result = _admin_call(lambda: admin_client.remove_worker(router, url, api_key=api_key))
    typer.echo(f"removed {result.get('url', url)}")


def _add_local_worker(url: str | None, router: str, timeout: float, role: str | None) -> None:
    """``add-worker --local``: ask the supervisor (control socket), not the router."""
    from sglctl.supervisor.control import ControlError, add_local_worker

    if url is not None:
        typer.echo("error: --local starts a new worker; do not give a URL", err=True)
        raise typer.Exit(2)
    kind = f"{role} worker" if role else "worker"
    typer.echo(
        f"asking the local sglctl up for one more {kind} (waiting up to {timeout:g} s "
        "for it to be healthy) ...",
        err=True,
    )
    try:
        result = add_local_worker(router, timeout=timeout, role=role)
    except ControlError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    gpus = f" on GPU {result['gpus']}" if result.get("gpus") else ""
    added_role = result.get("role") or "regular"
    pool = "" if added_role == "regular" else f" {added_role}"
    port = result.get("bootstrap_port")
    bootstrap = f", bootstrap port {port}" if port else ""
    typer.echo(
        f"added{pool} worker {result['worker_id']} at {result['url']}{gpus} "
        f"(pid {result['pid']}{bootstrap})"
    )


def _remove_managed_worker(url: str, router: str) -> bool:
    """A worker started by a local ``sglctl up`` is stopped by its supervisor (else the
    supervisor would restart it and re-announce it to the router). False: not managed."""
    from sglctl.supervisor.control import ControlError, remove_managed_worker

    try:
        result = remove_managed_worker(url, router)
    except ControlError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if result is None:
        return False
    typer.echo(f"stopped and removed worker {result['worker_id']} at {result['url']}")
    return True


@app.command("list-workers")
def _list_workers(
    router: str = _ROUTER_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    api_key: str | None = _API_KEY_OPT,
) -> None:
    """List a running router's workers with health, load and counters."""
    import json

    from sglctl.router import admin_client

    workers = _admin_call(lambda: admin_client.list_workers(router, api_key=api_key))
    if as_json:
        typer.echo(json.dumps(workers, indent=2))
        return
    from sglctl.status import served_count  # one definition of "served", as status shows it

    for w in workers:
        state = "healthy" if w.get("is_healthy") else "unhealthy"
        served = served_count(int(w.get("requests_total", 0)), int(w.get("errors_total", 0)))
        typer.echo(
            f"{w['url']}  {state}  load={w.get('load', 0)}  served={served}  "
            f"errors={w.get('errors_total', 0)}  breaker={w.get('circuit_breaker_state', '?')}"
        )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
