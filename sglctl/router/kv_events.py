"""Subscribing to every worker's KV cache events (``--kv-events``) to feed the exact index.

Every router replica subscribes to every worker's publisher, so all replicas hold the same
view of what each worker caches (:mod:`sglctl.router.kv_index`), whichever replica placed a
prefix: the workers are the source of truth. What SGLang sends
(``python/sglang/srt/disaggregation/kv_events.py``; ``sglctl.sim.kv_events`` speaks the same):

* PUB frames ``[topic, seq, payload]``: ``seq`` an 8-byte big-endian counter from 0 per
  publisher; ``payload`` msgpack ``[ts, [event, ...]]`` (newer SGLang may append fields, e.g.
  the DP rank; ignored), each event a tagged array: ``["BlockStored", block_hashes,
  parent_block_hash, token_ids, block_size, lora_id, ...]``, ``["BlockRemoved", block_hashes,
  ...]``, ``["AllBlocksCleared"]`` (newer SGLang appends a ``medium``; ignored).
* A ROUTER replay socket: send ``[b"", start_seq]`` from a DEALER, get ``[b"", seq, payload]``
  for each buffered batch from ``start_seq`` on, then ``[b"", -1, b""]``.

**Where a worker publishes.** With ``--kv-events-port`` the router subscribes to
``tcp://<worker host>:<port>`` (and replays from ``--kv-events-replay-port`` if given) -- one
port for every worker, what a k8s pod template gives. Without it, it asks the worker: SGLang's
``GET /get_server_info`` returns its ``kv_events_config`` (the sim's too), whose ``endpoint``
and ``replay_endpoint`` ports and ``topic`` it uses, with the worker URL's host -- so static
``--worker-urls``, ``/add_worker``, discovery and ``sglctl up`` need nothing more. The feed
follows the registry: a new worker is subscribed to within a second, a removed one is dropped
from the index at once.

**Sequence numbers.** On connect the feed replays from the publisher's buffer (from 0 the
first time, so a replica started late learns what was stored before it, as far as the buffer
reaches; from the last seen batch + 1 on a reconnect) and on a gap (a missed batch). A
sequence number going back below what was replayed means the publisher restarted (a new
worker process, an empty cache): the worker's index is cleared and replayed from 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from sglctl.router.kv_index import KvIndex
from sglctl.router.workers import WorkerRegistry

log = logging.getLogger(__name__)

END_SEQ = -1
#: How often the feed compares its subscriptions with the registry.
RECONCILE_SECS = 1.0
#: How long one replay answer may take before the feed gives up on that replay.
REPLAY_TIMEOUT_SECS = 5.0
#: A feed that got no batch for this long asks the replay socket for anything newer. Why: a
#: SUB socket's subscription reaches the publisher a moment after ``connect`` (ZMQ's "slow
#: joiner"), so a batch sent in that moment is lost; on a busy worker the next batch shows
#: the gap and a replay fills it, but a worker that then goes quiet would leave the index
#: short until its next store. One small round trip per idle worker every few seconds.
IDLE_REPLAY_SECS = 2.0
#: Between attempts to learn a worker's publisher from /get_server_info.
RESOLVE_RETRY_SECS = 2.0


class BadBatch(ValueError):
    """A payload that is not a KVEventBatch."""


def decode_batch(payload: bytes) -> list[list[Any]]:
    """The events of one msgpack ``KVEventBatch`` payload, each a tagged array.

    Unknown tags are kept (the caller skips them); anything that is not ``[ts, [array...]]``
    raises :class:`BadBatch`.
    """
    import msgpack

    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:
        raise BadBatch(f"not msgpack: {exc}") from None
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise BadBatch(f"not [ts, events]: {type(batch).__name__}")
    events = batch[1]
    for event in events:
        if not isinstance(event, list) or not event or not isinstance(event[0], str):
            raise BadBatch("an event is not a tagged array")
    return events


def apply_events(index: KvIndex, url: str, events: Sequence[list[Any]]) -> int:
    """Apply one batch's events to ``url``'s blocks; returns how many were understood."""
    applied = 0
    for event in events:
        tag = event[0]
        if tag == "BlockStored" and len(event) >= 5:
            _, hashes, parent, tokens, size = event[:5]
            lora = event[5] if len(event) > 5 else None
            if lora is not None:  # a LoRA adapter's KV is not the base model's
                continue
            index.stored(url, hashes, parent, tokens, size)
        elif tag == "BlockRemoved" and len(event) >= 2:
            index.removed(url, event[1])
        elif tag == "AllBlocksCleared":
            index.cleared(url)
        else:
            continue
        applied += 1
    return applied


@dataclass(frozen=True)
class Endpoints:
    """Where one worker publishes."""

    pub: str
    replay: str | None
    topic: str = ""


def _port_of(endpoint: Any) -> int | None:
    if not isinstance(endpoint, str) or ":" not in endpoint:
        return None
    try:
        return int(endpoint.rsplit(":", 1)[1])
    except ValueError:
        return None


def _tcp(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def endpoints_from_server_info(worker_url: str, info: Any) -> Endpoints | None:
    """The publisher of a worker from its ``/get_server_info`` (None: it publishes none)."""
    if not isinstance(info, dict):
        return None
    raw = info.get("kv_events_config")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return None
    if not isinstance(raw, dict) or raw.get("publisher", "null") != "zmq":
        return None
    host = urlsplit(worker_url).hostname or "127.0.0.1"
    pub = _port_of(raw.get("endpoint", "tcp://*:5557"))
    if pub is None:
        return None
    replay = _port_of(raw.get("replay_endpoint"))
    topic = raw.get("topic") or ""
    return Endpoints(
        _tcp(host, pub),
        _tcp(host, replay) if replay is not None else None,
        topic if isinstance(topic, str) else "",
    )


class WorkerFeed:
    """One worker's subscription: SUB for batches, DEALER for replays, applied to the index."""

    def __init__(self, url: str, index: KvIndex, endpoints: Endpoints, ctx: Any) -> None:
        self.url = url
        self.index = index
        self.endpoints = endpoints
        self._ctx = ctx
        #: The last batch applied, and the lowest sequence number that is a duplicate rather
        #: than a restarted publisher (batches queued on SUB while a replay ran).
        self.last: int | None = None
        self._floor = 0
        self.batches = 0
        self.replays = 0
        self.connected = False

    async def run(self) -> None:
        import zmq

        sub = self._ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.rcvhwm = 100_000  # batches queued while a replay runs must not be dropped
        sub.setsockopt(zmq.SUBSCRIBE, self.endpoints.topic.encode())
        sub.connect(self.endpoints.pub)
        try:
            self.connected = True
            log.info(
                "kv events: %s subscribed at %s (replay %s)",
                self.url,
                self.endpoints.pub,
                self.endpoints.replay or "none",
            )
            await self._replay(0 if self.last is None else self.last + 1)
            while True:
                if not await sub.poll(IDLE_REPLAY_SECS * 1000):
                    await self._replay(0 if self.last is None else self.last + 1)
                    continue
                frames = await sub.recv_multipart()
                if len(frames) < 3:
                    continue
                await self._on_batch(int.from_bytes(frames[-2], "big"), frames[-1])
        finally:
            self.connected = False
            sub.close(linger=0)

    async def _on_batch(self, seq: int, payload: bytes) -> None:
        last = self.last
        if last is not None and seq <= last:
            if seq >= self._floor:
                return  # already applied (it came by replay too)
            log.warning(
                "kv events: %s restarted its publisher (batch %d after %d): its cache is new, "
                "clearing its index",
                self.url,
                seq,
                last,
            )
            self.index.cleared(self.url)
            self.last = last = None
        if (last is None and seq > 0) or (last is not None and seq > last + 1):
            await self._replay(0 if last is None else last + 1)
            if self.last is not None and seq <= self.last:
                return
            if (self.last is not None and seq > self.last + 1) or (self.last is None and seq > 0):
                log.warning(
                    "kv events: %s batches before %d are gone (not in its replay buffer); its "
                    "index misses what they stored until the worker stores it again",
                    self.url,
                    seq,
                )
        self._apply(seq, payload)
        self._floor = seq

    def _apply(self, seq: int, payload: bytes) -> None:
        try:
            apply_events(self.index, self.url, decode_batch(payload))
        except BadBatch as exc:
            log.warning("kv events: %s batch %d ignored: %s", self.url, seq, exc)
        self.last = seq
        self.batches += 1

    async def _replay(self, start: int) -> None:
        """Ask the replay socket for every batch from ``start`` on and apply the new ones."""
        if self.endpoints.replay is None:
            return
        import zmq

        dealer = self._ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(self.endpoints.replay)
        got = 0
        try:
            await dealer.send_multipart((b"", start.to_bytes(8, "big")))
            while True:
                if not await dealer.poll(REPLAY_TIMEOUT_SECS * 1000):
                    log.warning(
                        "kv events: %s replay from %d unanswered for %.0fs; going on with the "
                        "live feed",
                        self.url,
                        start,
                        REPLAY_TIMEOUT_SECS,
                    )
                    return
                frames = await dealer.recv_multipart()
                if len(frames) < 3:
                    continue
                seq = int.from_bytes(frames[-2], "big", signed=True)
                if seq == END_SEQ:
                    break
                if self.last is None or seq > self.last:
                    self._apply(seq, frames[-1])
                    got += 1
        finally:
            dealer.close(linger=0)
        self._floor = start
        self.replays += 1
        if got:
            log.info("kv events: %s replayed %d batches from %d", self.url, got, start)


