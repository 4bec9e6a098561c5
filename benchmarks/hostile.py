#!/usr/bin/env python3
"""Hostile clients: sglctl's router and the SGLang Router 0.3.2 side by side (issue 9).

Each router runs with its default limits in front of one sim worker, and gets, in turn:

1. **Header flood**: 4 connections each sending one unfinished 128 MiB header. Printed: what
   the clients got, how much each could send before the router closed, and the router's RSS
   (process tree) before and at its peak.
2. **Slow clients**, all at once: a silent connection, a head sent one byte a second, a body
   sent at 1 KB/s. Printed: how long the router held each (capped at ``--hold-cap``), and
   what it answered.
3. **fd limit**: a fresh router started with ``RLIMIT_NOFILE`` = ``--fd-limit`` (soft and
   hard), ``--fd-limit`` idle connections opened, then ``--fd-probes`` requests on new
   connections. Printed: what those clients saw, and whether the router logged it.
4. **Large JSON**: a 1M-key (~9 MB) body posted while a loop sends tiny ``GET /liveness``
   requests; printed: the slowest of those while the big one was in flight.
5. **Hung worker**: each router with its default flags in front of 3 fresh sim workers
   (``--speedup 1``, so requests overlap), ``--clients`` threads sending short non-streamed
   generations; after ``--warm-secs`` one worker is SIGSTOPped for ``--hung-secs``, then
   SIGCONTed. Printed: how long until the router's ``GET /workers`` shows it unhealthy (and
   back), how many requests were delayed (latency over 3x the p99 before the stop) and the
   worst, failures, and the throughput dip (1 s buckets against the mean before the stop).
   The load average is printed too: the machine is shared.

    python benchmarks/hostile.py                          # both routers, everything (~5 min)
    python benchmarks/hostile.py --only sglctl            # without the SGLang Router
    python benchmarks/hostile.py --scenario hung-worker   # only the hung-worker row (~2 min)
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import socket
import string
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sglctl.net import find_free_port, wait_for_http  # noqa: E402
from sglctl.spawn import ManagedProcess, spawn, spawn_sim_worker  # noqa: E402

SGLANG_VENVS = (Path("/work/sglang-router-venv"), REPO / "bench-out" / "sglang-router-venv")
MiB = 1 << 20


@dataclass(frozen=True)
class RouterKind:
    name: str
    python: Path

    def args(self, port: int, workers: Sequence[str]) -> list[str]:
        metrics = str(find_free_port())
        common = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers]
        if self.name == "sglctl":
            return [str(self.python), "-m", "sglctl.router", *common, "--metrics-port", metrics]
        module = "sglang_router.launch_router"
        return [str(self.python), "-m", module, *common, "--prometheus-port", metrics]


def sglang_python(install: bool) -> Path | None:
    """The SGLang Router's venv python (the lead's, or compare_routers.py's, or a new one)."""
    for venv in SGLANG_VENVS:
        python = venv / "bin" / "python"
        if python.exists():
            return python
    if not install:
        return None
    sys.path.insert(0, str(REPO / "benchmarks"))
    from compare_routers import DEFAULT_SGLANG_VENV, sglang_router_python

    return sglang_router_python(DEFAULT_SGLANG_VENV, create=True)


def start(
    kind: RouterKind, worker: str | Sequence[str], logs: Path, fd_limit: int | None = None
) -> ManagedProcess:
    port = find_free_port()
    args = kind.args(port, [worker] if isinstance(worker, str) else worker)
    if fd_limit is not None:  # set both limits, so sglctl's raise-to-hard cannot lift it
        args = [sys.executable, "-c", "import os, resource, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, ({fd_limit}, {fd_limit})); "
                "os.execv(sys.argv[1], sys.argv[1:])", *args]  # fmt: skip
    name = f"{kind.name}-{port}"
    proc = spawn(name, args, url=f"http://127.0.0.1:{port}", log_dir=logs, wait=False)
    if not wait_for_http(proc.url + "/health", 60.0, alive=proc.alive):
        proc.stop()
        raise RuntimeError(f"{name} did not start:\n{proc.log_tail()}")
    return proc


def rss_mib(pid: int) -> float:
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
        return sum(q.memory_info().rss for q in procs) / MiB
    except psutil.Error:
        return float("nan")


def address(proc: ManagedProcess) -> tuple[str, int]:
    host, port = proc.url.removeprefix("http://").split(":")
    return host, int(port)


def first_status(data: bytes) -> str:
    if not data:
        return "EOF, no answer"
    line = data.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split()
    return parts[1] if len(parts) > 1 and parts[1].isdigit() else line[:40]


