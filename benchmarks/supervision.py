"""Supervision benchmark: how fast a killed worker leaves routing, and what it costs clients.

Not a test: it prints figures for ``benchmarks/RESULTS.md``. Everything runs on 127.0.0.1
with sim workers and bounded closed-loop traffic (``--threads`` clients, small requests).

Two setups in the same run, each with ``--workers`` sim workers and ``--kills`` rounds of
"SIGKILL one worker under load, wait until it is back":

* **sglctl up** (the subject): the supervisor sees the exit at once and publishes it in the
  shared-memory table; the router polls the table every 10 ms.
* **router + health checks** (the baseline): ``sglctl router --worker-urls ...`` with
  ``--health-check-interval-secs 1`` (the default is 10 s, so the baseline here is already
  10x kinder than out of the box); the dead worker is restarted by hand on the same port.

Reported per setup: time from ``kill -9`` to the router no longer routing to the worker
(polled over HTTP every 2 ms, median and max), time until it serves again, client requests
that failed, and router retries (each retry is a request that was sent to the dead worker).

    .venv/bin/python benchmarks/supervision.py
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sglctl.net import find_free_port, port_is_free, wait_for_http
from sglctl.spawn import ManagedProcess, spawn_router, spawn_sim_worker
from sglctl.state_table import StateTable, WorkerState, segment_name_for_port

console = Console(width=max(Console().width, 110))
SIM_ARGS = ("--speedup", "50")


@dataclass
class Round:
    out_of_routing: float
    back_serving: float


@dataclass
class Outcome:
    name: str
    rounds: list[Round] = field(default_factory=list)
    requests: int = 0
    failed: int = 0
    retries: float = 0.0


class Traffic:
    """Closed-loop ``/generate`` clients in threads; every status recorded."""

    def __init__(self, url: str, threads: int) -> None:
        self.url = url
        self.ok = 0
        self.failed = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self, index: int) -> None:
        n = 0
        with httpx.Client(timeout=30.0) as client:
            while not self._stop.is_set():
                n += 1
                # Distinct prompts spread over every worker under cache-aware routing.
                body = {
                    "text": f"client {index} request {n} " * 10,
                    "sampling_params": {"max_new_tokens": 4},
                }
                try:
                    ok = client.post(self.url + "/generate", json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with self._lock:
                    if ok:
                        self.ok += 1
                    else:
                        self.failed += 1


def poll(predicate: Callable[[], bool], timeout: float, interval: float = 0.002) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(interval)
    return time.monotonic() - start


def retries_total(client: httpx.Client, url: str) -> float:
    text = client.get(url + "/metrics").text
    return sum(
        float(line.rsplit(None, 1)[1])
        for line in text.splitlines()
        if line.startswith("sglang_router_retries_total") and not line.startswith("#")
    )


def routed_healthy(client: httpx.Client, url: str) -> set[str]:
    workers = client.get(url + "/workers").json()["workers"]
    return {w["url"] for w in workers if w.get("is_healthy") and w.get("available", True)}


def served(client: httpx.Client, url: str, worker: str) -> int:
    return next(
        (
            w["requests_total"]
            for w in client.get(url + "/workers").json()["workers"]
            if w["url"] == worker
        ),
        0,
    )


def run_up(args: argparse.Namespace, tmp: Path, progress: Progress) -> Outcome:
    outcome = Outcome("sglctl up (state table)")
    port = find_free_port()
    base = find_free_port()
    while not all(port_is_free("127.0.0.1", base + i) for i in range(args.workers)):
        base = find_free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "sglctl", "up", "--backend", "sim", "--dp-size", str(args.workers),
           "--port", str(port), "--metrics-port", str(find_free_port()),
           "--worker-base-port", str(base), "--run-dir", str(tmp / "up"),
           "--restart-initial-backoff-secs", "0.5", "--health-check-interval-secs", "1",
           "--", *SIM_ARGS]  # fmt: skip
    log = open(tmp / "up.out", "wb")  # noqa: SIM115 - closed below
    up = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    task = progress.add_task(outcome.name, total=args.kills)
    try:
        if not wait_for_http(url + "/health", 60, alive=lambda: up.poll() is None):
            raise RuntimeError(f"sglctl up did not start:\n{(tmp / 'up.out').read_text()}")
        table = StateTable.attach(segment_name_for_port(port))
        with httpx.Client(timeout=10) as client, Traffic(url, args.threads) as traffic:
            poll(lambda: traffic.ok > 20, 30)
            retries_before = retries_total(client, url)
            for k in range(args.kills):
                slot = table.read_worker(k % args.workers)
                os.kill(slot.pid, signal.SIGKILL)
                gone = poll(lambda slot=slot: slot.url not in routed_healthy(client, url), 30)
                before = served(client, url, slot.url)
                back = gone + poll(
                    lambda slot=slot, before=before: served(client, url, slot.url) > before,
                    60,
                    0.01,
                )
                outcome.rounds.append(Round(gone, back))
                progress.advance(task)
                poll(
                    lambda: all(s.worker.state == WorkerState.HEALTHY for s in table.read_slots()),
                    60,
                )
            outcome.retries = retries_total(client, url) - retries_before
        outcome.requests, outcome.failed = traffic.ok + traffic.failed, traffic.failed
        table.close()
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
        log.close()
    return outcome


def run_baseline(args: argparse.Namespace, tmp: Path, progress: Progress) -> Outcome:
    outcome = Outcome("router + health checks (1 s)")
    logs = tmp / "baseline"
    workers: list[ManagedProcess] = [spawn_sim_worker(logs, *SIM_ARGS) for _ in range(args.workers)]
    router = spawn_router(logs, [w.url for w in workers], "--health-check-interval-secs", "1",
                          "--metrics-port", str(find_free_port()))  # fmt: skip
    task = progress.add_task(outcome.name, total=args.kills)
    try:
        with httpx.Client(timeout=10) as client, Traffic(router.url, args.threads) as traffic:
            poll(lambda: traffic.ok > 20, 30)
            retries_before = retries_total(client, router.url)
            for k in range(args.kills):
                index = k % args.workers
                victim = workers[index]
                port = int(victim.url.rsplit(":", 1)[1])
                os.kill(victim.pid, signal.SIGKILL)
                victim.popen.wait()
                killed_at = time.monotonic()
                gone = poll(lambda v=victim: v.url not in routed_healthy(client, router.url), 60)
                # Restart it by hand (what the supervisor does for sglctl up).
                victim.stop()
                workers[index] = spawn_sim_worker(
                    logs, *SIM_ARGS, port=port, name=f"sim-{port}-{k}"
                )
                poll(lambda v=victim: v.url in routed_healthy(client, router.url), 60, 0.01)
                before = served(client, router.url, victim.url)
                poll(lambda v=victim, b=before: served(client, router.url, v.url) > b, 60, 0.01)
                outcome.rounds.append(Round(gone, time.monotonic() - killed_at))
                progress.advance(task)
            outcome.retries = retries_total(client, router.url) - retries_before
        outcome.requests, outcome.failed = traffic.ok + traffic.failed, traffic.failed
    finally:
        router.stop()
        for worker in workers:
            worker.stop()
    return outcome


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--threads", type=int, default=4, help="closed-loop clients")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="sglctl-supervision-") as name:
        tmp = Path(name)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            results = [run_up(args, tmp, progress), run_baseline(args, tmp, progress)]
    subject, baseline = results
    table = Table(
        title=f"kill -9 of one of {args.workers} sim workers under load, {args.kills} rounds each"
    )
    for column in ("setup", "out of routing, median / max", "serving again, median", "requests",
                   "failed", "retries / kill"):  # fmt: skip
        table.add_column(column, justify="left" if column == "setup" else "right")
    for r in results:
        out = [x.out_of_routing * 1000 for x in r.rounds]
        back = [x.back_serving for x in r.rounds]
        table.add_row(
            r.name,
            f"{statistics.median(out):.1f} / {max(out):.1f} ms",
            f"{statistics.median(back):.2f} s",
            str(r.requests),
            str(r.failed),
            f"{r.retries / len(r.rounds):.1f}",
        )
    console.print(table)
    ratio = statistics.median(x.out_of_routing for x in baseline.rounds) / statistics.median(
        x.out_of_routing for x in subject.rounds
    )
    console.print(
        f"out-of-routing time, baseline / sglctl up: {ratio:.0f}x faster with the state table"
    )


if __name__ == "__main__":
    main()
