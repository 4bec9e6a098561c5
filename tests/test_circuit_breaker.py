"""Unit tests for the per-worker circuit breaker, on a fake clock."""

from __future__ import annotations

import pytest

from sglctl.router.circuit_breaker import STATE_CODES, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, **kwargs: object) -> CircuitBreaker:
    params: dict[str, object] = {
        "failure_threshold": 3,
        "success_threshold": 2,
        "timeout_secs": 10.0,
        "window_secs": 30.0,
    }
    params.update(kwargs)
    return CircuitBreaker(clock=clock, name="w1", **params)  # type: ignore[arg-type]


def test_closed_allows_and_opens_after_threshold(clock: FakeClock) -> None:
    cb = make(clock)
    assert cb.state == "closed" and cb.allow() and cb.is_available()
    cb.record_failure()
    cb.record_failure()
    assert cb.state == "closed"
    cb.record_failure()
    assert cb.state == "open"
    assert cb.state_code == STATE_CODES["open"] == 1
    assert not cb.allow()
    assert not cb.is_available()
    assert cb.times_opened == 1


def test_success_resets_the_streak(clock: FakeClock) -> None:
    cb = make(clock)
    for _ in range(10):
        cb.record_failure()
        cb.record_failure()
        cb.record_success()
    assert cb.state == "closed"


def test_failures_spread_beyond_the_window_do_not_open(clock: FakeClock) -> None:
    cb = make(clock)
    cb.record_failure()
    cb.record_failure()
    clock.advance(31)  # the streak started more than window_secs ago: it starts over
    cb.record_failure()
    assert cb.state == "closed"
    cb.record_failure()
    cb.record_failure()
    assert cb.state == "open"


def test_open_turns_half_open_after_timeout_and_lets_exactly_one_probe(clock: FakeClock) -> None:
    cb = make(clock)
    for _ in range(3):
        cb.record_failure()
    clock.advance(9.9)
    assert cb.state == "open" and not cb.allow()
    clock.advance(0.1)
    assert cb.state == "half_open"
    assert cb.state_code == 2
    assert cb.is_available()
    assert cb.allow()  # the probe
    assert not cb.is_available()
    assert not cb.allow()  # a second concurrent request is refused
    assert not cb.allow()


def test_is_available_does_not_claim_the_probe(clock: FakeClock) -> None:
    cb = make(clock)
    for _ in range(3):
        cb.record_failure()
    clock.advance(10)
    for _ in range(5):
        assert cb.is_available()
    assert cb.allow()
    assert not cb.is_available()


def test_half_open_closes_after_success_threshold(clock: FakeClock) -> None:
    cb = make(clock)
    for _ in range(3):
        cb.record_failure()
    clock.advance(10)
    assert cb.allow()
    cb.record_success()
    assert cb.state == "half_open"
    assert cb.allow()  # the next probe, once the previous one reported
    cb.record_success()
    assert cb.state == "closed"
    assert cb.allow() and cb.allow()


def test_failed_probe_reopens_for_a_full_timeout(clock: FakeClock) -> None:
    cb = make(clock)
    for _ in range(3):
        cb.record_failure()
    clock.advance(10)
    assert cb.allow()
    cb.record_success()
    assert cb.allow()
    cb.record_failure()
    assert cb.state == "open"
    assert cb.times_opened == 2
    clock.advance(9)
    assert not cb.allow()
    clock.advance(1)
    assert cb.state == "half_open"
    # the earlier successful probe does not count any more: two fresh ones are needed
    assert cb.allow()
    cb.record_success()
    assert cb.state == "half_open"


def test_release_frees_the_probe_slot(clock: FakeClock) -> None:
    cb = make(clock)
    for _ in range(3):
        cb.record_failure()
    clock.advance(10)
    assert cb.allow()
    assert not cb.allow()
    cb.release()
    assert cb.allow()


def test_lost_probe_verdict_does_not_wedge_the_worker(clock: FakeClock) -> None:
    cb = make(clock)
    for _ in range(3):
        cb.record_failure()
    clock.advance(10)
    assert cb.allow()
    clock.advance(9)
    assert not cb.allow()
    clock.advance(1)
    assert cb.allow()


def test_late_failures_while_open_are_ignored(clock: FakeClock) -> None:
    cb = make(clock)
    for _ in range(3):
        cb.record_failure()
    clock.advance(5)
    cb.record_failure()  # a request admitted before the breaker opened
    clock.advance(5)
    assert cb.state == "half_open"  # the timeout was not restarted


def test_disabled_breaker_always_allows(clock: FakeClock) -> None:
    cb = make(clock, enabled=False)
    for _ in range(100):
        cb.record_failure()
    assert cb.state == "closed" and cb.allow() and cb.is_available()


def test_reset_closes(clock: FakeClock) -> None:
    cb = make(clock)
    for _ in range(3):
        cb.record_failure()
    cb.reset()
    assert cb.state == "closed" and cb.allow()
    cb.record_failure()
    cb.record_failure()
    assert cb.state == "closed"


def test_defaults_match_the_contract() -> None:
    cb = CircuitBreaker()
    assert (cb.failure_threshold, cb.success_threshold) == (10, 3)
    assert (cb.timeout_secs, cb.window_secs) == (60, 120)


@pytest.mark.parametrize(
    "kwargs",
    [{"failure_threshold": 0}, {"success_threshold": 0}, {"timeout_secs": -1}, {"window_secs": 0}],
)
def test_invalid_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]


def test_transitions_are_logged(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    cb = make(clock)
    with caplog.at_level("INFO", logger="sglctl.router.circuit_breaker"):
        for _ in range(3):
            cb.record_failure()
        clock.advance(10)
        assert cb.allow()
        cb.record_success()
        cb.allow()
        cb.record_success()
    text = caplog.text
    assert "opened" in text and "half-open" in text and "closed" in text
    assert "w1" in text
