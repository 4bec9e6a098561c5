"""The control path into a running ``sglctl up``: add or remove a managed worker.

Why a separate channel: the router's admin API can add a worker that is already running
somewhere, but only the supervisor can *start* one (on a free GPU) or stop one for good --
a worker removed only from the router would be restarted and re-announced by the
supervisor's table. So ``sglctl add-worker --local`` and ``sglctl remove-worker`` on a
managed worker talk to the supervisor, which then publishes the change through the
shared-memory table like any other state change; the router follows within milliseconds.

How a client finds the supervisor: the router's port names the state table
(``sglctl_<port>``), and the table's header holds the control socket's path. The socket is
a Unix socket in the run directory (so only users who may read the run directory may send
commands). The protocol is one JSON object per line each way::

    {"op": "add"}               -> {"ok": true, "worker_id": 3, "url": "...", "state": "healthy"}
    {"op": "remove", "url": U}  -> {"ok": true, "url": U}
    {"op": "list"}              -> {"ok": true, "workers": [{"worker_id", "url", "state", ...}]}
    anything wrong              -> {"ok": false, "error": "...message..."}

A request never holds up shutdown: :meth:`ControlServer.close` cancels the handlers still
running (an ``add`` waits for its worker to become healthy, which can take minutes) and
answers their clients "shutting down" instead. A socket left behind by a supervisor that was
killed (``kill -9`` leaves no chance to clean up) is removed with its state table by
:func:`sglctl.state_table.remove_stale_segments` as soon as a later ``sglctl up`` or
``sglctl status`` sees that its owner is dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sglctl.state_table import (
    StateTable,
    StateTableError,
    TableInfo,
    list_segments,
    segment_name_for_port,
)

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_REQUEST_BYTES = 64 * 1024
SHUTTING_DOWN = "sglctl up is shutting down; the request was abandoned"


class ControlError(RuntimeError):
    """No supervisor to talk to, or it refused the request (the message says why)."""


class ControlServer:
    """Serves the control socket on the supervisor's loop; each request runs ``handler``."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._pending: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by a crashed run; the state table already vouched for it
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=MAX_REQUEST_BYTES
        )
        os.chmod(self.path, 0o600)
        log.debug("control socket listening at %s", self.path)

    async def close(self) -> None:
        """Stop listening, abandon pending requests (their clients hear why), remove the socket."""
        if self._server is not None:
            self._server.close()
        for task in list(self._pending):
            task.cancel()
        if self._pending:
            await asyncio.wait(self._pending, timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=1.0)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._pending.add(task)
        try:
            reply = await self._answer(reader)
            writer.write(json.dumps(reply).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), timeout=2.0)
        except (
            ConnectionError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass  # the client went away or stopped reading: nobody to answer
        except asyncio.CancelledError:
            # Only close() cancels us: the supervisor is stopping. Say so, briefly, and end
            # quietly -- this task is ours, nobody awaits its cancellation.
            with contextlib.suppress(Exception):
                writer.write(json.dumps({"ok": False, "error": SHUTTING_DOWN}).encode() + b"\n")
        finally:
            if task is not None:
                self._pending.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        line = await reader.readline()
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("the request must be a JSON object")
        except ValueError as exc:
            return {"ok": False, "error": f"bad request: {exc}"}
        try:
            return await self._handler(request)
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("control request %r failed", request)
            return {"ok": False, "error": f"internal error: {exc}"}


# -- client side ----------------------------------------------------------------------------
def port_of(router_url: str) -> int:
    """The port of ``router_url`` (``http://h:p``, ``h:p`` or a bare port)."""
    text = router_url.strip()
    if text.isdigit():
        return int(text)
    parts = urlsplit(text if "://" in text else f"http://{text}")
    if parts.port is not None:
        return parts.port
    return 443 if parts.scheme == "https" else 80


def is_local_host(host: str) -> bool:
    """True for loopback, wildcard and this machine's own names."""
    if host in ("127.0.0.1", "localhost", "0.0.0.0", "::1", "::", ""):
        return True
    with contextlib.suppress(OSError):
        if host in (socket.gethostname(), socket.getfqdn()):
            return True
        return socket.gethostbyname(host).startswith("127.")
    return False


def find_local_run(router_url: str | None = None) -> TableInfo:
    """The header of the local ``sglctl up`` run behind ``router_url``.

    Without a URL: the run on port 30000, or the only run on this host.
    """
    if router_url:
        host = urlsplit(router_url if "://" in router_url else f"http://{router_url}").hostname
        if not router_url.strip().isdigit() and not is_local_host(host or ""):
            raise ControlError(
                f"{router_url} is not on this host; --local needs the machine it runs on"
            )
        names = [segment_name_for_port(port_of(router_url))]
    else:
        default = segment_name_for_port(30000)
        found = list_segments()
        names = [default] if default in found or len(found) != 1 else found
    for name in names:
        try:
            with StateTable.attach(name) as table:
                info = table.info()
        except StateTableError:
            continue
        if info.owner_alive():
            return info
    where = f"behind {router_url}" if router_url else "on this host"
    raise ControlError(
        f"no running `sglctl up` {where} (looked for state table {', '.join(names) or 'sglctl_*'})"
    )


def call(control_path: str, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request to the supervisor and return its reply (raises ControlError)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(control_path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if chunk.endswith(b"\n"):
                    break
    except TimeoutError as exc:
        raise ControlError(
            f"the supervisor did not answer within {timeout:g} s (raise --timeout to wait longer)"
        ) from exc
    except OSError as exc:
        raise ControlError(f"cannot reach the supervisor at {control_path}: {exc}") from exc
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise ControlError("the supervisor sent an unreadable reply") from exc
    if not isinstance(reply, dict):
        raise ControlError("the supervisor sent an unreadable reply")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "request refused")))
    return reply


def add_local_worker(
    router_url: str | None = None, timeout: float = 1800.0, role: str | None = None
) -> dict[str, Any]:
    """Ask the local supervisor for one more worker; returns once it is healthy (or failed).

    ``role`` (prefill or decode) picks the pool of a PD layout. ``timeout`` bounds only this
    client's wait: the worker keeps starting if it runs out.
    """
    info = find_local_run(router_url)
    request: dict[str, Any] = {"op": "add"}
    if role is not None:
        request["role"] = role
    return call(info.control_path, request, timeout=timeout)


def remove_managed_worker(worker_url: str, router_url: str | None = None) -> dict[str, Any] | None:
    """Stop a worker managed by a local ``sglctl up``; None when no local run manages it."""
    try:
        info = find_local_run(router_url)
    except ControlError:
        return None
    managed = call(info.control_path, {"op": "list"}, timeout=10)
    wanted = worker_url.rstrip("/")
    if not any(w.get("url") == wanted for w in managed.get("workers", [])):
        return None
    return call(info.control_path, {"op": "remove", "url": wanted}, timeout=120)
