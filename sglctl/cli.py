"""The ``sglctl`` command line.

Each command's implementation lives with its concern (``sglctl.sim``, ``sglctl.router``,
``sglctl.supervisor`` ...); this module only wires names to them, importing lazily so that
``sglctl --help`` and a sim worker's start-up stay fast.
"""

from __future__ import annotations

import typer

from sglctl import __version__
from sglctl.bench.cli import bench as _bench

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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
