"""The :class:`~sglctl.router.upstream.Upstream` interface over an httpx transport.

Used for ``--upstream-client httpx``, for https workers behind the native client
(its ``fallback``), and whenever a test injects an in-process transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import httpx

from sglctl.router.upstream import UpstreamError, UpstreamTimeout

log = logging.getLogger(__name__)


class HttpxResponse:
    """An ``httpx.Response`` (streamed) behind the ``UpstreamResponse`` interface."""

    def __init__(self, response: httpx.Response, deadline: float) -> None:
        self._response = response
        self._deadline = deadline
        self.status = response.status_code
        self._chunks: AsyncIterator[bytes] | None = None

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    async def read(self) -> bytes:
        with _mapped_errors():
            return await self._response.aread()

    def __aiter__(self) -> HttpxResponse:
        return self

    async def __anext__(self) -> bytes:
        if self._chunks is None:
            self._chunks = self._response.aiter_raw()
        with _mapped_errors():
            return await self._chunks.__anext__()

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        except Exception:  # closing a broken connection can fail; it is gone either way
            log.debug("closing upstream response failed", exc_info=True)


class HttpxUpstream:
    """The hot path over an httpx transport (``--upstream-client httpx``)."""

    def __init__(self, transport: httpx.AsyncBaseTransport, connect_timeout: float = 10.0) -> None:
        self.transport = transport
        self.connect_timeout = connect_timeout
        self._urls: dict[str, httpx.URL] = {}

    async def request(
        self,
        base_url: str,
        method: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        deadline: float,
    ) -> HttpxResponse:
        url = base_url + path.decode("latin-1")
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) > 4096:
                self._urls.clear()
            parsed = self._urls[url] = httpx.URL(url)
        remaining = max(deadline - asyncio.get_running_loop().time(), 0.001)
        timeout = {
            "connect": min(self.connect_timeout, remaining),
            "read": remaining,
            "write": remaining,
            "pool": remaining,
        }
        request = httpx.Request(
            method.decode("latin-1"),
            parsed,
            headers=headers,
            content=body,
            extensions={"timeout": timeout},
        )
        with _mapped_errors():
            response = await self.transport.handle_async_request(request)
        return HttpxResponse(response, deadline)

    def close_all(self) -> None:
        pass  # the transport belongs to the shared client, which closes it


@contextlib.contextmanager
def _mapped_errors() -> Iterator[None]:
    """httpx's exceptions as :class:`UpstreamError` / :class:`UpstreamTimeout`."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(_describe(exc)) from None
    except (httpx.TransportError, httpx.StreamError) as exc:
        raise UpstreamError(_describe(exc)) from None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
