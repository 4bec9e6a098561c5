"""The worker's shared state and the request life cycle common to every generation endpoint.

Endpoints (native and OpenAI) turn their body into prompts, then use :class:`SimWorker` to
submit them, wait for progress, and notice a client that went away. One place owns fault
injection counting, so ``--crash-after`` and friends count every kind of generation request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from starlette.types import Message, Receive

from sglctl import __version__
from sglctl.sim import tokenizer
from sglctl.sim.config import SimConfig
from sglctl.sim.disagg import DecodeReceiver, PrefillRooms, parse_bootstrap
from sglctl.sim.engine import Engine, Phase, RequestRejected, SimRequest
from sglctl.sim.errors import APIError
from sglctl.sim.faults import FaultInjector
from sglctl.sim.kv_events import KvEventPublisher
from sglctl.sim.metrics import SimMetrics
from sglctl.sim.output import plan_output
from sglctl.sim.protocol import GenerateItem

log = logging.getLogger(__name__)

SIM_VERSION = f"sglctl-sim-{__version__}"


class SimWorker:
    """Config, engine, metrics and faults of one simulated worker."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.engine = Engine(config)
        self.metrics = SimMetrics(self.engine, config.model_name)
        self.engine.on_first_token = self.metrics.first_token
        self.engine.on_finish = self._finished
        self.faults = FaultInjector(config)
        self.started_at = time.time()
        self._task: asyncio.Task[None] | None = None
        #: Publishes the cache's KV events (``--kv-events-config``), from :meth:`start` on.
        self.kv_publisher: KvEventPublisher | None = None
        tokenizer_file = tokenizer.tokenizer_file(config.tokenizer_path)
        if tokenizer_file is not None:
            tokenizer.use_tokenizer_file(tokenizer_file)
        # PD roles: at most one of these exists (sglctl.sim.disagg).
        self.prefill: PrefillRooms | None = None
        self.decode: DecodeReceiver | None = None
        if config.disaggregation_mode == "prefill":
            self.prefill = PrefillRooms(
                self.engine,
                config.transfer,
                config.disaggregation_timeout_s,
                config.host,
                config.bootstrap_port,
            )
            self.engine.on_kv_ready = self.prefill.on_kv_ready
            self.metrics.add_disagg(self.prefill.stats, "prefill")
        elif config.disaggregation_mode == "decode":
            self.decode = DecodeReceiver(config.disaggregation_timeout_s)
            self.metrics.add_disagg(self.decode.stats, "decode")

    # ----- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        events = self.config.kv_events
        if events is not None and events.enabled:
            self.kv_publisher = KvEventPublisher(events)
            self.engine.on_kv_events = self.kv_publisher.publish
        if self.prefill is not None:
            await self.prefill.server.start()
        self._task = asyncio.get_running_loop().create_task(self.engine.run(), name="sim-engine")
        self._task.add_done_callback(_log_engine_exit)

    async def stop(self) -> None:
        if self.prefill is not None:
            await self.prefill.server.stop()
        self.engine.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.kv_publisher is not None:
            self.engine.on_kv_events = None
            await asyncio.to_thread(self.kv_publisher.close)
            self.kv_publisher = None

    # ----- generation ------------------------------------------------------------------------

    def accept(self) -> None:
        """Count a generation request for fault injection; may exit or raise a 500."""
        if self.faults.on_accept():
            raise APIError(
                "Simulated internal error (--error-rate): the scheduler failed this request.",
                status=500,
                type_="InternalServerError",
            )

    def _finished(self, req: SimRequest) -> None:
        self.metrics.finished(req)
        if self.prefill is not None:
            self.prefill.on_finish(req)

    async def begin(
        self, items: Sequence[GenerateItem], stream: bool, body: Any, receive: Receive
    ) -> list[SimRequest]:
        """Accept a generation call and queue its items, the way this worker's role needs.

        ``null``: queued at once. ``prefill``: each item is tied to its ``bootstrap_room``
        and holds its KV after the first token until a decode fetched it. ``decode``: each
        room's KV is fetched from its prefill first (the client leaving stops the wait), then
        the items are queued with their prompts' KV already present.
        """
        self.accept()
        mode = self.config.disaggregation_mode
        if mode == "null":
            return self.submit(items, stream)
        boots = parse_bootstrap(body, len(items), mode)
        if self.prefill is not None:
            return self.submit(
                items, stream, register=lambda reqs: self.prefill_register(reqs, boots)
            )
        assert self.decode is not None
        received_at = self.now()
        fetch = asyncio.ensure_future(
            self.decode.fetch_all(boots, [len(item.input_ids) for item in items])
        )
        watcher = watch_disconnect(receive, lambda: _cancel(fetch))
        try:
            kvs = await fetch
        except asyncio.CancelledError:
            if not fetch.cancelled():
                raise
            raise APIError("client disconnected while waiting for KV", status=499) from None
        finally:
            watcher.cancel()

        def preload(reqs: list[SimRequest]) -> None:
            for req, kv in zip(reqs, kvs, strict=True):
                req.preloaded = True
                req.cached_tokens = kv.cached_tokens

        reqs = self.submit(items, stream, register=preload)
        for req in reqs:
            req.arrival = received_at  # e2e_latency includes the wait for the KV
        return reqs

    def prefill_register(self, reqs: list[SimRequest], boots: Any) -> None:
        assert self.prefill is not None
        self.prefill.register(reqs, boots)

    def answered(self) -> None:
        """A generation request's answer is complete (drives ``--stall-after``)."""
        if self.faults.on_answered():
            self.engine.pause()

    def submit(
        self,
        items: Sequence[GenerateItem],
        stream: bool,
        changed: asyncio.Event | None = None,
        register: Callable[[list[SimRequest]], None] | None = None,
    ) -> list[SimRequest]:
        """Plan and queue every item; all share one ``changed`` event so a caller can wait on
        several requests at once. Rejections (and ``register``, the PD role's bookkeeping)
        happen before anything is queued."""
        changed = changed or asyncio.Event()
        reqs: list[SimRequest] = []
        for item in items:
            sampling = item.sampling
            plan = plan_output(
                item.input_ids,
                seed=self.config.seed + item.index,
                max_new_tokens=sampling.max_new_tokens,
                min_new_tokens=sampling.min_new_tokens,
                stop=sampling.stop,
                stop_token_ids=sampling.stop_token_ids,
                no_stop_trim=sampling.no_stop_trim,
            )
            try:
                self.engine.check_fits(len(item.input_ids), plan.length)
            except RequestRejected as exc:
                raise APIError(str(exc)) from None
            reqs.append(SimRequest(item.rid, item.input_ids, plan, stream, changed=changed))
        if register is not None:
            register(reqs)
        for req in reqs:
            self.engine.submit(req)
        return reqs

    def abort(self, reqs: Sequence[SimRequest], reason: str = "client disconnected") -> None:
        for req in reqs:
            self.engine.abort(req, reason)

    async def wait_all(self, reqs: Sequence[SimRequest]) -> None:
        """Until every request is finished or aborted."""
        if not reqs:
            return
        changed = reqs[0].changed
        while not all(req.done for req in reqs):
            await changed.wait()
            changed.clear()

    async def progress(self, reqs: Sequence[SimRequest]) -> AsyncIterator[None]:
        """Yield whenever any of ``reqs`` made progress, until all are done."""
        changed = reqs[0].changed
        while True:
            await changed.wait()
            changed.clear()
            yield None
            if all(req.done for req in reqs):
                return

    def output_len(self, req: SimRequest) -> int:
        return self.engine.output_len(req)

    def now(self) -> float:
        return self.engine._now()


