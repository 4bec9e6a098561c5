"""Stall detection (sglctl/router/stall.py): a hung worker is bypassed in seconds, a busy one
is left alone.

Unit tests drive :meth:`StallDetector.scan` / :meth:`StallDetector.check` with a fake clock
and a scripted probe; integration tests SIGSTOP a real sim worker under a real router.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from support import wait_until

from sglctl.net import find_free_port
from sglctl.router.config import RouterConfig
from sglctl.router.flags import parse_args
from sglctl.router.health import HealthChecker
from sglctl.router.router import Router
from sglctl.router.stall import StallDetector
from sglctl.router.workers import Worker, WorkerRegistry

# -- unit: the decision, with a fake clock -------------------------------------------------


class ScriptedHealth(HealthChecker):
    """A health checker whose probe answers what the test says, without a network."""

    def __init__(self, answers: bool = True) -> None:
        super().__init__(interval_secs=10, failure_threshold=3, success_threshold=2)
        self.answers = answers
        self.probed: list[tuple[str, float | None]] = []
        self.changes: list[tuple[str, bool]] = []
        self.on_change = lambda w, healthy: self.changes.append((w.url, healthy))

    async def probe(
        self, url: str, timeout_secs: float | None = None
    ) -> tuple[bool, str | None, float]:
        self.probed.append((url, timeout_secs))
        return (True, None, 0.01) if self.answers else (False, "no answer within 1s", 1.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fleet(*names: str) -> tuple[WorkerRegistry, dict[str, Worker]]:
    registry = WorkerRegistry()
    workers = {n: registry.add(f"http://127.0.0.1:{30000 + i}") for i, n in enumerate(names)}
    return registry, workers


def detector(registry: WorkerRegistry, health: HealthChecker, clock: Clock) -> StallDetector:
    """Suspect after 1.5 s, probe timeout 1 s, supervisor workers skipped (the defaults)."""
    return StallDetector(registry, health, 1.5, 1.0, clock=clock, skip_sources=("supervisor",))


def test_a_busy_silent_worker_is_suspect_only_while_others_answer() -> None:
    registry, w = fleet("hung", "live", "idle")
    clock = Clock()
    stall = detector(registry, ScriptedHealth(), clock)
    w["hung"].in_flight = 3
    w["live"].in_flight = 2
    w["idle"].last_byte = clock.now - 100  # idle: an old stamp is no evidence of anything
    assert stall.scan(clock.now - 10) == []  # busy for a while already
    w["hung"].last_byte = clock.now - 0.5  # ... and then its last byte
    w["live"].last_byte = clock.now
    assert stall.scan(clock.now) == []
    for _ in range(3):  # 0.75 s more of silence while "live" keeps answering: not yet
        clock.now += 0.25
        w["live"].last_byte = clock.now
        assert stall.scan(clock.now) == []
    clock.now += 0.25  # 1.5 s since its last byte
    w["live"].last_byte = clock.now
    assert stall.scan(clock.now) == [w["hung"]]
    assert stall.suspected == 1
    # no new requests while its probe is pending
    assert w["hung"].suspect and not w["hung"].is_routable()
    assert registry.routable() == [w["live"], w["idle"]]
    assert stall.scan(clock.now + 1) == []  # one probe at a time: the first is still pending


def test_an_idle_worker_is_judged_from_when_it_became_busy() -> None:
    registry, w = fleet("new", "live")
    clock = Clock()
    stall = detector(registry, ScriptedHealth(), clock)
    w["live"].in_flight = 1
    assert stall.scan(clock.now) == []
    w["new"].in_flight = 1  # its first request in minutes; its last byte is old
    clock.now += 0.25
    w["live"].last_byte = clock.now
    assert stall.scan(clock.now) == []
    clock.now += 1.0
    w["live"].last_byte = clock.now
    assert stall.scan(clock.now) == []
    clock.now += 0.5
    w["live"].last_byte = clock.now
    assert stall.scan(clock.now) == [w["new"]]


def test_no_suspicion_when_no_worker_produces_anything() -> None:
    """Everyone silent (one long prefill each, or a single busy worker): not a stall."""
    registry, w = fleet("a", "b")
    clock = Clock()
    stall = detector(registry, ScriptedHealth(), clock)
    w["a"].in_flight = w["b"].in_flight = 1
    stall.scan(clock.now)
    clock.now += 60
    assert stall.scan(clock.now) == []
    assert stall.suspected == 0


def test_a_worker_producing_bytes_is_never_suspect() -> None:
    registry, w = fleet("a", "b")
    clock = Clock()
    stall = detector(registry, ScriptedHealth(), clock)
    w["a"].in_flight = w["b"].in_flight = 4
    for _ in range(40):
        clock.now += 0.25
        w["a"].last_byte = w["b"].last_byte = clock.now
        assert stall.scan(clock.now) == []


def test_supervisor_workers_and_unhealthy_workers_are_not_judged() -> None:
    registry = WorkerRegistry()
    theirs = registry.add("http://127.0.0.1:31000", source="supervisor")
    sick = registry.add("http://127.0.0.1:31001")
    live = registry.add("http://127.0.0.1:31002")
    sick.health_ok = False
    clock = Clock()
    stall = detector(registry, ScriptedHealth(), clock)
    theirs.in_flight = sick.in_flight = live.in_flight = 1
    stall.scan(clock.now)
    clock.now += 5
    live.last_byte = clock.now
    assert stall.scan(clock.now) == []


def test_the_last_routable_worker_is_probed_but_keeps_taking_requests() -> None:
    """Marking it would turn every new request into a 503 for the probe's duration."""
    registry, w = fleet("hung", "live")
    clock = Clock()
    stall = detector(registry, ScriptedHealth(), clock)
    w["hung"].in_flight = 1
    stall.scan(clock.now)
    w["live"].health_ok = False  # out already, but it answered a moment ago
    w["live"].last_byte = clock.now + 1.9
    clock.now += 2
    assert stall.scan(clock.now) == [w["hung"]]
    assert not w["hung"].suspect and w["hung"].is_routable()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_no_answer_ejects_like_a_health_ejection_and_checks_bring_it_back(
    anyio_backend: str,
) -> None:
    registry, w = fleet("hung", "live")
    clock = Clock()
    health = ScriptedHealth(answers=False)
    stall = detector(registry, health, clock)
    health.observe(w["hung"], True, latency=0.003)  # a sim worker's /health: at once
    w["hung"].in_flight = 2
    stall.scan(clock.now)
    clock.now += 2
    w["live"].last_byte = clock.now
    (suspect,) = stall.scan(clock.now)
    assert await stall.check(suspect)
    assert health.probed == [(suspect.url, 1.0)]  # the short timeout, not the checker's 5 s
    assert not suspect.health_ok and not suspect.suspect
    assert health.changes == [(suspect.url, False)]  # the router interrupts on this callback
    status = health.status(suspect.url)
    assert status.last_error is not None and "stalled: 2 requests in flight" in status.last_error
    # the regular checker's rounds bring it back after success_threshold good probes
    assert not health.observe(suspect, True)
    assert health.observe(suspect, True)
    assert suspect.health_ok and health.changes[-1] == (suspect.url, True)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_answer_keeps_a_busy_worker_and_delays_the_next_probe(
    anyio_backend: str,
) -> None:
    registry, w = fleet("busy", "live")
    clock = Clock()
    health = ScriptedHealth(answers=True)
    stall = detector(registry, health, clock)
    w["busy"].in_flight = 1
    stall.scan(clock.now)
    clock.now += 2
    w["live"].last_byte = clock.now
    (suspect,) = stall.scan(clock.now)
    assert not await stall.check(suspect)
    assert suspect.health_ok and suspect.is_routable() and health.changes == []
    clock.now += 1
    w["live"].last_byte = clock.now
    assert stall.scan(clock.now) == []  # not again before another 1.5 s of silence
    clock.now += 1
    w["live"].last_byte = clock.now
    assert stall.scan(clock.now) == [suspect]


