"""KV cache events, piece by piece: the wire format, the sim cache's events, the exact index.

The batch a test hand-builds here is the msgpack SGLang sends (msgspec ``array_like`` tagged
structs: ``[ts, [["BlockStored", hashes, parent, tokens, block_size, lora_id, medium], ...]]``,
``medium`` being what newer SGLang appends), so the router's decoder is checked against
SGLang's format, not only against the sim's encoder.
"""

from __future__ import annotations

import msgpack
import pytest

from sglctl import fourchar
from sglctl.router.kv_events import (
    BadBatch,
    apply_events,
    decode_batch,
    endpoints_from_server_info,
)
from sglctl.router.kv_index import KvIndex
from sglctl.router.policies.base import RouteKey
from sglctl.router.tokens import FourCharEncoder, load_encoder, route_tokens
from sglctl.sim.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEventsConfig,
    encode_batch,
)
from sglctl.sim.radix import RadixCache

W1, W2 = "http://w1:1", "http://w2:1"


def sglang_batch(events: list[list[object]]) -> bytes:
    """A batch as SGLang's msgspec encoder writes it (hand-built, not through sglctl code)."""
    return msgpack.packb([1764600000.25, events], use_bin_type=True)


def test_decode_a_batch_as_sglang_sends_it_and_apply_it() -> None:
    payload = sglang_batch(
        [
            ["BlockStored", [-111], None, [1, 2], 2, None, "GPU"],
            ["BlockStored", [222], -111, [3, 4], 2, None, "GPU"],
            ["BlockStored", [333], 222, [5, 6], 2, 7, "GPU"],  # a LoRA's KV: not the model's
            ["BlockRemoved", [222], "GPU"],
            ["SomethingNew", 1],
        ]
    )
    events = decode_batch(payload)
    assert [e[0] for e in events][:2] == ["BlockStored", "BlockStored"]
    index = KvIndex()
    index.add_worker(W1)
    assert apply_events(index, W1, events) == 3  # two stores and the remove
    assert index.match([1, 2, 3, 4, 5, 6]) == {W1: 2}


def test_sim_batches_are_sglang_batches() -> None:
    payload = encode_batch(
        5.0,
        [BlockStored([7, 8], None, [1, 2, 3, 4], 2, None), BlockRemoved([8]), AllBlocksCleared()],
    )
    assert msgpack.unpackb(payload) == [
        5.0,
        [
            ["BlockStored", [7, 8], None, [1, 2, 3, 4], 2, None],
            ["BlockRemoved", [8]],
            ["AllBlocksCleared"],
        ],
    ]
    assert decode_batch(payload)[2] == ["AllBlocksCleared"]


@pytest.mark.parametrize("payload", [b"\xc1", msgpack.packb({"a": 1}), msgpack.packb([1, [5]])])
def test_bad_batches_are_refused(payload: bytes) -> None:
    with pytest.raises(BadBatch):
        decode_batch(payload)


def test_index_store_remove_clear_match() -> None:
    index = KvIndex()
    index.add_worker(W1)
    index.add_worker(W2)
    index.stored(W1, [10, 11, 12], None, [1, 2, 3, 4, 5, 6], 2)
    index.stored(W2, [90], None, [1, 2], 2)  # other hashes, same tokens: the same block
    index.stored(W2, [91], 90, [3, 9], 2)
    assert index.match([1, 2, 3, 4, 5, 6, 7]) == {W1: 6, W2: 2}
    assert index.match([1, 2, 3, 9]) == {W1: 2, W2: 4}
    assert index.match([1, 2, 3, 4], [W2]) == {W2: 2}
    assert index.match([9, 9, 9, 9]) == {}
    assert index.match([1]) == {}  # no full block
    # A removed middle block cuts W1's chain there, though its child is still announced.
    index.removed(W1, [11])
    assert index.match([1, 2, 3, 4, 5, 6]) == {W1: 2, W2: 2}
    assert index.blocks(W1) == 2
    index.cleared(W1)
    assert index.match([1, 2, 3, 4]) == {W2: 2}
    assert index.blocks(W1) == 0
    index.drop_worker(W2)
    assert index.match([1, 2]) == {}
    assert W2 not in index


def test_index_ignores_blocks_it_cannot_chain() -> None:
    index = KvIndex()
    index.add_worker(W1)
    index.stored(W1, [5], 4, [3, 4], 2)  # parent 4 never announced (before this replica)
    index.stored(W1, [6], 5, [5, 6], 2)
    assert index.match([3, 4, 5, 6]) == {}
    index.removed(W1, [5, 6])  # removing them is harmless
    index.stored(W1, [1], None, [3, 4], 2)
    assert index.match([3, 4, 5, 6]) == {W1: 2}


