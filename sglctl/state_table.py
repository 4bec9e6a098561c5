"""The shared-memory worker table between ``sglctl up`` (the supervisor) and its router.

Why shared memory: the router must stop sending to a worker within 100 ms of the supervisor
seeing it die, and the dashboard wants every worker's state and the router's counters without
asking either process. A fixed table in one named segment gives both: the supervisor writes a
slot and bumps a generation counter; the router polls that counter every few milliseconds (a
single 8-byte read) and re-reads the slots only when it moved.

Layout (little-endian, fixed sizes, version in the header)::

    header (1024 bytes)   magic, version, slot count/size, owner pid + process start time,
                          generation (supervisor), router section (router), and strings
                          written once at creation (router URL, control socket, run dir,
                          model, backend)
    slot[i] (512 bytes)   supervisor part: seq, state, worker id, pid, restarts, times, url,
                          GPU ids -- router part: seq, in-flight, served, errors, time

**One writer per field.** The supervisor alone writes the header strings, the generation and
the supervisor part of each slot; the router alone writes the router section and the router
part of each slot. Each part has its own sequence counter used as a seqlock: the writer makes
it odd, writes, makes it even; a reader retries while it is odd or changed under it, so a slot
is never seen half-written. (This relies on stores becoming visible in program order, which
x86-64 guarantees; each step is a separate interpreter call, so the compiler cannot reorder.)

**Stale segments.** The header records the owner's pid and process start time. A new run that
finds a segment of the same name checks the owner: alive means another run owns it (refused,
with a message); dead means a crashed run left it behind, and it is replaced. The stale
table's worker pids are returned so the caller can stop orphans that outlived their owner.

Only the standard library and psutil are used, so the router can import this module without
importing the supervisor.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import shared_memory

import psutil

from sglctl.proctree import process_start_time

log = logging.getLogger(__name__)

MAGIC = b"SGLCTLST"
VERSION = 1
HEADER_SIZE = 1024
SLOT_SIZE = 512
DEFAULT_SLOTS = 64
NAME_PREFIX = "sglctl_"


class WorkerState(enum.IntEnum):
    """A slot's lifecycle state, written by the supervisor. Only HEALTHY is routed to."""

    EMPTY = 0
    STARTING = 1
    HEALTHY = 2
    UNHEALTHY = 3
    RESTARTING = 4
    FAILED = 5
    REMOVED = 6

    @property
    def label(self) -> str:
        return self.name.lower()


# -- header ---------------------------------------------------------------------------------
# Fixed part written at creation (never changes afterwards).
_HDR_FIXED = struct.Struct("<8sIIIIQdd")  # magic, version, n_slots, slot_size, header_size,
# owner pid, owner process start time, created_at (wall clock)
_HDR_GENERATION = struct.Struct("<Q")
_OFF_GENERATION = 48
# Router section: seq, pid, heartbeat, requests, errors, in_flight, p50 ms, p99 ms.
_HDR_ROUTER = struct.Struct("<QQdQQQdd")
_OFF_ROUTER = 56
_OFF_STRINGS = 128
# router_url, control_path, run_dir, model, backend
_HDR_STRINGS = struct.Struct("<128s256s256s128s16s")

# -- slots ----------------------------------------------------------------------------------
# seq, state, worker_id, pid, pid_create_time, restarts, exit_code, started_at, changed_at,
# healthy_since, url, gpus
_SLOT_SUP = struct.Struct("<QIIQdIiddd128s64s")
_OFF_SLOT_ROUTER = 256
# seq, in_flight, served, errors, updated_at
_SLOT_ROUTER = struct.Struct("<QQQQd")
_SEQ = struct.Struct("<Q")

assert _OFF_STRINGS + _HDR_STRINGS.size <= HEADER_SIZE
assert _OFF_ROUTER + _HDR_ROUTER.size <= _OFF_STRINGS
assert _SLOT_SUP.size <= _OFF_SLOT_ROUTER
assert _OFF_SLOT_ROUTER + _SLOT_ROUTER.size <= SLOT_SIZE

#: How long a reader waits for a writer to finish one slot before giving up on it.
_MAX_READ_WAIT_SECS = 0.5


class StateTableError(RuntimeError):
    """The segment is missing, not ours, of another version, or owned by a live run."""


@dataclass
class TableInfo:
    """The header strings and owner, as written at creation."""

    name: str
    n_slots: int
    owner_pid: int
    owner_create_time: float
    created_at: float
    router_url: str
    control_path: str
    run_dir: str
    model: str
    backend: str

    def owner_alive(self) -> bool:
        return process_matches(self.owner_pid, self.owner_create_time)