def test_the_probe_waits_longer_for_a_worker_whose_health_endpoint_is_slow() -> None:
    registry, w = fleet("sim", "sglang")
    health = ScriptedHealth()
    stall = detector(registry, health, Clock())
    assert stall.probe_timeout(w["sim"].url) == 3.0  # nothing known yet: room for SGLang
    health.observe(w["sim"], True, latency=0.004)
    assert stall.probe_timeout(w["sim"].url) == 1.0  # --stall-probe-timeout-secs
    for latency in (1.02, 1.3, 1.01):  # SGLang: a one-token generation, checked after 1 s
        health.observe(w["sglang"], True, latency=latency)
    assert stall.probe_timeout(w["sglang"].url) == pytest.approx(2.6)
    health.observe(w["sglang"], False, "HTTP 503", latency=0.001)  # failures do not count
    assert stall.probe_timeout(w["sglang"].url) == pytest.approx(2.6)


def test_flags_defaults_and_what_disables_detection() -> None:
    config = parse_args([])
    assert (config.stall_suspect_secs, config.stall_probe_timeout_secs) == (1.5, 1.0)
    assert Router(config).stall.enabled
    assert not Router(parse_args(["--stall-suspect-secs", "0"])).stall.enabled
    # no health checker: nobody would bring an ejected worker back
    assert not Router(parse_args(["--disable-health-check"])).stall.enabled
    assert not Router(RouterConfig(stall_suspect_secs=0)).stall.enabled
    pd = [
        "--pd-disaggregation",
        "--prefill",
        "http://127.0.0.1:1",
        "--decode",
        "http://127.0.0.1:2",
    ]
    assert not Router(parse_args(pd)).stall.enabled  # the PD path stamps no bytes
    with pytest.raises(SystemExit):
        parse_args(["--stall-probe-timeout-secs", "0"])


