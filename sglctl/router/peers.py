"""Router replicas tell each other their dispatches (``--router-peers``, issue 16).

N separate ``sglctl router`` replicas (behind one Service, or started by hand) route as one
when each knows where the others sent every prefix. Measured on the same point (synth
trace, 600k-token KV caches, 3 replicas, ``benchmarks/RESULTS.md``): hash placement alone
and the workers' KV events (``--kv-events``) keep most hits but not the TTFT p99 (1.2-1.44x:
a replica learns of a new document only from the worker's ``BlockStored``, after the
prefill); one router of 3 *processes* whose hub relays every routing decision kept 103% of
the hits at p99 0.95x. This module gives separate replicas what the hub gives processes:
every routing decision (the siblings' ``route`` message, :mod:`~sglctl.router.siblings`).

Transport: batches POSTed to the peer's own HTTP port, ``POST /peers/routes`` (an orjson
list of ``route`` messages, header :data:`SENDER_HEADER` with the sender's instance id; the
answer names the receiver's), sent with the router's lean client (the proxy's,
:mod:`~sglctl.router.upstream_native`: ~45-80 µs of the sender's CPU a POST against ~480 µs
with httpx; the receiver spends ~200). Why HTTP on the router's port rather than a port of
its own: one port to expose and to allow in a Kubernetes NetworkPolicy, and the router
already defends that port against bad clients. Why batches: at most
:data:`POSTS_IN_FLIGHT` (two) POSTs out per peer, and what queues while both are out goes
together, so that the cost per request shrinks as the rate grows (two POSTs per peer per
round trip, whatever the request rate), while a route offered when one is out leaves at once.
A peer that is down costs nothing on the request path: its queue is bounded (routes beyond
are dropped and counted, with a rate-limited warning), and its link retries with a backoff.

Membership: ``--router-peers`` names addresses (``http://host:port`` or ``host:port``). A
hostname resolving to several addresses means all of them (a Kubernetes headless Service),
re-resolved every ``--router-peers-refresh-secs``. Every replica may get the same list: an
address whose answer carries this replica's own instance id is itself, and skipped.

Load: every batch ends with a ``load`` message, the sender's requests in flight per worker
and when it read them (``{"t": "load", "l": {url: n}, "at": its monotonic clock}``, the whole
replica's with ``--router-processes``; a receiver ignores one read before the last it applied,
since two POSTs can arrive out of order). A link also posts one alone when they changed (a
finished request), every :data:`LOAD_CHANGE_SECS` at most (20 ms: with httpx, a POST cost a
millisecond or two of CPU on each side, and at one per change three replicas on two cores took
a core and doubled TTFT; it was 100 ms then), and, while some are in flight, every
:data:`LOAD_REFRESH_SECS`. A receiver keeps each sender's last one and adds them up per
worker (``Worker.told_in_flight``); one older than :data:`LOAD_STALE_SECS` (the sender died
or is cut off) counts no more. So a replica's load is every replica's, a few tens of
milliseconds old at most: telling dispatches alone, another replica's finished requests
counted until the workers' next ``/get_load`` report, and three replicas stayed at
1.15-1.26x one router's TTFT p99 on the conversation trace (``benchmarks/RESULTS.md``,
"Router peers, the load told").

Lateness: each link times its batches, from the oldest route's offer to the peer's answer
(``GET /peers``: ``late_ms``); the p90 goes out with the load (``"late"``), and every replica
waits, a rank, the largest lateness told before placing a miss (:meth:`Peers.restep`,
``CacheAwarePolicy.stagger``): a route takes 1-2 ms on a quiet network and 12-30 ms on a
loaded 2-core machine, and a rank must wait for the routes of the ranks before it.

Catch-up: each process keeps a ring of the recent decisions it made or heard from peers
(:data:`RING_ROUTES`); when a peer (re)appears with a new instance id -- a restarted replica
-- it gets the ring first, so it knows the live conversations at once instead of after a
minute of misses, its own from before the restart included.

With ``--router-processes N``: every process sends its own dispatches to the peers; the
process that receives a peer's batch applies it and relays it to its siblings. Routes heard
from peers or siblings are applied with the policy's ``observe``, which tells no one: no
loops. The instance id is the replica's, the same in all its processes (derived from the
parent's hub path), so that a replica's processes do not take each other for peers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
from starlette.requests import Request
from starlette.responses import Response

from sglctl.router.api_key import check_api_key
from sglctl.router.errors import error_response
from sglctl.router.policies.base import RouteKey
from sglctl.router.upstream import UpstreamError
from sglctl.router.upstream_native import UpstreamPool

log = logging.getLogger(__name__)

Message = dict[str, Any]

#: The endpoint peers POST their batches to.
PATH = "/peers/routes"
PATH_BYTES = PATH.encode()
#: Request header: the sender's instance id (the answer's ``id`` is the receiver's).
SENDER_HEADER = "x-sglctl-peer"
#: Characters of a prompt sent to peers (as to siblings: the whole of a 128k-token prompt).
ROUTE_TEXT_CHARS = 512 * 1024
#: The ring of own recent decisions sent to a peer that (re)appears.
RING_ROUTES = 4096
#: Bytes of prompt text the ring and each peer's queue may hold at most.
RING_BYTES = 256 * 1024 * 1024
QUEUE_BYTES = 64 * 1024 * 1024
#: A batch closes at this many bytes of prompt text (a POST well under --max-payload-size).
BATCH_BYTES = 4 * 1024 * 1024
#: POSTs a link keeps in flight at once (:meth:`Link.run` says why two).
POSTS_IN_FLIGHT = 2
#: Seconds between two posts of a changed load without routes (a finished request), and how
#: often an idle link looks: the other replicas place their misses on the least loaded
#: worker, so a finish they learn late is a worker they skip. 20 ms, down from 100 once a
#: POST cost ~350 µs of CPU on both sides together, not 1-2 ms (httpx then): in the offline
#: model a tenth of a second of it cost synthetic 600k TTFT p50 89 ms against one router's
#: 64 (70 at once).
LOAD_CHANGE_SECS = 0.02
#: While requests are in flight, seconds between two ``load`` messages when nothing changed,
#: and the age past which a sender's last one counts no more (several refreshes missed).
LOAD_REFRESH_SECS = 0.5
LOAD_STALE_SECS = 2.0
#: Batches whose lateness a link remembers (``GET /peers``: ``late_ms``), and the fewest a
#: replica needs before it trusts its own figure for the stagger.
LATENESS_BATCHES = 256
LATENESS_MIN_BATCHES = 8
#: The quantile of its links' lateness a replica tells, and the longest wait a rank: a rank
#: waits the largest lateness any live replica told, between ``--router-peers-stagger-secs``
#: and this (rank 2 of 3 waits twice as long on a miss).
LATENESS_QUANTILE = 0.9
STAGGER_MAX_SECS = 0.05
#: Seconds a POST to a peer may take; backoff bounds after a failure.
POST_TIMEOUT = 10.0
BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0
#: Seconds between two "peer unreachable, dropping" warnings per peer.
WARN_EVERY = 30.0
DEFAULT_PORT = 30000


@dataclass(frozen=True)
class PeerAddress:
    """One ``--router-peers`` item: a host (name or IP) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_peer(item: str) -> PeerAddress:
    """``http://host:port``, ``host:port`` or ``[v6]:port`` (port default 30000).
    ValueError with a message naming the item when it is not one of these."""
    text = item.strip()
    if not text:
        raise ValueError("an empty --router-peers item")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme != "http":
        raise ValueError(f"--router-peers {item!r}: only http:// peers are supported")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"--router-peers {item!r}: give host:port, without a path")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"--router-peers {item!r}: bad port") from None
    if not parts.hostname:
        raise ValueError(f"--router-peers {item!r}: no host")
    return PeerAddress(parts.hostname, port)