@dataclass
class WorkerSlot:
    """The supervisor's part of one slot."""

    state: WorkerState = WorkerState.EMPTY
    worker_id: int = 0
    pid: int = 0
    pid_create_time: float = 0.0
    restarts: int = 0
    exit_code: int = 0
    started_at: float = 0.0
    changed_at: float = 0.0
    healthy_since: float = 0.0
    url: str = ""
    gpus: str = ""


@dataclass
class RouterColumns:
    """The router's part of one slot: its live counters for that worker."""

    in_flight: int = 0
    served: int = 0
    errors: int = 0
    updated_at: float = 0.0


@dataclass
class RouterTotals:
    """The router section of the header: who reads the table and its overall counters."""

    pid: int = 0
    heartbeat: float = 0.0
    requests: int = 0
    errors: int = 0
    in_flight: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0


@dataclass
class SlotView:
    """One slot as read by a reader: its index, the supervisor part and the router part."""

    index: int
    worker: WorkerSlot
    router: RouterColumns


def segment_name_for_port(port: int) -> str:
    """The segment of the ``sglctl up`` run whose router listens on ``port``.

    The router port is unique per host while a run is up, so it is a natural key that the
    dashboard and ``add-worker --local`` can derive from a router URL.
    """
    return f"{NAME_PREFIX}{port}"


def list_segments() -> list[str]:
    """Names of sglctl segments on this host (Linux ``/dev/shm``; empty elsewhere)."""
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(NAME_PREFIX))
    except OSError:
        return []


def process_matches(pid: int, create_time: float) -> bool:
    """True when ``pid`` runs and is the same process that started at ``create_time``."""
    if pid <= 0:
        return False
    started = process_start_time(pid)
    return started != 0.0 and abs(started - create_time) < 0.5


@contextlib.contextmanager
def _untracked() -> Iterator[None]:
    """Keep ``multiprocessing``'s resource tracker out of our segments (Python < 3.13).

    Before 3.13 every ``SharedMemory`` (even one that only attaches) registers with a tracker
    process that unlinks the segment when the registering process exits -- so the router
    exiting would delete the supervisor's table. Lifetimes here are explicit (the supervisor
    unlinks at shutdown; a stale segment is replaced by the next run), so we opt out.
    """
    if sys.version_info >= (3, 13):
        yield
        return
    tracker = shared_memory.resource_tracker  # type: ignore[attr-defined]
    saved = tracker.register, tracker.unregister
    tracker.register = tracker.unregister = lambda *args, **kwargs: None
    try:
        yield
    finally:
        tracker.register, tracker.unregister = saved


def _open(name: str, create: bool = False, size: int = 0) -> shared_memory.SharedMemory:
    with _untracked():
        if sys.version_info >= (3, 13):
            return shared_memory.SharedMemory(name, create=create, size=size, track=False)
        return shared_memory.SharedMemory(name, create=create, size=size)


def _encode(text: str, size: int) -> bytes:
    raw = text.encode()
    if len(raw) > size:
        raise ValueError(f"{text!r} is longer than {size} bytes")
    return raw


