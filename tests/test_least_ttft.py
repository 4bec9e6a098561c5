"""The least_ttft cost model: queued prefill work, learned rates, ties and degradations."""

from __future__ import annotations

import random
import string

import pytest

from sglctl.router.config import RouterConfig
from sglctl.router.load_poll import WorkerLoad, parse_load
from sglctl.router.policies import LeastTTFTPolicy, make_policy
from sglctl.router.policies.base import RouteKey
from sglctl.router.policies.least_ttft import (
    OVERHEAD_TOKENS,
    PRIOR_RATE,
    UNCACHED_WEIGHT,
    _WorkerModel,
    prefill_work,
)
from sglctl.router.workers import Worker


def text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters) for _ in range(n))


def make(n: int) -> tuple[LeastTTFTPolicy, list[Worker]]:
    policy = LeastTTFTPolicy()
    workers = [Worker(f"http://127.0.0.{i + 2}:8000") for i in range(n)]
    for w in workers:
        policy.on_worker_added(w)
    return policy, workers


def queue(policy: LeastTTFTPolicy, worker: Worker, tokens: int, requests: int = 1) -> None:
    """``tokens`` of prefill queued at ``worker`` just now, with the policy's clock stopped
    there (the queue drains with time: a test comparing costs must not see it move)."""
    now = policy.clock()
    policy.clock = lambda: now
    model = policy.models[worker.url]
    model.queued_tokens, model.queued = tokens, requests
    model.left, model.left_at = float(tokens), now


def route(policy: LeastTTFTPolicy, workers: list[Worker], key: RouteKey) -> Worker:
    """What the proxy does: select, then begin the attempt (the ticket joins the queue)."""
    chosen = policy.select(workers, key)
    assert chosen is not None
    ticket = policy.begin_attempt(chosen)
    assert ticket is not None
    return chosen


def test_selectable_by_name() -> None:
    assert isinstance(make_policy("least_ttft", RouterConfig()), LeastTTFTPolicy)


def test_queued_prefill_work_spreads_new_prompts() -> None:
    policy, workers = make(3)
    picks = [route(policy, workers, RouteKey(text=text(4000, i))) for i in range(3)]
    assert len({w.url for w in picks}) == 3  # each pick queues work there: the next goes on
    model = policy.models[picks[0].url]
    assert model.queued == 1
    # 4000 chars / 4 per token, plus attention's share of a 1000-token prefill
    assert model.queued_tokens == round(prefill_work(1000, 1000)) + OVERHEAD_TOKENS


def test_cached_prefix_wins_over_equal_queue() -> None:
    policy, workers = make(3)
    prompt = text(8000, 1)
    first = policy.select(workers, RouteKey(text=prompt))
    assert first is not None  # no attempt begun: no queue anywhere, only the tree
    again = policy.select(workers, RouteKey(text=prompt + " and more"))
    assert again is first
    assert policy.last_decision == "cache_hit"


def test_a_deep_queue_outweighs_a_short_match() -> None:
    policy, workers = make(2)
    shared = text(256, 2)
    first = policy.select(workers, RouteKey(text=shared))
    assert first is not None
    queue(policy, first, 50_000)  # a long prefill queued there
    other = policy.select(workers, RouteKey(text=shared + text(2000, 3)))
    assert other is not None and other is not first


def test_ties_go_to_the_longer_match() -> None:
    policy, workers = make(2)
    shared = text(640, 4)  # 10 blocks = 160 tokens
    first = policy.select(workers, RouteKey(text=shared))
    assert first is not None
    second = next(w for w in workers if w is not first)
    # Same cost: the matched worker has exactly the (weighted) matched tokens more queued.
    queue(policy, first, int(UNCACHED_WEIGHT * 160))
    prompt = shared + text(640, 5)
    assert policy.predict(first, 160) == policy.predict(second, 320)
    assert policy.select(workers, RouteKey(text=prompt)) is first


def test_learned_rate_moves_work_to_the_faster_worker() -> None:
    policy, workers = make(2)
    fast, slow = workers
    for _ in range(20):
        policy.models[fast.url].learn(40_000, 1.0)
        policy.models[slow.url].learn(5_000, 1.0)
    assert policy.models[fast.url].rate == pytest.approx(40_000, rel=0.15)
    assert policy.models[slow.url].rate == pytest.approx(5_000, rel=0.15)
    # Equal queues of 20k tokens: 0.5 s at the fast one, 4 s at the slow one.
    for w in workers:
        queue(policy, w, 20_000, 10)
    assert policy.select(workers, RouteKey(text=text(400, 6))) is fast


