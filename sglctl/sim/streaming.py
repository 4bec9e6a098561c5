"""A server-sent-events response that notices a client going away *while it waits*.

Starlette's ``StreamingResponse`` (ASGI spec 2.4) only learns about a disconnect when a send
fails, i.e. at the next token; a request still queued or prefilling would keep its batch slot
and KV until then. This response listens for ``http.disconnect`` the whole time and calls
``on_disconnect`` at once, which aborts the simulated requests and so ends the stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from starlette.types import Receive, Scope, Send

from sglctl.sim.service import watch_disconnect

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def sse(data: bytes) -> bytes:
    """One SSE event carrying ``data`` (already-encoded JSON or ``[DONE]``)."""
    return b"data: " + data + b"\n\n"


DONE = sse(b"[DONE]")


class EventStream:
    """ASGI response streaming ``chunks``; ``on_disconnect`` runs if the client leaves early."""

    def __init__(self, chunks: AsyncIterator[bytes], on_disconnect: Callable[[], None]) -> None:
        self.chunks = chunks
        self.on_disconnect = on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        watcher = watch_disconnect(receive, self.on_disconnect)
        try:
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away between two chunks
            self.on_disconnect()
        finally:
            watcher.cancel()
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
