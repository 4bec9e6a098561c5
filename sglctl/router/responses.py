"""JSON answers shared by every handler module (errors have their own: :mod:`.errors`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.responses import Response, StreamingResponse


def json_response(data: Any, status: int = 200) -> Response:
    """``data`` as an ``application/json`` response (orjson: fast, and strict about types)."""
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


class Answer:
    """A worker's answer for the client, before any server framework sees it.

    Why not a Starlette ``Response``: the lean server path (:mod:`~sglctl.router.fastpath`)
    writes status, headers and body to the transport itself, and building a ``Response`` per
    request (header encoding, ``init_headers``) was a few percent of a request's CPU for
    nothing. The Starlette route converts with :meth:`to_starlette`.

    ``raw_headers`` are (lower-case name, value) pairs, ``content-length`` included for a
    whole body; ``body_iterator`` is set (and ``body`` empty) for a relayed stream.
    """

    __slots__ = ("body", "body_iterator", "raw_headers", "status_code")

    def __init__(
        self,
        status_code: int,
        raw_headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
        body_iterator: AsyncIterator[bytes] | None = None,
    ) -> None:
        self.status_code = status_code
        self.raw_headers = raw_headers
        self.body = body
        self.body_iterator = body_iterator

    def to_starlette(self) -> Response:
        """The same answer as a Starlette response (for the Starlette route)."""
        response: Response
        if self.body_iterator is not None:
            response = StreamingResponse(self.body_iterator, status_code=self.status_code)
            response.raw_headers = list(self.raw_headers)
        else:
            response = Response(status_code=self.status_code)
            response.body = self.body
            response.raw_headers = list(self.raw_headers)
        return response


def whole_headers(status: int, length: int) -> list[tuple[bytes, bytes]]:
    """The framing header of a whole body (none for 1xx, 204 and 304, as Starlette does)."""
    if status < 200 or status in (204, 304):
        return []
    return [(b"content-length", b"%d" % length)]


#: What the forwarder hands back: an :class:`Answer`, or (PD mode's own answers) a Response.
Reply = Answer | Response