def test_prior_until_enough_samples() -> None:
    model = _WorkerModel()
    assert model.rate == PRIOR_RATE
    model.learn(10_000, 1.0)  # the first sample weighs as much as the prior
    assert model.rate == pytest.approx((PRIOR_RATE + 10_000) / 2)
    model.learn(10_000, 0.0)  # a zero duration teaches nothing
    assert model.samples == 1


def test_streamed_first_byte_teaches_and_dequeues() -> None:
    policy, workers = make(1)
    chosen = policy.select(workers, RouteKey(text=text(4000, 7)))
    assert chosen is not None
    ticket = policy.begin_attempt(chosen)
    assert ticket is not None
    model = policy.models[chosen.url]
    assert model.queued == 1
    ticket.first_byte(True)
    assert model.queued == 0 and model.queued_tokens == 0
    assert model.samples == 1 and model.rate != PRIOR_RATE
    ticket.done(True, b"")
    ticket.done(True, b"")  # idempotent
    assert model.queued == 0


def test_a_short_uncached_prompt_does_not_teach() -> None:
    policy, workers = make(1)
    chosen = route(policy, workers, RouteKey(text=text(400, 9)))  # 100 tokens
    (ticket,) = [t for _, _, t in policy.models[chosen.url].expiry]
    ticket.first_byte(True)
    assert policy.models[chosen.url].samples == 0


def test_whole_answer_does_not_teach_but_dequeues() -> None:
    policy, workers = make(1)
    chosen = route(policy, workers, RouteKey(text=text(4000, 8)))
    (ticket,) = [t for _, _, t in policy.models[chosen.url].expiry]
    ticket.first_byte(False)
    assert policy.models[chosen.url].samples == 0
    assert policy.models[chosen.url].queued == 0


def test_queued_non_streamed_work_expires_at_its_predicted_prefill() -> None:
    policy, workers = make(1)
    chosen = route(policy, workers, RouteKey(text=text(4000, 9)))
    model = policy.models[chosen.url]
    expires = model.expiry[0][0]
    model.expire(expires - 0.001)
    assert model.queued == 1
    model.expire(expires)
    assert model.queued == 0


def test_no_text_goes_to_the_least_loaded() -> None:
    policy, workers = make(3)
    workers[0].in_flight = 3
    workers[1].in_flight = 1
    workers[2].in_flight = 2
    assert policy.select(workers, RouteKey()) is workers[1]
    assert policy.last_decision == "no_text"
    assert policy.begin_attempt(workers[1]) is not None  # queue accounting still works


def test_one_worker_takes_everything() -> None:
    policy, workers = make(1)
    for i in range(5):
        assert route(policy, workers, RouteKey(text=text(100, i))) is workers[0]
    assert policy.last_decision == "single_worker"
    assert policy.select(workers, RouteKey()) is workers[0]


def test_all_equal_spreads_and_no_workers_is_none() -> None:
    policy, workers = make(4)
    # Equal workers, different short prompts and no answers yet: each pick queues work
    # where it went, so the next one goes elsewhere.
    picks = [route(policy, workers, RouteKey(text=text(64, i))) for i in range(4)]
    assert len({w.url for w in picks}) == 4
    assert policy.select([], RouteKey(text="x")) is None


def test_a_long_match_is_followed_until_its_queue_is_far_worse() -> None:
    policy, workers = make(4)
    # One prompt over and over, no answers yet: it stays with the worker that holds it (the
    # conversation's later turns hit only there) while that worker's predicted time is within
    # FOLLOW_COST_FACTOR x the best plus FOLLOW_SLACK_SECS, then the copies spread.
    key = RouteKey(text=text(4000, 7))
    picks = [route(policy, workers, key) for _ in range(80)]
    owner = picks[0]
    first_elsewhere = next(i for i, w in enumerate(picks) if w is not owner)
    # Held well past the point where a copy elsewhere would be predicted sooner (one copy's
    # queued work is a fraction of the prompt's prefill), then spread.
    assert first_elsewhere >= 10
    assert len({w.url for w in picks}) > 1
    owner_model = policy.models[owner.url]
    others = [policy.models[w.url] for w in workers if w is not owner]
    assert owner_model.queued >= max(m.queued for m in others)


