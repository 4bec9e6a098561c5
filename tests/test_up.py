"""``sglctl up`` end to end on the sim backend: real supervisor, workers and router processes.

Each test starts ``sglctl up`` as a subprocess on free ports with a temporary run directory,
and always stops it with SIGINT, then checks that no process and no shared-memory segment
is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from sglctl.net import find_free_port, find_free_port_block
from sglctl.state_table import (
    StateTable,
    StateTableError,
    WorkerState,
    list_segments,
    segment_name_for_port,
)
from tests.support import wait_until

pytestmark = pytest.mark.slow
SGLCTL = [sys.executable, "-m", "sglctl"]


@dataclass
class Up:
    """A running ``sglctl up`` subprocess."""

    popen: subprocess.Popen[bytes]
    url: str
    port: int
    run_dir: Path
    output: Path
    tree: set[int] = field(default_factory=set)

    @property
    def segment(self) -> str:
        return segment_name_for_port(self.port)

    def table(self) -> StateTable:
        return StateTable.attach(self.segment)

    def remember_tree(self) -> None:
        with_children = psutil.Process(self.popen.pid).children(recursive=True)
        self.tree |= {p.pid for p in with_children} | {self.popen.pid}

    def log(self) -> str:
        return self.output.read_text(errors="replace")

    def interrupt(self, timeout: float = 60.0) -> int:
        """Ctrl-C and wait; the supervisor must exit on its own."""
        self.remember_tree()
        self.popen.send_signal(signal.SIGINT)
        return self.popen.wait(timeout=timeout)

    def assert_nothing_left(self) -> None:
        left = []
        for pid in self.tree:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.NoSuchProcess:
                pass
        assert left == [], f"processes left behind: {left}"
        assert self.segment not in list_segments()
        assert not (self.run_dir / "control.sock").exists()


@pytest.fixture
def start_up(tmp_path: Path) -> Iterator[Callable[..., Up]]:
    with up_runner(tmp_path) as start:
        yield start


@contextlib.contextmanager
def up_runner(tmp_path: Path) -> Iterator[Callable[..., Up]]:
    """``start(*flags, ...)`` runs ``sglctl up``; every run is stopped (and its tree killed)
    on the way out. The ``start_up`` fixture of this module and of ``test_up_pd.py``."""
    started: list[Up] = []

    def start(*flags: str, dp_size: int | None = 2,
              worker_args: tuple[str, ...] = ("--speedup", "50"), port: int | None = None,
              wait: bool = True) -> Up:  # fmt: skip
        """``dp_size=None``: the layout is in ``flags`` (``--prefill-dp P --decode-dp D``)."""
        port = port or find_free_port()
        # A random start: helpers' test runs share this machine, and two runs that both take
        # the first free block (20000) collide between the check and the workers' bind.
        block = (dp_size or 4) + 2
        base = find_free_port_block(block, start=random.randrange(20000, 30000, 10))
        run_dir = tmp_path / f"run-{port}"
        output = tmp_path / f"up-{port}.out"
        layout = ["--dp-size", str(dp_size)] if dp_size is not None else []
        args = [
            sys.executable, "-m", "sglctl", "up", *layout, "--backend", "sim",
            "--port", str(port), "--metrics-port", str(find_free_port()),
            "--worker-base-port", str(base), "--run-dir", str(run_dir),
            "--restart-initial-backoff-secs", "0.2", "--health-check-interval-secs", "1",
            "--shutdown-grace-period-secs", "5", *flags, "--", *worker_args,
        ]  # fmt: skip
        with open(output, "wb") as out:
            popen = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        up = Up(popen, f"http://127.0.0.1:{port}", port, run_dir, output)
        started.append(up)
        if wait:
            with httpx.Client(timeout=2.0) as client:

                def ready() -> bool:
                    assert popen.poll() is None, f"sglctl up exited early:\n{up.log()}"
                    try:
                        return client.get(up.url + "/readiness").json().get("status") == "ready"
                    except (httpx.HTTPError, ValueError):
                        return False

                wait_until(ready, 60, "sglctl up to serve", interval=0.05)
                # The supervisor's own start-up is over only once it announced the endpoint.
                wait_until(
                    lambda: "sglctl is up:" in up.log(), 30, "the announcement", interval=0.05
                )
            up.remember_tree()
        return up

    try:
        yield start
    finally:
        for up in started:
            if up.popen.poll() is None:
                up.remember_tree()
                up.popen.send_signal(signal.SIGINT)
                try:
                    up.popen.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    up.popen.kill()
                    up.popen.wait()
            for pid in up.tree:  # belt and braces: never leave anything running
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).kill()
            print(f"----- sglctl up on {up.url} -----\n{up.log()[-5000:]}")


def served_by(client: httpx.Client, router_url: str) -> dict[str, int]:
    return {
        w["url"]: w["requests_total"] for w in client.get(router_url + "/workers").json()["workers"]
    }


class Traffic:
    """Requests in a loop from a background thread, every outcome recorded."""

    def __init__(self, url: str, threads: int = 2) -> None:
        self.url = url
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self) -> None:
        body = {"text": "The quick brown fox " * 8, "sampling_params": {"max_new_tokens": 4}}
        with httpx.Client(timeout=30.0) as client:
            while not self._stop.is_set():
                try:
                    self.statuses.append(client.post(self.url + "/generate", json=body).status_code)
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))


def test_up_serves_heals_a_killed_worker_and_stops_clean(start_up: Callable[..., Up]) -> None:
    up = start_up(dp_size=3)
    table = up.table()
    try:
        slots = table.read_slots()
        assert [s.worker.state for s in slots] == [WorkerState.HEALTHY] * 3
        urls = [s.worker.url for s in slots]
        with httpx.Client(timeout=30.0) as client:
            gen = client.post(
                up.url + "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 4}}
            )
            assert gen.status_code == 200 and "text" in gen.json()
            chat = client.post(
                up.url + "/v1/chat/completions",
                json={
                    "model": "m",
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 4,
                },
            )
            assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]

            def routed() -> set[str]:
                return set(client.get(up.url + "/list_workers").json()["urls"])

            assert routed() == set(urls)
            with Traffic(up.url) as traffic:
                wait_until(lambda: len(traffic.statuses) >= 20, 30, "traffic to flow")
                victim = table.read_worker(1)
                os.kill(victim.pid, signal.SIGKILL)
                removal = wait_until(
                    lambda: victim.url not in routed(),
                    5,
                    "the router to drop the killed worker",
                    0.002,
                )
                wait_until(
                    lambda: table.read_worker(1).state == WorkerState.HEALTHY, 30, "the restart"
                )
                wait_until(lambda: victim.url in routed(), 5, "the router to take the worker back")
                # New prefixes go to the least-loaded tree: the restarted worker's is empty.
                served_before = served_by(client, up.url).get(victim.url, 0)
                prompts = iter(range(10_000))

                def serves_again() -> bool:
                    body = {
                        "text": f"fresh prompt {next(prompts)} " * 20,
                        "sampling_params": {"max_new_tokens": 2},
                    }
                    assert client.post(up.url + "/generate", json=body).status_code == 200
                    return served_by(client, up.url).get(victim.url, 0) > served_before

                wait_until(serves_again, 30, "the restarted worker to serve again")
            restarted = table.read_worker(1)
        print(
            f"router dropped the killed worker {removal * 1000:.1f} ms after kill -9 (HTTP-polled)"
        )
        # What this proves: the supervisor's exit notice (shared-memory table) took the worker
        # out. Only the table source removes workers from the registry (/list_workers), and the
        # router's own health checks (1 s interval, 3 failures: >= 2 s) could not even mark it
        # unhealthy this fast. The ~10 ms figure is a speed target: benchmarks/supervision.py.
        assert removal < 1.5, f"the router kept the dead worker for {removal * 1000:.0f} ms"
        assert restarted.pid != victim.pid and restarted.restarts == 1
        assert traffic.errors == [] and set(traffic.statuses) == {200}, (
            traffic.errors[:3],
            set(traffic.statuses),
        )
        assert len(traffic.statuses) > 40

        status = subprocess.run(
            [*SGLCTL, "status", "--router", up.url, "--json", "--sample-secs", "0.3"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        snapshot = json.loads(status.stdout)
        assert snapshot["source"].startswith("shared memory")
        assert [(w["url"], w["state"]) for w in snapshot["workers"]] == [
            (u, "healthy") for u in urls
        ]
        assert [w["restarts"] for w in snapshot["workers"]] == [0, 1, 0]
        assert sum(w["served"] for w in snapshot["workers"]) >= len(traffic.statuses)
        assert snapshot["router"]["alive"] and snapshot["router"]["latency_p99_ms"] > 0
        frame = subprocess.run(
            [*SGLCTL, "status", "--router", up.url, "--once", "--sample-secs", "0"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert frame.returncode == 0 and frame.stdout.count("healthy") >= 3, frame.stdout
    finally:
        table.close()
    assert up.interrupt() == 0, up.log()
    up.assert_nothing_left()


def test_add_worker_local_and_remove_managed_worker(start_up: Callable[..., Up]) -> None:
    up = start_up(dp_size=1)
    added = subprocess.run(
        [*SGLCTL, "add-worker", "--local", "--router", up.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr + added.stdout
    assert "added worker 1 at http://127.0.0.1:" in added.stdout
    new_url = added.stdout.split(" at ")[1].split()[0]
    with httpx.Client(timeout=10) as client:
        wait_until(
            lambda: new_url in client.get(up.url + "/list_workers").json()["urls"],
            5,
            "the router to add it",
        )
        removed = subprocess.run(
            [*SGLCTL, "remove-worker", new_url, "--router", up.url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert removed.returncode == 0, removed.stderr
        assert "stopped and removed worker 1" in removed.stdout
        wait_until(
            lambda: new_url not in client.get(up.url + "/list_workers").json()["urls"],
            5,
            "the router to drop it",
        )
    with up.table() as table:
        assert [v.worker.state for v in table.read_slots()] == [
            WorkerState.HEALTHY,
            WorkerState.REMOVED,
        ]
    assert up.interrupt() == 0
    up.assert_nothing_left()


def test_killed_supervisor_leaves_no_orphans_and_next_run_replaces_its_table(
    start_up: Callable[..., Up],
) -> None:
    first = start_up(dp_size=1)
    with first.table() as table:
        control_sock = table.info().control_path
    first.remember_tree()
    children = first.tree - {first.popen.pid}
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(timeout=10)

    def gone() -> bool:
        return not any(
            psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
            for p in children
        )

    wait_until(gone, 15, "the children of a killed supervisor to exit (PR_SET_PDEATHSIG)")
    assert first.segment in list_segments()  # the crashed run's table is still there ...
    assert Path(control_sock).exists()  # ... and its control socket
    second = start_up(dp_size=1, port=first.port)  # ... and the next run on that port takes over
    assert "replacing stale state table" in second.log()
    # (the fixture gives both runs the same run dir: the log says the old socket went first)
    assert "removed control socket" in second.log() and "left by the same run" in second.log()
    assert second.interrupt() == 0
    second.assert_nothing_left()


def test_taken_port_is_refused_with_the_flag_to_change(start_up: Callable[..., Up]) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        up = start_up("--worker-base-port", str(taken), dp_size=1, wait=False)
        code = up.popen.wait(timeout=30)
    assert code == 1
    assert f"port {taken} (worker 0) is already in use" in up.log()
    assert "--worker-base-port" in up.log()
    assert up.segment not in list_segments()


def test_ctrl_c_drains_in_flight_requests_before_stopping_workers(
    start_up: Callable[..., Up],
) -> None:
    up = start_up(dp_size=1, worker_args=("--speedup", "1"))
    result: dict[str, object] = {}

    def long_request() -> None:
        body = {
            "text": "Tell me a long story",
            "sampling_params": {"max_new_tokens": 150, "ignore_eos": True},
        }
        with httpx.Client(timeout=60) as client:
            response = client.post(up.url + "/generate", json=body)
            result["status"] = response.status_code
            result["tokens"] = response.json().get("meta_info", {}).get("completion_tokens")

    thread = threading.Thread(target=long_request)
    thread.start()
    with httpx.Client(timeout=5) as client:
        wait_until(
            lambda: client.get(up.url + "/stats").json()["in_flight"] == 1,
            10,
            "the request to be in flight",
        )
    assert up.interrupt() == 0
    thread.join(timeout=60)
    assert result == {"status": 200, "tokens": 150}, up.log()
    up.assert_nothing_left()


def test_killed_router_is_restarted_and_relearns_the_workers(start_up: Callable[..., Up]) -> None:
    up = start_up(dp_size=2)
    with up.table() as table:
        wait_until(lambda: table.read_router_totals().pid != 0, 10, "the router to report its pid")
        old = table.read_router_totals().pid
        os.kill(old, signal.SIGKILL)
        with httpx.Client(timeout=5) as client:

            def serving() -> bool:
                try:
                    return client.get(up.url + "/readiness").json()["healthy_workers"] == 2
                except (httpx.HTTPError, ValueError, KeyError):
                    return False

            wait_until(serving, 30, "the restarted router to serve both workers", interval=0.05)
            assert client.post(up.url + "/generate", json={"text": "x"}).status_code == 200
        wait_until(
            lambda: table.read_router_totals().pid not in (0, old), 10, "the new router's pid"
        )
    assert "the router (pid" in up.log() and "restarting in" in up.log()
    assert up.interrupt() == 0
    up.assert_nothing_left()


def test_ctrl_c_during_start_up_stops_everything(start_up: Callable[..., Up]) -> None:
    # A health path the workers never pass: start-up would wait for the full timeout.
    up = start_up("--worker-health-path", "/never-healthy", dp_size=2, wait=False)
    wait_until(lambda: _attachable(up.segment), 30, "the state table")
    with up.table() as table:
        wait_until(
            lambda: len([v for v in table.read_slots() if v.worker.pid]) == 2,
            30,
            "both workers to spawn",
        )
        states = {v.worker.state for v in table.read_slots()}
    assert states == {WorkerState.STARTING}
    up.remember_tree()
    assert up.interrupt(timeout=30) == 0, up.log()
    up.assert_nothing_left()


def _attachable(name: str) -> bool:
    """The table exists *and* is complete: the segment appears before its header is written
    (the magic last), so a reader that attaches at once can see a half-made table."""
    try:
        with StateTable.attach(name):
            return True
    except (StateTableError, FileNotFoundError):
        return False


def _flag(up: Up, flag: str) -> str:
    args = list(up.popen.args)  # type: ignore[arg-type]
    return str(args[len(args) - 1 - args[::-1].index(flag) + 1])


def test_second_up_on_taken_ports_names_every_conflict_at_once(
    start_up: Callable[..., Up],
) -> None:
    first = start_up(dp_size=2)
    same = ("--metrics-port", _flag(first, "--metrics-port"))
    same += ("--worker-base-port", _flag(first, "--worker-base-port"))
    run_dir = first.run_dir.with_name("second-run")
    second = start_up(*same, "--run-dir", str(run_dir), dp_size=2, port=first.port, wait=False)
    assert second.popen.wait(timeout=60) == 1
    out = second.log()
    for flag in ("--port", "--metrics-port", "--worker-base-port"):
        assert f"pass {flag} " in out, out
    assert "Traceback" not in out
    assert not run_dir.exists(), "a refused start left a run directory"
    with httpx.Client(timeout=10) as client:  # the first run is untouched
        assert client.get(first.url + "/readiness").json()["status"] == "ready"
    assert first.interrupt() == 0
    first.assert_nothing_left()


def test_hung_worker_leaves_healthy_within_seconds_and_comes_back(
    start_up: Callable[..., Up],
) -> None:
    up = start_up(dp_size=2)
    with up.table() as table:
        victim = table.read_worker(1)
        os.kill(victim.pid, signal.SIGSTOP)  # alive, accepts connections, answers nothing
        try:
            took = wait_until(
                lambda: table.read_worker(1).state != WorkerState.HEALTHY,
                6.0,
                "the supervisor to mark the SIGSTOPped worker unhealthy",
                0.02,
            )
            assert table.read_worker(1).state == WorkerState.UNHEALTHY
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        print(f"hung worker out of the healthy state {took:.2f} s after SIGSTOP")
        wait_until(
            lambda: table.read_worker(1).state == WorkerState.HEALTHY, 20, "the worker to recover"
        )
        back = table.read_worker(1)
        assert back.pid == victim.pid and back.restarts == 0, "a slow worker must not be restarted"
    log = (up.run_dir / "supervisor.log").read_text()  # not wrapped like the terminal
    assert "health checks in a row" in log and "back in routing" in log, log
    assert up.interrupt() == 0
    up.assert_nothing_left()


def test_ctrl_c_is_not_held_up_by_a_pending_add_worker_local(
    start_up: Callable[..., Up],
) -> None:
    up = start_up(dp_size=1)
    add = subprocess.Popen(
        [*SGLCTL, "add-worker", "--local", "--router", up.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with up.table() as table:
            wait_until(lambda: table.read_worker(1).pid != 0, 30, "the added worker to spawn")
            new = table.read_worker(1)
            os.kill(new.pid, signal.SIGSTOP)  # it never gets healthy: the add stays pending
            assert table.read_worker(1).state == WorkerState.STARTING
        up.remember_tree()
        started = time.monotonic()
        assert up.interrupt(timeout=60) == 0, up.log()
        took = time.monotonic() - started
        _, err = add.communicate(timeout=30)
    finally:
        if add.poll() is None:
            add.kill()
            add.wait()
    print(f"Ctrl-C with a pending add-worker --local took {took:.2f} s")
    assert took < 15, f"shutdown took {took:.1f} s with an add-worker pending"
    assert add.returncode == 1 and "shutting down" in err, err
    assert "Traceback" not in err and "Traceback" not in up.log()
    up.assert_nothing_left()
