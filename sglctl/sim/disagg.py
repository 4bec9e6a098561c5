"""PD disaggregation in the sim: a prefill worker hands each request's KV to a decode worker.

Follows SGLang's protocol (``python/sglang/srt/disaggregation/``) as seen from outside:

* The PD router sends the *same* request to a prefill and a decode worker, with
  ``bootstrap_host`` / ``bootstrap_port`` / ``bootstrap_room`` added (lists for a batch, one
  room a prompt). Either worker answers a request without them 400, with SGLang's message
  ("Disaggregated request received without bootstrap room id").
* **Prefill** (:class:`PrefillRooms`): the request is prefilled by the engine like any other
  (prefix cache, timing model) but stops after the first token with its KV still locked
  (phase HANDOVER). A decode worker fetches the room over the bootstrap port
  (:mod:`sglctl.sim.bootstrap`); the prefill holds that connection for the transfer time
  (:mod:`sglctl.sim.transfer`), then unlocks the KV (it stays in the prefix cache) and
  answers its own client, as SGLang does once the transfer succeeded:
  ``finish_reason {"type": "length", "length": 0}``. No fetch within
  ``--disaggregation-timeout`` aborts the room (500, SGLang's "Prefill transfer failed").
* **Decode** (:class:`DecodeReceiver`): fetches each room's KV (waiting if the prefill is
  slower or has not even got its request yet: both arrival orders work), then submits the
  request *preloaded*: the engine reserves prompt + output KV in its own pool and decodes
  from the first token on, no prefill batch. No KV within ``--disaggregation-timeout``, a
  room aborted by the prefill, or a bootstrap connection lost (a prefill crash mid-transfer)
  is a 500 answer at once. Simplification: SGLang's decode pre-allocates KV *before* the
  transfer (its prealloc queue); the sim reserves it at admission, right after the KV came,
  so a memory-bound decode queues the request after the transfer instead of before it.
* **Aborts free both sides**: a client leaving the prefill aborts the room, so a decode
  waiting on it gets 410 and answers an error; a client leaving the decode closes the
  bootstrap connection, so the prefill drops the room's KV (and a prefill request arriving
  later for that room fails at once: aborted rooms are remembered, boundedly).
* SGLang's warm-up host ``2.2.2.2`` (``FAKE_BOOTSTRAP_HOST``) skips the hand-over on both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sglctl.sim.bootstrap import BootstrapError, BootstrapRequest, BootstrapServer, get_json
from sglctl.sim.config import DEFAULT_BOOTSTRAP_PORT
from sglctl.sim.engine import Engine, Phase, SimRequest
from sglctl.sim.errors import APIError
from sglctl.sim.transfer import TransferModel

log = logging.getLogger(__name__)

MODES = ("null", "prefill", "decode")
FAKE_BOOTSTRAP_HOST = "2.2.2.2"
_TOMBSTONES = 4096  # aborted rooms remembered, for a prefill request that arrives late
_FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")


@dataclass(frozen=True)
class Bootstrap:
    """Where one prompt's KV is handed over."""

    host: str
    port: int
    room: int

    @property
    def fake(self) -> bool:
        return self.host == FAKE_BOOTSTRAP_HOST


def missing_fields_error(mode: str) -> APIError:
    return APIError(
        "Invalid request: Disaggregated request received without bootstrap room id. "
        f"This worker runs with --disaggregation-mode {mode}: the request needs "
        "bootstrap_host, bootstrap_port and bootstrap_room (a PD router adds them). Send it "
        "through the router (sglctl router --mode pd ...) or use a --disaggregation-mode null "
        "worker."
    )