# -- integration: real router, real sim workers, SIGSTOP -----------------------------------


def worker_view(client: httpx.Client, url: str) -> dict[str, object]:
    workers = client.get("/workers").json()["workers"]
    return dict(next(w for w in workers if w["url"] == url))


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block (always SIGCONT after, so teardown can stop it)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class Load:
    """``threads`` clients sending short non-streamed generations until stopped (bounded)."""

    def __init__(self, url: str, threads: int = 6, max_secs: float = 90.0) -> None:
        self.url = url
        self.statuses: Counter[int | str] = Counter()
        self.done = 0
        self.by_worker: Counter[str] = Counter()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_secs
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(threads)
        ]

    def _client(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60, trust_env=False) as client:
            n = 0
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                n += 1
                body = {"text": f"client {i} request {n} " * 8, "sampling_params": {}}
                body["sampling_params"] = {"max_new_tokens": 48, "ignore_eos": True}
                try:
                    r = client.post("/generate", json=body)
                    status: int | str = r.status_code
                    worker = r.headers.get("x-sglctl-worker", "?")
                except httpx.HTTPError as exc:
                    status, worker = type(exc).__name__, "?"
                with self._lock:
                    self.statuses[status] += 1
                    self.by_worker[worker] += 1
                    self.done += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=70)


#: Slow regular health checks (a probe every 2 s, 5 s timeout, 3 failures: >= 15 s to eject
#: a hung worker on their own), so that the bound below can only be met by stall detection.
HEALTH = ["--health-check-interval-secs", "2", "--health-failure-threshold", "3"]


@pytest.mark.timeout(180)
def test_a_sigstopped_worker_is_bypassed_in_seconds_and_no_request_fails(procs) -> None:
    workers = [procs.sim_worker("--speedup", "1") for _ in range(3)]
    router = procs.router(
        [w.url for w in workers], "--metrics-port", str(find_free_port()), *HEALTH
    )
    victim = workers[1]
    with (
        httpx.Client(base_url=router.url, timeout=10, trust_env=False) as admin,
        Load(router.url, threads=6) as load,
    ):
        wait_until(lambda: load.by_worker[victim.url] >= 3, timeout=60, what="victim serving")
        wait_until(
            lambda: worker_view(admin, victim.url)["load"] > 0,  # type: ignore[operator]
            timeout=30,
            what="requests in flight at the victim",
        )
        with stopped(victim.pid):
            bypass = wait_until(
                lambda: not worker_view(admin, victim.url)["is_healthy"],
                timeout=30,
                interval=0.05,
                what="the hung worker to leave routing",
            )
            print(f"hung worker out of routing after {bypass:.2f} s")
            # with ~2.7 s expected, 8 s leaves room for a loaded machine; the regular health
            # checks alone take >= 15 s here
            assert bypass < 8.0, f"took {bypass:.1f} s to bypass the hung worker"
            after = load.done
            wait_until(lambda: load.done >= after + 20, timeout=60, what="traffic flowing")
        # SIGCONT: the regular health checks bring it back
        wait_until(
            lambda: worker_view(admin, victim.url)["is_healthy"],
            timeout=60,
            what="the worker back in routing",
        )
    assert load.done > 40
    assert set(load.statuses) == {200}, load.statuses
    log = router.log_path.read_text(errors="replace")
    assert re.search(r"unhealthy: stalled: \d+ requests in flight", log), log[-3000:]


