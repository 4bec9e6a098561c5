"""Large JSON bodies do not block the event loop (issue 9 item 7).

A 1M-key, ~9 MB body takes orjson about half a second; parsed on the loop it stalled every
concurrent request for that long. The test measures the loop's longest stall while
:func:`parse_inference_async` parses such a body; the precise figure is in
``benchmarks/hostile.py`` (RESULTS.md, "Hostile clients").
"""

from __future__ import annotations

import asyncio
import itertools
import string
import time

import orjson
import pytest

from sglctl.router.errors import RouterError
from sglctl.router.request import OFF_LOOP_BYTES, parse_inference, parse_inference_async

#: Generous: a parse on the loop stalls it for 300+ ms even on an idle machine.
MAX_STALL_SECS = 0.150


def million_key_body() -> bytes:
    alphabet = string.ascii_letters + string.digits
    keys = ("".join(k) for k in itertools.product(alphabet, repeat=4))
    payload: dict[str, object] = dict.fromkeys(itertools.islice(keys, 1_000_000), 0)
    payload["text"] = "route me by this"
    return orjson.dumps(payload)


async def longest_stall_while(work: asyncio.Future[object] | asyncio.Task[object]) -> float:
    """The longest gap between wake-ups of a 5 ms ticker while ``work`` runs."""
    worst = 0.0
    last = time.perf_counter()
    while not work.done():
        await asyncio.sleep(0.005)
        now = time.perf_counter()
        worst = max(worst, now - last)
        last = now
    await work
    return worst


@pytest.fixture(scope="module")
def big_body() -> bytes:
    body = million_key_body()
    assert len(body) > 8_000_000
    return body


def test_a_million_key_body_does_not_stall_the_loop(big_body: bytes) -> None:
    async def attempt() -> tuple[float, str | None]:
        task = asyncio.ensure_future(parse_inference_async("/generate", big_body))
        stall = await longest_stall_while(task)
        return stall, task.result().key.text

    # A loaded machine can stall any loop now and then; the defect stalls it every time.
    stalls = []
    for _ in range(3):
        stall, text = asyncio.run(attempt())
        assert text == "route me by this"
        stalls.append(stall)
        if stall < MAX_STALL_SECS:
            break
    assert min(stalls) < MAX_STALL_SECS, f"event loop stalled {stalls} s"


def test_off_loop_parse_answers_like_the_inline_one() -> None:
    big_text = "x" * (OFF_LOOP_BYTES + 1)
    for body in (orjson.dumps({"text": "short"}), orjson.dumps({"text": big_text})):
        inline = parse_inference("/generate", body)
        off = asyncio.run(parse_inference_async("/generate", body))
        assert (off.body, off.key, off.stream) == (inline.body, inline.key, inline.stream)
    bad = b'{"text": 1' + b" " * OFF_LOOP_BYTES + b"}"
    with pytest.raises(RouterError) as caught:
        asyncio.run(parse_inference_async("/generate", bad))
    assert caught.value.status == 400