def aborted(reqs: Sequence[SimRequest]) -> bool:
    """True when any request was aborted; raises the server's error when that abort was one
    (a PD hand-over that failed), so the client gets a 5xx saying why, not a 499."""
    for req in reqs:
        if req.phase is Phase.ABORTED and req.error_status is not None:
            raise APIError(req.abort_reason or "aborted", status=req.error_status)
    return any(req.phase is Phase.ABORTED for req in reqs)


def _cancel(task: asyncio.Future[Any]) -> None:
    task.cancel()


def stream_aborted(reqs: Sequence[SimRequest]) -> bool:
    """:func:`aborted` for a stream already under way: a server-side abort is logged (the
    stream just ends early, as SGLang's does), never raised after the headers went out."""
    try:
        return aborted(reqs)
    except APIError as exc:
        log.warning("stream ended early: %s", exc.message)
        return True


def watch_disconnect(receive: Receive, on_disconnect: Callable[[], None]) -> asyncio.Task[None]:
    """Call ``on_disconnect`` when the client goes away; cancel the task when done."""

    async def listen() -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                on_disconnect()
                return

    return asyncio.get_running_loop().create_task(listen())


def _log_engine_exit(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("the simulated scheduler crashed", exc_info=task.exception())


def finish_reason(req: SimRequest) -> dict[str, Any] | None:
    """SGLang's ``meta_info.finish_reason`` for a finished request, else None."""
    if req.phase is Phase.ABORTED:
        return {"type": "abort", "message": req.abort_reason or "aborted"}
    if req.phase is not Phase.FINISHED:
        return None
    if req.hold_kv:
        return {"type": "length", "length": 0}  # SGLang's prefill: the decode side goes on
    if req.plan.finish_type == "stop":
        return {"type": "stop", "matched": req.plan.matched}
    return {"type": "length", "length": req.final_output_len}
