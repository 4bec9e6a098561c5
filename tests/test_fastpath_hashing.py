"""Short prompts are hashed in Python (tree.PrefixHasher._short_text), long ones with numpy.

Both must give the same numbers, block for block: a short prompt and a long one that share a
prefix must match in the tree, whichever path hashed each.
"""

from __future__ import annotations

import random

import pytest

from sglctl.router import tree


@pytest.mark.parametrize("length", [1, 5, 63, 64, 65, 330, 2047, 2048, 2049, 5000])
def test_short_path_gives_numpy_hashes(monkeypatch: pytest.MonkeyPatch, length: int) -> None:
    rnd = random.Random(length)
    hasher = tree.PrefixHasher()
    alphabet = "abcdé漢\U0001f600 \ud800"  # ASCII, Latin-1, CJK, astral, a lone surrogate
    for _ in range(3):
        text = "".join(rnd.choice(alphabet) for _ in range(length))
        short = hasher.text(text).hashes
        again = hasher.text(text).hashes  # from the block cache this time
        with monkeypatch.context() as m:
            m.setattr(tree, "SHORT_BLOCKS", 0)  # force numpy
            assert hasher.text(text).hashes == short == again


def test_short_prompt_matches_the_prefix_of_a_long_one() -> None:
    hasher = tree.PrefixHasher()
    long = "system prompt " * 400  # numpy path
    short = long[:300]  # Python path
    assert -(-len(long) // hasher.block) > tree.SHORT_BLOCKS
    full_blocks = len(short) // hasher.block
    assert hasher.text(short).hashes[:full_blocks] == hasher.text(long).hashes[:full_blocks]


def test_block_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tree, "BLOCK_CACHE_SIZE", 50)
    hasher = tree.PrefixHasher()
    for i in range(200):
        hasher.text(f"{i:08d}" * 20)
    assert len(hasher._block_cache) <= 50
