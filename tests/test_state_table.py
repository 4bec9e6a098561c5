"""The shared-memory state table: layout, seqlock consistency, stale segments, lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator

import pytest

from sglctl.router.state_table_source import StateTableSource
from sglctl.router.workers import WorkerRegistry
from sglctl.state_table import (
    RouterColumns,
    RouterTotals,
    StateTable,
    StateTableError,
    WorkerSlot,
    WorkerState,
    list_segments,
    remove_stale_segments,
)
from tests.support import wait_until


@pytest.fixture
def name() -> Iterator[str]:
    seg = f"sglctl_test_{uuid.uuid4().hex[:10]}"
    yield seg
    try:
        table = StateTable.attach(seg)
    except StateTableError:
        return
    table.unlink()
    table.close()


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=30
    )


def test_roundtrip_between_writer_and_reader(name: str) -> None:
    table, stale = StateTable.create(
        name, n_slots=4, router_url="http://127.0.0.1:30000", control_path="/tmp/c.sock", model="m"
    )
    assert stale == []
    slot = WorkerSlot(
        state=WorkerState.HEALTHY,
        worker_id=1,
        pid=1234,
        restarts=2,
        url="http://127.0.0.1:31001",
        gpus="2,3",
    )
    gen0 = table.generation()
    table.write_slot(1, slot)
    assert table.generation() == gen0 + 1

    reader = StateTable.attach(name)
    info = reader.info()
    assert (info.router_url, info.control_path, info.model, info.n_slots) == (
        "http://127.0.0.1:30000",
        "/tmp/c.sock",
        "m",
        4,
    )
    assert info.owner_pid == os.getpid() and info.owner_alive()
    views = reader.read_slots()
    assert [v.index for v in views] == [1]
    assert views[0].worker == slot

    reader.write_router_columns(1, RouterColumns(in_flight=3, served=10, errors=1, updated_at=5.0))
    reader.write_router_totals(RouterTotals(pid=99, requests=10, p99_ms=12.5))
    assert table.read_router_columns(1) == RouterColumns(3, 10, 1, 5.0)
    assert table.read_router_totals().p99_ms == 12.5
    # The router's columns do not disturb the supervisor's part, nor the generation.
    assert table.read_worker(1) == slot
    assert table.generation() == gen0 + 1
    reader.close()
    table.unlink()
    table.close()
    assert name not in list_segments()


def test_free_slot_prefers_empty_then_removed(name: str) -> None:
    table, _ = StateTable.create(name, n_slots=2)
    assert table.free_slot() == 0
    table.write_slot(0, WorkerSlot(state=WorkerState.HEALTHY, url="http://a"))
    table.write_slot(1, WorkerSlot(state=WorkerState.REMOVED, url="http://b"))
    assert table.free_slot() == 1
    table.write_slot(1, WorkerSlot(state=WorkerState.HEALTHY, url="http://b"))
    assert table.free_slot() is None
    with pytest.raises(IndexError):
        table.write_slot(2, WorkerSlot())
    table.unlink()
    table.close()


def test_too_long_url_is_refused(name: str) -> None:
    table, _ = StateTable.create(name, n_slots=1)
    with pytest.raises(ValueError, match="longer than"):
        table.write_slot(0, WorkerSlot(url="http://" + "x" * 200))
    table.unlink()
    table.close()


# Every field of a part written with one k encodes that k, so a reader can tell a consistent
# copy from a torn one. Nothing is skipped: an all-zero copy (what a tear looked like when
# ``struct.pack_into`` zeroed the sequence word mid-write) fails the check as any tear does.
_WRITERS = {
    "worker": """
        def write(k):
            t.write_slot(0, WorkerSlot(
                state=WorkerState(1 + k % 6), worker_id=k, pid=k, pid_create_time=k + 0.5,
                restarts=k, exit_code=k, started_at=k + 0.5, changed_at=k + 0.5,
                healthy_since=k + 0.5, url="http://w:" + "9" * (k % 50) + str(k), gpus=str(k)))
    """,
    "router_columns": """
        def write(k):
            t.write_router_columns(0, RouterColumns(k, k, k, k + 0.5))
    """,
    "router_totals": """
        def write(k):
            t.write_router_totals(RouterTotals(k, k + 0.5, k, k, k, k + 0.5, k + 0.5))
    """,
}


def _k_of(table: StateTable, part: str) -> int:
    """Read ``part`` once and return its k, asserting every field agrees with it."""
    if part == "worker":
        s = table.read_worker(0)
        k = s.pid
        assert s.state == WorkerState(1 + k % 6), s
        assert (s.worker_id, s.restarts, s.exit_code) == (k, k, k), s
        assert {s.pid_create_time, s.started_at, s.changed_at, s.healthy_since} == {k + 0.5}, s
        assert (s.url, s.gpus) == ("http://w:" + "9" * (k % 50) + str(k), str(k)), s
        return k
    if part == "router_columns":
        c = table.read_router_columns(0)
        assert (c.in_flight, c.served, c.errors, c.updated_at) == (c.served,) * 3 + (
            c.served + 0.5,
        ), c
        return c.served
    r = table.read_router_totals()
    assert (r.pid, r.requests, r.errors, r.in_flight) == (r.requests,) * 4, r
    assert (r.heartbeat, r.p50_ms, r.p99_ms) == (r.requests + 0.5,) * 3, r
    return r.requests


@pytest.mark.parametrize("part", sorted(_WRITERS))
def test_reader_never_sees_a_torn_slot(name: str, part: str) -> None:
    """A writer process rewrites one part as fast as it can, every field derived from one k;
    every single read must return fields that agree (k = 0 is written before it starts)."""
    table, _ = StateTable.create(name, n_slots=1)
    code = (
        "import sys\n"
        "from sglctl.state_table import *\n"
        f"t = StateTable.attach({name!r})\n"
        + textwrap.dedent(_WRITERS[part])
        + "write(0)\nprint('ready', flush=True)\n"
        + "k = 0\nwhile True:\n    k += 1\n    write(k)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    try:
        assert writer.stdout.readline().strip() == "ready"
        seen: set[int] = set()
        reads = 0
        start = time.monotonic()
        # At least 1.5 s and 200 distinct values from the writer; a writer starved by a busy
        # machine gets up to 30 s before the test says it never made progress.
        while time.monotonic() - start < 1.5 or len(seen) < 200:
            seen.add(_k_of(table, part))
            reads += 1
            assert time.monotonic() - start < 30, f"the writer made no progress ({len(seen)})"
        assert reads > len(seen) / 2
    finally:
        writer.kill()
        writer.wait()
    table.unlink()
    table.close()


def test_attaching_process_exit_does_not_remove_segment(name: str) -> None:
    # Before Python 3.13 the resource tracker unlinks segments a process merely attached to.
    table, _ = StateTable.create(name, n_slots=1)
    result = _run(
        f"""
        from sglctl.state_table import StateTable
        t = StateTable.attach({name!r}); print(t.info().n_slots); t.close()
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
    assert "leaked" not in result.stderr
    assert name in list_segments()
    table.unlink()
    table.close()


