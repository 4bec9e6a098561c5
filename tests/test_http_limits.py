"""Hostile clients at a real router process, over raw sockets (issue 9 item 2).

One router with short limits (1 s head timeout, 1 s body idle, 3 s body total) in front of one
sim worker serves the whole module. Each test checks what the client sees (status, JSON error,
the connection closed) and that normal, keep-alive and pipelined traffic still works.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import wait_until

from sglctl.net import find_free_port
from sglctl.router.http_server import RateLimitedLog
from sglctl.spawn import ManagedProcess, spawn, spawn_router, spawn_sim_worker

HEAD_TIMEOUT = 1.0
BODY_IDLE = 1.0
BODY_TOTAL = 3.0
#: Slack for a loaded 2-core machine on top of a timeout before the test calls it a hang.
MARGIN = 8.0


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    logs: Path = tmp_path_factory.mktemp("http-limits")
    started: list[ManagedProcess] = []
    try:
        started.append(spawn_sim_worker(logs, "--speedup", "50"))
        started.append(
            spawn_router(
                logs,
                [started[0].url],
                "--metrics-port",
                str(find_free_port()),
                "--request-header-timeout-secs",
                str(HEAD_TIMEOUT),
                "--request-body-idle-timeout-secs",
                str(BODY_IDLE),
                "--request-body-timeout-secs",
                str(BODY_TOTAL),
            )
        )
        yield started[1]
    finally:
        for proc in reversed(started):
            proc.stop()
            print(f"----- {proc.name} log tail -----\n{proc.log_tail()}")


def connect(router: ManagedProcess, timeout: float = HEAD_TIMEOUT + MARGIN) -> socket.socket:
    host, port = router.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the router sends until it closes; a timeout here means it never closed."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length response from ``sock`` (``buffer`` keeps what follows it)."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {bytes(buffer)!r}"
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        rest += chunk
    buffer[:] = rest[length:]
    return status, headers, rest[:length]


def parse(raw: bytes) -> tuple[int, bytes]:
    """Status and body of the one response in ``raw`` (``0`` when nothing was sent)."""
    if not raw:
        return 0, b""
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def assert_json_error(body: bytes, status: int) -> None:
    error = json.loads(body)["error"]
    assert error["code"] == status and error["message"] and error["type"]


def test_huge_header_gets_431_and_the_connection_closes(router: ManagedProcess) -> None:
    with connect(router) as sock:
        sock.sendall(b"GET /liveness HTTP/1.1\r\nHost: x\r\nX-Big: ")
        # 1 MiB of one unfinished header: the router answers long before the end.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"a" * (1 << 20))
        status, body = parse(read_until_closed(sock))
    assert status == 431
    assert_json_error(body, 431)


def test_two_hundred_headers_get_431(router: ManagedProcess) -> None:
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    with connect(router) as sock:
        sock.sendall(b"GET /liveness HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        status, body = parse(read_until_closed(sock))
    assert status == 431
    assert_json_error(body, 431)


@pytest.mark.parametrize(
    "sent", [b"", b"GET /liveness HTTP/1.1\r\nHost: x\r\n"], ids=["silent", "half-sent-head"]
)
def test_a_stalled_head_is_closed_after_the_header_timeout(
    router: ManagedProcess, sent: bytes
) -> None:
    with connect(router) as sock:
        started = time.monotonic()
        sock.sendall(sent)
        status, body = parse(read_until_closed(sock))
        held = time.monotonic() - started
    assert status == 408
    assert_json_error(body, 408)
    assert HEAD_TIMEOUT * 0.9 <= held < HEAD_TIMEOUT + MARGIN


def _post_head(length: int | None) -> bytes:
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    return b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s\r\n\r\n" % (
        framing
    )


def _trickle(sock: socket.socket, piece: bytes, stop: threading.Event, interval: float) -> None:
    """Send ``piece`` every ``interval`` s until ``stop`` or the router closes the socket."""
    while not stop.wait(interval):
        try:
            sock.sendall(piece)
        except OSError:
            return


@pytest.mark.parametrize(
    ("head", "piece"),
    [(_post_head(10_000), b"x" * 10), (_post_head(None), b"a\r\n" + b"x" * 10 + b"\r\n")],
    ids=["slow-content-length-body", "never-ending-chunked-body"],
)
def test_a_body_that_never_completes_gets_408(
    router: ManagedProcess, head: bytes, piece: bytes
) -> None:
    """10 bytes every 0.2 s never goes idle, so only the total body timeout can end it."""
    stop = threading.Event()
    with connect(router, timeout=BODY_TOTAL + MARGIN) as sock:
        started = time.monotonic()
        sock.sendall(head)
        sender = threading.Thread(target=_trickle, args=(sock, piece, stop, 0.2), daemon=True)
        sender.start()
        try:
            status, body = parse(read_until_closed(sock))
        finally:
            stop.set()
            sender.join(timeout=5)
        held = time.monotonic() - started
    assert status == 408
    assert_json_error(body, 408)
    assert held < BODY_TOTAL + MARGIN


def test_a_short_content_length_body_gets_408_after_the_idle_timeout(
    router: ManagedProcess,
) -> None:
    with connect(router, timeout=BODY_IDLE + MARGIN) as sock:
        started = time.monotonic()
        sock.sendall(_post_head(100) + b'{"text": "only half of the promised')
        status, body = parse(read_until_closed(sock))
        held = time.monotonic() - started
    assert status == 408
    assert_json_error(body, 408)
    assert BODY_IDLE * 0.9 <= held < BODY_IDLE + MARGIN


GENERATE = b'{"text": "hello there", "sampling_params": {"max_new_tokens": 4}}'


def _generate(keep_alive: bool = True) -> bytes:
    connection = b"" if keep_alive else b"Connection: close\r\n"
    return _post_head(len(GENERATE)).replace(b"\r\n\r\n", b"\r\n" + connection + b"\r\n") + (
        GENERATE
    )


def test_keep_alive_and_pipelined_requests_still_work(router: ManagedProcess) -> None:
    buffer = bytearray()
    with connect(router) as sock:
        # Keep-alive: three requests one after the other, idle gaps shorter than the timeout.
        for _ in range(3):
            sock.sendall(_generate())
            status, _, body = read_response(sock, buffer)
            assert status == 200, body
            assert "text" in json.loads(body)
        # An idle keep-alive connection outlives the head timeout: that is keep-alive's clock.
        time.sleep(HEAD_TIMEOUT * 1.5)  # the behaviour under test is the passing of time
        sock.sendall(b"GET /liveness HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock, buffer)[0] == 200
        # Pipelined: three requests in one write, answered in order.
        sock.sendall(_generate() + b"GET /liveness HTTP/1.1\r\nHost: x\r\n\r\n" + _generate(False))
        answers = [read_response(sock, buffer) for _ in range(3)]
        assert [status for status, _, _ in answers] == [200, 200, 200]
        assert "text" in json.loads(answers[2][2])


def test_a_large_body_sent_quickly_and_streaming_still_work(router: ManagedProcess) -> None:
    text = "x" * 400_000  # 400 KB: many reads, and parsed off the loop
    with httpx.Client(base_url=router.url, timeout=30) as client:
        r = client.post("/generate", json={"text": text, "sampling_params": {"max_new_tokens": 2}})
        assert r.status_code == 200, r.text
        with client.stream(
            "POST",
            "/generate",
            json={"text": "hi", "stream": True, "sampling_params": {"max_new_tokens": 4}},
        ) as stream:
            lines = [line for line in stream.iter_lines() if line]
        assert stream.status_code == 200
        assert lines[-1] == "data: [DONE]"


def _router_with_fd_limit(
    logs: Path, worker: str, soft: int, hard: int, *extra: str
) -> ManagedProcess:
    """A router whose RLIMIT_NOFILE is ``(soft, hard)`` from its first instruction on."""
    port = find_free_port()
    limit = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    args = [sys.executable, "-c", limit, sys.executable, "-m", "sglctl.router"]
    args += ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", worker]
    args += ["--metrics-port", str(find_free_port()), *extra]
    return spawn(
        f"router-fd-{port}",
        args,
        url=f"http://127.0.0.1:{port}",
        log_dir=logs,
        health_path="/liveness",
    )


def test_at_the_fd_limit_clients_get_503_and_it_is_logged(
    router: ManagedProcess, tmp_path: Path
) -> None:
    with httpx.Client(base_url=router.url, timeout=10) as client:
        worker_url = client.get("/list_workers").json()["urls"][0]
    limited = _router_with_fd_limit(tmp_path, worker_url, 64, 64)
    held: list[socket.socket] = []
    seen: Counter[int] = Counter()
    try:
        # Idle connections eat descriptors; long before the kernel says EMFILE the router
        # answers new ones with 503 (uvloop would accept and drop them: a bare EOF).
        for _ in range(80):
            sock = connect(limited)
            held.append(sock)
            sock.sendall(b"GET /liveness HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = read_response(sock, bytearray())
            seen[status] += 1
            if status == 503:
                assert_json_error(body, 503)
                break
        assert seen[503] == 1, seen
        wait_until(
            lambda: "file descriptor" in limited.log_tail(200),
            timeout=10,
            what="an fd-limit log line",
        )
    finally:
        for sock in held:
            sock.close()
        limited.stop()


def test_the_soft_fd_limit_is_raised_to_the_hard_limit_at_start(
    router: ManagedProcess, tmp_path: Path
) -> None:
    with httpx.Client(base_url=router.url, timeout=10) as client:
        worker_url = client.get("/list_workers").json()["urls"][0]
    limited = _router_with_fd_limit(tmp_path, worker_url, 256, 1024)
    try:
        limits = Path(f"/proc/{limited.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert line.split()[3:5] == ["1024", "1024"], line
        assert "soft 256 -> 1024" in limited.log_tail(200)
    finally:
        limited.stop()


def test_a_refused_request_after_good_ones_on_the_same_connection(router: ManagedProcess) -> None:
    """431 after a finished request is answered; after a pipelined one, that answer comes first."""
    too_many = b"GET /liveness HTTP/1.1\r\nHost: x\r\n" + b"X-H: v\r\n" * 200 + b"\r\n"
    buffer = bytearray()
    with connect(router) as sock:
        sock.sendall(_generate())
        assert read_response(sock, buffer)[0] == 200
        sock.sendall(too_many)
        status, _, body = read_response(sock, buffer)
        assert status == 431
        assert_json_error(body, 431)
        assert read_until_closed(sock) == b""
    buffer.clear()
    with connect(router) as sock:
        sock.sendall(_generate() + too_many)  # the refusal must not cut into the 200
        status, _, body = read_response(sock, buffer)
        assert status == 200
        assert "text" in json.loads(body)
        assert bytes(buffer) + read_until_closed(sock) == b""  # then closed, nothing else


def test_rate_limited_log_keeps_one_line_a_second_per_kind_and_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("test.rate_limited")
    limited = RateLimitedLog(logger, interval=3600.0)
    with caplog.at_level(logging.WARNING, logger="test.rate_limited"):
        for _ in range(3):
            limited(logging.WARNING, "a", "kind a %d", 1)
        limited(logging.WARNING, "b", "kind b")
        limited.interval = 0.0
        limited(logging.WARNING, "a", "kind a %d", 2)
    assert [r.getMessage() for r in caplog.records] == [
        "kind a 1",
        "kind b",
        "kind a 2 (and 2 more like it since the last such line)",
    ]
