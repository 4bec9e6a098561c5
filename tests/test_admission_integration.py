"""Admission control through a real router: the queue's order, 429 with Retry-After, 400s."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest

from sglctl.net import find_free_port

pytestmark = pytest.mark.timeout(120)


def body(tokens: int, priority: object = None) -> dict[str, object]:
    payload: dict[str, object] = {
        "text": "admission",
        "sampling_params": {"max_new_tokens": tokens},
    }
    if priority is not None:
        payload["priority"] = priority
    return payload


async def queued(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    match = re.search(r"^sglang_router_queued_requests (\S+)$", text, re.M)
    assert match, "queue gauge missing from /metrics"
    return float(match.group(1))


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


def start_router(procs, *extra: str):  # type: ignore[no-untyped-def]
    # speedup 1: a 300-token generation holds the only slot for about two seconds.
    worker = procs.sim_worker("--speedup", "1")
    return procs.router(
        [worker.url],
        "--metrics-port",
        str(find_free_port()),
        "--max-concurrent-requests",
        "1",
        *extra,
    )


def test_queue_serves_high_priority_first(procs) -> None:  # type: ignore[no-untyped-def]
    router = start_router(procs, "--queue-size", "10", "--queue-timeout-secs", "60")

    async def scenario() -> list[str]:
        done: list[str] = []
        async with httpx.AsyncClient(base_url=router.url, timeout=60, trust_env=False) as client:

            async def send(name: str, tokens: int, priority: object = None) -> None:
                response = await client.post("/generate", json=body(tokens, priority))
                assert response.status_code == 200, response.text
                done.append(name)

            blocker = asyncio.create_task(send("blocker", 300))
            await until(lambda: _load_is(client, 1))
            tasks = [blocker]
            for n, (name, prio) in enumerate(
                [("low", "low"), ("normal", None), ("int5", 5), ("high", "high")], start=1
            ):
                tasks.append(asyncio.create_task(send(name, 1, prio)))
                await until(lambda n=n: _queued_is(client, n))
            await asyncio.gather(*tasks)
        return done

    assert asyncio.run(scenario()) == ["blocker", "high", "int5", "normal", "low"]


async def _load_is(client: httpx.AsyncClient, n: int) -> bool:
    workers = (await client.get("/workers")).json()["workers"]
    return sum(int(w["load"]) for w in workers) == n


async def _queued_is(client: httpx.AsyncClient, n: int) -> bool:
    return await queued(client) == n


def test_full_queue_answers_429_with_retry_after(procs) -> None:  # type: ignore[no-untyped-def]
    router = start_router(procs, "--queue-size", "1", "--queue-timeout-secs", "60")

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=router.url, timeout=60, trust_env=False) as client:
            blocker = asyncio.create_task(client.post("/generate", json=body(300)))
            await until(lambda: _load_is(client, 1))
            low = asyncio.create_task(client.post("/generate", json=body(1, "low")))
            await until(lambda: _queued_is(client, 1))

            refused = await client.post("/generate", json=body(1, "low"))
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == 429

            # a higher priority takes the queued low request's place; the low one gets the 429
            high = asyncio.create_task(client.post("/generate", json=body(1, "high")))
            displaced = await low
            assert displaced.status_code == 429 and "retry-after" in displaced.headers
            assert (await high).status_code == 200
            assert (await blocker).status_code == 200

    asyncio.run(scenario())


def test_queue_timeout_answers_429(procs) -> None:  # type: ignore[no-untyped-def]
    router = start_router(procs, "--queue-size", "5", "--queue-timeout-secs", "0.3")

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=router.url, timeout=60, trust_env=False) as client:
            blocker = asyncio.create_task(client.post("/generate", json=body(300)))
            await until(lambda: _load_is(client, 1))
            started = time.monotonic()
            waited = await client.post("/generate", json=body(1))
            elapsed = time.monotonic() - started
            assert waited.status_code == 429
            assert int(waited.headers["retry-after"]) >= 1
            assert "queue" in waited.json()["error"]["message"]
            assert not blocker.done(), "the blocker must still hold the slot"
            assert (await blocker).status_code == 200
            assert elapsed < 10  # it gave up at its queue timeout, not when the slot freed

    asyncio.run(scenario())


def test_invalid_priority_is_a_400(procs) -> None:  # type: ignore[no-untyped-def]
    worker = procs.sim_worker("--speedup", "100")
    router = procs.router(
        [worker.url], "--metrics-port", str(find_free_port()), "--max-concurrent-requests", "4"
    )
    with httpx.Client(base_url=router.url, timeout=30, trust_env=False) as client:
        for priority in ["urgent", 1.5, True, [1], {"p": 1}, "5", 2**40]:
            response = client.post("/generate", json=body(1, priority))
            assert response.status_code == 400, (priority, response.text)
            assert "priority" in response.json()["error"]["message"]
        for priority in ["high", "LOW", 3, -7]:
            assert client.post("/generate", json=body(1, priority)).status_code == 200
