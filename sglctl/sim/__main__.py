"""``python -m sglctl.sim`` runs a simulated worker (same flags as ``sglctl sim-worker``)."""

from __future__ import annotations

import typer

from sglctl.sim.cli import EXTRA_ARGS, sim_worker


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(context_settings=EXTRA_ARGS)(sim_worker)
    app()


if __name__ == "__main__":
    main()
