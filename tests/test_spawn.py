"""``sglctl.spawn``: the command lines it builds, stopping processes together (the processes
themselves are tested end to end)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from support import wait_until

from sglctl.spawn import router_command, spawn, stop_together


def metrics_ports(args: list[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == "--metrics-port"]


def test_each_router_gets_its_own_metrics_port_unless_one_is_given() -> None:
    # Without it every spawned router binds the default 29000: a second router on the host
    # (another test, another helper's run) fails its start-up with "address already in use".
    first = router_command(31000, ["http://127.0.0.1:1"], ["--policy", "round_robin"])
    second = router_command(31001, ["http://127.0.0.1:1"], [])
    (a,), (b,) = metrics_ports(first), metrics_ports(second)
    assert a != b and "29000" not in (a, b)
    assert first[-2:] == ["--policy", "round_robin"]

    given = router_command(31000, [], ["--metrics-port", "4242"])
    assert metrics_ports(given) == ["4242"]
    given_eq = router_command(31000, [], ["--metrics-port=4242"])
    assert metrics_ports(given_eq) == [] and "--metrics-port=4242" in given_eq


#: A process that takes 0.5 s to exit after SIGTERM (as a server drains), ready once it says so.
SLOW_EXIT = (
    "import signal, sys, time\n"
    "def bye(*_):\n"
    "    time.sleep(0.5)\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, bye)\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    signal.pause()\n"
)


def test_stop_together_stops_every_process_at_the_same_time(tmp_path: Path) -> None:
    procs = [
        spawn(f"slow-{i}", [sys.executable, "-c", SLOW_EXIT], url="", log_dir=tmp_path, wait=False)
        for i in range(4)
    ]
    try:
        for proc in procs:
            wait_until(lambda p=proc: "ready" in p.log_tail(), what=f"{proc.name} ready")
        started = time.monotonic()
        stop_together(procs)
        took = time.monotonic() - started
    finally:
        stop_together(procs)
    assert not any(proc.alive() for proc in procs)
    assert all(proc.popen.returncode == 0 for proc in procs)  # each exited by its handler
    # One after the other it would be >= 4 x 0.5 s.
    assert took < 1.9, f"stopping 4 slow-exiting processes took {took:.2f} s"