def parse_bootstrap(body: Any, n_items: int, mode: str) -> list[Bootstrap]:
    """The hand-over coordinates of each item: scalars for one prompt, lists for a batch."""
    raw = [body.get(name) if isinstance(body, dict) else None for name in _FIELDS]
    if raw[0] is None or raw[2] is None:
        raise missing_fields_error(mode)
    if raw[1] is None:  # a router that does not know the port: SGLang's default one
        raw[1] = (
            [DEFAULT_BOOTSTRAP_PORT] * len(raw[2])
            if isinstance(raw[2], list)
            else DEFAULT_BOOTSTRAP_PORT
        )
    columns: list[list[Any]]
    if all(isinstance(value, list) for value in raw):
        columns = [list(value) for value in raw if isinstance(value, list)]
    elif not any(isinstance(value, list) for value in raw):
        columns = [[value] * n_items for value in raw]
        if n_items > 1:
            # One room cannot carry several prompts' KV; SGLang needs one room a prompt too.
            raise APIError(
                f"This request has {n_items} prompts but one bootstrap_room: give "
                "bootstrap_host, bootstrap_port and bootstrap_room as lists, one per prompt."
            )
    else:
        raise APIError(
            "bootstrap_host, bootstrap_port and bootstrap_room must all be lists or all scalars."
        )
    if any(len(column) != n_items for column in columns):
        raise APIError(
            f"bootstrap_host, bootstrap_port and bootstrap_room need one entry per prompt "
            f"({n_items})."
        )
    out = []
    for host, port, room in zip(*columns, strict=True):
        port = DEFAULT_BOOTSTRAP_PORT if port is None else port
        if not isinstance(host, str) or not host:
            raise APIError(f"bootstrap_host must be a host name, got {host!r}.")
        if not _is_int(port) or not 0 < port < 65536:
            raise APIError(f"bootstrap_port must be a port number, got {port!r}.")
        if not _is_int(room) or room < 0:
            raise APIError(f"bootstrap_room must be a non-negative integer, got {room!r}.")
        out.append(Bootstrap(host, int(port), int(room)))
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(eq=False)
class _Room:
    room: int
    req: SimRequest | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # KV held, or room failed
    failed: str | None = None
    fetching: bool = False  # a decode worker is waiting for it (one at most)
    transferring: bool = False
    expiry: asyncio.TimerHandle | None = None