def test_a_short_match_does_not_hold_a_request() -> None:
    policy, workers = make(2)
    shared = text(1000, 1)
    first = route(policy, workers, RouteKey(text=shared + text(3000, 2)))
    # A quarter of the prompt cached there, the other worker idle: the cost model decides.
    second = route(policy, workers, RouteKey(text=shared + text(3000, 3)))
    assert second is not first


def test_begin_attempt_for_another_worker_gives_no_ticket() -> None:
    policy, workers = make(2)
    chosen = policy.select(workers, RouteKey(text=text(100, 1)))
    other = next(w for w in workers if w is not chosen)
    assert policy.begin_attempt(other) is None  # the breaker refused the pick; reselected
    assert policy.begin_attempt(other) is None


def test_reported_load_counts_requests_from_elsewhere() -> None:
    policy, workers = make(2)
    busy, idle = workers
    import time

    now = time.monotonic()
    policy.worker_loads = {
        busy.url: WorkerLoad(num_reqs=40, num_waiting_reqs=20, num_tokens=0, at=now),
        idle.url: WorkerLoad(num_reqs=0, num_waiting_reqs=0, num_tokens=0, at=now),
    }
    assert policy.select(workers, RouteKey(text=text(400, 2))) is idle
    # A stale report is ignored: the router's own counts (equal) decide, by match then load.
    policy.worker_loads = {busy.url: WorkerLoad(40, 20, 0, now - 60)}
    assert policy.predict(busy, 100) == policy.predict(idle, 100)


def test_parse_load() -> None:
    body = [
        {"dp_rank": 0, "num_reqs": 3, "num_waiting_reqs": 1, "num_tokens": 100},
        {"dp_rank": 1, "num_reqs": 2, "num_waiting_reqs": 0, "num_tokens": 50},
    ]
    assert parse_load(body, 1.0) == WorkerLoad(5, 1, 150, 1.0)
    assert parse_load({"num_reqs": 1}, 2.0) == WorkerLoad(1, 0, 0, 2.0)
    assert parse_load(["nope"], 0.0) is None
    assert parse_load([{"num_reqs": "3"}], 0.0) is None


# -- decode pressure by context --------------------------------------------------------------


def decoding(policy: LeastTTFTPolicy, worker: Worker, prompt: str) -> None:
    """Route ``prompt`` to ``worker`` alone and stream its first chunk: it is decoding there."""
    chosen = policy.select([worker], RouteKey(text=prompt))
    assert chosen is worker
    ticket = policy.begin_attempt(worker)
    assert ticket is not None
    ticket.first_byte(streamed=True)
    model = policy.models[worker.url]
    model.rate, model.samples = PRIOR_RATE, 0  # a first byte in microseconds taught a rate


def test_long_decodes_make_a_worker_look_busier_than_short_ones() -> None:
    policy, workers = make(2)
    long_ctx, short_ctx = workers
    for i in range(4):  # the same number of running requests on each ...
        decoding(policy, long_ctx, text(40_000, 100 + i))  # ... 10k-token conversations
        decoding(policy, short_ctx, text(400, 200 + i))  # ... 100-token ones
    assert policy.models[long_ctx.url].running == policy.models[short_ctx.url].running == 4
    assert policy.models[long_ctx.url].running_context == 4 * 10_000
    assert policy.predict(long_ctx, 100) > policy.predict(short_ctx, 100)
    assert policy.select(workers, RouteKey(text=text(2000, 7))) is short_ctx


def test_decode_pressure_ends_with_the_answer() -> None:
    policy, workers = make(1)
    worker = workers[0]
    chosen = policy.select(workers, RouteKey(text=text(8000, 1)))
    assert chosen is worker
    ticket = policy.begin_attempt(worker)
    assert ticket is not None
    idle = policy.models[worker.url].decode_pressure()
    ticket.first_byte(streamed=True)
    model = policy.models[worker.url]
    assert (model.running, model.running_context) == (1, 2000)
    assert model.decode_pressure() > idle
    ticket.done(True, b"")
    assert (model.running, model.running_context, model.queued) == (0, 0, 0)
    assert model.decode_pressure() == idle == 0


