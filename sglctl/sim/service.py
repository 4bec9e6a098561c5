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
from sglctl.sim.config import SimConfig
from sglctl.sim.engine import Engine, Phase, RequestRejected, SimRequest
from sglctl.sim.errors import APIError
from sglctl.sim.faults import FaultInjector
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
        self.engine.on_finish = self.metrics.finished
        self.faults = FaultInjector(config)
        self.started_at = time.time()
        self._task: asyncio.Task[None] | None = None

    # ----- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.engine.run(), name="sim-engine")
        self._task.add_done_callback(_log_engine_exit)

    async def stop(self) -> None:
        self.engine.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # ----- generation ------------------------------------------------------------------------

    def accept(self) -> None:
        """Count a generation request for fault injection; may exit or raise a 500."""
        if self.faults.on_accept():
            raise APIError(
                "Simulated internal error (--error-rate): the scheduler failed this request.",
                status=500,
                type_="InternalServerError",
            )

    def answered(self) -> None:
        """A generation request's answer is complete (drives ``--stall-after``)."""
        if self.faults.on_answered():
            self.engine.pause()

    def submit(
        self, items: Sequence[GenerateItem], stream: bool, changed: asyncio.Event | None = None
    ) -> list[SimRequest]:
        """Plan and queue every item; all share one ``changed`` event so a caller can wait on
        several requests at once. Rejections are checked before anything is queued."""
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
    return any(req.phase is Phase.ABORTED for req in reqs)


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
    if req.plan.finish_type == "stop":
        return {"type": "stop", "matched": req.plan.matched}
    return {"type": "length", "length": req.final_output_len}
