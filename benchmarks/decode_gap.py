#!/usr/bin/env python3
"""Where does end-to-end time go under each router? Per-worker load over time, per-request worker.

Issue 14's grid showed sglctl's ``cache_aware`` with the SGLang Router's hit ratio and TTFT but a
higher end-to-end p50, the difference being decode time. This replays one grid point through
each router named in ``--routers`` (caches flushed between them) and records:

* every ~0.2 s, each sim worker's ``/get_load`` (requests admitted, waiting, KV tokens used);
* per request: the worker that served it, TTFT, decode time (end-to-end - TTFT), output length.

Which worker served a request is told by neither router's answer in the same way (the SGLang
Router sends no header naming it), so every worker sits behind a small TCP relay, started in
its own process, that reads each HTTP request's ``rid`` (the client sets ``rid`` = request
index; both routers pass it through) before passing the bytes on. The relay costs the same
for every router; the figures here are for comparing routers, not absolute latencies.

    python benchmarks/decode_gap.py --sglang-venv /work/sglang-router-venv \\
        --point synthetic:444000:2 --routers cache_aware,sglang

Writes ``requests-<router>.jsonl``, ``load-<router>.jsonl`` and ``summary.md`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import compare_routers as cr  # noqa: E402
import grid  # noqa: E402
import httpx  # noqa: E402

from sglctl.bench.client import generate_body, stream_generate  # noqa: E402
from sglctl.bench.runner import send_times  # noqa: E402
from sglctl.bench.stats import RequestResult  # noqa: E402
from sglctl.bench.textgen import PromptBuilder  # noqa: E402
from sglctl.bench.workload import Workload  # noqa: E402
from sglctl.bench.workloads import trace_workload  # noqa: E402
from sglctl.net import find_free_port  # noqa: E402

SAMPLE_SECS = 0.2
HEAD_END = b"\r\n\r\n"


# --- the relay (runs in its own process: `decode_gap.py relay ...`) ------------------------


async def _relay_conn(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    index: int,
    target: tuple[str, int],
    out: Any,
) -> None:
    """Pass one client connection to ``target``, noting each request's ``rid`` on the way."""
    try:
        up_r, up_w = await asyncio.open_connection(*target)
    except OSError:
        writer.close()
        return

    async def down() -> None:
        try:
            while data := await up_r.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    task = asyncio.create_task(down())
    try:
        while True:
            head = await reader.readuntil(HEAD_END)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            body = await reader.readexactly(length) if length else b""
            if head.startswith(b"POST") and body[:1] == b"{":
                try:
                    rid = json.loads(body).get("rid")
                except ValueError:
                    rid = None
                if isinstance(rid, str):
                    out.write(f'{{"rid": "{rid}", "worker": {index}, "t": {time.time()}}}\n')
                    out.flush()
            up_w.write(head + body)
            await up_w.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
        pass
    finally:
        up_w.close()
        await task


async def _relay_main(listen: list[int], targets: list[str], out_path: Path) -> None:
    with out_path.open("a") as out:
        servers = []
        for i, (port, url) in enumerate(zip(listen, targets, strict=True)):
            host, _, tport = url.removeprefix("http://").rpartition(":")

            def handler(
                r: asyncio.StreamReader,
                w: asyncio.StreamWriter,
                i: int = i,
                t: tuple[str, int] = (host, int(tport)),
            ) -> Any:
                return _relay_conn(r, w, i, t, out)

            servers.append(await asyncio.start_server(handler, "127.0.0.1", port, limit=1 << 22))
        print("ready", flush=True)
        await asyncio.Event().wait()


# --- the run ---------------------------------------------------------------------------


