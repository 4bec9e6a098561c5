"""The exact index of what every worker's KV cache holds, built from its KV cache events.

SGLang workers started with ``--kv-events-config`` announce every page they store
(``BlockStored``: block hashes, the parent block's hash, the page's token ids) and evict
(``BlockRemoved``), and when they drop everything (``AllBlocksCleared``). Every router replica
subscribes to every worker (:mod:`sglctl.router.kv_events`) and feeds this index, so all
replicas hold the same view -- the workers' own -- instead of each guessing from the requests
it routed itself (the approximate tree, :mod:`sglctl.router.tree`).

**Keys.** A worker's block hashes are its own business (SGLang: sha256 of the page chained to
its parent; the sim: another chain), so the index does not rely on them: a block's *key* here
is a chain hash over the parent's key and the block's token ids, computed from the event's
tokens. The same function over a request's tokens gives the keys a request would hit, and a
block identical on two workers has one key. Each worker's hashes map to the keys, so a
``BlockRemoved`` (hashes only) finds what to drop. A block whose parent hash is unknown (its
store predates what this replica received) cannot be keyed: it is remembered as unknown, as
are its descendants, and never matches -- the worker re-announces it when it stores it again.

**Match.** :meth:`KvIndex.match` hashes the request's *full* blocks one at a time and stops at
the first block no candidate worker holds, so its cost is the cached prefix's length in blocks
(a 126k-token prompt in 64-token pages: ~2,000 tuple hashes, about a millisecond), not the
index's size. A worker holds a prefix only if it holds every block of it (the chain is
intersected block by block). Holders are a bit mask per key, one bit per worker, so the index
costs two dict entries per block and worker.

Block size is the worker's page size, learned from its events (``block_size``); workers with
different page sizes are matched separately.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: The key chain starts here (a worker's blocks whose parent is ``None``).
ROOT = 0
#: A worker hash whose block could not be keyed (its parent was never seen).
UNKNOWN = None


def block_key(parent: int, tokens: Sequence[int]) -> int:
    """The index's key of a block: a chain hash of the parent's key and the block's tokens.

    Python's tuple hash of ints: C speed and not salted per process (only str/bytes are).
    """
    return hash((parent, *tokens))


class _Worker:
    """One worker's blocks: its hashes -> our keys, and how many of its hashes hold a key."""

    __slots__ = ("bit", "keys", "page_size", "refs")

    def __init__(self, bit: int) -> None:
        self.bit = bit
        self.keys: dict[int, int | None] = {}
        self.refs: dict[int, int] = {}
        self.page_size: int | None = None


