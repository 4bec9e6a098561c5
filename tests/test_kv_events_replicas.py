"""Router replicas fed by the workers' KV cache events (issue 16), on real processes.

Sim workers publish their KV cache events (``--kv-events-config``, as SGLang does); routers
started with ``--kv-events`` subscribe to every worker. What is checked, from outside:

* a prefix one router placed is known to the other as soon as the worker stored it: the next
  turn, sent through the other router, lands on the same worker with its prompt cached;
* a worker that evicts (a tiny KV cache) or flushes is followed by every router's index;
* a router started after the traffic catches up from the workers' replay buffers;
* with a real tokenizer (a ``tokenizer.json`` the test builds) the router tokenizes as the
  worker does, and the match agrees.

Each router's view is read from its ``/stats`` ``kv_events`` (blocks and tokens per worker);
which worker served a request from the ``x-sglctl-worker`` header and the worker's own
``cached_tokens``. Run with ``FLAGS = ()`` (routers without events) every test fails.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from sglctl.net import find_free_port
from sglctl.sim.tokenizer import text_for_tokens
from sglctl.spawn import ManagedProcess
from tests.support import conversation, wait_until

FLAGS: tuple[str, ...] = ("--kv-events",)
PAGE = 16


def events_sim(procs: Any, *extra: str) -> ManagedProcess:
    pub, replay = find_free_port(), find_free_port()
    config = {
        "publisher": "zmq",
        "endpoint": f"tcp://*:{pub}",
        "replay_endpoint": f"tcp://*:{replay}",
        "topic": "kv",
    }
    return procs.sim_worker(  # type: ignore[no-any-return]
        "--speedup",
        "50",
        "--page-size",
        str(PAGE),
        "--kv-events-config",
        json.dumps(config),
        *extra,
    )


def stats(client: httpx.Client, router: ManagedProcess) -> dict[str, Any]:
    kv: dict[str, Any] = client.get(router.url + "/stats").json().get("kv_events", {})
    return kv


def events_router(
    procs: Any, client: httpx.Client, urls: Sequence[str], *extra: str
) -> ManagedProcess:
    """A router subscribed to every worker (returned once every feed is up)."""
    proc: ManagedProcess = procs.router(
        urls, *FLAGS, "--metrics-port", str(find_free_port()), *extra
    )

    def ready() -> bool:
        r = client.get(proc.url + "/readiness")
        if r.status_code != 200 or r.json().get("healthy_workers") != len(urls):
            return False
        if not FLAGS:
            return True
        feeds = stats(client, proc)
        return all(feeds.get(u, {}).get("connected") for u in urls)

    wait_until(ready, timeout=60, what=f"{proc.name} subscribed to all {len(urls)} workers")
    return proc


def generate(client: httpx.Client, url: str, text: str) -> tuple[str | None, int, int]:
    """Send ``text``; (the worker that served it, prompt tokens, cached tokens)."""
    r = client.post(
        url + "/generate", json={"text": text, "sampling_params": {"max_new_tokens": 1}}
    )
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    return r.headers.get("x-sglctl-worker"), int(meta["prompt_tokens"]), int(meta["cached_tokens"])


def wait_synced(
    client: httpx.Client, router: ManagedProcess, worker: str, at_least_blocks: int
) -> None:
    """Until ``router``'s index holds ``at_least_blocks`` of ``worker``'s blocks."""
    if not FLAGS:
        return
    wait_until(
        lambda: stats(client, router).get(worker, {}).get("blocks", 0) >= at_least_blocks,
        timeout=30,
        what=f"{router.name} indexing {at_least_blocks} blocks of {worker}",
    )


def test_a_prefix_placed_through_one_router_is_found_through_the_other(procs, client) -> None:
    sims = [events_sim(procs) for _ in range(3)]
    urls = [s.url for s in sims]
    a, b = events_router(procs, client, urls), events_router(procs, client, urls)
    # Different histories: without the shared view, the two would place by their own trees.
    generate(client, a.url, conversation(99, 1))
    for conv in range(100, 103):
        generate(client, b.url, conversation(conv, 1))
    placed = set()
    for conv in range(6):
        before = {u: stats(client, b).get(u, {}).get("blocks", 0) for u in urls}
        on_a, prompt, cached = generate(client, a.url, conversation(conv, 1))
        assert on_a is not None
        placed.add(on_a)
        wait_synced(client, b, on_a, before[on_a] + (prompt - cached) // PAGE - 1)
        on_b, prompt2, cached2 = generate(client, b.url, conversation(conv, 2))
        assert on_b == on_a, f"conversation {conv}: a placed it on {on_a}, b sent it to {on_b}"
        assert cached2 >= prompt - PAGE, f"conversation {conv}: {cached2}/{prompt2} cached"
    assert len(placed) >= 2, "new conversations are spread (the greedy placement stays)"


def test_every_router_follows_evictions_and_flushes(procs, client) -> None:
    capacity = 2048
    sim = events_sim(procs, "--kv-cache-tokens", str(capacity))
    a, b = (events_router(procs, client, [sim.url]) for _ in range(2))
    for i in range(5):  # 5 x 600 tokens through a pool of 2,048: the oldest are evicted
        generate(client, a.url, text_for_tokens(600, f"evict {i}"))
    _, prompt, _ = generate(client, a.url, text_for_tokens(600, "evict last"))

    def agree() -> bool:
        views = [stats(client, r).get(sim.url, {}) for r in (a, b)]
        tokens = [v.get("cached_tokens", -1) for v in views]
        return tokens[0] == tokens[1] and prompt - PAGE <= tokens[0] <= capacity

    wait_until(agree, timeout=30, what="both routers' index of the worker within its capacity")
    r = client.post(sim.url + "/flush_cache")
    assert r.status_code == 200, r.text
    wait_until(
        lambda: all(stats(client, r).get(sim.url, {}).get("cached_tokens") == 0 for r in (a, b)),
        timeout=30,
        what="both routers dropping the flushed worker's blocks",
    )


def test_a_router_started_late_catches_up_by_replay(procs, client) -> None:
    sims = [events_sim(procs) for _ in range(2)]
    urls = [s.url for s in sims]
    held: dict[int, tuple[str, int]] = {}
    for conv in range(4):  # straight to the workers: no router has seen any of it
        sim = sims[(conv // 2 + 1) % 2]  # 1, 1, 0, 0: not the order a router would pick
        _, prompt, _ = generate(client, sim.url, conversation(conv, 1))
        held[conv] = (sim.url, prompt)
    late = events_router(procs, client, urls)
    for url in urls:
        wait_synced(client, late, url, 2 * (400 // PAGE))
    for conv, (url, prompt) in held.items():
        on, _, cached = generate(client, late.url, conversation(conv, 2))
        assert on == url, f"conversation {conv} is on {url}, the late router sent it to {on}"
        assert cached >= prompt - PAGE


def build_tokenizer(path: Path) -> Path:
    """A word-level tokenizer.json: one id per word of the test's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(500)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    out = path / "tokenizer.json"
    tokenizer.save(str(out))
    return out


