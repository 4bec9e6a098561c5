"""Entry point: ``sglctl router ...`` and ``python -m sglctl.router ...``.

Parses the flags into a :class:`~sglctl.router.config.RouterConfig`, refuses flags it cannot
honour with one clear line, and serves the app with uvicorn (uvloop, httptools, with the
connection limits of :mod:`sglctl.router.http_server`) on ``--host/--port``, plus a second
listener for ``/metrics`` on ``--metrics-host/--metrics-port`` in the same event loop.

With ``--router-processes N`` > 1 (the default on 4+ cores) this process binds the sockets and
supervises N children instead (:mod:`sglctl.router.processes`); each child comes back here
with :data:`~sglctl.router.processes.CHILD_ENV` set and serves on the sockets it inherited.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sglctl.logs import configure_logging
from sglctl.router.config import RouterConfig
from sglctl.router.flags import parse_args
from sglctl.router.http_server import (
    limits_of,
    log_accept_errors,
    protocol_class,
    raise_fd_limit,
)
from sglctl.router.processes import ChildSpec, child_spec, default_processes, run_parent
from sglctl.router.request import shutdown_parse_pool
from sglctl.router.router import StartupError

log = logging.getLogger(__name__)


def metrics_app(render: Callable[[], Awaitable[bytes]]) -> Starlette:
    """A tiny app that serves only ``GET /metrics`` (the ``--metrics-port`` listener)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    async def metrics(request: Request) -> Response:
        return Response(await render(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the main listener."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ListenError(RuntimeError):
    """An address to listen on is unusable; the message is one line for the operator."""


def listen(host: str, port: int, what: str, reuse_port: bool = False) -> socket.socket:
    """Bind ``host:port`` before anything starts, so a busy port is one clear error.

    ``reuse_port``: one of several sockets on the same port (``--router-processes``), among
    which the kernel spreads new connections.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        raise ListenError(
            f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}"
        ) from None
    sock.set_inheritable(True)
    return sock


def _has_metrics_listener(config: RouterConfig) -> bool:
    return bool(config.metrics_port and config.metrics_port != config.port)


def _metrics_socket(config: RouterConfig) -> socket.socket:
    return listen(
        config.metrics_host, config.metrics_port, "metrics (--metrics-host/--metrics-port)"
    )


async def serve(config: RouterConfig, child: ChildSpec | None = None) -> None:
    """Run the router until SIGINT/SIGTERM (``child``: as one process of several, on the
    sockets its parent bound)."""
    from sglctl.router.app import create_app
    from sglctl.router.fastpath import FastPath
    from sglctl.router.fastpath import enabled_for as fastpath_enabled
    from sglctl.router.router import Router

    metrics_sockets: list[socket.socket] = []
    if child is not None:
        sockets = [socket.socket(fileno=child.fd)]
        if child.metrics_fd is not None:
            metrics_sockets.append(socket.socket(fileno=child.metrics_fd))
    else:
        sockets = [listen(config.host, config.port, "requests (--host/--port)")]
        if _has_metrics_listener(config):
            metrics_sockets.append(_metrics_socket(config))

    raise_fd_limit()
    log_accept_errors(asyncio.get_running_loop())
    router = Router(config, cluster=child)
    app = create_app(router)
    # Inference POSTs skip ASGI and Starlette (fastpath.py), unless CORS or PD need the app.
    fast = FastPath(router) if fastpath_enabled(config) else None
    common = {
        "loop": "none",
        # uvicorn's httptools protocol plus header/body limits and timeouts (http_server.py).
        "http": protocol_class(limits_of(config)),
        "access_log": False,
        "log_config": None,
        "proxy_headers": False,
        "server_header": False,
    }
    main = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            lifespan="on",
            timeout_graceful_shutdown=int(config.shutdown_grace_period_secs) or None,
            timeout_keep_alive=75,
            backlog=4096,
            **{**common, "http": protocol_class(limits_of(config), fast)},  # type: ignore[arg-type]
        )
    )
    metrics_server: uvicorn.Server | None = None
    if metrics_sockets:
        metrics_server = _QuietServer(
            uvicorn.Config(
                metrics_app(router.render_metrics),
                host=config.metrics_host,
                port=config.metrics_port,
                lifespan="off",
                **common,  # type: ignore[arg-type]
            )
        )
    metrics_task = (
        asyncio.create_task(metrics_server.serve(sockets=metrics_sockets))
        if metrics_server
        else None
    )
    tune_gc()  # after the imports and the app are built: see its docstring
    try:
        await main.serve(sockets=sockets)
    finally:
        if metrics_server is not None and metrics_task is not None:
            metrics_server.should_exit = True
            await metrics_task
        shutdown_parse_pool()
    if not main.started:
        raise SystemExit(1)


#: Allocations between two young-generation collections (CPython's default is 700).
GC_THRESHOLDS = (10_000, 10, 10)


def tune_gc() -> None:
    """Freeze the start-up heap and collect the young generation less often.

    Why: under load, timed with ``gc.callbacks`` on the lean path (wrk at c=64 and c=256,
    shared 2-core machine), the collector took 41-74 us of wall time per request with
    CPython's defaults, in pauses of 0.3-70 ms: a full collection walks the ~60,000 objects
    that imports and set-up leave behind, and every request waits for it. ``gc.freeze()``
    moves those objects to the permanent generation, where no collection walks them again,
    and a young generation of 10,000 allocations instead of 700 makes collections rarer:
    7-9 us per request in the same runs, no full-collection pauses. In router CPU per request
    (``/proc``, A/B back to back) that is 4-6% less at c=64 and no visible change at c=256.
    Garbage in reference cycles is still collected, at most ~10,000 allocations (a few dozen
    requests) later; a full collection still runs every ~1M allocations.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    log.debug("gc: %d objects frozen, thresholds %s", gc.get_freeze_count(), GC_THRESHOLDS)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a --host value) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def warn_if_exposed(config: RouterConfig) -> bool:
    """One warning line when the admin API is open to the network (non-loopback, no key)."""
    if config.api_key or is_loopback(config.host):
        return False
    log.warning(
        "listening on %s without --api-key: anyone who reaches port %d can add and remove "
        "workers (POST /add_worker); pass --api-key KEY or bind --host 127.0.0.1",
        config.host,
        config.port,
    )
    return True


def run_processes(config: RouterConfig, argv: Sequence[str], count: int) -> None:
    """``--router-processes`` > 1: bind the sockets here, then supervise the children."""
    try:
        sockets = [
            listen(config.host, config.port, "requests (--host/--port)", reuse_port=True)
            for _ in range(count)
        ]
        metrics = _metrics_socket(config) if _has_metrics_listener(config) else None
    except ListenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(run_parent(argv, sockets, metrics, config.shutdown_grace_period_secs))


def main(argv: Sequence[str] | None = None, prog: str = "sglctl router") -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the router."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse_args(argv, prog=prog)
    child = child_spec()
    # Several processes: each child logs to its own file (router-<i>.log) beside the parent's.
    name = "router" if child is None else f"router-{child.index}"
    configure_logging(config.log_level, config.log_dir, name=name, json=config.log_json)
    if config.unsupported:
        _, reason = config.unsupported[0]
        print(f"error: {reason}", file=sys.stderr)
        raise SystemExit(2)
    count = config.router_processes or default_processes()
    if child is None:
        warn_if_exposed(config)
        if count > 1:
            run_processes(config, argv, count)
            return
    try:
        import uvloop

        runner: Callable[[Coroutine[Any, Any, None]], None] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        runner = asyncio.run
    try:
        with contextlib.suppress(KeyboardInterrupt):
            runner(serve(config, child))
    except (ListenError, StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main(prog="python -m sglctl.router")
