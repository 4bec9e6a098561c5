#!/usr/bin/env python3
"""The floor: the least a Python HTTP proxy can cost per request on this machine.

Why: ``bench_throughput.py`` says how much CPU sglctl's router spends per request, but not how
much of it any Python proxy would pay anyway (two sockets' syscalls, two HTTP parses, the
event loop). This proxy does only that: uvloop, httptools on both sides, pooled keep-alive
connections to the upstreams (round robin, no routing decision, no retries, no limits, no
metrics), plain callbacks (no task and no coroutine per request). Whatever sglctl spends
above this figure is its own work; the figure itself is what no Python design gets under.

What it relays: a whole answer (``content-length``) as one write of head and body; a chunked
answer (an SSE stream) re-chunked piece by piece as the upstream's bytes arrive. One request
at a time per client connection (wrk does not pipeline). Not for production: no timeouts,
no header limits, errors close the connection.

    python benchmarks/floor_proxy.py --port 8000 --worker-urls http://127.0.0.1:9001 ...

``bench_throughput.py --floor`` runs it as a third row beside the two routers.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
from collections import deque
from urllib.parse import urlsplit

import httptools
import uvloop

_REQUEST = b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
_OK_HEALTH = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class Upstream(asyncio.Protocol):
    """One keep-alive connection to an upstream, carrying one request at a time."""

    def __init__(self, pool: deque[Upstream]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.chunked = False
        self.head: list[bytes] = []
        self.parts: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None:
            self.client.transport.close()

    def on_message_begin(self) -> None:
        self.chunked = False
        self.head = []
        self.parts = []

    def on_header(self, name: bytes, value: bytes) -> None:
        low = name.lower()
        if low == b"transfer-encoding":
            self.chunked = True
        elif low == b"content-type":
            self.head.append(b"content-type: " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        if self.chunked and self.client is not None:
            head = b"HTTP/1.1 200 OK\r\n" + b"".join(self.head)
            self.client.transport.write(head + b"transfer-encoding: chunked\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self.chunked:
            if self.client is not None:
                self.client.transport.write(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self.parts.append(body)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        if self.chunked:
            client.transport.write(b"0\r\n\r\n")
        else:
            data = b"".join(self.parts)
            client.transport.write(
                b"HTTP/1.1 200 OK\r\n%scontent-length: %d\r\n\r\n%s"
                % (b"".join(self.head), len(data), data)
            )
        self.pool.append(self)


class Client(asyncio.Protocol):
    """One client connection: parse a request, hand it to an upstream connection."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.url = b""
        self.body: list[bytes] = []
        self.content_type = b"application/json"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.parser.get_method() != b"POST":
            self.transport.write(_OK_HEALTH)  # the benchmark's readiness probes
            return
        self.proxy.forward(self, self.url, b"".join(self.body))


class Proxy:
    """Round robin over the upstreams' idle-connection stacks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, urls: list[str]) -> None:
        self.loop = loop
        self.origins: list[tuple[str, int, bytes, deque[Upstream]]] = []
        for url in urls:
            parts = urlsplit(url)
            pool: deque[Upstream] = deque()
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            self.origins.append((host, port, parts.netloc.encode(), pool))
        self.turn = itertools.cycle(range(len(self.origins)))

    def forward(self, client: Client, url: bytes, body: bytes) -> None:
        host, port, netloc, pool = self.origins[next(self.turn)]
        request = _REQUEST % (url, netloc, client.content_type, len(body), body)
        if pool:
            upstream = pool.pop()
            upstream.client = client
            assert upstream.transport is not None
            upstream.transport.write(request)
            return
        self.loop.create_task(self._connect(client, host, port, pool, request))

    async def _connect(
        self, client: Client, host: str, port: int, pool: deque[Upstream], request: bytes
    ) -> None:
        _, upstream = await self.loop.create_connection(lambda: Upstream(pool), host, port)
        upstream.client = client
        assert upstream.transport is not None
        upstream.transport.write(request)


async def serve(host: str, port: int, urls: list[str]) -> None:
    loop = asyncio.get_running_loop()
    proxy = Proxy(loop, urls)
    server = await loop.create_server(lambda: Client(proxy), host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--worker-urls", nargs="+", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.worker_urls))


if __name__ == "__main__":
    main()