class PrefillRooms:
    """The prefill side: rooms whose KV is computed or held, and the bootstrap server."""

    def __init__(
        self, engine: Engine, transfer: TransferModel, timeout_s: float, host: str, port: int
    ) -> None:
        self.engine = engine
        self.transfer = transfer
        self.timeout_s = timeout_s
        self.server = BootstrapServer(host, port, self.handle)
        self.rooms: dict[int, _Room] = {}
        self._by_req: dict[SimRequest, _Room] = {}
        self._aborted: OrderedDict[int, str] = OrderedDict()
        self.transfers_ok = 0
        self.transfers_failed = 0
        self.kv_bytes_sent = 0

    # ----- the prefill requests' side ------------------------------------------------------

    def register(self, reqs: Sequence[SimRequest], boots: Sequence[Bootstrap]) -> None:
        """Attach each request to its room before it is queued (raises before queueing any)."""
        rooms = [boot.room for boot in boots if not boot.fake]
        if len(set(rooms)) != len(rooms):
            raise APIError("Each prompt needs a bootstrap_room of its own; some share one.")
        for boot in boots:
            if boot.room in self._aborted:
                raise APIError(
                    f"Prefill transfer failed for bootstrap_room {boot.room}: the room was "
                    f"aborted before this request arrived ({self._aborted[boot.room]}).",
                    status=500,
                )
            known = self.rooms.get(boot.room)
            if known is not None and known.req is not None:
                raise APIError(f"bootstrap_room {boot.room} is already in use on this worker.")
        for req, boot in zip(reqs, boots, strict=True):
            req.hold_kv = True
            if boot.fake:
                continue  # warm-up: no decode will fetch; handed over as soon as it is ready
            room = self.rooms.setdefault(boot.room, _Room(boot.room))
            room.req = req
            self._by_req[req] = room

    def on_kv_ready(self, req: SimRequest) -> None:
        """Engine hook: ``req``'s first token is out and its KV is held."""
        room = self._by_req.get(req)
        if room is None:
            self.engine.handover_done(req)
            return
        room.ready.set()
        loop = asyncio.get_running_loop()
        room.expiry = loop.call_later(self.timeout_s, self._expire, room)

    def on_finish(self, req: SimRequest) -> None:
        """Engine hook: ``req`` finished (handed over) or was aborted; forget its room."""
        room = self._by_req.pop(req, None)
        if room is None:
            return
        if req.phase is Phase.ABORTED:
            self._fail(room, req.abort_reason or "aborted")
        self._drop(room)

    def _expire(self, room: _Room) -> None:
        if room.transferring or room.req is None:
            return
        self._abort_req(
            room.req,
            f"Prefill transfer failed for bootstrap_room {room.room}: no decode worker fetched "
            f"its KV within --disaggregation-timeout {self.timeout_s:g} s",
        )

    def _abort_req(self, req: SimRequest, reason: str) -> None:
        log.warning("%s (request %s)", reason, req.rid)
        req.error_status = 500
        self.engine.abort(req, reason)  # calls on_finish, which fails and drops the room

    def _fail(self, room: _Room, reason: str) -> None:
        if room.failed is None:
            room.failed = reason
            self.transfers_failed += 1
        room.ready.set()
        self._aborted[room.room] = reason
        while len(self._aborted) > _TOMBSTONES:
            self._aborted.popitem(last=False)

    def _drop(self, room: _Room) -> None:
        if room.expiry is not None:
            room.expiry.cancel()
        if self.rooms.get(room.room) is room:
            del self.rooms[room.room]

    # ----- the bootstrap server's side -----------------------------------------------------

    async def handle(self, request: BootstrapRequest) -> tuple[int, dict[str, Any]]:
        if request.path == "/health":
            return 200, {"status": "ok"}
        if request.path == "/route":
            return 200, {"disaggregation_mode": "prefill", "rooms": len(self.rooms)}
        prefix = "/kv/"
        if not request.path.startswith(prefix) or not request.path[len(prefix) :].isdigit():
            return 404, {"error": f"unknown bootstrap path {request.path}; try /kv/<room>"}
        room_id = int(request.path[len(prefix) :])
        try:
            wait_s = min(float(request.query.get("timeout", self.timeout_s)), self.timeout_s)
        except ValueError:
            return 400, {"error": "timeout must be a number of seconds"}
        return await self._send(room_id, wait_s, request.peer_gone)

    async def _send(
        self, room_id: int, wait_s: float, peer_gone: asyncio.Event
    ) -> tuple[int, dict[str, Any]]:
        """Wait for the room's KV, "move" it for the transfer time, hand it over."""
        if room_id in self._aborted:
            return 410, {"error": self._aborted[room_id]}
        room = self.rooms.setdefault(room_id, _Room(room_id))
        if room.fetching:
            return 400, {"error": f"bootstrap_room {room_id} is already fetched by a decode worker"}
        room.fetching = True
        outcome = await _first(room.ready, peer_gone, wait_s)
        if room.failed is not None:
            return 410, {"error": room.failed}
        if outcome is not room.ready:
            reason = (
                "the decode worker hung up while waiting"
                if outcome is peer_gone
                else f"no KV within {wait_s:g} s"
            )
            self._give_up(room, f"bootstrap_room {room_id} abandoned: {reason}")
            return 504, {"error": f"bootstrap_room {room_id}: {reason}"}
        req = room.req
        if req is None or req.phase is not Phase.HANDOVER:  # cannot happen; never a crash
            return 410, {"error": f"bootstrap_room {room_id} holds no KV"}
        room.transferring = True
        seconds = self.transfer.seconds(req.prompt_tokens)
        started = time.monotonic()
        if await _first(peer_gone, None, seconds) is peer_gone:
            self._give_up(room, f"bootstrap_room {room_id}: decode worker hung up mid-transfer")
            return 504, {"error": "hung up"}
        kv_bytes = self.transfer.kv_bytes(req.prompt_tokens)
        self.transfers_ok += 1
        self.kv_bytes_sent += kv_bytes
        body = {
            "room": room_id,
            "prompt_tokens": req.prompt_tokens,
            "cached_tokens": req.cached_tokens,
            "kv_bytes": kv_bytes,
            "transfer_s": time.monotonic() - started,
        }
        self.engine.handover_done(req)  # unlock the KV, answer the prefill request
        return 200, body

    def _give_up(self, room: _Room, reason: str) -> None:
        """The decode side left: abort the prefill request holding the room, or remember the
        room as aborted if its prefill request has not arrived."""
        if room.req is not None and not room.req.done:
            self._abort_req(room.req, reason)
        else:
            self._fail(room, reason)
            self._drop(room)

    def stats(self) -> dict[str, Any]:
        held = [r.req for r in self.rooms.values() if r.req is not None]
        return {
            "rooms": len(self.rooms),
            "held_kv_tokens": sum(r.prompt_tokens for r in held if r.phase is Phase.HANDOVER),
            "transferring": sum(1 for r in self.rooms.values() if r.transferring),
            "transfers_ok": self.transfers_ok,
            "transfers_failed": self.transfers_failed,
            "kv_bytes_sent": self.kv_bytes_sent,
        }


