"""The callback-driven whole answer (sglctl/router/direct.py) keeps every rule of the task path.

A raw asyncio stub worker (one per test, on a real socket; its behaviour per request is in
the JSON body) behind a router served by uvicorn with the lean protocol. Each test first
warms the router's keep-alive connection to the worker, so that the request under test
takes the callback path (it needs an idle connection), and checks that it did. Then: the
answer and its book-keeping, a client leaving mid-answer (the worker sees its connection
close; slots freed; 499), a retryable status retried on another worker, an ejected
worker's request failing over, the request deadline (504), a reused connection the worker
had closed (resent, nobody blamed), an event stream for a request that did not ask for one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from support import async_wait_until
from test_fastpath_app import lean_server
from test_router_app import make_config

from sglctl.router import direct, fastpath
from sglctl.router.router import Router

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class RawWorker:
    """A worker on a raw socket, told by the body what to do: ``text``, ``status``, ``delay``
    (seconds; only on the worker named ``delay_on`` if given), ``sse``, ``drop_reused``,
    ``size`` (a whole body of that many bytes)."""

    name: str
    server: asyncio.Server | None = None
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    connections: int = 0
    seen: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                job: dict[str, Any] = orjson.loads(await reader.readexactly(length))
                if job.get("drop_reused") and served:
                    return  # closes the reused connection without a byte of answer
                self.started += 1
                self.seen.append(job.get("text", ""))
                delay = job.get("delay", 0.0)
                if delay and job.get("delay_on", self.name) == self.name:
                    try:  # b"" (the router closed the connection) ends the wait early
                        if await asyncio.wait_for(reader.read(1), delay) == b"":
                            self.cancelled += 1
                            return
                    except asyncio.TimeoutError:
                        pass
                writer.write(self.answer(job))
                await writer.drain()
                self.completed += 1
                served += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    def answer(self, job: dict[str, Any]) -> bytes:
        if job.get("sse"):
            pieces = (b"data: 1\n\n", b"data: 2\n\n")
            events = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in pieces)
            return (
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n" + events + b"0\r\n\r\n"
            )
        status = job.get("status", 200)
        if job.get("size"):  # a large whole body: past the client's 1 MiB read-pause mark
            body = b"x" * job["size"]
            return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        body = orjson.dumps({"echo": job.get("text"), "worker": self.name})
        head = b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\n" % status
        return head + b"content-length: %d\r\n\r\n%s" % (len(body), body)


@dataclass
class Setup:
    router: Router
    base: str
    workers: list[RawWorker]
    served: list[str]  # how each lean request was served: "callback" or "task"

    def in_flight(self) -> int:
        return sum(w.in_flight for w in self.router.registry.all())

    def counts(self) -> dict[tuple[str, int], int]:
        return dict(self.router.metrics.request_counts)


@contextlib.asynccontextmanager
async def setup(*flags: str, workers: int = 1) -> AsyncIterator[Setup]:
    raws = [RawWorker(f"w{i}") for i in range(workers)]
    for raw in raws:
        raw.server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
    served: list[str] = []
    original_start = direct.start
    original_spawn = fastpath.LeanCycle.spawn

    def spy_start(*args: Any, **kwargs: Any) -> None:
        served.append("callback")
        original_start(*args, **kwargs)

    def spy_spawn(self: fastpath.LeanCycle, *args: Any, **kwargs: Any) -> None:
        served.append("task")
        original_spawn(self, *args, **kwargs)

    direct.start = spy_start  # type: ignore[assignment]
    fastpath.LeanCycle.spawn = spy_spawn  # type: ignore[method-assign]
    try:
        router = Router(make_config([r.url for r in raws], "--policy", "round_robin", *flags))
        await router.start()
        try:
            async with lean_server(router) as base:
                yield Setup(router, base, raws, served)
        finally:
            await router.stop()
    finally:
        direct.start = original_start  # type: ignore[assignment]
        fastpath.LeanCycle.spawn = original_spawn  # type: ignore[method-assign]
        for raw in raws:
            assert raw.server is not None
            raw.server.close()


async def warm(s: Setup, client: httpx.AsyncClient) -> None:
    """One request per worker, so that each has an idle connection in the router's pool."""
    for i in range(len(s.workers)):
        assert (await client.post("/generate", json={"text": f"warm {i}"})).status_code == 200
    assert all(w.connections == 1 for w in s.workers)
    s.served.clear()
    s.router.metrics.request_counts.clear()


def client_for(s: Setup) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=s.base, trust_env=False, timeout=30)


async def test_a_whole_answer_is_served_by_callbacks_with_its_bookkeeping() -> None:
    async with setup("--max-concurrent-requests", "4") as s, client_for(s) as client:
        await warm(s, client)
        for i in range(5):
            r = await client.post("/generate", json={"text": f"hello {i}"})
            assert r.json() == {"echo": f"hello {i}", "worker": "w0"}
            assert r.headers["x-sglctl-worker"] == s.workers[0].url
            assert r.headers["content-length"] == str(len(r.content))
        assert s.served == ["callback"] * 5
        assert s.workers[0].connections == 1  # the keep-alive connection was reused each time
        assert s.counts() == {("/generate", 200): 5}
        assert s.in_flight() == 0
        assert s.router.admission.active == 0
        assert s.router.forwarder is not None
        assert s.router.forwarder.in_flight.count(s.workers[0].url) == 0