def test_a_single_busy_worker_is_not_ejected(procs) -> None:
    """One long non-streamed generation, nothing else producing: not a stall."""
    worker = procs.sim_worker("--speedup", "1")
    router = procs.router(
        [worker.url],
        "--metrics-port",
        str(find_free_port()),
        "--stall-suspect-secs",
        "0.3",
        "--log-level",
        "debug",
    )
    with httpx.Client(base_url=router.url, timeout=60, trust_env=False) as client:
        body = {"text": "long", "sampling_params": {"max_new_tokens": 600, "ignore_eos": True}}
        started = time.monotonic()
        r = client.post("/generate", json=body)
        took = time.monotonic() - started
        assert r.status_code == 200, r.text
        assert took > 1.5, f"the generation took {took:.2f} s: too short to test anything"
        assert worker_view(client, worker.url)["is_healthy"]
    log = router.log_path.read_text(errors="replace")
    assert not re.search(r"worker \S+ unhealthy", log)
    assert "suspect:" not in log  # not even probed: no other worker was producing


def test_a_busy_worker_that_answers_its_probe_stays(procs) -> None:
    """A long generation on one worker while another serves short ones: the silent one is
    suspected and probed (it answers), and stays in routing; its request completes."""
    first, second = procs.sim_worker("--speedup", "1"), procs.sim_worker("--speedup", "1")
    router = procs.router(
        [first.url, second.url],
        "--metrics-port",
        str(find_free_port()),
        "--policy",
        "shortest_queue",
        "--stall-suspect-secs",
        "0.3",
        # behaviour, not speed: a loaded machine must not turn a slow answer into an ejection
        "--stall-probe-timeout-secs",
        "10",
        "--log-level",
        "debug",
    )
    result: dict[str, object] = {}

    def long_request() -> None:
        body = {"text": "long", "sampling_params": {"max_new_tokens": 600, "ignore_eos": True}}
        with httpx.Client(base_url=router.url, timeout=60, trust_env=False) as c:
            r = c.post("/generate", json=body)
            result["status"] = r.status_code
            result["worker"] = r.headers.get("x-sglctl-worker")

    with httpx.Client(base_url=router.url, timeout=30, trust_env=False) as client:
        thread = threading.Thread(target=long_request)
        thread.start()
        try:
            wait_until(
                lambda: any(worker_view(client, w.url)["load"] == 1 for w in (first, second)),
                timeout=20,
                what="the long request in flight",
            )
            busy, other = (
                (first, second) if worker_view(client, first.url)["load"] == 1 else (second, first)
            )
            short = {"text": "s", "sampling_params": {"max_new_tokens": 2}}
            while thread.is_alive():  # shortest_queue sends these to the idle worker
                r = client.post("/generate", json=short)
                assert r.status_code == 200
                view = worker_view(client, busy.url)
                assert view["is_healthy"]
                # The long request still holds its slot after this short one ended, so it was
                # in flight all along: the short one had to go to the idle worker. (Once the
                # long one is released, before its thread ends, both are idle and a tie may
                # go either way: not a defect, and not asserted.)
                if view["load"] == 1:
                    assert r.headers["x-sglctl-worker"] == other.url
        finally:
            thread.join(timeout=60)
    assert result == {"status": 200, "worker": busy.url}
    log = router.log_path.read_text(errors="replace")
    assert "answered its stall probe: busy, not hung" in log, log[-3000:]
    assert not re.search(r"worker \S+ unhealthy", log)
