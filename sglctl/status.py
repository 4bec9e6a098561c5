"""``sglctl status``: the live dashboard of a deployment (or one frame, or JSON).

Two ways to look, same picture:

* **Local** (an ``sglctl up`` on this host): read its shared-memory table -- worker states,
  pids, restarts and the router's counters, without asking any process -- plus NVML for GPU
  utilisation and memory.
* **Remote** (``--router URL`` of a router elsewhere, or one not started by ``sglctl up``):
  the router's ``GET /workers`` and ``GET /stats``.

Either way each worker's ``/metrics`` is asked for its prefix cache hit rate (short timeout;
blank when it does not answer), and rates are computed from counter deltas between frames.
``--once`` and ``--json`` take two samples ``--sample-secs`` apart so that rates are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import httpx
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.table import Table
from rich.text import Text

from sglctl.gpus import GpuReport, NvmlSession
from sglctl.state_table import (
    StateTable,
    StateTableError,
    WorkerState,
    list_segments,
    remove_stale_segments,
    segment_name_for_port,
)
from sglctl.supervisor.control import is_local_host

#: The router section of the table counts as live while its heartbeat is younger than this.
ROUTER_HEARTBEAT_STALE_SECS = 5.0
PROBE_TIMEOUT_SECS = 0.5


@dataclass
class WorkerRow:
    url: str
    state: str
    worker_id: int | None = None
    #: "regular", "prefill" or "decode" (a PD layout's pools).
    role: str = "regular"
    #: A prefill worker's bootstrap port (the table's, so only for a local run).
    bootstrap_port: int | None = None
    gpus: str = ""
    pid: int | None = None
    uptime_secs: float | None = None
    restarts: int | None = None
    in_flight: int = 0
    served: int = 0
    errors: int = 0
    requests_per_second: float | None = None
    cache_hit_rate: float | None = None
    gpu_utilization: float | None = None
    gpu_memory_used_mib: int | None = None
    gpu_memory_total_mib: int | None = None
    #: Where the router got the worker ("static", "admin", "supervisor", "k8s") and, for
    #: Kubernetes, its pod as "namespace/name".
    source: str = ""
    pod: str = ""


@dataclass
class RouterRow:
    url: str
    alive: bool = False
    pid: int | None = None
    requests: int = 0
    errors: int = 0
    in_flight: int = 0
    requests_per_second: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None


@dataclass
class Snapshot:
    source: str
    taken_at: float
    router: RouterRow
    workers: list[WorkerRow] = field(default_factory=list)
    model: str = ""
    backend: str = ""
    run_dir: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- collectors -----------------------------------------------------------------------------
class LocalCollector:
    """Reads an ``sglctl up`` run's table (and NVML) on this host."""

    def __init__(self, table: StateTable, client: httpx.AsyncClient) -> None:
        self.table = table
        self.client = client
        self.nvml = NvmlSession()

    def close(self) -> None:
        self.nvml.close()
        self.table.close()

    async def collect(self) -> Snapshot:
        info = self.table.info()
        now = time.time()
        totals = self.table.read_router_totals()
        router_alive = totals.heartbeat > 0 and now - totals.heartbeat < ROUTER_HEARTBEAT_STALE_SECS
        gpus = self.nvml.snapshot() if info.backend == "sglang" else GpuReport()
        rows = []
        for view in self.table.read_slots():
            slot, cols = view.worker, view.router
            running = slot.state in (
                WorkerState.STARTING,
                WorkerState.HEALTHY,
                WorkerState.UNHEALTHY,
            )
            row = WorkerRow(
                url=slot.url,
                state=slot.state.label,
                worker_id=slot.worker_id,
                role=slot.role,
                bootstrap_port=slot.bootstrap_port or None,
                gpus=slot.gpus,
                pid=slot.pid or None,
                uptime_secs=now - slot.started_at if running and slot.started_at else None,
                restarts=slot.restarts,
                in_flight=cols.in_flight if router_alive else 0,
                served=served_count(cols.served, cols.errors),
                errors=cols.errors,
                source="supervisor",
            )
            _add_gpu_figures(row, gpus)
            rows.append(row)
        await _add_cache_hit_rates(self.client, rows)
        router = RouterRow(
            url=info.router_url,
            alive=router_alive,
            pid=totals.pid or None,
            requests=totals.requests,
            errors=totals.errors,
            in_flight=totals.in_flight if router_alive else 0,
            latency_p50_ms=totals.p50_ms if totals.requests else None,
            latency_p99_ms=totals.p99_ms if totals.requests else None,
        )
        return Snapshot(
            source=f"shared memory {self.table.name} (supervisor pid {info.owner_pid})",
            taken_at=now,
            router=router,
            workers=rows,
            model=info.model,
            backend=info.backend,
            run_dir=info.run_dir,
        )


