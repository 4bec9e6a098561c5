"""The simulated worker's radix prefix cache: hits, partial hits, eviction, locking, flush."""

from __future__ import annotations

import pytest

from sglctl.sim.radix import CacheFullError, RadixCache


def insert_unlocked(cache: RadixCache, tokens: list[int]) -> int:
    """Insert like a finished request does: reserve, insert, commit, release the rest."""
    cache.allocate(len(tokens))
    _, added = cache.insert(tokens)
    cache.commit(added)
    cache.release(len(tokens) - added)
    return added


def test_exact_and_partial_hits() -> None:
    cache = RadixCache(1000)
    assert cache.match_prefix([1, 2, 3]).length == 0
    insert_unlocked(cache, [1, 2, 3, 4, 5])
    assert cache.match_prefix([1, 2, 3, 4, 5]).length == 5
    assert cache.match_prefix([1, 2, 3, 9]).length == 3  # partial hit inside an edge
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7]).length == 5  # longer than cached
    assert cache.match_prefix([2, 3]).length == 0  # not a prefix
    assert cache.tree_size == 5


def test_branches_share_their_prefix() -> None:
    cache = RadixCache(1000)
    insert_unlocked(cache, [1, 2, 3, 4])
    assert insert_unlocked(cache, [1, 2, 7, 8, 9]) == 3  # only the new suffix is stored
    assert cache.tree_size == 7
    assert cache.match_prefix([1, 2, 7, 8, 9]).length == 5
    assert cache.match_prefix([1, 2, 3, 4]).length == 4
    assert cache.match_prefix([1, 2]).length == 2


def test_long_prompt_match_is_exact() -> None:
    cache = RadixCache(300_000)
    prompt = list(range(100_000, 200_000))
    insert_unlocked(cache, prompt)
    other = [*prompt[:54_321], -1, *prompt[54_322:]]
    assert cache.match_prefix(other).length == 54_321


def test_lru_eviction_under_capacity() -> None:
    cache = RadixCache(10)
    insert_unlocked(cache, [1, 1, 1, 1])  # oldest
    insert_unlocked(cache, [2, 2, 2, 2])
    cache.match_prefix([1, 1, 1, 1])  # touch: now [2...] is least recently used
    insert_unlocked(cache, [3, 3, 3, 3])  # needs 4, only 2 free: evicts [2...]
    assert cache.match_prefix([2, 2, 2, 2]).length == 0
    assert cache.match_prefix([1, 1, 1, 1]).length == 4
    assert cache.match_prefix([3, 3, 3, 3]).length == 4
    assert cache.used <= cache.capacity


def test_eviction_takes_leaves_before_shared_prefix() -> None:
    cache = RadixCache(12)
    insert_unlocked(cache, [1, 2, 3, 4, 5, 6])
    insert_unlocked(cache, [1, 2, 3, 7, 8, 9])
    cache.evict(3)  # one leaf suffices; the shared [1, 2, 3] stays
    assert cache.match_prefix([1, 2, 3]).length == 3
    assert cache.tree_size == 6


def test_locked_nodes_are_never_evicted() -> None:
    cache = RadixCache(8)
    insert_unlocked(cache, [1, 2, 3, 4])
    match = cache.match_prefix([1, 2, 3, 4])
    cache.lock(match.node)
    assert cache.available == 4  # the locked 4 tokens cannot be freed
    with pytest.raises(CacheFullError):
        cache.allocate(5)
    cache.unlock(match.node)
    cache.allocate(8)  # now they can
    assert cache.match_prefix([1, 2, 3, 4]).length == 0


def test_lock_of_partial_match_protects_only_the_prefix() -> None:
    cache = RadixCache(100)
    insert_unlocked(cache, [1, 2, 3, 4, 5, 6])
    match = cache.match_prefix([1, 2, 3, 9])
    cache.lock(match.node)
    assert cache.protected_size == 3
    assert cache.evictable_size == 3
    cache.unlock(match.node)
    assert cache.protected_size == 0


def test_unlock_without_lock_is_an_error() -> None:
    cache = RadixCache(100)
    insert_unlocked(cache, [1, 2])
    with pytest.raises(RuntimeError):
        cache.unlock(cache.match_prefix([1, 2]).node)


def test_reset_flushes_everything() -> None:
    cache = RadixCache(100)
    insert_unlocked(cache, [1, 2, 3])
    cache.reset()
    assert cache.tree_size == 0
    assert cache.match_prefix([1, 2, 3]).length == 0
    assert cache.free == 100


def test_reservations_count_against_capacity() -> None:
    cache = RadixCache(10)
    cache.allocate(7)
    assert cache.free == 3
    with pytest.raises(CacheFullError):
        cache.allocate(4)
    cache.release(7)
    assert cache.free == 10
    with pytest.raises(RuntimeError):
        cache.release(1)
