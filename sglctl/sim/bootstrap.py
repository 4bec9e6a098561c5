"""The bootstrap channel between a prefill and a decode sim worker: minimal HTTP/1.0 on asyncio.

SGLang's prefill server runs a bootstrap server on ``--disaggregation-bootstrap-port``
through which decode workers find the prefill ranks and then move the KV over RDMA. The sim
folds both steps into one long-poll on that port, one connection per room::

    GET /kv/<room>?timeout=<s>   -> 200 {"room", "prompt_tokens", "cached_tokens",
                                         "kv_bytes", "transfer_s"}   once the KV "arrived"
                                 -> 410 {"error": ...}  the room was aborted on the prefill side
                                 -> 504 {"error": ...}  no KV within the timeout
    GET /health                  -> 200 {"status": "ok"}
    GET /route                   -> 200 {"disaggregation_mode": "prefill", "rooms": N}

Why hand-written instead of a second uvicorn server: the whole point is the connection's
life. The prefill side must notice the decode hanging up *while it waits* (to drop the room's
KV), and the decode side must see a dead prefill as a lost connection at once (a crash
mid-transfer). With one request a connection and ``Connection: close`` that is ~100 lines
of asyncio streams, no second server's signal handling, and exact control of both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16384
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 410: "Gone", 504: "Timeout"}


@dataclass
class BootstrapRequest:
    path: str
    query: dict[str, str]
    # Resolves when the peer closes its side (it gave up): a handler waits on it.
    peer_gone: asyncio.Event


Handler = Callable[[BootstrapRequest], Awaitable[tuple[int, dict[str, Any]]]]


class BootstrapServer:
    """Serves ``handler`` on ``host:port``; one request a connection."""

    def __init__(self, host: str, port: int, handler: Handler) -> None:
        self.host = host
        self.port = port
        self.handler = handler
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        log.info("bootstrap server listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        watcher: asyncio.Task[None] | None = None
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            if len(parts) < 2 or parts[0] != "GET":
                await _respond(writer, 400, {"error": f"bad request line {line!r}: GET only"})
                return
            url = urlsplit(parts[1])
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            gone = asyncio.Event()

            async def watch() -> None:
                with contextlib.suppress(Exception):
                    while await reader.read(1024):
                        pass
                gone.set()

            watcher = asyncio.create_task(watch())
            status, body = await self.handler(BootstrapRequest(url.path, query, gone))
            if not gone.is_set():
                await _respond(writer, status, body)
        except (ConnectionError, OSError):
            pass
        finally:
            if watcher is not None:
                watcher.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _respond(writer: asyncio.StreamWriter, status: int, body: dict[str, Any]) -> None:
    data = orjson.dumps(body)
    head = (
        f"HTTP/1.0 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + data)
    await writer.drain()


class BootstrapError(Exception):
    """The bootstrap peer could not be reached, hung up, or answered garbage."""


async def get_json(host: str, port: int, path: str) -> tuple[int, dict[str, Any]]:
    """One GET to a bootstrap server; raises :class:`BootstrapError` on any transport problem.

    No timeout here: the caller bounds the wait (``asyncio.timeout``) and a cancellation
    closes the connection, which is how the prefill side learns the decode gave up.
    """
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        raise BootstrapError(
            f"cannot connect to the bootstrap server {host}:{port}: {exc}"
        ) from None
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode("latin-1"))
        await writer.drain()
        raw = await reader.read(-1)
    except OSError as exc:
        raise BootstrapError(f"lost the connection to {host}:{port}: {exc}") from None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise BootstrapError(
            f"the bootstrap server {host}:{port} closed the connection before answering "
            "(prefill worker crashed or stopped?)"
        )
    try:
        status = int(head.split(b" ", 2)[1])
        parsed = orjson.loads(body)
    except (IndexError, ValueError) as exc:
        raise BootstrapError(f"bad answer from {host}:{port}: {exc}") from None
    if not isinstance(parsed, dict):
        raise BootstrapError(f"bad answer from {host}:{port}: not a JSON object")
    return status, parsed
