"""The lean server path (sglctl/router/fastpath.py) where the Starlette tests cannot see it.

A Starlette stub worker on a real socket (echoes, slow answers, streams of many small or
slow chunks) behind a router served by uvicorn with the lean protocol, reached over real
connections: pipelined inference requests, streams arriving whole and in order, a client
that leaves mid-stream or before the answer (the worker's request is cancelled, the load
slot freed), and that inference requests really take the lean path.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httptools
import httpx
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from support import async_wait_until
from test_fastpath_app import lean_server
from test_router_app import make_config

from sglctl.net import find_free_port
from sglctl.router import fastpath
from sglctl.router.http_server import HttpLimits
from sglctl.router.router import Router

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Worker:
    """A stub worker: ``{"text", "stream", "chunks", "gap", "delay"}`` say what it does."""

    started: int = 0
    completed: int = 0
    cancelled: int = 0

    def app(self) -> Starlette:
        async def generate(request: Request) -> Response:
            self.started += 1
            job = orjson.loads(await request.body())
            if not job.get("stream"):
                waited = 0.0
                while waited < job.get("delay", 0.0):
                    if await request.is_disconnected():
                        self.cancelled += 1
                        return Response(status_code=499)
                    await asyncio.sleep(0.02)
                    waited += 0.02
                self.completed += 1
                return JSONResponse({"echo": job["text"]})

            async def events() -> AsyncIterator[bytes]:
                done = False
                try:
                    for i in range(job.get("chunks", 3)):
                        yield b"data: %d\n\n" % i
                        if job.get("gap"):
                            await asyncio.sleep(job["gap"])
                    yield b"data: [DONE]\n\n"
                    done = True
                finally:
                    if done:
                        self.completed += 1
                    else:
                        self.cancelled += 1

            return StreamingResponse(events(), media_type="text/event-stream")

        async def health(request: Request) -> Response:
            return Response(b"")

        return Starlette(
            routes=[Route("/generate", generate, methods=["POST"]), Route("/health", health)]
        )


@dataclass
class Setup:
    router: Router
    base: str
    worker: Worker
    url: str

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def in_flight(self) -> int:
        return sum(w.in_flight for w in self.router.registry.all())


@contextlib.asynccontextmanager
async def setup(
    *flags: str, limits: HttpLimits | None = None, keep_alive: float = 5.0
) -> AsyncIterator[Setup]:
    worker = Worker()
    port = find_free_port()
    server = uvicorn.Server(
        uvicorn.Config(worker.app(), host="127.0.0.1", port=port, log_level="warning")
    )
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    try:
        await async_wait_until(lambda: server.started, timeout=30, what="stub worker")
        url = f"http://127.0.0.1:{port}"
        router = Router(make_config([url], *flags))
        await router.start()
        try:
            async with lean_server(router, limits, keep_alive) as base:
                yield Setup(router, base, worker, url)
        finally:
            await router.stop()
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\n%s"
        b"content-length: %d\r\n\r\n%s" % (path.encode(), extra, len(body), body)
    )


class _Responses:
    """Parses responses off a raw connection (httptools), for pipelining checks."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[tuple[int, bytes]] = []
        self._body = b""

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self._body))
        self._body = b""


