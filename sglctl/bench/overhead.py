"""Router overhead: the same tiny requests sent directly to the workers and through a router.

Tiny prompts and a few output tokens on very fast sim workers make the router's own cost
(parsing, choosing a worker, proxying the stream) the bulk of each request. Only ratios
measured in the same run mean anything: the client, the router and the workers share the
machine's cores.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from sglctl.bench.client import generate_body, stream_generate
from sglctl.bench.stats import RequestResult, percentile
from sglctl.sim import tokenizer


@dataclass(frozen=True)
class OverheadResult:
    """Closed-loop figures of one target at one concurrency."""

    target: str
    concurrency: int
    requests: int
    errors: int
    duration: float
    p50: float
    p99: float

    @property
    def throughput(self) -> float:
        return (self.requests - self.errors) / self.duration if self.duration > 0 else 0.0


def tiny_prompts(count: int, tokens: int, seed: int = 7) -> list[str]:
    """Distinct prompts, so that a cache-aware router balances instead of piling on one worker."""
    return [tokenizer.text_for_tokens(tokens, f"overhead-{seed}-{i}") for i in range(count)]


async def measure(
    target: str,
    urls: Sequence[str],
    concurrency: int,
    requests: int,
    *,
    prompt_tokens: int = 32,
    output_tokens: int = 4,
    warmup: int = 16,
) -> OverheadResult:
    """Send ``requests`` streaming ``/generate`` calls, ``concurrency`` at a time.

    ``urls`` are used in turn (several for "direct", one router URL otherwise).
    """
    prompts = tiny_prompts(requests + warmup, prompt_tokens)
    cycle = itertools.cycle([u.rstrip("/") + "/generate" for u in urls])
    limits = httpx.Limits(
        max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8
    )
    async with httpx.AsyncClient(limits=limits, timeout=60.0, trust_env=False) as client:

        async def send(index: int) -> RequestResult:
            result = RequestResult(index=index, start=0.0)
            await stream_generate(
                client, next(cycle), generate_body(prompts[index], output_tokens), result
            )
            return result

        await asyncio.gather(*(send(i) for i in range(warmup)))
        pending = iter(range(warmup, warmup + requests))
        results: list[RequestResult] = []

        async def slot() -> None:
            for index in pending:
                results.append(await send(index))

        started = time.perf_counter()
        await asyncio.gather(*(slot() for _ in range(concurrency)))
        duration = time.perf_counter() - started
    latencies = [r.latency for r in results if r.ok and r.latency is not None]
    return OverheadResult(
        target=target,
        concurrency=concurrency,
        requests=len(results),
        errors=sum(1 for r in results if not r.ok),
        duration=duration,
        p50=percentile(latencies, 50),
        p99=percentile(latencies, 99),
    )
