"""An approximate prefix tree over request texts, one tenant per worker, in blocks.

The SGLang Router keeps a character-level radix tree of the prompts it sent to each worker and
routes a new prompt to the worker whose tree shares the longest prefix with it. Walking a
32 KB prompt a character at a time in Python costs milliseconds, so this tree works in
fixed-size blocks instead:

- A prompt (a string, or a list of token ids) becomes a vector of *chained prefix hashes*,
  one per block: ``H[i]`` identifies the prompt's first ``i + 1`` blocks (the last block may be
  partial). It is computed with a few numpy operations (UTF-32 code units viewed as 64-bit
  words, one multiply-add per word, a mix, a cumulative sum), so its cost is C-speed and
  linear in the length.
- Each tenant (worker) is a dict ``prefix hash -> last-use tick``. A tenant's set of prefixes
  is prefix-closed (inserting a prompt inserts all its prefixes; eviction removes the
  least-recently used, and ancestors are always used at least as recently as descendants), so
  the longest match is found by a *binary search over the prefix length* with dict membership
  probes: ``O(log(length / block))`` probes per tenant instead of a walk.
- Sizes are counted in characters (tokens for ``input_ids``), rounded up to whole blocks, as
  the SGLang Router counts its ``max_tree_size``; :meth:`PrefixTree.evict` trims every tenant
  back to a bound, least recently used first.

Hash collisions are possible in principle (64-bit hashes) and only cost a wrong routing guess,
never a wrong answer: the tree is a routing hint, the worker's own cache is the truth.
"""

from __future__ import annotations

import logging
import operator
import struct
from collections.abc import Iterable, Sequence
from itertools import repeat

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 64
#: Prompts of at most this many blocks are hashed with the block cache (``_short_text``).
SHORT_BLOCKS = 32
#: Block values kept for short prompts (~2-4 MB at 64-character blocks).
BLOCK_CACHE_SIZE = 16_384
_SEED = 0x5C1C7
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1
_MIX1_INT = int(_MIX1)
_S31 = np.uint64(31)
_S27 = np.uint64(27)


class Prefixes:
    """A prompt as block prefix hashes: ``hashes[i]`` names its first ``(i + 1)`` blocks.

    A plain slotted class, not a frozen dataclass: one is built per routed request, and a
    frozen dataclass's ``__init__`` (``object.__setattr__`` per field) cost ~1 µs of it.
    """

    __slots__ = ("block", "hashes", "length")

    def __init__(self, hashes: list[int], length: int, block: int) -> None:
        self.hashes = hashes
        #: Length of the prompt in characters (or tokens).
        self.length = length
        self.block = block

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Prefixes):
            return NotImplemented
        return (self.hashes, self.length, self.block) == (other.hashes, other.length, other.block)

    __hash__ = None  # type: ignore[assignment]  # mutable list inside, as before

    def __repr__(self) -> str:
        return f"Prefixes(hashes=<{len(self.hashes)}>, length={self.length}, block={self.block})"

    def matched_length(self, blocks: int) -> int:
        """Characters covered by the first ``blocks`` blocks."""
        return min(blocks * self.block, self.length)


