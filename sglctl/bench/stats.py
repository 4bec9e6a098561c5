"""Per-request results and the summary figures a benchmark reports.

Everything here is plain arithmetic over lists, with no I/O, so it is unit-tested on made-up
numbers; the runner fills :class:`RequestResult` and :mod:`sglctl.bench.report` prints the
:class:`Summary`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from sglctl.bench.ideal import IdealHitRatio


@dataclass
class RequestResult:
    """What happened to one request. Times are seconds; ``start`` is from the run's start."""

    index: int
    start: float
    ok: bool = False
    ttft: float | None = None
    latency: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    status: int | None = None
    error: str | None = None
    cancelled: bool = False


@dataclass(frozen=True)
class WorkerShare:
    """What one worker did during the run (deltas of its ``/metrics`` counters)."""

    url: str
    requests: float
    prompt_tokens: float
    generation_tokens: float
    cached_tokens: float

    @property
    def tokens(self) -> float:
        return self.prompt_tokens + self.generation_tokens

    @property
    def hit_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class Summary:
    """The figures of one run."""

    requests: int
    completed: int
    errors: int
    cancelled: int
    duration: float
    request_throughput: float
    input_throughput: float
    output_throughput: float
    ttft_p50: float
    ttft_p99: float
    ttft_mean: float
    latency_p50: float
    latency_p99: float
    latency_mean: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    hit_ratio: float
    error_kinds: dict[str, int] = field(default_factory=dict)
    workers: list[WorkerShare] = field(default_factory=list)
    ideal: IdealHitRatio | None = None

    @property
    def request_imbalance(self) -> float:
        """max/mean of the workers' request counts (1.0 = perfectly even; nan if unknown)."""
        return max_over_mean([w.requests for w in self.workers])

    @property
    def token_imbalance(self) -> float:
        """max/mean of the workers' prompt + generated tokens."""
        return max_over_mean([w.tokens for w in self.workers])

    @property
    def hit_ratio_of_ideal(self) -> float:
        """Measured hit ratio as a fraction of the ideal one (nan when no ideal is known)."""
        if self.ideal is None or not self.ideal.token_weighted:
            return math.nan
        return self.hit_ratio / self.ideal.token_weighted


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation, as numpy's default.

    Returns nan for no values: a run where nothing completed has no latency, and saying 0
    would read as "fast".
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, not {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def max_over_mean(values: Sequence[float]) -> float:
    """Load imbalance: the busiest worker over the average one (nan without data)."""
    if not values:
        return math.nan
    avg = sum(values) / len(values)
    return max(values) / avg if avg else math.nan


def error_kind(result: RequestResult) -> str:
    """A short label to group errors by: the HTTP status, or the exception's class."""
    if result.status is not None and result.status != 200:
        return f"HTTP {result.status}"
    return (result.error or "error").split(":", 1)[0]


def summarize(
    results: Sequence[RequestResult],
    duration: float,
    workers: Sequence[WorkerShare] = (),
    ideal: IdealHitRatio | None = None,
) -> Summary:
    """Fold per-request results into a :class:`Summary`.

    Throughputs count completed requests over the run's wall time; latencies are over
    completed requests only; the hit ratio is the workers' ``cached_tokens`` over their
    ``prompt_tokens`` as reported per request, falling back to the workers' counters when
    no response carried them.
    """
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok and not r.cancelled]
    ttfts = [r.ttft for r in done if r.ttft is not None]
    latencies = [r.latency for r in done if r.latency is not None]
    prompt_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    cached_tokens = sum(r.cached_tokens for r in done)
    if prompt_tokens:
        hit_ratio = cached_tokens / prompt_tokens
    else:
        worker_prompt = sum(w.prompt_tokens for w in workers)
        hit_ratio = sum(w.cached_tokens for w in workers) / worker_prompt if worker_prompt else 0.0
    span = duration if duration > 0 else math.nan
    return Summary(
        requests=len(results),
        completed=len(done),
        errors=len(failed),
        cancelled=sum(1 for r in results if r.cancelled),
        duration=duration,
        request_throughput=len(done) / span,
        input_throughput=prompt_tokens / span,
        output_throughput=output_tokens / span,
        ttft_p50=percentile(ttfts, 50),
        ttft_p99=percentile(ttfts, 99),
        ttft_mean=mean(ttfts),
        latency_p50=percentile(latencies, 50),
        latency_p99=percentile(latencies, 99),
        latency_mean=mean(latencies),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        cached_tokens=cached_tokens,
        hit_ratio=hit_ratio,
        error_kinds=dict(Counter(error_kind(r) for r in failed)),
        workers=list(workers),
        ideal=ideal,
    )
