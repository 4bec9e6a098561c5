"""Router replicas that tell each other their dispatches (``--router-peers``, issue 16).

Real router subprocesses on free ports in front of sim workers. Each replica gets the same
``--router-peers`` list naming every replica (itself included, as a Kubernetes headless
Service would). Which worker served a request is read from the ``x-sglctl-worker`` header;
what a replica heard from ``GET /peers``. With ``PEERS = False`` (replicas without the flag)
the affinity tests fail: the second replica places the prefixes by its own load instead.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from sglctl.net import find_free_port
from sglctl.router.peers import PeerAddress, Ring, parse_peers, valid_batch
from sglctl.sim.tokenizer import text_for_tokens
from sglctl.spawn import ManagedProcess
from tests.support import conversation, wait_until

PEERS = True


def replica(
    procs: Any, urls: Sequence[str], port: int, peer_ports: Sequence[int], *extra: str
) -> ManagedProcess:
    peers = ",".join(f"127.0.0.1:{p}" for p in peer_ports)
    if port != peer_ports[0]:  # the workers in another order: other ties than the first's
        urls = list(reversed(urls))
    flags = ["--router-peers", peers, "--router-peers-refresh-secs", "0.5"] if PEERS else []
    # --placement tree: a new prefix goes by this replica's own history (its smallest tree),
    # so that two replicas without peers disagree (with "load" both would, on an idle
    # system, pick the same worker by the same ties).
    proc: ManagedProcess = procs.router(urls, "--placement", "tree", *flags, *extra, port=port)
    return proc


def peers_view(client: httpx.Client, router: ManagedProcess) -> dict[str, Any]:
    r = client.get(router.url + "/peers")
    if not PEERS:
        return {"connected": 1, "received": 1 << 30, "peers": []}
    assert r.status_code == 200, r.text
    view: dict[str, Any] = r.json()
    return view


def wait_connected(client: httpx.Client, router: ManagedProcess, peers: int) -> None:
    wait_until(
        lambda: peers_view(client, router)["connected"] >= peers,
        timeout=30,
        what=f"{router.name} connected to {peers} peers",
    )


def generate(client: httpx.Client, url: str, text: str, *, fresh: bool = False) -> str:
    """Send ``text``; the worker that served it. ``fresh``: on a new connection."""
    body = {"text": text, "sampling_params": {"max_new_tokens": 1}}
    if fresh:
        with httpx.Client(timeout=60, trust_env=False) as c:
            r = c.post(url + "/generate", json=body)
    else:
        r = client.post(url + "/generate", json=body)
    assert r.status_code == 200, r.text
    worker = r.headers.get("x-sglctl-worker")
    assert worker is not None
    return worker


def sims(procs: Any, n: int) -> list[str]:
    return [procs.sim_worker("--speedup", "50").url for _ in range(n)]


def test_a_prefix_placed_through_one_replica_is_followed_by_the_other(procs, client) -> None:
    urls = sims(procs, 3)
    ports = [find_free_port(), find_free_port()]
    a, b = (replica(procs, urls, port, ports) for port in ports)
    wait_connected(client, a, 1)
    wait_connected(client, b, 1)
    view = peers_view(client, a)
    if PEERS:
        assert sorted(p["self"] for p in view["peers"]) == [False, True], view
    # Different histories: b's own placement would not follow a's.
    for conv in range(100, 103):
        generate(client, b.url, conversation(conv, 1))
    placed = set()
    for conv in range(8):
        before = peers_view(client, b)["received"]
        on_a = generate(client, a.url, conversation(conv, 1))
        placed.add(on_a)
        if PEERS:
            wait_until(
                lambda before=before: peers_view(client, b)["received"] > before,
                timeout=10,
                what="b hearing a's route",
            )
        on_b = generate(client, b.url, conversation(conv, 2))
        assert on_b == on_a, f"conversation {conv}: a placed it on {on_a}, b sent it to {on_b}"
    assert len(placed) >= 2, "new conversations are still spread over the workers"


def test_a_restarted_replica_catches_up_without_new_traffic(procs, client) -> None:
    urls = sims(procs, 3)
    ports = [find_free_port(), find_free_port()]
    a, b = (replica(procs, urls, port, ports) for port in ports)
    wait_connected(client, a, 1)
    placed = {conv: generate(client, a.url, conversation(conv, 1)) for conv in range(8)}
    assert len(set(placed.values())) >= 2
    b.stop()

    def retry_in() -> float:
        link = next(p for p in peers_view(client, a)["peers"] if f":{ports[1]}/" in p["url"])
        return float(link["retry_in"])

    # Down until a's link to b backs off for seconds (0.2, 0.4, 0.8, 1.6, then 3.2 s) ...
    if PEERS:
        wait_until(lambda: retry_in() > 2.5, timeout=30, what="a's link to b backing off")
    b = replica(procs, urls, ports[1], ports)
    up = time.monotonic()
    # No request through a from here on: b learns a's recent decisions from a's ring, sent as
    # soon as b's first POST to a says it is back (a's link does not wait out its backoff).
    if PEERS:
        wait_until(
            lambda: peers_view(client, b)["received"] >= len(placed),
            timeout=30,
            what="the restarted replica receiving a's ring",
        )
        assert time.monotonic() - up < 1.2  # not the ~2 s left of a's backoff
    for conv in range(100, 103):  # b's own new traffic: its placement differs from a's
        generate(client, b.url, conversation(conv, 1))
    for conv, worker in placed.items():
        assert generate(client, b.url, conversation(conv, 2)) == worker, f"conversation {conv}"


def test_a_restarted_replica_gets_back_the_routes_it_made_itself(procs, client) -> None:
    """Conversations placed through ``b`` only; ``b`` restarts: the ring ``a`` sends it holds
    what ``a`` heard, so ``b`` sends their next turns where it had placed them."""
    urls = sims(procs, 3)
    ports = [find_free_port(), find_free_port()]
    a, b = (replica(procs, urls, port, ports) for port in ports)
    wait_connected(client, a, 1)
    wait_connected(client, b, 1)
    placed = {conv: generate(client, b.url, conversation(conv, 1)) for conv in range(300, 308)}
    assert len(set(placed.values())) >= 2
    if PEERS:
        wait_until(
            lambda: peers_view(client, a)["received"] >= len(placed), timeout=10, what="a told"
        )
    b.stop()
    b = replica(procs, urls, ports[1], ports)
    if PEERS:
        wait_until(
            lambda: peers_view(client, b)["received"] >= len(placed),
            timeout=30,
            what="the restarted replica receiving its own routes back in a's ring",
        )
    for conv in range(400, 403):  # b's new traffic: its placement differs from before
        generate(client, b.url, conversation(conv, 1))
    for conv, worker in placed.items():
        assert generate(client, b.url, conversation(conv, 2)) == worker, f"conversation {conv}"


def test_a_peer_down_neither_slows_nor_fails_requests(procs, client) -> None:
    urls = sims(procs, 2)
    port = find_free_port()
    nobody = find_free_port()  # nothing listens there
    a = replica(procs, urls, port, [port, nobody])
    slowest = 0.0
    for i in range(40):
        start = time.monotonic()
        generate(client, a.url, text_for_tokens(300, f"down {i}"))
        slowest = max(slowest, time.monotonic() - start)
    assert slowest < 2.0, f"a request took {slowest:.2f} s with a peer down"
    if not PEERS:
        return
    wait_until(
        lambda: peers_view(client, a)["dropped"] >= 30,
        timeout=10,
        what="routes to the dead peer dropped and counted",
    )
    view = peers_view(client, a)
    assert view["connected"] == 0 and view["sent"] == 0, view
    metrics = client.get(a.url + "/metrics").text
    assert "sglctl_peer_routes_dropped_total" in metrics
    assert "sglctl_peers_connected 0.0" in metrics


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not JSON"),
        (b'{"t": "route"}', "JSON list"),
        (b'[{"t": "add", "w": "http://a"}]', "not a route"),
        (b'[{"t": "route", "w": 3, "x": "a"}]', "worker URL"),
        (b'[{"t": "route", "w": "http://a", "i": ["a"]}]', "integers"),
        (b'[{"t": "route", "w": "http://a"}]', "needs"),
        (b'[{"t": "load", "l": [1]}]', "requests in flight"),
        (b'[{"t": "load", "l": {"http://a": -1}}]', "requests in flight"),
        (b'[{"t": "load", "l": {}, "late": -0.1}]', "late"),
        (b'[{"t": "load", "l": {}, "late": "soon"}]', "late"),
        (b'[{"t": "load", "l": {}, "at": "now"}]', "clock"),
        (b'[{"t": "load", "l": {}, "at": NaN}]', "not JSON"),
        (b'[{"t": "load", "l": {}, "at": true}]', "clock"),
    ],
)
def test_bad_batches_are_named(body: bytes, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        valid_batch(body)
    assert valid_batch(b'[{"t": "route", "w": "http://a", "i": [1, 2]}]')
    assert valid_batch(b'[{"t": "load", "l": {"http://a": 2}}]')
    assert valid_batch(b'[{"t": "load", "l": {"http://a": 2}, "late": 0.012}]')


def test_the_endpoint_answers_bad_input_with_4xx_json(procs, client) -> None:
    urls = sims(procs, 1)
    port = find_free_port()
    a = replica(procs, urls, port, [port])
    bad = [
        (b"{not json", {"x-sglctl-peer": "x"}),
        (b'{"t": "route"}', {"x-sglctl-peer": "x"}),
        (b'[{"t": "route", "w": "http://a", "i": [1, "2"]}]', {"x-sglctl-peer": "x"}),
        (b"[]", {}),
        (b"[]", {"x-sglctl-peer": "y" * 500}),
    ]
    for body, headers in bad:
        r = client.post(a.url + "/peers/routes", content=body, headers=headers)
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert "message" in r.json()["error"], r.text
    r = client.get(a.url + "/peers/routes")
    assert r.status_code == 405 and r.json()["error"]
    # An unknown worker is no error: a peer may know a worker this replica has not seen yet.
    ok = b'[{"t": "route", "w": "http://127.0.0.9:1", "x": "hello"}]'
    r = client.post(a.url + "/peers/routes", content=ok, headers={"x-sglctl-peer": "z"})
    assert r.status_code == 200 and r.json()["id"] == peers_view(client, a)["id"], r.text
    plain = procs.router(urls)
    r = client.post(plain.url + "/peers/routes", content=b"[]", headers={"x-sglctl-peer": "z"})
    assert r.status_code == 404 and "router-peers" in r.json()["error"]["message"]


def test_peer_routes_reach_every_process_of_a_replica(procs, client) -> None:
    urls = sims(procs, 3)
    ports = [find_free_port(), find_free_port()]
    a = replica(procs, urls, ports[0], ports, "--router-processes", "1")
    b = replica(procs, urls, ports[1], ports, "--router-processes", "2")
    wait_connected(client, a, 1)
    for conv in range(100, 104):  # b's processes get different histories of their own
        generate(client, b.url, conversation(conv, 1), fresh=True)
    placed = {conv: generate(client, a.url, conversation(conv, 1)) for conv in range(10)}
    assert len(set(placed.values())) >= 2

    # Every next turn through b, each on a new connection (the kernel spreads them over
    # b's two processes): the process that did not receive a's batch learnt it from its
    # sibling. Polled: the relay takes a moment.
    def followed() -> bool:
        return all(
            generate(client, b.url, conversation(conv, 2), fresh=True) == worker
            for conv, worker in placed.items()
        )

    wait_until(followed, timeout=20, what="both of b's processes following a's routes")
    seen = set()
    for _ in range(40):
        with httpx.Client(timeout=10, trust_env=False) as c:
            seen.add(c.get(b.url + "/stats").json()["process"]["index"])
    assert seen == {0, 1}, "new connections reach both processes"


# -- pure pieces ---------------------------------------------------------------------------
def test_peer_addresses_parse() -> None:
    assert parse_peers(["http://a:1,b:2", "b:2", "[::1]:3", "c"]) == [
        PeerAddress("a", 1),
        PeerAddress("b", 2),
        PeerAddress("::1", 3),
        PeerAddress("c", 30000),
    ]
    for bad in ("https://a:1", "a:port", "http://a:1/path", "http://:1"):
        with pytest.raises(ValueError, match="router-peers"):
            parse_peers([bad])


def test_the_ring_keeps_the_latest_within_its_bounds() -> None:
    ring = Ring(routes=3, max_bytes=100)
    for i in range(5):
        ring.add({"t": "route", "w": "u", "x": str(i)})
    assert [m["x"] for m in ring.snapshot()] == ["2", "3", "4"]
    ring.add({"t": "route", "w": "u", "x": "y" * 99})
    assert [m["x"][:1] for m in ring.snapshot()] == ["4", "y"]
    assert ring.bytes <= 100


def test_a_name_resolving_to_several_addresses_means_all_of_them() -> None:
    """A headless Service: one link per address, re-resolved; gone addresses are dropped."""
    import asyncio

    from sglctl.router.peers import Peers

    answers = {"svc": ["10.0.0.1", "10.0.0.2"]}

    async def resolver(host: str, port: int) -> list[str]:
        return answers[host]

    async def go() -> None:
        peers = Peers(
            parse_peers(["svc:8000", "10.0.0.9:8000"]),
            5.0,
            "me",
            apply=lambda m: None,
            resolver=resolver,
        )
        answers["10.0.0.9"] = ["10.0.0.9"]
        await peers._refresh()
        assert sorted(peers.links) == [("10.0.0.1", 8000), ("10.0.0.2", 8000), ("10.0.0.9", 8000)]
        answers["svc"] = ["10.0.0.2", "10.0.0.3"]
        await peers._refresh()
        assert sorted(peers.links) == [("10.0.0.2", 8000), ("10.0.0.3", 8000), ("10.0.0.9", 8000)]
        for link in peers.links.values():
            assert link.task is not None
            link.task.cancel()
        peers.pool.close_all()

    asyncio.run(go())


def test_the_peers_in_flight_add_up_per_worker_and_a_silent_one_expires() -> None:
    """Each batch's ``load`` replaces its sender's last one; a worker's ``told_in_flight`` is
    the sum over senders; a sender silent for LOAD_STALE_SECS counts no more. With several
    processes the load is relayed to the siblings, which apply it the same way."""
    import asyncio

    from sglctl.router import siblings
    from sglctl.router.peers import LOAD_STALE_SECS, Peers
    from sglctl.router.workers import WorkerRegistry

    class FakeRouter:
        def __init__(self) -> None:
            self.registry = WorkerRegistry()
            self.metrics = None
            self.peers: Peers | None = None

        def policies(self) -> list[Any]:
            return []

        def set_told(self, url: str, n: int) -> None:
            worker = self.registry.get(url)
            if worker is not None:
                worker.told_in_flight = n

    router, sibling = FakeRouter(), FakeRouter()
    w1 = router.registry.add("http://127.0.0.1:9", source="admin")
    w2 = router.registry.add("http://127.0.0.1:10", source="admin")
    s1 = sibling.registry.add(w1.url, source="admin")
    relayed: list[list[dict[str, Any]]] = []

    async def go() -> None:
        peers = Peers(
            [],
            5.0,
            "me",
            apply=lambda m: siblings.apply(router, m),  # type: ignore[arg-type]
            relay=relayed.append,
            set_told=router.set_told,
        )
        sibling.peers = Peers([], 5.0, "me", apply=lambda m: None, set_told=sibling.set_told)
        route = {"t": "route", "w": w1.url, "x": "hello " * 20}
        assert peers.receive("a", [route, {"t": "load", "l": {w1.url: 3, w2.url: 1}}]) == 1
        assert peers.receive("b", [{"t": "load", "l": {w1.url: 2}}]) == 0
        assert (w1.told_in_flight, w2.told_in_flight) == (5, 1)
        # a's next word: one of its requests on w1 finished, the one on w2 too.
        peers.receive("a", [{"t": "load", "l": {w1.url: 2}}])
        assert (w1.told_in_flight, w2.told_in_flight) == (4, 0)
        # Two POSTs of a link are out at once: a load read earlier and arriving later is
        # ignored, the newer one stands.
        peers.receive("a", [{"t": "load", "l": {w1.url: 2}, "at": 100.5}])
        peers.receive("a", [{"t": "load", "l": {w1.url: 7}, "at": 100.4}])
        assert w1.told_in_flight == 4
        peers.receive("a", [{"t": "load", "l": {w1.url: 1}, "at": 100.6}])
        assert w1.told_in_flight == 3
        peers.receive("a", [{"t": "load", "l": {w1.url: 2}}])  # a sender without a clock
        assert w1.told_in_flight == 4
        peers.receive("a", [{"t": "load", "l": {w1.url: 1}, "at": 3.0}])  # seconds behind:
        assert w1.told_in_flight == 3  # not overtaken, a clock that started again
        peers.receive("a", [{"t": "load", "l": {w1.url: 2}, "at": 3.1}])
        assert w1.told_in_flight == 4
        peers.take_load("b", {w1.url: 2}, now=time.monotonic() + LOAD_STALE_SECS / 2)
        peers.expire(now=time.monotonic() + LOAD_STALE_SECS + 0.1)  # a is silent, b is not
        assert (w1.told_in_flight, w2.told_in_flight) == (2, 0)
        assert list(peers.snapshot()["told"]) == ["b"]
        # The sibling process hears the route and the load from the one that received them.
        assert relayed[0][0] == route and relayed[0][1]["t"] == "peer_load"
        siblings.apply(sibling, relayed[0][1])  # type: ignore[arg-type]
        assert s1.told_in_flight == 3
        peers.pool.close_all()
        sibling.peers.pool.close_all()

    asyncio.run(go())


def test_with_an_api_key_peers_send_it_and_strangers_get_401(procs, client) -> None:
    """Routes steer traffic: with ``--api-key`` the endpoint wants it (as the admin endpoints
    do), and the replicas, given the same key, still hear each other."""
    urls = sims(procs, 2)
    ports = [find_free_port(), find_free_port()]
    a, b = (replica(procs, urls, port, ports, "--api-key", "s3cret") for port in ports)
    wait_connected(client, a, 1)
    wait_connected(client, b, 1)
    before = peers_view(client, b)["received"]
    generate_with_key = {"authorization": "Bearer s3cret"}
    body = {"text": conversation(7, 1), "sampling_params": {"max_new_tokens": 1}}
    assert client.post(a.url + "/generate", json=body, headers=generate_with_key).status_code == 200
    wait_until(lambda: peers_view(client, b)["received"] > before, timeout=10, what="b hearing a")
    batch = b'[{"t": "route", "w": "http://127.0.0.9:1", "x": "hello"}]'
    r = client.post(a.url + "/peers/routes", content=batch, headers={"x-sglctl-peer": "z"})
    assert r.status_code == 401 and "api key" in r.json()["error"]["message"], r.text


def test_a_replica_counts_the_others_requests_in_flight_until_they_end(procs, client) -> None:
    """The load is every replica's: a stream open through ``a`` counts on ``b`` for its worker
    (``told`` in ``b``'s ``/peers``) within moments, and stops counting when it ends -- here
    cut by the client, so no worker report is what tells ``b``."""
    worker = procs.sim_worker().url  # real time: the answer lasts longer than the test
    ports = [find_free_port(), find_free_port()]
    a, b = (replica(procs, [worker], port, ports) for port in ports)
    wait_connected(client, a, 1)
    wait_connected(client, b, 1)

    def told_on_b() -> int:
        loads = peers_view(client, b)["told"].values()
        return sum(load.get(worker, 0) for load in loads)

    assert told_on_b() == 0
    body = {"text": conversation(3, 1), "stream": True, "sampling_params": {"max_new_tokens": 4000}}
    with (
        httpx.Client(timeout=60, trust_env=False) as streamer,
        streamer.stream("POST", a.url + "/generate", json=body) as r,
    ):
        assert r.status_code == 200
        next(r.iter_raw())  # the first chunk: the request is on the worker
        try:
            wait_until(lambda: told_on_b() == 1, timeout=10, what="b counting a's stream")
        except AssertionError as exc:  # say what each side saw
            views = f"b: {peers_view(client, b)}; a: {peers_view(client, a)}"
            raise AssertionError(f"{exc}; {views}") from None
    # The client hung up: a cancels it upstream, and tells b its in-flight count fell.
    wait_until(lambda: told_on_b() == 0, timeout=10, what="b no longer counting a's stream")


def test_ranks_order_the_live_replicas_by_instance_id() -> None:
    """Every replica computes the same order (by instance id) over itself and the peers that
    answer; one alone is rank 0 of 1 (it never waits)."""
    import asyncio

    from sglctl.router.peers import Link, Peers

    async def go() -> None:
        mine = Peers([], 5.0, "m", apply=lambda m: None)
        assert mine.rank() == (0, 1)
        for i, (peer_id, connected) in enumerate([("a", True), ("z", True), ("b", False)]):
            link = Link(mine, "127.0.0.1", 9000 + i, f"peer{i}")
            link.peer_id, link.connected = peer_id, connected
            mine.links[("127.0.0.1", 9000 + i)] = link
        assert mine.rank() == (1, 3)  # a, m, z: b does not answer
        assert mine.snapshot()["rank"] == 1 and mine.snapshot()["replicas"] == 3
        mine.pool.close_all()

    asyncio.run(go())


def test_the_wait_a_rank_follows_the_latest_routes_any_replica_told() -> None:
    """``stagger_step`` is the largest lateness (p90 of a link's batches, seconds) this
    replica measured or another told, within [--router-peers-stagger-secs, STAGGER_MAX_SECS];
    too few batches of its own count as none; 0 keeps the stagger off. The policy waits
    rank x step; the batch this replica posts tells its own; a silent sender's is forgotten."""
    import asyncio

    from sglctl.router.peers import LATENESS_MIN_BATCHES, LOAD_STALE_SECS, Link, Peers
    from sglctl.router.peers import STAGGER_MAX_SECS as STAGGER_MAX
    from sglctl.router.policies import CacheAwarePolicy, RouteKey
    from sglctl.router.workers import WorkerRegistry

    async def go() -> None:
        mine = Peers([], 5.0, "m", apply=lambda m: None, stagger_secs=0.005)
        link = Link(mine, "127.0.0.1", 9000, "peer0")
        link.peer_id, link.connected = "z", True
        mine.links[("127.0.0.1", 9000)] = link
        mine.restep()
        assert mine.stagger_step() == 0.005 and mine.own_late is None
        link.lateness.extend([0.001] * (LATENESS_MIN_BATCHES - 1))
        mine.restep()
        assert mine.own_late is None, "too few batches to trust"
        link.lateness.extend([0.001] * 80 + [0.02] * 20)  # p90: 0.02
        mine.restep()
        assert mine.own_late == pytest.approx(0.02) and mine.stagger_step() == pytest.approx(0.02)
        mine.take_load("z", {}, late=0.03)  # z's routes reach others later still
        mine.restep()
        assert mine.stagger_step() == pytest.approx(0.03)
        assert mine.snapshot()["stagger_ms"] == 30.0
        mine.take_load("z", {}, late=7.0)
        mine.restep()
        assert mine.stagger_step() == STAGGER_MAX
        mine.expire(now=time.monotonic() + LOAD_STALE_SECS + 0.1)  # z went silent
        mine.restep()
        assert mine.stagger_step() == pytest.approx(0.02)
        off = Peers([], 5.0, "m", apply=lambda m: None, stagger_secs=0.0)
        off.take_load("z", {}, late=0.03)
        off.restep()
        assert off.stagger_step() == 0.0

        # The policy: rank 1 waits one step on a miss, none on a hit.
        registry = WorkerRegistry()
        workers = [registry.add(f"http://127.0.0.1:{9100 + i}", source="admin") for i in range(2)]
        policy = CacheAwarePolicy()
        policy.stagger_by(lambda: (1, 2), 0.005, mine.stagger_step)
        text = "a long document " * 50
        assert policy.miss_delay(workers, RouteKey(text=text)) == pytest.approx(0.02)
        policy.observe(RouteKey(text=text), workers[0].url)
        assert policy.miss_delay(workers, RouteKey(text=text + " more")) == 0.0
        mine.pool.close_all()
        off.pool.close_all()

    asyncio.run(go())


def test_a_route_leaves_while_the_post_before_it_is_still_unanswered() -> None:
    """A link keeps two POSTs out at once: a route offered while the peer sits on the first
    batch reaches it before that batch is answered (with one POST at a time it waited out the
    peer's answer, most of a route's lateness). The peer here answers the first POST only
    once the second has come, within a deadline."""
    import asyncio

    from sglctl.router.peers import PATH, Peers, RouteKey, parse_peer

    async def go() -> None:
        bodies: list[bytes] = []
        second = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                assert head.startswith(b"POST " + PATH.encode())
                bodies.append(await reader.readexactly(length))
                if len(bodies) == 1:
                    await asyncio.wait_for(second.wait(), 5.0)  # the first waits for the next
                else:
                    second.set()
                answer = b'{"id": "peer", "applied": 0}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(answer), answer)
                )
                await writer.drain()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        peers = Peers([parse_peer(f"127.0.0.1:{port}")], 5.0, "me", apply=lambda m: None)
        await peers._refresh()  # the link starts with a hello (its load), which is held
        (link,) = peers.links.values()
        try:
            deadline = time.monotonic() + 5.0
            while not bodies and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert len(bodies) == 1, "the hello never came"
            peers.tell_route(RouteKey(text="a route " * 10), "http://127.0.0.1:9")
            await asyncio.wait_for(second.wait(), 5.0)  # came while the hello was held
            assert b"a route" in bodies[1] and b"a route" not in bodies[0]
            while link.sent < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert link.sent == 1 and link.connected and link.failure is None
        finally:
            if link.task is not None:
                link.task.cancel()
            peers.pool.close_all()
            server.close()

    asyncio.run(go())


def test_a_link_measures_how_late_its_routes_arrive_and_tells_it(procs, client) -> None:
    """Routes through ``a`` reach ``b``: ``a``'s ``/peers`` shows the lateness of its batches
    (``late_ms``) and, once it has enough, ``b`` hears ``a``'s figure with the load."""
    from sglctl.router.peers import LATENESS_MIN_BATCHES

    urls = sims(procs, 2)
    ports = [find_free_port(), find_free_port()]
    a, b = (replica(procs, urls, port, ports) for port in ports)
    wait_connected(client, a, 1)
    wait_connected(client, b, 1)
    a_id = peers_view(client, a)["id"]
    for conv in range(LATENESS_MIN_BATCHES):  # one at a time, each told before the next
        sent = peers_view(client, a)["sent"]
        generate(client, a.url, conversation(200 + conv, 1))
        wait_until(lambda n=sent: peers_view(client, a)["sent"] > n, timeout=10, what="a telling b")
    links = [p for p in peers_view(client, a)["peers"] if not p["self"]]
    late = links[0]["late_ms"]
    assert late["n"] >= LATENESS_MIN_BATCHES and 0 < late["p50"] <= late["max"] < 10_000, late
    wait_until(
        lambda: a_id in peers_view(client, b)["late_ms_told"],
        timeout=10,
        what="b hearing a's route lateness",
    )
    assert peers_view(client, b)["stagger_ms"] >= 5.0  # the flag's 5 ms at least


def test_a_burst_through_two_replicas_is_placed_in_turn(procs, client) -> None:
    """Two new prompts sent at once, one through each replica, with the workers idle: the
    second rank waits ``--router-peers-stagger-secs`` before placing its own, by which time
    the first rank's route and in-flight count reached it, so the two land on different
    workers (unstaggered, both would take the same least loaded, smallest-tree worker: the
    replicas list the workers in the same order). Whole answers take the callback path's
    detour to the task path; streams wait on the task path."""
    import concurrent.futures
    import threading

    stagger = 0.5
    urls = [procs.sim_worker().url for _ in range(2)]  # real time: answers outlast the test
    ports = [find_free_port(), find_free_port()]
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    flags = ["--router-peers", peers, "--router-peers-refresh-secs", "0.5"]
    stagger_flag = ["--router-peers-stagger-secs", str(stagger)]
    routers = [
        procs.router(urls, "--placement", "load", *flags, *stagger_flag, port=p) for p in ports
    ]
    for r in routers:
        wait_connected(client, r, 1)
    first, late = sorted(routers, key=lambda r: peers_view(client, r)["rank"])
    assert [peers_view(client, r)["rank"] for r in (first, late)] == [0, 1]

    placed: dict[str, tuple[str, float]] = {}
    both = threading.Barrier(3)  # the two streams placed, and the test read them
    done = threading.Event()

    def open_stream(router: ManagedProcess, text: str) -> None:
        body = {"text": text, "stream": True, "sampling_params": {"max_new_tokens": 4000}}
        sent = time.monotonic()
        with (
            httpx.Client(timeout=60, trust_env=False) as c,
            c.stream("POST", router.url + "/generate", json=body) as r,
        ):
            assert r.status_code == 200
            next(r.iter_raw())  # the first chunk: it is on its worker
            placed[router.name] = (r.headers["x-sglctl-worker"], time.monotonic() - sent)
            both.wait(30)
            done.wait(30)  # in flight until the test has read both

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(open_stream, late, conversation(11, 1)),  # the late one sent first
            pool.submit(open_stream, first, conversation(12, 1)),
        ]
        try:
            both.wait(30)
        finally:
            done.set()
        for f in futures:
            f.result(timeout=30)
    late_worker, late_waited = placed[late.name]
    first_worker, first_waited = placed[first.name]
    assert late_waited >= stagger > first_waited, (late_waited, first_waited)
    assert late_worker != first_worker
    # A whole answer on the rank that waits: the callback path hands it to the task path.
    sent = time.monotonic()
    generate(client, late.url, conversation(13, 1))
    assert time.monotonic() - sent >= stagger