def drain(sock: socket.socket, cap: float) -> tuple[bytes, float, bool]:
    """Read until the router closes or ``cap`` s pass: (data, seconds, closed)."""
    started = time.monotonic()
    data = b""
    while time.monotonic() - started < cap:
        sock.settimeout(max(0.05, cap - (time.monotonic() - started)))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except OSError:
            return data, time.monotonic() - started, True
        if not chunk:
            return data, time.monotonic() - started, True
        data += chunk
    return data, time.monotonic() - started, False


# --- 1. header flood ----------------------------------------------------------------------


def header_flood(proc: ManagedProcess, connections: int, size: int, cap: float) -> list[str]:
    before = rss_mib(proc.pid)
    peak = [before]
    results: list[tuple[int, str]] = []
    done = threading.Event()

    def sampler() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss_mib(proc.pid))

    def flood() -> None:
        sent = 0
        with socket.create_connection(address(proc), timeout=cap) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
            block = b"a" * MiB
            deadline = time.monotonic() + cap
            try:
                while sent < size and time.monotonic() < deadline:
                    sock.sendall(block)
                    sent += len(block)
            except OSError:
                pass
            data, _, closed = drain(sock, 3.0)
        answer = first_status(data) if data or closed else "still open"
        results.append((sent, answer))

    threading.Thread(target=sampler, daemon=True).start()
    threads = [threading.Thread(target=flood) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.5)  # settle: the figure wanted is the RSS the flood left behind
    after = rss_mib(proc.pid)
    done.set()
    answers = Counter(a for _, a in results)
    sent = max(s for s, _ in results) / MiB
    return [
        f"{connections} x {size // MiB} MiB unfinished header",
        ", ".join(f"{n} x {a}" for a, n in answers.items()),
        f"up to {sent:.1f} MiB sent per connection before the router closed it",
        f"RSS {before:.0f} -> peak {peak[0]:.0f} MiB (after {after:.0f})",
    ]


# --- 2. slow clients ----------------------------------------------------------------------


def slow_client(proc: ManagedProcess, kind: str, cap: float) -> str:
    sock = socket.create_connection(address(proc), timeout=cap)
    stop = threading.Event()
    if kind == "silent":
        pieces: Callable[[], bytes | None] = lambda: None  # noqa: E731
    elif kind == "slow header (1 B/s)":
        head = itertools.cycle(b"X-A: b\r\n")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        pieces = lambda: bytes([next(head)])  # noqa: E731
    else:  # slow body, 1 KB/s of a 1 MB Content-Length
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000\r\n\r\n"
        )
        pieces = lambda: b" " * 1000  # noqa: E731

    def sender() -> None:
        while not stop.wait(1.0):
            piece = pieces()
            if piece is None:
                continue
            try:
                sock.sendall(piece)
            except OSError:
                return

    threading.Thread(target=sender, daemon=True).start()
    data, held, closed = drain(sock, cap)
    stop.set()
    sock.close()
    if not closed:
        return f"still open after {cap:.0f} s"
    return f"closed after {held:.1f} s ({first_status(data)})"


# --- 3. fd limit --------------------------------------------------------------------------


