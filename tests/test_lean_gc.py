"""A whole answer on the callback path leaves no reference cycle for the garbage collector.

Why: each request's objects (the cycle, its attempt, the worker's response, the in-flight
watch, the context, the metrics observation, ~30 in all) used to stay in reference cycles
(``response.sink`` <-> ``attempt.response``, ``watch.task`` <-> ``attempt.watch``), so only
the collector freed them; its young-generation passes were ~9% of a request's instructions
(``benchmarks/PROFILE.md``, lean13's section). Freed by reference counting, they never reach it.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from test_critical_path import client_for, setup, warm

from sglctl.router import direct, fastpath, upstream_native
from sglctl.router.inflight import Watch

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

_PER_REQUEST = (direct.WholeAttempt, fastpath.LeanCycle, upstream_native.NativeResponse, Watch)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def saved_garbage() -> Iterator[list[object]]:
    """The collector off, and what it finds unreachable kept in ``gc.garbage`` for the test."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.garbage.clear()
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _stranded(garbage: list[object]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for obj in garbage:
        if isinstance(obj, _PER_REQUEST):
            name = type(obj).__name__
            counts[name] = counts.get(name, 0) + 1
    return counts


async def test_whole_answers_on_the_callback_path_leave_no_cyclic_garbage(
    saved_garbage: list[object],
) -> None:
    async with setup() as s, client_for(s) as client:
        await warm(s, client)
        gc.collect()
        saved_garbage.clear()  # the warm-up's task-path request, start-up
        for i in range(20):
            r = await client.post("/generate", json={"text": f"hello {i}"})
            assert r.status_code == 200
        assert s.served == ["callback"] * 20
        gc.collect()
        # At most the last request's cycle may still be referenced (the connection's
        # current cycle is freed with the next request), never one per request.
        stranded = _stranded(saved_garbage)
        assert all(n <= 1 for n in stranded.values()), stranded
