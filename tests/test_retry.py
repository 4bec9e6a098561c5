"""Unit tests for the retry policy: backoff, classification, per-request limits, budget."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from sglctl.router.retry import (
    RetryBudget,
    RetryPolicy,
    is_retryable_exception,
    retryable_status,
)


def test_backoff_without_jitter_grows_geometrically_and_is_capped() -> None:
    policy = RetryPolicy(initial_backoff_ms=50, multiplier=1.5, max_backoff_ms=200, jitter=0)
    assert [round(policy.backoff(a), 6) for a in range(5)] == [0.05, 0.075, 0.1125, 0.16875, 0.2]
    assert policy.backoff(50) == 0.2


def test_backoff_jitter_stays_within_bounds_and_varies() -> None:
    policy = RetryPolicy(initial_backoff_ms=100, multiplier=2, jitter=0.2, rng=random.Random(7))
    values = [policy.backoff(1) for _ in range(200)]
    assert all(0.16 <= v <= 0.24 for v in values)
    assert len(set(values)) > 100  # jitter actually spreads retries


def test_defaults_match_the_contract() -> None:
    policy = RetryPolicy()
    assert (policy.max_worker_retries, policy.max_total_retries) == (3, 6)
    assert (policy.initial_backoff_ms, policy.multiplier, policy.jitter) == (50, 1.5, 0.2)
    assert policy.enabled


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_total_retries": -1},
        {"multiplier": 0.5},
        {"jitter": 1.5},
        {"initial_backoff_ms": -1},
    ],
)
def test_invalid_policy_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("code", [408, 429, 500, 502, 503, 504])
def test_retryable_statuses(code: int) -> None:
    assert retryable_status(code)


@pytest.mark.parametrize("code", [200, 201, 204, 301, 400, 401, 403, 404, 413, 422, 501, 505])
def test_not_retryable_statuses(code: int) -> None:
    assert not retryable_status(code)


REQ = httpx.Request("POST", "http://127.0.0.1:1/generate")


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("refused", request=REQ),
        httpx.ConnectTimeout("slow connect", request=REQ),
        httpx.ReadTimeout("stalled", request=REQ),
        httpx.WriteTimeout("stalled", request=REQ),
        httpx.PoolTimeout("pool", request=REQ),
        httpx.RemoteProtocolError("Server disconnected without sending a response.", request=REQ),
        httpx.ReadError("reset", request=REQ),
        httpx.WriteError("reset", request=REQ),
        ConnectionResetError(),
        ConnectionRefusedError(),
        TimeoutError(),
        asyncio.TimeoutError(),
    ],
)
def test_retryable_exceptions(exc: BaseException) -> None:
    assert is_retryable_exception(exc)


@pytest.mark.parametrize(
    "exc",
    [
        asyncio.CancelledError(),
        httpx.LocalProtocolError("we sent garbage", request=REQ),
        httpx.UnsupportedProtocol("ftp://", request=REQ),
        httpx.InvalidURL("bad"),
        httpx.DecodingError("gzip", request=REQ),
        httpx.TooManyRedirects("loop", request=REQ),
        ValueError("a bug"),
        KeyboardInterrupt(),
    ],
)
def test_not_retryable_exceptions(exc: BaseException) -> None:
    assert not is_retryable_exception(exc)


def test_attempts_never_pick_the_same_worker_twice_in_a_row_when_another_exists() -> None:
    attempts = RetryPolicy().new_attempts()
    workers = ["a", "b", "c"]
    attempts.record("a")
    assert attempts.candidates(workers, key=str) == ["b", "c"]
    attempts.record("b")
    assert attempts.candidates(workers, key=str) == ["a", "c"]


def test_attempts_fall_back_to_the_only_worker() -> None:
    attempts = RetryPolicy(max_worker_retries=2).new_attempts()
    attempts.record("a")
    assert attempts.candidates(["a"], key=str) == ["a"]
    attempts.record("a")
    attempts.record("a")  # 1 attempt + 2 retries on "a": used up
    assert attempts.candidates(["a"], key=str) == []


def test_per_worker_counts_are_exact_whether_kept_or_not_yet() -> None:
    """The counts are only kept from the second attempt on; limits must not notice."""
    attempts = RetryPolicy(max_worker_retries=1).new_attempts()
    workers = ["a", "b"]
    assert attempts.candidates(workers, key=str) is workers  # first attempt: as given
    assert attempts.per_worker == {}
    attempts.record("a")
    assert attempts.per_worker == {"a": 1}
    assert attempts.worker_allowed("a") and attempts.worker_allowed("b")
    attempts.record("b")
    attempts.record("a")  # 1 attempt + 1 retry on "a": used up
    assert attempts.per_worker == {"a": 2, "b": 1}
    assert not attempts.worker_allowed("a")
    assert attempts.candidates(workers, key=str) == ["b"]
    zero = RetryPolicy(max_worker_retries=0).new_attempts()
    zero.record("a")
    assert not zero.worker_allowed("a")
    assert zero.candidates(workers, key=str) == ["b"]


def test_attempts_respect_total_limit() -> None:
    attempts = RetryPolicy(max_total_retries=2).new_attempts()
    attempts.record("a")
    assert attempts.can_retry()
    attempts.record("b")
    assert attempts.can_retry()
    attempts.record("c")
    assert attempts.retries == 2
    assert not attempts.can_retry()


def test_disabled_policy_never_retries() -> None:
    attempts = RetryPolicy(enabled=False).new_attempts()
    attempts.record("a")
    assert not attempts.can_retry()


def test_next_backoff_follows_the_retry_count() -> None:
    attempts = RetryPolicy(initial_backoff_ms=10, multiplier=2, jitter=0).new_attempts()
    attempts.record("a")
    assert attempts.next_backoff() == pytest.approx(0.010)
    attempts.record("b")
    assert attempts.next_backoff() == pytest.approx(0.020)
    attempts.record("a")
    assert attempts.next_backoff() == pytest.approx(0.040)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_allows_the_floor_then_a_ratio_of_requests() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_sec=1, ttl_secs=10, clock=clock)
    # floor: 1/s over 10 s = 10 retries with no traffic at all
    assert sum(budget.try_retry() for _ in range(20)) == 10
    assert budget.exhausted == 10
    for _ in range(50):
        budget.record_request()
    assert sum(budget.try_retry() for _ in range(20)) == 10  # 20% of 50 requests


def test_budget_refills_as_time_passes() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_sec=1, ttl_secs=10, clock=clock)
    assert sum(budget.try_retry() for _ in range(15)) == 10
    clock.now = 10.5
    assert budget.try_retry()
