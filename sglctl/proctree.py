"""Process identity and stopping a process with every descendant it forked.

SGLang's server forks scheduler and detokenizer processes; stopping only the parent leaves
them holding GPU memory. Everything that stops a worker goes through here.

A pid alone does not name a process for long: it is reused once the process exits. pid plus
start time does, so :func:`process_start_time` is the one place that reads it (the
supervisor's child wrapper and the shared-memory table's owner check both use it).
"""

from __future__ import annotations

import contextlib
import logging
import signal

import psutil

log = logging.getLogger(__name__)


def process_start_time(pid: int) -> float:
    """The process's start time (0.0 when it does not exist); pid + start time is unique."""
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return 0.0


def terminate_tree(pid: int, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
    """Send ``sig`` (then SIGCONT) to ``pid`` and its descendants, wait ``timeout``, then
    SIGKILL survivors.

    Returns how many processes had to be killed. A pid that is already gone is not an error.
    """
    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)
            # A stopped process (SIGSTOP, a hung worker being replaced) would hold the signal
            # until the SIGKILL deadline; continuing it lets it act on the signal now.
            if sig != signal.SIGKILL:
                proc.send_signal(signal.SIGCONT)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        log.warning(
            "pid %d did not exit within %.1fs of signal %d; killing it", proc.pid, timeout, sig
        )
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    if alive:
        psutil.wait_procs(alive, timeout=5)
    return len(alive)
