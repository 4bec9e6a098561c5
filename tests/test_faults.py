"""Fault injection with real sim workers behind a real router: nothing may be lost.

Each scenario runs a bounded load client against the router while workers crash
(``--crash-after``, SIGKILL), stall (``--stall-after``) or fail (``--error-rate``), and checks
what clients saw. Health checks run every 0.1 s (1.5 s timeout) so detection takes seconds and
the whole file stays quick; sim workers run with ``--speedup``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from sglctl.net import find_free_port
from sglctl.spawn import ManagedProcess

pytestmark = pytest.mark.timeout(180)

# The timeout is what a *healthy* worker gets to answer /health. At 0.5 s a loaded CI machine
# (load 7 on 2 cores) made both workers of test_stalled_worker_is_bypassed fail their checks;
# 1.5 s is still far below every bound the scenarios assert (a stall is detected in ~3 s).
FAST_HEALTH = [
    "--health-check-interval-secs",
    "0.1",
    "--health-check-timeout-secs",
    "1.5",
    "--health-failure-threshold",
    "2",
    "--health-success-threshold",
    "1",
]


def router_flags(*extra: str) -> list[str]:
    return ["--metrics-port", str(find_free_port()), "--log-level", "info", *FAST_HEALTH, *extra]


def gen_body(i: int, tokens: int = 8, stream: bool = False) -> dict[str, object]:
    return {
        "text": f"request {i}: tell me about fault tolerance",
        "sampling_params": {"max_new_tokens": tokens},
        "stream": stream,
    }


# -- load generation ---------------------------------------------------------------------------
@dataclass
class LoadResult:
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    started: int = 0

    errors: int = 0  # transport errors (no HTTP answer at all)

    @property
    def done(self) -> int:
        return sum(self.statuses.values()) + self.errors

    @property
    def lost(self) -> int:
        """Requests not answered 200 (other statuses and transport errors)."""
        return self.done - self.statuses[200]


async def run_load(
    client: httpx.AsyncClient,
    stop: asyncio.Event,
    result: LoadResult,
    *,
    concurrency: int,
    max_requests: int,
    tokens: int = 8,
) -> None:
    """Closed-loop load: ``concurrency`` loops sending /generate until ``stop`` or the cap."""

    async def loop() -> None:
        while not stop.is_set() and result.started < max_requests:
            i = result.started
            result.started += 1
            try:
                response = await client.post("/generate", json=gen_body(i, tokens))
                result.statuses[response.status_code] += 1
                if response.status_code != 200:
                    result.failures.append(f"{response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as exc:
                result.errors += 1
                result.failures.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(loop() for _ in range(concurrency)))


async def until(
    predicate: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.02
) -> float:
    """Poll ``predicate`` until true; return the seconds it took. Fails the test on timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await predicate():
            return time.monotonic() - started
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


async def worker_view(client: httpx.AsyncClient, url: str) -> dict[str, object]:
    workers = (await client.get("/workers")).json()["workers"]
    return next(w for w in workers if w["url"] == url)


async def metric(client: httpx.AsyncClient, name: str, labels: str = "") -> float:
    """Sum of a Prometheus sample family's values whose label set contains ``labels``."""
    text = (await client.get("/metrics")).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            match = re.match(rf"{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)", line)
            if match and labels in (match.group(1) or ""):
                total += float(match.group(2))
    return total


