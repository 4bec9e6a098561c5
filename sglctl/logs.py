"""Logging set-up shared by every sglctl process.

One format everywhere (time with milliseconds, level, logger, message) so that the router's,
the supervisor's and the workers' logs can be merged and read side by side at 3 a.m.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
LEVELS = ("debug", "info", "warning", "error")


def configure_logging(
    level: str = "info", log_dir: str | None = None, name: str = "sglctl"
) -> None:
    """Send sglctl's logs to stderr and, with ``log_dir``, to a rotated ``<name>.log`` there.

    Called once per process, from its entry point; library code only calls
    ``logging.getLogger(__name__)``.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter(LOG_FORMAT, DATE_FORMAT)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(formatter)
    root.addHandler(stream)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        rotating = logging.handlers.RotatingFileHandler(
            os.path.join(log_dir, f"{name}.log"), maxBytes=50 * 2**20, backupCount=3
        )
        rotating.setFormatter(formatter)
        root.addHandler(rotating)
    # Per-request access lines from uvicorn and httpx drown the useful ones; keep them at
    # warning unless the user asked for debug.
    if level.lower() != "debug":
        for noisy in ("httpx", "httpcore", "uvicorn.access"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
