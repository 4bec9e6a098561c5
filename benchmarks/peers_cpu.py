#!/usr/bin/env python3
"""The CPU cost of ``--router-peers``: router CPU seconds per request, with and without peers.

Starts 4 fast sim workers, one router without peers (the baseline), and two routers A and B
told each other (``--router-peers`` naming both). Sends the same ``--requests`` new prompts
(``--chars`` characters each, ``--concurrency`` at a time) through the baseline, then through
A; reads each router's CPU time (``/proc/PID/stat``: user + system) before and after. A's
extra over the baseline is the sending side (a route message and a share of a batch POST
per request), B's the receiving side (parsing and applying A's batches), all on one machine
with the load generator.

    python benchmarks/peers_cpu.py --requests 3000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import httpx

from sglctl.net import find_free_port
from sglctl.spawn import ManagedProcess, spawn_router, spawn_sim_worker

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(proc: ManagedProcess) -> float:
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def drive(url: str, n: int, chars: int, concurrency: int, tag: str) -> float:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:

        async def one(i: int) -> None:
            text = f"{tag} {i} " + ("lorem ipsum " * (chars // 12 + 1))[:chars]
            body = {"text": text, "sampling_params": {"max_new_tokens": 1}}
            async with sem:
                r = await client.post(url + "/generate", json=body)
                r.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - start


def received(router: ManagedProcess) -> int:
    return int(httpx.get(router.url + "/peers", trust_env=False).json()["received"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--chars", type=int, default=8000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="peers-cpu-"))
    started: list[ManagedProcess] = []
    try:
        sims = [spawn_sim_worker(logs, "--speedup", "1000") for _ in range(4)]
        started += sims
        urls = [s.url for s in sims]
        quiet = ["--log-level", "warning", "--router-processes", "1"]
        base = spawn_router(logs, urls, *quiet, name="baseline")
        started.append(base)
        pa, pb = find_free_port(), find_free_port()
        peers = ["--router-peers", f"127.0.0.1:{pa},127.0.0.1:{pb}"]
        a = spawn_router(logs, urls, *quiet, *peers, port=pa, name="peer-a")
        b = spawn_router(logs, urls, *quiet, *peers, port=pb, name="peer-b")
        started += [a, b]
        deadline = time.monotonic() + 30
        start_all = time.monotonic()
        while httpx.get(a.url + "/peers", trust_env=False).json()["connected"] < 1:
            if time.monotonic() > deadline:
                raise SystemExit("peers did not connect")
            time.sleep(0.05)
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        rows = []
        for name, router, others in (("no peers", base, []), ("peers (A)", a, [b])):
            before = [cpu_seconds(p) for p in (router, *others)]
            took = asyncio.run(drive(router.url, args.requests, args.chars, args.concurrency, name))
            while others and received(b) < args.requests:  # B has applied every route
                if time.monotonic() > start_all + 600:
                    raise SystemExit("B did not receive every route")
                time.sleep(0.05)
            after = [cpu_seconds(p) for p in (router, *others)]
            cpu = [x - y for x, y in zip(after, before, strict=True)]
            rows.append((name, took, cpu))
            extra = (
                f", B (receiving) {cpu[1] / args.requests * 1e6:.0f} us/request" if others else ""
            )
            print(
                f"{name}: {args.requests} requests in {took:.1f} s "
                f"({args.requests / took:.0f}/s), router CPU {cpu[0]:.2f} s = "
                f"{cpu[0] / args.requests * 1e6:.0f} us/request{extra}"
            )
        (_, _, c0), (_, _, c1) = rows
        print(
            f"sending side: {c1[0] / c0[0]:.2f}x the baseline's CPU "
            f"(+{(c1[0] - c0[0]) / args.requests * 1e6:.0f} us/request); "
            f"B got {received(b)} routes; "
            f"load average after: {os.getloadavg()[0]:.2f}"
        )
    finally:
        for proc in reversed(started):
            proc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
