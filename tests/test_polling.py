"""sglctl.polling: the package's one poll-with-deadline helper."""

from __future__ import annotations

import asyncio

import pytest

from sglctl.polling import PollTimeout, poll, poll_sync


def test_poll_sync_returns_the_first_non_none_value() -> None:
    answers = iter([None, None, "ready"])
    assert poll_sync(lambda: next(answers), 5.0, interval=0.001) == "ready"


def test_poll_sync_times_out_with_the_last_reason() -> None:
    def check() -> None:
        raise ConnectionError("refused")

    with pytest.raises(PollTimeout) as info:
        poll_sync(check, 0.05, what="worker health", interval=0.01, retry_on=(ConnectionError,))
    assert "worker health" in str(info.value)
    assert "refused" in str(info.value)


def test_poll_sync_unexpected_errors_propagate() -> None:
    def check() -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        poll_sync(check, 1.0, retry_on=(ConnectionError,))


def test_poll_stops_at_once_when_the_awaited_thing_died() -> None:
    async def check() -> None:
        return None

    with pytest.raises(PollTimeout) as info:
        asyncio.run(poll(check, 60.0, what="router", alive=lambda: False))
    assert info.value.gave_up == "it exited"


def test_poll_async_value() -> None:
    calls = {"n": 0}

    async def check() -> int | None:
        calls["n"] += 1
        return calls["n"] if calls["n"] >= 3 else None

    assert asyncio.run(poll(check, 5.0, interval=0.001)) == 3
