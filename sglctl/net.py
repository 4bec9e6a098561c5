"""Small network helpers: free ports, port checks and waiting for an HTTP endpoint."""

from __future__ import annotations

import random
import socket
from collections.abc import Callable

import httpx

from sglctl.polling import PollTimeout, poll_sync

#: Below Linux's ephemeral range (32768-60999 by default), where only listeners compete.
LISTEN_PORTS = range(20000, 32768)
#: Ports this process handed out lately: a port picked but not bound yet looks free.
_handed_out: set[int] = set()


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, for a server about to listen on it.

    Picked at random below the ephemeral range rather than by binding port 0: the OS hands
    ephemeral ports to outgoing connections at any moment, so one it picked could be a client
    socket's before the server bound it (a rare test failure, "address already in use"). Not
    the same port twice in one process, since a port handed out may not be bound yet.
    """
    for _ in range(1000):
        port = random.randrange(LISTEN_PORTS.start, LISTEN_PORTS.stop)
        if port not in _handed_out and port_is_free(host, port):
            if len(_handed_out) > 2000:
                _handed_out.clear()
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a crowded host
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on ``host:port`` and we could bind it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def wait_for_http(
    url: str,
    timeout: float,
    *,
    interval: float = 0.05,
    alive: Callable[[], bool] | None = None,
) -> bool:
    """Poll ``url`` until it answers 200 or ``timeout`` seconds pass.

    ``alive``, when given, returns False once the process we wait for has died, so that we
    stop waiting at once instead of running out the clock.
    """
    with httpx.Client(timeout=2.0, trust_env=False) as client:

        def answered() -> bool | None:
            return True if client.get(url).status_code == 200 else None

        try:
            return poll_sync(
                answered,
                timeout,
                what=f"GET {url}",
                interval=interval,
                retry_on=(httpx.HTTPError,),
                alive=alive,
            )
        except PollTimeout:
            return False


def find_free_port_block(count: int, host: str = "127.0.0.1", start: int = 20000) -> int:
    """First port of ``count`` consecutive free ports, searched below Linux's ephemeral range.

    Ephemeral ports (32768 and up) are handed to outgoing connections at any moment, so a block
    found there can lose a port between the check and its use; below it, only listeners compete.
    """
    for base in range(start, 32768 - count, count + 8):
        ports = range(base, base + count)
        if not _handed_out.intersection(ports) and all(port_is_free(host, p) for p in ports):
            _handed_out.update(ports)
            return base
    raise RuntimeError(f"no {count} consecutive free ports between {start} and 32768")
