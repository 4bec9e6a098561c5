"""Waiting for a condition with a deadline: the one helper every "poll until ..." loop uses.

Start-up waits (a worker's first ``/health``, the router's ``/readiness``, an admin call that
waits for a new worker) all have the same shape: ask, and if the answer is not there yet, wait
a little and ask again until a deadline; stop at once when the thing waited for has died. Two
flavours, one contract: :func:`poll` for asyncio code, :func:`poll_sync` for blocking code.

The check returns ``None`` (or raises one of ``retry_on``) for "not yet", anything else for
"done", and that value is returned. On timeout the last "not yet" reason is kept in
:class:`PollTimeout` so callers can say *why* they gave up ("HTTP 503", "connection refused").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class PollTimeout(Exception):
    """The deadline passed (or the awaited thing died) before the check succeeded."""

    def __init__(self, what: str, timeout: float, last: str | None, gave_up: str | None = None):
        self.what = what
        self.timeout = timeout
        self.last = last
        self.gave_up = gave_up
        reason = gave_up or f"not within {timeout:g} s"
        super().__init__(f"{what}: {reason}" + (f" (last: {last})" if last else ""))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def poll(
    check: Callable[[], Awaitable[T | None]],
    timeout: float,
    *,
    what: str = "condition",
    interval: float = 0.05,
    retry_on: tuple[type[BaseException], ...] = (),
    alive: Callable[[], bool] | None = None,
) -> T:
    """Await ``check()`` every ``interval`` s until it returns non-None; return that value.

    ``alive()`` returning False (the process we wait for exited) ends the wait at once.
    Raises :class:`PollTimeout` with the last failure when ``timeout`` s pass first.
    """
    deadline = time.monotonic() + timeout
    last: str | None = None
    while True:
        if alive is not None and not alive():
            raise PollTimeout(what, timeout, last, gave_up="it exited")
        try:
            result = await check()
        except retry_on as exc:
            last = _describe(exc)
        else:
            if result is not None:
                return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PollTimeout(what, timeout, last)
        await asyncio.sleep(min(interval, remaining))


def poll_sync(
    check: Callable[[], T | None],
    timeout: float,
    *,
    what: str = "condition",
    interval: float = 0.05,
    retry_on: tuple[type[BaseException], ...] = (),
    alive: Callable[[], bool] | None = None,
) -> T:
    """:func:`poll` for blocking code (CLI commands, benchmarks)."""
    deadline = time.monotonic() + timeout
    last: str | None = None
    while True:
        if alive is not None and not alive():
            raise PollTimeout(what, timeout, last, gave_up="it exited")
        try:
            result = check()
        except retry_on as exc:
            last = _describe(exc)
        else:
            if result is not None:
                return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PollTimeout(what, timeout, last)
        time.sleep(min(interval, remaining))