def done_after(result: LoadResult, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return result.done >= n

    return check


def dead(proc: ManagedProcess) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return not proc.alive()

    return check


def unhealthy(client: httpx.AsyncClient, url: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return not (await worker_view(client, url))["is_healthy"]

    return check


# -- scenarios -----------------------------------------------------------------------------------
def test_kill_sequence_loses_no_request(procs) -> None:  # type: ignore[no-untyped-def]
    """Three workers; one crashes by itself, one is SIGKILLed, one survives: every request 200."""
    crasher = procs.sim_worker("--speedup", "20", "--crash-after", "40")
    victim = procs.sim_worker("--speedup", "20")
    survivor = procs.sim_worker("--speedup", "20")
    router = procs.router(
        [crasher.url, victim.url, survivor.url], *router_flags("--policy", "round_robin")
    )

    async def scenario() -> tuple[LoadResult, float]:
        result = LoadResult()
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=router.url, timeout=30, trust_env=False) as client:
            load = asyncio.create_task(
                run_load(client, stop, result, concurrency=8, max_requests=3000)
            )
            try:
                # The crasher dies by itself after 40 of its requests (about 120 in all).
                await until(dead(crasher), timeout=60)
                await until(unhealthy(client, crasher.url), timeout=10)
                mark = result.done
                await until(done_after(result, mark + 60), timeout=60)
                victim.popen.kill()  # SIGKILL in the middle of the load
                killed_at = time.monotonic()
                await until(unhealthy(client, victim.url), timeout=10)
                detect = time.monotonic() - killed_at
                mark = result.done
                await until(done_after(result, mark + 100), timeout=60)
            finally:
                stop.set()
                await load
            retries = await metric(client, "sglang_router_retries_total")
            assert (await worker_view(client, survivor.url))["is_healthy"]
        assert retries > 0, "no retry happened: the kills did not hit in-flight requests"
        return result, detect

    result, detect = asyncio.run(scenario())
    assert result.done >= 220
    assert result.lost == 0, f"{result.lost} requests lost: {result.failures[:5]}"
    print(f"kill sequence: {result.done} requests, 0 lost, SIGKILL detected in {detect:.2f}s")


def test_stalled_worker_is_bypassed(procs) -> None:  # type: ignore[no-untyped-def]
    """A worker that stops answering is taken out within a few health intervals.

    Requests that were waiting on it when it stalled are retried elsewhere, since nothing had
    reached their clients yet; nobody waits for the request timeout.
    """
    staller = procs.sim_worker("--speedup", "20", "--stall-after", "15")
    healthy = procs.sim_worker("--speedup", "20")
    router = procs.router(
        [staller.url, healthy.url],
        *router_flags("--policy", "round_robin", "--request-timeout-secs", "60"),
    )

    async def scenario() -> tuple[LoadResult, float, float]:
        result = LoadResult()
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=router.url, timeout=60, trust_env=False) as client:
            started = time.monotonic()
            load = asyncio.create_task(
                run_load(client, stop, result, concurrency=4, max_requests=400)
            )
            try:
                detect = await until(unhealthy(client, staller.url), timeout=20)
                mark = result.done
                await until(done_after(result, mark + 60), timeout=30)
            finally:
                stop.set()
                await load
            total = time.monotonic() - started
        return result, detect, total

    result, detect, total = asyncio.run(scenario())
    assert result.lost == 0, f"{result.lost} requests lost: {result.failures[:5]}"
    # Detection is bounded by the health settings (2 failures x (0.1 s interval + 1.5 s
    # timeout)), not by the 60 s request timeout: the whole run must take far less than that.
    assert total < 60 / 2, f"the run took {total:.1f}s: requests waited for the request timeout"
    print(f"stall: detected in {detect:.2f}s, {result.done} requests, 0 lost")


def test_failing_worker_is_opened_by_the_breaker_and_recovers(procs) -> None:  # type: ignore[no-untyped-def]
    """A worker answering 500s: retries hide it from clients, the breaker opens, then closes."""
    good = procs.sim_worker("--speedup", "50")
    port = find_free_port()
    bad = procs.sim_worker("--speedup", "50", "--error-rate", "1.0", port=port)
    router = procs.router(
        [good.url, bad.url],
        *router_flags(
            "--policy",
            "round_robin",
            "--cb-failure-threshold",
            "3",
            "--cb-success-threshold",
            "2",
            "--cb-timeout-duration-secs",
            "0.5",
        ),
    )

    async def breaker_state(client: httpx.AsyncClient) -> str:
        return str((await worker_view(client, bad.url))["circuit_breaker_state"])

    async def scenario() -> LoadResult:
        result = LoadResult()
        async with httpx.AsyncClient(base_url=router.url, timeout=30, trust_env=False) as client:
            # 1. the failing worker is opened while clients see only 200s
            for i in range(20):
                response = await client.post("/generate", json=gen_body(i))
                result.statuses[response.status_code] += 1
            assert await breaker_state(client) in ("open", "half_open")
            assert await metric(client, "sglang_router_circuit_breaker_state", bad.url) >= 1
            assert (await worker_view(client, bad.url))["is_healthy"]  # /health still says ok

            # 2. it heals (restarted on the same port without faults) and the breaker closes
            bad.stop()
            healed = procs.sim_worker("--speedup", "50", port=port)
            assert healed.url == bad.url

            async def closed() -> bool:
                response = await client.post("/generate", json=gen_body(0))
                result.statuses[response.status_code] += 1
                return await breaker_state(client) == "closed"

            await until(closed, timeout=20, interval=0.05)
            served_before = await _served(client, healed.url)
            for i in range(10):
                response = await client.post("/generate", json=gen_body(i))
                result.statuses[response.status_code] += 1
            assert await _served(client, healed.url) > served_before, (
                "healed worker gets no traffic"
            )
        return result

    result = asyncio.run(scenario())
    assert result.lost == 0, result.statuses


