"""Prefix KV cache of the simulated worker: a radix tree over token ids with a token budget.

This mirrors what SGLang's ``RadixCache`` does, in the amount of detail the simulation needs:

* Each edge holds a run of token ids; a request's prompt is matched against the tree and the
  length of the longest cached prefix is its ``cached_tokens``.
* Requests *lock* the node their prefix ends at (a reference count on the whole path), so
  nodes in use are never evicted.
* The cache owns the KV budget (``capacity`` tokens): tokens in the tree plus tokens
  *reserved* by running requests for what they have not inserted yet (uncached prompt and
  output). Making room evicts least-recently-used unlocked leaves, leaf by leaf, the way SGLang
  does, so a shared prefix outlives the branches that hang off it.

With ``page_size`` > 1 the cache works in whole pages, as SGLang's does with ``--page-size``:
only page-aligned prefixes are inserted and matched, so every edge is a run of whole pages and
children are keyed by their first page. With ``record_events`` on, the cache also records
SGLang's KV cache events (:mod:`sglctl.sim.kv_events`) in the order SGLang emits them: one
``BlockStored`` per page a new node brings (chained to the previous page by its hash), one
``BlockRemoved`` per page an evicted leaf drops, ``AllBlocksCleared`` on :meth:`reset`.
Splitting a node moves its page hashes, it emits nothing (SGLang's split does not either).

Token runs are Python lists; comparisons use slice equality (C speed) with a binary search
for the first mismatch, so matching a 126k-token prompt costs microseconds, not a Python loop
over every token.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sglctl.sim.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, page_hash


class Node:
    """One tree node; ``key`` is the token run on the edge from the parent."""

    __slots__ = ("children", "hashes", "key", "last_access", "parent", "ref")

    def __init__(self, key: list[int], parent: Node | None) -> None:
        self.key = key
        self.parent = parent
        #: Children by their first token (page size 1) or first page (a tuple).
        self.children: dict[Any, Node] = {}
        #: One block hash per page of ``key`` (only with events on).
        self.hashes: list[int] = []
        self.ref = 0
        self.last_access = time.monotonic()

    def __lt__(self, other: Node) -> bool:  # heap order for LRU eviction
        return self.last_access < other.last_access


@dataclass(frozen=True)
class Match:
    """Result of :meth:`RadixCache.match_prefix`: ``length`` tokens are cached up to ``node``."""

    length: int
    node: Node


class CacheFullError(RuntimeError):
    """An allocation could not be satisfied even after evicting everything evictable."""


def _common_prefix_len(key: Sequence[int], tokens: Sequence[int], start: int) -> int:
    """Length of the common prefix of ``key`` and ``tokens[start:]``."""
    limit = min(len(key), len(tokens) - start)
    if key[:limit] == tokens[start : start + limit]:
        return limit
    lo, hi = 0, limit  # key[:lo] matches, key[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if key[:mid] == tokens[start : start + mid]:
            lo = mid
        else:
            hi = mid
    return lo


class RadixCache:
    """Radix tree of cached token runs plus the accounting of a ``capacity``-token KV pool."""

    def __init__(self, capacity: int, page_size: int = 1, record_events: bool = False) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, not {capacity}")
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, not {page_size}")
        self.capacity = capacity
        self.page_size = page_size
        self.record_events = record_events
        #: KV cache events not taken yet (:meth:`take_events`); stays empty with events off.
        self.events: list[BlockStored | BlockRemoved | AllBlocksCleared] = []
        self.root = Node([], None)
        self.reset()

    def reset(self) -> None:
        """Drop every cached token. Only valid when nothing is locked or reserved."""
        if self.record_events and self.root.children:
            self.events.append(AllBlocksCleared())
        self.root = Node([], None)
        self.root.ref = 1  # the root is never evicted
        self.evictable_size = 0  # tokens in unlocked nodes
        self.protected_size = 0  # tokens in locked nodes
        self.reserved = 0  # tokens promised to running requests, not in the tree yet

    # ----- sizes -------------------------------------------------------------------------

    @property
    def tree_size(self) -> int:
        return self.evictable_size + self.protected_size

    @property
    def used(self) -> int:
        """Tokens of the KV pool in use (tree plus reservations)."""
        return self.tree_size + self.reserved

    @property
    def free(self) -> int:
        return self.capacity - self.used

    @property
    def available(self) -> int:
        """What an allocation could get: free tokens plus everything evictable."""
        return self.free + self.evictable_size

    # ----- events --------------------------------------------------------------------------

    def take_events(self) -> list[BlockStored | BlockRemoved | AllBlocksCleared]:
        """The events recorded since the last call, oldest first (one batch to publish)."""
        events, self.events = self.events, []
        return events

    def _child_key(self, tokens: Sequence[int], pos: int) -> Any:
        if self.page_size == 1:
            return tokens[pos]
        return tuple(tokens[pos : pos + self.page_size])

    def _record_stored(self, node: Node) -> None:
        """One ``BlockStored`` per page of a new node, each chained to the page before."""
        parent = node.parent
        prev = parent.hashes[-1] if parent is not None and parent.hashes else None
        size = self.page_size
        for start in range(0, len(node.key), size):
            page = node.key[start : start + size]
            block = page_hash(prev, page)
            node.hashes.append(block)
            self.events.append(BlockStored([block], prev, page, len(page), None))
            prev = block

    # ----- matching and insertion ----------------------------------------------------------

    def match_prefix(self, tokens: Sequence[int]) -> Match:
        """Longest cached prefix of ``tokens``; refreshes the LRU time of the matched path.

        When the match ends inside an edge, the node is split there so that the returned node
        covers exactly the matched tokens and can be locked on its own.
        """
        now = time.monotonic()
        node = self.root
        pos = 0
        size = self.page_size
        end = len(tokens) - len(tokens) % size  # whole pages only
        while pos < end:
            child = node.children.get(self._child_key(tokens, pos))
            if child is None:
                break
            shared = _common_prefix_len(child.key, tokens, pos)
            shared -= shared % size
            child.last_access = now
            if shared == 0:  # the first page differs after its first tokens (page_size > 1)
                break
            if shared < len(child.key):
                node = self._split(child, shared)
                pos += shared
                break
            node = child
            pos += shared
        return Match(pos, node)

    def insert(self, tokens: Sequence[int]) -> tuple[Node, int]:
        """Insert ``tokens``; return the node they end at and how many tokens were new.

        New tokens count as evictable until someone locks them. The caller is responsible for
        having room (see :meth:`allocate`): insertion itself never evicts.
        """
        aligned = len(tokens) - len(tokens) % self.page_size  # SGLang caches whole pages only
        match = self.match_prefix(tokens[:aligned] if aligned < len(tokens) else tokens)
        node, pos = match.node, match.length
        if pos == aligned:
            return node, 0
        new = Node(list(tokens[pos:aligned]), node)
        node.children[self._child_key(new.key, 0)] = new
        if self.record_events:
            self._record_stored(new)
        added = len(new.key)
        self.evictable_size += added  # a new node starts unlocked, even under a locked parent
        return new, added

    def _split(self, child: Node, at: int) -> Node:
        """Split ``child``'s edge after ``at`` tokens; return the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = Node(child.key[:at], parent)
        upper.ref = child.ref
        upper.last_access = child.last_access
        if child.hashes:  # ``at`` is page-aligned: the pages' hashes split with them
            pages = at // self.page_size
            upper.hashes, child.hashes = child.hashes[:pages], child.hashes[pages:]
        parent.children[self._child_key(upper.key, 0)] = upper
        child.key = child.key[at:]
        child.parent = upper
        upper.children[self._child_key(child.key, 0)] = child
        return upper

    # ----- locking -------------------------------------------------------------------------

    def lock(self, node: Node) -> None:
        """Protect ``node`` and its ancestors from eviction (reference counted)."""
        while node is not self.root:
            if node.ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: Node) -> None:
        """Undo one :meth:`lock` of ``node``."""
        while node is not self.root:
            if node.ref <= 0:
                raise RuntimeError("unlock of a node that is not locked")
            node.ref -= 1
            if node.ref == 0:
                self.protected_size -= len(node.key)
                self.evictable_size += len(node.key)
            node = node.parent  # type: ignore[assignment]

    # ----- the KV pool ---------------------------------------------------------------------

    def allocate(self, n: int) -> None:
        """Reserve ``n`` tokens of KV, evicting LRU leaves if needed; raise if impossible."""
        if n < 0:
            raise ValueError("cannot allocate a negative number of tokens")
        if n > self.available:
            raise CacheFullError(f"need {n} tokens, only {self.available} could be freed")
        if n > self.free:
            self.evict(n - self.free)
        self.reserved += n

    def release(self, n: int) -> None:
        """Give back ``n`` reserved tokens (a request finished or was aborted)."""
        if n > self.reserved:
            raise RuntimeError(f"release of {n} tokens but only {self.reserved} reserved")
        self.reserved -= n

    def commit(self, n: int) -> None:
        """``n`` reserved tokens were just inserted into the tree: stop counting them twice."""
        self.release(n)

    def evict(self, n: int) -> int:
        """Evict at least ``n`` tokens of unlocked leaves, least recently used first."""
        leaves = [node for node in self._iter_nodes() if not node.children and node.ref == 0]
        heapq.heapify(leaves)
        evicted = 0
        while evicted < n and leaves:
            leaf = heapq.heappop(leaves)
            parent = leaf.parent
            assert parent is not None
            del parent.children[self._child_key(leaf.key, 0)]
            if self.record_events:
                self.events.extend(BlockRemoved([block]) for block in leaf.hashes)
            evicted += len(leaf.key)
            self.evictable_size -= len(leaf.key)
            if parent is not self.root and not parent.children and parent.ref == 0:
                heapq.heappush(leaves, parent)
        return evicted

    def _iter_nodes(self) -> list[Node]:
        nodes: list[Node] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
        return nodes

    def node_count(self) -> int:
        return len(self._iter_nodes())
