#!/usr/bin/env python3
"""Instructions the sglctl router executes per request: an A/B figure a busy machine keeps.

Why: ``bench_throughput.py``'s CPU per request is the figure that matters, but on a shared
2-core machine it moves by 30-50% between two runs of the same tree (other processes on the
router's core, cold caches), which hides a 5-10% change. The number of instructions the
router executes for the same requests does not depend on the machine's load, so two trees
can be compared one after the other. It leaves out what costs time without instructions
(cache misses, the kernel's side of syscalls), so it complements CPU/req, it does not
replace it.

How: the router runs under valgrind's callgrind with instrumentation off (start-up at about
nulgrind speed); once it is ready, instrumentation goes on (vgdb's ``instrumentation on``),
wrk drives it for ``--duration`` seconds (``benchmarks/wrk/post.lua``, ``--upstreams`` stubs),
the counters are dumped, and instructions (user space, router process) are divided by the
requests wrk saw complete. Requests still in flight at the end add an error of about
concurrency / requests.

    python benchmarks/instructions_per_request.py                  # this checkout
    python benchmarks/instructions_per_request.py --tree /tmp/main  # another checkout's sglctl
    python benchmarks/instructions_per_request.py --upstreams 4     # the multi-worker routing

Needs ``valgrind`` (Debian package, with ``vgdb``) and ``wrk`` (installed as bench_throughput
does).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_throughput as bt  # noqa: E402
from compare_routers import wait_ready  # noqa: E402

from sglctl.net import find_free_port  # noqa: E402
from sglctl.spawn import spawn  # noqa: E402


def total_instructions(out_dir: Path) -> int:
    """The sum of the ``summary:``/``totals:`` lines of the callgrind dumps in ``out_dir``."""
    total = 0
    for path in glob.glob(str(out_dir / "callgrind.out.*")):
        for line in Path(path).read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total += int(line.split()[1])
                break
    return total


def _monitor(pid: int, *command: str) -> None:
    """A callgrind monitor command through vgdb (``callgrind_control`` cannot name the
    process when the user has no name, as in some containers)."""
    subprocess.run(["vgdb", f"--pid={pid}", *command], capture_output=True, timeout=120)


def measure(
    tree: Path | None, mode: str, concurrency: int, duration: float, upstreams: int = 1
) -> float:
    """Instructions per request of one instrumented wrk run against a fresh router."""
    wrk = bt.ensure_wrk()
    placement = bt.make_placement("shared")
    with tempfile.TemporaryDirectory(prefix="instr-") as tmp:
        out = Path(tmp)
        stubs = bt.start_upstreams(upstreams, placement, out)
        port = find_free_port()
        env = dict(os.environ)
        if tree is not None:  # before the cwd (PYTHONSAFEPATH) and this checkout's install
            env["PYTHONPATH"] = str(tree)
            env["PYTHONSAFEPATH"] = "1"
        args = [
            "valgrind",
            "--tool=callgrind",
            "--vgdb=yes",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}/callgrind.out.%p",
            sys.executable,
            "-m",
            "sglctl.router",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--worker-urls",
            *(stub.url for stub in stubs),
            "--metrics-port",
            str(find_free_port()),
            "--log-level",
            "warning",
        ]
        router = spawn(
            "router-callgrind",
            args,
            url=f"http://127.0.0.1:{port}",
            log_dir=out,
            health_path="/liveness",
            ready_timeout=300.0,
            env=env,
        )
        try:
            wait_ready(router, 1, timeout=300.0)
            bt.run_wrk(wrk, router.url, mode, concurrency, 2, placement)  # uninstrumented warm-up
            _monitor(router.pid, "instrumentation", "on")
            bt.run_wrk(wrk, router.url, mode, concurrency, 2, placement)  # translated code warm
            _monitor(router.pid, "zero")
            summary = bt.run_wrk(wrk, router.url, mode, concurrency, duration, placement)
            _monitor(router.pid, "dump")
            requests = int(summary["requests"])  # type: ignore[call-overload]
        finally:
            router.stop()
            for stub in stubs:
                stub.stop()
        keep = os.environ.get("INSTR_KEEP_DUMPS")
        if keep:  # for callgrind_annotate
            for path in glob.glob(str(out / "callgrind.out.*")):
                shutil.copy(path, keep)
        return total_instructions(out) / max(requests, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, help="Checkout whose sglctl to run (PYTHONPATH).")
    parser.add_argument("--modes", default="whole", help="Comma-separated: whole, stream.")
    parser.add_argument("--concurrency", default="1,64", help="Comma-separated wrk -c values.")
    parser.add_argument("--duration", type=float, default=15.0, help="Instrumented seconds.")
    parser.add_argument(
        "--upstreams",
        type=int,
        default=1,
        help="Stub upstreams (1: the single-worker routing path; bench_throughput uses 4, "
        "where cache_aware matches, balances and places).",
    )
    args = parser.parse_args()
    for mode in args.modes.split(","):
        for c in (int(x) for x in args.concurrency.split(",")):
            per = measure(args.tree, mode, c, args.duration, args.upstreams)
            print(f"{mode:6} c={c:<4} {per / 1000:8.1f} k instructions/req", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