def test_a_non_streamed_request_decodes_after_its_predicted_prefill() -> None:
    policy, workers = make(1)
    worker = workers[0]
    policy.select(workers, RouteKey(text=text(4000, 3)))
    ticket = policy.begin_attempt(worker)
    assert ticket is not None
    model = policy.models[worker.url]
    assert (model.queued, model.running) == (1, 0)
    model.expire(float("inf"))  # its predicted prefill time has passed, no byte yet
    assert (model.queued, model.running, model.running_context) == (0, 1, 1000)
    ticket.done(True, b"")
    assert (model.queued, model.running, model.running_context) == (0, 0, 0)


def test_reported_running_requests_count_at_the_mean_known_context() -> None:
    model = _WorkerModel()
    assert model.decode_pressure(reported_running=3) == 3 * 32  # nothing known: per sequence
    model.running, model.running_context = 2, 8000
    base = model.decode_pressure()
    assert model.decode_pressure(reported_running=1) == base  # fewer reported: ours count
    assert model.decode_pressure(reported_running=4) == pytest.approx(2 * base)


def test_ties_on_decode_pressure_go_to_the_longer_match() -> None:
    policy, workers = make(2)
    shared = text(640, 4)  # 10 blocks = 160 tokens
    first = policy.select(workers, RouteKey(text=shared))
    assert first is not None
    second = next(w for w in workers if w is not first)
    # The matched worker's extra decode pressure equals the weighted matched tokens.
    model = policy.models[first.url]
    model.running, model.running_context = 1, int((UNCACHED_WEIGHT * 160 - 32) * 16)
    assert policy.predict(first, 160) == pytest.approx(policy.predict(second, 320))
    assert policy.select(workers, RouteKey(text=shared + text(640, 5))) is first


def test_decode_pressure_degrades_gracefully() -> None:
    policy, workers = make(3)
    # All equal, nothing known: the same cost everywhere, picks spread by the queues.
    picks = {route(policy, workers, RouteKey(text=text(4000, 30 + i))).url for i in range(3)}
    assert len(picks) == 3
    # No text: no context, no crash; decoding requests without text weigh per sequence only.
    chosen = policy.select(workers, RouteKey())
    assert chosen is not None
    ticket = policy.begin_attempt(chosen)
    assert ticket is not None
    ticket.first_byte(streamed=True)
    assert policy.models[chosen.url].running_context == 0
    # One worker: it takes everything whatever its decode pressure.
    single = workers[:1]
    for i in range(3):
        decoding(policy, single[0], text(4000, 50 + i))
    assert policy.select(single, RouteKey(text=text(100, 9))) is single[0]


def test_prefill_work_counts_attention_pairs() -> None:
    # Linear in new tokens plus PAIR_WEIGHT per (query, key) pair: a long uncached prompt
    # weighs more than its tokens, a cached prefix makes the new tokens dearer.
    assert prefill_work(0, 0) == 0
    assert prefill_work(127_000, 127_000) > 2.5 * 127_000
    assert prefill_work(1000, 9000) > prefill_work(1000, 1000) > 1000


