"""``python -m sglctl.router``: the same as ``sglctl router``."""

from sglctl.router.main import main

main(prog="python -m sglctl.router")