def test_sim_cache_emits_pages_in_order_and_the_index_follows() -> None:
    cache = RadixCache(12, page_size=2, record_events=True)
    index = KvIndex()
    index.add_worker(W1)

    def sync() -> list[list[object]]:
        events = decode_batch(encode_batch(0.0, cache.take_events()))
        apply_events(index, W1, events)
        return events

    cache.insert([1, 2, 3, 4, 5])  # page-aligned: 4 tokens, 2 pages
    events = sync()
    assert [e[0] for e in events] == ["BlockStored", "BlockStored"]
    assert events[0][2] is None and events[1][2] == events[0][1][0]  # chained
    assert events[1][3] == [3, 4]
    cache.insert([1, 2, 7, 8])  # splits the first node after one page: no event for it
    assert [e[0] for e in sync()] == ["BlockStored"]
    assert index.match([1, 2, 3, 4]) == {W1: 4}
    assert index.match([1, 2, 7, 8]) == {W1: 4}
    cache.match_prefix([1, 2, 7, 8])  # the newer branch is used more recently
    cache.allocate(cache.capacity - cache.used)  # fill the pool...
    cache.release(cache.reserved)
    cache.allocate(cache.capacity - 4)  # ... then need the pages of one branch back
    removed = sync()
    assert [e[0] for e in removed] == ["BlockRemoved"]
    assert index.match([1, 2, 3, 4]) == {W1: 2}
    assert index.match([1, 2, 7, 8]) == {W1: 4}
    cache.release(cache.reserved)
    cache.reset()
    assert [e[0] for e in sync()] == ["AllBlocksCleared"]
    assert index.match([1, 2, 7, 8]) == {}


def test_sim_cache_without_events_records_nothing_and_pages_match_whole() -> None:
    cache = RadixCache(100, page_size=4)
    cache.insert([1, 2, 3, 4, 5, 6, 7])
    assert cache.tree_size == 4
    assert cache.match_prefix([1, 2, 3, 9]).length == 0
    assert cache.match_prefix([1, 2, 3, 4, 5]).length == 4
    assert cache.events == []


def test_kv_events_config_is_sglangs_json() -> None:
    config = KvEventsConfig.from_json(
        '{"publisher": "zmq", "endpoint": "tcp://*:6001", "replay_endpoint": "tcp://*:6002",'
        ' "topic": "kv", "hwm": 10, "enable_kv_cache_events": true}'
    )
    assert (config.endpoint, config.replay_endpoint, config.topic, config.hwm) == (
        "tcp://*:6001",
        "tcp://*:6002",
        "kv",
        10,
    )
    assert config.enabled
    assert not KvEventsConfig.from_json("{}").enabled
    for bad in ("nope", "[1]", '{"publisher": "kafka"}', '{"buffer_steps": 0}'):
        with pytest.raises(ValueError):
            KvEventsConfig.from_json(bad)


def test_endpoints_from_server_info() -> None:
    info = {"kv_events_config": '{"publisher":"zmq","endpoint":"tcp://*:6001","topic":"t"}'}
    found = endpoints_from_server_info("http://127.0.0.2:8000", info)
    assert found is not None
    assert (found.pub, found.replay, found.topic) == ("tcp://127.0.0.2:6001", None, "t")
    assert endpoints_from_server_info("http://h:1", {"kv_events_config": None}) is None
    assert endpoints_from_server_info("http://h:1", {}) is None


def test_route_tokens() -> None:
    enc = FourCharEncoder()
    assert list(route_tokens(RouteKey(text="abcdefgh"), enc) or []) == fourchar.encode("abcdefgh")
    assert route_tokens(RouteKey(input_ids=[5, 6]), enc) == [5, 6]
    assert route_tokens(RouteKey(text="hi", chat=True), enc) is None
    assert route_tokens(RouteKey(), enc) is None
    wide = route_tokens(RouteKey(text="日本語です"), enc)
    assert wide is not None and max(wide) < 1 << 63
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        load_encoder("/nonexistent/dir")


def test_router_flags() -> None:
    from sglctl.router.flags import parse_args

    config = parse_args(["--worker-urls", "http://w:1", "--kv-events", "--kv-events-port", "5557"])
    assert (config.kv_events, config.kv_events_port, config.tokenizer_path) == (True, 5557, None)
    assert parse_args(["--kv-events", "--tokenizer-path", "/t.json"]).unsupported == []
    refused = parse_args(["--tokenizer-path", "/t.json"]).unsupported
    assert [flag for flag, _ in refused] == ["--tokenizer-path"]
    for bad in (
        ["--kv-events", "--policy", "round_robin"],
        ["--kv-events-replay-port", "5558"],
    ):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_feed_sequence_numbers_duplicates_and_a_restarted_publisher() -> None:
    import asyncio

    from sglctl.router.kv_events import Endpoints, WorkerFeed

    index = KvIndex()
    index.add_worker(W1)
    feed = WorkerFeed(W1, index, Endpoints("tcp://127.0.0.1:1", None), ctx=None)

    def stored(h: int, parent: int | None, tokens: list[int]) -> bytes:
        return sglang_batch([["BlockStored", [h], parent, tokens, 2, None]])

    async def run() -> None:
        await feed._on_batch(0, stored(1, None, [1, 2]))
        await feed._on_batch(1, stored(2, 1, [3, 4]))
        await feed._on_batch(1, stored(9, 2, [5, 6]))  # a duplicate: ignored
        assert index.match([1, 2, 3, 4, 5, 6]) == {W1: 4}
        # The worker restarted: its sequence starts again, its cache is new.
        await feed._on_batch(0, stored(7, None, [8, 8]))
        assert index.match([1, 2, 3, 4]) == {}
        assert index.match([8, 8]) == {W1: 2}
        # A gap with no replay socket: applied anyway (and logged).
        await feed._on_batch(5, stored(8, 7, [9, 9]))
        assert index.match([8, 8, 9, 9]) == {W1: 4}
        assert feed.last == 5

    asyncio.run(run())
