#!/usr/bin/env python3
"""A near-free SGLang-shaped upstream for router benchmarks: raw asyncio, no framework.

Why hand-written: ``bench_throughput.py`` measures the *router*, so the worker behind it must
cost next to nothing per request. A Starlette or even a plain uvicorn app spends more CPU per
request than the router under test (~100-200 us), which would make the upstream the
bottleneck and hide the router's cost. This responder parses just enough HTTP/1.1 (request
line, ``Content-Length``, keep-alive) and answers from pre-built byte strings; on uvloop it
serves tens of thousands of requests a second on one core (the benchmark prints the figure,
"direct" rows).

What it answers:

- ``POST /generate`` (and any other POST): at once, a fixed small JSON body with
  ``Content-Length``; or, when the body contains ``"stream":true`` (with or without a space),
  an SSE stream (``Transfer-Encoding: chunked``) of ``--chunks`` events, then ``data: [DONE]``.
  Each event is its own socket write with an event-loop turn between two, so the router
  receives (and must relay) separate pieces, as from a real worker's decode loop;
  ``--chunk-gap-ms`` spaces them in time as well.
- ``GET /health`` (and ``/liveness``, ``/readiness``): 200, empty.
- ``GET /get_model_info``, ``/get_server_info``, ``/v1/models``, anything else: small JSON,
  so that routers that probe their workers at start-up get a plausible answer.

One process per upstream (``python benchmarks/upstream_stub.py --port P``); it exits on
SIGTERM/SIGINT. Nothing here imports sglctl.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

GENERATE_BODY = (
    b'{"text":" ok ok ok ok ok ok ok ok","meta_info":{"id":"stub","prompt_tokens":16,'
    b'"completion_tokens":8,"cached_tokens":0,"finish_reason":{"type":"length","length":8},'
    b'"e2e_latency":0.0}}'
)
_MODEL_INFO = b'{"model_path":"stub","tokenizer_path":"stub","is_generation":true}'
_MODELS = b'{"object":"list","data":[{"id":"stub","object":"model","owned_by":"sglctl"}]}'
_SERVER_INFO = b'{"model_path":"stub","version":"stub","max_total_num_tokens":1000000}'
_STREAM_MARKERS = (b'"stream":true', b'"stream": true')


def _whole(status: bytes, body: bytes, content_type: bytes = b"application/json") -> bytes:
    """A complete keep-alive response, built once at import."""
    head = (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type + b"\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    return head + body


_OK_EMPTY = _whole(b"200 OK", b"")
_OK_GENERATE = _whole(b"200 OK", GENERATE_BODY)
_OK_MODEL_INFO = _whole(b"200 OK", _MODEL_INFO)
_OK_MODELS = _whole(b"200 OK", _MODELS)
_OK_SERVER_INFO = _whole(b"200 OK", _SERVER_INFO)
_OK_JSON = _whole(b"200 OK", b"{}")
_BAD_REQUEST = _whole(b"400 Bad Request", b'{"error":"bad request"}')
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_GETS = {
    b"/health": _OK_EMPTY,
    b"/liveness": _OK_EMPTY,
    b"/readiness": _OK_EMPTY,
    b"/get_model_info": _OK_MODEL_INFO,
    b"/get_server_info": _OK_SERVER_INFO,
    b"/v1/models": _OK_MODELS,
}


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk of chunked transfer encoding."""
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


def stream_events(count: int = 32) -> list[str]:
    """The payloads of the ``count`` SSE events (cumulative text, as SGLang sends), then [DONE]."""
    events = [
        '{"text":"' + " ok" * i + '","meta_info":{"id":"stub","completion_tokens":' + f"{i}}}}}"
        for i in range(1, count + 1)
    ]
    return [*events, "[DONE]"]


def stream_chunks(count: int) -> list[bytes]:
    """The HTTP chunks of a stream: one an event, the last one also ends the body."""
    out = [_chunk(f"data: {event}\n\n".encode()) for event in stream_events(count)]
    out[-1] += b"0\r\n\r\n"
    return out


class StubProtocol(asyncio.Protocol):
    """One client connection: requests handled strictly in order (keep-alive, pipelining)."""

    def __init__(self, chunks: list[bytes], gap: float) -> None:
        self.chunks = chunks
        self.gap = gap
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.streaming: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None:
            self.streaming.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.streaming is None:
            self._serve()

    def _serve(self) -> None:
        """Answer every complete request in the buffer (until a stream has to be sent)."""
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                try:
                    length = int(lower[at + 17 : stop if stop >= 0 else None])
                except ValueError:
                    self.transport.write(_BAD_REQUEST)
                    self.transport.close()
                    return
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = self.buffer[end + 4 : total]
            self.buffer = self.buffer[total:]
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            if method == b"POST":
                if any(marker in body for marker in _STREAM_MARKERS):
                    self.streaming = asyncio.ensure_future(self._stream())
                    return
                self.transport.write(_OK_GENERATE)
            else:
                self.transport.write(_GETS.get(path, _OK_JSON))

    async def _stream(self) -> None:
        try:
            transport = self.transport
            if transport is None:
                return
            transport.write(_STREAM_HEAD)
            for piece in self.chunks:
                # A loop turn (or a gap) between events: separate writes, as a worker's
                # decode steps produce them, so the router has pieces to relay.
                await asyncio.sleep(self.gap)
                if self.transport is None:
                    return
                transport.write(piece)
        finally:
            self.streaming = None
        if self.buffer:
            self._serve()


async def serve(host: str, port: int, chunks: int, gap_ms: float) -> None:
    loop = asyncio.get_running_loop()
    pieces = stream_chunks(chunks)
    gap = gap_ms / 1000.0
    server = await loop.create_server(
        lambda: StubProtocol(pieces, gap), host, port, reuse_address=True, backlog=4096
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"upstream stub on http://{host}:{port} ({chunks} chunks a stream)", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=32, help="SSE events per streamed answer.")
    parser.add_argument(
        "--chunk-gap-ms",
        type=float,
        default=0.0,
        help="Pause between two events (0: one loop turn).",
    )
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # plain asyncio still works, a little slower
        runner = asyncio.run  # type: ignore[assignment]
    runner(serve(args.host, args.port, args.chunks, args.chunk_gap_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