class RemoteCollector:
    """Asks a router over HTTP (``/workers`` and ``/stats``)."""

    def __init__(
        self, router_url: str, client: httpx.AsyncClient, api_key: str | None = None
    ) -> None:
        self.router_url = router_url.rstrip("/")
        self.client = client
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def close(self) -> None:
        pass

    async def collect(self) -> Snapshot:
        now = time.time()
        router = RouterRow(url=self.router_url)
        rows: list[WorkerRow] = []
        try:
            workers_resp, stats_resp = await asyncio.gather(
                self.client.get(f"{self.router_url}/workers", headers=self.headers, timeout=2.0),
                self.client.get(f"{self.router_url}/stats", headers=self.headers, timeout=2.0),
            )
            workers = (
                workers_resp.json().get("workers", []) if workers_resp.status_code == 200 else []
            )
            stats = stats_resp.json() if stats_resp.status_code == 200 else {}
            router.alive = True
        except (httpx.HTTPError, ValueError):
            workers, stats = [], {}
        for item in workers:
            healthy = bool(item.get("is_healthy")) and item.get("available", True)
            rows.append(
                WorkerRow(
                    url=str(item.get("url", "?")),
                    state="healthy" if healthy else "unhealthy",
                    role=str(item.get("worker_type") or "regular"),
                    bootstrap_port=_int_or_none(item.get("bootstrap_port")),
                    in_flight=int(item.get("load", 0) or 0),
                    served=served_count(
                        int(item.get("requests_total", 0) or 0),
                        int(item.get("errors_total", 0) or 0),
                    ),
                    errors=int(item.get("errors_total", 0) or 0),
                    source=str(item.get("source") or ""),
                    pod=_pod_of(item.get("meta")),
                )
            )
        if stats:
            router.requests = int(stats.get("requests_total", 0))
            router.errors = int(stats.get("errors_total", 0))
            router.in_flight = int(stats.get("in_flight", 0))
            router.latency_p50_ms = stats.get("latency_p50_ms")
            router.latency_p99_ms = stats.get("latency_p99_ms")
        await _add_cache_hit_rates(self.client, rows)
        return Snapshot(source=f"HTTP {self.router_url}", taken_at=now, router=router, workers=rows)


def _pod_of(meta: object) -> str:
    """``namespace/name`` of a discovered worker's pod (``/workers`` meta), else ""."""
    if not isinstance(meta, dict) or not meta.get("pod"):
        return ""
    return "/".join(str(p) for p in (meta.get("namespace"), meta["pod"]) if p)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def served_count(dispatched: int, errors: int) -> int:
    """Requests a worker answered: what the router dispatched to it minus the attempts that
    failed there. The router counts every attempt (``requests_total``), so a request that
    failed on A and was retried on B would otherwise count as served by both. ``sglctl
    list-workers`` shows the same number."""
    return max(0, dispatched - errors)


def _add_gpu_figures(row: WorkerRow, gpus: GpuReport) -> None:
    if not row.gpus or not gpus.gpus:
        return
    found = gpus.by_index()
    mine = [found[int(i)] for i in row.gpus.split(",") if i.strip().isdigit() and int(i) in found]
    if not mine:
        return
    utils = [g.utilization for g in mine if g.utilization is not None]
    row.gpu_utilization = sum(utils) / len(utils) if utils else None
    row.gpu_memory_used_mib = sum(g.memory_used_mib for g in mine)
    row.gpu_memory_total_mib = sum(g.memory_total_mib for g in mine)


async def _add_cache_hit_rates(client: httpx.AsyncClient, rows: list[WorkerRow]) -> None:
    live = [r for r in rows if r.state in ("healthy", "unhealthy")]
    rates = await asyncio.gather(*(_cache_hit_rate(client, r.url) for r in live))
    for row, rate in zip(live, rates, strict=True):
        row.cache_hit_rate = rate


async def _cache_hit_rate(client: httpx.AsyncClient, url: str) -> float | None:
    """``sglang:cache_hit_rate`` from the worker's Prometheus text (SGLang needs
    ``--enable-metrics`` for it; None when it is not there)."""
    try:
        response = await client.get(f"{url}/metrics", timeout=PROBE_TIMEOUT_SECS)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return parse_metric(response.text, "sglang:cache_hit_rate")


def parse_metric(text: str, name: str) -> float | None:
    """The first sample of metric ``name`` in Prometheus text (labels ignored)."""
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            with contextlib.suppress(ValueError, IndexError):
                return float(line.rsplit(None, 1)[1])
    return None


