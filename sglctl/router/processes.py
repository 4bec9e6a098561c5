"""Several router processes on one port (``--router-processes N``): the parent and its hub.

One Python process is one core. With N > 1, ``sglctl router`` becomes a small parent that

* binds the port N times with ``SO_REUSEPORT`` (one listening socket per child, so the kernel
  spreads connections over the children by their addresses) plus the ``--metrics-port``
  socket once, and keeps every socket open itself: a child that dies loses nothing but the
  connections it had accepted; new ones wait in its socket's backlog for its successor;
* creates the shared in-flight counters (:mod:`~sglctl.router.shared_loads`) and runs the
  hub (:class:`Hub`) that relays what one child tells to the others
  (:mod:`~sglctl.router.siblings`);
* starts N children (``python -m sglctl.router`` with the same flags, and
  :data:`CHILD_ENV` saying which socket, row and hub are theirs), restarts a child that
  exits, and on SIGTERM/SIGINT stops them all (each drains like a single router would).

A child that exits before it ever reached its hub (a start-up error: bad Kubernetes
credentials, an unusable flag) stops the whole router with its exit code instead of being
restarted forever. The children watch the hub in turn: when the parent disappears (even by
SIGKILL) their connection ends and they shut down.

The parent routes nothing: with N = 1 none of this runs and the router is the single
process it always was.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import orjson

from sglctl.router.shared_loads import SharedLoads

log = logging.getLogger(__name__)

#: Environment variable that makes ``python -m sglctl.router`` one child of a parent.
CHILD_ENV = "SGLCTL_ROUTER_CHILD"
#: Most processes the default picks (one per two cores).
MAX_DEFAULT = 8
#: Seconds between a child's exit and its restart (a crash loop costs little CPU).
RESTART_DELAY = 0.5
#: How a line of routes starts (siblings.py sends them apart from other messages).
ROUTES = b'[{"t":"route"'
#: Seconds the hub waits for siblings' metrics.
SCRAPE_WAIT = 5.0


def default_processes() -> int:
    """One process per two cores this process may use, at least 1, at most 8.

    Why per two cores: each request costs the router and its upstream connection handling
    about as much as the kernel's network work and the load generator or clients beside it;
    on a 2-core machine one process leaves the other core to them (``benchmarks/RESULTS.md``,
    "Router processes").
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT, cores // 2))


@dataclasses.dataclass(frozen=True)
class ChildSpec:
    """What a child gets from its parent (as JSON in :data:`CHILD_ENV`)."""

    index: int
    procs: int
    fd: int
    metrics_fd: int | None
    loads: str
    hub: str

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def child_spec() -> ChildSpec | None:
    """This process's spec when it is a child of a several-process router, else None."""
    raw = os.environ.get(CHILD_ENV)
    return ChildSpec(**json.loads(raw)) if raw else None


class Hub:
    """Relays the children's messages to each other; remembers membership and health for a
    child that (re)starts; gathers ``/metrics`` expositions."""

    def __init__(self) -> None:
        self.children: dict[int, asyncio.StreamWriter] = {}
        self.ready: dict[int, asyncio.Event] = {}
        #: Admin-added workers by URL (their last "add"), and the last health verdicts.
        self._members: dict[str, dict[str, Any]] = {}
        self._health: dict[str, dict[str, Any]] = {}
        self._scrapes: dict[int, list[str]] = {}
        self._scrape_done: dict[int, asyncio.Event] = {}
        self._next_scrape = 0

    def event(self, index: int) -> asyncio.Event:
        return self.ready.setdefault(index, asyncio.Event())

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index: int | None = None
        try:
            while line := await reader.readline():
                if index is not None and line.startswith(ROUTES):
                    self._send(line, exclude=index)  # the hot traffic: relayed as it is
                    continue
                batch = orjson.loads(line)
                if index is None:
                    index = int(batch[0]["i"])
                    self._attach(index, writer)
                    batch = batch[1:]
                self._dispatch(index, batch)
        except (ConnectionError, ValueError) as exc:
            log.warning("hub: connection of router process %s broke: %s", index, exc)
        finally:
            if index is not None and self.children.get(index) is writer:
                del self.children[index]
            writer.close()

    def _attach(self, index: int, writer: asyncio.StreamWriter) -> None:
        self.children[index] = writer
        replay = [*self._members.values(), *self._health.values()]
        if replay:
            writer.write(orjson.dumps(replay) + b"\n")
        self.event(index).set()
        log.debug("hub: router process %d connected (%d messages replayed)", index, len(replay))

    def _dispatch(self, sender: int, batch: list[dict[str, Any]]) -> None:
        relayed = []
        for message in batch:
            kind = message.get("t")
            if kind == "scrape":
                asyncio.get_running_loop().create_task(self._scrape(sender, message["id"]))
                continue
            if kind == "scraped":
                bodies = self._scrapes.get(message["id"])
                if bodies is not None:
                    bodies.append(message["body"])
                    if len(bodies) >= len(self.children) - 1:
                        self._scrape_done[message["id"]].set()
                continue
            self._remember(message)
            relayed.append(message)
        if relayed:
            self._send(orjson.dumps(relayed) + b"\n", exclude=sender)

    def _remember(self, message: dict[str, Any]) -> None:
        kind, url = message.get("t"), message.get("w", "")
        if kind == "add":
            self._members[url] = message
        elif kind == "remove":
            self._members.pop(url, None)
            self._health.pop(url, None)
        elif kind == "health":
            self._health[url] = message

    def _send(self, line: bytes, exclude: int | None = None) -> None:
        for index, writer in list(self.children.items()):
            if index != exclude and not writer.is_closing():
                writer.write(line)

    async def _scrape(self, sender: int, request_id: int) -> None:
        self._next_scrape += 1
        n = self._next_scrape
        bodies: list[str] = []
        self._scrapes[n] = bodies
        done = self._scrape_done[n] = asyncio.Event()
        if len(self.children) > 1:
            self._send(orjson.dumps([{"t": "scrape", "id": n}]) + b"\n", exclude=sender)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), SCRAPE_WAIT)
        del self._scrapes[n], self._scrape_done[n]
        writer = self.children.get(sender)
        if writer is not None and not writer.is_closing():
            writer.write(orjson.dumps([{"t": "scraped", "id": request_id, "bodies": bodies}]))
            writer.write(b"\n")