class KvIndex:
    """Per worker URL, the blocks its KV cache holds, and which workers hold a prefix."""

    def __init__(self) -> None:
        self._workers: dict[str, _Worker] = {}
        #: key -> bit mask of the workers holding it.
        self._holders: dict[int, int] = {}
        self._free_bits: list[int] = []
        self._next_bit = 0
        #: Events applied, for ``/stats``-style introspection and tests.
        self.events_applied = 0

    # ----- membership --------------------------------------------------------------------

    def add_worker(self, url: str) -> None:
        """Start tracking ``url`` (no blocks yet); a no-op when tracked."""
        if url in self._workers:
            return
        if self._free_bits:
            bit = self._free_bits.pop()
        else:
            bit, self._next_bit = 1 << self._next_bit, self._next_bit + 1
        self._workers[url] = _Worker(bit)

    def drop_worker(self, url: str) -> None:
        """Forget ``url`` and everything it held (it left the registry)."""
        self.cleared(url)
        worker = self._workers.pop(url, None)
        if worker is not None:
            self._free_bits.append(worker.bit)

    def workers(self) -> list[str]:
        return list(self._workers)

    def __contains__(self, url: object) -> bool:
        return url in self._workers

    # ----- events ------------------------------------------------------------------------

    def stored(
        self,
        url: str,
        block_hashes: Sequence[int],
        parent_hash: int | None,
        token_ids: Sequence[int],
        block_size: int,
    ) -> None:
        """``BlockStored``: ``block_hashes[i]`` holds ``token_ids[i*block_size:(i+1)*...]``."""
        worker = self._workers.get(url)
        if worker is None or block_size <= 0:
            return
        self.events_applied += 1
        if parent_hash is None:
            parent: int | None = ROOT
        else:
            parent = worker.keys.get(parent_hash, UNKNOWN)
        full = len(token_ids) == block_size * len(block_hashes)
        if full and worker.page_size is None:
            worker.page_size = block_size
        for i, worker_hash in enumerate(block_hashes):
            if worker_hash in worker.keys:  # announced twice: keep the first
                parent = worker.keys[worker_hash]
                continue
            chunk = token_ids[i * block_size : (i + 1) * block_size]
            if parent is UNKNOWN or len(chunk) != worker.page_size:
                # No chain to hang it on, or a partial page no request block can equal.
                worker.keys[worker_hash] = UNKNOWN
                parent = UNKNOWN
                continue
            key = block_key(parent, chunk)
            worker.keys[worker_hash] = key
            held = worker.refs.get(key, 0)
            worker.refs[key] = held + 1
            if not held:
                self._holders[key] = self._holders.get(key, 0) | worker.bit
            parent = key

    def removed(self, url: str, block_hashes: Iterable[int]) -> None:
        """``BlockRemoved``: the worker evicted these blocks."""
        worker = self._workers.get(url)
        if worker is None:
            return
        self.events_applied += 1
        for worker_hash in block_hashes:
            key = worker.keys.pop(worker_hash, UNKNOWN)
            if key is not None:
                self._unref(worker, key)

    def cleared(self, url: str) -> None:
        """``AllBlocksCleared`` (or a restarted worker): the worker holds nothing."""
        worker = self._workers.get(url)
        if worker is None:
            return
        self.events_applied += 1
        mask = ~worker.bit
        holders = self._holders
        for key in worker.refs:
            left = holders.get(key, 0) & mask
            if left:
                holders[key] = left
            else:
                holders.pop(key, None)
        worker.keys.clear()
        worker.refs.clear()

    def _unref(self, worker: _Worker, key: int) -> None:
        held = worker.refs.get(key, 0) - 1
        if held > 0:
            worker.refs[key] = held
            return
        worker.refs.pop(key, None)
        left = self._holders.get(key, 0) & ~worker.bit
        if left:
            self._holders[key] = left
        else:
            self._holders.pop(key, None)

    # ----- queries -----------------------------------------------------------------------

    def blocks(self, url: str) -> int:
        """Blocks ``url`` holds that a request can match."""
        worker = self._workers.get(url)
        return len(worker.refs) if worker is not None else 0

    def cached_tokens(self, url: str) -> int:
        """Tokens ``url`` holds, as far as its events said."""
        worker = self._workers.get(url)
        if worker is None or worker.page_size is None:
            return 0
        return len(worker.refs) * worker.page_size

    def match(self, tokens: Sequence[int], urls: Iterable[str] | None = None) -> dict[str, int]:
        """For each worker (of ``urls``, default all) holding a prefix of ``tokens``: its length.

        Workers holding nothing of it are absent. Cost: the matched prefix's blocks.
        """
        chosen = self._workers if urls is None else urls
        by_size: dict[int, dict[int, str]] = {}
        for url in chosen:
            worker = self._workers.get(url)
            if worker is not None and worker.page_size is not None and worker.refs:
                by_size.setdefault(worker.page_size, {})[worker.bit] = url
        found: dict[str, int] = {}
        holders = self._holders
        for size, bits in by_size.items():
            alive = 0
            for bit in bits:
                alive |= bit
            key = ROOT
            end = len(tokens) - len(tokens) % size
            for start in range(0, end, size):
                key = hash((key, *tokens[start : start + size]))  # block_key(), inlined
                now = alive & holders.get(key, 0)
                if now != alive:
                    if start:  # the workers that leave the chain here hold ``start`` tokens
                        for bit, url in bits.items():
                            if alive & bit and not now & bit:
                                found[url] = start
                    alive = now
                    if not alive:
                        break
            if alive and end:
                for bit, url in bits.items():
                    if alive & bit:
                        found[url] = end
        return found