class KvEventsFeed:
    """Keeps one :class:`WorkerFeed` per registry worker (regular workers; not PD)."""

    def __init__(
        self,
        registry: WorkerRegistry,
        index: KvIndex,
        client: httpx.AsyncClient,
        port: int | None = None,
        replay_port: int | None = None,
    ) -> None:
        self.registry = registry
        self.index = index
        self.client = client
        self.port = port
        self.replay_port = replay_port
        self.feeds: dict[str, WorkerFeed] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ctx: Any = None
        self._unresolved: set[str] = set()

    def has_feed(self, url: str) -> bool:
        feed = self.feeds.get(url)
        return feed is not None and feed.connected

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per worker: whether its feed is up, the last batch, replays, what the index holds
        (the router's ``/stats`` ``kv_events``: what to look at when routing looks wrong)."""
        out: dict[str, dict[str, Any]] = {}
        for url in self._tasks:
            feed = self.feeds.get(url)
            out[url] = {
                "endpoint": feed.endpoints.pub if feed else None,
                "connected": bool(feed and feed.connected),
                "last_seq": feed.last if feed else None,
                "batches": feed.batches if feed else 0,
                "replays": feed.replays if feed else 0,
                "blocks": self.index.blocks(url),
                "cached_tokens": self.index.cached_tokens(url),
            }
        return out

    async def run(self) -> None:
        """Follow the registry until cancelled."""
        import zmq.asyncio

        self._ctx = zmq.asyncio.Context()
        try:
            while True:
                try:
                    self.reconcile()
                except Exception:
                    log.exception("kv events: reconciling subscriptions failed; retrying")
                await asyncio.sleep(RECONCILE_SECS)
        finally:
            for task in list(self._tasks.values()):
                task.cancel()
            for task in list(self._tasks.values()):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._ctx.destroy(linger=0)

    def reconcile(self) -> None:
        urls = {w.url for w in self.registry.all() if w.role not in ("prefill", "decode")}
        for url in list(self._tasks):
            if url not in urls:
                self._tasks.pop(url).cancel()
                self.feeds.pop(url, None)
                self.index.drop_worker(url)
                log.info("kv events: %s left; dropped its index", url)
        for url in urls - set(self._tasks):
            self.index.add_worker(url)
            task = asyncio.get_running_loop().create_task(self._follow(url), name=f"kv {url}")
            self._tasks[url] = task

    async def _follow(self, url: str) -> None:
        endpoints = await self._resolve(url)
        feed = WorkerFeed(url, self.index, endpoints, self._ctx)
        self.feeds[url] = feed
        while True:
            try:
                await feed.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("kv events: %s feed failed; resubscribing", url)
                await asyncio.sleep(RESOLVE_RETRY_SECS)

    async def _resolve(self, url: str) -> Endpoints:
        if self.port is not None:
            host = urlsplit(url).hostname or "127.0.0.1"
            replay = _tcp(host, self.replay_port) if self.replay_port is not None else None
            return Endpoints(_tcp(host, self.port), replay)
        while True:
            problem = None
            try:
                response = await self.client.get(url + "/get_server_info", timeout=5.0)
                found = (
                    endpoints_from_server_info(url, response.json())
                    if response.is_success
                    else None
                )
                if found is not None:
                    self._unresolved.discard(url)
                    return found
                problem = (
                    f"HTTP {response.status_code}"
                    if not response.is_success
                    else "no zmq kv_events_config in its /get_server_info"
                )
            except (httpx.HTTPError, ValueError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if url not in self._unresolved:
                self._unresolved.add(url)
                log.warning(
                    "kv events: %s: %s; routing it on the approximate tree (start it with "
                    "--kv-events-config, or give the router --kv-events-port); asking again "
                    "every %.0fs",
                    url,
                    problem,
                    RESOLVE_RETRY_SECS,
                )
            await asyncio.sleep(RESOLVE_RETRY_SECS)
