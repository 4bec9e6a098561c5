"""Logging set-up shared by every sglctl process.

One format everywhere (time with milliseconds, level, logger, message) so that the router's,
the supervisor's and the workers' logs can be merged and read side by side at 3 a.m. With
``json=True`` (``--log-json``) each line is one JSON object instead, for log shippers (Loki,
Elasticsearch, CloudWatch): ``time`` (UTC, ISO 8601, ms), ``level``, ``logger``, ``message``,
and the request fields of :data:`REQUEST_FIELDS` when the record carries them (the access log
does), plus ``exception`` with the traceback when there is one.

Third-party clients (httpx, httpcore) stay at warning even at ``--log-level debug``: their
per-connection lines would bury the router's own debug lines (routing decisions, retries).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from typing import Any

import orjson

LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
LEVELS = ("debug", "info", "warning", "error")
#: Record attributes copied into a JSON line when present (set with ``extra=`` by the caller).
REQUEST_FIELDS = (
    "request_id",
    "method",
    "path",
    "status",
    "worker",
    "duration_ms",
    "ttft_ms",
    "retries",
)
#: Loggers kept at warning whatever the level: per-request noise from libraries.
NOISY_LOGGERS = ("httpx", "httpcore", "uvicorn.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in REQUEST_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return orjson.dumps(entry, default=str).decode()


def _iso_time(created: float) -> str:
    millis = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


def make_formatter(json: bool = False) -> logging.Formatter:
    return JsonFormatter() if json else logging.Formatter(LOG_FORMAT, DATE_FORMAT)


def configure_logging(
    level: str = "info", log_dir: str | None = None, name: str = "sglctl", json: bool = False
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
    formatter = make_formatter(json)
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
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