async def _sample(urls: Sequence[str], out: list[dict[str, Any]], stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
        while not stop.is_set():
            t = time.time()
            answers = await asyncio.gather(
                *(client.get(u + "/get_load") for u in urls), return_exceptions=True
            )
            row: dict[str, Any] = {"t": t, "reqs": [], "waiting": [], "tokens": []}
            for a in answers:
                load = a.json()[0] if isinstance(a, httpx.Response) else {}
                row["reqs"].append(int(load.get("num_reqs", -1)))
                row["waiting"].append(int(load.get("num_waiting_reqs", -1)))
                row["tokens"].append(int(load.get("num_tokens", -1)))
            out.append(row)
            with contextlib.suppress(TimeoutError):  # the next sample, or the end
                await asyncio.wait_for(stop.wait(), SAMPLE_SECS)


async def _replay(
    router_url: str,
    workload: Workload,
    speedup: float,
    builder: PromptBuilder,
    sim_urls: Sequence[str],
) -> tuple[float, list[RequestResult], list[dict[str, Any]]]:
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample(sim_urls, samples, stop))
    times = send_times(workload.requests, "trace", rate=None, speedup=speedup, seed=0)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=600.0, limits=limits, trust_env=False) as client:
        t0_wall, t0 = time.time(), time.perf_counter()

        async def one(i: int) -> None:
            req = workload.requests[i]
            result = RequestResult(index=i, start=time.perf_counter() - t0)
            results.append(result)
            body = generate_body(builder.prompt(req), req.output_tokens)
            body["rid"] = f"q{i}"
            await stream_generate(client, router_url + "/generate", body, result)

        tasks = []
        for i, planned in enumerate(times):
            assert planned is not None
            delay = planned - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    stop.set()
    await sampler
    return t0_wall, results, samples


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def analyse(
    label: str,
    t0_wall: float,
    results: Sequence[RequestResult],
    samples: Sequence[dict[str, Any]],
    worker_of: dict[str, int],
    workers: int,
) -> dict[str, Any]:
    """Per router: decode time and what each request shared its worker with while decoding."""
    ts = [s["t"] - t0_wall for s in samples]
    seen_batch, seen_wait, per_token, decode, ttft, lat = [], [], [], [], [], []
    served = [0] * workers
    for r in results:
        w = worker_of.get(f"q{r.index}")
        if not r.ok or r.ttft is None or r.latency is None or w is None:
            continue
        served[w] += 1
        d = r.latency - r.ttft
        decode.append(d)
        ttft.append(r.ttft)
        lat.append(r.latency)
        if r.output_tokens > 1:
            per_token.append(d / (r.output_tokens - 1))
        lo, hi = bisect_left(ts, r.start + r.ttft), bisect_right(ts, r.start + r.latency)
        window = samples[lo:hi]
        if window:
            seen_batch.append(statistics.fmean(s["reqs"][w] - s["waiting"][w] for s in window))
            seen_wait.append(statistics.fmean(s["waiting"][w] for s in window))
    # Over time: the spread of admitted requests across workers at each sample.
    busy = [s for s in samples if sum(s["reqs"]) > 0]
    spread = [max(s["reqs"]) / (sum(s["reqs"]) / workers) for s in busy]
    weighted = [
        sum((a - q) ** 2 for a, q in zip(s["reqs"], s["waiting"], strict=True))
        / max(sum(a - q for a, q in zip(s["reqs"], s["waiting"], strict=True)), 1)
        for s in busy
    ]
    mean_served = sum(served) / workers if workers else 0
    return {
        "router": label,
        "requests": len(decode),
        "ttft_p50_ms": 1000 * _pct(ttft, 0.5),
        "e2e_p50_ms": 1000 * _pct(lat, 0.5),
        "decode_p50_ms": 1000 * _pct(decode, 0.5),
        "decode_mean_ms": 1000 * statistics.fmean(decode) if decode else float("nan"),
        "ms_per_token_p50": 1000 * _pct(per_token, 0.5),
        "ms_per_token_mean": 1000 * statistics.fmean(per_token) if per_token else float("nan"),
        "batch_seen_p50": _pct(seen_batch, 0.5),
        "batch_seen_mean": statistics.fmean(seen_batch) if seen_batch else float("nan"),
        "waiting_seen_mean": statistics.fmean(seen_wait) if seen_wait else float("nan"),
        "req_weighted_batch_mean": statistics.fmean(weighted) if weighted else float("nan"),
        "instant_max_over_mean_p50": _pct(spread, 0.5),
        "instant_max_over_mean_mean": statistics.fmean(spread) if spread else float("nan"),
        "served": served,
        "served_max_over_mean": max(served) / mean_served if mean_served else float("nan"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "relay":
        rp = argparse.ArgumentParser()
        rp.add_argument("--listen", required=True)
        rp.add_argument("--targets", required=True)
        rp.add_argument("--out", type=Path, required=True)
        ra = rp.parse_args(argv[1:])
        listen = [int(p) for p in ra.listen.split(",")]
        asyncio.run(_relay_main(listen, ra.targets.split(","), ra.out))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--point", default="synthetic:444000:2", help="TRACE:KV:LOAD")
    parser.add_argument("--slice", type=int, default=350)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--speedup", type=float, default=10.0)
    parser.add_argument("--routers", default="cache_aware,sglang", help="Rows of grid.py.")
    parser.add_argument(
        "--flags", action="append", default=[], help="NAME=FLAGS: an extra sglctl row (repeatable)"
    )
    parser.add_argument("--sglang-venv", type=Path, default=cr.DEFAULT_SGLANG_VENV)
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench-out" / "decode-gap")
    args = parser.parse_args(argv)
    point = grid.parse_point(args.point, grid.TRACES_DIR)
    workload = grid.middle_slice(trace_workload(point.trace), args.slice or None)
    names = [n for n in args.routers.split(",") if n]
    sglang_python = (
        cr.sglang_router_python(args.sglang_venv, create=False) if "sglang" in names else None
    )
    specs = grid.specs(sglang_python, [n for n in names if n in grid.ROUTERS])
    for extra in args.flags:
        label, _, flags = extra.partition("=")
        specs.append(cr.RouterSpec("sglctl", "cache_aware", tuple(flags.split()), label))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = args.out_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    sim_speedup = args.speedup / point.load
    sims = cr.start_workers(
        log_dir,
        args.workers,
        "--kv-cache-tokens",
        str(point.kv_tokens),
        "--speedup",
        str(sim_speedup),
        "--stream-interval",
        str(cr.QUICK.stream_interval),
        "--log-level",
        "warning",
    )
    sim_urls = [s.url for s in sims]
    ports = [find_free_port() for _ in sims]
    relay_log = args.out_dir / "relay.jsonl"
    relay_log.write_text("")
    relay = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "relay",
            "--listen",
            ",".join(map(str, ports)),
            "--targets",
            ",".join(sim_urls),
            "--out",
            str(relay_log),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    summaries = []
    builder = PromptBuilder(max_blocks=8192)
    try:
        assert relay.stdout is not None
        if relay.stdout.readline().strip() != "ready":
            raise RuntimeError("relay did not start")
        relay_urls = [f"http://127.0.0.1:{p}" for p in ports]
        for spec in specs:
            cr.flush_caches(sim_urls)
            relay_log.write_text("")
            router = cr.start_router(spec, relay_urls, log_dir, sglang_python)
            try:
                t0, results, samples = asyncio.run(
                    _replay(router.url, workload, args.speedup, builder, sim_urls)
                )
            finally:
                router.stop()
            worker_of: dict[str, int] = {}
            for line in relay_log.read_text().splitlines():
                rec = json.loads(line)
                worker_of[rec["rid"]] = rec["worker"]  # a retry: the last worker tried
            tag = spec.label.replace(" ", "_")
            with (args.out_dir / f"requests-{tag}.jsonl").open("w") as f:
                for r in results:
                    f.write(json.dumps({**vars(r), "worker": worker_of.get(f"q{r.index}")}) + "\n")
            with (args.out_dir / f"load-{tag}.jsonl").open("w") as f:
                for s in samples:
                    f.write(json.dumps({**s, "t": s["t"] - t0}) + "\n")
            summary = analyse(spec.label, t0, results, samples, worker_of, len(sims))
            summaries.append(summary)
            cr.console.print(summary)
    finally:
        relay.terminate()
        relay.wait(timeout=10)
        for s in sims:
            s.stop()
    keys = [k for k in summaries[0] if k not in ("router", "served")] if summaries else []
    lines = ["| metric | " + " | ".join(s["router"] for s in summaries) + " |"]
    lines.append("|---" * (len(summaries) + 1) + "|")
    for k in keys:
        cells = [f"{s[k]:.2f}" if isinstance(s[k], float) else str(s[k]) for s in summaries]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += [f"| served | {' | '.join(str(s['served']) for s in summaries)} |"]
    (args.out_dir / "summary.md").write_text(
        f"{workload.name}, {point.name}\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
