"""``sglctl add-worker URL``: a bounded wait (``--timeout``) that says what it waits for.

The router it talks to here is a socket that accepts connections and never answers -- the
worst case for a client without a deadline (issue 9, item 5: it used to block for 600 s with
no output).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

SGLCTL = [sys.executable, "-m", "sglctl"]


def test_add_worker_gives_up_after_its_timeout_and_says_why() -> None:
    with socket.socket() as silent_router:
        silent_router.bind(("127.0.0.1", 0))
        silent_router.listen(8)  # the kernel accepts; nobody ever reads or answers
        port = silent_router.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(
            [*SGLCTL, "add-worker", "http://127.0.0.1:31999",
             "--router", f"http://127.0.0.1:{port}", "--timeout", "1"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        took = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert "waiting up to 1 s" in result.stderr  # progress first ...
    assert "no answer within 1 s" in result.stderr and "--timeout" in result.stderr  # ... then why
    assert "Traceback" not in result.stderr
    assert took < 30, f"add-worker --timeout 1 took {took:.1f} s"


def test_add_worker_to_an_unreachable_router_fails_at_once() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        result = subprocess.run(
            [*SGLCTL, "add-worker", "http://127.0.0.1:31999", "--router", f"http://127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert "cannot reach the router" in result.stderr, result.stderr
