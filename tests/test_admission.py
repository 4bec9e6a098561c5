"""Unit tests for admission control: slots, the priority queue, timeouts, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from sglctl.router.admission import (
    PRIORITY_NAMES,
    AdmissionController,
    QueueFull,
    QueueTimeout,
    parse_priority,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def until(predicate: object, limit: int = 1000) -> None:
    """Let the loop run until ``predicate()`` holds (no wall-clock sleeping)."""
    for _ in range(limit):
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def hold(controller: AdmissionController, priority: int, release: asyncio.Event) -> None:
    async with controller.admit(priority):
        await release.wait()


# -- parse_priority --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, 0),
        ("high", PRIORITY_NAMES["high"]),
        ("HIGH", 10),
        (" low ", -10),
        ("normal", 0),
        (0, 0),
        (7, 7),
        (-3, -3),
        (2**31 - 1, 2**31 - 1),
    ],
)
def test_parse_priority_accepts(value: object, expected: int) -> None:
    assert parse_priority(value) == expected


@pytest.mark.parametrize(
    "value", [True, False, 1.5, 1.0, "urgent", "5", "", [1], {"p": 1}, 2**31, -(2**31) - 1, 10**100]
)
def test_parse_priority_refuses(value: object) -> None:
    with pytest.raises(ValueError, match="priority"):
        parse_priority(value)


def test_named_priorities_are_ordered() -> None:
    assert parse_priority("high") > parse_priority("normal") > parse_priority("low")


# -- the controller --------------------------------------------------------------------------
async def test_disabled_controller_admits_everything() -> None:
    controller = AdmissionController(max_concurrent=-1, queue_size=0)
    assert not controller.enabled
    release = asyncio.Event()
    tasks = [asyncio.create_task(hold(controller, 0, release)) for _ in range(50)]
    await until(lambda: all(not t.done() for t in tasks))
    release.set()
    await asyncio.gather(*tasks)
    assert controller.active == 0


async def test_slots_then_queue_then_handoff() -> None:
    controller = AdmissionController(max_concurrent=2, queue_size=10, queue_timeout_secs=30)
    first, second = asyncio.Event(), asyncio.Event()
    a = asyncio.create_task(hold(controller, 0, first))
    b = asyncio.create_task(hold(controller, 0, second))
    await until(lambda: controller.active == 2)
    third = asyncio.Event()
    c = asyncio.create_task(hold(controller, 0, third))
    await until(lambda: controller.queued == 1)
    assert controller.active == 2
    first.set()
    await a
    await until(lambda: controller.queued == 0)
    assert controller.active == 2  # the slot went straight to the waiter
    second.set()
    third.set()
    await asyncio.gather(b, c)
    assert controller.active == 0 and controller.queued == 0
    stats = controller.stats()
    assert stats.admitted_total == 3 and stats.queued_total == 1


async def test_queue_serves_higher_priority_first_and_fifo_within_a_priority() -> None:
    controller = AdmissionController(max_concurrent=1, queue_size=10, queue_timeout_secs=30)
    gate = asyncio.Event()
    blocker = asyncio.create_task(hold(controller, 0, gate))
    await until(lambda: controller.active == 1)
    order: list[str] = []

    async def job(name: str, priority: int) -> None:
        async with controller.admit(priority):
            order.append(name)

    arrivals = [("low", -10), ("n1", 0), ("high", 10), ("n2", 0), ("five", 5), ("n3", 0)]
    tasks = []
    for i, (name, prio) in enumerate(arrivals):
        tasks.append(asyncio.create_task(job(name, prio)))
        await until(lambda i=i: controller.queued == i + 1)
    gate.set()
    await asyncio.gather(blocker, *tasks)
    assert order == ["high", "five", "n1", "n2", "n3", "low"]


async def test_full_queue_refuses_with_retry_after() -> None:
    controller = AdmissionController(max_concurrent=1, queue_size=2, queue_timeout_secs=30)
    gate = asyncio.Event()
    tasks = [asyncio.create_task(hold(controller, 0, gate)) for _ in range(3)]
    await until(lambda: controller.active == 1 and controller.queued == 2)
    with pytest.raises(QueueFull) as info:
        await controller.acquire(0)
    assert info.value.retry_after >= 1
    assert info.value.reason == "queue_full"
    assert controller.stats().rejected_full_total == 1
    gate.set()
    await asyncio.gather(*tasks)


async def test_higher_priority_displaces_the_lowest_waiter_when_full() -> None:
    controller = AdmissionController(max_concurrent=1, queue_size=2, queue_timeout_secs=30)
    gate = asyncio.Event()
    blocker = asyncio.create_task(hold(controller, 0, gate))
    await until(lambda: controller.active == 1)
    low_old = asyncio.create_task(hold(controller, -10, gate))
    await until(lambda: controller.queued == 1)
    low_new = asyncio.create_task(hold(controller, -10, gate))
    await until(lambda: controller.queued == 2)
    high = asyncio.create_task(hold(controller, 10, gate))
    await until(lambda: low_new.done())
    with pytest.raises(QueueFull, match="displaced"):
        low_new.result()  # the newest of the lowest priority leaves
    assert not low_old.done()
    assert controller.queued == 2
    # an equal-priority newcomer does not displace anyone
    with pytest.raises(QueueFull):
        await controller.acquire(-10)
    gate.set()
    await asyncio.gather(blocker, low_old, high)
    assert controller.active == 0


async def test_queue_timeout() -> None:
    controller = AdmissionController(max_concurrent=1, queue_size=5, queue_timeout_secs=0.05)
    gate = asyncio.Event()
    blocker = asyncio.create_task(hold(controller, 0, gate))
    await until(lambda: controller.active == 1)
    with pytest.raises(QueueTimeout) as info:
        await controller.acquire(0)
    assert info.value.retry_after >= 1
    assert controller.queued == 0
    assert controller.stats().rejected_timeout_total == 1
    gate.set()
    await blocker
    assert controller.active == 0


async def test_cancelled_waiter_leaves_the_queue() -> None:
    controller = AdmissionController(max_concurrent=1, queue_size=5, queue_timeout_secs=30)
    gate = asyncio.Event()
    blocker = asyncio.create_task(hold(controller, 0, gate))
    await until(lambda: controller.active == 1)
    waiter = asyncio.create_task(hold(controller, 0, gate))
    await until(lambda: controller.queued == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert controller.queued == 0
    gate.set()
    await blocker
    assert controller.active == 0
    assert controller.stats().cancelled_total == 1


async def test_slot_handed_to_a_waiter_cancelled_in_the_same_tick_passes_on() -> None:
    controller = AdmissionController(max_concurrent=1, queue_size=5, queue_timeout_secs=30)
    await controller.acquire(0)
    doomed = asyncio.create_task(controller.acquire(0))
    await until(lambda: controller.queued == 1)
    controller.release()  # hands the slot to ``doomed``...
    doomed.cancel()  # ...which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert controller.active == 0  # the slot was not leaked
    await controller.acquire(0)
    assert controller.active == 1


async def test_slot_released_when_the_body_raises() -> None:
    controller = AdmissionController(max_concurrent=1, queue_size=0)
    with pytest.raises(RuntimeError):
        async with controller.admit(0):
            raise RuntimeError("boom")
    assert controller.active == 0
    async with controller.admit(0):
        assert controller.active == 1


async def test_queue_size_zero_refuses_at_once_when_busy() -> None:
    controller = AdmissionController(max_concurrent=1, queue_size=0)
    await controller.acquire(0)
    with pytest.raises(QueueFull):
        await controller.acquire(10)
    controller.release()
    assert controller.active == 0


def test_release_without_acquire_does_not_go_negative() -> None:
    controller = AdmissionController(max_concurrent=2)
    controller.release()
    assert controller.active == 0


async def test_retry_after_hint_follows_the_release_rate() -> None:
    now = [0.0]
    controller = AdmissionController(
        max_concurrent=2, queue_size=10, queue_timeout_secs=60, clock=lambda: now[0]
    )
    assert controller.retry_after_hint() == 1  # nothing measured yet
    await controller.acquire(0)
    await controller.acquire(0)
    gate = asyncio.Event()
    waiters = [asyncio.create_task(hold(controller, 0, gate)) for _ in range(3)]
    await until(lambda: controller.queued == 3)
    controller.release()
    now[0] += 2.0
    controller.release()  # a slot frees every 2 s
    await until(lambda: controller.queued == 1)
    # one waiter ahead + the newcomer: about 2 x 2 s
    assert controller.retry_after_hint() == 4
    controller.queue_timeout_secs = 3
    assert controller.retry_after_hint() == 3  # never more than the queue timeout
    gate.set()
    await asyncio.gather(*waiters)
    assert controller.active == 0
