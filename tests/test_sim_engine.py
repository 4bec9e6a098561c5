"""The simulated scheduler in-process: batching limits, KV-bounded admission, aborts, timing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sglctl.sim.config import SimConfig
from sglctl.sim.engine import Engine, Phase, SimRequest
from sglctl.sim.output import plan_output
from sglctl.sim.timing import TimingModel


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


async def wait_until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.001)


async def wait_done(req: SimRequest) -> None:
    while not req.done:
        await req.changed.wait()
        req.changed.clear()


def fast(**overrides: object) -> SimConfig:
    return SimConfig(timing=TimingModel(speedup=200), **overrides)  # type: ignore[arg-type]


def test_max_running_requests_bounds_the_batch() -> None:
    async def body(engine: Engine) -> None:
        # Long enough (~0.65 s each) that the poll below sees reqs[0] running even on a loaded CPU
        reqs = [make_request(f"r{i}", [i + 1] * 8, 20_000) for i in range(3)]
        for req in reqs:
            engine.submit(req)
        await wait_until(lambda: reqs[0].phase is Phase.RUNNING)
        assert engine.num_running == 2 and engine.num_waiting == 1
        assert reqs[2].phase is Phase.WAITING
        await asyncio.gather(*(wait_done(r) for r in reqs))
        assert all(r.phase is Phase.FINISHED for r in reqs)
        # The third had to wait for a slot: it finished last and started after the others.
        assert reqs[2].first_token_time is not None and reqs[0].finish_time is not None
        assert reqs[2].first_token_time >= reqs[0].finish_time

    run_with_engine(fast(max_running_requests=2), body)


def test_admission_is_bounded_by_free_kv() -> None:
    async def body(engine: Engine) -> None:
        # Long outputs (~0.7 s) so the poll below sees big running even on a loaded CPU.
        big = make_request("big", [1] * 600, 20_000)  # needs 20600 of 21000 tokens
        other = make_request("other", [2] * 400, 100)  # needs 500: must wait
        engine.submit(big)
        engine.submit(other)
        await wait_until(lambda: big.phase is Phase.RUNNING)
        assert other.phase is Phase.WAITING
        assert engine.cache.used <= engine.cache.capacity
        await wait_done(other)
        assert big.finish_time is not None and other.first_token_time is not None
        assert other.first_token_time >= big.finish_time
        assert engine.cache.used <= engine.cache.capacity

    run_with_engine(fast(kv_cache_tokens=21_000), body)


def test_abort_frees_slot_and_kv() -> None:
    async def body(engine: Engine) -> None:
        hog = make_request("hog", [1] * 100, 50_000, stream=True)
        engine.submit(hog)
        await wait_until(lambda: hog.phase is Phase.RUNNING)
        assert engine.cache.reserved > 0 and engine.cache.protected_size > 0
        engine.abort(hog)
        assert hog.phase is Phase.ABORTED
        assert engine.num_running == 0 and engine.running_context == 0
        assert engine.cache.reserved == 0 and engine.cache.protected_size == 0
        nxt = make_request("next", [1] * 100, 3)
        engine.submit(nxt)
        await wait_done(nxt)
        assert nxt.phase is Phase.FINISHED

    run_with_engine(fast(max_running_requests=1), body)


def test_abort_while_waiting() -> None:
    async def body(engine: Engine) -> None:
        first = make_request("first", [1] * 10, 20_000)  # ~0.7 s: seen running under load
        queued = make_request("queued", [2] * 10, 5)
        engine.submit(first)
        engine.submit(queued)
        await wait_until(lambda: first.phase is Phase.RUNNING)
        engine.abort(queued)
        assert engine.num_waiting == 0 and queued.phase is Phase.ABORTED
        await wait_done(first)

    run_with_engine(fast(max_running_requests=1), body)


def test_flush_is_refused_while_busy() -> None:
    async def body(engine: Engine) -> None:
        req = make_request("busy", [1] * 10, 50_000)  # long: seen running under load
        engine.submit(req)
        await wait_until(lambda: req.phase is Phase.RUNNING)
        assert engine.flush_cache() is False
        engine.abort(req)
        assert engine.flush_cache() is True
        assert engine.cache.tree_size == 0

    run_with_engine(fast(), body)


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
