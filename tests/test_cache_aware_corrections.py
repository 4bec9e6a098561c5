"""cache_aware with the workers' corrections (off by default): the tree trimmed to the
reported ``cached_tokens``, and load raised to the workers' own ``/get_load`` counts. (The
integration test with an evicting sim worker is shared with least_ttft, in
``test_least_ttft_integration.py``.)"""

from __future__ import annotations

import random
import string
import time
from typing import Any

from sglctl.router.flags import parse_args
from sglctl.router.load_poll import STALE_SECS, WorkerLoad, current_load, effective_load
from sglctl.router.policies import CacheAwarePolicy, make_policy
from sglctl.router.policies.base import RouteKey
from sglctl.router.workers import Worker

URL = "http://127.0.0.2:8000"


def text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters) for _ in range(n))


def make(n: int, **kwargs: Any) -> tuple[CacheAwarePolicy, list[Worker]]:
    policy = CacheAwarePolicy(**kwargs)
    workers = [Worker(f"http://127.0.0.{i + 2}:8000") for i in range(n)]
    for w in workers:
        policy.on_worker_added(w)
    return policy, workers


def answer(
    policy: CacheAwarePolicy, workers: list[Worker], prompt: str, tail: bytes, ok: bool = True
) -> Worker:
    """What the proxy does for one streamed request: select, attempt, first byte, end."""
    chosen = policy.select(workers, RouteKey(text=prompt))
    assert chosen is not None
    ticket = policy.begin_attempt(chosen)
    assert ticket is not None
    if ok:
        ticket.first_byte(streamed=True)
    ticket.done(ok, tail)
    return chosen


def cached(tokens: int) -> bytes:
    return b'{"meta_info": {"prompt_tokens": 500, "cached_tokens": %d}}' % tokens


def test_off_by_default() -> None:
    policy = make_policy("cache_aware", parse_args(["--worker-urls", URL]))
    assert isinstance(policy, CacheAwarePolicy)
    assert policy.corrector is None and not policy.uses_worker_loads
    workers = [Worker(URL)]
    assert policy.select(workers, RouteKey(text=text(800, 1))) is workers[0]
    assert policy.begin_attempt(workers[0]) is None  # no ticket: nothing on the hot path
    assert policy.apply_corrections() == 0


def test_flags_turn_them_on() -> None:
    config = parse_args(
        ["--worker-urls", URL, "--cached-tokens-correction", "--worker-load-correction"]
    )
    policy = make_policy("cache_aware", config)
    assert isinstance(policy, CacheAwarePolicy)
    assert policy.corrector is not None and policy.uses_worker_loads


def test_a_short_report_forgets_what_the_worker_used_less_recently() -> None:
    policy, workers = make(1, trim_from_reports=True)
    worker = workers[0]
    a, b = text(1280, 1), text(1280, 2)  # 20 blocks each
    answer(policy, workers, b, cached(0))
    answer(policy, workers, a, cached(0))
    assert policy.tree.size(worker.url) == 2 * 1280
    # A again: the tree predicts 20 blocks, the worker reports nothing cached -> it evicted
    # A, and B (used before A) with it. A itself was just prefilled again: kept.
    answer(policy, workers, a, cached(0))
    assert policy.corrector is not None and policy.corrector.corrections == 1
    assert policy.tree.size(worker.url) == 2 * 1280  # applied in the background, not inline
    assert policy.apply_corrections() == 20
    assert policy.tree.size(worker.url) == 1280
    assert policy.tree.match_blocks(policy.prefixes(RouteKey(text=a)), worker.url) == 20


def test_a_full_report_changes_nothing() -> None:
    policy, workers = make(1, trim_from_reports=True)
    a, b = text(1280, 1), text(1280, 2)
    answer(policy, workers, b, cached(0))
    answer(policy, workers, a, cached(0))
    answer(policy, workers, a, cached(320))  # all 320 tokens (1280 chars) were cached
    answer(policy, workers, a, b"no figure in this tail")
    assert policy.apply_corrections() == 0
    assert policy.tree.size(workers[0].url) == 2 * 1280


