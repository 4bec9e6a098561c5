"""A router process's line to its sibling processes (``--router-processes N``, N > 1).

What one process learns, the others must know, or the router stops acting as one: where a
prefix was sent (so the next request with it goes to the same worker whichever process
receives it), admin changes (``/add_worker``, ``/remove_worker``, ``/flush_cache``), health
verdicts and breakers that open. Each child keeps one Unix-socket connection to the parent's
hub (:class:`sglctl.router.processes.Hub`), which relays every message to the other children
and replays the current membership and health to a child that (re)starts.

Off the request path and cheap: :meth:`Siblings.tell` appends to a list, and one callback a
millisecond later writes the whole batch as one line (an orjson list of messages). A sibling
applies the messages in arrival order on its own loop (:func:`apply`). Nothing waits for an
acknowledgement; a sibling learns a route a fraction of a millisecond to a few milliseconds
later, so two requests with a new prefix racing into two processes within that window may
still be placed apart (the affinity test in ``tests/test_router_processes.py`` measures it).

``/metrics`` is the one request/response exchange: :meth:`Siblings.scrape` asks the hub for
every sibling's own exposition and :func:`~sglctl.router.metrics.merge_scrapes` sums them.

Messages (``t`` is the type)::

    route  {"w": url, "x": text} or {"w": url, "i": token ids}
           (+ "p": 1 when a router peer's live dispatch: counted as load on the worker)
    add    {"w": url, "ok": healthy}        remove {"w": url}        flush {}
    health {"w": url, "ok": bool, "why": reason}
    open   {"w": url, "why": reason}        (a breaker opened)
    scrape {"id": n} / scraped {"id": n, "body": text} or {"id": n, "bodies": [...]}
    hello  {"i": process index}             (first message of a child)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from sglctl.router.policies.base import Policy, RouteKey
from sglctl.router.workers import Worker, WorkerRegistry

log = logging.getLogger(__name__)


class _Metrics(Protocol):
    def render(self) -> bytes: ...


class Router(Protocol):
    """What the siblings' messages act on: :class:`sglctl.router.router.Router` (a protocol,
    so that this module does not import the router it is imported by)."""

    @property
    def registry(self) -> WorkerRegistry: ...

    @property
    def metrics(self) -> _Metrics: ...

    def policies(self) -> list[Policy]: ...

    def interrupt(self, url: str, reason: str) -> int: ...


Message = dict[str, Any]
#: Largest line read from the hub (a batch of routes of long prompts).
LINE_LIMIT = 256 * 1024 * 1024
#: Characters of a prompt sent to siblings: the whole of any prompt a 128k-token model takes
#: (~4 characters a token). Why not less: the policy counts a hit as a match over more than
#: ``--cache-threshold`` (half) of the *whole* prompt, so a sibling that learnt only the first
#: 64 KB of a 150 KB prompt missed its next turn -- 40% of the synthetic trace's prompts are
#: longer than 64 KB, and a 3-process router kept 77% of one process's hits on it. Bounded all
#: the same, so that a pathological multi-MB prompt does not cost that much per sibling.
ROUTE_TEXT_CHARS = 512 * 1024
#: How long routes gather before one write (seconds).
BATCH_DELAY = 0.001
#: Unsent bytes past which routes are dropped instead of queued (the hub is not reading).
MAX_BUFFERED = 16 * 1024 * 1024
#: How long ``/metrics`` waits for the siblings' expositions.
SCRAPE_TIMEOUT = 5.0


class Siblings:
    """This process's connection to the hub: batched sends, a reader applying what arrives."""

    def __init__(self, path: str, index: int) -> None:
        self.path = path
        self.index = index
        self._writer: asyncio.StreamWriter | None = None
        self._pending: list[Message] = []
        #: Routes travel in lines of their own, which the hub relays without parsing.
        self._routes: list[Message] = []
        self._flush_scheduled = False
        self._ids = itertools.count(1)
        self._scrapes: dict[int, asyncio.Future[list[bytes]]] = {}
        self.dropped = 0
        self.connected = asyncio.Event()

    # -- sending ---------------------------------------------------------------------------
    def tell(self, message: Message) -> None:
        """Send ``message`` to every sibling (batched, asynchronous, never blocks)."""
        self._pending.append(message)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(BATCH_DELAY, self._flush)

    def tell_route(self, key: RouteKey, url: str) -> None:
        if key.input_ids:
            message = {"t": "route", "w": url, "i": list(key.input_ids[: ROUTE_TEXT_CHARS // 4])}
        elif key.text:
            message = {"t": "route", "w": url, "x": key.text[:ROUTE_TEXT_CHARS]}
        else:
            return
        self._routes.append(message)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(BATCH_DELAY, self._flush)

    def relay_routes(self, messages: list[Message]) -> None:
        """Hand routes heard from router peers (``--router-peers``) on to the siblings; they
        apply them (``observe``) and tell no one, so nothing loops back to the peers."""
        self._routes.extend(messages)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(BATCH_DELAY, self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batches = [b for b in (self._routes, self._pending) if b]
        self._routes, self._pending = [], []
        writer = self._writer
        count = sum(len(b) for b in batches)
        if writer is None or writer.is_closing():
            self.dropped += count
            return
        if writer.transport.get_write_buffer_size() > MAX_BUFFERED:
            self.dropped += count
            log.warning("sibling hub is not reading; dropped %d messages", count)
            return
        writer.writelines([orjson.dumps(batch) + b"\n" for batch in batches])

    async def scrape(self) -> list[bytes]:
        """Every sibling's own ``/metrics`` exposition (those that answered in time)."""
        if self._writer is None:
            return []
        n = next(self._ids)
        future: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
        self._scrapes[n] = future
        self.tell({"t": "scrape", "id": n})
        try:
            return await asyncio.wait_for(future, SCRAPE_TIMEOUT + 1.0)
        except asyncio.TimeoutError:
            log.warning("/metrics: the siblings' metrics did not arrive; this process's only")
            return []
        finally:
            self._scrapes.pop(n, None)

    # -- receiving -------------------------------------------------------------------------
    async def run(self, router: Router) -> None:
        """Connect to the hub, say hello, apply every batch; the hub gone means the parent
        is gone, and this process shuts down (SIGTERM to itself: a graceful drain)."""
        reader, writer = await asyncio.open_unix_connection(self.path, limit=LINE_LIMIT)
        self._writer = writer
        writer.write(orjson.dumps([{"t": "hello", "i": self.index}]) + b"\n")
        self.connected.set()
        try:
            while line := await reader.readline():
                for message in orjson.loads(line):
                    self._receive(router, message)
        finally:
            self._writer = None
            writer.close()
        log.warning("router process %d: the parent is gone; shutting down", self.index)
        os.kill(os.getpid(), signal.SIGTERM)

    def _receive(self, router: Router, message: Message) -> None:
        kind = message.get("t")
        if kind == "scrape":
            body = router.metrics.render().decode()
            self.tell({"t": "scraped", "id": message["id"], "body": body})
        elif kind == "scraped":
            future = self._scrapes.get(message["id"])
            if future is not None and not future.done():
                future.set_result([b.encode() for b in message.get("bodies", ())])
        else:
            try:
                apply(router, message)
            except Exception:
                log.exception("router process %d: cannot apply %r", self.index, kind)


def apply(router: Router, message: Message) -> None:
    """Do in this process what a sibling did (or the hub replays)."""
    kind, url = message.get("t"), message.get("w", "")
    registry = router.registry
    if kind == "route":
        worker = registry.get(url)
        if worker is not None:
            key = RouteKey(text=message.get("x"), input_ids=message.get("i"))
            for policy in router.policies():
                observe = getattr(policy, "observe", None)
                if observe is not None:
                    observe(key, url)
    elif kind == "peer_load":
        # Another replica's in flight (--router-peers), relayed by the sibling that heard it.
        peers = getattr(router, "peers", None)
        if peers is not None:
            late, at = message.get("late"), message.get("at")
            peers.take_load(
                str(message.get("s", "")),
                dict(message.get("l") or {}),
                late=float(late) if isinstance(late, int | float) else None,
                at=float(at) if isinstance(at, int | float) else None,
            )
    elif kind == "add":
        worker = registry.get(url)
        if worker is None:
            worker = registry.add(url, source="admin")
        worker.health_ok = bool(message.get("ok", True))
    elif kind == "remove":
        if url in registry:
            registry.remove(url)
    elif kind == "flush":
        for policy in router.policies():
            policy.flush()
    elif kind == "health":
        worker = registry.get(url)
        if worker is not None and worker.health_ok != message.get("ok"):
            worker.health_ok = bool(message.get("ok"))
            log.info("worker %s marked %s by a sibling process", url, _health_word(worker))
            if not worker.health_ok:
                router.interrupt(url, message.get("why") or f"worker {url} ejected")
    elif kind == "open":
        worker = registry.get(url)
        force_open = getattr(worker.breaker, "force_open", None) if worker else None
        if force_open is not None:
            force_open(message.get("why") or "opened by a sibling process")
    else:
        log.warning("unknown sibling message %r", kind)


def _health_word(worker: Worker) -> str:
    return "healthy" if worker.health_ok else "unhealthy"


RouteSink = Callable[[RouteKey, str], None]


def publish_routes(policy: Policy, *sinks: RouteSink) -> None:
    """Make ``policy`` tell every sink (the siblings' and the peers' ``tell_route``) each
    routing decision (prefix, worker), for policies that can learn another router's choice
    (the cache-aware tree: ``on_route`` / ``observe``)."""
    if not sinks or not (hasattr(policy, "on_route") and hasattr(policy, "observe")):
        return
    if len(sinks) == 1:
        policy.on_route = sinks[0]
        return

    def fan_out(key: RouteKey, url: str) -> None:
        for sink in sinks:
            sink(key, url)

    policy.on_route = fan_out


async def close(siblings: Siblings) -> None:
    writer = siblings._writer
    if writer is not None:
        siblings._flush()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