def words(seed: int, n: int) -> str:
    return " ".join(f"w{(seed * 7919 + i * 31) % 500}" for i in range(n)) + " "


def test_the_router_tokenizes_with_the_workers_tokenizer(procs, client, tmp_path) -> None:
    from sglctl.router.tokens import load_encoder
    from sglctl.sim import tokenizer as sim_tokenizer

    path = build_tokenizer(tmp_path)
    text = words(1, 50)
    try:
        sim_tokenizer.use_tokenizer_file(path)
        sim_ids = sim_tokenizer.encode(text)
    finally:
        sim_tokenizer.use_tokenizer_file(None)
    assert load_encoder(str(tmp_path)).encode(text) == sim_ids
    assert len(sim_ids) == 50  # not the 4-character rule's count

    sims = [events_sim(procs, "--tokenizer-path", str(path)) for _ in range(2)]
    urls = [s.url for s in sims]
    tok = ("--tokenizer-path", str(path)) if FLAGS else ()
    a, b = (events_router(procs, client, urls, *tok) for _ in range(2))
    generate(client, a.url, words(99, 300))  # different histories
    for conv in range(4):
        first = words(conv, 300)
        before = {u: stats(client, b).get(u, {}).get("blocks", 0) for u in urls}
        on_a, prompt, cached = generate(client, a.url, first)
        assert prompt == 300
        assert on_a is not None
        wait_synced(client, b, on_a, before[on_a] + (prompt - cached) // PAGE - 1)
        on_b, _, cached2 = generate(client, b.url, first + words(conv + 50, 100))
        assert on_b == on_a, f"conversation {conv}: a placed it on {on_a}, b sent it to {on_b}"
        assert cached2 >= prompt - PAGE
