"""Under ``sglctl up`` the supervisor owns its workers' health (issue 10, issue 9 item 3).

Workers that come from the shared-memory state table are not probed by the router's
``HealthChecker``; a supervisor mark (unhealthy, restarting, failed) interrupts their
requests in flight exactly as a health ejection does, so a request stuck on a hung worker is
retried on another one instead of waiting for ``--request-timeout-secs``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import httpx
import pytest
from support import async_wait_until
from test_router_app import HostTransport, Stub, make_config

from sglctl.router.app import create_app
from sglctl.router.health import HealthChecker
from sglctl.router.router import Router
from sglctl.router.state_table_source import StateTableSource
from sglctl.router.workers import WorkerRegistry
from sglctl.state_table import StateTable, WorkerSlot, WorkerState


@pytest.fixture
def table() -> Iterator[StateTable]:
    name = f"sglctl_test_{uuid.uuid4().hex[:10]}"
    created, _ = StateTable.create(name, n_slots=4)
    try:
        yield created
    finally:
        created.unlink()
        created.close()


def test_supervisor_workers_are_not_probed_and_marks_report_sick(table: StateTable) -> None:
    sick: list[tuple[str, str]] = []
    source = StateTableSource(table.name, on_sick=lambda url, why: sick.append((url, why)))
    source._table = StateTable.attach(table.name)
    registry = WorkerRegistry()
    try:
        table.write_slot(0, WorkerSlot(state=WorkerState.HEALTHY, pid=5, url="http://127.0.0.1:9"))
        source.sync(registry)
        worker = registry.get("http://127.0.0.1:9")
        assert worker is not None and worker.source == "supervisor"
        # Nothing listens on port 9: a router probe would fail. It must not probe at all.
        checker = HealthChecker(failure_threshold=1, timeout_secs=1, skip_sources=("supervisor",))
        asyncio.run(checker.check_all(registry))
        assert worker.health_ok and checker.status(worker.url).total_checks == 0
        table.write_slot(0, WorkerSlot(state=WorkerState.UNHEALTHY, pid=5, url=worker.url))
        source.sync(registry)
        assert not worker.is_routable()
        table.write_slot(0, WorkerSlot(state=WorkerState.RESTARTING, pid=5, url=worker.url))
        source.sync(registry)
        assert [url for url, _ in sick] == [worker.url, worker.url]
        assert "unhealthy" in sick[0][1]
    finally:
        assert source._table is not None
        source._table.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_supervisor_unhealthy_mark_retries_a_stuck_request_elsewhere(
    table: StateTable, anyio_backend: str
) -> None:
    stubs = {"a": Stub("a", delay=60.0), "b": Stub("b")}
    config = make_config([], "--state-table", table.name, "--policy", "round_robin")
    router = Router(config, transport=HostTransport(stubs))
    app = create_app(router)
    table.write_slot(0, WorkerSlot(state=WorkerState.HEALTHY, pid=5, url="http://a"))
    await router.start()
    try:
        await async_wait_until(lambda: "http://a" in router.registry, what="a registered")
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://router"
        ) as client:
            call = asyncio.create_task(client.post("/generate", json={"text": "x"}, timeout=90))
            a = router.registry.get("http://a")
            assert a is not None
            await async_wait_until(lambda: a.in_flight == 1, what="the request stuck at a")
            table.write_slot(1, WorkerSlot(state=WorkerState.HEALTHY, pid=6, url="http://b"))
            await async_wait_until(lambda: "http://b" in router.registry, what="b registered")
            # The supervisor's probes of a fail (a hung GPU): it marks a unhealthy.
            table.write_slot(0, WorkerSlot(state=WorkerState.UNHEALTHY, pid=5, url="http://a"))
            r = await asyncio.wait_for(call, 30)  # far less than a's 60 s
            assert r.status_code == 200 and r.json()["worker"] == "b"
    finally:
        await router.stop()