async def _first(event: asyncio.Event, other: asyncio.Event | None, timeout: float) -> Any:
    """Wait for ``event`` or ``other``, at most ``timeout`` s; which one fired (None: timeout)."""
    waits = {asyncio.ensure_future(event.wait()): event}
    if other is not None:
        waits[asyncio.ensure_future(other.wait())] = other
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
    if event.is_set():
        return event
    if other is not None and other.is_set():
        return other
    return None


@dataclass(frozen=True)
class ReceivedKV:
    prompt_tokens: int
    cached_tokens: int


class DecodeReceiver:
    """The decode side: fetch each room's KV from its prefill worker."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.waiting = 0
        self.transfers_ok = 0
        self.transfers_failed = 0
        self.kv_bytes_received = 0
        self.last_transfer_s = 0.0

    async def fetch_all(
        self, boots: Sequence[Bootstrap], prompts: Sequence[int]
    ) -> list[ReceivedKV]:
        return list(
            await asyncio.gather(*(self.fetch(b, n) for b, n in zip(boots, prompts, strict=True)))
        )

    async def fetch(self, boot: Bootstrap, prompt_tokens: int) -> ReceivedKV:
        if boot.fake:
            return ReceivedKV(prompt_tokens, 0)
        where = f"prefill bootstrap {boot.host}:{boot.port}"
        self.waiting += 1
        try:
            try:
                status, body = await asyncio.wait_for(
                    get_json(boot.host, boot.port, f"/kv/{boot.room}?timeout={self.timeout_s:g}"),
                    self.timeout_s,
                )
            except TimeoutError:
                raise self._failed(
                    f"KV of bootstrap_room {boot.room} did not arrive from {where} within "
                    f"--disaggregation-timeout {self.timeout_s:g} s"
                ) from None
            except BootstrapError as exc:
                raise self._failed(
                    f"KV transfer of bootstrap_room {boot.room} failed: {exc}"
                ) from None
        finally:
            self.waiting -= 1
        if status != 200:
            raise self._failed(
                f"KV transfer of bootstrap_room {boot.room} from {where} failed "
                f"(HTTP {status}): {body.get('error')}"
            )
        if body.get("prompt_tokens") != prompt_tokens:
            raise self._failed(
                f"bootstrap_room {boot.room}: the prefill worker holds KV of "
                f"{body.get('prompt_tokens')} tokens but this prompt has {prompt_tokens}; the "
                "two workers got different requests"
            )
        self.transfers_ok += 1
        self.kv_bytes_received += int(body.get("kv_bytes", 0))
        self.last_transfer_s = float(body.get("transfer_s", 0.0))
        return ReceivedKV(prompt_tokens, int(body.get("cached_tokens", 0)))

    def _failed(self, message: str) -> APIError:
        self.transfers_failed += 1
        log.warning("%s", message)
        return APIError(message, status=500, type_="InternalServerError")

    def stats(self) -> dict[str, Any]:
        return {
            "rooms_waiting": self.waiting,
            "transfers_ok": self.transfers_ok,
            "transfers_failed": self.transfers_failed,
            "kv_bytes_received": self.kv_bytes_received,
            "last_transfer_s": self.last_transfer_s,
        }
