"""Cache-aware routing, as the SGLang Router defines it, over the block prefix tree.

For each request, among the routable workers:

1. If the load is imbalanced -- ``max - min > balance_abs_threshold`` and
   ``max > balance_rel_threshold * min``, load being requests in flight -- route to the least
   loaded worker: a hot prefix must not pile everything onto one worker.
2. Otherwise find the worker whose tree shares the longest prefix with the request. If
   ``matched / request length > cache_threshold`` route there (its KV cache very likely holds
   that prefix); else place the new prefix:

   * ``placement="load"`` (``sglctl router``'s default, ``--placement``): on the least loaded
     worker, ties to the smallest tree. This is what the SGLang Router 0.3.x does on a miss.
   * ``placement="tree"`` (this class's default; the SGLang Router's documented rule): on the
     worker with the smallest tree, which spreads new prefixes' characters over the workers.
   * ``placement="hash"``: by rendezvous hashing of the prompt's leading blocks with bounded
     loads (:mod:`sglctl.router.policies.placement`), which every router replica computes the
     same way, so replicas agree on where a conversation lives without talking to each other.

3. Either way, record the request's text under the chosen worker.

A background task trims every worker's tree to ``max_tree_size`` characters every
``eviction_interval_secs``; a removed worker's tree is dropped at once.

Two corrections from the workers, both off by default (sglctl only, issue 14):

* ``trim_from_reports`` (``--cached-tokens-correction``): every answer's ``cached_tokens`` is
  read from its last bytes; when the worker reports less than the tree predicted, it evicted,
  and the worker's tree forgets what it used less recently
  (:class:`~sglctl.router.policies.reports.TreeCorrector`, the same code as ``least_ttft``).
  A failed attempt that never produced a byte is trimmed back to what the tree had before.
  Without it the tree only forgets by its own size bound, far larger than a worker's cache,
  so it keeps sending conversations to workers that no longer hold them.
* ``load_from_workers`` (``--worker-load-correction``): load is ``max(in flight from this
  router, the worker's own num_reqs from /get_load)`` (:func:`~sglctl.router.load_poll.
  effective_load`) for the imbalance check and the least-loaded choices, so requests from
  other routers or clients count: with N router replicas each sees only 1/N of the traffic.
  (``--placement hash`` turns the poller on by itself: its bounded-load check always reads
  the same effective load, so that every replica skips the same owners; see
  :mod:`~sglctl.router.policies.placement`.)

With KV cache events (``--kv-events``, :meth:`CacheAwarePolicy.use_kv_events`): for the
workers whose event feed is up, step 2 matches the request's *tokens* against the exact index
of what they hold (:mod:`sglctl.router.kv_index`, fed by every worker's events, so every
router replica sees the same thing, whichever replica placed the prefix); workers without a
feed, and chat requests (no template here: :mod:`sglctl.router.tokens`), are matched on the
tree as before. Misses keep the configured placement (``load`` by default: the greedy choice
on current load), and the load read for the imbalance check and the placement is the shared
one (:meth:`CacheAwarePolicy.shared_load`, the workers' ``/get_load`` counts every replica
reads alike), as ``placement="hash"`` does, moved on by this router's own dispatches since the
last report (:func:`~sglctl.router.load_poll.current_load`: else every miss until the next poll
goes to the same least-loaded worker). The tree is still fed: among equally loaded workers a
miss goes to the smallest tree, which differs per replica, so misses arriving together at
different replicas spread instead of colliding.

Why ``placement="load"`` exists (issue 14, ``benchmarks/RESULTS.md`` "Where the E2E gap came
from"): the smallest-tree rule balances the *characters* each worker was sent, not the work it
is doing. Most requests of the traces are misses, so it hands every miss to one worker until
that worker's tree outgrows the next one, however many requests it is already decoding (a
127k-token prompt in prefill stalls all of them): at synthetic 444k x2 the busiest worker held
2.7x the mean of admitted requests at the median sample (the SGLang Router: 1.3x), and decode
took 1.4x as long per token. The SGLang Router 0.3.x sends a low-match request to the worker
with the fewest requests in flight (until the end of the stream) -- 308 of its 326 misses went
to a least-loaded worker in that run, 52 of 323 for the smallest-tree rule.

Two deliberate refinements over the SGLang Router: ties (equal match, equal tree size) go to
the less loaded worker instead of the first one listed, and a request with no text at all is
routed by shortest queue (the SGLang Router would always pick the smallest tree, i.e. the same
worker, for every such request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from operator import attrgetter

from sglctl.router.kv_index import KvIndex
from sglctl.router.load_poll import WorkerLoad, current_load, effective_load
from sglctl.router.policies import placement, reports
from sglctl.router.policies.base import NO_KEY, Policy, RouteKey
from sglctl.router.policies.reports import TreeCorrector
from sglctl.router.tokens import Encoder, route_tokens
from sglctl.router.tree import DEFAULT_BLOCK, Prefixes, PrefixHasher, PrefixTree
from sglctl.router.workers import Worker

log = logging.getLogger(__name__)
_load = attrgetter("in_flight")


def _load_and_told(worker: Worker) -> int:
    """This router's and the other replicas' requests in flight on ``worker``."""
    return worker.in_flight + worker.told_in_flight


_url = attrgetter("url")
#: ``placement.PLACEMENTS`` plus ``"load"``, which needs no shared computation across replicas.
_PLACEMENTS = (*placement.PLACEMENTS, "load")
#: Seconds each rank of router replica waits before placing a miss (:attr:`CacheAwarePolicy.
#: stagger`) at least: more than a route takes to reach the other replicas on a quiet network
#: (a POST on the router's port, a millisecond or two); with peers
#: the wait follows the routes' measured lateness (``peers.Peers.restep``).
STAGGER_SECS = 0.005


class _Ticket:
    """One attempt, for the ``cached_tokens`` correction: what the tree predicted at dispatch."""

    __slots__ = (
        "closed",
        "old_tick",
        "policy",
        "predicted_blocks",
        "prefixes",
        "streamed",
        "text",
        "url",
    )

    def __init__(
        self,
        policy: CacheAwarePolicy,
        url: str,
        prefixes: Prefixes,
        predicted_blocks: int,
        old_tick: int,
        text: bool,
    ) -> None:
        self.policy = policy
        self.url = url
        self.prefixes = prefixes
        self.predicted_blocks = predicted_blocks
        self.old_tick = old_tick
        self.text = text
        self.streamed = False
        self.closed = False

    def first_byte(self, streamed: bool) -> None:
        self.streamed = streamed
        corrector = self.policy.corrector
        if corrector is not None:
            corrector.prefilled(self.url, id(self))

    def done(self, ok: bool, tail: bytes) -> None:
        if self.closed:
            return
        self.closed = True
        corrector = self.policy.corrector
        if corrector is None:
            return
        corrector.prefilled(self.url, id(self))
        tree = self.policy.tree
        if not ok:
            if not self.streamed:  # never prefilled there, perhaps: back to the tree before it
                tree.trim(self.prefixes, self.url, self.predicted_blocks)
            return
        corrector.report(
            self.url, self.prefixes, self.predicted_blocks, self.old_tick, self.text, tail
        )


class CacheAwarePolicy(Policy):
    """Longest-prefix routing with load-imbalance fallback and a size-bounded tree."""

    name = "cache_aware"
    needs_text = True

    def __init__(
        self,
        cache_threshold: float = 0.5,
        balance_abs_threshold: int = 32,
        balance_rel_threshold: float = 1.0001,
        eviction_interval_secs: float = 60.0,
        max_tree_size: int = 16_777_216,
        block: int = DEFAULT_BLOCK,
        placement: str = "tree",  # the class keeps SGLang's documented rule; the router's
        # default (RouterConfig.placement, --placement) is "load"
        placement_epsilon: float = placement.DEFAULT_EPSILON,
        placement_key_blocks: int = placement.DEFAULT_KEY_BLOCKS,
        trim_from_reports: bool = False,
        load_from_workers: bool = False,
    ) -> None:
        if placement not in _PLACEMENTS:
            raise ValueError(f"placement must be one of {_PLACEMENTS}, got {placement!r}")
        if placement_epsilon < 0 or placement_key_blocks < 1:
            raise ValueError("placement_epsilon must be >= 0 and placement_key_blocks >= 1")
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.eviction_interval_secs = eviction_interval_secs
        self.max_tree_size = max_tree_size
        self.placement = placement
        self.placement_epsilon = placement_epsilon
        self.placement_key_blocks = placement_key_blocks
        self.hasher = PrefixHasher(block)
        self.tree = PrefixTree(block)
        #: ``--cached-tokens-correction``: trims the tree to what the workers report.
        self.corrector = TreeCorrector(self.tree) if trim_from_reports else None
        #: ``--worker-load-correction`` (or ``--placement hash``, whose bound reads the same
        #: loads on every replica): the router's poller fills :attr:`worker_loads`.
        self.load_from_workers = load_from_workers
        self.uses_worker_loads = load_from_workers or placement == "hash"
        #: The load is this router's and the other replicas' in flight (told by
        #: ``--router-peers``), raised to the reports moved on since when the workers are
        #: polled (``--worker-load-correction``, ``--kv-events``), for the imbalance check
        #: and the greedy placement, instead of the max of report and own count: set with
        #: router peers (:func:`~sglctl.router.load_poll.current_load`).
        self.current_loads = False
        #: Set with router peers: this replica's rank among the live replicas and their
        #: count (:meth:`~sglctl.router.peers.Peers.rank`). Replicas hold the same trees and
        #: loads (they tell each other every route and their in-flight counts) but learn each
        #: other's picks a POST late; the traces' clients send requests in bursts (the
        #: conversation trace: ~9 at one timestamp), so misses arriving at every replica at
        #: once all went to the one least loaded worker, a herd one router never makes (its
        #: own pick raises that worker's load before the next). Rank r places its misses
        #: ``r * step`` late (:meth:`miss_delay`; the step: :meth:`stagger_by`), after the
        #: routes of the ranks before it arrived: the burst is placed in turn, as one router
        #: places it.
        self.stagger: Callable[[], tuple[int, int]] | None = None
        self.stagger_secs = STAGGER_SECS
        self.stagger_step: Callable[[], float] | None = None
        #: The last :meth:`miss_delay`'s key and its prefixes, so that the ``select`` right
        #: after it does not hash the prompt again.
        self._hashed: tuple[RouteKey, Prefixes] | None = None
        self.worker_loads: Mapping[str, WorkerLoad] = {}
        self._next: _Ticket | None = None
        #: Requests routed to a worker because of a prefix match, and the others; exported
        #: as ``sglang_router_cache_hits_total`` / ``..._misses_total``.
        self.cache_hits = 0
        self.cache_misses = 0
        #: Requests routed by the imbalance fallback.
        self.balance_fallbacks = 0
        #: ``--kv-events``: the exact index, which workers have a live feed, the tokenizer.
        self.kv_index: KvIndex | None = None
        self.kv_fed: Callable[[str], bool] = lambda url: False
        self.kv_encoder: Encoder | None = None
        #: Requests whose match was decided on the exact index (hit or miss).
        self.kv_matched = 0

    def use_kv_events(self, index: KvIndex, fed: Callable[[str], bool], encoder: Encoder) -> None:
        """Match on ``index`` for the workers ``fed`` says have a live event feed; read the
        shared load (the poller must run: :attr:`uses_worker_loads`)."""
        self.kv_index = index
        self.kv_fed = fed
        self.kv_encoder = encoder
        self.uses_worker_loads = True

    def prefixes(self, key: RouteKey) -> Prefixes:
        hashed = self._hashed
        if hashed is not None and hashed[0] is key:
            return hashed[1]
        if key.input_ids:
            return self.hasher.tokens(key.input_ids)
        return self.hasher.text(key.text or "")

    def load_of(self) -> Callable[[Worker], int]:
        """A worker's load in requests: in flight, or corrected by the workers' own reports."""
        if self.kv_index is not None or self.current_loads:
            return self.shared_load(current=True)
        return self.shared_load() if self.load_from_workers else _load

    def shared_load(self, current: bool = False) -> Callable[[Worker], int]:
        """In flight, raised to the worker's fresh ``/get_load`` count (the same on every
        replica); just in flight when nothing is polled. ``current``: the report moved on by
        this router's own dispatches since and with the peers' in flight
        (:func:`~sglctl.router.load_poll.current_load`), for the greedy placement of
        ``--kv-events`` and ``--router-peers``."""
        loads, now = self.worker_loads, time.monotonic()
        if not loads:
            # Nothing polled (router peers' default): the sum, without current_load's call.
            return _load_and_told if current else _load
        if current:
            return lambda w: current_load(w.in_flight, loads.get(w.url), now, w.told_in_flight)
        return lambda w: effective_load(w.in_flight, loads.get(w.url), now)

    def stagger_by(
        self,
        rank: Callable[[], tuple[int, int]],
        secs: float | None = None,
        step: Callable[[], float] | None = None,
    ) -> None:
        """Stagger misses by ``rank()`` (this replica's rank and the replicas' count),
        ``secs`` a rank (default :data:`STAGGER_SECS`; 0: not at all), or ``step()`` a rank
        when given (the peers' measured wait, :meth:`~sglctl.router.peers.Peers.stagger_step`,
        which is at least ``secs``)."""
        secs = STAGGER_SECS if secs is None else secs
        self.stagger = rank if secs > 0 else None
        self.stagger_secs = secs
        self.stagger_step = step
        self.miss_delays = secs > 0

    def miss_delay(self, workers: Sequence[Worker], key: RouteKey = NO_KEY) -> float:
        """``rank * step`` (:meth:`stagger_by`) for a request :meth:`select` would place by
        load (a miss or the imbalance fallback) on a replica of rank ``rank``; else 0."""
        stagger = self.stagger
        if stagger is None or key.empty or len(workers) < 2:
            return 0.0
        rank, _ = stagger()
        if rank == 0:
            return 0.0
        prefixes = self.prefixes(key)
        self._hashed = (key, prefixes)
        load = self.load_of()
        if not self.is_imbalanced(workers, load):
            counted = self.kv_matched, self.last_match  # select counts this request, not this
            _, ratio = self._best_match(key, prefixes, workers)
            self.kv_matched, self.last_match = counted
            if ratio > self.cache_threshold:
                return 0.0
        step = self.stagger_step
        return rank * (step() if step is not None else self.stagger_secs)

    def is_imbalanced(
        self, workers: Sequence[Worker], load: Callable[[Worker], int] = _load
    ) -> bool:
        loads = list(map(load, workers))  # C-level with the default attrgetter
        high, low = max(loads), min(loads)
        return high - low > self.balance_abs_threshold and high > low * self.balance_rel_threshold

    def select(self, workers: Sequence[Worker], key: RouteKey = NO_KEY) -> Worker | None:
        self._next = None
        if not workers:
            return None
        self.last_match = 0
        if len(workers) == 1:
            chosen = workers[0]
            self.last_decision = "single_worker"
            if not key.empty:
                self._record(self.prefixes(key), chosen, key)
                if self.on_route is not None:
                    self.on_route(key, chosen.url)
            return chosen
        load = self.load_of()
        if key.empty:
            self.cache_misses += 1
            self.last_decision = "no_text"
            return min(workers, key=load)
        prefixes = self.prefixes(key)
        if self.is_imbalanced(workers, load):
            self.balance_fallbacks += 1
            self.cache_misses += 1
            self.last_decision = "balance_fallback"
            chosen = min(workers, key=load)
        else:
            by_load = sorted(workers, key=load)
            best_url, ratio = self._best_match(key, prefixes, by_load)
            if best_url is not None and ratio > self.cache_threshold:
                self.cache_hits += 1
                self.last_decision = "cache_hit"
                # A scan, not a url -> worker dict built for every request (a miss needs none).
                for chosen in by_load:
                    if chosen.url == best_url:
                        break
                if ratio >= 1.0:  # nothing new: the siblings learnt it when it was
                    self._record(prefixes, chosen, key)
                    return chosen
            else:
                self.cache_misses += 1
                chosen = self.place(prefixes, by_load, load)
        self._record(prefixes, chosen, key)
        if self.on_route is not None:
            self.on_route(key, chosen.url)
        return chosen

    def _best_match(
        self, key: RouteKey, prefixes: Prefixes, by_load: Sequence[Worker]
    ) -> tuple[str | None, float]:
        """The worker holding the longest share of the request and that share (0..1).

        Fed workers are matched on the exact index in tokens, the others on the tree in its
        units; the larger share wins, ties to the less loaded (``by_load`` order).
        """
        index, encoder = self.kv_index, self.kv_encoder
        tree_workers: Sequence[Worker] = by_load
        best_url: str | None = None
        best = 0.0
        if index is not None and encoder is not None:
            fed = [w for w in by_load if self.kv_fed(w.url)]
            tokens = route_tokens(key, encoder) if fed else None
            if fed and tokens:
                self.kv_matched += 1
                matches = index.match(tokens, (w.url for w in fed))
                for worker in fed:
                    share = matches.get(worker.url, 0) / len(tokens)
                    if share > best:
                        best_url, best = worker.url, share
                self.last_match = max(matches.values(), default=0)
                tree_workers = [w for w in by_load if w not in fed]
        if tree_workers:
            url, matched = self.tree.match(prefixes, map(_url, tree_workers))  # C-level names
            share = matched / prefixes.length
            if url is not None and (best_url is None or share > best):
                best_url, best = url, share
                self.last_match = matched
        return best_url, best

    def _record(self, prefixes: Prefixes, chosen: Worker, key: RouteKey) -> None:
        """The tree gets the prompt; with the correction on, the next attempt a ticket."""
        if self.corrector is not None:
            blocks = self.tree.match_blocks(prefixes, chosen.url)
            tick = self.tree.last_use(prefixes, chosen.url, blocks) if blocks else 0
            self._next = _Ticket(self, chosen.url, prefixes, blocks, tick, not key.input_ids)
        self.tree.insert(prefixes, chosen.url)

    #: Told every decision that taught the tree something (the request's key and the worker
    #: chosen), so that the other ``--router-processes`` record it too (:meth:`observe` on
    #: their side); None in a single-process router. A hit on the whole prompt is not told:
    #: it leaves the siblings' LRU order a little older than this process's, which only
    #: matters at the ``--max-tree-size`` bound.
    on_route: Callable[[RouteKey, str], None] | None = None

    def observe(self, key: RouteKey, url: str) -> None:
        """Record that another router process sent ``key`` to ``url`` (``--router-processes``),
        so that this process's tree sends the same prefix there too."""
        if not key.empty:
            self.tree.insert(self.prefixes(key), url)

    def begin_attempt(self, worker: Worker) -> _Ticket | None:
        ticket, self._next = self._next, None
        if ticket is None or ticket.url != worker.url or self.corrector is None:
            return None
        ticket.old_tick = self.corrector.start(worker.url, id(ticket), ticket.old_tick)
        return ticket

    def apply_corrections(self) -> int:
        """Forget what the workers said they evicted; blocks dropped (background task)."""
        return self.corrector.apply() if self.corrector is not None else 0

    def place(
        self, prefixes: Prefixes, by_load: Sequence[Worker], load: Callable[[Worker], int] = _load
    ) -> Worker:
        """Where a prefix no tree holds goes (``by_load``: the workers, least loaded first,
        by ``load``)."""
        self.last_decision = "cache_miss"  # every placement: metrics count it as a miss
        if self.placement == "hash":
            hash_key = placement.placement_key(prefixes, self.placement_key_blocks)
            if hash_key is not None:
                return placement.choose(
                    hash_key, by_load, self.placement_epsilon, self.shared_load()
                )
        elif self.placement == "load":
            # The least loaded, and among those the smallest tree: when the fleet is idle
            # (all loads 0) the tree size still spreads new prefixes instead of worker 0
            # taking them all.
            low = load(by_load[0])
            by_load = [w for w in by_load if load(w) == low]
        smallest = self.tree.smallest(w.url for w in by_load)
        return by_load[0] if smallest is None else next(w for w in by_load if w.url == smallest)

    def on_worker_added(self, worker: Worker) -> None:
        self.tree.add_tenant(worker.url)

    def on_worker_removed(self, worker: Worker) -> None:
        self.tree.remove_tenant(worker.url)
        if self.corrector is not None:
            self.corrector.forget_worker(worker.url)

    def tree_size(self) -> int:
        return self.tree.total_size()

    def tree_sizes(self) -> dict[str, int]:
        return {name: self.tree.size(name) for name in self.tree.tenants()}

    def flush(self) -> None:
        self.tree.clear()
        if self.corrector is not None:
            self.corrector.clear()

    def evict_once(self) -> int:
        evicted = self.tree.evict(self.max_tree_size)
        if evicted:
            log.debug("cache-aware tree: evicted %d blocks", evicted)
        return evicted

    async def run_background(self) -> None:
        """Trim the tree every ``eviction_interval_secs`` (and, when on, apply the workers'
        corrections: :func:`~sglctl.router.policies.reports.maintain`) until cancelled."""
        if self.corrector is not None:
            await reports.maintain(
                self.corrector, self._evict_all, self.eviction_interval_secs, "cache-aware"
            )
            return
        if self.eviction_interval_secs <= 0:
            return
        while True:
            await asyncio.sleep(self.eviction_interval_secs)
            await self._evict_all()

    async def _evict_all(self) -> None:
        """Trim every worker's tree to ``max_tree_size``, one tenant at a time."""
        evicted = 0
        for name in self.tree.tenants():
            try:
                evicted += self.tree.evict_tenant(name, self.max_tree_size)
            except Exception:
                log.exception("cache-aware tree eviction failed for %s; retrying next time", name)
            await asyncio.sleep(0)  # one tenant at a time: requests run in between
        if evicted:
            log.debug("cache-aware tree: evicted %d blocks", evicted)
