"""Where a *new* prefix goes, computed the same way by every router replica (``--placement hash``).

Each router replica keeps its own prefix tree, so when replicas share the same workers a
conversation whose turns land on different replicas looks new to all but one of them. With
``--placement tree`` (the default, as the SGLang Router does) a new prefix goes to the worker
with the smallest tree -- a choice that depends on what *this* replica happened to route, so
three replicas send the same conversation to three different workers and two of them recompute
its prefill (``benchmarks/RESULTS.md``, "Router replicas": 47% of the hits lost).

``--placement hash`` makes the choice a pure function of the request and the worker list:

- **The key** is the prefix hash of the prompt's first ``key_blocks`` blocks (the chain
  :class:`~sglctl.router.tree.PrefixHasher` already computes for the tree; it is seeded, so every
  process computes the same numbers). Turns of one conversation repeat its earlier prompt, so
  they share their leading blocks, and therefore their key: every turn, on every replica, maps
  to the same worker, which is the one holding its KV cache. The key must reach past a system
  prompt every request shares, or every request would get the same key: the default, 64 blocks
  of 64 characters (~1k tokens of text), covers the trace's 512-token system block plus the
  conversation's first own block. A prompt shorter than that is keyed by its last full block
  (its whole text), so a conversation whose first turn is short may move once, at turn two.
- **The worker** is chosen by rendezvous (highest-random-weight) hashing of the key over the
  routable workers' URLs: each worker scores ``mix(key, url)`` and the highest score wins. Unlike
  ``key % n``, a worker leaving moves only the keys it owned (each to its second choice) and a
  worker joining takes only the keys it now wins, about ``1/n`` of them: the other workers'
  caches stay warm. No ring, no state, so a restarted replica agrees at once.
- **Bounded loads** (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads"):
  walking the workers in score order, skip one whose load would exceed
  ``ceil((1 + epsilon) x mean)`` with this request counted, so a hot key cannot pile onto one
  worker. ``epsilon`` trades balance for agreement: 0 forces near-perfect balance and moves
  many keys off their first choice, large values never skip. The skip is only as consistent
  across replicas as the loads it reads. A replica's own in-flight counts (each replica sees
  its share of the traffic) are small integers that differ between replicas, so a tight bound
  skips a conversation's owner on one replica and not on another, and that disagreement is a
  lost hit (first round, own counts: epsilon 0.25 kept 0.134 of hits, 1.0 kept 0.176). So the
  policy passes a ``load`` function: with ``--placement hash`` the router polls every worker's
  ``/get_load`` (:mod:`~sglctl.router.load_poll`) and the load is
  :func:`~sglctl.router.load_poll.effective_load` -- the larger of the replica's own count and
  the worker's ``num_reqs`` -- which every replica reads from the same worker, and which counts
  what the *other* replicas sent (a replica seeing a third of the traffic would otherwise let a
  worker the others fill take more). A stale or missing report falls back to the own count.
  Shared loads make a tight bound cheaper (3 replicas, epsilon 0.25: 86% of one router's hits
  kept; own counts gave 71% in an earlier run) but not free (1.0: 94%, 0.5: 91%): a first
  turn skipped to its second choice is looked for on its owner by the replica that gets its
  next turn, once the owner is under the bound again. Agreement at one instant cannot fix a
  skip that depends on the instant, so the default stays 1.0 (``benchmarks/RESULTS.md``,
  "Router replicas", "Third round").
  The cache-aware imbalance check still runs first.

The tree still refines it: a request that matches a worker's tree above ``--cache-threshold``
follows the tree, whatever the hash says.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from functools import lru_cache

from sglctl.router.tree import Prefixes
from sglctl.router.workers import Worker

PLACEMENTS = ("tree", "hash")
#: Blocks of the prompt (64 characters, or 64 token ids, each) that name its conversation.
DEFAULT_KEY_BLOCKS = 64
#: Headroom over the mean in-flight count before a worker is skipped (bounded loads).
DEFAULT_EPSILON = 1.0
#: A worker under this many requests is never skipped. Without a floor, at low load one
#: request more than the mean is "over": ``ceil(2 x 2 / 4) = 1`` lets no worker of four
#: hold one request while another arrives, and the workers' /get_load reports, up to a poll
#: interval old, still show a request that has finished -- so a replica reading such a
#: report skipped a conversation's owner that another replica, a moment earlier, had not
#: (caught by ``tests/test_replicas.py`` under load). Below two requests a worker is not a
#: pile to spread.
MIN_CAPACITY = 2
_MASK64 = (1 << 64) - 1
#: A worker's load in requests, as the bound reads it.
LoadFn = Callable[[Worker], int]


def own_load(worker: Worker) -> int:
    """The requests this router has in flight on ``worker`` (the fallback load)."""
    return worker.in_flight


@lru_cache(maxsize=4096)
def url_seed(url: str) -> int:
    """A stable 64-bit number per worker URL (Python's ``hash`` of a str changes per process)."""
    return int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "big")


def _mix(value: int) -> int:
    """splitmix64's finaliser: every input bit reaches every output bit."""
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def score(key: int, url: str) -> int:
    """The rendezvous weight of ``url`` for ``key``: the highest one owns the key."""
    return _mix(key ^ url_seed(url))


def placement_key(prefixes: Prefixes, key_blocks: int = DEFAULT_KEY_BLOCKS) -> int | None:
    """The prefix hash naming the prompt's conversation (None for an empty prompt).

    The hash of the first ``key_blocks`` blocks; for a shorter prompt, of its last *full* block
    (a trailing partial block hashes differently from the full block the next turn will hold).
    """
    hashes = prefixes.hashes
    if not hashes:
        return None
    full = prefixes.length // prefixes.block
    depth = min(key_blocks, full) if full else 1
    return hashes[depth - 1]


def ranked(key: int, workers: Sequence[Worker]) -> list[Worker]:
    """``workers`` by rendezvous weight for ``key``, owner first (ties: by URL, stable)."""
    return sorted(workers, key=lambda w: (score(key, w.url), w.url), reverse=True)


def capacity(workers: Sequence[Worker], epsilon: float, load: LoadFn = own_load) -> int:
    """Most requests a worker may hold, this one included, before it is skipped."""
    return _capacity([load(w) for w in workers], epsilon)


def _capacity(loads: Sequence[int], epsilon: float) -> int:
    return max(MIN_CAPACITY, math.ceil((1.0 + epsilon) * (sum(loads) + 1) / len(loads)))


def choose(
    key: int, workers: Sequence[Worker], epsilon: float = DEFAULT_EPSILON, load: LoadFn = own_load
) -> Worker:
    """The highest-weight worker for ``key`` whose ``load`` stays within the bound.

    The same worker as walking :func:`ranked` and taking the first within the bound, in one
    pass (no sort: ~4 µs instead of ~9 µs for 8 workers). Some worker is always at or below
    the mean, so one always qualifies; the least loaded is only a guard.
    """
    loads = [load(w) for w in workers]
    cap = _capacity(loads, epsilon)
    best: Worker | None = None
    best_score = (-1, "")
    for worker, held in zip(workers, loads, strict=True):
        if held < cap:
            weight = (_mix(key ^ url_seed(worker.url)), worker.url)
            if weight > best_score:
                best, best_score = worker, weight
    if best is not None:
        return best
    return min(zip(workers, loads, strict=True), key=lambda pair: pair[1])[0]
