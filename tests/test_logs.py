"""Logs: --log-json lines, the access log, debug routing decisions without library noise."""

from __future__ import annotations

import json
import logging
import sys

import httpx
import pytest

from sglctl.logs import JsonFormatter, configure_logging
from sglctl.router.flags import parse_args
from tests.support import wait_until


def record(msg: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("sglctl.x", logging.WARNING, __file__, 1, msg, args or ("you",), None)
    rec.__dict__.update(extra)
    return rec


def test_json_line_has_time_level_logger_message_and_request_fields() -> None:
    line = JsonFormatter().format(record(status=200, worker="http://w", duration_ms=1.5))
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["level"] == "warning" and entry["logger"] == "sglctl.x"
    assert entry["message"] == "hello you"
    assert entry["time"].endswith("Z") and "T" in entry["time"]
    assert (entry["status"], entry["worker"], entry["duration_ms"]) == (200, "http://w", 1.5)
    assert "ttft_ms" not in entry  # absent fields are left out, not null


def test_json_line_carries_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("failed: %s", "x")
        rec.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(rec))
    assert "ValueError: boom" in entry["exception"]


def test_debug_level_keeps_http_client_noise_at_warning() -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        configure_logging("debug", json=True)
        assert root.level == logging.DEBUG
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        for name in ("httpx", "httpcore"):
            assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("sglctl.router.routing").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


def test_flags_parse_and_default_off() -> None:
    assert (parse_args([]).log_json, parse_args([]).access_log) == (False, False)
    config = parse_args(["--log-json", "--access-log"])
    assert (config.log_json, config.access_log) == (True, True)


@pytest.mark.timeout(120)
def test_router_writes_json_access_and_routing_lines(procs) -> None:  # type: ignore[no-untyped-def]
    workers = [procs.sim_worker("--speedup", "100") for _ in range(2)]
    router = procs.router(
        [w.url for w in workers], "--log-json", "--access-log", "--log-level", "debug"
    )
    r = httpx.post(
        f"{router.url}/generate",
        json={"text": "hello " * 30, "sampling_params": {"max_new_tokens": 4}},
        timeout=30,
        trust_env=False,
    )
    assert r.status_code == 200
    served_by = r.headers["x-sglctl-worker"]

    def entries() -> list[dict[str, object]]:
        lines = router.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    wait_until(
        lambda: any(e["logger"] == "sglctl.access" for e in entries()),
        timeout=20,
        what="the access-log line",
    )
    logged = entries()
    access = next(e for e in logged if e["logger"] == "sglctl.access")
    assert access["method"] == "POST" and access["path"] == "/generate"
    assert access["status"] == 200 and access["worker"] == served_by
    assert access["retries"] == 0
    assert float(access["duration_ms"]) >= float(access["ttft_ms"]) > 0  # type: ignore[arg-type]
    routing = [e for e in logged if e["logger"] == "sglctl.router.routing"]
    assert routing and served_by in str(routing[0]["message"])
    assert "policy=cache_aware" in str(routing[0]["message"])
    assert "match_len=" in str(routing[0]["message"])
    assert not [e for e in logged if str(e["logger"]).startswith(("httpx", "httpcore"))]
