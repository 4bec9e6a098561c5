"""tests/test_router_app.py again, with the router on a real socket and the lean path on.

The in-process harness there talks ASGI to the Starlette app, which never touches
:mod:`sglctl.router.fastpath`. Here the same tests run with the client on a real connection
to a uvicorn server whose protocol takes inference POSTs down the lean path (admin and info
still go through Starlette), so every behaviour those tests pin (errors, retries,
admission, headers, metrics) is checked on the lean path too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import uvicorn
from support import async_wait_until

# Re-collected here, so that they run with this module's ``harness``.
from test_router_app import *  # noqa: F403
from test_router_app import Harness, HostTransport, Stub, make_config, served

from sglctl.net import find_free_port
from sglctl.router.app import create_app
from sglctl.router.fastpath import FastPath
from sglctl.router.http_server import HttpLimits, protocol_class
from sglctl.router.router import Router

# Not repeated here: an admin route (the Starlette path, unchanged), and over a real socket
# httpx uploads the whole body before it reads the early 413, so its 'sent' count says nothing.
del test_admin_body_over_the_cap_is_413_before_it_is_buffered  # noqa: F821


@contextlib.asynccontextmanager
async def lean_server(
    router: Router, limits: HttpLimits | None = None, keep_alive: float = 5.0
) -> AsyncIterator[str]:
    """``router``'s app on a free 127.0.0.1 port with the lean path on; its base URL."""
    port = find_free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(router),
            host="127.0.0.1",
            port=port,
            lifespan="off",
            log_level="warning",
            timeout_keep_alive=keep_alive,  # type: ignore[arg-type]
            http=protocol_class(limits or HttpLimits(), FastPath(router)),  # type: ignore[arg-type]
        )
    )
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    try:
        await async_wait_until(lambda: server.started, timeout=30, what="lean router server")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@pytest.fixture(params=["httpx"])
def harness(request: pytest.FixtureRequest) -> Callable[..., object]:
    """test_router_app's harness, but the router is served over a socket (module docstring)."""
    return lean_harness(request.param)


def lean_harness(mode: str) -> Callable[..., object]:
    """The harness builder: stubs behind the httpx transport (``"httpx"``) or on real sockets
    with the native client (``"native"``, test_critical_path_app.py), the lean server."""

    @contextlib.asynccontextmanager
    async def build(names: list[str], *flags: str, extra: list[str] = ()) -> AsyncIterator[Harness]:  # type: ignore[assignment]
        stubs = {n: Stub(n) for n in [*names, *extra]}
        async with contextlib.AsyncExitStack() as stack:
            if mode == "native":
                urls = await stack.enter_async_context(served(stubs))
                urls["gone"] = f"http://127.0.0.1:{find_free_port()}"
                router = Router(make_config([urls[n] for n in names], *flags))
            else:
                urls = {n: f"http://{n}" for n in [*stubs, "gone"]}
                config = make_config([urls[n] for n in names], *flags)
                router = Router(config, transport=HostTransport(stubs))
            await router.start()
            try:
                base = await stack.enter_async_context(lean_server(router))
                async with httpx.AsyncClient(base_url=base, trust_env=False) as client:
                    yield Harness(router, client, stubs, urls)
            finally:
                await router.stop()

    return build
