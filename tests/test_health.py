"""Unit tests for the active health checker, against tiny in-process servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from support import async_wait_until

from sglctl.net import find_free_port
from sglctl.router.health import HealthChecker

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class FakeWorker:
    url: str
    health_ok: bool = True
    source: str = "static"


@dataclass
class FakeRegistry:
    workers: list[FakeWorker] = field(default_factory=list)
    fail_next: int = 0

    def all(self) -> list[FakeWorker]:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("registry bug")
        return list(self.workers)


class TinyServer:
    """A minimal HTTP/1.1 server: answers ``status`` to anything, or never answers (stall)."""

    def __init__(self, status: int = 200, stall: bool = False) -> None:
        self.status = status
        self.stall = stall
        self.hits = 0
        self.paths: list[str] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.hits += 1
            self.paths.append(head.split(b" ")[1].decode())
            if self.stall:
                await asyncio.Event().wait()
            head_out = f"HTTP/1.1 {self.status} X\r\ncontent-length: 0\r\nconnection: close\r\n"
            writer.write(head_out.encode() + b"\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[TinyServer]:
    srv = TinyServer()
    await srv.start()
    yield srv
    await srv.stop()


def checker(**kwargs: object) -> HealthChecker:
    params: dict[str, object] = {
        "interval_secs": 0.02,
        "timeout_secs": 0.5,
        "failure_threshold": 3,
        "success_threshold": 2,
    }
    params.update(kwargs)
    return HealthChecker(**params)  # type: ignore[arg-type]


async def test_thresholds_and_callback() -> None:
    changes: list[tuple[str, bool]] = []
    hc = checker(on_change=lambda w, ok: changes.append((w.url, ok)))
    w = FakeWorker("http://w")
    assert not hc.observe(w, False, "x")
    assert not hc.observe(w, False, "x")
    assert w.health_ok
    assert hc.observe(w, False, "HTTP 503")
    assert not w.health_ok
    assert hc.status(w.url).last_error == "HTTP 503"
    assert not hc.observe(w, True)
    assert not w.health_ok  # one success is not enough
    assert not hc.observe(w, False)
    assert not hc.observe(w, True)  # the failure reset the success streak
    assert hc.observe(w, True)
    assert w.health_ok
    assert changes == [("http://w", False), ("http://w", True)]
    await hc.aclose()


async def test_intermittent_failures_do_not_flap() -> None:
    hc = checker()
    w = FakeWorker("http://w")
    for _ in range(20):
        hc.observe(w, False)
        hc.observe(w, False)
        hc.observe(w, True)
    assert w.health_ok
    await hc.aclose()


async def test_probe_ok_and_endpoint(server: TinyServer) -> None:
    hc = checker(endpoint="health_generate")
    ok, detail, latency = await hc.probe(server.url)
    assert ok and detail is None and latency >= 0
    assert server.paths == ["/health_generate"]
    await hc.aclose()


async def test_probe_bad_status(server: TinyServer) -> None:
    server.status = 503
    hc = checker()
    ok, detail, _ = await hc.probe(server.url + "/")
    assert not ok and detail == "HTTP 503"
    assert server.paths == ["/health"]
    await hc.aclose()


async def test_probe_refused_connection() -> None:
    hc = checker()
    ok, detail, _ = await hc.probe(f"http://127.0.0.1:{find_free_port()}")
    assert not ok and detail and "Connect" in detail
    await hc.aclose()


async def test_probe_of_a_stalled_worker_is_bounded_by_the_timeout() -> None:
    stalled = TinyServer(stall=True)
    await stalled.start()
    hc = checker(timeout_secs=0.2)
    try:
        started = time.monotonic()
        ok, detail, _ = await hc.probe(stalled.url)
        elapsed = time.monotonic() - started
        assert not ok and detail and "no answer" in detail
        assert stalled.hits == 1
        # bounded by the timeout, not by anything the worker does (generous margin for CI)
        assert elapsed < hc.timeout_secs * 10
    finally:
        await hc.aclose()
        await stalled.stop()


async def test_check_all_probes_concurrently_and_flips(server: TinyServer) -> None:
    stalled = TinyServer(stall=True)
    await stalled.start()
    good = FakeWorker(server.url)
    bad = FakeWorker(stalled.url)
    registry = FakeRegistry([good, bad])
    hc = checker(timeout_secs=0.2, failure_threshold=2)
    try:
        await hc.check_all(registry)
        assert good.health_ok and bad.health_ok
        await hc.check_all(registry)
        assert good.health_ok and not bad.health_ok
        assert hc.status(bad.url).consecutive_failures == 2
        assert hc.status(good.url).consecutive_successes == 2
        # removed workers are forgotten
        registry.workers.remove(bad)
        await hc.check_all(registry)
        assert hc.status(bad.url).total_checks == 0
    finally:
        await hc.aclose()
        await stalled.stop()


async def test_run_takes_a_worker_out_and_brings_it_back(server: TinyServer) -> None:
    worker = FakeWorker(server.url)
    registry = FakeRegistry([worker], fail_next=1)  # the first round hits a registry bug
    hc = checker()
    task = asyncio.create_task(hc.run(registry))
    try:
        server.status = 500
        await async_wait_until(lambda: not worker.health_ok, what="the worker taken out")
        server.status = 200
        await async_wait_until(lambda: worker.health_ok, what="the worker back")
        assert hc.rounds >= 5  # the loop survived the failing round
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert hc._client is None  # the checker closed the client it created


async def test_disabled_checker_returns_at_once(server: TinyServer) -> None:
    worker = FakeWorker(server.url)
    hc = checker(enabled=False)
    await asyncio.wait_for(hc.run(FakeRegistry([worker])), timeout=5)
    assert server.hits == 0


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        HealthChecker(interval_secs=0)
    with pytest.raises(ValueError):
        HealthChecker(timeout_secs=-1)


# -- interrupting requests stuck on an ejected worker ------------------------------------------
async def test_interrupt_fails_over_an_attempt_waiting_on_the_worker() -> None:
    from sglctl.router.inflight import InFlightWatcher

    watcher = InFlightWatcher()
    outcome: list[str] = []

    async def attempt() -> None:
        watch = watcher.watch("http://w")
        watch.reading = True
        try:
            await asyncio.Event().wait()  # a worker that never answers
        except asyncio.CancelledError:
            outcome.append("interrupted" if watch.interrupted() else "cancelled")
            if outcome[-1] == "cancelled":
                raise
        finally:
            watch.reading = False
            watcher.unwatch(watch)
        outcome.append("failed over")

    task = asyncio.create_task(attempt())
    await until_true(lambda: watcher.count("http://w") == 1)
    assert watcher.interrupt("http://other", "x") == 0
    assert watcher.interrupt("http://w", "ejected") == 1
    await task  # the task was not cancelled for good: it went on
    assert outcome == ["interrupted", "failed over"]
    assert watcher.count("http://w") == 0


async def test_outside_cancellation_still_propagates() -> None:
    from sglctl.router.inflight import InFlightWatcher

    watcher = InFlightWatcher()
    seen: list[bool] = []

    async def attempt() -> None:
        watch = watcher.watch("http://w")
        watch.reading = True
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append(watch.interrupted())
            raise

    task = asyncio.create_task(attempt())
    await until_true(lambda: watcher.count("http://w") == 1)
    task.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [False]


async def test_interrupt_while_not_reading_only_marks_the_attempt() -> None:
    from sglctl.router.inflight import InFlightWatcher

    watcher = InFlightWatcher()
    gate = asyncio.Event()

    async def relay() -> str | None:
        watch = watcher.watch("http://w")
        await gate.wait()  # "handing a chunk to the client": not reading from the worker
        watcher.unwatch(watch)
        return watch.reason

    task = asyncio.create_task(relay())
    await until_true(lambda: watcher.count("http://w") == 1)
    assert watcher.interrupt("http://w", "ejected") == 1
    assert watcher.interrupt("http://w", "again") == 0  # already marked
    gate.set()
    assert await task == "ejected"  # not cancelled, only told


async def until_true(predicate: object, limit: int = 1000) -> None:
    for _ in range(limit):
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")