def _decode(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


class StateTable:
    """A handle on one segment. Create with :meth:`create` (supervisor) or :meth:`attach`."""

    def __init__(self, shm: shared_memory.SharedMemory, name: str, owner: bool) -> None:
        if shm.buf is None:
            raise StateTableError(f"shared-memory segment {name!r} is not mapped")
        self._shm = shm
        self._buf: memoryview = shm.buf
        self.name = name
        self.owner = owner
        magic, version, n_slots, slot_size, header_size, *_ = _HDR_FIXED.unpack_from(self._buf, 0)
        if magic != MAGIC:
            self.close()
            raise StateTableError(f"shared-memory segment {name!r} is not an sglctl state table")
        if (version, slot_size, header_size) != (VERSION, SLOT_SIZE, HEADER_SIZE):
            self.close()
            raise StateTableError(
                f"state table {name!r} has layout version {version}, this sglctl expects "
                f"{VERSION}; run the same sglctl version on both sides"
            )
        self.n_slots = int(n_slots)

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        name: str,
        *,
        n_slots: int = DEFAULT_SLOTS,
        router_url: str = "",
        control_path: str = "",
        run_dir: str = "",
        model: str = "",
        backend: str = "",
    ) -> tuple[StateTable, list[WorkerSlot]]:
        """Create segment ``name`` owned by this process.

        Returns the table and, when a stale segment from a crashed run was replaced, that
        run's non-empty slots (so the caller can stop workers that outlived it). Raises
        :class:`StateTableError` when a live run owns the name.
        """
        size = HEADER_SIZE + n_slots * SLOT_SIZE
        stale_slots: list[WorkerSlot] = []
        try:
            shm = _open(name, create=True, size=size)
        except FileExistsError:
            stale_slots = cls._take_over_stale(name)
            shm = _open(name, create=True, size=size)
        buf = shm.buf
        assert buf is not None
        buf[:size] = bytes(size)
        me = psutil.Process()
        strings = _HDR_STRINGS.pack(
            _encode(router_url, 128),
            _encode(control_path, 256),
            _encode(run_dir, 256),
            _encode(model, 128),
            _encode(backend, 16),
        )
        buf[_OFF_STRINGS : _OFF_STRINGS + len(strings)] = strings
        # The magic goes in last: a reader that attaches mid-creation sees "not ours yet".
        _HDR_FIXED.pack_into(
            buf,
            0,
            MAGIC,
            VERSION,
            n_slots,
            SLOT_SIZE,
            HEADER_SIZE,
            me.pid,
            me.create_time(),
            time.time(),
        )
        log.debug("created state table %s (%d slots, %d bytes)", name, n_slots, size)
        return cls(shm, name, owner=True), stale_slots

    @classmethod
    def _take_over_stale(cls, name: str) -> list[WorkerSlot]:
        """Inspect an existing segment ``name``; unlink it if its owner is dead, else refuse."""
        try:
            old = cls.attach(name)
        except StateTableError as exc:
            raise StateTableError(
                f"shared-memory segment {name!r} exists but is not usable ({exc}); "
                f"remove /dev/shm/{name} if no sglctl run uses it"
            ) from exc
        try:
            info = old.info()
            if info.owner_alive():
                raise StateTableError(
                    f"another `sglctl up` (pid {info.owner_pid}, router {info.router_url or '?'}) "
                    f"owns state table {name!r}; stop it first or choose another --port"
                )
            slots = [view.worker for view in old.read_slots()]
            log.warning(
                "replacing stale state table %s left by a crashed run (pid %d, started %s)",
                name,
                info.owner_pid,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created_at)),
            )
            old.unlink()
            return slots
        finally:
            old.close()

    @classmethod
    def attach(cls, name: str) -> StateTable:
        """Open an existing segment (router, dashboard, control client)."""
        try:
            shm = _open(name)
        except FileNotFoundError as exc:
            raise StateTableError(
                f"no state table named {name!r} (is `sglctl up` running?)"
            ) from exc
        if shm.size < HEADER_SIZE:
            shm.close()
            raise StateTableError(
                f"shared-memory segment {name!r} is too small to be a state table"
            )
        return cls(shm, name, owner=False)

    def close(self) -> None:
        """Unmap the segment (it stays for the other processes)."""
        with contextlib.suppress(BufferError):
            self._shm.close()

    def unlink(self) -> None:
        """Remove the segment's name; existing mappings stay valid until closed."""
        with _untracked(), contextlib.suppress(FileNotFoundError):
            self._shm.unlink()

    def __enter__(self) -> StateTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- header ----------------------------------------------------------------------------
    def info(self) -> TableInfo:
        _, _, n_slots, _, _, pid, ctime, created = _HDR_FIXED.unpack_from(self._buf, 0)
        router_url, control, run_dir, model, backend = _HDR_STRINGS.unpack_from(
            self._buf, _OFF_STRINGS
        )
        return TableInfo(
            name=self.name,
            n_slots=int(n_slots),
            owner_pid=int(pid),
            owner_create_time=float(ctime),
            created_at=float(created),
            router_url=_decode(router_url),
            control_path=_decode(control),
            run_dir=_decode(run_dir),
            model=_decode(model),
            backend=_decode(backend),
        )

    def generation(self) -> int:
        """Bumped by the supervisor after every slot write: poll this, re-read on change."""
        return int(_HDR_GENERATION.unpack_from(self._buf, _OFF_GENERATION)[0])

    # -- supervisor side -------------------------------------------------------------------
    def write_slot(self, index: int, slot: WorkerSlot) -> None:
        """Publish the supervisor part of slot ``index`` (supervisor only)."""
        off = self._slot_offset(index)
        seq = _SEQ.unpack_from(self._buf, off)[0]
        _SEQ.pack_into(self._buf, off, seq + 1 | 1)  # odd: write in progress
        _SLOT_SUP.pack_into(
            self._buf,
            off,
            seq + 1 | 1,
            int(slot.state),
            slot.worker_id,
            slot.pid,
            slot.pid_create_time,
            slot.restarts,
            slot.exit_code,
            slot.started_at,
            slot.changed_at,
            slot.healthy_since,
            _encode(slot.url, 128),
            _encode(slot.gpus, 64),
        )
        _SEQ.pack_into(self._buf, off, (seq + 1 | 1) + 1)  # even: consistent
        gen = _HDR_GENERATION.unpack_from(self._buf, _OFF_GENERATION)[0]
        _HDR_GENERATION.pack_into(self._buf, _OFF_GENERATION, gen + 1)

    def free_slot(self) -> int | None:
        """The first EMPTY slot, else the first REMOVED one, else None (supervisor only)."""
        removed = None
        for index in range(self.n_slots):
            state = self.read_worker(index).state
            if state == WorkerState.EMPTY:
                return index
            if state == WorkerState.REMOVED and removed is None:
                removed = index
        return removed

    # -- router side -----------------------------------------------------------------------
    def write_router_columns(self, index: int, cols: RouterColumns) -> None:
        """Publish the router's counters for slot ``index`` (router only)."""
        off = self._slot_offset(index) + _OFF_SLOT_ROUTER
        seq = _SEQ.unpack_from(self._buf, off)[0]
        odd = seq + 1 | 1
        _SEQ.pack_into(self._buf, off, odd)
        _SLOT_ROUTER.pack_into(
            self._buf, off, odd, cols.in_flight, cols.served, cols.errors, cols.updated_at
        )
        _SEQ.pack_into(self._buf, off, odd + 1)

    def write_router_totals(self, totals: RouterTotals) -> None:
        """Publish the router's pid, heartbeat and overall counters (router only)."""
        seq = _SEQ.unpack_from(self._buf, _OFF_ROUTER)[0]
        odd = seq + 1 | 1
        _SEQ.pack_into(self._buf, _OFF_ROUTER, odd)
        _HDR_ROUTER.pack_into(
            self._buf,
            _OFF_ROUTER,
            odd,
            totals.pid,
            totals.heartbeat,
            totals.requests,
            totals.errors,
            totals.in_flight,
            totals.p50_ms,
            totals.p99_ms,
        )
        _SEQ.pack_into(self._buf, _OFF_ROUTER, odd + 1)

    # -- readers ---------------------------------------------------------------------------
    def read_worker(self, index: int) -> WorkerSlot:
        """The supervisor part of slot ``index``, never torn."""
        raw = self._consistent_read(self._slot_offset(index), _SLOT_SUP.size)
        (_, state, wid, pid, pctime, restarts, code, started, changed, healthy, url, gpus) = (
            _SLOT_SUP.unpack(raw)
        )
        known = state in WorkerState._value2member_map_
        return WorkerSlot(
            state=WorkerState(state) if known else WorkerState.EMPTY,
            worker_id=wid,
            pid=pid,
            pid_create_time=pctime,
            restarts=restarts,
            exit_code=code,
            started_at=started,
            changed_at=changed,
            healthy_since=healthy,
            url=_decode(url),
            gpus=_decode(gpus),
        )

    def read_router_columns(self, index: int) -> RouterColumns:
        raw = self._consistent_read(self._slot_offset(index) + _OFF_SLOT_ROUTER, _SLOT_ROUTER.size)
        _, in_flight, served, errors, updated = _SLOT_ROUTER.unpack(raw)
        return RouterColumns(in_flight, served, errors, updated)

    def read_router_totals(self) -> RouterTotals:
        raw = self._consistent_read(_OFF_ROUTER, _HDR_ROUTER.size)
        _, pid, heartbeat, requests, errors, in_flight, p50, p99 = _HDR_ROUTER.unpack(raw)
        return RouterTotals(pid, heartbeat, requests, errors, in_flight, p50, p99)

    def read_slots(self, include_empty: bool = False) -> list[SlotView]:
        """Every used slot (both parts), in index order."""
        views = []
        for index in range(self.n_slots):
            worker = self.read_worker(index)
            if worker.state == WorkerState.EMPTY and not include_empty:
                continue
            views.append(SlotView(index, worker, self.read_router_columns(index)))
        return views

    # -- internals -------------------------------------------------------------------------
    def _slot_offset(self, index: int) -> int:
        if not 0 <= index < self.n_slots:
            raise IndexError(f"slot {index} out of range (table has {self.n_slots})")
        return HEADER_SIZE + index * SLOT_SIZE

    def _consistent_read(self, off: int, size: int) -> bytes:
        """Seqlock read: copy ``size`` bytes at ``off`` (which starts with the seq counter).

        Writes are rare and take microseconds, but the writer can be descheduled mid-write on
        a busy machine, so after a few spins we yield the CPU instead of burning it.
        """
        buf = self._buf
        deadline = 0.0
        spins = 0
        while True:
            before = _SEQ.unpack_from(buf, off)[0]
            if not before & 1:
                raw = bytes(buf[off : off + size])
                if _SEQ.unpack_from(buf, off)[0] == before:
                    return raw
            spins += 1
            if spins < 64:
                continue
            now = time.monotonic()
            if not deadline:
                deadline = now + _MAX_READ_WAIT_SECS
            elif now > deadline:
                break
            time.sleep(0)
        # The writer died mid-write (the counter stays odd): return what is there rather than
        # hang the reader; the next write by a new writer makes the slot consistent again.
        log.warning(
            "state table %s: slot at offset %d stayed mid-write; reading it anyway", self.name, off
        )
        return bytes(buf[off : off + size])