class Clock:
    """A clock the test moves (the policy's ``clock`` seam)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_worker_not_timed_yet_is_predicted_at_the_fleets_rate() -> None:
    policy, (timed, idle) = make(2)
    for _ in range(30):  # answers from one worker only: it prefills 200k tokens/s
        policy.learn(policy.models[timed.url], 200_000, 1.0)
    assert policy.rate(policy.models[idle.url]) == pytest.approx(200_000, rel=0.05)
    # A short queue at the timed worker; the idle one, never timed, is as fast: it wins.
    # (At PRIOR_RATE it looked 10x slower and lost to the queue: 2,300 tokens / 20k/s =
    # 0.115 s against (10,000 + 2,300) / 200k/s = 0.06 s.)
    queue(policy, timed, 10_000)
    assert policy.select([timed, idle], RouteKey(text=text(4000, 11))) is idle
    # Its first own sample starts from the fleet's rate, not the prior.
    policy.learn(policy.models[idle.url], 100_000, 1.0)
    assert policy.models[idle.url].rate == pytest.approx((200_000 + 100_000) / 2, rel=0.05)


def test_the_queue_drains_at_the_rate_from_dispatch() -> None:
    policy, (a, b) = make(2)
    clock = policy.clock = Clock()
    rate = policy.rate(policy.models[a.url])
    route(policy, [a], RouteKey(text=text(200_000, 12)))  # a long prompt: chunked prefill
    work = policy.models[a.url].queued_tokens
    assert policy.backlog(a, policy.models[a.url], clock.now) == pytest.approx(work)
    clock.now += 0.75 * work / rate  # three quarters of it computed by now, no first byte yet
    assert policy.backlog(a, policy.models[a.url], clock.now) == pytest.approx(work / 4)
    # A shorter prompt sent to b just now is more work ahead than a's remaining quarter:
    # the next request goes to a (counting a's prompt whole until its first byte sent it to b).
    route(policy, [b], RouteKey(text=text(4 * work // 3, 13)))
    assert policy.select([a, b], RouteKey(text=text(400, 14))) is a
    clock.now += 0.5 * work / rate  # past its predicted end: nothing left, though queued
    assert policy.backlog(a, policy.models[a.url], clock.now) == 0
    assert policy.models[a.url].queued == 1


def test_a_first_byte_says_the_work_sent_before_it_is_done() -> None:
    policy, workers = make(1)
    policy.clock = Clock()  # stopped: no drain, only the first byte moves the queue
    route(policy, workers, RouteKey(text=text(40_000, 15)))
    route(policy, workers, RouteKey(text=text(8000, 16)))
    model = policy.models[workers[0].url]
    first, second = sorted((t for _, _, t in model.expiry), key=lambda t: -t.tokens)
    assert model.ahead(policy.clock(), model.rate) == first.tokens + second.tokens
    first.first_byte(True)
    assert model.ahead(policy.clock(), model.rate) == second.tokens


def test_a_rate_is_learned_from_the_undrained_work_ahead() -> None:
    policy, workers = make(1)
    clock = policy.clock = Clock()
    route(policy, workers, RouteKey(text=text(40_000, 17)))
    model = policy.models[workers[0].url]
    (big,) = [t for _, _, t in model.expiry]
    clock.now += 0.5 * big.tokens / model.rate  # half of it done when the next one is sent
    route(policy, workers, RouteKey(text=text(8000, 18)))
    small = next(t for _, _, t in model.expiry if t is not big)
    assert small.work == pytest.approx(big.tokens / 2 + small.tokens)


def test_a_workers_rate_leans_on_the_fleets() -> None:
    policy, (a, b) = make(2)
    for _ in range(40):  # alike GPUs, timed apart: b's answers had more unseen waits in them
        policy.learn(policy.models[a.url], 150_000, 1.0)
        policy.learn(policy.models[b.url], 100_000, 1.0)
    fleet = policy.fleet.rate
    assert fleet == pytest.approx(125_000, rel=0.05)
    # One window of its own samples against one of the fleet's: halfway, not its own 100k.
    assert policy.rate(policy.models[b.url]) == pytest.approx((100_000 + fleet) / 2, rel=0.02)
    # So an idle b beats a with a queue of a third of the prompt's work (at b's own rate,
    # 1.5x slower than a, it lost).
    prompt = text(16_000, 19)  # 4,000 tokens
    queue(policy, a, 3_000)
    assert policy.select([a, b], RouteKey(text=prompt)) is b


def test_a_long_miss_goes_where_fewer_answers_would_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    # Worker 0 has 40 answers decoding (short prompts: little decode pressure) and no queue;
    # worker 1 has none decoding and 3,000 tokens queued. A 25k-token miss stalls every
    # answer decoding where it is prefilled (prefill has priority), so it goes to worker 1;
    # priced for its own first token alone (STALL_WEIGHT 0) it went to the empty queue.
    import sglctl.router.policies.least_ttft as least_ttft

    default = least_ttft.STALL_WEIGHT
    assert default > 0

    def pick(stall: float) -> int:
        monkeypatch.setattr(least_ttft, "STALL_WEIGHT", stall)
        policy, workers = make(2)
        busy = policy.models[workers[0].url]
        busy.running, busy.running_context = 40, 40 * 16
        queue(policy, workers[1], 3_000)
        chosen = policy.select(workers, RouteKey(text=text(100_000, 3)))
        assert chosen is not None
        return workers.index(chosen)

    assert pick(0.0) == 0
    assert pick(default) == 1
    # A short request (little prefill to stall anyone with) still takes the empty queue.
    monkeypatch.setattr(least_ttft, "STALL_WEIGHT", default)
    policy, workers = make(2)
    busy = policy.models[workers[0].url]
    busy.running, busy.running_context = 40, 40 * 16
    queue(policy, workers[1], 3_000)
    assert policy.select(workers, RouteKey(text=text(400, 4))) is workers[0]