class PrefixHasher:
    """Turns texts and token-id lists into :class:`Prefixes` at C speed (numpy)."""

    def __init__(self, block: int = DEFAULT_BLOCK) -> None:
        if block < 2 or block % 2:
            raise ValueError(f"block size must be an even number >= 2, got {block}")
        self.block = block
        rng = np.random.default_rng(_SEED)
        # Per-word multipliers inside a block (two UTF-32 code units per 64-bit word) and
        # per-block-position multipliers for the chain; odd, so no information is lost.
        self._word_mult = rng.integers(1, 2**63, size=block // 2, dtype=np.uint64) | np.uint64(1)
        self._tok_mult = rng.integers(1, 2**63, size=block, dtype=np.uint64) | np.uint64(1)
        self._pos_mult = self._positions(rng, 4096)
        self._pos_list: list[int] = self._pos_mult.tolist()
        self._rng = rng
        #: Mixed value of a block, by the block's text (short prompts, :meth:`_short_text`).
        self._block_cache: dict[str, int] = {}
        self._word_mult_list: list[int] = self._word_mult.tolist()
        self._unpack = struct.Struct(f"<{block // 2}Q").unpack

    @staticmethod
    def _positions(rng: np.random.Generator, count: int) -> np.ndarray:
        return rng.integers(1, 2**63, size=count, dtype=np.uint64) | np.uint64(1)

    @staticmethod
    def _mix(mixed: np.ndarray, partial: int) -> np.ndarray:
        """Per-block values, mixed: what a block contributes, before its position."""
        if partial:
            # Tell a padded partial block from a full block that happens to end in zeros.
            mixed[-1] ^= np.uint64((partial * int(_MIX2)) & _MASK64)
        mixed ^= mixed >> _S31
        mixed *= _MIX1
        mixed ^= mixed >> _S27
        return mixed

    def _chain(self, mixed: np.ndarray, partial: int) -> list[int]:
        """Finish per-block values into chained prefix hashes (as Python ints for dict probes)."""
        nb = mixed.size
        mixed = self._mix(mixed, partial)
        self._grow_positions(nb)
        mixed *= self._pos_mult[:nb]
        return np.cumsum(mixed, dtype=np.uint64).tolist()

    def _grow_positions(self, nb: int) -> None:
        while nb > self._pos_mult.size:
            self._pos_mult = np.concatenate(
                [self._pos_mult, self._positions(self._rng, self._pos_mult.size)]
            )
            self._pos_list = self._pos_mult.tolist()

    def _text_blocks(self, text: str, length: int, nb: int) -> np.ndarray:
        """The mixed per-block values of ``text`` (numpy; ``length`` chars, ``nb`` blocks)."""
        raw = text.encode("utf-32-le", "surrogatepass")
        partial = length % self.block
        if partial:
            raw += bytes((nb * self.block - length) * 4)
        words = np.frombuffer(raw, dtype=np.uint64).reshape(nb, self.block // 2)
        return self._mix(words @ self._word_mult, partial)

    def text(self, text: str) -> Prefixes:
        """Prefix hashes of a string, per ``block`` characters."""
        length = len(text)
        if not length:
            return Prefixes([], 0, self.block)
        block = self.block
        nb = -(-length // block)
        if nb <= SHORT_BLOCKS:
            return Prefixes(self._short_text(text, nb), length, block)
        mixed = self._text_blocks(text, length, nb)
        self._grow_positions(nb)
        mixed *= self._pos_mult[:nb]
        return Prefixes(np.cumsum(mixed, dtype=np.uint64).tolist(), length, block)

    def _short_text(self, text: str, nb: int) -> list[int]:
        """:meth:`text` of a short prompt, in Python: no numpy fixed costs.

        numpy's fixed cost per call (about ten ufunc calls and a ``tolist``, ~20 µs) was most
        of the routing decision for a prompt of a few blocks. Here a block's value comes from
        a cache by block text (prompts share blocks: system prompts, templates, conversation
        history), else from :meth:`_block_value` (a C-level ``struct`` unpack and dot
        product, ~2-3 µs), and the chain is one multiply-add per block. The numbers are the
        same as numpy's (``tests/test_tree.py``), so short and long prompts share prefixes.
        """
        block = self.block
        cache = self._block_cache
        out = []
        acc = 0
        positions = self._pos_list
        for i in range(nb):
            piece = text[i * block : (i + 1) * block]
            value = cache.get(piece)
            if value is None:
                value = self._block_value(piece)
                if len(cache) >= BLOCK_CACHE_SIZE:
                    cache.clear()  # bounded memory; refilled by the next prompts
                cache[piece] = value
            acc = (acc + value * positions[i]) & _MASK64
            out.append(acc)
        return out

    def _block_value(self, piece: str) -> int:
        """One block's mixed value, as :meth:`_text_blocks` computes it (pure Python)."""
        n = len(piece)
        raw = piece.encode("utf-32-le", "surrogatepass")
        if n < self.block:
            raw += bytes((self.block - n) * 4)
        value = sum(map(operator.mul, self._unpack(raw), self._word_mult_list)) & _MASK64
        if n < self.block:
            value ^= (n * int(_MIX2)) & _MASK64
        value ^= value >> 31
        value = (value * _MIX1_INT) & _MASK64
        value ^= value >> 27
        return value

    def tokens(self, ids: Sequence[int]) -> Prefixes:
        """Prefix hashes of a token-id list, per ``block`` tokens."""
        length = len(ids)
        if not length:
            return Prefixes([], 0, self.block)
        nb = -(-length // self.block)
        partial = length % self.block
        arr = np.zeros(nb * self.block, dtype=np.uint64)
        arr[:length] = np.asarray(ids, dtype=np.int64).astype(np.uint64)
        mixed = arr.reshape(nb, self.block) @ self._tok_mult
        return Prefixes(self._chain(mixed ^ np.uint64(0x70C3), partial), length, self.block)


class _Tenant:
    __slots__ = ("entries", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        #: prefix hash -> tick of the last insert that touched it.
        self.entries: dict[int, int] = {}


class PrefixTree:
    """Per-tenant prefix sets with longest-match, insert and LRU eviction."""

    def __init__(self, block: int = DEFAULT_BLOCK) -> None:
        self.block = block
        self._tenants: dict[str, _Tenant] = {}
        self._tick = 0

    # -- tenants ---------------------------------------------------------------------------
    def add_tenant(self, name: str) -> None:
        self._tenants.setdefault(name, _Tenant(name))

    def remove_tenant(self, name: str) -> None:
        """Drop everything known about ``name`` (its worker left)."""
        self._tenants.pop(name, None)

    @property
    def tick(self) -> int:
        """The last insert's tick (ticks grow by one per insert)."""
        return self._tick

    def tenants(self) -> list[str]:
        return list(self._tenants)

    def size(self, name: str) -> int:
        """Characters (tokens) held for ``name``, in whole blocks."""
        tenant = self._tenants.get(name)
        return len(tenant.entries) * self.block if tenant else 0

    def total_size(self) -> int:
        return sum(len(t.entries) for t in self._tenants.values()) * self.block

    # -- matching --------------------------------------------------------------------------
    def match_blocks(self, prefixes: Prefixes, name: str) -> int:
        """How many leading blocks of ``prefixes`` tenant ``name`` holds (binary search)."""
        tenant = self._tenants.get(name)
        if tenant is None or not prefixes.hashes:
            return 0
        entries = tenant.entries
        hashes = prefixes.hashes
        if hashes[-1] in entries:  # the common case of a repeated prompt: one probe
            return len(hashes)
        # Invariant: the first ``lo`` blocks match and the first ``hi`` blocks do not.
        lo, hi = 0, len(hashes)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if hashes[mid - 1] in entries:
                lo = mid
            else:
                hi = mid
        return lo

    def match(self, prefixes: Prefixes, names: Iterable[str]) -> tuple[str | None, int]:
        """The tenant among ``names`` with the longest match, and the matched characters.

        Ties go to the first name given, so callers order ``names`` by preference.
        """
        best: str | None = None
        best_blocks = 0
        hashes = prefixes.hashes
        if not hashes:
            return None, 0
        count = len(hashes)
        last = hashes[-1]
        tenants = self._tenants
        for name in names:
            # match_blocks(), inlined: called for every worker of every routed request.
            tenant = tenants.get(name)
            if tenant is None:
                continue
            entries = tenant.entries
            if last in entries:  # the whole prompt: no one can match more
                return name, prefixes.matched_length(count)
            lo, hi = 0, count  # the first lo blocks match, the first hi do not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if hashes[mid - 1] in entries:
                    lo = mid
                else:
                    hi = mid
            if lo > best_blocks:
                best, best_blocks = name, lo
        return best, prefixes.matched_length(best_blocks)

    def smallest(self, names: Iterable[str]) -> str | None:
        """The tenant among ``names`` holding the least text (first wins a tie)."""
        best: str | None = None
        best_size = -1
        for name in names:
            tenant = self._tenants.get(name)
            size = len(tenant.entries) if tenant else 0
            if best is None or size < best_size:
                best, best_size = name, size
        return best

    # -- updating --------------------------------------------------------------------------
    def insert(self, prefixes: Prefixes, name: str) -> None:
        """Record that ``name`` now holds every prefix of ``prefixes`` (and touch them)."""
        tenant = self._tenants.get(name)
        if tenant is None:
            tenant = self._tenants[name] = _Tenant(name)
        if not prefixes.hashes:
            return
        self._tick += 1
        tenant.entries.update(zip(prefixes.hashes, repeat(self._tick)))

    def evict(self, max_size: int) -> int:
        """Trim every tenant to at most ``max_size`` characters, least recently used first.

        Whole insert generations (one tick) go at once: a generation's surviving entries are
        the tail of one prompt's path, so dropping all of it keeps the tenant prefix-closed.
        Returns the number of blocks evicted. Cost: linear in the tenant's size (numpy), run
        from a background task every ``--eviction-interval-secs``.
        """
        return sum(self.evict_tenant(name, max_size) for name in list(self._tenants))

    def evict_tenant(self, name: str, max_size: int) -> int:
        """:meth:`evict` for one tenant (about 50 ms per 400k blocks; callers on the event
        loop yield between tenants)."""
        tenant = self._tenants.get(name)
        max_blocks = max_size // self.block
        if tenant is None or len(tenant.entries) <= max_blocks:
            return 0
        count = len(tenant.entries)
        keys = np.fromiter(tenant.entries.keys(), dtype=np.uint64, count=count)
        ticks = np.fromiter(tenant.entries.values(), dtype=np.int64, count=count)
        drop = count - max_blocks
        # The drop-th oldest tick; everything at or before it goes.
        cutoff = np.partition(ticks, drop - 1)[drop - 1]
        keep = ticks > cutoff
        tenant.entries = dict(zip(keys[keep].tolist(), ticks[keep].tolist(), strict=True))
        evicted = count - len(tenant.entries)
        log.debug("evicted %d blocks from tenant %s", evicted, name)
        return evicted

    # -- corrections from the workers ------------------------------------------------------
    def last_use(self, prefixes: Prefixes, name: str, blocks: int) -> int:
        """The tick of the ``blocks``-th block of ``prefixes`` in tenant ``name`` (0: absent).

        Read before an insert refreshes it: the deepest matched block is the least recently
        used block of that path, so its tick says how old the worker's copy was.
        """
        tenant = self._tenants.get(name)
        if tenant is None or blocks <= 0 or blocks > len(prefixes.hashes):
            return 0
        return tenant.entries.get(prefixes.hashes[blocks - 1], 0)

    def trim(self, prefixes: Prefixes, name: str, keep_blocks: int) -> int:
        """Drop ``prefixes``' blocks after the first ``keep_blocks`` from tenant ``name``.

        The worker said it holds only that much of this prompt. Descendants of the dropped
        blocks on *other* paths cannot be found (no parent links) and stay until LRU
        eviction or their own correction; a worker evicts leaves first, so they are stale
        too, and :meth:`forget_older` is the way to drop them. Returns blocks dropped.
        """
        tenant = self._tenants.get(name)
        if tenant is None:
            return 0
        entries = tenant.entries
        before = len(entries)
        for h in prefixes.hashes[max(keep_blocks, 0) :]:
            entries.pop(h, None)
        return before - len(entries)

    def forget_older(self, name: str, tick: int) -> int:
        """Drop every block of tenant ``name`` last used at or before ``tick``.

        A worker whose LRU cache evicted a block used at ``tick`` also evicted everything
        it used less recently; the tree's own LRU is bigger than the worker's cache, and this
        brings it back in line. Ancestors are used at least as recently as descendants, so
        the tenant stays prefix-closed. Linear in the tenant's size (numpy); called at most
        once per corrected answer. Returns blocks dropped.
        """
        tenant = self._tenants.get(name)
        if tenant is None or tick <= 0 or not tenant.entries:
            return 0
        count = len(tenant.entries)
        keys = np.fromiter(tenant.entries.keys(), dtype=np.uint64, count=count)
        ticks = np.fromiter(tenant.entries.values(), dtype=np.int64, count=count)
        keep = ticks > tick
        kept = int(keep.sum())
        if kept == count:
            return 0
        tenant.entries = dict(zip(keys[keep].tolist(), ticks[keep].tolist(), strict=True))
        return count - kept

    def clear(self) -> None:
        """Forget every prefix of every tenant (``/flush_cache``); tenants stay."""
        for tenant in self._tenants.values():
            tenant.entries = {}
