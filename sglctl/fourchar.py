"""The sim's deterministic, fast stand-in tokenizer: one token per fixed 4-character chunk.

Shared by the simulated worker (``sglctl.sim.tokenizer``) and the router (which, with
``--kv-events``, must turn a request into the very token ids the worker caches: see
``sglctl.router.tokens``); neither imports the other, both import this module.

Rule: the text is cut into consecutive chunks of ``CHARS_PER_TOKEN`` (4) characters; the last
chunk may be shorter. A chunk whose characters are all below U+0100 (Latin-1, so all ASCII)
gets the id ``c0 | c1 << 8 | c2 << 16 | c3 << 24`` (missing characters count as 0); any other
chunk gets ``2**32 + (c0 | c1 << 21 | c2 << 42 | c3 << 63)``. Ids are therefore a reversible
encoding of the chunk: :func:`decode` gives the text back exactly.

Why this rule:

* Real tokenizers average about four characters a token on English text, so prompt sizes and
  the router's character-based cache estimates stay in proportion with real SGLang.
* A token depends only on its own four characters, so texts whose lengths are multiples of four
  concatenate into the concatenation of their tokens. The benchmark relies on that to build
  prompts from 512-token blocks (:func:`text_for_tokens`).
* Latin-1 text is encoded with one ``bytes`` conversion and a ``memoryview`` cast, so 500 KB of
  text (a 126k-token prompt) encodes in about a millisecond with no per-token Python work.

No BOS token is added: ``prompt_tokens`` equals ``len(encode(text))``.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterable, Sequence

CHARS_PER_TOKEN = 4
_WIDE_BASE = 1 << 32
_MAX_CODEPOINT = 0x10FFFF
# 64 symbols, so that a random byte maps onto one of them evenly (byte % 64).
_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ."
_BYTE_TO_SYMBOL = bytes.maketrans(bytes(range(256)), (_ALPHABET * 4).encode("ascii"))


def encode(text: str) -> list[int]:
    """Token ids of ``text`` (see the module docstring for the rule)."""
    if not text:
        return []
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        return _encode_wide(text)
    pad = -len(raw) % CHARS_PER_TOKEN
    if pad:
        raw += b"\0" * pad
    return memoryview(raw).cast("I").tolist() if _LITTLE_ENDIAN else _encode_wide(text)


def encode_view(text: str) -> Sequence[int]:
    """:func:`encode` without building the list: a read-only view over the packed ids.

    For the router's exact-index lookup (``sglctl.router.tokens``), which reads only the
    blocks up to the first miss: building a list of every id of a 126k-token prompt costs
    more than the whole lookup. Latin-1 text only gives ids below ``2**32``, so the view is
    also what :func:`wire_ids` would give; other text takes the list path.
    """
    if not _LITTLE_ENDIAN or not text:
        return wire_ids(encode(text))
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        return wire_ids(_encode_wide(text))
    pad = -len(raw) % CHARS_PER_TOKEN
    if pad:
        raw += b"\0" * pad
    return memoryview(raw).cast("I")


def _encode_wide(text: str) -> list[int]:
    """Slow path for text with characters above U+00FF: one small integer formula a chunk."""
    ids: list[int] = []
    for start in range(0, len(text), CHARS_PER_TOKEN):
        chunk = [ord(ch) for ch in text[start : start + CHARS_PER_TOKEN]]
        chunk += [0] * (CHARS_PER_TOKEN - len(chunk))
        if max(chunk) < 0x100:
            ids.append(chunk[0] | chunk[1] << 8 | chunk[2] << 16 | chunk[3] << 24)
        else:
            ids.append(_WIDE_BASE + (chunk[0] | chunk[1] << 21 | chunk[2] << 42 | chunk[3] << 63))
    return ids


def decode(ids: Iterable[int]) -> str:
    """Text of ``ids``; ids that no text encodes to decode to U+FFFD instead of failing."""
    ids = list(ids)
    if not ids:
        return ""
    if max(ids) < _WIDE_BASE and min(ids) >= 0:
        raw = array("I", ids)
        if not _LITTLE_ENDIAN:
            raw.byteswap()
        return raw.tobytes().decode("latin-1").replace("\0", "")
    return "".join(_decode_one(token) for token in ids)


def _decode_one(token: int) -> str:
    if 0 <= token < _WIDE_BASE:
        codes = [(token >> shift) & 0xFF for shift in (0, 8, 16, 24)]
    elif token >= _WIDE_BASE:
        value = token - _WIDE_BASE
        codes = [(value >> shift) & 0x1FFFFF for shift in (0, 21, 42, 63)]
    else:
        return "\ufffd"
    return "".join(
        "\ufffd" if code > _MAX_CODEPOINT or 0xD800 <= code <= 0xDFFF else chr(code)
        for code in codes
        if code
    )


def count_tokens(text: str) -> int:
    """``len(encode(text))`` without building the list."""
    return -(-len(text) // CHARS_PER_TOKEN)


def text_for_tokens(n: int, seed: int | str = 0) -> str:
    """Pseudo-random ASCII text that encodes to exactly ``n`` tokens; same seed, same text.

    The text is ``n * CHARS_PER_TOKEN`` characters long, so texts made by this function can be
    concatenated and the tokens concatenate with them.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    rng = random.Random(seed if isinstance(seed, int) else str(seed))
    return rng.randbytes(n * CHARS_PER_TOKEN).translate(_BYTE_TO_SYMBOL).decode("ascii")


def token_strings(ids: Sequence[int]) -> list[str]:
    """Each token's own text (for logprob-style per-token output)."""
    return [_decode_one(token) for token in ids]


_LITTLE_ENDIAN = array("I", [1]).tobytes()[0] == 1


#: Wire formats (msgpack, the KV cache events) carry at most 64-bit integers; ids of the wide
#: form (text above U+00FF) can be larger.
_WIRE_LIMIT = 1 << 63


def wire_ids(ids: list[int]) -> list[int]:
    """``ids`` folded into 63 bits where needed, the same way by the worker and the router.

    The sim's KV cache events carry token ids; a wide id (``>= 2**63``) is folded to
    ``id % 2**63``, which both ends apply, so the blocks the router hashes from a request
    equal the blocks the worker announced. Latin-1 text (every benchmark) is left as is.
    """
    if not ids or max(ids) < _WIRE_LIMIT:
        return ids
    return [token % _WIRE_LIMIT for token in ids]