async def test_inference_requests_take_the_lean_path(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    original = fastpath.LeanCycle._serve
    original_whole = fastpath.LeanCycle._serve_whole

    async def spy(self: fastpath.LeanCycle) -> None:
        seen.append(self.route)
        await original(self)

    def spy_whole(self: fastpath.LeanCycle, ctx: contextvars.Context) -> None:
        seen.append(self.route)  # the callback path (direct.py): a whole body, no task
        original_whole(self, ctx)

    monkeypatch.setattr(fastpath.LeanCycle, "_serve", spy)
    monkeypatch.setattr(fastpath.LeanCycle, "_serve_whole", spy_whole)
    async with setup() as s, httpx.AsyncClient(base_url=s.base, trust_env=False) as client:
        r = await client.post("/generate", json={"text": "hello"})
        assert r.json() == {"echo": "hello"}
        assert r.headers["x-sglctl-worker"] == s.url
        assert r.headers["content-length"] == str(len(r.content))
        assert "date" in r.headers
        assert (await client.get("/health")).status_code == 200  # Starlette, not lean
        assert (await client.get("/generate")).status_code == 405
        assert seen == ["/generate"]


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with setup() as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        texts = [f"request {i}" for i in range(6)]
        wire = b"".join(post("/generate", orjson.dumps({"text": t})) for t in texts)
        wire += post("/generate", b"{bad json")  # an error in the middle keeps the order
        wire += post("/generate", orjson.dumps({"text": "last"}))
        writer.write(wire)
        await writer.drain()
        got = _Responses()
        while len(got.done) < 8:
            data = await asyncio.wait_for(reader.read(65536), 30)
            assert data, f"connection closed after {len(got.done)} responses"
            got.parser.feed_data(data)
        writer.close()
        assert [orjson.loads(b)["echo"] for _, b in got.done[:6]] == texts
        assert got.done[6][0] == 400
        assert orjson.loads(got.done[7][1]) == {"echo": "last"}


async def test_stream_of_many_small_chunks_arrives_whole_and_in_order() -> None:
    async with setup() as s, httpx.AsyncClient(base_url=s.base, trust_env=False) as client:
        n = 3000
        body = {"text": "x", "stream": True, "chunks": n}
        async with client.stream("POST", "/generate", json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-sglctl-worker"] == s.url
            text = (await r.aread()).decode()
        expected = "".join(f"data: {i}\n\n" for i in range(n)) + "data: [DONE]\n\n"
        assert text == expected
        # Keep-alive after a stream: the next request on the same connection works.
        assert (await client.post("/generate", json={"text": "again"})).json()["echo"] == "again"
        await async_wait_until(lambda: s.in_flight() == 0, timeout=10, what="slot freed")


async def test_client_leaving_mid_stream_cancels_the_worker_request() -> None:
    async with setup() as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        job = {"text": "x", "stream": True, "chunks": 500, "gap": 0.02}
        writer.write(post("/generate", orjson.dumps(job)))
        first = await asyncio.wait_for(reader.read(65536), 30)
        assert first.startswith(b"HTTP/1.1 200")
        assert s.in_flight() == 1
        writer.close()
        await async_wait_until(lambda: s.in_flight() == 0, timeout=15, what="load slot freed")
        await async_wait_until(lambda: s.worker.cancelled == 1, timeout=15, what="worker cancel")
        assert s.worker.completed == 0
        counts = s.router.metrics.request_counts
        await async_wait_until(lambda: sum(counts.values()) == 1, timeout=5, what="metrics")


async def test_client_leaving_before_the_answer_cancels_the_worker_request() -> None:
    async with setup("--max-concurrent-requests", "1") as s:
        _reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(post("/generate", orjson.dumps({"text": "slow", "delay": 30.0})))
        await writer.drain()
        await async_wait_until(lambda: s.worker.started == 1, timeout=15, what="worker got it")
        writer.close()
        await async_wait_until(lambda: s.in_flight() == 0, timeout=15, what="load slot freed")
        await async_wait_until(lambda: s.worker.cancelled == 1, timeout=15, what="worker cancel")
        assert s.router.metrics.request_counts == {("/generate", 499): 1}
        # The admission slot was given back too: the next request is admitted at once.
        async with httpx.AsyncClient(base_url=s.base, trust_env=False) as client:
            r = await client.post("/generate", json={"text": "next"})
            assert r.json() == {"echo": "next"}
        assert s.router.admission.active == 0


async def test_an_unfinished_head_after_a_whole_request_still_times_out() -> None:
    """The head clock starts after a read that leaves a head unfinished (http_server.py)."""
    async with setup(limits=HttpLimits(header_timeout_secs=0.5)) as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(post("/generate", orjson.dumps({"text": "whole"})))
        got = _Responses()
        while not got.done:
            data = await asyncio.wait_for(reader.read(65536), 30)
            assert data, "closed before the first answer"
            got.parser.feed_data(data)
        assert got.done[0][0] == 200
        writer.write(b"POST /generate HTTP/1.1\r\nhost: r\r\n")  # and nothing more
        rest = b""
        while True:
            data = await asyncio.wait_for(reader.read(65536), 30)
            if not data:
                break
            rest += data
        writer.close()
        assert rest.startswith(b"HTTP/1.1 408"), rest[:200]


async def test_expect_100_continue_gets_its_interim_answer() -> None:
    async with setup() as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        body = orjson.dumps({"text": "after continue"})
        writer.write(
            post("/generate", b"", b"expect: 100-continue\r\n").replace(
                b"content-length: 0", b"content-length: %d" % len(body)
            )
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        got = _Responses()
        while not got.done:
            data = await asyncio.wait_for(reader.read(65536), 30)
            assert data, "closed before the answer"
            got.parser.feed_data(data)
        writer.close()
        assert got.done[0][0] == 200
        assert orjson.loads(got.done[0][1]) == {"echo": "after continue"}


async def _answer(reader: asyncio.StreamReader, got: _Responses, count: int) -> None:
    while len(got.done) < count:
        data = await asyncio.wait_for(reader.read(65536), 30)
        assert data, f"connection closed after {len(got.done)} responses"
        got.parser.feed_data(data)


async def test_keep_alive_closes_an_idle_connection_but_not_a_busy_one() -> None:
    """The keep-alive clock (http_server.py) runs from the end of the last answer only.

    Requests that keep a connection busy for several timeouts (one slow answer longer than
    the timeout, then a series of quick ones) never see it closed; once idle, it is closed
    after about one timeout.
    """
    timeout = 0.5
    loop = asyncio.get_running_loop()
    async with setup(keep_alive=timeout) as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        got = _Responses()
        writer.write(post("/generate", orjson.dumps({"text": "slow", "delay": 3 * timeout})))
        await _answer(reader, got, 1)
        # Busy again before the timeout since the answer: the connection stays open.
        for i in range(6):
            await asyncio.sleep(timeout / 3)  # paces the requests; nothing waits on it
            writer.write(post("/generate", orjson.dumps({"text": f"quick {i}"})))
            await _answer(reader, got, 2 + i)
        assert [orjson.loads(b)["echo"] for _, b in got.done] == [
            "slow",
            *(f"quick {i}" for i in range(6)),
        ]
        idle_from = loop.time()
        data = await asyncio.wait_for(reader.read(65536), 30)
        closed_after = loop.time() - idle_from
        writer.close()
        assert data == b"", "the router sent something on an idle connection"
        assert closed_after >= timeout * 0.8, closed_after
        assert closed_after < timeout + 10, closed_after
