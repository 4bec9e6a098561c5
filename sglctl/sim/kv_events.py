"""The sim worker's KV cache events, published as SGLang publishes them (``--kv-events-config``).

SGLang (``python/sglang/srt/disaggregation/kv_events.py``) publishes what its radix cache
stores and evicts so that a router can keep an exact view of every worker's cache. This module
speaks the same protocol, so ``sglctl router --kv-events`` (or any other subscriber of SGLang's
events) cannot tell the sim from SGLang:

* **The config:** ``--kv-events-config`` is SGLang's JSON: ``publisher`` (``"zmq"`` or
  ``"null"``), ``endpoint`` (default ``tcp://*:5557``), ``replay_endpoint`` (default none),
  ``buffer_steps`` (batches kept for replay, 10,000), ``hwm`` (the PUB socket's high-water
  mark, 100,000), ``max_queue_size`` (batches waiting for the publisher thread, 100,000),
  ``topic`` (``""``). Other keys are accepted and ignored, as pydantic does there.
* **The wire:** a ZMQ PUB socket (bound when the endpoint has ``*``, ``::`` or is ipc/inproc,
  else connected) sends each batch as three frames ``[topic, seq, payload]``: ``seq`` an 8-byte
  big-endian counter from 0, ``payload`` the msgpack of ``KVEventBatch`` as msgspec encodes
  ``array_like`` structs: ``[ts, [event, ...]]``, each event an array whose first item is its
  tag (the class name): ``["BlockStored", block_hashes, parent_block_hash, token_ids,
  block_size, lora_id]``, ``["BlockRemoved", block_hashes]``, ``["AllBlocksCleared"]``.
* **The replay:** a ROUTER socket on ``replay_endpoint``; a subscriber (DEALER) sends
  ``[b"", start_seq (8 bytes, big-endian)]`` and gets back every buffered batch with
  ``seq >= start_seq`` as ``[b"", seq, payload]``, then ``[b"", -1 (8 bytes, signed), b""]``.

Block hashes are the sim's own (a chain over the page's tokens, ``page_hash``); SGLang's
are sha256-based. A subscriber must not depend on either: it keys blocks by the token ids the
events carry, and maps the worker's hashes to its own keys (``sglctl.router.kv_index``).

Batches leave the request path at once: the engine hands each step's events to
:meth:`KvEventPublisher.publish` (a queue put) and a thread encodes and sends them.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple

from sglctl.fourchar import wire_ids

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
#: The publisher thread sends at most one batch per this many seconds: the steps queued in
#: between go out as one batch, their events in order. SGLang sends one batch per scheduler
#: step; a ``--speedup``'ed sim steps hundreds of times a second, and every batch wakes every
#: subscribed router (measured: three idle replicas subscribed to 8 sims doubled the TTFT p50
#: of a 2-core machine). 10 ms is nothing next to the seconds before a conversation's next turn.
COALESCE_SECS = 0.01
PUBLISHERS = ("null", "zmq")


class BlockStored(NamedTuple):
    """Pages a worker now holds: ``block_hashes[i]`` covers ``token_ids[i*block_size:...]``."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None


class BlockRemoved(NamedTuple):
    """Pages a worker evicted."""

    block_hashes: list[int]


class AllBlocksCleared(NamedTuple):
    """The worker dropped its whole cache (``/flush_cache``)."""


Event = BlockStored | BlockRemoved | AllBlocksCleared


def page_hash(parent: int | None, tokens: list[int]) -> int:
    """The sim's block hash of a page: a signed 64-bit chain over the parent and the tokens.

    Python's hash of a tuple of ints is the same in every process (ints are not salted) and
    fast (C). It only has to be stable for the worker's lifetime and unlikely to collide:
    subscribers map it to keys of their own.
    """
    return hash((0 if parent is None else parent, *tokens))


def event_array(event: Event) -> list[Any]:
    """``event`` as msgspec encodes a tagged ``array_like`` struct: tag first, then fields."""
    if isinstance(event, BlockStored):
        return [
            "BlockStored",
            event.block_hashes,
            event.parent_block_hash,
            wire_ids(event.token_ids),
            event.block_size,
            event.lora_id,
        ]
    if isinstance(event, BlockRemoved):
        return ["BlockRemoved", event.block_hashes]
    return ["AllBlocksCleared"]