class Parent:
    """Starts, restarts and stops the children; owns the sockets, the segment and the hub."""

    def __init__(
        self,
        argv: Sequence[str],
        sockets: Sequence[socket.socket],
        metrics_socket: socket.socket | None,
        grace_secs: float,
    ) -> None:
        self.argv = list(argv)
        self.sockets = list(sockets)
        self.metrics_socket = metrics_socket
        self.grace_secs = grace_secs
        self.procs = len(self.sockets)
        self.hub = Hub()
        self.stopping = asyncio.Event()
        self.exit_code = 0
        self._children: dict[int, asyncio.subprocess.Process] = {}
        self._killer: asyncio.Task[None] | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        loads = SharedLoads.create(self.procs)
        rundir = tempfile.mkdtemp(prefix="sglctl-router-")
        hub_path = os.path.join(rundir, "hub.sock")
        server = await asyncio.start_unix_server(self.hub.handle, hub_path, limit=256 << 20)
        try:
            tasks = [
                asyncio.create_task(self._keep(i, loads.name, hub_path)) for i in range(self.procs)
            ]
            await asyncio.gather(*tasks)
        finally:
            if self._killer is not None:
                self._killer.cancel()
            server.close()
            loads.close(unlink=True)
            with contextlib.suppress(OSError):
                os.unlink(hub_path)
                os.rmdir(rundir)
        return self.exit_code

    def stop(self, code: int = 0) -> None:
        """Stop every child (SIGTERM: each drains its requests, then exits)."""
        if self.stopping.is_set():
            return
        log.info("stopping %d router processes", len(self._children))
        self.exit_code = self.exit_code or code
        self.stopping.set()
        self._killer = asyncio.get_running_loop().create_task(self._kill_late())
        for proc in self._children.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    async def _keep(self, index: int, loads: str, hub: str) -> None:
        """Run child ``index`` until the router stops; restart it whenever it exits."""
        sock = self.sockets[index]
        fds = [sock.fileno()] + ([self.metrics_socket.fileno()] if self.metrics_socket else [])
        spec = ChildSpec(
            index=index,
            procs=self.procs,
            fd=sock.fileno(),
            metrics_fd=self.metrics_socket.fileno() if self.metrics_socket else None,
            loads=loads,
            hub=hub,
        )
        env = {**os.environ, CHILD_ENV: spec.to_env()}
        while not self.stopping.is_set():
            ready = self.hub.event(index)
            ready.clear()
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sglctl.router", *self.argv, env=env, pass_fds=fds
            )
            self._children[index] = proc
            log.info("router process %d started (pid %d)", index, proc.pid)
            code = await proc.wait()
            del self._children[index]
            if self.stopping.is_set():
                break
            if not ready.is_set():
                log.error(
                    "router process %d exited (code %d) before it was ready; stopping the router",
                    index,
                    code,
                )
                self.stop(code or 1)
                break
            log.warning(
                "router process %d (pid %d) exited with code %d after %.1fs; restarting it",
                index,
                proc.pid,
                code,
                time.monotonic() - started,
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), RESTART_DELAY)

    async def _kill_late(self) -> None:
        """Children still running past the grace period (+10 s) after SIGTERM are killed."""
        await asyncio.sleep(self.grace_secs + 10.0)
        for index, proc in list(self._children.items()):
            log.warning("router process %d (pid %d) did not stop; killing it", index, proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


def run_parent(
    argv: Sequence[str],
    sockets: Sequence[socket.socket],
    metrics_socket: socket.socket | None,
    grace_secs: float,
) -> int:
    """Supervise ``len(sockets)`` children until SIGTERM/SIGINT; the exit code."""
    for sock in [*sockets, *([metrics_socket] if metrics_socket else [])]:
        sock.listen(4096)
    log.info(
        "router: %d processes on %s (pid %d supervises them)",
        len(sockets),
        "{}:{}".format(*sockets[0].getsockname()[:2]),
        os.getpid(),
    )
    return asyncio.run(Parent(argv, sockets, metrics_socket, grace_secs).run())
