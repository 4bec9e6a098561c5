"""Parsing and validation of request bodies (native ``/generate`` and the shared sampling part).

Every mistake becomes an :class:`~sglctl.sim.errors.APIError` with status 400 and a message
that names the field, never an exception that would turn into a 500. Fields SGLang accepts but
the simulation has no use for (``top_p``, ``regex``, ``lora_path``, ``bootstrap_room`` ...)
are accepted and ignored; the common numeric ones are still range-checked like SGLang does,
so a client bug shows up here the same way it would on a real worker.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from sglctl.sim.errors import APIError
from sglctl.sim.tokenizer import encode


def parse_json(body: bytes) -> Any:
    """Decode a JSON body or raise a 400 saying why."""
    if not body.strip():
        raise APIError("The request body is empty; expected a JSON object.")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise APIError(f"The request body is not valid JSON: {exc}") from None


def require_object(value: Any, what: str = "the request body") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise APIError(f"{what} must be a JSON object, not {type(value).__name__}.")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def optional_int(obj: dict[str, Any], key: str, minimum: int | None = None) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if not _is_int(value):
        raise APIError(f"{key} must be an integer, got {value!r}.")
    if minimum is not None and value < minimum:
        raise APIError(f"{key} must be at least {minimum}, got {value}.")
    return int(value)


def optional_number(obj: dict[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if not _is_number(value):
        raise APIError(f"{key} must be a number, got {value!r}.")
    return float(value)


def optional_bool(obj: dict[str, Any], key: str, default: bool = False) -> bool:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(f"{key} must be a boolean, got {value!r}.")
    return value


def string_list(value: Any, key: str) -> list[str]:
    """``stop`` and friends: a string or a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise APIError(f"{key} must be a string or a list of strings, got {value!r}.")


def token_list(value: Any, key: str) -> list[int]:
    if isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value):
        return list(value)
    raise APIError(f"{key} must be a list of non-negative integer token ids.")


@dataclass
class Sampling:
    """The sampling parameters the simulation acts on (others are validated, then ignored)."""

    max_new_tokens: int
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    no_stop_trim: bool = False
    n: int = 1


def parse_sampling(raw: Any, default_max_new_tokens: int) -> Sampling:
    """Validate SGLang ``sampling_params`` (ranges as in SGLang's ``SamplingParams.verify``)."""
    params = require_object(raw if raw is not None else {}, "sampling_params")
    max_new = optional_int(params, "max_new_tokens", minimum=0)
    min_new = optional_int(params, "min_new_tokens", minimum=0) or 0
    max_new = default_max_new_tokens if max_new is None else max_new
    if min_new > max_new:
        raise APIError(f"min_new_tokens must be in [0, max_new_tokens({max_new})], got {min_new}.")
    temperature = optional_number(params, "temperature")
    if temperature is not None and temperature < 0:
        raise APIError(f"temperature must be non-negative, got {temperature}.")
    top_p = optional_number(params, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise APIError(f"top_p must be in (0, 1], got {top_p}.")
    min_p = optional_number(params, "min_p")
    if min_p is not None and not 0 <= min_p <= 1:
        raise APIError(f"min_p must be in [0, 1], got {min_p}.")
    top_k = optional_int(params, "top_k")
    if top_k is not None and top_k < 1 and top_k != -1:
        raise APIError(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    for key in ("frequency_penalty", "presence_penalty"):
        value = optional_number(params, key)
        if value is not None and not -2 <= value <= 2:
            raise APIError(f"{key} must be in [-2, 2], got {value}.")
    repetition = optional_number(params, "repetition_penalty")
    if repetition is not None and not 0 <= repetition <= 2:
        raise APIError(f"repetition_penalty must be in [0, 2], got {repetition}.")
    n = optional_int(params, "n", minimum=1) or 1
    stop_ids = params.get("stop_token_ids")
    return Sampling(
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        stop=string_list(params.get("stop"), "stop"),
        stop_token_ids=[] if stop_ids is None else token_list(stop_ids, "stop_token_ids"),
        ignore_eos=optional_bool(params, "ignore_eos"),
        no_stop_trim=optional_bool(params, "no_stop_trim"),
        n=n,
    )


@dataclass
class GenerateItem:
    """One prompt of a (possibly batched) ``/generate`` call."""

    rid: str
    input_ids: list[int]
    sampling: Sampling
    index: int = 0


@dataclass
class GenerateCall:
    items: list[GenerateItem]
    batched: bool
    stream: bool
    return_logprob: bool = False


def new_rid() -> str:
    return uuid.uuid4().hex


def parse_generate(body: Any, default_max_new_tokens: int) -> GenerateCall:
    """Validate a native ``/generate`` body (single or batch, text or input_ids)."""
    obj = require_object(body)
    text, input_ids = obj.get("text"), obj.get("input_ids")
    if text is None and input_ids is None:
        raise APIError("Either text or input_ids should be provided.")
    if text is not None and input_ids is not None:
        raise APIError("Either text or input_ids should be provided, not both.")
    prompts: list[list[int]]
    if text is not None:
        if isinstance(text, str):
            prompts, batched = [encode(text)], False
        elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            prompts, batched = [encode(t) for t in text], True
        else:
            raise APIError("text must be a string or a non-empty list of strings.")
    elif isinstance(input_ids, list) and input_ids and all(isinstance(p, list) for p in input_ids):
        prompts, batched = [token_list(p, "input_ids") for p in input_ids], True
    else:
        prompts, batched = [token_list(input_ids, "input_ids")], False

    raw_sampling = obj.get("sampling_params")
    if isinstance(raw_sampling, list):
        if len(raw_sampling) != len(prompts):
            raise APIError(
                f"sampling_params is a list of {len(raw_sampling)} but there are "
                f"{len(prompts)} prompts."
            )
        samplings = [parse_sampling(s, default_max_new_tokens) for s in raw_sampling]
    else:
        one = parse_sampling(raw_sampling, default_max_new_tokens)
        samplings = [one] * len(prompts)

    rid = obj.get("rid")
    if rid is None:
        rids = [new_rid() for _ in prompts]
    elif isinstance(rid, str) and not batched:
        rids = [rid]
    elif (
        isinstance(rid, list) and len(rid) == len(prompts) and all(isinstance(r, str) for r in rid)
    ):
        rids = list(rid)
    else:
        raise APIError("rid must be a string (or a list of strings, one per prompt).")
    stream = optional_bool(obj, "stream")

    items: list[GenerateItem] = []
    for prompt, sampling, base_rid in zip(prompts, samplings, rids, strict=True):
        for copy in range(sampling.n):
            rid_n = base_rid if sampling.n == 1 else f"{base_rid}-{copy}"
            items.append(GenerateItem(rid_n, prompt, sampling, len(items)))
    return_logprob = optional_bool(obj, "return_logprob")
    return GenerateCall(items, batched or len(items) > 1, stream, return_logprob)
