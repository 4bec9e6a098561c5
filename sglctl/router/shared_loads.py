"""In-flight counts shared by the router's processes (``--router-processes N``, N > 1).

Policies balance on "requests in flight at each worker"; with several router processes that
number must be the whole router's, not one process's share. One shared-memory segment holds
a matrix of counters, one **row per process** and one **column per worker slot**: a process
only ever writes its own row (``+1`` at dispatch, ``-1`` at the end), and a reader sums the
column. One writer per cell means no locks and no atomic read-modify-write across processes
on the hot path; a read is N aligned 8-byte loads.

Worker slots must mean the same worker in every process, whichever process learned of it
first, so the segment also holds a **slot table**: slot ``i``'s worker URL. A process that
registers a worker looks its URL up there and claims a free slot if it is absent; that scan
(at membership changes only, never per request) holds an ``flock`` on a lock file next to the
segment, so two processes adding the same worker at once get the same slot. Slots are never
freed: a worker removed and added again gets its old slot back, and :data:`SLOTS` (1024) is
far more workers than one router fronts.

A restarted process starts by zeroing its own row (:meth:`SharedLoads.clear_row`): the
requests its predecessor counted died with it.

Layout::

    names  (SLOTS x NAME_BYTES)   worker URL per slot, NUL padded, utf-8
    counts (PROCS x SLOTS x 8)    signed 64-bit, native order, row = process index
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
from collections.abc import Callable
from multiprocessing import shared_memory

from sglctl.router.workers import Breaker, Worker
from sglctl.shm import open_segment, untracked

log = logging.getLogger(__name__)

#: Worker slots in a segment.
SLOTS = 1024
#: Bytes of a worker URL in the slot table (longer URLs are not shared: see ``slot_of``).
NAME_BYTES = 256


class SharedLoads:
    """One process's handle on the segment: its own row to write, every row to read."""

    def __init__(self, shm: shared_memory.SharedMemory, procs: int, index: int) -> None:
        if not 0 <= index < procs:
            raise ValueError(f"process index {index} outside 0..{procs - 1}")
        self._shm = shm
        self.name = shm.name
        self.procs = procs
        self.index = index
        buf = shm.buf
        assert buf is not None
        self._names = buf[: SLOTS * NAME_BYTES]
        self.counts = buf[SLOTS * NAME_BYTES : SLOTS * NAME_BYTES + procs * SLOTS * 8].cast("q")
        self._lock_path = lock_path(shm.name)
        self._slots: dict[str, int] = {}

    @staticmethod
    def size(procs: int) -> int:
        return SLOTS * NAME_BYTES + procs * SLOTS * 8

    @classmethod
    def create(cls, procs: int) -> SharedLoads:
        """The parent's segment (all zero), and its lock file; the parent's index is 0."""
        name = f"sglctl-loads-{os.getpid()}-{secrets.token_hex(4)}"
        shm = open_segment(name, create=True, size=cls.size(procs))
        with open(lock_path(name), "w"):
            pass
        return cls(shm, procs, 0)

    @classmethod
    def attach(cls, name: str, procs: int, index: int) -> SharedLoads:
        return cls(open_segment(name, create=False), procs, index)

    def clear_row(self) -> None:
        """Zero this process's row: what a previous process with this index counted is gone."""
        base = self.index * SLOTS
        for slot in range(SLOTS):
            self.counts[base + slot] = 0

    def slot_of(self, url: str) -> int | None:
        """The slot of ``url``, claimed if new (None: the URL is too long or the table full;
        that worker's load is then this process's own count)."""
        slot = self._slots.get(url)
        if slot is not None:
            return slot
        raw = url.encode()
        if len(raw) >= NAME_BYTES:
            log.warning("worker URL %s is too long to share its load across processes", url)
            return None
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            slot = self._find_or_claim(raw)
        if slot is None:
            log.error("shared load table full (%d workers); %s counts only its own", SLOTS, url)
            return None
        self._slots[url] = slot
        return slot

    def _find_or_claim(self, raw: bytes) -> int | None:
        padded = raw.ljust(NAME_BYTES, b"\0")
        for slot in range(SLOTS):
            cell = self._names[slot * NAME_BYTES : (slot + 1) * NAME_BYTES]
            if cell[0] == 0:
                cell[:] = padded
                return slot
            if bytes(cell) == padded:
                return slot
        return None

    def total(self, slot: int) -> int:
        """In flight at ``slot``'s worker, every process together."""
        return sum(self.counts[slot::SLOTS])

    def by_process(self) -> list[int]:
        """In flight per process (row sums), for ``/stats``."""
        return [sum(self.counts[p * SLOTS : (p + 1) * SLOTS]) for p in range(self.procs)]

    def close(self, unlink: bool = False) -> None:
        self.counts.release()
        self._names.release()
        self._shm.close()
        if unlink:
            with contextlib.suppress(FileNotFoundError), untracked():
                self._shm.unlink()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._lock_path)


def lock_path(name: str) -> str:
    return os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp", name + ".lock")


class SharedWorker(Worker):
    """A :class:`Worker` whose ``in_flight`` is the whole router's (the shared column).

    Only used with several processes: with one, the plain attribute of :class:`Worker` is
    the whole count and no read goes through shared memory.
    """

    __slots__ = ("_cell", "_loads", "_local", "_slot")

    def __init__(self, loads: SharedLoads, url: str, breaker: Breaker | None = None, **kw: object):
        self._loads = loads
        self._slot = loads.slot_of(url)
        self._local = 0  # the count when the URL has no shared slot
        self._cell = loads.index * SLOTS + self._slot if self._slot is not None else -1
        super().__init__(url, breaker, **kw)  # type: ignore[arg-type]

    @property
    def in_flight(self) -> int:
        if self._slot is None:
            return self._local
        return self._loads.total(self._slot)

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        # Worker.__init__ sets 0; the shared count is not reset by a new Worker object (the
        # requests of a removed-and-re-added worker still release their slots).
        pass

    def take_load_slot(self) -> Callable[[int, bool], None]:
        """:meth:`Worker.take_load_slot` on this process's cell of the shared matrix."""
        counts, cell = self._loads.counts, self._cell
        self.requests_total += 1
        if cell < 0:
            self._local += 1
        else:
            counts[cell] += 1
        released = False

        def release(status: int = 0, ok: bool = False) -> None:
            nonlocal released
            if not released:
                released = True
                if cell < 0:
                    self._local -= 1
                else:
                    counts[cell] -= 1

        return release


def worker_factory(loads: SharedLoads) -> Callable[..., Worker]:
    """What :class:`~sglctl.router.workers.WorkerRegistry` builds workers with."""

    def make(url: str, breaker: Breaker | None = None, **kw: object) -> Worker:
        return SharedWorker(loads, url, breaker, **kw)

    return make
