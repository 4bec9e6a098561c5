"""The simulated worker's tokenizer: the 4-character rule, or a real ``tokenizer.json``.

By default every prompt is encoded with the 4-character rule of :mod:`sglctl.fourchar` (fast,
reversible, ~4 characters a token like real tokenizers; its docstring says why). With
``--tokenizer-path`` naming a ``tokenizer.json`` (or a directory holding one) the worker
encodes and decodes with that file through the ``tokenizers`` library instead, the way SGLang
uses the model's tokenizer: a router that tokenizes to match the worker's KV cache events
(``sglctl router --kv-events --tokenizer-path``) can then be tested against the very ids a
real worker would cache. A ``--tokenizer-path`` that is not such a file stays what it always
was here, a name reported by ``/get_model_info``.

The choice is process-wide (one worker per process): :func:`use_tokenizer_file` swaps it, and
:func:`encode` / :func:`decode` dispatch at call time, so modules that imported them directly
follow.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sglctl import fourchar
from sglctl.fourchar import CHARS_PER_TOKEN, text_for_tokens

__all__ = [
    "CHARS_PER_TOKEN",
    "count_tokens",
    "decode",
    "encode",
    "text_for_tokens",
    "token_strings",
    "tokenizer_file",
    "use_tokenizer_file",
]

log = logging.getLogger(__name__)
#: The loaded ``tokenizers.Tokenizer``, or None for the 4-character rule.
_real: Any = None


def tokenizer_file(path: str | None) -> Path | None:
    """The ``tokenizer.json`` that ``path`` names (the file, or a directory holding it)."""
    if not path:
        return None
    candidate = Path(path)
    if candidate.is_dir():
        candidate = candidate / "tokenizer.json"
    return candidate if candidate.is_file() else None


def use_tokenizer_file(path: str | Path | None) -> None:
    """Encode with the ``tokenizer.json`` at ``path`` from now on (None: the 4-character rule)."""
    global _real
    if path is None:
        _real = None
        return
    from tokenizers import Tokenizer  # only a worker given a real tokenizer loads the library

    _real = Tokenizer.from_file(str(path))
    log.info("tokenizing with %s (add_special_tokens=True, as SGLang does)", path)


def encode(text: str) -> list[int]:
    """Token ids of ``text``."""
    if _real is None:
        return fourchar.encode(text)
    ids: list[int] = _real.encode(text, add_special_tokens=True).ids
    return ids


def decode(ids: Iterable[int]) -> str:
    """Text of ``ids``."""
    if _real is None:
        return fourchar.decode(ids)
    text: str = _real.decode(list(ids), skip_special_tokens=True)
    return text


def count_tokens(text: str) -> int:
    """``len(encode(text))`` (without building the list for the 4-character rule)."""
    return fourchar.count_tokens(text) if _real is None else len(encode(text))


def token_strings(ids: Sequence[int]) -> list[str]:
    """Each token's own text (for logprob-style per-token output)."""
    if _real is None:
        return fourchar.token_strings(ids)
    return [_real.decode([token], skip_special_tokens=False) for token in ids]
