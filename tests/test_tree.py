"""The block prefix tree: matches agree with a naive reference, eviction keeps it bounded."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from sglctl.router.tree import PrefixHasher, PrefixTree

BLOCK = 4


def blocks(text: str, block: int = BLOCK) -> list[str]:
    return [text[i : i + block] for i in range(0, len(text), block)]


def naive_match_blocks(query: str, inserted: list[str], block: int = BLOCK) -> int:
    """Leading blocks of ``query`` equal (content and length) to some inserted text's blocks."""
    q = blocks(query, block)
    best = 0
    for text in inserted:
        s = blocks(text, block)
        k = 0
        while k < len(q) and k < len(s) and q[k] == s[k]:
            k += 1
        best = max(best, k)
    return best


texts = st.text(alphabet="ab\u00e9\U0001f600", max_size=24)


@settings(max_examples=300, deadline=None)
@given(inserted=st.lists(texts, max_size=8), query=texts)
def test_match_agrees_with_naive_reference(inserted: list[str], query: str) -> None:
    hasher, tree = PrefixHasher(BLOCK), PrefixTree(BLOCK)
    for text in inserted:
        tree.insert(hasher.text(text), "w")
    prefixes = hasher.text(query)
    assert tree.match_blocks(prefixes, "w") == naive_match_blocks(query, inserted)


@settings(max_examples=100, deadline=None)
@given(inserted=st.lists(st.lists(st.integers(0, 3), max_size=12), max_size=6))
def test_token_ids_match_like_text(inserted: list[list[int]]) -> None:
    hasher, tree = PrefixHasher(BLOCK), PrefixTree(BLOCK)
    as_text = ["".join(chr(97 + t) for t in ids) for ids in inserted]
    for ids in inserted:
        tree.insert(hasher.tokens(ids), "w")
    for ids, text in zip(inserted, as_text, strict=True):
        query = [*ids, 1]
        expected = naive_match_blocks(text + "b", as_text)
        assert tree.match_blocks(hasher.tokens(query), "w") == expected


def test_match_picks_the_tenant_with_the_longest_prefix() -> None:
    hasher, tree = PrefixHasher(8), PrefixTree(8)
    system = "You are a helpful assistant. " * 4
    tree.insert(hasher.text(system + "Question one?"), "a")
    tree.insert(hasher.text("Something else entirely, no shared prefix at all"), "b")
    name, matched = tree.match(hasher.text(system + "Question two?"), ["b", "a"])
    assert name == "a"
    assert len(system) - 8 <= matched <= len(system) + 8
    assert tree.match(hasher.text("zzzzzzzzzzzzzzzz"), ["a", "b"]) == (None, 0)


def test_full_match_of_a_repeated_prompt() -> None:
    hasher, tree = PrefixHasher(), PrefixTree()
    prompt = "x" * 1000 + "tail"
    tree.insert(hasher.text(prompt), "a")
    assert tree.match(hasher.text(prompt), ["a"]) == ("a", len(prompt))


def test_smallest_and_remove_tenant() -> None:
    hasher, tree = PrefixHasher(8), PrefixTree(8)
    tree.insert(hasher.text("a" * 64), "big")
    tree.insert(hasher.text("b" * 8), "small")
    tree.add_tenant("empty")
    assert tree.smallest(["big", "small", "empty"]) == "empty"
    assert tree.smallest(["big", "small"]) == "small"
    tree.remove_tenant("big")
    assert tree.size("big") == 0
    assert tree.match(hasher.text("a" * 64), ["big", "small"]) == (None, 0)


def test_evict_bounds_size_keeps_recent_and_stays_prefix_closed() -> None:
    hasher, tree = PrefixHasher(8), PrefixTree(8)
    prompts = [f"{i:06d}" + "p" * 200 for i in range(200)]
    for p in prompts:
        tree.insert(hasher.text(p), "w")
    before = tree.size("w")
    limit = before // 4
    evicted = tree.evict(limit)
    assert evicted > 0
    assert tree.size("w") <= limit
    # The most recent prompt survives whole; the oldest is gone.
    last = hasher.text(prompts[-1])
    assert tree.match_blocks(last, "w") == len(last.hashes)
    assert tree.match_blocks(hasher.text(prompts[0]), "w") == 0
    # Prefix-closed: every surviving prompt's matched blocks form an unbroken prefix.
    entries = tree._tenants["w"].entries
    for p in prompts:
        hashes = hasher.text(p).hashes
        present = [h in entries for h in hashes]
        k = tree.match_blocks(hasher.text(p), "w")
        assert present == [True] * k + [False] * (len(hashes) - k)


def test_touching_an_old_prefix_protects_it_from_eviction() -> None:
    hasher, tree = PrefixHasher(8), PrefixTree(8)
    old = "old prompt " * 10
    tree.insert(hasher.text(old), "w")
    for i in range(50):
        tree.insert(hasher.text(f"{i:04d} filler " * 10), "w")
    tree.insert(hasher.text(old), "w")  # used again: now the most recent
    tree.evict(tree.size("w") // 5)
    assert tree.match_blocks(hasher.text(old), "w") == len(hasher.text(old).hashes)


def test_clear_forgets_everything() -> None:
    hasher, tree = PrefixHasher(), PrefixTree()
    tree.insert(hasher.text("hello " * 50), "w")
    tree.clear()
    assert tree.size("w") == 0
    assert tree.tenants() == ["w"]


def test_hashing_is_linear_not_quadratic() -> None:
    """Relative timing: 32x the text costs far less than 32x32 (no per-char Python walk)."""
    hasher = PrefixHasher()
    small, large = "a" * 1024, "a" * 32768

    def cost(text: str) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(50):
                hasher.text(text)
            best = min(best, time.perf_counter() - start)
        return best

    assert cost(large) < cost(small) * 32 * 4