async def _served(client: httpx.AsyncClient, url: str) -> int:
    return int((await worker_view(client, url))["requests_total"])  # type: ignore[call-overload]


def test_stream_cut_by_a_crash_ends_with_an_error_event(procs) -> None:  # type: ignore[no-untyped-def]
    """A streaming response whose worker dies mid-way ends promptly with an error event."""
    worker = procs.sim_worker("--speedup", "1")
    router = procs.router([worker.url], *router_flags())

    async def scenario() -> tuple[list[str], float, float]:
        async with httpx.AsyncClient(base_url=router.url, timeout=30, trust_env=False) as client:
            retries_before = await metric(client, "sglang_router_retries_total")
            lines: list[str] = []
            async with client.stream(
                "POST", "/generate", json=gen_body(0, tokens=2000, stream=True)
            ) as response:
                assert response.status_code == 200
                chunks = response.aiter_lines()
                async for line in chunks:
                    if line.startswith("data:"):
                        lines.append(line)
                        if len(lines) >= 3:
                            break
                worker.popen.kill()
                killed = time.monotonic()
                async for line in chunks:
                    if line.strip():
                        lines.append(line)
                ended = time.monotonic() - killed
            retries_after = await metric(client, "sglang_router_retries_total")
        return lines, ended, retries_after - retries_before

    lines, ended, retries = asyncio.run(scenario())
    assert "[DONE]" not in lines[-1], "a cut stream must not look complete"
    assert "error" in lines[-1].lower(), f"the stream ended without an error event: {lines[-3:]}"
    assert retries == 0, "a stream that already reached the client must never be retried"
    print(f"stream cut: error event {ended:.2f}s after the crash: {lines[-1][:200]}")


def test_stream_on_a_stalled_worker_ends_with_an_error_event(procs) -> None:  # type: ignore[no-untyped-def]
    """A stream whose worker hangs mid-way ends once the worker is ejected, not at the timeout."""
    worker = procs.sim_worker("--speedup", "1", "--stall-after", "1")
    router = procs.router([worker.url], *router_flags("--request-timeout-secs", "120"))

    async def scenario() -> tuple[list[str], float]:
        async with httpx.AsyncClient(base_url=router.url, timeout=60, trust_env=False) as client:
            lines: list[str] = []
            body = gen_body(0, tokens=5000, stream=True)
            async with client.stream("POST", "/generate", json=body) as response:
                assert response.status_code == 200
                chunks = response.aiter_lines()
                async for line in chunks:
                    if line.startswith("data:"):
                        lines.append(line)
                        break
                # One short request answered directly makes the worker hang from now on.
                direct = await client.post(worker.url + "/generate", json=gen_body(1, tokens=1))
                assert direct.status_code == 200
                stalled = time.monotonic()
                async for line in chunks:
                    if line.strip():
                        lines.append(line)
                ended = time.monotonic() - stalled
            after = await client.post("/generate", json=gen_body(2))
            assert after.status_code == 503  # no healthy worker left
        return lines, ended

    lines, ended = asyncio.run(scenario())
    assert "error" in lines[-1].lower() and "[DONE]" not in lines[-1], lines[-3:]
    assert ended < 120 / 4, (
        f"the stream ended {ended:.1f}s after the stall: it waited for a timeout"
    )
    print(f"stalled stream: error event {ended:.2f}s after the stall: {lines[-1][:160]}")