def fd_limit(kind: RouterKind, worker: str, logs: Path, limit: int, probes: int) -> list[str]:
    proc = start(kind, worker, logs, fd_limit=limit)
    idle: list[socket.socket] = []
    try:
        for _ in range(limit):
            try:
                idle.append(socket.create_connection(address(proc), timeout=5))
            except OSError:
                break
        outcomes: Counter[str] = Counter()
        for _ in range(probes):
            try:
                with socket.create_connection(address(proc), timeout=5) as sock:
                    sock.sendall(b"GET /liveness HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    data, _, closed = drain(sock, 5.0)
                    outcomes[first_status(data) if closed or data else "no answer in 5 s"] += 1
            except OSError as exc:
                outcomes[type(exc).__name__] += 1
        time.sleep(0.5)
        text = proc.log_path.read_text(errors="replace").lower()
        logged = any(w in text for w in ("file descriptor", "too many open files", "emfile"))
        return [
            f"RLIMIT_NOFILE {limit}, {len(idle)} idle connections held, {probes} new requests",
            ", ".join(f"{n} x {o}" for o, n in outcomes.most_common()),
            "logged" if logged else "nothing logged",
        ]
    finally:
        for sock in idle:
            sock.close()
        proc.stop()


# --- 4. large JSON ------------------------------------------------------------------------


def million_keys() -> bytes:
    alphabet = string.ascii_letters + string.digits
    keys = ("".join(k) for k in itertools.product(alphabet, repeat=4))
    payload: dict[str, object] = dict.fromkeys(itertools.islice(keys, 1_000_000), 0)
    payload["text"] = "hello"
    payload["sampling_params"] = {"max_new_tokens": 1}
    return orjson.dumps(payload)


def large_json(proc: ManagedProcess, body: bytes) -> list[str]:
    result: dict[str, object] = {}

    def big() -> None:
        started = time.perf_counter()
        with httpx.Client(timeout=60) as client:
            headers = {"content-type": "application/json"}
            r = client.post(proc.url + "/generate", content=body, headers=headers)
        result["status"] = r.status_code
        result["secs"] = time.perf_counter() - started

    worst = 0.0
    with httpx.Client(timeout=30) as client:
        client.get(proc.url + "/liveness")
        thread = threading.Thread(target=big)
        thread.start()
        while thread.is_alive():
            t = time.perf_counter()
            client.get(proc.url + "/liveness")
            worst = max(worst, time.perf_counter() - t)
            time.sleep(0.01)
    secs = float(result.get("secs", 0.0))  # type: ignore[arg-type]
    return [
        f"{len(body) / 1e6:.1f} MB, 1M keys: {result.get('status')} in {secs:.2f} s",
        f"slowest concurrent GET /liveness {worst * 1000:.0f} ms",
    ]


# --- 5. hung worker -----------------------------------------------------------------------


@dataclass
class Sample:
    started: float
    ended: float
    status: int | str


def _client_loop(url: str, i: int, stop: threading.Event, out: list[Sample]) -> None:
    """Short non-streamed generations back to back; a client timeout is a failure."""
    with httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
        for n in itertools.count():
            if stop.is_set():
                return
            body = {
                "text": f"client {i} asks question {n}: " + "lorem ipsum " * 20,
                "sampling_params": {"max_new_tokens": 32, "ignore_eos": True},
            }
            started = time.monotonic()
            try:
                status: int | str = client.post("/generate", json=body).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            out.append(Sample(started, time.monotonic(), status))


def _healthy(client: httpx.Client, url: str) -> bool | None:
    try:
        workers = client.get("/workers").json()["workers"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    return next((bool(w.get("is_healthy")) for w in workers if w.get("url") == url), None)


def hung_worker(kind: RouterKind, logs: Path, clients: int, warm: float, hung: float) -> list[str]:
    sims = [spawn_sim_worker(logs, "--speedup", "1") for _ in range(3)]
    victim = sims[1]
    load_before = os.getloadavg()[0]
    samples: list[Sample] = []
    stop = threading.Event()
    try:
        proc = start(kind, [w.url for w in sims], logs)
        try:
            threads = [
                threading.Thread(target=_client_loop, args=(proc.url, i, stop, samples))
                for i in range(clients)
            ]
            for t in threads:
                t.start()
            time.sleep(warm)
            out_at: float | None = None
            back_at: float | None = None
            with httpx.Client(base_url=proc.url, timeout=5, trust_env=False) as admin:
                stopped_at = time.monotonic()
                os.kill(victim.pid, signal.SIGSTOP)
                try:
                    while time.monotonic() - stopped_at < hung:
                        if out_at is None and _healthy(admin, victim.url) is False:
                            out_at = time.monotonic() - stopped_at
                        time.sleep(0.05)
                finally:
                    os.kill(victim.pid, signal.SIGCONT)
                resumed_at = time.monotonic()
                while time.monotonic() - resumed_at < 30.0:
                    if out_at is None or _healthy(admin, victim.url):
                        back_at = time.monotonic() - resumed_at
                        break
                    time.sleep(0.1)
            time.sleep(3.0)
            stop.set()
            for t in threads:
                t.join(timeout=150)
        finally:
            proc.stop()
    finally:
        for w in sims:
            w.stop()
    load_after = os.getloadavg()[0]
    return _hung_report(samples, stopped_at, hung, out_at, back_at, (load_before, load_after))


def _hung_report(
    samples: list[Sample],
    stopped_at: float,
    hung: float,
    out_at: float | None,
    back_at: float | None,
    load: tuple[float, float],
) -> list[str]:
    before = sorted(s.ended - s.started for s in samples if s.ended < stopped_at)
    p99 = before[int(0.99 * (len(before) - 1))] if before else 0.0
    threshold = max(3 * p99, 0.5)
    touched = [s for s in samples if s.ended >= stopped_at]
    delayed = [s for s in touched if s.ended - s.started > threshold]
    worst = max((s.ended - s.started for s in touched), default=0.0)
    failed = Counter(str(s.status) for s in samples if s.status != 200)
    # throughput: completions per 1 s bucket, relative to the stop
    buckets = Counter(int(s.ended - stopped_at + 1000) - 1000 for s in samples)
    base = [buckets[b] for b in range(-int(stopped_at - min(s.started for s in samples)) + 1, 0)]
    base_rps = sum(base) / len(base) if base else float("nan")
    window = [buckets[b] for b in range(0, int(hung))]
    low = sum(1 for n in window if n < base_rps / 2)
    zero = sum(1 for n in window if n == 0)
    out = (
        f"out of routing after {out_at:.1f} s"
        if out_at is not None
        else (f"still in routing after {hung:.0f} s")
    )
    back = f", back {back_at:.1f} s after SIGCONT" if out_at is not None and back_at else ""
    return [
        f"SIGSTOP 1 of 3 workers for {hung:.0f} s: {out}{back}",
        f"{len(samples)} requests, {sum(failed.values())} failed"
        + (f" ({', '.join(f'{n} x {k}' for k, n in failed.items())})" if failed else ""),
        f"{len(delayed)} delayed (> {threshold:.2f} s = 3x p99 before the stop); "
        f"worst {worst:.1f} s",
        f"throughput {base_rps:.1f} req/s before; during the stop: min "
        f"{min(window, default=0)} req/s, {low} s below half, {zero} s at zero",
        f"load average {load[0]:.1f} -> {load[1]:.1f} (2 cores)",
    ]


def hostile_clients(
    kinds: Sequence[RouterKind], args: argparse.Namespace, rows: dict[str, dict[str, list[str]]]
) -> None:
    """Scenarios 1-4, each router in front of one shared sim worker."""
    worker = spawn_sim_worker(args.log_dir, "--speedup", "50")
    body = million_keys()
    try:
        routers = {k.name: start(k, worker.url, args.log_dir) for k in kinds}
        try:
            for name, proc in routers.items():
                rows[name]["large JSON"] = large_json(proc, body)
                rows[name]["header flood"] = header_flood(proc, 4, args.flood_mib * MiB, 60.0)
            slow: dict[tuple[str, str], str] = {}

            def probe(name: str, proc: ManagedProcess, what: str) -> None:
                slow[(name, what)] = slow_client(proc, what, args.hold_cap)

            kinds_slow = ("silent", "slow header (1 B/s)", "slow body (1 KB/s)")
            threads = [
                threading.Thread(target=probe, args=(name, proc, what))
                for name, proc in routers.items()
                for what in kinds_slow
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for name in routers:
                rows[name]["slow clients"] = [f"{w}: {slow[(name, w)]}" for w in kinds_slow]
        finally:
            for proc in routers.values():
                proc.stop()
        for k in kinds:
            rows[k.name]["fd limit"] = fd_limit(
                k, worker.url, args.log_dir, args.fd_limit, args.fd_probes
            )
    finally:
        worker.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("sglctl", "sglang"), default=None)
    parser.add_argument(
        "--scenario", choices=("all", "clients", "hung-worker"), default="all",
        help="clients: scenarios 1-4; hung-worker: scenario 5",
    )  # fmt: skip
    parser.add_argument("--clients", type=int, default=8, help="hung worker: client threads")
    parser.add_argument("--warm-secs", type=float, default=8.0, help="hung worker: before SIGSTOP")
    parser.add_argument("--hung-secs", type=float, default=30.0, help="hung worker: SIGSTOP time")
    parser.add_argument("--hold-cap", type=float, default=75.0, help="slow-client cap, s")
    parser.add_argument("--flood-mib", type=int, default=128)
    parser.add_argument("--fd-limit", type=int, default=128)
    parser.add_argument("--fd-probes", type=int, default=20)
    parser.add_argument("--no-install", action="store_true", help="never pip-install sglang")
    parser.add_argument("--log-dir", type=Path, default=REPO / "bench-out" / "hostile")
    args = parser.parse_args(argv)

    kinds = [RouterKind("sglctl", Path(sys.executable))]
    if args.only != "sglctl":
        python = sglang_python(install=not args.no_install)
        if python is None:
            print("no SGLang Router venv; sglctl only")
        else:
            kinds.append(RouterKind("sglang-router 0.3.2", python))
    if args.only == "sglang":
        kinds = kinds[1:]
    rows: dict[str, dict[str, list[str]]] = {k.name: {} for k in kinds}
    if args.scenario in ("all", "clients"):
        hostile_clients(kinds, args, rows)
    if args.scenario in ("all", "hung-worker"):
        for k in kinds:
            rows[k.name]["hung worker"] = hung_worker(
                k, args.log_dir, args.clients, args.warm_secs, args.hung_secs
            )
    for name, table in rows.items():
        print(f"\n== {name}")
        for what, lines in table.items():
            print(f"  {what}:")
            for line in lines:
                print(f"    {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
