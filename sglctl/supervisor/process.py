"""One supervised child process: start it, learn the moment it exits, stop its whole tree.

The supervisor never touches raw pids elsewhere (uvicorn's ``Process`` wrapper is the model).
What this adds:

* **Exit is noticed at once.** A thread per child blocks in ``wait()`` and resolves an
  asyncio future on the supervisor's loop, so a ``kill -9`` reaches the shared-memory table
  within microseconds instead of at the next poll.
* **Output goes through a pipe** into a :class:`RotatingLog` (a second thread per child).
* **Own session.** Children start in a new session, so the terminal's Ctrl-C reaches only
  the supervisor, which then stops things in order (router drains first, workers after).
* **No orphans if the supervisor dies.** On Linux each child gets ``PR_SET_PDEATHSIG``
  (SIGTERM), so even a ``kill -9`` of the supervisor takes its direct children down; SGLang
  stops its own helpers when its parent goes. Children are always spawned from the loop
  (main) thread, because the kernel ties that signal to the spawning *thread*.
* **Whole trees.** Stopping goes through :func:`sglctl.proctree.terminate_tree`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

import psutil

from sglctl.proctree import process_start_time, terminate_tree
from sglctl.supervisor.logfile import RotatingLog

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[[], None] | None:
    """A ``preexec_fn`` setting PDEATHSIG, resolved up front (the child must not import)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def set_pdeathsig() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return set_pdeathsig


_PREEXEC = _load_prctl()


class ChildProcess:
    """A started child with its log; create with :meth:`start` on the running loop."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], logfile: RotatingLog) -> None:
        self.name = name
        self.popen = popen
        self.log = logfile
        self.pid = popen.pid
        self.create_time = process_start_time(popen.pid)
        #: Resolved with the exit code the moment the child exits. Await it through
        #: :meth:`wait` (shielded): cancelling a task that awaits a future directly would
        #: cancel the future itself, and every other waiter with it.
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._reader: threading.Thread | None = None

    @classmethod
    def start(
        cls,
        name: str,
        argv: Sequence[str],
        logfile: RotatingLog,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> ChildProcess:
        """Spawn ``argv`` now (synchronously: no await between fork and bookkeeping, so a
        cancelled caller can never lose track of a child)."""
        loop = asyncio.get_running_loop()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        logfile.mark(f"starting {name}: {' '.join(argv)}")
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_PREEXEC,  # only calls prctl, resolved beforehand
        )
        child = cls(name, popen, logfile)
        child._reader = threading.Thread(target=child._pump, name=f"log-{name}", daemon=True)
        child._reader.start()
        threading.Thread(target=child._wait, args=(loop,), name=f"wait-{name}", daemon=True).start()
        log.debug("%s started: pid %d", name, popen.pid)
        return child

    # -- state -----------------------------------------------------------------------------
    @property
    def returncode(self) -> int | None:
        return self.exited.result() if self.exited.done() else None

    def alive(self) -> bool:
        return not self.exited.done()

    def describe_exit(self) -> str:
        """How it ended, for logs: "exited with code 1", "was killed by SIGKILL"."""
        code = self.returncode
        if code is None:
            return "is still running"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"was killed by {name}"
        return f"exited with code {code}"

    async def wait(self) -> int:
        """The exit code, once the child has exited."""
        return await asyncio.shield(self.exited)

    # -- stopping --------------------------------------------------------------------------
    async def stop(self, timeout: float) -> int:
        """SIGTERM the whole tree, SIGKILL what is left after ``timeout``; wait for the exit."""
        # Same pid *and* start time: a pid freed by the exit and reused by a stranger in the
        # instant before the exit future resolves must not be signalled.
        if self.alive() and process_start_time(self.pid) == self.create_time:
            killed = await asyncio.to_thread(terminate_tree, self.pid, timeout)
            if killed:
                log.warning(
                    "%s (pid %d) had to be killed (%d processes)", self.name, self.pid, killed
                )
        # Helpers that were re-parented away from the tree (or outlived a crashed leader)
        # still carry the leader's session id.
        await asyncio.to_thread(_kill_session_leftovers, self.pid, self.create_time)
        return await self.wait()

    def kill_now(self) -> None:
        """SIGKILL the tree without waiting (second Ctrl-C)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            parent = psutil.Process(self.pid)
            for proc in [*parent.children(recursive=True), parent]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
        _kill_session_leftovers(self.pid, self.create_time)

    def drain(self, timeout: float = 2.0) -> None:
        """Wait (briefly) for the last output to reach the log; call after the exit."""
        if self._reader is not None:
            self._reader.join(timeout=timeout)

    # -- threads ---------------------------------------------------------------------------
    def _wait(self, loop: asyncio.AbstractEventLoop) -> None:
        code = self.popen.wait()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            loop.call_soon_threadsafe(_resolve, self.exited, code)

    def _pump(self) -> None:
        stream = self.popen.stdout
        assert stream is not None
        try:
            for line in iter(stream.readline, b""):
                self.log.write(line)
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                stream.close()


def _resolve(future: asyncio.Future[int], code: int) -> None:
    if not future.done():
        future.set_result(code)


def _kill_session_leftovers(session_leader: int, leader_create_time: float) -> None:
    """SIGKILL processes still in the session of a leader that already exited.

    A child started with ``start_new_session`` leads session ``pid``; whatever it forked and
    left behind keeps that session id even after being re-parented, which is how we find it.
    If the leader's pid now belongs to another process, the session id is ambiguous and
    nothing is killed.
    """
    current = process_start_time(session_leader)
    if current and current != leader_create_time:
        return
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.pid != session_leader and os.getsid(proc.pid) == session_leader:
                log.warning(
                    "killing pid %d left behind by exited session %d", proc.pid, session_leader
                )
                proc.kill()
