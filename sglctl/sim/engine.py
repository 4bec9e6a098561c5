"""The simulated GPU: a continuous-batching scheduler driven by one timer loop.

What it models (SGLang's default scheduler, simplified):

* Requests wait in FCFS order. A request is admitted when fewer than ``max_running_requests``
  are active and the KV pool can hold its uncached prompt plus ``max_new_tokens`` (free tokens
  plus what LRU eviction of the radix cache can free). Admission reserves that much KV for the
  request's whole life, so a running request never runs out (SGLang reserves an estimate and
  retracts requests on overflow; the sim never needs to retract).
* Prefill has priority over decode. A prefill batch takes new tokens up to
  ``chunked_prefill_size``; a prompt that does not fit is chunked over several batches. At the
  end of a request's prefill its prompt is inserted in the radix cache and its first token is
  out (this is the time to first token).
* Otherwise the GPU runs one decode step: every running request gets one token.

How it runs cheaply: the loop keeps a *virtual* GPU timeline (batches back to back, each as long
as :class:`~sglctl.sim.timing.TimingModel` says) and wakes up at most once per ``min_tick_s`` of
wall time, completing every batch that has ended by then. Decode steps are O(1): a running
request's output length is derived from a global step counter, and finishes come off a heap
keyed by the step at which each request ends. Streaming requests are woken once per wake-up
(or every ``stream_interval`` tokens), never once per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sglctl.sim.config import SimConfig
from sglctl.sim.output import OutputPlan
from sglctl.sim.radix import Node, RadixCache

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    RUNNING = "running"
    HANDOVER = "handover"  # prefill worker: first token out, KV held until a decode fetched it
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(eq=False)
class SimRequest:
    """One generation request inside the engine."""

    rid: str
    input_ids: list[int]
    plan: OutputPlan
    stream: bool = False
    arrival: float = 0.0
    phase: Phase = Phase.WAITING
    cached_tokens: int = 0
    prefilled: int = 0  # prompt tokens whose KV exists (cached + computed so far)
    first_token_time: float | None = None
    finish_time: float | None = None
    abort_reason: str | None = None
    # PD disaggregation (sglctl.sim.disagg): a prefill request keeps its KV locked after its
    # first token (phase HANDOVER) until the decode side fetched it; a decode request arrives
    # with the prompt's KV already transferred, so it skips prefill and starts decoding.
    hold_kv: bool = False
    preloaded: bool = False
    error_status: int | None = None  # an abort that is the server's failure, not the client's
    # Engine bookkeeping
    lock_node: Node | None = None
    reserved: int = 0
    out_base: int = 0  # output tokens when the request joined the decode batch
    step_base: int = 0  # the engine's decode step counter at that moment
    final_output_len: int = 0
    last_notified: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def done(self) -> bool:
        return self.phase in (Phase.FINISHED, Phase.ABORTED)


@dataclass
class _PrefillBatch:
    end: float
    entries: list[tuple[SimRequest, int]]  # (request, new tokens computed in this batch)


@dataclass
class _DecodeStep:
    end: float


class RequestRejected(ValueError):
    """The request can never run on this worker (too long for the context or the KV pool)."""


class Engine:
    """Schedules simulated requests; :meth:`run` is the timer loop (one task per worker)."""

    def __init__(self, config: SimConfig, on_finish: Callable[[SimRequest], None] | None = None):
        self.config = config
        self.timing = config.timing
        self.cache = RadixCache(
            config.kv_cache_tokens, config.page_size, record_events=config.kv_events_enabled
        )
        #: Receives each step's KV cache events (``--kv-events-config``; the service sets it
        #: to the publisher's queue put, so the request path never waits for the network).
        self.on_kv_events: Callable[[list[Any]], None] | None = None
        self.on_finish = on_finish
        self.on_first_token: Callable[[SimRequest], None] | None = None
        self.on_kv_ready: Callable[[SimRequest], None] | None = None
        self.waiting: deque[SimRequest] = deque()
        self.running: set[SimRequest] = set()
        self.chunked: SimRequest | None = None  # a prompt whose prefill spans several batches
        self.active = 0  # admitted and not finished (prefilling or running)
        self.decode_steps = 0
        self.running_context = 0  # KV tokens held by the decode batch (prompt + output)
        self._finish_heap: list[tuple[int, int, SimRequest]] = []
        self._heap_seq = itertools.count()
        self._pending: _PrefillBatch | _DecodeStep | None = None
        self._gpu_free_at = 0.0
        self._wake = asyncio.Event()
        self._paused = False
        self._closed = False
        # Statistics (cumulative since start; SGLang's cache_hit_rate is cumulative too)
        self.prompt_tokens_seen = 0
        self.cached_tokens_seen = 0
        self.generated_tokens = 0
        self._throughput_mark = (0.0, 0)
        self.gen_throughput = 0.0
        self._memory_warned_at = float("-inf")

    # ----- public API ------------------------------------------------------------------------

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise :class:`RequestRejected` when a request could never be scheduled here."""
        context = self.config.context_length
        if prompt_tokens == 0:
            raise RequestRejected("The input is empty: at least one prompt token is required.")
        if prompt_tokens >= context:
            raise RequestRejected(
                f"The input ({prompt_tokens} tokens) is longer than the model's context "
                f"length ({context} tokens)."
            )
        if prompt_tokens + max_new_tokens > context:
            raise RequestRejected(
                f"Requested token count exceeds the model's maximum context length of {context}"
                f" tokens. You requested a total of {prompt_tokens + max_new_tokens} tokens: "
                f"{prompt_tokens} tokens from the input messages and {max_new_tokens} tokens "
                "for the completion. Please reduce the number of tokens in the input messages "
                "or the completion to fit within the limit."
            )
        if prompt_tokens + max_new_tokens > self.cache.capacity:
            raise RequestRejected(
                f"The request needs {prompt_tokens + max_new_tokens} tokens of KV cache but this"
                f" worker's pool holds {self.cache.capacity} (--kv-cache-tokens)."
            )

    def submit(self, req: SimRequest) -> None:
        """Queue ``req``; the loop picks it up at the next batch boundary."""
        self.check_fits(req.prompt_tokens, req.plan.length)
        req.arrival = self._now()
        req.phase = Phase.WAITING
        self.waiting.append(req)
        self._wake.set()

    def abort(self, req: SimRequest, reason: str = "client disconnected") -> None:
        """Cancel ``req`` wherever it is, freeing its batch slot and KV (idempotent)."""
        if req.done:
            return
        if req.phase is Phase.WAITING:
            with contextlib.suppress(ValueError):
                self.waiting.remove(req)
        elif req.phase is Phase.HANDOVER:
            self._release(req)  # its batch slot was freed when its first token came out
        else:
            if req.phase is Phase.RUNNING:
                self.running.discard(req)
                self.running_context -= req.prompt_tokens + self.output_len(req)
            if self.chunked is req:
                self.chunked = None
            self._release(req)
            self.active -= 1
        req.phase = Phase.ABORTED
        req.abort_reason = reason
        req.finish_time = self._now()
        req.changed.set()
        self._wake.set()  # freed memory or a slot may let the queue move
        log.debug("aborted %s (%s)", req.rid, reason)
        if self.on_finish is not None:
            self.on_finish(req)

    def output_len(self, req: SimRequest) -> int:
        """Tokens generated so far (derived, so decode steps cost O(1))."""
        if req.phase is Phase.RUNNING:
            return req.out_base + (self.decode_steps - req.step_base)
        if req.phase in (Phase.FINISHED, Phase.ABORTED, Phase.HANDOVER):
            return req.final_output_len
        return 0

    def flush_cache(self) -> bool:
        """Empty the radix cache; like SGLang, refuse while requests are queued or running."""
        if self.waiting or self.active:
            return False  # a batch still in flight only holds aborted requests: harmless
        self.cache.reset()
        self.publish_kv_events()
        log.info("radix cache flushed")
        return True

    def publish_kv_events(self) -> None:
        """Hand the events the cache recorded since the last call to the publisher, as one
        batch (SGLang sends one batch per scheduler step)."""
        if self.cache.events:
            events = self.cache.take_events()
            if self.on_kv_events is not None:
                self.on_kv_events(events)

    @property
    def num_running(self) -> int:
        return self.active

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def token_usage(self) -> float:
        return self.cache.used / self.cache.capacity

    @property
    def cache_hit_rate(self) -> float:
        if not self.prompt_tokens_seen:
            return 0.0
        return self.cached_tokens_seen / self.prompt_tokens_seen

    def pause(self) -> None:
        """Freeze the GPU timeline for good (``--stall-after``: a hung worker)."""
        self._paused = True
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    # ----- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Advance the simulated GPU until :meth:`close` (started by the app's lifespan)."""
        self._throughput_mark = (self._now(), 0)
        while not self._closed:
            if self._paused:
                await asyncio.Event().wait()  # never set: the stall is permanent
            now = self._now()
            if self._pending is None and not self._has_work():
                self._update_throughput(now)
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._pending is None and self._gpu_free_at < now:
                self._gpu_free_at = now  # the GPU sat idle; it starts again now
            self._advance(now)
            self.publish_kv_events()
            self._notify_streams()
            self._update_throughput(now)
            if self._pending is None:
                # Nothing could be planned: either all work is done or the head of the queue
                # waits for memory that only an abort can free. Either way, wait for news.
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = max(self._pending.end - now, self.config.min_tick_s)
            self._wake.clear()
            # Sleep until the batch in flight ends; the wake event is not awaited here because a
            # new arrival cannot start before the GPU is free anyway.
            await asyncio.sleep(delay)

    @staticmethod
    def _now() -> float:
        # Not loop.time(): uvloop's clock has millisecond resolution, too coarse for a
        # --speedup'ed worker whose batches last fractions of a millisecond.
        return time.monotonic()

    def _has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked)

    def _advance(self, now: float) -> None:
        """Complete every batch that ends by ``now`` and plan the next one."""
        while True:
            if self._pending is None:
                self._pending = self._plan(self._gpu_free_at)
                if self._pending is None:
                    return
            if self._pending.end > now:
                return
            batch, self._pending = self._pending, None
            self._gpu_free_at = batch.end
            if isinstance(batch, _PrefillBatch):
                self._complete_prefill(batch)
            else:
                self._complete_decode(batch)

    def _plan(self, start: float) -> _PrefillBatch | _DecodeStep | None:
        entries = self._admit(start)
        if entries:
            chunks = [(req.prefilled, new) for req, new in entries]
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "prefill batch: %d reqs, %d new tokens, %d cached; running %d, waiting %d",
                    len(entries),
                    sum(new for _, new in entries),
                    sum(req.cached_tokens for req, _ in entries),
                    len(self.running),
                    len(self.waiting),
                )
            return _PrefillBatch(start + self.timing.prefill_seconds(chunks), entries)
        if self.running:
            step = self.timing.decode_seconds(len(self.running), self.running_context)
            return _DecodeStep(start + step)
        return None

    def _admit(self, start: float) -> list[tuple[SimRequest, int]]:
        """Form a prefill batch: the chunked request first, then FCFS admissions."""
        budget = self.config.chunked_prefill_size
        entries: list[tuple[SimRequest, int]] = []
        if self.chunked is not None:
            req = self.chunked
            new = min(req.prompt_tokens - req.prefilled, budget)
            entries.append((req, new))
            budget -= new
        while budget > 0 and self.waiting and self.active < self.config.max_running_requests:
            req = self.waiting[0]
            # Like SGLang, match at most len - 1 tokens: the last one must be computed to get
            # the logits of the first output token.
            match = self.cache.match_prefix(req.input_ids[:-1])
            self.cache.lock(match.node)
            # A PD prefill request only ever holds its prompt and first token.
            out = min(1, req.plan.length) if req.hold_kv else req.plan.length
            need = req.prompt_tokens - match.length + out
            if need > self.cache.available:
                self.cache.unlock(match.node)
                self._warn_memory_bound(need)
                break  # head-of-line waits for memory, as in SGLang's FCFS policy
            self.cache.allocate(need)
            self.waiting.popleft()
            req.lock_node = match.node
            req.reserved = need
            req.phase = Phase.PREFILL
            self.active += 1
            self.prompt_tokens_seen += req.prompt_tokens
            if req.preloaded:
                # Decode side of PD: the prompt's KV arrived over the link and goes into this
                # pool now; its cached_tokens is the prefill worker's figure (set by disagg).
                self.cached_tokens_seen += req.cached_tokens
                req.prefilled = req.prompt_tokens
                self._cache_and_lock(req, req.input_ids)
                self._first_token(req, start)
                continue
            req.cached_tokens = match.length
            req.prefilled = match.length
            self.cached_tokens_seen += match.length
            new = min(req.prompt_tokens - req.prefilled, budget)
            entries.append((req, new))
            budget -= new
        return entries

    def _warn_memory_bound(self, need: int) -> None:
        """Say (at most every 30 s) that admission waits for KV memory: the sign of an
        overloaded worker or a --kv-cache-tokens too small for the workload."""
        now = self._now()
        if now - self._memory_warned_at >= 30.0:
            self._memory_warned_at = now
            log.warning(
                "KV cache full: next request needs %d tokens, %d can be freed; %d running, "
                "%d waiting",
                need,
                self.cache.available,
                self.active,
                len(self.waiting),
            )

    def _complete_prefill(self, batch: _PrefillBatch) -> None:
        for req, new in batch.entries:
            if req.phase is not Phase.PREFILL:
                continue  # aborted while the batch was running
            req.prefilled += new
            if req.prefilled < req.prompt_tokens:
                self.chunked = req
                continue
            if self.chunked is req:
                self.chunked = None
            self._cache_and_lock(req, req.input_ids)
            self._first_token(req, batch.end)

    def _first_token(self, req: SimRequest, when: float) -> None:
        """The prompt's KV is in the pool and the first token is out: finish or start decoding."""
        req.first_token_time = when
        first = min(1, req.plan.length)
        self.generated_tokens += first
        if self.on_first_token is not None:
            self.on_first_token(req)
        if req.plan.length <= first or req.hold_kv:
            req.final_output_len = first
            self._finish(req, when)
            return
        req.phase = Phase.RUNNING
        req.out_base = first
        req.step_base = self.decode_steps
        self.running.add(req)
        self.running_context += req.prompt_tokens + first
        finish_step = self.decode_steps + req.plan.length - first
        heapq.heappush(self._finish_heap, (finish_step, next(self._heap_seq), req))
        req.changed.set()  # the first streamed chunk goes out right after prefill

    def _complete_decode(self, step: _DecodeStep) -> None:
        self.decode_steps += 1
        batch = len(self.running)
        self.generated_tokens += batch
        self.running_context += batch
        heap = self._finish_heap
        while heap and heap[0][0] <= self.decode_steps:
            _, _, req = heapq.heappop(heap)
            if req.phase is not Phase.RUNNING:
                continue  # aborted earlier
            req.final_output_len = self.output_len(req)
            self.running.discard(req)
            self.running_context -= req.prompt_tokens + req.final_output_len
            self._finish(req, step.end)

    def _cache_and_lock(self, req: SimRequest, ids: list[int]) -> None:
        """Put ``ids``' KV in the radix cache, paid from the request's reservation, and move the
        request's lock to the node that ends them, so eviction cannot take what it still uses."""
        node, added = self.cache.insert(ids)
        added = min(added, req.reserved)
        self.cache.commit(added)
        req.reserved -= added
        self.cache.lock(node)
        if req.lock_node is not None:
            self.cache.unlock(req.lock_node)
        req.lock_node = node

    def _finish(self, req: SimRequest, when: float) -> None:
        if req.hold_kv:
            # PD prefill: the batch slot is free, but the prompt's KV stays locked in the tree
            # (the lock _cache_and_lock moved to its last node) until handover_done or abort.
            req.phase = Phase.HANDOVER
            req.finish_time = when
            if req.reserved:
                self.cache.release(req.reserved)
                req.reserved = 0
            self.active -= 1
            if self.on_kv_ready is not None:
                self.on_kv_ready(req)
            return
        req.phase = Phase.FINISHED
        req.finish_time = when
        # Cache what has KV: the prompt and every output token but the last (SGLang does this
        # too), so a follow-up turn that repeats the answer hits the cache.
        output_ids = req.plan.ids(req.final_output_len - 1) if req.final_output_len > 1 else []
        if output_ids:
            self._cache_and_lock(req, req.input_ids + output_ids)
        self._release(req)
        self.active -= 1
        req.changed.set()
        if self.on_finish is not None:
            self.on_finish(req)

    def handover_done(self, req: SimRequest) -> None:
        """A held prefill request's KV reached the decode side: unlock it (it stays cached)
        and answer the prefill request."""
        if req.phase is not Phase.HANDOVER:
            return
        self._release(req)
        req.phase = Phase.FINISHED
        req.changed.set()
        self._wake.set()  # unlocked KV is evictable: a request waiting for memory may fit now
        if self.on_finish is not None:
            self.on_finish(req)

    def _release(self, req: SimRequest) -> None:
        if req.lock_node is not None:
            self.cache.unlock(req.lock_node)
            req.lock_node = None
        if req.reserved:
            self.cache.release(req.reserved)
            req.reserved = 0

    def _notify_streams(self) -> None:
        interval = self.config.stream_interval
        for req in self.running:
            if req.stream:
                produced = req.out_base + (self.decode_steps - req.step_base)
                if produced - req.last_notified >= interval:
                    req.changed.set()

    def _update_throughput(self, now: float) -> None:
        mark_time, mark_tokens = self._throughput_mark
        if now - mark_time >= 1.0:
            self.gen_throughput = (self.generated_tokens - mark_tokens) / (now - mark_time)
            self._throughput_mark = (now, self.generated_tokens)