def test_a_path_still_in_prefill_is_not_an_eviction() -> None:
    policy, workers = make(1, trim_from_reports=True)
    a, b = text(1280, 1), text(1280, 2)
    answer(policy, workers, b, cached(0))
    first = policy.select(workers, RouteKey(text=a))
    assert first is not None
    in_prefill = policy.begin_attempt(first)  # A's first request has no first byte yet
    assert in_prefill is not None
    answer(policy, workers, a, cached(0))  # the second one finds nothing: not held *yet*
    assert policy.apply_corrections() == 0
    assert policy.tree.size(workers[0].url) == 2 * 1280


def test_a_failed_attempt_without_a_byte_is_trimmed_back() -> None:
    policy, workers = make(2, trim_from_reports=True)
    chosen = answer(policy, workers, text(1280, 3), b"", ok=False)
    assert policy.tree.size(chosen.url) == 0


def test_worker_load_corrects_the_imbalance_check() -> None:
    policy, workers = make(2, load_from_workers=True)
    busy, idle = workers
    prompt = text(2000, 4)
    assert policy.select([busy], RouteKey(text=prompt)) is busy  # busy's tree holds it
    now = time.monotonic()
    # Another router's 100 requests on busy: this router's counts (0, 0) do not show them.
    policy.worker_loads = {busy.url: WorkerLoad(100, 40, 0, now)}
    assert policy.select(workers, RouteKey(text=prompt)) is idle
    assert policy.last_decision == "balance_fallback"
    # A stale report is ignored: the cached prefix wins again.
    policy.worker_loads = {busy.url: WorkerLoad(100, 40, 0, now - 2 * STALE_SECS)}
    assert policy.select(workers, RouteKey(text=prompt)) is busy


def test_without_the_flag_worker_loads_are_ignored() -> None:
    policy, workers = make(2)
    busy, _ = workers
    prompt = text(2000, 4)
    policy.select([busy], RouteKey(text=prompt))
    policy.worker_loads = {busy.url: WorkerLoad(100, 40, 0, time.monotonic())}
    assert policy.select(workers, RouteKey(text=prompt)) is busy


def test_effective_load() -> None:
    now = 100.0
    assert effective_load(3, None, now) == 3
    assert effective_load(3, WorkerLoad(10, 2, 0, now - 1), now) == 10
    assert effective_load(30, WorkerLoad(10, 2, 0, now - 1), now) == 30  # ours are in theirs
    assert effective_load(3, WorkerLoad(10, 2, 0, now - STALE_SECS), now) == 3


def test_current_load_is_every_replicas_in_flight_raised_to_the_report_moved_on() -> None:
    """Router peers (``--router-peers``): this router's in flight plus what the others told
    of theirs, raised to the worker's report moved on by the change of both since -- so a
    request another replica sent *or finished* counts at once, not at the next poll."""
    now = 100.0
    # The worker held 10 at the report: 1 of ours, 7 of the peers', 2 from elsewhere.
    report = WorkerLoad(10, 0, 0, now - 0.2, own_in_flight=1, told=7)
    assert current_load(1, report, now, told=7) == 10  # nothing since the report
    assert current_load(3, report, now, told=7) == 12  # two of ours since
    assert current_load(1, report, now, told=10) == 13  # three more of the peers'
    assert current_load(1, report, now, told=4) == 7  # three of the peers' finished
    assert current_load(0, report, now, told=7) == 9  # one of ours finished
    # A report below what the replicas know (it lags them): what they know.
    assert current_load(1, WorkerLoad(3, 0, 0, now - 0.2, 1, 7), now, told=7) == 8
    assert current_load(2, None, now, told=5) == 7  # no report: own plus told
    assert current_load(2, WorkerLoad(99, 0, 0, now - STALE_SECS), now, told=5) == 7
