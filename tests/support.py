"""The tests' one way to wait: poll a predicate with a deadline, fail with what was awaited.

No test sleeps to synchronise; it polls for the state it needs. ``wait_until`` returns the
seconds it took, so timing tests can assert on it. Also: the prompts of the replica tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.01,
) -> float:
    """Call ``predicate()`` until it is truthy; the seconds it took. AssertionError on timeout.

    Exceptions from ``predicate`` propagate: a check that cannot be evaluated is a failure,
    not a "not yet" (wrap it in the test when a connection error means "not up yet").
    """
    start = time.monotonic()
    while not predicate():
        elapsed = time.monotonic() - start
        if elapsed > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


async def async_wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.005,
) -> float:
    """:func:`wait_until` for tests running inside an event loop."""
    import asyncio

    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - start


def conversation(conv: int, turns: int) -> str:
    """Conversation ``conv``'s prompt after ``turns`` turns: a 200-token system prompt shared by
    all, then 400 tokens a turn (what the router-replica tests route)."""
    from sglctl.sim.tokenizer import text_for_tokens

    system = text_for_tokens(200, "system prompt")
    return system + "".join(text_for_tokens(400, f"conv {conv} turn {t}") for t in range(turns))