def with_rates(previous: Snapshot | None, current: Snapshot) -> Snapshot:
    """``current`` with requests/s computed against ``previous`` (counter resets give 0)."""
    if previous is None:
        return current
    elapsed = current.taken_at - previous.taken_at
    if elapsed <= 0:
        return current
    before = {w.url: w for w in previous.workers}
    workers = []
    for row in current.workers:
        old = before.get(row.url)
        rate = max(0, row.served - old.served) / elapsed if old is not None else None
        workers.append(replace(row, requests_per_second=rate))
    router = replace(
        current.router,
        requests_per_second=max(0, current.router.requests - previous.router.requests) / elapsed,
    )
    return replace(current, workers=workers, router=router)


# -- choosing the source --------------------------------------------------------------------
def open_local_table(router_url: str | None) -> StateTable | None:
    """The table of the ``sglctl up`` run behind ``router_url`` on this host, if any.

    Without a URL: the run on port 30000, or the only one on this host.
    """
    if router_url:
        parts = urlsplit(router_url if "://" in router_url else f"http://{router_url}")
        if not is_local_host(parts.hostname or "") or parts.port is None:
            return None
        names = [segment_name_for_port(parts.port)]
    else:
        found = list_segments()
        default = segment_name_for_port(30000)
        names = [default] if default in found or len(found) != 1 else found
    for name in names:
        try:
            table = StateTable.attach(name)
        except StateTableError:
            continue
        if table.info().owner_alive():
            return table
        table.close()
    return None


# -- rendering ------------------------------------------------------------------------------
_STATE_STYLE = {
    "healthy": "green",
    "starting": "yellow",
    "restarting": "yellow",
    "unhealthy": "red",
    "failed": "bold red",
    "removed": "dim",
}


