"""What the proxy needs from an HTTP client to the workers, and the errors it raises.

Two clients implement :class:`Upstream`: the native one (:mod:`~sglctl.router.upstream_native`,
the default; why it exists is said there, with the figure) and an adapter over an httpx
transport (:mod:`~sglctl.router.upstream_httpx`, ``--upstream-client httpx`` and the
in-process tests). Both raise :class:`UpstreamError` when the worker did not serve the request
and :class:`UpstreamTimeout` when a deadline passed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol


class UpstreamError(Exception):
    """The worker did not (fully) serve the request: connect, reset, protocol errors."""


class UpstreamTimeout(UpstreamError):
    """A deadline passed while waiting for the worker."""


class UpstreamResponse(Protocol):
    """What the proxy needs from a worker's answer (either client)."""

    status: int

    def header(self, name: str) -> str | None: ...

    async def read(self) -> bytes: ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def __anext__(self) -> bytes: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    """What the proxy needs from an upstream client (either client)."""

    async def request(
        self,
        base_url: str,
        method: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        deadline: float,
    ) -> UpstreamResponse: ...

    def close_all(self) -> None: ...
