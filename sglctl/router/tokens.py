"""The request's token ids, as the worker will cache them (only with ``--kv-events``).

The exact index (:mod:`sglctl.router.kv_index`) keys blocks by token ids, so the router must
turn a request into the very ids the worker tokenizes it into:

* ``input_ids`` (``/generate``, or ``/v1/completions`` with token prompts) are used as sent.
* Text (``/generate`` ``text``, ``/v1/completions`` ``prompt``) is encoded with the model's
  tokenizer when ``--tokenizer-path`` names a ``tokenizer.json`` (or a directory holding one),
  through the ``tokenizers`` library with ``add_special_tokens=True`` -- what SGLang's
  tokenizer manager does for a text prompt (a BOS token where the model's post-processor adds
  one). Without ``--tokenizer-path`` it is the simulated worker's 4-character rule
  (:mod:`sglctl.fourchar`), which is what the sim caches.
* Chat (``/v1/chat/completions``) would need the model's chat template, which the router does
  not render: such a request returns None and the policy routes it on the approximate tree,
  as without events. (The router only sees the messages' contents, joined.)

Only the router process with events on imports ``tokenizers``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sglctl import fourchar

if TYPE_CHECKING:  # policies import this module: no import cycle at run time
    from sglctl.router.policies.base import RouteKey

log = logging.getLogger(__name__)


class Encoder(Protocol):
    """Text -> token ids, as the workers encode a text prompt."""

    name: str

    def encode(self, text: str) -> Sequence[int]: ...


class FourCharEncoder:
    """The sim's rule (the default without ``--tokenizer-path``)."""

    name = "sim 4-character rule"

    def encode(self, text: str) -> Sequence[int]:
        return fourchar.encode_view(text)


class HFEncoder:
    """A ``tokenizer.json`` through the ``tokenizers`` library."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.name = str(path)
        self._tokenizer: Any = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> Sequence[int]:
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=True).ids
        return ids


def load_encoder(tokenizer_path: str | None) -> Encoder:
    """The encoder for ``--tokenizer-path`` (None: the sim's rule).

    Raises ``ValueError`` with what to fix when the path holds no usable ``tokenizer.json``.
    """
    if not tokenizer_path:
        return FourCharEncoder()
    path = Path(tokenizer_path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(
            f"--tokenizer-path {tokenizer_path}: no tokenizer.json there; give the model's "
            "tokenizer.json (or the directory holding it), or drop the flag for the sim's rule"
        )
    try:
        return HFEncoder(path)
    except Exception as exc:  # tokenizers raises its own Exception subclass
        raise ValueError(f"--tokenizer-path {path}: not a tokenizer.json ({exc})") from None


def route_tokens(key: RouteKey, encoder: Encoder) -> Sequence[int] | None:
    """The ids the worker will cache for ``key``'s prompt, or None when the router cannot tell
    (chat, or no prompt)."""
    if key.chat:
        return None
    if key.input_ids:
        return key.input_ids
    if key.text:
        return encoder.encode(key.text)
    return None