def parse_peers(items: Iterable[str]) -> list[PeerAddress]:
    """Every item of repeated and comma-separated ``--router-peers`` values, in order,
    without duplicates."""
    seen: dict[PeerAddress, None] = {}
    for value in items:
        for item in value.split(","):
            if item.strip():
                seen[parse_peer(item)] = None
    return list(seen)


def instance_id(hub_path: str | None) -> str:
    """This replica's id: random, or the same in every process of one router (the parent's
    hub socket path is unique to it, and the host's name makes it unique across hosts)."""
    if hub_path is None:
        return uuid.uuid4().hex
    seed = f"{socket.gethostname()}:{hub_path}:{os.getppid()}".encode()
    return hashlib.sha256(seed).hexdigest()[:32]


def route_message(key: RouteKey, url: str) -> Message | None:
    """The ``route`` message of a decision (the siblings' format), None for an empty key."""
    if key.input_ids:
        return {"t": "route", "w": url, "i": list(key.input_ids[: ROUTE_TEXT_CHARS // 4])}
    if key.text:
        return {"t": "route", "w": url, "x": key.text[:ROUTE_TEXT_CHARS]}
    return None


def _size(message: Message) -> int:
    text = message.get("x")
    return len(text) if text is not None else 4 * len(message.get("i") or ()) + 64


class Ring:
    """The last :data:`RING_ROUTES` own decisions (bounded in bytes too), for catch-up."""

    def __init__(self, routes: int = RING_ROUTES, max_bytes: int = RING_BYTES) -> None:
        self._items: collections.deque[Message] = collections.deque()
        self.routes = routes
        self.max_bytes = max_bytes
        self.bytes = 0

    def add(self, message: Message) -> None:
        self._items.append(message)
        self.bytes += _size(message)
        while self._items and (len(self._items) > self.routes or self.bytes > self.max_bytes):
            self.bytes -= _size(self._items.popleft())

    def snapshot(self) -> list[Message]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)


class Link:
    """One peer address: its queue and the task sending it batches, one POST at a time."""

    def __init__(self, owner: Peers, ip: str, port: int, name: str) -> None:
        self.owner = owner
        self.origin = f"http://{ip if ':' not in ip else f'[{ip}]'}:{port}"
        self.url = self.origin + PATH
        self.name = name
        self.queue: collections.deque[Message] = collections.deque()
        self.queued_bytes = 0
        self.wake = asyncio.Event()
        #: Set by :meth:`ping`: ends a backoff at once (the peer is back).
        self.revived = asyncio.Event()
        #: When the backoff after a failed POST ends (time.monotonic(); 0: not backing off),
        #: the next backoff's length, and the failure :meth:`run` has yet to back off from.
        self.retry_at = 0.0
        self.backoff = BACKOFF_MIN
        self.failure: Exception | None = None
        self.peer_id: str | None = None
        self.is_self = False
        self.connected = False
        self.sent = 0
        self.dropped = 0
        #: The last ``load`` told this peer, and when (time.monotonic()).
        self.told: dict[str, int] = {}
        self.told_at = 0.0
        #: Post even if nothing changed (a new replica appeared: say hello now).
        self.hello = True
        self._warned = 0.0
        self.task: asyncio.Task[None] | None = None
        #: When the oldest route still queued was offered (time.monotonic(); None: none).
        self.oldest_at: float | None = None
        #: Seconds from a batch's oldest route being offered to the peer's answer, for the
        #: last batches: how late the peer learns this replica's picks at most, which the
        #: ranks after this one must wait out (``CacheAwarePolicy.stagger``).
        self.lateness: collections.deque[float] = collections.deque(maxlen=LATENESS_BATCHES)

    def offer(self, message: Message) -> None:
        if self.is_self:
            return
        size = _size(message)
        if self.queued_bytes + size > QUEUE_BYTES or (not self.connected and len(self.queue) > 0):
            # Down (or unknown and already owing a batch): drop instead of holding memory;
            # the ring catches the peer up when it answers again.
            self._drop(1)
            return
        if not self.queue:
            self.oldest_at = time.monotonic()
        self.queue.append(message)
        self.queued_bytes += size
        self.wake.set()

    def _drop(self, n: int) -> None:
        self.dropped += n
        now = time.monotonic()
        if n and now - self._warned > WARN_EVERY:
            self._warned = now
            log.warning(
                "router peer %s (%s) unreachable: dropping its routes (%d so far)",
                self.name,
                self.url,
                self.dropped,
            )

    def _take(self) -> list[Message]:
        batch: list[Message] = []
        size = 0
        while self.queue and (not batch or size < BATCH_BYTES):
            message = self.queue.popleft()
            batch.append(message)
            size += _size(message)
        self.queued_bytes = max(0, self.queued_bytes - size)
        return batch

    def _due(self, now: float, load: dict[str, int]) -> bool:
        """Whether to post now: routes queued, the load changed or is getting old, or (idle
        and connected) the hello every refresh that notices a restarted peer."""
        if self.queue or self.hello:
            return True
        age = now - self.told_at
        if load != self.told:
            return age >= LOAD_CHANGE_SECS
        return age >= self.owner.refresh_secs or (bool(load) and age >= LOAD_REFRESH_SECS)

    async def run(self) -> None:
        """Send batches, up to :data:`POSTS_IN_FLIGHT` at once, until the peer is this router.

        Why more than one POST at a time: with one, a route offered while a POST was out
        waited for that POST's answer and the gathering after it before it left, and that
        wait was most of a route's lateness (4-5 ms at the median on a quiet 2-core machine,
        12-14 ms on a busy one), which every later rank then waits out on its misses. With
        two, it leaves at once on the other. Batching still happens, by itself, when the
        peer answers slower than routes come: what queues while both are out goes together.
        """
        owner = self.owner
        slots = asyncio.Semaphore(POSTS_IN_FLIGHT)
        sending: set[asyncio.Task[None]] = set()
        try:
            while not self.is_self:
                # Woken by a route or an answer, else a look at the load every
                # LOAD_CHANGE_SECS: a finished request is load off a worker, and no route
                # says so.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), LOAD_CHANGE_SECS)
                self.wake.clear()
                if self.failure is not None:
                    await self._back_off()
                    continue
                if not self._due(time.monotonic(), owner.own_load()):
                    continue
                await slots.acquire()
                if self.is_self or self.failure is not None:
                    slots.release()
                    continue
                now = time.monotonic()  # what queued while both slots were out goes too
                load = owner.own_load()
                batch = self._take()
                oldest, self.oldest_at = self.oldest_at, (now if self.queue else None)
                load_message: Message = {"t": "load", "l": load, "at": round(now, 6)}
                if owner.own_late is not None:
                    load_message["late"] = round(owner.own_late, 5)
                # Told as sent, not as answered: the other slot must not post it again.
                self.told, self.told_at, self.hello = load, now, False
                task = asyncio.create_task(self._send(batch, load_message, oldest, slots))
                sending.add(task)
                task.add_done_callback(sending.discard)
        finally:
            for task in sending:
                task.cancel()

    async def _send(
        self,
        batch: list[Message],
        load_message: Message,
        oldest: float | None,
        slots: asyncio.Semaphore,
    ) -> None:
        """One POST of ``batch`` and the load; a failure is left for :meth:`run` to back off."""
        try:
            await self._post([*batch, load_message])
            if batch and oldest is not None:
                self.lateness.append(time.monotonic() - oldest)
            self.sent += 0 if self.is_self else len(batch)
            self.backoff = BACKOFF_MIN
        except (UpstreamError, ValueError, KeyError, TypeError) as exc:
            if self.connected:
                log.warning("router peer %s (%s) lost: %s", self.name, self.url, exc)
            elif self.failure is None:  # not up yet (replicas start in any order), or down
                log.debug("router peer %s (%s) not answering: %s", self.name, self.url, exc)
            self.connected = False
            self.peer_id = None  # what it missed meanwhile: the ring, when it answers
            self.hello = True  # the first post after the backoff asks whether it is back
            self._drop(len(batch))
            self.failure = exc
        finally:
            slots.release()
            if self.queue or self.failure is not None:
                self.wake.set()

    async def _back_off(self) -> None:
        """Wait before the next POST after a failure, doubling up to :data:`BACKOFF_MAX`.

        The backoff ends early when the peer is heard from again (a restarted replica's first
        POST here: :meth:`ping`): waiting out up to BACKOFF_MAX instead left it routing blind,
        its tree empty until this link sent it the ring (2-3 s of a replica's traffic on the
        restart benchmark)."""
        self.revived.clear()
        self.retry_at = time.monotonic() + self.backoff
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.revived.wait(), self.backoff)
        self.retry_at = 0.0
        self.backoff = min(BACKOFF_MAX, self.backoff * 2)
        self.failure = None
        self.wake.set()

    async def _post(self, batch: list[Message]) -> None:
        owner = self.owner
        body = orjson.dumps(batch)
        deadline = asyncio.get_running_loop().time() + POST_TIMEOUT
        response = await owner.pool.request(
            self.origin, b"POST", PATH_BYTES, owner.raw_headers, body, deadline
        )
        try:
            answer = await response.read()
        finally:
            await response.aclose()
        if response.status != 200:
            text = answer[:200].decode("utf-8", "replace")
            raise ValueError(f"HTTP {response.status}: {text}")
        peer_id = str(orjson.loads(answer)["id"])
        if peer_id == owner.id:
            self.is_self = True
            self.queue.clear()
            log.info("router peer %s (%s) is this router: skipped", self.name, self.url)
            return
        if not self.connected:
            self.connected = True
            log.info("router peer %s (%s) connected (instance %s)", self.name, self.url, peer_id)
        if peer_id != self.peer_id:
            # A new peer, or one that restarted: it gets this process's recent decisions.
            self.peer_id = peer_id
            if len(owner.ring):
                # First in the queue, in batches like any (a ring is larger than one POST).
                self.queue.extendleft(reversed(owner.ring.snapshot()))
                self.queued_bytes += owner.ring.bytes
                self.oldest_at = time.monotonic()
                log.info(
                    "router peer %s (%s): sending it %d recent routes",
                    self.name,
                    self.url,
                    len(owner.ring),
                )

    def ping(self) -> None:
        """Post now (a hello), even if backing off: a replica new to this one spoke."""
        self.hello = True
        self.wake.set()
        self.revived.set()


async def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (a headless Service: one per pod)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return sorted({str(info[4][0]) for info in infos})


class Peers:
    """This process's links to the other replicas, and what it received from them."""

    def __init__(
        self,
        addresses: Sequence[PeerAddress],
        refresh_secs: float,
        replica_id: str,
        *,
        apply: Callable[[Message], None],
        relay: Callable[[list[Message]], None] | None = None,
        resolver: Callable[[str, int], Any] = resolve,
        api_key: str | None = None,
        own_load: Callable[[], dict[str, int]] = dict,
        set_told: Callable[[str, int], None] = lambda url, n: None,
        stagger_secs: float = 0.0,
    ) -> None:
        """``apply`` learns one received route (the policy's ``observe``); ``relay`` hands a
        received batch on to this replica's sibling processes (None with one process).
        ``api_key``: the router's ``--api-key``, sent to the peers (every replica of one
        Deployment has the same), which ask it as their admin endpoints do. ``own_load``:
        this replica's requests in flight per worker URL (only those with some);
        ``set_told``: sets a worker's ``told_in_flight``, the other replicas' sum.
        ``stagger_secs``: ``--router-peers-stagger-secs``, the least :meth:`stagger_step`."""
        self.addresses = list(addresses)
        self.refresh_secs = refresh_secs
        self.id = replica_id
        self.apply = apply
        self.relay = relay
        self.resolver = resolver
        self.ring = Ring()
        self.links: dict[tuple[str, int], Link] = {}
        self.own_load = own_load
        self.set_told = set_told
        #: Each sender's last ``load`` (requests in flight per worker) and when it came.
        self.told: dict[str, tuple[float, dict[str, int]]] = {}
        #: Each sender's clock when it read its last load applied here (``at``, seconds).
        self.told_clock: dict[str, float] = {}
        #: Each live sender's route lateness as it last told (seconds, its links' p90).
        self.told_late: dict[str, float] = {}
        self.stagger_secs = stagger_secs
        #: This process's own links' lateness (None: too few batches yet) and the wait a
        #: rank that follows from all the replicas' (:meth:`restep`, off the request path).
        self.own_late: float | None = None
        self.step_secs = stagger_secs
        self.received = 0
        self.rejected = 0
        self.senders: set[str] = set()
        self.headers = {SENDER_HEADER: replica_id, "content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.raw_headers = [(k.encode(), v.encode("latin-1")) for k, v in self.headers.items()]
        #: The router's lean HTTP client (the proxy's, :mod:`~sglctl.router.upstream_native`):
        #: a POST cost the sender ~480 µs of CPU with httpx, ~45-80 µs with it.
        self.pool = UpstreamPool(connect_timeout=2.0)

    # -- the request path: own decisions ----------------------------------------------------
    def tell_route(self, key: RouteKey, url: str) -> None:
        message = route_message(key, url)
        if message is None:
            return
        self.ring.add(message)
        for link in self.links.values():
            link.offer(message)

    def rank(self) -> tuple[int, int]:
        """This replica's place among the live replicas (itself and the peers that answer),
        ordered by instance id, and their count: the same order on every replica, which
        staggers their misses by it (``CacheAwarePolicy.stagger``). A peer not known yet
        (starting, or cut off) is left out until it answers: two replicas may then share a
        rank for a moment, which costs a herd, never a request."""
        ids = {self.id}
        for link in self.links.values():
            if link.connected and not link.is_self and link.peer_id is not None:
                ids.add(link.peer_id)
        if len(ids) == 1:
            return 0, 1
        order = sorted(ids)
        return order.index(self.id), len(order)

    def stagger_step(self) -> float:
        """Seconds each rank waits before placing a miss (``CacheAwarePolicy.stagger``)."""
        return self.step_secs

    def restep(self) -> None:
        """Set :meth:`stagger_step` from how late routes arrive: the largest lateness any live
        replica told (this one's included), within ``[stagger_secs, STAGGER_MAX_SECS]``.

        Why measured: a rank must wait until the routes of the ranks before it arrived, and
        how long that takes is the deployment's, not a constant's. On a quiet network a POST
        takes a millisecond or two; three replicas, 8 sims and the client on 2 cores took 12
        ms at the median and 27 ms at p90 (every process waits its turn for a core), and a
        5 ms stagger left the replicas' TTFT p50 24-90 ms above one router's, 2-23 ms with
        this rule on the conversation trace. Every replica takes the same maximum, so they
        keep one order of turns."""
        links = [link for link in self.links.values() if not link.is_self]
        samples = sorted(x for link in links for x in link.lateness)
        enough = len(samples) >= LATENESS_MIN_BATCHES
        self.own_late = _quantile(samples, LATENESS_QUANTILE) if enough else None
        if self.stagger_secs <= 0:
            self.step_secs = 0.0
            return
        late = max((self.own_late or 0.0, *self.told_late.values()))
        self.step_secs = max(self.stagger_secs, min(STAGGER_MAX_SECS, late))

    # -- receiving ------------------------------------------------------------------------
    def receive(self, sender: str, batch: list[Message]) -> int:
        """Apply a peer's batch (and relay it to the siblings); the routes applied."""
        if sender != self.id and sender not in self.senders:
            # A replica never heard from (new or restarted): every link says hello now, so
            # that the one reaching it sends its ring without waiting for the next refresh.
            self.senders.add(sender)
            for link in self.links.values():
                link.ping()
        routes = [m for m in batch if m.get("t") == "route"]
        ring = self.ring
        for message in routes:
            self.apply(message)
            # The ring keeps what this replica heard too: a replica that restarts gets its
            # own decisions from before back from the others (with its own ring only, the
            # later turns of the conversations it had placed missed on it: 80% of its
            # unrestarted hit ratio in the first 30 trace-s of the restart benchmark).
            ring.add(message)
        relayed: list[Message] = routes
        for message in batch:
            if message.get("t") == "load":
                late, at = message.get("late"), message.get("at")
                self.take_load(sender, message["l"], late=late, at=at)
                told = {"t": "peer_load", "s": sender, "l": message["l"], "late": late, "at": at}
                relayed = [*routes, told]
        if relayed and self.relay is not None:
            self.relay(relayed)
        self.received += len(routes)
        return len(routes)

    def take_load(
        self,
        sender: str,
        load: dict[str, int],
        now: float | None = None,
        late: float | None = None,
        at: float | None = None,
    ) -> None:
        """``sender``'s requests in flight per worker (its last word replaces the one before);
        the workers it names now or named before get their new ``told_in_flight``. ``late``:
        the sender's route lateness, if it told one (:meth:`restep`). ``at``: when the sender
        read it (its ``time.monotonic()``, shared by its processes): a link has two POSTs out
        at once, so an older load can arrive after a newer one, and is then ignored (one
        :data:`LOAD_STALE_SECS` or more behind is a clock that started again, and counts)."""
        if at is not None:
            last = self.told_clock.get(sender, at)
            if last - LOAD_STALE_SECS < at < last:  # overtaken; far behind: a new clock
                return
            self.told_clock[sender] = at
        now = time.monotonic() if now is None else now
        if late is not None:
            self.told_late[sender] = float(late)
        before = self.told.get(sender)
        self.told[sender] = (now, load)
        self._retell({*load, *(before[1] if before else ())})

    def expire(self, now: float | None = None) -> None:
        """Forget the load of senders silent for :data:`LOAD_STALE_SECS` (gone, or cut off:
        their requests either finished or died with them)."""
        now = time.monotonic() if now is None else now
        old = [s for s, (at, _) in self.told.items() if now - at >= LOAD_STALE_SECS]
        urls: set[str] = set()
        for sender in old:
            urls.update(self.told.pop(sender)[1])
            self.told_late.pop(sender, None)
            self.told_clock.pop(sender, None)
            log.info("router peer instance %s silent: its in-flight counts no longer count", sender)
        self._retell(urls)

    def _retell(self, urls: Iterable[str]) -> None:
        told = [load for _, load in self.told.values()]
        for url in urls:
            self.set_told(url, sum(load.get(url, 0) for load in told))

    # -- membership -----------------------------------------------------------------------
    async def run(self) -> None:
        """Resolve the addresses every refresh; start a link for each new one."""
        try:
            refreshed = -1e18
            while True:
                now = time.monotonic()
                if now - refreshed >= self.refresh_secs:
                    await self._refresh()
                    refreshed = now
                self.expire(now)
                self.restep()
                await asyncio.sleep(min(self.refresh_secs, LOAD_STALE_SECS / 4))
        finally:
            for link in self.links.values():
                if link.task is not None:
                    link.task.cancel()
            self.pool.close_all()

    async def _refresh(self) -> None:
        current: dict[tuple[str, int], str] = {}
        for address in self.addresses:
            try:
                ips = await self.resolver(address.host, address.port)
            except OSError as exc:
                log.warning("router peers: cannot resolve %s: %s", address.host, exc)
                # Keep what it resolved to before (a DNS hiccup, not a membership change).
                for key, link in self.links.items():
                    if link.name == str(address):
                        current[key] = link.name
                continue
            for ip in ips:
                current.setdefault((ip, address.port), str(address))
        for key in [k for k in self.links if k not in current]:
            link = self.links.pop(key)
            if link.task is not None:
                link.task.cancel()
            if not link.is_self:
                log.info("router peer %s (%s) gone from DNS", link.name, link.url)
        for key, name in current.items():
            if key not in self.links:
                link = Link(self, key[0], key[1], name)
                self.links[key] = link
                link.task = asyncio.get_running_loop().create_task(
                    link.run(), name=f"router peer {key[0]}:{key[1]}"
                )
                link.wake.set()

    # -- what operators see ---------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        others = [link for link in self.links.values() if not link.is_self]
        return {
            "sent": sum(link.sent for link in others),
            "received": self.received,
            "dropped": sum(link.dropped for link in others),
            "connected": sum(1 for link in others if link.connected),
        }

    def snapshot(self) -> dict[str, Any]:
        rank, replicas = self.rank()
        return {
            "id": self.id,
            # This replica's place among the live ones, which staggers its misses.
            "rank": rank,
            "replicas": replicas,
            "ring": len(self.ring),
            # Milliseconds a rank waits before placing a miss, from the replicas' lateness.
            "stagger_ms": round(1000 * self.step_secs, 2),
            "late_ms_told": {s: round(1000 * x, 2) for s, x in self.told_late.items()},
            **self.stats(),
            "rejected": self.rejected,
            # What the others have in flight, as they last told (sender -> worker -> n).
            "told": {sender: load for sender, (_, load) in self.told.items()},
            "peers": [
                {
                    "address": link.name,
                    "url": link.url,
                    "self": link.is_self,
                    "connected": link.connected,
                    "instance": link.peer_id,
                    "queued": len(link.queue),
                    "sent": link.sent,
                    "dropped": link.dropped,
                    # Seconds until the next try after a failed POST (0: not backing off).
                    "retry_in": round(max(0.0, link.retry_at - time.monotonic()), 3),
                    # How late the peer learned this replica's picks, over the last batches.
                    "late_ms": lateness_ms(link.lateness),
                }
                for link in self.links.values()
            ],
        }


def _quantile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` (0..1) quantile of sorted, non-empty ``ordered``, by nearest rank."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def lateness_ms(samples: Iterable[float]) -> dict[str, float]:
    """Quantiles in milliseconds of a link's route lateness (seconds); empty: none yet."""
    ordered = sorted(samples)
    if not ordered:
        return {}
    quantiles = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}
    return {
        "n": len(ordered),
        **{k: round(1000 * _quantile(ordered, q), 2) for k, q in quantiles.items()},
    }


def valid_batch(body: bytes) -> list[Message]:
    """A peer's batch, or ValueError saying what is wrong with it (a 400)."""
    try:
        batch = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"body is not JSON: {exc}") from None
    if not isinstance(batch, list):
        raise ValueError("body must be a JSON list of route messages")
    for n, message in enumerate(batch):
        if isinstance(message, dict) and message.get("t") == "load":
            load = message.get("l")
            if not isinstance(load, dict) or not all(
                type(v) is int and v >= 0 for v in load.values()
            ):
                raise ValueError(f'item {n}: "l" must map worker URLs to requests in flight')
            late = message.get("late")
            if late is not None and not (type(late) in (int, float) and 0 <= late <= 60):
                raise ValueError(f'item {n}: "late" must be seconds between 0 and 60')
            at = message.get("at")
            if at is not None and not (type(at) in (int, float) and math.isfinite(at)):
                raise ValueError(f'item {n}: "at" must be the sender\'s clock in seconds')
            continue
        if not isinstance(message, dict) or message.get("t") != "route":
            raise ValueError(f'item {n}: not a route or load message ({{"t": "route", ...}})')
        if not isinstance(message.get("w"), str):
            raise ValueError(f'item {n}: "w" (the worker URL) must be a string')
        text, ids = message.get("x"), message.get("i")
        if text is not None and not isinstance(text, str):
            raise ValueError(f'item {n}: "x" must be a string')
        if ids is not None and (not isinstance(ids, list) or not all(type(t) is int for t in ids)):
            raise ValueError(f'item {n}: "i" must be a list of integers')
        if text is None and ids is None:
            raise ValueError(f'item {n}: needs "x" (text) or "i" (token ids)')
    return batch


async def endpoint(request: Request) -> Response:
    """``POST /peers/routes``: a peer's batch of routes; answers this replica's id."""
    router = request.app.state.router
    peers: Peers | None = getattr(router, "peers", None)
    if peers is None:
        return error_response(404, "this router has no --router-peers")
    # Routes steer traffic: who may add workers may tell routes, no one else.
    check_api_key(router.config.api_key, request)
    sender = request.headers.get(SENDER_HEADER, "")
    if not sender or len(sender) > 128:
        peers.rejected += 1
        return error_response(400, f"missing or bad {SENDER_HEADER} header (the sender's id)")
    try:
        batch = valid_batch(await request.body())
    except ValueError as exc:
        peers.rejected += 1
        log.warning("router peers: bad batch from %s: %s", request.client, exc)
        return error_response(400, str(exc))
    applied = peers.receive(sender, batch) if sender != peers.id else 0
    return Response(
        orjson.dumps({"id": peers.id, "applied": applied}), media_type="application/json"
    )


async def info(request: Request) -> Response:
    """``GET /peers``: this process's links, counts and ring."""
    peers: Peers | None = getattr(request.app.state.router, "peers", None)
    if peers is None:
        return error_response(404, "this router has no --router-peers")
    return Response(orjson.dumps(peers.snapshot()), media_type="application/json")
