#!/usr/bin/env python3
"""A whole request's critical path through a router at one connection, from packet times.

Why: "added p50 at c=1" says how much a router adds, not where. Here the kernel stamps the
four packets of each request on the loopback (tcpdump), with nothing added to the router:

    (a) client -> router ........ router -> worker    the router's way in (parse, route, write)
    (w) router -> worker ........ worker -> router    the worker (the stub: ~free)
    (b) worker -> router ........ router -> client    the router's way out (parse, answer)

(a) and (b) hold the router's wake-up, its reads, its Python work and the write syscall;
whatever it does after a write (book-keeping) is outside both, unless it delays the next
request. Each figure is the median over the requests of one wrk run (c=1, whole answers,
``benchmarks/wrk/post.lua``, 4 stub upstreams), the router pinned alone on CPU 1 as in
``bench_throughput.py``.

    python benchmarks/critical_path.py                         # sglctl, floor, SGLang Router
    python benchmarks/critical_path.py --tree /tmp/other        # another checkout's sglctl too
    python benchmarks/critical_path.py --rounds 3 --targets sglctl,floor

Needs tcpdump (Debian package; installed with apt-get when missing, as wrk is).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_throughput as bt  # noqa: E402

_LINE = re.compile(r"^(\d+\.\d+) IP 127\.0\.0\.1\.(\d+) > 127\.0\.0\.1\.(\d+):.* length (\d+)")


def ensure_tcpdump() -> str:
    found = shutil.which("tcpdump")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise SystemExit("tcpdump is needed: install it (apt-get install tcpdump) and run again")
    for cmd in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "tcpdump"]):
        subprocess.run(cmd, capture_output=True, check=True, timeout=600)
    return shutil.which("tcpdump") or "tcpdump"


def breakdown(capture: Path, router_port: int, upstream_ports: set[int]) -> dict[str, float]:
    """Median (a), (w), (b) and total in µs from a capture (module docstring)."""
    text = subprocess.run(
        ["tcpdump", "-r", str(capture), "-nn", "-tt"], capture_output=True, text=True
    ).stdout
    a: list[float] = []
    w: list[float] = []
    b: list[float] = []
    total: list[float] = []
    t_in = t_up = t_back = None
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None or int(m.group(4)) == 0:
            continue  # ACKs
        t, src, dst = float(m.group(1)), int(m.group(2)), int(m.group(3))
        if dst == router_port:
            t_in, t_up, t_back = t, None, None
        elif dst in upstream_ports and t_in is not None and t_up is None:
            t_up = t
        elif src in upstream_ports and t_up is not None and t_back is None:
            t_back = t
        elif src == router_port and t_back is not None and t_in is not None and t_up is not None:
            a.append(t_up - t_in)
            w.append(t_back - t_up)
            b.append(t - t_back)
            total.append(t - t_in)
            t_in = t_up = t_back = None
    if not total:
        raise RuntimeError("no complete request in the capture")
    med = statistics.median
    return {
        "requests": float(len(total)),
        "a_us": med(a) * 1e6,
        "w_us": med(w) * 1e6,
        "b_us": med(b) * 1e6,
        "total_us": med(total) * 1e6,
    }


def measure(
    target: str,
    upstreams: list,
    placement: bt.Placement,
    out: Path,
    sglang: Path | None,
    seconds: float,
) -> dict[str, float]:
    wrk = bt.ensure_wrk()
    urls = [u.url for u in upstreams]
    router = bt.start_router(target, urls, placement, out, sglang)
    try:
        port = int(router.url.rsplit(":", 1)[1])
        ups = {int(u.rsplit(":", 1)[1]) for u in urls}
        bt.run_wrk(wrk, router.url, "whole", 1, 2, placement)  # warm-up
        capture = out / f"{target.replace(' ', '_')}.pcap"
        expr = " or ".join(f"tcp port {p}" for p in [port, *sorted(ups)])
        dump = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-s", "128", "-w", str(capture), "-U", expr],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)  # tcpdump attached
            bt.run_wrk(wrk, router.url, "whole", 1, seconds, placement)
        finally:
            dump.terminate()
            dump.wait(10)
        return breakdown(capture, port, ups)
    finally:
        router.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="sglctl,floor,SGLang Router")
    parser.add_argument("--tree", type=Path, help="Also measure this checkout's sglctl.")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--sglang-venv", type=Path, default=None)
    args = parser.parse_args()
    ensure_tcpdump()
    placement = bt.make_placement("pinned")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    sglang = None
    if "SGLang Router" in targets:
        venv = args.sglang_venv or bt.default_sglang_venv()
        sglang = venv / "bin" / "python"
        if not sglang.exists():
            targets.remove("SGLang Router")
    runs: list[tuple[str, str | None]] = [(t, None) for t in targets]
    if args.tree is not None:
        runs.insert(1, ("sglctl", str(args.tree)))
    with tempfile.TemporaryDirectory(prefix="critpath-") as tmp:
        out = Path(tmp)
        upstreams = bt.start_upstreams(4, placement, out)
        try:
            print("target                     (a) in µs  (w) µs  (b) out µs  total µs  requests")
            for _ in range(args.rounds):
                for target, tree in runs:
                    saved = os.environ.get("PYTHONPATH")
                    if tree is not None:  # the router subprocess imports that tree's sglctl
                        os.environ["PYTHONPATH"] = tree
                        os.environ["PYTHONSAFEPATH"] = "1"
                    try:
                        r = measure(target, upstreams, placement, out, sglang, args.seconds)
                    finally:
                        if tree is not None:
                            os.environ.pop("PYTHONSAFEPATH", None)
                            if saved is None:
                                os.environ.pop("PYTHONPATH", None)
                            else:
                                os.environ["PYTHONPATH"] = saved
                    name = target if tree is None else f"sglctl ({Path(tree).name})"
                    print(
                        f"{name:26} {r['a_us']:9.1f} {r['w_us']:8.1f} {r['b_us']:11.1f} "
                        f"{r['total_us']:9.1f} {int(r['requests']):9d}",
                        flush=True,
                    )
        finally:
            for u in upstreams:
                u.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
