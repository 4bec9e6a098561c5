"""The simulated scheduler in-process: batching limits, KV-bounded admission, aborts, timing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sglctl.sim.config import SimConfig
from sglctl.sim.engine import Engine, Phase, SimRequest
from sglctl.sim.output import plan_output
from sglctl.sim.timing import TimingModel
from tests.support import async_wait_until


def make_request(rid: str, prompt: list[int], max_new: int, stream: bool = False) -> SimRequest:
    plan = plan_output(prompt, seed=0, max_new_tokens=max_new)
    return SimRequest(rid, prompt, plan, stream)


def run_with_engine(config: SimConfig, body: Callable[[Engine], Awaitable[None]]) -> None:
    async def main() -> None:
        engine = Engine(config)
        task = asyncio.create_task(engine.run())
        try:
            await asyncio.wait_for(body(engine), timeout=20)
        finally:
            engine.close()
            task.cancel()

    asyncio.run(main())


async def wait_done(req: SimRequest) -> None:
    while not req.done:
        await req.changed.wait()
        req.changed.clear()


def fast(**overrides: object) -> SimConfig:
    return SimConfig(timing=TimingModel(speedup=200), **overrides)  # type: ignore[arg-type]


def real_time(**overrides: object) -> SimConfig:
    """H100 timing without speedup: a 50k-token output runs for minutes of wall time, so a
    poll for "it is running" cannot miss the window however loaded the machine is (the tests
    using it abort the request instead of waiting for it)."""
    return SimConfig(timing=TimingModel(speedup=1), **overrides)  # type: ignore[arg-type]


def snapshot_at_first_token(engine: Engine, what: Callable[[SimRequest], object]) -> list[object]:
    """Record ``what(req)`` inside the engine the moment each request's first token is out.

    The engine completes every batch that ended while the event loop was descheduled in one
    go, so on a loaded machine a request can go PREFILL -> RUNNING -> FINISHED between two
    polls of a test. Observing from the engine's own hook sees each transition, always.
    """
    seen: list[object] = []
    engine.on_first_token = lambda req: seen.append(what(req))
    return seen


def test_max_running_requests_bounds_the_batch() -> None:
    async def body(engine: Engine) -> None:
        reqs = [make_request(f"r{i}", [i + 1] * 8, 2_000) for i in range(3)]
        seen = snapshot_at_first_token(
            engine, lambda req: (req.rid, engine.num_running, engine.num_waiting, reqs[2].phase)
        )
        for req in reqs:
            engine.submit(req)
        await asyncio.gather(*(wait_done(r) for r in reqs))
        # When the first two started, two ran and the third waited for a slot.
        assert seen[0] == ("r0", 2, 1, Phase.WAITING)
        assert seen[1] == ("r1", 2, 1, Phase.WAITING)
        rid, running, waiting, _ = seen[2]  # type: ignore[misc]
        assert (rid, waiting) == ("r2", 0) and 1 <= running <= 2  # r2 took a freed slot
        assert all(r.phase is Phase.FINISHED for r in reqs)
        # The third had to wait for a slot: it finished last and started after the others.
        assert reqs[2].first_token_time is not None and reqs[0].finish_time is not None
        assert reqs[2].first_token_time >= reqs[0].finish_time

    run_with_engine(fast(max_running_requests=2), body)


def test_admission_is_bounded_by_free_kv() -> None:
    async def body(engine: Engine) -> None:
        big = make_request("big", [1] * 600, 2_000)  # needs 2600 of 3000 tokens
        other = make_request("other", [2] * 400, 100)  # needs 500: must wait
        seen = snapshot_at_first_token(
            engine,
            lambda req: (req.rid, other.phase, big.phase, engine.cache.used),
        )
        engine.submit(big)
        engine.submit(other)
        await wait_done(other)
        # While big held its KV, other waited although a batch slot was free.
        assert seen[0] == ("big", Phase.WAITING, Phase.PREFILL, seen[0][3])
        assert seen[1][:3] == ("other", Phase.PREFILL, Phase.FINISHED)
        assert all(used <= engine.cache.capacity for *_, used in seen)  # type: ignore[operator]
        assert big.finish_time is not None and other.first_token_time is not None
        assert other.first_token_time >= big.finish_time
        assert engine.cache.used <= engine.cache.capacity

    run_with_engine(fast(kv_cache_tokens=3_000), body)


def test_abort_frees_slot_and_kv() -> None:
    async def body(engine: Engine) -> None:
        hog = make_request("hog", [1] * 100, 50_000, stream=True)  # minutes at speedup 1
        engine.submit(hog)
        await async_wait_until(lambda: hog.phase is Phase.RUNNING, what="hog running")
        assert engine.cache.reserved > 0 and engine.cache.protected_size > 0
        engine.abort(hog)
        assert hog.phase is Phase.ABORTED
        assert engine.num_running == 0 and engine.running_context == 0
        assert engine.cache.reserved == 0 and engine.cache.protected_size == 0
        nxt = make_request("next", [1] * 100, 3)
        engine.submit(nxt)
        await wait_done(nxt)
        assert nxt.phase is Phase.FINISHED

    run_with_engine(real_time(max_running_requests=1), body)


def test_abort_while_waiting() -> None:
    async def body(engine: Engine) -> None:
        first = make_request("first", [1] * 10, 50_000)  # minutes at speedup 1: seen running
        queued = make_request("queued", [2] * 10, 5)
        engine.submit(first)
        engine.submit(queued)
        await async_wait_until(lambda: first.phase is Phase.RUNNING, what="first running")
        engine.abort(queued)
        assert engine.num_waiting == 0 and queued.phase is Phase.ABORTED
        assert first.phase is Phase.RUNNING  # aborting a queued request leaves others alone
        engine.abort(first)
        assert engine.num_running == 0

    run_with_engine(real_time(max_running_requests=1), body)


def test_flush_is_refused_while_busy() -> None:
    async def body(engine: Engine) -> None:
        req = make_request("busy", [1] * 10, 50_000)  # minutes at speedup 1: seen running
        engine.submit(req)
        await async_wait_until(lambda: req.phase is Phase.RUNNING, what="busy running")
        assert engine.flush_cache() is False
        engine.abort(req)
        assert engine.flush_cache() is True
        assert engine.cache.tree_size == 0

    run_with_engine(real_time(), body)


def test_long_prompt_is_chunked_and_cached() -> None:
    async def body(engine: Engine) -> None:
        prompt = list(range(1, 2501))
        first = make_request("a", prompt, 2)
        engine.submit(first)
        await wait_done(first)
        assert first.cached_tokens == 0 and first.final_output_len == 2
        again = make_request("b", prompt, 2)
        engine.submit(again)
        await wait_done(again)
        assert again.cached_tokens == 2499

    run_with_engine(fast(chunked_prefill_size=512), body)


def test_finished_output_is_cached_for_the_next_turn() -> None:
    async def body(engine: Engine) -> None:
        prompt = [7] * 50
        turn1 = make_request("t1", prompt, 10)
        engine.submit(turn1)
        await wait_done(turn1)
        follow_up = prompt + turn1.plan.ids(10) + [9] * 5
        turn2 = make_request("t2", follow_up, 1)
        engine.submit(turn2)
        await wait_done(turn2)
        assert turn2.cached_tokens == 50 + 9  # prompt + all output tokens but the last

    run_with_engine(fast(), body)


def test_timing_model_shapes() -> None:
    model = TimingModel()
    # Decode steps grow with the batch and with the context held.
    assert model.decode_seconds(64, 64_000) > model.decode_seconds(8, 8_000)
    assert model.decode_seconds(8, 8_000) > model.decode_seconds(1, 1_000)
    # Prefill grows with new tokens; a cached prefix makes it much cheaper.
    cold = model.prefill_seconds([(0, 8000)])
    warm = model.prefill_seconds([(7999, 1)])
    assert cold > 10 * warm
    assert TimingModel(speedup=10).prefill_seconds([(0, 8000)]) * 10 == cold
