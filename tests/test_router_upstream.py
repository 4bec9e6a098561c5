"""The router's lean upstream HTTP/1.1 client against raw TCP servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from support import async_wait_until

from sglctl.router.upstream import UpstreamError, UpstreamTimeout
from sglctl.router.upstream_native import UpstreamPool

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> str:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def deadline(seconds: float = 5.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_content_length_and_keep_alive_reuse() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            seen.append(head + body)
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b'content-length: 7\r\n\r\n{"a":1}'
            )
            await writer.drain()

    server = Server(handler)
    pool = UpstreamPool()
    async with server as url:
        for i in range(3):
            r = await pool.request(
                url, b"POST", b"/generate", [(b"x-request-id", b"r%d" % i)], b'{"q":1}', deadline()
            )
            assert r.status == 200
            assert r.header("content-type") == "application/json"
            assert await r.read() == b'{"a":1}'
        assert server.connections == 1  # one keep-alive connection for all three
    assert seen[0].startswith(b"POST /generate HTTP/1.1\r\n")
    assert b"x-request-id: r0\r\n" in seen[0] and b"content-length: 7\r\n" in seen[0]
    assert seen[0].endswith(b'{"q":1}')
    pool.close_all()


async def test_chunked_stream_arrives_chunk_by_chunk() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        writer.write(b"6\r\ndata:1\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\ndata:2\r\n0\r\n\r\n")
        await writer.drain()

    pool = UpstreamPool()
    async with Server(handler) as url:
        r = await pool.request(url, b"POST", b"/generate", [], b"{}", deadline())
        chunks = aiter(r)
        assert await anext(chunks) == b"data:1"  # before the server sent the rest
        release.set()
        assert [c async for c in chunks] == [b"data:2"]
    pool.close_all()


async def test_close_delimited_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    pool = UpstreamPool()
    async with Server(handler) as url:
        r = await pool.request(url, b"GET", b"/", [], b"", deadline())
        assert await r.read() == b"all of it"
    pool.close_all()


async def test_stale_idle_connection_is_retried_on_a_new_one() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        # Answers keep-alive, then closes the idle connection behind the client's back.
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    server = Server(handler)
    pool = UpstreamPool()
    async with server as url:
        for _ in range(3):
            r = await pool.request(url, b"POST", b"/x", [], b"{}", deadline())
            assert await r.read() == b"ok"
            await async_wait_until(  # the server's close has reached the idle connection
                lambda: all(c.closed for o in pool._origins.values() for c in o.idle),
                what="the idle connection closed by the server",
            )
        assert server.connections == 3
    pool.close_all()


class _DeadTransport(asyncio.Transport):
    """The transport of a worker just killed, as uvloop shows it between closing its handle
    and delivering connection_lost(): closing, and write() raises RuntimeError."""

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

    def close(self) -> None:
        pass

    closing = True


async def test_an_idle_connection_of_a_killed_worker_is_never_written_to() -> None:
    """Reusing such a connection raised RuntimeError from transport.write: a 500 for the
    client instead of a request on a fresh connection (seen in the kill-sequence test)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    server = Server(handler)
    pool = UpstreamPool()
    async with server as url:
        for closing in (True, False):  # skipped when closing; retried when write raises
            r = await pool.request(url, b"POST", b"/x", [], b"{}", deadline())
            assert await r.read() == b"ok"
            (idle,) = [c for o in pool._origins.values() for c in o.idle]
            real = idle.transport
            dead = _DeadTransport()
            dead.closing = closing
            idle.transport = dead
            r = await pool.request(url, b"POST", b"/x", [], b"{}", deadline())
            assert await r.read() == b"ok"
            assert real is not None
            real.close()
        assert server.connections == 3  # a fresh connection each time
    pool.close_all()


async def test_connection_refused_is_an_upstream_error() -> None:
    async with Server(read_request) as url:  # type: ignore[arg-type]
        pass  # closed: nothing listens on that port any more
    with pytest.raises(UpstreamError) as info:
        await UpstreamPool().request(url, b"POST", b"/", [], b"", deadline())
    assert not isinstance(info.value, UpstreamTimeout)


async def test_silent_server_times_out_at_the_deadline() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    async with Server(handler) as url:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(UpstreamTimeout):
            await UpstreamPool().request(url, b"POST", b"/", [], b"", deadline(0.2))
        assert loop.time() - start < 2


async def test_worker_dying_mid_body_is_an_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()

    async with Server(handler) as url:
        r = await UpstreamPool().request(url, b"POST", b"/", [], b"", deadline())
        with pytest.raises(UpstreamError, match="closed the connection"):
            await r.read()


async def test_closing_an_unfinished_response_closes_the_connection() -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n")
        await writer.drain()
        if await reader.read(1) == b"":  # the client hung up: the worker can abort
            closed.set()

    pool = UpstreamPool()
    async with Server(handler) as url:
        r = await pool.request(url, b"POST", b"/", [], b"", deadline())
        assert await anext(aiter(r)) == b"a"
        await r.aclose()
        await asyncio.wait_for(closed.wait(), 5)


async def test_malformed_response_is_an_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    async with Server(handler) as url:
        with pytest.raises(UpstreamError, match="malformed"):
            await UpstreamPool().request(url, b"POST", b"/", [], b"", deadline())


def test_only_plain_http_urls() -> None:
    with pytest.raises(UpstreamError):
        UpstreamPool()._origin("https://example.com")


async def test_https_workers_go_to_the_fallback_client() -> None:
    calls: list[str] = []

    class Fallback:
        async def request(self, base_url, method, path, headers, body, deadline):  # type: ignore[no-untyped-def]
            calls.append(base_url)
            return "answer"

        def close_all(self) -> None:
            calls.append("closed")

    pool = UpstreamPool(fallback=Fallback())  # type: ignore[arg-type]
    assert await pool.request("https://w:8443", b"POST", b"/", [], b"", deadline()) == "answer"
    with pytest.raises(UpstreamError, match="invalid worker URL"):
        await pool.request("http://w:port", b"POST", b"/", [], b"", deadline())
    pool.close_all()
    assert calls == ["https://w:8443", "closed"]


async def test_deadlines_of_many_responses_share_one_timer_and_each_is_kept() -> None:
    """The pool's one deadline timer (upstream_native._Deadlines): every response times out
    at its own deadline, one registered after a later one included, and answered ones are
    forgotten (they never time out afterwards)."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async def quick(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(30)

    pool = UpstreamPool()
    loop = asyncio.get_running_loop()
    async with Server(silent) as slow_url, Server(quick) as quick_url:
        answered = await pool.request(quick_url, b"POST", b"/", [], b"", deadline(60))
        assert await answered.read() == b"ok"  # released; the timer stays armed for 60 s

        async def timed(seconds: float) -> float:
            started = loop.time()
            with pytest.raises(UpstreamTimeout):
                await pool.request(slow_url, b"POST", b"/", [], b"", deadline(seconds))
            return loop.time() - started

        late = asyncio.create_task(timed(3.0))  # earlier than the armed 60 s: re-armed
        await async_wait_until(lambda: len(pool._deadlines.waiting) == 1, what="registered")
        early = await timed(0.5)  # an earlier deadline after it: the timer is re-armed
        assert 0.4 <= early < 2.5, early
        assert not late.done()
        assert 2.5 <= await late < 10, "the later deadline fired at the wrong time"
        assert not pool._deadlines.waiting
    pool.close_all()