def _fmt(value: float | int | None, spec: str = "", suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{suffix}"


def _duration(secs: float | None) -> str:
    if secs is None:
        return "-"
    secs = int(secs)
    if secs < 3600:
        return f"{secs // 60}:{secs % 60:02d}"
    return f"{secs // 3600}h{(secs % 3600) // 60:02d}m"


class _Flow:
    """Items laid out left to right, starting a new line *between* items when the next one
    would not fit the terminal: an 80-column terminal gets two tidy lines instead of a line
    broken in the middle of "p99 12.5 ms". One item wider than the terminal is cut short."""

    def __init__(self, items: list[Text], separator: Text | None = None) -> None:
        self.items = items
        self.separator = separator if separator is not None else Text("  ")

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        line = Text(no_wrap=True, overflow="ellipsis")
        for item in self.items:
            if line.plain and len(line) + len(self.separator) + len(item) > width:
                yield line
                line = Text(no_wrap=True, overflow="ellipsis")
            if line.plain:
                line.append_text(self.separator)
            line.append_text(item)
        yield line


def _role_cell(row: WorkerRow) -> str:
    """``prefill:8998`` (with its bootstrap port when known), ``decode``, ``regular``."""
    if row.role == "prefill" and row.bootstrap_port:
        return f"prefill:{row.bootstrap_port}"
    return row.role


def render(snapshot: Snapshot) -> Group:
    """One dashboard frame. GPU columns appear only when some worker has GPUs, the role
    column only in a PD layout (some worker is not "regular")."""
    with_gpus = any(w.gpus for w in snapshot.workers)
    with_roles = any(w.role != "regular" for w in snapshot.workers)
    table = Table(
        expand=False, header_style="bold", pad_edge=False, box=None, collapse_padding=True
    )
    # Short headers: with GPUs shown the table must still fit about 100 columns.
    columns = ["id", "worker", "pid", "state", "up", "rst", "busy", "req/s", "served", "err",
               "hit"]  # fmt: skip
    if with_gpus:
        columns[2:2] = ["GPUs"]
        columns += ["util", "mem GiB"]
    # Where each worker comes from, only when that tells workers apart (mixed sources), and
    # the pod of each discovered one; the PD role when any worker has one.
    with_source = len({w.source for w in snapshot.workers}) > 1
    with_pod = any(w.pod for w in snapshot.workers)
    extra = (["role"] if with_roles else []) + (["source"] if with_source else [])
    extra += ["pod"] if with_pod else []
    columns[2:2] = extra
    for name in columns:
        table.add_column(
            name,
            justify="left" if name in ("worker", "state", "role", "source", "pod") else "right",
            no_wrap=True,
        )
    for w in snapshot.workers:
        cells: list[str | Text] = [
            _fmt(w.worker_id),
            w.url.removeprefix("http://"),
            _fmt(w.pid),
            Text(w.state, style=_STATE_STYLE.get(w.state, "")),
            _duration(w.uptime_secs),
            _fmt(w.restarts),
            str(w.in_flight),
            _fmt(w.requests_per_second, ".1f"),
            str(w.served),
            str(w.errors),
            _fmt(None if w.cache_hit_rate is None else w.cache_hit_rate * 100, ".0f", "%"),
        ]
        if with_gpus:
            cells[2:2] = [w.gpus or "-"]
            memory = (
                f"{w.gpu_memory_used_mib / 1024:.0f}/{w.gpu_memory_total_mib / 1024:.0f}"
                if w.gpu_memory_used_mib is not None and w.gpu_memory_total_mib is not None
                else "-"
            )
            cells += [_fmt(w.gpu_utilization, ".0f", "%"), memory]
        cells[2:2] = (
            ([_role_cell(w)] if with_roles else [])
            + ([w.source or "-"] if with_source else [])
            + ([w.pod or "-"] if with_pod else [])
        )
        table.add_row(*cells)
    r = snapshot.router
    router_state = Text("up", style="green") if r.alive else Text("not answering", style="red")
    header = _Flow(
        [
            Text.assemble(("router ", "bold"), r.url or "?", " ", router_state),
            Text(f"req/s {_fmt(r.requests_per_second, '.1f')}"),
            Text(f"p50 {_fmt(r.latency_p50_ms, '.1f', ' ms')}"),
            Text(f"p99 {_fmt(r.latency_p99_ms, '.1f', ' ms')}"),
            Text(f"in-flight {r.in_flight}"),
            Text(f"requests {r.requests}"),
            Text.assemble("errors ", (str(r.errors), "red" if r.errors else "")),
        ]
    )
    counts: dict[str, int] = {}
    for w in snapshot.workers:
        counts[w.state] = counts.get(w.state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no workers"
    model = snapshot.model + (f" ({snapshot.backend})" if snapshot.backend else "")
    stamp = time.strftime("%H:%M:%S", time.localtime(snapshot.taken_at))
    subtitle = _Flow(
        [Text(part, style="dim") for part in (summary, model, snapshot.source, stamp) if part],
        separator=Text("  |  ", style="dim"),
    )
    # The legend is a line of its own: as the table's caption it wrapped to the table's width.
    legend = _Flow(
        [
            Text(item, style="dim")
            for item in (
                "up: uptime",
                "rst: restarts",
                "busy: in-flight",
                "served: answered (failed attempts not counted)",
                "hit: prefix cache hit rate",
                *(["role: PD pool (prefill:bootstrap port)"] if with_roles else []),
            )
        ]
    )
    return Group(header, table, legend, subtitle)


# -- the command ----------------------------------------------------------------------------
#: Notes that must not mix with ``--json`` on stdout.
_stderr = Console(stderr=True)


async def _run(
    router_url: str | None,
    once: bool,
    as_json: bool,
    interval: float,
    sample_secs: float,
    api_key: str | None,
    console: Console,
) -> int:
    # A supervisor killed with SIGKILL leaves its segment; whoever looks next removes it.
    for stale in remove_stale_segments():
        _stderr.print(
            f"[dim]removed stale shared-memory segment {stale.name} left by a crashed "
            f"`sglctl up` (pid {stale.owner_pid})[/dim]"
        )
    async with httpx.AsyncClient(trust_env=False) as client:
        table = open_local_table(router_url)
        collector: LocalCollector | RemoteCollector
        if table is not None:
            collector = LocalCollector(table, client)
        else:
            collector = RemoteCollector(router_url or "http://127.0.0.1:30000", client, api_key)
        try:
            first = await collector.collect()
            if isinstance(collector, RemoteCollector) and not first.router.alive:
                where = (
                    router_url
                    or "this host (no `sglctl up` found; default router http://127.0.0.1:30000)"
                )
                console.print(f"[red]sglctl status:[/red] no router answering at {where}")
                return 1
            if once or as_json:
                snapshot = first
                if sample_secs > 0:
                    await asyncio.sleep(sample_secs)
                    snapshot = with_rates(first, await collector.collect())
                if as_json:
                    print(json.dumps(snapshot.to_json(), indent=2))
                else:
                    console.print(render(snapshot))
                return 0
            previous = first
            with Live(render(first), console=console, refresh_per_second=4, screen=False) as live:
                while True:
                    await asyncio.sleep(interval)
                    current = await collector.collect()
                    live.update(render(with_rates(previous, current)))
                    previous = current
        finally:
            collector.close()


def run_status(
    router_url: str | None = None,
    once: bool = False,
    as_json: bool = False,
    interval: float = 1.0,
    sample_secs: float = 1.0,
    api_key: str | None = None,
) -> int:
    # Piped output (scripts, logs) should not be squeezed into 80 columns.
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_run(router_url, once, as_json, interval, sample_secs, api_key, console))
    return 0