async def test_the_task_path_serves_what_the_callback_path_cannot() -> None:
    async with setup() as s, client_for(s) as client:
        r = await client.post("/generate", json={"text": "cold"})  # no idle connection yet
        assert r.json()["echo"] == "cold"
        assert s.served == ["callback", "task"]  # chosen and handed to a task to connect
        s.served.clear()
        async with client.stream("POST", "/generate", json={"text": "s", "stream": True}) as r:
            await r.aread()
        assert s.served == ["task"]  # a stream asked for: the task path from the start


async def test_client_leaving_mid_answer_closes_the_worker_request() -> None:
    async with (
        setup("--max-concurrent-requests", "1") as s,
        client_for(s) as client,
    ):
        await warm(s, client)
        _reader, writer = await asyncio.open_connection(*s.base[7:].split(":"))
        body = orjson.dumps({"text": "slow", "delay": 30.0})
        writer.write(
            b"POST /generate HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        await async_wait_until(lambda: s.workers[0].started == 2, timeout=15, what="worker got it")
        assert s.served == ["callback"]
        assert s.in_flight() == 1
        writer.close()
        await async_wait_until(lambda: s.workers[0].cancelled == 1, timeout=15, what="closed")
        await async_wait_until(lambda: s.in_flight() == 0, timeout=15, what="load slot freed")
        assert s.counts() == {("/generate", 499): 1}
        assert s.router.admission.active == 0
        r = await client.post("/generate", json={"text": "next"})  # the slot was given back
        assert r.json()["echo"] == "next"


async def test_a_retry_from_the_callback_path_is_answered_by_the_good_worker() -> None:
    async with setup("--disable-circuit-breaker", workers=2) as s, client_for(s) as client:
        await warm(s, client)
        s.workers[0].answer = lambda job: (  # type: ignore[method-assign]
            b"HTTP/1.1 502 X\r\ncontent-length: 4\r\n\r\nbusy"
        )
        r = await client.post("/generate", json={"text": "once"})
        assert r.status_code == 200
        assert r.json() == {"echo": "once", "worker": "w1"}
        assert s.served == ["callback", "task"]  # the first attempt, then the retry's task
        assert s.counts() == {("/generate", 200): 1}
        assert s.in_flight() == 0


async def test_an_ejected_worker_fails_over_at_once() -> None:
    async with setup("--disable-circuit-breaker", workers=2) as s, client_for(s) as client:
        await warm(s, client)
        request = asyncio.ensure_future(
            client.post("/generate", json={"text": "stuck", "delay": 60.0, "delay_on": "w0"})
        )
        await async_wait_until(lambda: s.workers[0].started == 2, timeout=15, what="sent")
        assert s.served == ["callback"]
        forwarder = s.router.forwarder
        assert forwarder is not None
        assert forwarder.in_flight.interrupt(s.workers[0].url, "ejected by a test") == 1
        r = await asyncio.wait_for(request, 30)
        assert r.status_code == 200
        assert r.json()["worker"] == "w1"  # retried elsewhere, long before the 60 s
        await async_wait_until(lambda: s.workers[0].cancelled == 1, timeout=15, what="closed")
        assert s.in_flight() == 0


async def test_the_deadline_gives_504_on_the_callback_path() -> None:
    async with setup("--request-timeout-secs", "0.5") as s, client_for(s) as client:
        await warm(s, client)
        r = await client.post("/generate", json={"text": "slow", "delay": 20.0})
        assert r.status_code == 504
        assert "timed out" in r.json()["error"]["message"]
        assert s.served == ["callback"]
        await async_wait_until(lambda: s.workers[0].cancelled == 1, timeout=15, what="closed")
        assert s.in_flight() == 0


async def test_a_reused_connection_the_worker_closed_is_resent_unblamed() -> None:
    async with setup("--disable-retries") as s, client_for(s) as client:
        await warm(s, client)
        r = await client.post("/generate", json={"text": "again", "drop_reused": True})
        assert r.status_code == 200  # no retry allowed: it was resent, not retried
        assert r.json()["echo"] == "again"
        assert s.workers[0].connections == 2
        assert s.served == ["callback", "task"]
        worker = s.router.registry.get(s.workers[0].url)
        assert worker is not None and worker.errors_total == 0
        assert s.router.metrics.retries == 0


async def test_an_event_stream_for_a_whole_request_is_relayed() -> None:
    async with setup() as s, client_for(s) as client:
        await warm(s, client)
        r = await client.post("/generate", json={"text": "surprise", "sse": True})
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        assert r.text == "data: 1\n\ndata: 2\n\n"
        assert s.served == ["callback", "task"]  # handed to the task path's relay
        await async_wait_until(lambda: s.in_flight() == 0, timeout=10, what="slot freed")
        assert s.counts() == {("/generate", 200): 1}


async def test_bad_requests_are_answered_from_the_callback() -> None:
    async with setup() as s, client_for(s) as client:
        await warm(s, client)
        r = await client.post("/generate", content=b"{not json")
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert s.workers[0].started == 1  # only the warm-up reached the worker
        assert s.counts() == {("/generate", 400): 1}


async def test_a_whole_answer_larger_than_the_read_pause_mark_arrives_whole() -> None:
    """The upstream client pauses reading past 1 MiB for a reader that takes pieces; the
    callback path takes the body whole at its end, so it must never pause (it would hang)."""
    async with setup("--request-timeout-secs", "20") as s, client_for(s) as client:
        await warm(s, client)
        size = 3 * 1024 * 1024
        r = await client.post("/generate", json={"text": "big", "size": size})
        assert r.status_code == 200
        assert len(r.content) == size
        assert s.served == ["callback"]
        assert s.in_flight() == 0
