"""``--router-processes N``: several router processes on one port that behave as one.

Real processes on 127.0.0.1: sim workers, a router with 2 processes. Connections land on a
process chosen by the kernel (``SO_REUSEPORT`` hashes the client's port), so a test that must
talk to one given process opens connections until ``/stats`` says it reached that one, and
keeps that connection (:func:`on_process`). Every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
from support import wait_until

from sglctl.net import find_free_port
from sglctl.router.metrics import merge_scrapes
from sglctl.router.processes import default_processes
from sglctl.router.shared_loads import SharedLoads

FAST = ("--speedup", "50")
TWO = ("--router-processes", "2")


# -- helpers -------------------------------------------------------------------------------
def stats(client: httpx.Client) -> dict:
    r = client.get("/stats")
    assert r.status_code == 200, r.text
    return r.json()


@contextlib.contextmanager
def on_process(url: str, index: int, attempts: int = 400) -> Iterator[httpx.Client]:
    """A client whose (kept-alive) connection is served by router process ``index``."""
    for _ in range(attempts):
        client = httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=1))
        try:
            if stats(client)["process"]["index"] == index:
                yield client
                return
        finally:
            client.close()
    raise AssertionError(f"no connection reached router process {index} in {attempts} tries")


@contextlib.contextmanager
def both(url: str) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """One client on each of the 2 processes."""
    with on_process(url, 0) as c0, on_process(url, 1) as c1:
        yield c0, c1


def wait_for_processes(url: str, n: int = 2) -> None:
    """Until every process answers (the spawn helper waits for the first one only)."""
    seen: set[int] = set()

    def all_seen() -> bool:
        with httpx.Client(base_url=url, timeout=10) as c:
            seen.add(stats(c)["process"]["index"])
        return len(seen) == n

    wait_until(all_seen, timeout=60, what=f"all {n} router processes answering", interval=0.02)


def generate(url: str, text: str, tokens: int = 2, timeout: float = 60) -> httpx.Response:
    """One request on a new connection (so it lands on either process)."""
    body = {"text": text, "sampling_params": {"max_new_tokens": tokens}}
    r = httpx.post(url + "/generate", json=body, timeout=timeout)
    assert r.status_code == 200, r.text
    return r


def router2(procs, urls: list[str], *extra: str):
    router = procs.router(urls, *TWO, "--metrics-port", str(find_free_port()), *extra)
    wait_for_processes(router.url)
    return router


def served_by_both(url: str) -> bool:
    with on_process(url, 0) as c0, on_process(url, 1) as c1:
        return stats(c0)["requests_total"] > 0 and stats(c1)["requests_total"] > 0


# -- (a) affinity --------------------------------------------------------------------------
GROUPS, ROUNDS = 16, 4


def affinity(url: str) -> float:
    """Percent of repeat requests of a prefix group that went to the group's first worker.

    Groups run in parallel, each on a new connection per request; within a group requests
    are sequential (a conversation), so a round can only follow the previous one's answer.
    """
    prefixes = [
        f"[group {g}] " + f"system prompt {g} with a shared context. " * 30 for g in range(GROUPS)
    ]

    def conversation(g: int) -> list[str]:
        return [
            generate(url, prefixes[g] + f"question {r}").headers["x-sglctl-worker"]
            for r in range(ROUNDS)
        ]

    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(conversation, range(GROUPS)))
    repeats = [w == run[0] for run in runs for w in run[1:]]
    return 100.0 * sum(repeats) / len(repeats)


def test_affinity_with_two_processes_is_within_5_points_of_one(procs) -> None:
    workers = [procs.sim_worker(*FAST) for _ in range(4)]
    urls = [w.url for w in workers]
    single = procs.router(urls, "--router-processes", "1")
    several = router2(procs, urls)
    one = affinity(single.url)
    two = affinity(several.url)
    print(f"affinity: {one:.1f}% with 1 process, {two:.1f}% with 2")
    assert served_by_both(several.url)
    assert two >= one - 5.0, f"affinity {two:.1f}% with 2 processes, {one:.1f}% with 1"


# -- (b) loads -----------------------------------------------------------------------------
def test_get_loads_is_the_whole_routers_in_flight(procs) -> None:
    workers = [procs.sim_worker("--speedup", "1") for _ in range(4)]
    router = router2(procs, [w.url for w in workers], "--policy", "round_robin")
    n = 16
    # Slow requests (~1000 decode steps of >= 6.5 ms: >= 6.5 s, sim time never runs ahead of
    # the wall clock) on new connections, from both processes. They only have to outlast the
    # checks below (a few HTTP calls, ~1 s even under load); 2000 steps waited 6.5 s more.
    with ThreadPoolExecutor(n) as pool:
        futures = [
            pool.submit(generate, router.url, f"slow request {i}", 1000, 120) for i in range(n)
        ]
        with both(router.url) as (c0, c1):

            def all_in_flight() -> bool:
                by_process = stats(c0)["process"]["in_flight_by_process"]
                return sum(by_process) == n

            wait_until(all_in_flight, timeout=30, what=f"{n} requests in flight")
            for client in (c0, c1):
                loads = client.get("/get_loads").json()["workers"]
                assert sum(w["load"] for w in loads) == n, loads
                assert stats(client)["in_flight"] == n
                assert sum(w["load"] for w in client.get("/workers").json()["workers"]) == n
            by_process = stats(c1)["process"]["in_flight_by_process"]
            assert all(count > 0 for count in by_process), by_process
            for f in futures:
                f.result()
            for client in (c0, c1):
                loads = client.get("/get_loads").json()["workers"]
                assert sum(w["load"] for w in loads) == 0, loads


# -- (c) admin -----------------------------------------------------------------------------
def test_add_and_remove_reach_the_other_process(procs) -> None:
    w1, w2, w3, w4 = (procs.sim_worker(*FAST) for _ in range(4))
    router = router2(procs, [w1.url, w2.url, w3.url], "--policy", "round_robin")
    with both(router.url) as (c0, c1):
        assert c0.post("/add_worker", params={"url": w4.url}).status_code == 200

        def listed(client: httpx.Client) -> bool:
            return w4.url in client.get("/list_workers").json()["urls"]

        wait_until(lambda: listed(c1), timeout=20, what="the other process lists the new worker")
        body = {"text": "hello", "sampling_params": {"max_new_tokens": 2}}
        used = Counter(c1.post("/generate", json=body).headers["x-sglctl-worker"] for _ in range(8))
        assert used[w4.url] > 0, used

        assert c1.post("/remove_worker", params={"url": w4.url}).status_code == 200
        wait_until(lambda: not listed(c0), timeout=20, what="the removal reaching process 0")
        used = Counter(c0.post("/generate", json=body).headers["x-sglctl-worker"] for _ in range(8))
        assert w4.url not in used, used
        assert c0.post("/flush_cache").json()["status"] == "success"


# -- (d) health and breakers ---------------------------------------------------------------
def _worker_view(client: httpx.Client, url: str) -> dict:
    return next(w for w in client.get("/workers").json()["workers"] if w["url"] == url)


def test_a_dead_worker_is_unhealthy_in_every_process(procs) -> None:
    w1, w2, w3 = (procs.sim_worker(*FAST) for _ in range(3))
    router = router2(
        procs,
        [w1.url, w2.url, w3.url],
        "--health-check-interval-secs",
        "0.5",
        "--health-failure-threshold",
        "1",
    )
    w3.stop()
    with both(router.url) as (c0, c1):
        for client in (c0, c1):
            wait_until(
                lambda client=client: not _worker_view(client, w3.url)["is_healthy"],
                timeout=30,
                what="the dead worker marked unhealthy",
            )
            assert client.get("/health").json()["healthy_workers"] == 2


def test_a_breaker_that_opens_in_one_process_opens_in_the_other(procs) -> None:
    w1, w2, w3 = (procs.sim_worker(*FAST) for _ in range(3))
    router = router2(
        procs,
        [w1.url, w2.url, w3.url],
        "--disable-health-check",
        "--policy",
        "round_robin",
        "--cb-failure-threshold",
        "2",
        "--cb-timeout-duration-secs",
        "300",
    )
    w3.stop()
    with both(router.url) as (c0, c1):
        body = {"text": "hello", "sampling_params": {"max_new_tokens": 2}}
        for _ in range(12):  # every 3rd attempt hits the dead worker, and is retried
            assert c0.post("/generate", json=body).status_code == 200
        assert _worker_view(c0, w3.url)["circuit_breaker_state"] == "open"
        wait_until(
            lambda: _worker_view(c1, w3.url)["circuit_breaker_state"] == "open",
            timeout=20,
            what="the breaker open in the process that sent nothing to the dead worker",
        )
        assert _worker_view(c1, w3.url)["requests_total"] == 0


# -- (e) metrics ---------------------------------------------------------------------------
def _requests_total(text: str, route: str = "/generate") -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("sglang_router_requests_total{") and f'route="{route}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_add_up_over_processes(procs) -> None:
    workers = [procs.sim_worker(*FAST) for _ in range(2)]
    metrics_port = find_free_port()
    router = procs.router([w.url for w in workers], *TWO, "--metrics-port", str(metrics_port))
    wait_for_processes(router.url)
    n = 40
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: generate(router.url, f"count me {i}"), range(n)))
    assert served_by_both(router.url)
    with both(router.url) as (c0, c1):
        for client in (c0, c1):
            assert _requests_total(client.get("/metrics").text) == n
    separate = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30)
    assert _requests_total(separate.text) == n


# -- (f) a crashed process -----------------------------------------------------------------
def test_a_killed_process_is_restarted_and_the_port_keeps_answering(procs) -> None:
    workers = [procs.sim_worker(*FAST) for _ in range(2)]
    router = router2(procs, [w.url for w in workers])
    with on_process(router.url, 1) as c1:
        victim = stats(c1)["process"]["pid"]
    os.kill(victim, signal.SIGKILL)
    answered = [httpx.get(router.url + "/liveness", timeout=60).status_code for _ in range(20)]
    assert answered == [200] * 20
    assert generate(router.url, "still routing").status_code == 200

    def restarted() -> bool:
        with on_process(router.url, 1) as c:
            return stats(c)["process"]["pid"] != victim

    wait_until(restarted, timeout=60, what="router process 1 restarted", interval=0.2)
    assert router.alive()


def test_the_parent_stops_every_process_on_sigterm(procs) -> None:
    workers = [procs.sim_worker(*FAST)]
    router = router2(procs, [w.url for w in workers])
    pids = []
    for index in (0, 1):
        with on_process(router.url, index) as c:
            pids.append(stats(c)["process"]["pid"])
    router.popen.send_signal(signal.SIGTERM)
    router.popen.wait(timeout=60)
    assert router.popen.returncode == 0

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(lambda: all(gone(p) for p in pids), timeout=30, what="children gone")


# -- pieces --------------------------------------------------------------------------------
def test_one_process_is_the_single_process_router(procs) -> None:
    router = procs.router([procs.sim_worker(*FAST).url], "--router-processes", "1")
    with httpx.Client(base_url=router.url, timeout=30) as c:
        assert "process" not in stats(c)


def test_default_is_one_process_per_two_cores(monkeypatch) -> None:
    for cores, expected in ((1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (16, 8), (64, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert default_processes() == expected


def test_shared_loads_rows_add_up_and_slots_agree() -> None:
    parent = SharedLoads.create(3)
    try:
        a = SharedLoads.attach(parent.name, 3, 1)
        b = SharedLoads.attach(parent.name, 3, 2)
        # The same URL gets the same slot whichever process claims it first.
        assert b.slot_of("http://w2") == a.slot_of("http://w2") != a.slot_of("http://w1")
        slot = a.slot_of("http://w2")
        assert slot is not None
        a.counts[a.index * 1024 + slot] += 2
        b.counts[b.index * 1024 + slot] += 3
        assert parent.total(slot) == a.total(slot) == 5
        assert parent.by_process() == [0, 2, 3]
        a.clear_row()
        assert b.total(slot) == 3
        a.close()
        b.close()
    finally:
        parent.close(unlink=True)


def test_merge_scrapes_sums_counters_and_histograms_not_shared_gauges() -> None:
    one = (
        b"# TYPE sglang_router_requests_total counter\n"
        b'sglang_router_requests_total{route="/generate"} 3.0\n'
        b"# TYPE sglang_router_worker_healthy gauge\n"
        b'sglang_router_worker_healthy{worker="a"} 1.0\n'
        b"# TYPE sglang_router_queued_requests gauge\n"
        b"sglang_router_queued_requests 2.0\n"
    )
    other = one.replace(b"} 3.0", b"} 4.0").replace(b"requests 2.0", b"requests 5.0")
    merged = merge_scrapes(one, [other]).decode()
    assert 'sglang_router_requests_total{route="/generate"} 7.0' in merged
    assert 'sglang_router_worker_healthy{worker="a"} 1.0' in merged
    assert "sglang_router_queued_requests 7.0" in merged


# -- sglctl up -----------------------------------------------------------------------------
def test_sglctl_up_runs_its_router_as_several_processes(tmp_path) -> None:
    from test_up import up_runner

    with up_runner(tmp_path) as start:
        up = start(*TWO)
        wait_for_processes(up.url)
        for i in range(8):
            generate(up.url, f"through sglctl up {i}")
        with both(up.url) as (c0, c1):
            for client in (c0, c1):
                assert len(client.get("/list_workers").json()["urls"]) == 2
                assert _requests_total(client.get("/metrics").text) == 8
        assert up.interrupt() == 0
        up.assert_nothing_left()


def test_a_child_that_cannot_start_stops_the_router_with_its_error(tmp_path) -> None:
    args = [sys.executable, "-m", "sglctl.router", "--port", str(find_free_port())]
    args += ["--metrics-port", str(find_free_port()), *TWO]
    args += ["--service-discovery", "--selector", "app=x"]
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "none"), "HOME": str(tmp_path)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "no usable Kubernetes credentials" in done.stderr
    assert "before it was ready; stopping the router" in done.stderr
    assert "BufferError" not in done.stderr


def test_a_long_prompt_reaches_the_siblings_whole(procs) -> None:
    """A prompt longer than the first cut of what siblings were told (64 KB) is learnt whole
    by the other process, so its next turn there is a hit on the same worker (a sibling that
    knows only a prefix under half the prompt counts it a miss)."""
    workers = [procs.sim_worker(*FAST) for _ in range(2)]
    router = router2(procs, [w.url for w in workers])
    prompt = "".join(
        f"[paragraph {i}] a long shared document, word after word. " for i in range(4000)
    )
    assert len(prompt) > 200_000
    body = {"text": prompt, "sampling_params": {"max_new_tokens": 1}}
    with both(router.url) as (c0, c1):
        first = c0.post("/generate", json=body)
        assert first.status_code == 200, first.text
        owner = first.headers["x-sglctl-worker"]

        def learnt() -> bool:
            text = c1.get("/metrics").text
            line = f'sglang_router_tree_size_chars{{worker="{owner}"}} '
            sizes = [float(row.split()[-1]) for row in text.splitlines() if row.startswith(line)]
            return bool(sizes) and sizes[0] >= len(prompt)

        wait_until(learnt, timeout=30, what="process 1's tree holding the whole prompt")
        body["text"] = prompt + " and the next question"
        again = c1.post("/generate", json=body)
        assert again.status_code == 200, again.text
        assert again.headers["x-sglctl-worker"] == owner
