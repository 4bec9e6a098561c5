"""Process supervision with a fake worker command: exits, restarts, crash loops, trees, logs.

The supervisor runs in the test's own event loop (no router); workers are real processes
(``tests/fakes/fake_worker.py``) on free 127.0.0.1 ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from sglctl.net import find_free_port
from sglctl.state_table import (
    StateTable,
    StateTableError,
    WorkerState,
    list_segments,
    remove_stale_segments,
)
from sglctl.supervisor import control
from sglctl.supervisor.backoff import Attempt, CrashHistory, RestartPolicy, keep_restarting
from sglctl.supervisor.core import Supervisor, SupervisorSettings
from sglctl.supervisor.logfile import RotatingLog
from sglctl.supervisor.plan import WorkerFactory, WorkerSpec
from sglctl.supervisor.worker import HealthSettings
from tests.support import async_wait_until

FAKE = str(Path(__file__).parent / "fakes" / "fake_worker.py")
FAST_POLICY = RestartPolicy(
    initial_backoff=0.05, max_backoff=0.2, reset_after=60, max_crashes=3, window=60
)


def fake_spec(worker_id: int, *flags: str, port: int | None = None) -> WorkerSpec:
    port = port or find_free_port()
    return WorkerSpec(
        worker_id=worker_id, port=port, argv=(sys.executable, FAKE, "--port", str(port), *flags)
    )


@pytest.fixture
def table() -> Iterator[StateTable]:
    name = f"sglctl_test_{uuid.uuid4().hex[:10]}"
    tbl, _ = StateTable.create(name, n_slots=8)
    yield tbl
    tbl.unlink()
    tbl.close()
    assert name not in list_segments()


def settings(tmp_path: Path, **overrides: object) -> SupervisorSettings:
    base: dict[str, object] = dict(
        run_dir=tmp_path / "run",
        policy=FAST_POLICY,
        health=HealthSettings(
            startup_timeout=20, interval=0.1, failures=2, unhealthy_restart_after=0
        ),
        worker_stop_timeout=2.0,
        install_signal_handlers=False,
    )
    base.update(overrides)
    return SupervisorSettings(**base)  # type: ignore[arg-type]


def run_supervised(sup: Supervisor, scenario: Callable[[], Awaitable[None]]) -> None:
    """Run the supervisor and ``scenario`` together; stop the supervisor afterwards."""

    async def main() -> None:
        runner = asyncio.create_task(sup.run())
        try:
            await async_wait_until(
                lambda: (
                    (bool(sup.workers) and all(w.settled.done() for w in sup.workers.values()))
                    or runner.done()
                )
            )
            await scenario()
        finally:
            sup.request_stop()
            await asyncio.wait_for(runner, 30)

    asyncio.run(main())


def state(table: StateTable, slot: int) -> WorkerState:
    return table.read_worker(slot).state


def test_killed_worker_is_marked_at_once_and_restarted(tmp_path: Path, table: StateTable) -> None:
    sup = Supervisor(settings(tmp_path), table, [fake_spec(0), fake_spec(1)])
    pids: dict[str, int] = {}

    async def scenario() -> None:
        assert [state(table, i) for i in (0, 1)] == [WorkerState.HEALTHY] * 2
        old = table.read_worker(1)
        pids["old"] = old.pid
        os.kill(old.pid, signal.SIGKILL)
        took = await async_wait_until(
            lambda: state(table, 1) != WorkerState.HEALTHY, 1.0, "the exit to be published"
        )
        assert took < 0.1, f"the kill took {took * 1000:.0f} ms to reach the table"
        assert state(table, 1) == WorkerState.RESTARTING
        await async_wait_until(lambda: state(table, 1) == WorkerState.HEALTHY, 15, "the restart")
        new = table.read_worker(1)
        assert new.pid != old.pid and new.restarts == 1
        pids["new"] = new.pid
        assert state(table, 0) == WorkerState.HEALTHY and table.read_worker(0).restarts == 0

    run_supervised(sup, scenario)
    assert sup.exit_code == 0
    assert not psutil.pid_exists(pids["new"])
    log_text = (tmp_path / "run" / "workers" / "worker-1.log").read_text()
    assert "was killed by SIGKILL; restarting in" in log_text
    assert log_text.count("fake worker listening") == 2


def test_always_crashing_worker_ends_failed_while_others_serve(
    tmp_path: Path, table: StateTable
) -> None:
    changes: list[tuple[int, WorkerState]] = []
    sup = Supervisor(
        settings(tmp_path),
        table,
        [fake_spec(0), fake_spec(1, "--exit-after", "0", "--exit-code", "7")],
    )
    sup.listener = lambda w, s, detail: changes.append((w.worker_id, s))

    async def scenario() -> None:
        assert state(table, 1) == WorkerState.FAILED
        assert state(table, 0) == WorkerState.HEALTHY
        assert table.read_worker(1).restarts == FAST_POLICY.max_crashes - 1
        assert table.read_worker(1).exit_code == 7
        assert (
            not psutil.pid_exists(table.read_worker(1).pid)
            or psutil.Process(table.read_worker(1).pid).status() == "zombie"
        )

    run_supervised(sup, scenario)
    assert (1, WorkerState.FAILED) in changes
    assert (0, WorkerState.FAILED) not in changes


def test_whole_tree_is_stopped_even_a_term_ignoring_worker(
    tmp_path: Path, table: StateTable
) -> None:
    sup = Supervisor(
        settings(tmp_path, worker_stop_timeout=0.5),
        table,
        [fake_spec(0, "--fork-child"), fake_spec(1, "--fork-child", "--ignore-term")],
    )
    tree: list[int] = []

    async def scenario() -> None:
        for index in (0, 1):
            pid = table.read_worker(index).pid
            leader = psutil.Process(pid)

            def has_child(leader: psutil.Process = leader) -> bool:
                return bool(leader.children())

            await async_wait_until(has_child, 10, "the grandchild")
            tree.extend([pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))])

    run_supervised(sup, scenario)
    assert len(tree) == 4
    assert [pid for pid in tree if psutil.pid_exists(pid)] == []


def test_worker_that_never_gets_healthy_is_killed_and_counted(
    tmp_path: Path, table: StateTable
) -> None:
    health = HealthSettings(
        startup_timeout=0.3, interval=0.1, failures=2, unhealthy_restart_after=0
    )
    policy = RestartPolicy(initial_backoff=0.01, max_crashes=2, window=60)
    sup = Supervisor(
        settings(tmp_path, health=health, policy=policy), table, [fake_spec(0, "--never-healthy")]
    )
    pids: list[int] = []
    states: list[WorkerState] = []

    def record(worker: object, new_state: WorkerState, detail: str) -> None:
        pids.append(sup.workers[0].slot.pid)
        states.append(new_state)

    sup.listener = record

    async def scenario() -> None:
        # The supervisor gives up by itself: its only worker failed. Wait for that verdict:
        # run_supervised returns as soon as the worker settled, and a stop request that
        # reaches start() in the same loop turn as the failure is a plain stop (exit 0), which
        # made this test fail now and then on a loaded machine.
        await async_wait_until(lambda: sup.exit_code == 1, 10, "the supervisor to give up")

    run_supervised(sup, scenario)
    assert sup.exit_code == 1
    assert WorkerState.FAILED in states and WorkerState.HEALTHY not in states
    assert len(set(pids)) == 2 and not any(psutil.pid_exists(p) for p in set(pids))
    assert (
        "did not pass its health check within 0.3 s"
        in (tmp_path / "run" / "workers" / "worker-0.log").read_text()
    )


def test_unhealthy_worker_is_marked_then_replaced(tmp_path: Path, table: StateTable) -> None:
    health = HealthSettings(
        startup_timeout=20, interval=0.05, failures=2, unhealthy_restart_after=0.3
    )
    sup = Supervisor(
        settings(tmp_path, health=health), table, [fake_spec(0, "--unhealthy-after", "0.5")]
    )
    seen: list[WorkerState] = []
    sup.listener = lambda w, s, d: seen.append(s)

    async def scenario() -> None:
        await async_wait_until(
            lambda: table.read_worker(0).restarts >= 1, 15, "a restart of the unhealthy worker"
        )

    run_supervised(sup, scenario)
    assert seen[:4] == [
        WorkerState.STARTING,
        WorkerState.HEALTHY,
        WorkerState.UNHEALTHY,
        WorkerState.RESTARTING,
    ]


def test_add_and_remove_workers_over_the_control_socket(tmp_path: Path, table: StateTable) -> None:
    socket_path = tmp_path / "run" / "control.sock"
    base = find_free_port()
    factory = WorkerFactory(backend="sim", model="m", tp_size=1, gpu_pool=[], extra=[])
    sup = Supervisor(
        settings(tmp_path, control_path=socket_path),
        table,
        [fake_spec(0, port=base)],
        factory,
        base,
    )
    # Make added workers fake ones too (the factory builds sim-worker command lines).
    real_make = factory.make

    def make(
        worker_id: int, used_ports: set[int], used_gpus: set[int], base_port: int, **kw: Any
    ) -> WorkerSpec:
        spec = real_make(worker_id, used_ports, used_gpus, base_port, **kw)
        return fake_spec(worker_id, port=spec.port)

    factory.make = make  # type: ignore[method-assign]

    async def scenario() -> None:
        listed = await asyncio.to_thread(control.call, str(socket_path), {"op": "list"})
        assert [w["url"] for w in listed["workers"]] == [f"http://127.0.0.1:{base}"]
        added = await asyncio.to_thread(control.call, str(socket_path), {"op": "add"})
        assert added["state"] == "healthy" and added["worker_id"] == 1
        assert state(table, 1) == WorkerState.HEALTHY
        assert table.read_worker(1).url == added["url"] != listed["workers"][0]["url"]
        removed = await asyncio.to_thread(
            control.call, str(socket_path), {"op": "remove", "url": added["url"]}
        )
        assert removed["state"] == "removed"
        assert state(table, 1) == WorkerState.REMOVED
        assert not psutil.pid_exists(added["pid"])
        with pytest.raises(control.ControlError, match="not a worker"):
            await asyncio.to_thread(
                control.call, str(socket_path), {"op": "remove", "url": "http://nope:1"}
            )
        with pytest.raises(control.ControlError, match="unknown op"):
            await asyncio.to_thread(control.call, str(socket_path), {"op": "explode"})
        # The removed slot is reused by the next add.
        again = await asyncio.to_thread(control.call, str(socket_path), {"op": "add"})
        assert table.read_worker(1).url == again["url"]

    run_supervised(sup, scenario)
    assert not socket_path.exists()


def test_backoff_doubles_caps_resets_and_gives_up() -> None:
    now = [0.0]
    history = CrashHistory(
        RestartPolicy(1.0, 8.0, reset_after=60, max_crashes=6, window=100), clock=lambda: now[0]
    )
    delays = [history.record_crash() for _ in range(5)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert history.record_crash() is None  # 6 crashes within the window
    now[0] = 500.0  # the window has passed
    assert history.record_crash(healthy_for=120) == 1.0  # healthy long enough: reset


class CrashingChild:
    """A Restartable that ends every run at once, recording what the loop told it."""

    def __init__(self) -> None:
        self.runs: list[bool] = []
        self.delays: list[float] = []
        self.gave_up: Attempt | None = None

    async def attempt(self, first: bool) -> Attempt:
        self.runs.append(first)
        return Attempt("exited with code 1", up_for=0.0, pid=len(self.runs))

    def restarting(self, attempt: Attempt, delay: float, crashes: CrashHistory) -> None:
        self.delays.append(delay)

    def given_up(self, attempt: Attempt, crashes: CrashHistory) -> None:
        self.gave_up = attempt


def test_the_one_restart_loop_backs_off_then_gives_up() -> None:
    child = CrashingChild()
    policy = RestartPolicy(0.001, 0.004, reset_after=60, max_crashes=4, window=60)
    asyncio.run(keep_restarting(child, CrashHistory(policy), lambda: False))
    assert child.runs == [True, False, False, False]  # only the first run is "first"
    assert child.delays == [0.001, 0.002, 0.004]
    assert child.gave_up is not None and child.gave_up.pid == 4


def test_the_restart_loop_stops_when_asked() -> None:
    child = CrashingChild()
    asyncio.run(keep_restarting(child, CrashHistory(FAST_POLICY), lambda: len(child.runs) >= 2))
    assert len(child.runs) == 2 and child.gave_up is None


def test_rotating_log_keeps_backups_and_tail(tmp_path: Path) -> None:
    logfile = RotatingLog(tmp_path / "w.log", max_bytes=100, backups=2)
    for i in range(30):
        logfile.write(f"line {i:03d} {'x' * 10}\n".encode())
    logfile.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["w.log", "w.log.1", "w.log.2"]
    assert all(p.stat().st_size <= 100 for p in tmp_path.iterdir())
    assert logfile.tail(2).splitlines() == [f"line 028 {'x' * 10}", f"line 029 {'x' * 10}"]


def test_find_local_run_explains_when_nothing_runs() -> None:
    with pytest.raises(control.ControlError, match="no running `sglctl up` behind"):
        control.find_local_run(f"http://127.0.0.1:{find_free_port()}")
    assert control.port_of("http://h:31000") == 31000 and control.port_of("8080") == 8080
    with pytest.raises(StateTableError):
        StateTable.attach("sglctl_nonexistent_for_test")


def test_control_socket_of_a_killed_supervisor_is_removed_and_a_live_ones_kept(
    tmp_path: Path,
) -> None:
    name = f"sglctl_test_{uuid.uuid4().hex[:10]}"
    dead_sock = tmp_path / "dead.sock"
    script = (
        "import socket, sys, time\n"
        "from sglctl.state_table import StateTable\n"
        f"StateTable.create({name!r}, n_slots=1, control_path={str(dead_sock)!r})\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(" + repr(str(dead_sock)) + ")\n"
        "print('ready', flush=True); time.sleep(60)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    live_name = f"sglctl_test_{uuid.uuid4().hex[:10]}"
    live_sock = tmp_path / "live.sock"
    live, _ = StateTable.create(live_name, n_slots=1, control_path=str(live_sock))
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "ready"
        with socket.socket(socket.AF_UNIX) as mine:
            mine.bind(str(live_sock))
            owner.kill()  # kill -9: no chance to clean up
            owner.wait(timeout=10)
            assert dead_sock.exists()
            removed = [info.control_path for info in remove_stale_segments()]
            assert str(dead_sock) in removed and not dead_sock.exists()
            assert live_sock.exists(), "the socket of a live run was removed"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        live.unlink()
        live.close()
        with contextlib.suppress(StateTableError), StateTable.attach(name) as stale:
            stale.unlink()