def test_live_owner_is_refused_with_a_message(name: str) -> None:
    table, _ = StateTable.create(name, n_slots=1, router_url="http://127.0.0.1:30000")
    with pytest.raises(StateTableError, match=r"another `sglctl up` \(pid \d+"):
        StateTable.create(name, n_slots=1)
    table.unlink()
    table.close()


def test_stale_segment_of_a_crashed_owner_is_replaced(name: str) -> None:
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from sglctl.state_table import StateTable, WorkerSlot, WorkerState
                t, _ = StateTable.create({name!r}, n_slots=2)
                t.write_slot(0, WorkerSlot(state=WorkerState.HEALTHY, pid=4242, url="http://old:1"))
                print("ready", flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    assert owner.stdout.readline().strip() == "ready"
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    assert name in list_segments()

    table, stale = StateTable.create(name, n_slots=3)
    assert [s.url for s in stale] == ["http://old:1"]
    assert stale[0].pid == 4242
    assert table.info().owner_pid == os.getpid()
    assert table.n_slots == 3
    assert table.read_slots() == []
    table.unlink()
    table.close()


def test_attach_missing_or_foreign_segment_fails_clearly(name: str) -> None:
    with pytest.raises(StateTableError, match="is `sglctl up` running"):
        StateTable.attach(name)
    from multiprocessing import shared_memory

    from sglctl.shm import open_segment as _open
    from sglctl.shm import untracked as _untracked

    foreign = _open(name, create=True, size=4096)
    assert foreign.buf is not None
    foreign.buf[:8] = b"NOTOURS!"
    try:
        with pytest.raises(StateTableError, match="not an sglctl state table"):
            StateTable.attach(name)
        with pytest.raises(StateTableError, match="remove /dev/shm"):
            StateTable.create(name)
    finally:
        assert isinstance(foreign, shared_memory.SharedMemory)
        foreign.close()
        with _untracked():
            foreign.unlink()


# -- the router-side reader -------------------------------------------------------------------
def _source_on(name: str) -> tuple[StateTableSource, WorkerRegistry]:
    source = StateTableSource(name)
    source._table = StateTable.attach(name)
    return source, WorkerRegistry()


def test_source_follows_slot_states_into_the_registry(name: str) -> None:
    table, _ = StateTable.create(name, n_slots=4)
    source, registry = _source_on(name)
    url = "http://127.0.0.1:31000"

    def publish(state: WorkerState, pid: int = 10) -> None:
        table.write_slot(0, WorkerSlot(state=state, pid=pid, url=url))
        source.sync(registry)

    publish(WorkerState.STARTING)
    assert url not in registry
    publish(WorkerState.HEALTHY)
    worker = registry.get(url)
    assert worker is not None and worker.is_routable()
    worker.requests_total, worker.errors_total = 7, 1
    publish(WorkerState.UNHEALTHY)
    assert registry.get(url) is worker and not worker.is_routable()
    publish(WorkerState.HEALTHY)
    assert worker.is_routable()
    publish(WorkerState.RESTARTING)  # the process died: out at once
    assert url not in registry
    publish(WorkerState.HEALTHY, pid=11)  # the restarted process: a fresh worker
    fresh = registry.get(url)
    assert fresh is not None and fresh is not worker and fresh.is_routable()
    fresh.requests_total = 2
    source.write_columns(registry)
    cols = table.read_router_columns(0)
    assert (cols.served, cols.errors) == (9, 1)  # counters carry over the restart
    publish(WorkerState.FAILED, pid=11)
    assert url not in registry
    assert source._table is not None
    source._table.close()
    table.unlink()
    table.close()


def test_source_is_edge_triggered_so_admin_removal_sticks(name: str) -> None:
    table, _ = StateTable.create(name, n_slots=4)
    source, registry = _source_on(name)
    table.write_slot(0, WorkerSlot(state=WorkerState.HEALTHY, pid=5, url="http://a:1"))
    source.sync(registry)
    registry.remove("http://a:1")  # an operator, through the admin API
    table.write_slot(1, WorkerSlot(state=WorkerState.HEALTHY, pid=6, url="http://b:1"))
    source.sync(registry)
    assert [w.url for w in registry.all()] == ["http://b:1"]
    # A slot reused for another URL drops the old worker.
    table.write_slot(1, WorkerSlot(state=WorkerState.HEALTHY, pid=7, url="http://c:1"))
    source.sync(registry)
    assert [w.url for w in registry.all()] == ["http://c:1"]
    assert source._table is not None
    source._table.close()
    table.unlink()
    table.close()


def test_source_run_reacts_within_its_poll_interval(name: str) -> None:
    table, _ = StateTable.create(name, n_slots=2)
    table.write_slot(0, WorkerSlot(state=WorkerState.HEALTHY, pid=5, url="http://a:1"))
    registry = WorkerRegistry()

    async def scenario() -> float:
        task = asyncio.create_task(StateTableSource(name).run(registry))
        try:
            while "http://a:1" not in registry:
                await asyncio.sleep(0.001)
            start = time.monotonic()
            table.write_slot(0, WorkerSlot(state=WorkerState.RESTARTING, pid=5, url="http://a:1"))
            while "http://a:1" in registry:
                await asyncio.sleep(0.001)
                assert time.monotonic() - start < 5
            took = time.monotonic() - start
            # The router's totals reach the header too.
            while table.read_router_totals().pid != os.getpid():
                await asyncio.sleep(0.01)
            return took
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    took = asyncio.run(scenario())
    assert took < 0.1, f"{took * 1000:.0f} ms"
    table.unlink()
    table.close()


def test_source_keeps_a_worker_whose_slot_is_rewritten_all_the_time(name: str) -> None:
    """The supervisor rewrites a healthy worker's slot (same url, state and pid) over and over;
    the router must never read a torn or all-zero slot as a URL change and drop the worker."""
    table, _ = StateTable.create(name, n_slots=1)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                from sglctl.state_table import StateTable, WorkerSlot, WorkerState
                t = StateTable.attach({name!r})
                k = 0
                while True:
                    k += 1
                    t.write_slot(0, WorkerSlot(state=WorkerState.HEALTHY, pid=77,
                                               url="http://127.0.0.1:31000", changed_at=k))
                """
            ),
        ]
    )
    source, registry = _source_on(name)
    try:
        wait_until(lambda: table.read_worker(0).pid == 77, timeout=30, what="the writer")
        source.sync(registry)
        worker = registry.get("http://127.0.0.1:31000")
        assert worker is not None
        start = time.monotonic()
        syncs = 0
        while time.monotonic() - start < 1.5:
            source.sync(registry)
            syncs += 1
            assert registry.get("http://127.0.0.1:31000") is worker, f"dropped after {syncs}"
    finally:
        writer.kill()
        writer.wait()
        assert source._table is not None
        source._table.close()
    table.unlink()
    table.close()


# -- stale segments ---------------------------------------------------------------------------
def _segment_of_a_killed_owner(name: str) -> int:
    """Create table ``name`` in a process, SIGKILL it (as kill -9 of `sglctl up` does), and
    return the dead owner's pid. The segment stays behind."""
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import time
                from sglctl.state_table import StateTable, WorkerSlot, WorkerState
                t, _ = StateTable.create({name!r}, n_slots=2, control_path="/tmp/x.sock")
                t.write_slot(0, WorkerSlot(state=WorkerState.HEALTHY, pid=4242, url="http://o:1"))
                print("ready", flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    assert owner.stdout.readline().strip() == "ready"
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    assert name in list_segments()
    return owner.pid


def test_remove_stale_segments_removes_only_tables_of_dead_owners(name: str) -> None:
    dead_pid = _segment_of_a_killed_owner(name)
    live = f"sglctl_test_{uuid.uuid4().hex[:10]}"
    foreign = f"sglctl_test_{uuid.uuid4().hex[:10]}"
    live_table, _ = StateTable.create(live, n_slots=1)
    from sglctl.shm import open_segment as _open
    from sglctl.state_table import _unlink

    not_ours = _open(foreign, create=True, size=4096)  # no magic: foreign, or being created
    try:
        removed = remove_stale_segments()
        assert [(i.name, i.owner_pid, i.control_path) for i in removed if i.name == name] == [
            (name, dead_pid, "/tmp/x.sock")
        ]
        found = list_segments()
        assert name not in found
        assert live in found and foreign in found
        assert live not in [i.name for i in removed]
    finally:
        live_table.unlink()
        live_table.close()
        not_ours.close()
        _unlink(foreign)


def test_a_stale_table_of_another_layout_version_is_replaced(name: str) -> None:
    _segment_of_a_killed_owner(name)
    from sglctl.shm import open_segment as _open

    old = _open(name)
    assert old.buf is not None
    old.buf[8:12] = (1).to_bytes(4, "little")  # what sglctl before layout version 2 wrote
    old.close()
    with pytest.raises(StateTableError, match="layout version 1"):
        StateTable.attach(name)
    table, stale = StateTable.create(name, n_slots=1)
    assert stale == []  # its slots cannot be read, but the segment no longer blocks the port
    assert table.info().owner_pid == os.getpid()
    table.unlink()
    table.close()


def test_sglctl_status_removes_a_segment_whose_owner_is_dead(name: str) -> None:
    from sglctl.net import find_free_port

    _segment_of_a_killed_owner(name)
    url = f"http://127.0.0.1:{find_free_port()}"
    result = _run(
        f"""
        import sys
        from sglctl.cli import app
        sys.argv = ["sglctl", "status", "--router", {url!r}, "--once"]
        app()
        """
    )
    assert result.returncode == 1, result.stderr  # no router answers there: that is fine
    assert name not in list_segments()
    assert f"removed stale shared-memory segment {name}" in result.stderr


def test_role_and_bootstrap_port_round_trip_and_reach_the_registry(name: str) -> None:
    """A PD layout's slots carry each worker's pool; the router registers it there, a prefill
    with the bootstrap port the decode side is sent to."""
    table, _ = StateTable.create(name, n_slots=4)
    slots = [
        WorkerSlot(state=WorkerState.HEALTHY, pid=5, url="http://a:1", role="prefill",
                   bootstrap_port=8998),
        WorkerSlot(state=WorkerState.HEALTHY, pid=6, url="http://b:1", role="decode"),
        WorkerSlot(state=WorkerState.HEALTHY, pid=7, url="http://c:1"),
    ]  # fmt: skip
    for index, slot in enumerate(slots):
        table.write_slot(index, slot)
    with StateTable.attach(name) as reader:
        assert [v.worker for v in reader.read_slots()] == slots
    source, registry = _source_on(name)
    source.sync(registry)
    workers = {w.url: (w.role, w.bootstrap_port) for w in registry.all()}
    assert workers == {
        "http://a:1": ("prefill", 8998),
        "http://b:1": ("decode", None),
        "http://c:1": ("regular", None),
    }
    assert [w.url for w in registry.routable(role="prefill")] == ["http://a:1"]
    assert source._table is not None
    source._table.close()
    table.unlink()
    table.close()