def encode_batch(ts: float, events: list[Event]) -> bytes:
    """The msgpack payload of one ``KVEventBatch``: ``[ts, [event, ...]]``."""
    import msgpack

    packed: bytes = msgpack.packb([ts, [event_array(e) for e in events]], use_bin_type=True)
    return packed


@dataclass(frozen=True)
class KvEventsConfig:
    """The keys of SGLang's ``--kv-events-config`` that the sim uses."""

    publisher: str = "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @classmethod
    def from_json(cls, text: str) -> KvEventsConfig:
        """Parse the flag's JSON; ``ValueError`` with a message the user can act on."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--kv-events-config is not JSON ({exc}): {text!r}") from None
        if not isinstance(raw, dict):
            raise ValueError(
                "--kv-events-config must be a JSON object, e.g. "
                '\'{"publisher":"zmq","endpoint":"tcp://*:5557"}\''
            )
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        config = cls(**known)
        if config.publisher not in PUBLISHERS:
            raise ValueError(
                f"--kv-events-config: publisher must be one of {', '.join(PUBLISHERS)}, "
                f"not {config.publisher!r}"
            )
        for name in ("buffer_steps", "hwm", "max_queue_size"):
            value = getattr(config, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"--kv-events-config: {name} must be a positive integer")
        for name in ("endpoint", "replay_endpoint", "topic"):
            value = getattr(config, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"--kv-events-config: {name} must be a string")
        return config

    @property
    def enabled(self) -> bool:
        return self.publisher == "zmq"


def _binds(endpoint: str) -> bool:
    """SGLang's rule: bind a wildcard or local transport, connect to anything else."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KvEventPublisher:
    """A PUB socket, a ROUTER for replays and the thread that owns both.

    :meth:`publish` only puts the batch on a queue (never blocks: a full queue drops the batch
    and says so, which subscribers will not notice -- SGLang's queue blocks instead, a worker
    stall the sim does not copy); the thread numbers, encodes, sends and buffers it.
    """

    def __init__(self, config: KvEventsConfig) -> None:
        import zmq

        self.config = config
        self._queue: queue.Queue[list[Event] | None] = queue.Queue(config.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._topic = config.topic.encode()
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._pub.linger = 0
        self._replay = None
        try:
            if _binds(config.endpoint):
                self._pub.bind(config.endpoint)
            else:
                self._pub.connect(config.endpoint)
            if config.replay_endpoint:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.linger = 0
                self._replay.bind(config.replay_endpoint)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise ValueError(
                f"--kv-events-config: cannot open {config.endpoint} / "
                f"{config.replay_endpoint}: {exc} (is the port free?)"
            ) from None
        self._seq = 0
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()
        log.info(
            "publishing KV cache events on %s (replay %s, topic %r)",
            config.endpoint,
            config.replay_endpoint or "off",
            config.topic,
        )

    def publish(self, events: list[Event]) -> None:
        """Queue one batch (one engine step's events); never blocks."""
        try:
            self._queue.put_nowait(events)
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.warning(
                    "KV events queue full (%d batches): %d batches dropped; routers' views of "
                    "this worker are now incomplete (raise max_queue_size)",
                    self.config.max_queue_size,
                    self._dropped,
                )

    def close(self) -> None:
        """Send what is queued (up to a second), then stop the thread and close the sockets."""
        self._queue.put(None)
        self._thread.join(timeout=2.0)
        self._close_sockets()

    def _close_sockets(self) -> None:
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._ctx.term()

    def _run(self) -> None:
        while True:
            if self._replay is not None:
                try:
                    while self._replay.poll(0):
                        self._serve_replay()
                except Exception:
                    log.exception("KV events replay failed; the subscriber will ask again")
            try:
                batch = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if batch is None:
                return
            closing = False
            while True:  # everything queued meanwhile joins this batch, in order
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                    break
                batch = batch + more
            try:
                self._send(batch)
            except Exception:
                log.exception("KV events batch %d not sent; subscribers will see a gap", self._seq)
            if closing:
                return
            time.sleep(COALESCE_SECS)

    def _send(self, events: list[Event]) -> None:
        payload = encode_batch(time.time(), events)
        seq = self._seq
        self._seq += 1
        self._buffer.append((seq, payload))
        self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))

    def _serve_replay(self) -> None:
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            log.warning("KV events: ignoring a malformed replay request (%d frames)", len(frames))
            return
        client, _, start = frames
        first = int.from_bytes(start, "big")
        for seq, payload in list(self._buffer):
            if seq >= first:
                self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", END_SEQ, b""))
