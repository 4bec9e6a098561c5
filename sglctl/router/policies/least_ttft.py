"""``least_ttft``: send each request where its first token is predicted to come soonest.

``cache_aware`` decides as the SGLang Router does: load counted in requests, imbalance a
threshold, the tree a guess. What a user waits for is the time to first token, and on an
SGLang worker that is mostly the prefill work queued ahead of the request plus its own
uncached prompt. So, for every routable worker ``w``:

    cost(w) = (queued(w) + (UNCACHED_WEIGHT + STALL_WEIGHT * running(w)) * uncached(w)
               + OVERHEAD + decode(w)) / rate(w)

(with ``UNCACHED_WEIGHT`` 1 and no stall this is the predicted TTFT itself; it is 2 because
an uncached prompt also delays every later request on that worker by as much, so dodging a
short queue with a miss is not free for the fleet; and the ``running(w)`` answers decoding
there wait for its prefill too, since prefill has priority: :data:`STALL_WEIGHT`).

* ``queued(w)``: prefill tokens this router sent to ``w`` that have not produced a first byte
  yet -- each request's uncached tokens there (from the tree at dispatch) plus
  :data:`OVERHEAD_TOKENS` for its fixed per-prefill cost. A request leaves the queue at its
  first streamed chunk; a non-streamed one, whose first byte is the whole answer, at its
  predicted prefill time (or its answer, if that comes first). What is queued *drains*: the
  worker prefills back to back (prefill has priority over decode), so the work counted is
  what is left at ``rate(w)`` since dispatch, and a first byte says everything sent before
  it is done (:meth:`_WorkerModel.ahead`). Counted whole until its first byte, a long chunked
  prompt 90% done weighed all of it: the queue was 0.4-1.2 s too long at p90 (RESULTS.md,
  "least_ttft's estimate against the oracle's").
* ``uncached(w)``: the prefill work of this request's prompt tokens beyond the longest
  prefix the tree has for ``w`` (tree units to tokens: :mod:`~sglctl.router.policies.
  reports`): those tokens plus attention's quadratic share (:func:`prefill_work`,
  :data:`PAIR_WEIGHT`), which makes a 127k-token prompt weigh ~3x its tokens. ``queued``
  counts the same work.
* ``decode(w)``: decode pressure, in prefill-token equivalents: every running (decoding)
  request costs :data:`DECODE_TOKENS` plus :data:`DECODE_CONTEXT_WEIGHT` x its context. A
  decode step's time grows with the number of sequences *and* with the KV context they
  attend over (SGLang's, and the sim's, ``base + per_seq x b + per_ctx_token x k``), and a
  request sent there shares every one of those steps, first the one its prefill waits for,
  then all of its own answer. Context is what the router knows: the request's prompt tokens
  (its output so far is not seen by the policy: the proxy reports the first and last byte
  only, and ``max_new_tokens`` is not in the routing key), so a worker full of long-context
  decodes looks busier than one with short ones, where a fixed count per request made it
  look idle. The worker's ``/get_load`` raises the count of running requests to what it
  reports (requests from other routers), each extra one at this worker's mean known context.
  ``num_tokens`` is not used: SGLang's (and the sim's) counts the KV pool in use, cached idle
  prefixes included, which says how full the cache is, not how heavy the decode batch is.
  Time is the same learned ``rate(w)``: one model, its constant learned per worker.
* ``rate(w)``: prefill tokens per second *learned per worker* from what the router sees:
  for each streamed answer, (the work still ahead of it at dispatch + its own) / time to its
  first byte, an EWMA (:data:`EWMA_ALPHA`) starting from the fleet's rate weighted as one
  sample, so the first few answers move it quickly and a stray one cannot swing it later.
  The fleet's rate (every worker's samples, from :data:`PRIOR_RATE`) is what a worker not
  timed yet is predicted with, and weighs :data:`FLEET_WEIGHT` samples in every worker's:
  alike GPUs learned rates 20% apart, and one that no answer had timed kept a prior 5-8x
  too slow, so the slowest-looking worker sat idle.

A long match is followed: when one worker holds at least :data:`FOLLOW_MATCH_FRACTION` of
the prompt and its predicted time is within :data:`FOLLOW_COST_FACTOR` x the best plus
:data:`FOLLOW_SLACK_SECS`, the request goes there, as ``cache_aware`` follows its match
unless loads are imbalanced. The cost above prices this request only; the next turns of the
same conversation hit only where it stays, and without this rule a slightly shorter queue
elsewhere kept winning, at a lower hit ratio than ``cache_aware`` (RESULTS.md, the grid).

Ties (equal predicted time, to the microsecond) go to the longer match, then to the fewer
requests in flight. Degradations: one worker takes everything; a request without text is
placed by the same cost without a match (the least loaded by predicted queue); all workers
equal spread out by themselves, since each pick adds to that worker's queue.

Corrections from the workers (issue 14):

* every answer's ``cached_tokens`` is read from its last bytes
  (:class:`~sglctl.router.policies.reports.TreeCorrector`, shared with ``cache_aware``). When
  a worker reports at least a block (plus ``SLACK_BLOCKS``) less than the tree predicted, it
  evicted that prefix, and, its cache being LRU, everything it used less recently: the
  worker's tenant forgets every block last used at or before the evicted path's last use
  (:meth:`~sglctl.router.tree.PrefixTree.forget_older`), applied in the background
  (:func:`~sglctl.router.policies.reports.maintain`) so a burst of reports costs one pass per
  worker. The
  request's own path is kept: the worker has just prefilled it and holds it again. A failed
  attempt's path is trimmed back to what the tree had before it
  (:meth:`~sglctl.router.tree.PrefixTree.trim`): that worker may never have cached it.
* the worker's own load (``/get_load``, :mod:`~sglctl.router.load_poll`), when fresh, raises
  ``running`` and ``queued`` to what the worker reports, so requests from other routers or
  clients count too.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from itertools import count

from sglctl.router.load_poll import STALE_SECS, WorkerLoad
from sglctl.router.policies.base import NO_KEY, Policy, RouteKey, Ticket
from sglctl.router.policies.reports import (
    CHARS_PER_TOKEN,
    TreeCorrector,
    maintain,
    units_to_tokens,
)
from sglctl.router.tree import DEFAULT_BLOCK, Prefixes, PrefixHasher, PrefixTree
from sglctl.router.workers import Worker

log = logging.getLogger(__name__)

#: Prefill tokens per second before a worker has answered (an H100 with an 8B model does
#: 20-40k; the simulated worker ~31k). Weighted as one sample.
PRIOR_RATE = 20_000.0
#: Weight of a new sample once a worker has a few (the first ones weigh 1/2, 1/3, ...).
EWMA_ALPHA = 0.1
#: Samples are kept within this factor of the prior: a timer glitch cannot wreck a rate.
RATE_CLAMP = 50.0
#: Answers whose own uncached prompt is shorter than this (tokens) teach nothing: fixed
#: costs (the decode step a prefill waits for, scheduling) dominate their time to first
#: byte, and learning from them made a worker serving cache hits look slow.
MIN_LEARN_TOKENS = 512
#: Fixed cost of one prefill, in tokens (the sim's 8 ms is ~250 tokens at 32 µs each).
OVERHEAD_TOKENS = 256
#: Weight of a request's own uncached tokens: its own prefill, plus the same work it adds
#: in front of every later request there (a miss taken to dodge a queue slows the fleet).
UNCACHED_WEIGHT = 2.0
#: What one running (decoding) request costs a new request, in prefill tokens (per sequence).
DECODE_TOKENS = 32
#: ... plus this many prefill tokens per token of its context (a 16k-token conversation in
#: decode weighs 1,000 tokens, ~30 ms at the prior rate: about what sharing its decode steps
#: costs a new request's answer, the sim's per-context-token decode cost being 49 ns a step).
DECODE_CONTEXT_WEIGHT = 1 / 16
#: A non-streamed request leaves the queue at this multiple of its predicted prefill time.
EXPIRY_FACTOR = 1.5
#: Load reports older than this are ignored (the poller is late or the worker is gone).
LOAD_STALE_SECS = STALE_SECS
#: A request whose prompt is at least this much cached on one worker stays there ...
FOLLOW_MATCH_FRACTION = 0.5
#: ... unless that worker's predicted time exceeds the best one's by this factor plus
#: :data:`FOLLOW_SLACK_SECS`. The cost model alone is myopic: it prices this request's
#: prefill, not the later turns of the same conversation, which hit only where it stays, so
#: a slightly shorter queue elsewhere kept winning over a long match (hit ratio 0.07-0.10
#: against cache_aware's 0.11 on the issue-14 grid).
#: 2 before :data:`STALL_WEIGHT`; with it, 4 kept 0.003-0.005 more hits at load x3 and at
#: 200k tokens (``offline_replay.py`` sweep, RESULTS.md).
FOLLOW_COST_FACTOR = 4.0
FOLLOW_SLACK_SECS = 0.05
#: Prefill work of one (query, key) pair of attention, in prefill tokens: a prompt's work is
#: ``new + PAIR_WEIGHT x (new x cached + new x (new + 1) / 2)``, as a GPU's (and the sim's)
#: prefill time is linear in tokens *plus* attention's pairs. From the FLOPs of an 8B model
#: (``sglctl/sim/timing.py``): 0.52 MFLOP a pair against 16 GFLOP a token, 1.06 ns against
#: 32 µs at the same efficiency. A 127k-token prompt is then ~3x its token count, not 1x:
#: linear work made the workers queued behind one look far less busy than they were, and
#: that is where the TTFT tail came from (``benchmarks/offline_replay.py``, RESULTS.md
#: "How low TTFT p99 can go with queues"). 0 makes work linear in uncached tokens.
PAIR_WEIGHT = 1.06e-9 / 32e-6
#: The queue this router sent a worker drains at its rate from dispatch (:meth:`_WorkerModel.
#: ahead`); false counts every queued token until its first byte (the policy before issue 14's
#: offline diagnosis; ``offline_replay.py --set DRAIN_QUEUE=0``).
DRAIN_QUEUE = True
#: A worker not timed yet is predicted at the fleet's learned rate (:meth:`LeastTTFTPolicy.
#: rate`); false: at :data:`PRIOR_RATE` (``--set SHARE_RATE=0``).
SHARE_RATE = True
#: Samples' worth of the fleet's rate in every worker's (:meth:`LeastTTFTPolicy.rate`): one
#: EWMA window (1 / :data:`EWMA_ALPHA`), so a worker's own rate and the fleet's weigh alike
#: once it has a window of samples. A time to first byte also holds what the router cannot
#: see (the decode step in flight, a batch's fixed costs), so alike GPUs learned rates 20%
#: apart and the one that looked slowest sat idle; 0: each worker's own rate alone.
FLEET_WEIGHT = 1 / EWMA_ALPHA
#: Predicted times this close (seconds) are a tie.
TIE_SECS = 1e-6
#: Weight, per answer decoding on a worker, of the stall a request's own prefill puts on
#: it: prefill has priority (SGLang's scheduler, and the sim's, runs a ready prefill before
#: the next decode step), so every running answer there ends that much later. Priced for its
#: own first token alone (0), a long miss went to the shortest queue however many answers it
#: froze, and end-to-end p50 was 1.4x ``cache_aware``'s at load x3. 1 (every stalled answer
#: weighed like this request's wait) halves that E2E but doubles TTFT p99: misses pile onto
#: the few workers decoding little. 0.1 was chosen from a sweep (0.01-1, RESULTS.md
#: "least_ttft prices the stall"). ``running(w)`` is what this router knows is decoding there.
STALL_WEIGHT = 0.1


def prefill_work(uncached: int, prompt: int) -> float:
    """Prefill work, in tokens, of ``uncached`` new tokens after ``prompt - uncached`` cached
    ones (:data:`PAIR_WEIGHT`)."""
    if not PAIR_WEIGHT:
        return float(uncached)
    return uncached + PAIR_WEIGHT * uncached * (prompt - uncached + (uncached + 1) / 2)


class _WorkerModel:
    """What the policy knows about one worker: its learned rate and its prefill queue."""

    __slots__ = (
        "expiry",
        "left",
        "left_at",
        "queued",
        "queued_tokens",
        "rate",
        "running",
        "running_context",
        "samples",
    )

    def __init__(self) -> None:
        self.rate = PRIOR_RATE
        self.samples = 0
        #: Requests (tickets) waiting for a first byte, and their tokens (with overheads).
        self.queued = 0
        self.queued_tokens = 0
        #: Of those tokens, what is left to prefill at ``left_at`` (:meth:`ahead`).
        self.left = 0.0
        self.left_at = 0.0
        #: (expiry time, sequence, ticket): non-streamed requests leave the queue by then.
        self.expiry: list[tuple[float, int, _Ticket]] = []
        #: Requests past their first byte (decoding) and the sum of their prompt tokens.
        self.running = 0
        self.running_context = 0

    def decode_pressure(self, reported_running: int = 0) -> float:
        """Decode pressure in prefill tokens (see the module docstring): the requests this
        router knows are decoding here, raised to ``reported_running`` (``/get_load``) with
        each extra one at the mean known context."""
        running, context = self.running, float(self.running_context)
        if reported_running > running:
            mean = context / running if running else 0.0
            context += (reported_running - running) * mean
            running = reported_running
        return running * DECODE_TOKENS + DECODE_CONTEXT_WEIGHT * context

    def ahead(self, now: float, rate: float) -> float:
        """Queued prefill tokens still to compute at ``now``: the worker prefills its queue
        back to back (prefill has priority over decode), so what this router sent drains at
        ``rate`` from when it was sent; a long chunked prompt is counted whole until its first
        byte otherwise, though most of it may be done. Never more than what is queued."""
        if not DRAIN_QUEUE:
            return float(self.queued_tokens)
        return min(float(self.queued_tokens), max(0.0, self.left - rate * (now - self.left_at)))

    def add(self, tokens: int, now: float, rate: float) -> None:
        self.left, self.left_at = self.ahead(now, rate) + tokens, now
        self.queued += 1
        self.queued_tokens += tokens

    def remove(self, tokens: int, now: float, rate: float, done_ahead: bool) -> None:
        """A ticket left the queue; with ``done_ahead`` (its first byte: FCFS, all that was
        sent before it is done too) what is left is at most what is still queued after it."""
        self.queued -= 1
        self.queued_tokens -= tokens
        left = self.ahead(now, rate)
        if done_ahead:
            left = min(left, float(self.queued_tokens))
        self.left, self.left_at = left, now

    def learn(self, tokens: float, seconds: float, prior: float | None = None) -> None:
        """One sample of tokens / seconds into the EWMA; a first sample starts from ``prior``
        (the fleet's rate) when given, else from this worker's own prior."""
        if seconds <= 0:
            return
        if prior is not None and not self.samples:
            self.rate = prior
        sample = min(max(tokens / seconds, PRIOR_RATE / RATE_CLAMP), PRIOR_RATE * RATE_CLAMP)
        alpha = max(EWMA_ALPHA, 1.0 / (self.samples + 2))
        self.rate += alpha * (sample - self.rate)
        self.samples += 1

    def expire(self, now: float) -> None:
        heap = self.expiry
        while heap and heap[0][0] <= now:
            heapq.heappop(heap)[2].dequeue()


class _Ticket:
    """One attempt at one worker, from dispatch to its end (the proxy's :class:`Ticket`)."""

    __slots__ = (
        "closed",
        "context",
        "decoding",
        "model",
        "old_tick",
        "policy",
        "predicted_blocks",
        "prefixes",
        "queued",
        "started",
        "streamed",
        "text",
        "tokens",
        "url",
        "work",
    )

    def __init__(
        self,
        policy: LeastTTFTPolicy,
        url: str,
        model: _WorkerModel,
        prefixes: Prefixes | None,
        predicted_blocks: int,
        old_tick: int,
        tokens: int,
        text: bool,
        context: int = 0,
    ) -> None:
        self.policy = policy
        self.url = url
        self.model = model
        self.prefixes = prefixes
        self.predicted_blocks = predicted_blocks
        self.old_tick = old_tick
        #: This request's queued tokens (uncached + overhead).
        self.tokens = tokens
        self.text = text
        #: Prompt tokens: what this request weighs on the worker's decode batch.
        self.context = context
        self.decoding = False
        self.work = 0.0
        self.started = 0.0
        self.queued = False
        self.closed = False
        #: A streamed first chunk came: the worker prefilled the prompt, whatever follows.
        self.streamed = False

    def enqueue(self) -> None:
        model, policy = self.model, self.policy
        now = policy.clock()
        rate = policy.rate(model)
        self.started = now
        # What the worker has to compute before this first token: the undrained queue ahead.
        self.work = model.ahead(now, rate) + self.tokens
        self.old_tick = policy.corrector.start(self.url, id(self), self.old_tick)
        model.add(self.tokens, now, rate)
        self.queued = True
        expires = now + EXPIRY_FACTOR * self.work / rate
        heapq.heappush(model.expiry, (expires, next(policy.seq), self))

    def dequeue(self, first_byte: bool = False) -> None:
        """Past its prefill (first byte or expiry): from the queue to the decode batch."""
        if self.queued:
            self.queued = False
            policy = self.policy
            policy.corrector.prefilled(self.url, id(self))
            model = self.model
            model.remove(self.tokens, policy.clock(), policy.rate(model), first_byte)
            if not self.closed:
                self.decoding = True
                model.running += 1
                model.running_context += self.context

    def finish(self) -> None:
        """The attempt ended: out of the queue and the decode batch."""
        self.closed = True
        self.dequeue()
        if self.decoding:
            self.decoding = False
            self.model.running -= 1
            self.model.running_context -= self.context

    def first_byte(self, streamed: bool) -> None:
        if self.closed:
            return
        was_queued = self.queued
        self.streamed = streamed
        self.dequeue(first_byte=True)
        # Only a streamed first chunk times the prefill; a whole answer includes its decode.
        if streamed and was_queued and self.tokens - OVERHEAD_TOKENS >= MIN_LEARN_TOKENS:
            self.policy.learn(self.model, self.work, self.policy.clock() - self.started)

    def done(self, ok: bool, tail: bytes) -> None:
        if self.closed:
            return
        self.finish()
        self.policy.answered(self, ok, tail)


class LeastTTFTPolicy(Policy):
    """Lowest predicted time to first token, from queued prefill work and learned rates."""

    name = "least_ttft"
    needs_text = True
    uses_worker_loads = True

    def __init__(
        self,
        eviction_interval_secs: float = 60.0,
        max_tree_size: int = 16_777_216,
        block: int = DEFAULT_BLOCK,
    ) -> None:
        self.eviction_interval_secs = eviction_interval_secs
        self.max_tree_size = max_tree_size
        self.hasher = PrefixHasher(block)
        self.tree = PrefixTree(block)
        self.models: dict[str, _WorkerModel] = {}
        #: Every worker's samples in one rate: what a worker that has not been timed yet is
        #: predicted with (the fleet's GPUs are alike; a lone prior was 5-8x off).
        self.fleet = _WorkerModel()
        #: The workers' own load (``/get_load``), kept up to date by the router's poller.
        self.worker_loads: Mapping[str, WorkerLoad] = {}
        self.seq = count()
        self.cache_hits = 0
        self.cache_misses = 0
        #: Trims the tree to what the workers report they cache (shared with cache_aware).
        self.corrector = TreeCorrector(self.tree)
        self._next: _Ticket | None = None
        #: The policy's clock (queue expiry, learned rates, load-report staleness). A seam for
        #: ``benchmarks/offline_replay.py``, which replays a trace in virtual time.
        self.clock: Callable[[], float] = time.monotonic

    # -- the cost model ----------------------------------------------------------------------
    def model(self, url: str) -> _WorkerModel:
        model = self.models.get(url)
        if model is None:
            model = self.models[url] = _WorkerModel()
        return model

    def rate(self, model: _WorkerModel) -> float:
        """A worker's prefill rate: the fleet's until it has been timed, then its own and the
        fleet's weighted by samples (:data:`FLEET_WEIGHT`). A worker's rate was learned only
        from the answers it gave, so one that the first requests missed kept
        :data:`PRIOR_RATE`, looked several times slower than it was and was avoided while idle
        (``benchmarks/offline_replay.py --diagnose``)."""
        if not SHARE_RATE:
            return model.rate
        own = min(model.samples, 1 / EWMA_ALPHA)
        if not own:
            return self.fleet.rate
        return (own * model.rate + FLEET_WEIGHT * self.fleet.rate) / (own + FLEET_WEIGHT)

    def learn(self, model: _WorkerModel, tokens: float, seconds: float) -> None:
        """One timed prefill: into the worker's rate (from the fleet's, if it is its first)
        and the fleet's."""
        model.learn(tokens, seconds, self.fleet.rate if SHARE_RATE else None)
        self.fleet.learn(tokens, seconds)

    def backlog(self, worker: Worker, model: _WorkerModel, now: float) -> float:
        """Tokens of work ahead of a new request at ``worker``: its queue and decode pressure."""
        model.expire(now)
        queued_reqs = model.queued
        queued_tokens = model.ahead(now, self.rate(model))
        reported_running = 0
        load = self.worker_loads.get(worker.url)
        if load is not None and now - load.at < LOAD_STALE_SECS:
            reported_running = load.num_reqs - load.num_waiting_reqs
            extra = load.num_waiting_reqs - queued_reqs
            if extra > 0:  # requests queued there that this router did not send
                mean = model.queued_tokens // queued_reqs if queued_reqs else OVERHEAD_TOKENS
                queued_tokens += extra * mean
        return queued_tokens + model.decode_pressure(reported_running)

    def predict(self, worker: Worker, uncached_tokens: int, now: float | None = None) -> float:
        """Predicted seconds to the first token of a request with that many uncached tokens."""
        model = self.model(worker.url)
        backlog = self.backlog(worker, model, self.clock() if now is None else now)
        return (backlog + UNCACHED_WEIGHT * uncached_tokens + OVERHEAD_TOKENS) / self.rate(model)

    def prefixes(self, key: RouteKey) -> Prefixes:
        if key.input_ids:
            return self.hasher.tokens(key.input_ids)
        return self.hasher.text(key.text or "")

    def select(self, workers: Sequence[Worker], key: RouteKey = NO_KEY) -> Worker | None:
        self._next = None
        self.last_match = 0
        if not workers:
            return None
        now = self.clock()
        text = not key.input_ids
        prefixes = None if key.empty else self.prefixes(key)
        if len(workers) == 1:
            self.last_decision = "single_worker"
            return self._dispatch(workers[0], prefixes, text, *self._match(workers[0], prefixes))
        # One pass, no per-worker allocations: this runs for every request (see the
        # decision-time figures in benchmarks/RESULTS.md).
        tree, models = self.tree, self.models
        length = prefixes.length if prefixes is not None else 0
        prompt = -(-length // CHARS_PER_TOKEN) if text else length
        block = self.tree.block
        best_cost = best_blocks = best_load = 0.0
        chosen: Worker | None = None
        blocks = 0
        # The worker with the longest match (ties: the cheaper), followed below when its
        # match is long and its predicted time is not far off the best.
        owner: Worker | None = None
        owner_blocks = 0
        owner_cost = 0.0
        for worker in workers:
            url = worker.url
            model = models.get(url) or self.model(url)
            if prefixes is not None:
                blocks = tree.match_blocks(prefixes, url)
                uncached = length - min(blocks * block, length)
                if text:
                    uncached = -(-uncached // CHARS_PER_TOKEN)
            else:
                uncached = 0
            own = prefill_work(uncached, prompt)
            cost = (
                self.backlog(worker, model, now)
                + (UNCACHED_WEIGHT + STALL_WEIGHT * model.running) * own
                + OVERHEAD_TOKENS
            ) / self.rate(model)
            if chosen is None or cost < best_cost - TIE_SECS:
                better = True
            elif cost <= best_cost + TIE_SECS:  # a tie: the longer match, then the less loaded
                better = blocks > best_blocks or (
                    blocks == best_blocks and worker.in_flight < best_load
                )
            else:
                better = False
            if better:
                chosen, best_cost, best_blocks, best_load = worker, cost, blocks, worker.in_flight
            if blocks > owner_blocks or (blocks and blocks == owner_blocks and cost < owner_cost):
                owner, owner_blocks, owner_cost = worker, blocks, cost
        assert chosen is not None
        if (
            owner is not None
            and owner is not chosen
            and prefixes is not None
            and prefixes.matched_length(owner_blocks) >= FOLLOW_MATCH_FRACTION * length
            and owner_cost <= FOLLOW_COST_FACTOR * best_cost + FOLLOW_SLACK_SECS
        ):
            chosen, best_blocks = owner, owner_blocks
        chosen_blocks = int(best_blocks)
        chosen_match = (
            chosen_blocks,
            tree.last_use(prefixes, chosen.url, chosen_blocks) if prefixes is not None else 0,
        )
        if prefixes is None:
            self.last_decision = "no_text"
            self.cache_misses += 1
        elif chosen_blocks:
            self.last_decision = "cache_hit"
            self.cache_hits += 1
        else:
            self.last_decision = "cache_miss"
            self.cache_misses += 1
        return self._dispatch(chosen, prefixes, text, *chosen_match)

    def _match(self, worker: Worker, prefixes: Prefixes | None) -> tuple[int, int]:
        if prefixes is None:
            return 0, 0
        blocks = self.tree.match_blocks(prefixes, worker.url)
        return blocks, self.tree.last_use(prefixes, worker.url, blocks) if blocks else 0

    @staticmethod
    def _uncached(prefixes: Prefixes | None, blocks: int, text: bool) -> int:
        if prefixes is None:
            return 0
        return units_to_tokens(prefixes.length - prefixes.matched_length(blocks), text)

    def _dispatch(
        self, worker: Worker, prefixes: Prefixes | None, text: bool, blocks: int, tick: int
    ) -> Worker:
        """Record the pick: the tree gets the prompt, the next ``begin_attempt`` a ticket."""
        uncached = self._uncached(prefixes, blocks, text)
        prompt = units_to_tokens(prefixes.length, text) if prefixes is not None else 0
        work = round(prefill_work(uncached, prompt))
        if prefixes is not None:
            self.last_match = prefixes.matched_length(blocks)
            self.tree.insert(prefixes, worker.url)
        self._next = _Ticket(
            self,
            worker.url,
            self.model(worker.url),
            prefixes,
            blocks,
            tick,
            work + OVERHEAD_TOKENS,
            text,
            prompt,
        )
        return worker

    # -- answers -----------------------------------------------------------------------------
    def begin_attempt(self, worker: Worker) -> Ticket | None:
        ticket, self._next = self._next, None
        if ticket is None or ticket.url != worker.url:
            return None
        ticket.enqueue()
        return ticket

    def answered(self, ticket: _Ticket, ok: bool, tail: bytes) -> None:
        """An attempt ended: correct the tree from what the worker said it had cached."""
        prefixes = ticket.prefixes
        if prefixes is None or ticket.url not in self.models:
            return
        if not ok:
            if not ticket.streamed:
                # No first token: it may never have been prefilled there. Back to what the
                # tree had before (a stream that broke later was prefilled: kept).
                self.tree.trim(prefixes, ticket.url, ticket.predicted_blocks)
            return
        self.corrector.report(
            ticket.url, prefixes, ticket.predicted_blocks, ticket.old_tick, ticket.text, tail
        )

    @property
    def corrections(self) -> int:
        """Answers whose cached_tokens fell short of the tree's prediction."""
        return self.corrector.corrections

    @property
    def corrected_blocks(self) -> int:
        """Tree blocks dropped because of those answers."""
        return self.corrector.corrected_blocks

    def apply_corrections(self) -> int:
        """Forget what the workers said they evicted; blocks dropped (background task)."""
        return self.corrector.apply()

    # -- membership and maintenance -----------------------------------------------------------
    def on_worker_added(self, worker: Worker) -> None:
        self.tree.add_tenant(worker.url)
        self.model(worker.url)

    def on_worker_removed(self, worker: Worker) -> None:
        self.tree.remove_tenant(worker.url)
        self.models.pop(worker.url, None)
        self.corrector.forget_worker(worker.url)

    def tree_size(self) -> int:
        return self.tree.total_size()

    def tree_sizes(self) -> dict[str, int]:
        return {name: self.tree.size(name) for name in self.tree.tenants()}

    def flush(self) -> None:
        self.tree.clear()
        self.corrector.clear()

    async def run_background(self) -> None:
        """Apply the workers' corrections often and trim the tree to its bound now and then."""
        await maintain(self.corrector, self._evict, self.eviction_interval_secs, "least_ttft")

    async def _evict(self) -> None:
        self.tree.evict(self.max_tree_size)
