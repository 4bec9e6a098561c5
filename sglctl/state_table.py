"""The shared-memory worker table between ``sglctl up`` (the supervisor) and its router.

Why shared memory: the router must stop sending to a worker within 100 ms of the supervisor
seeing it die, and the dashboard wants every worker's state and the router's counters without
asking either process. A fixed table in one named segment gives both: the supervisor writes a
slot and bumps a generation counter; the router polls that counter every few milliseconds (a
single 8-byte read) and re-reads the slots only when it moved.

Layout (fixed sizes, version in the header; fields little-endian, the sequence words and the
generation in native byte order, see below)::

    header (1024 bytes)   magic, version, slot count/size, owner pid + process start time,
                          generation (supervisor), router section (router), and strings
                          written once at creation (router URL, control socket, run dir,
                          model, backend)
    slot[i] (512 bytes)   supervisor part (offset 0): seq, state, worker id, pid, restarts,
                          times, url, GPU ids, role, bootstrap port, CRC -- router part
                          (offset 320): seq, in-flight, served, errors, time, CRC

**One writer per field.** The supervisor alone writes the header strings, the generation and
the supervisor part of each slot; the router alone writes the router section and the router
part of each slot. Each part is a seqlock: an 8-byte sequence word, then the payload (the
fields, then a CRC-32 of sequence and fields). A writer makes the sequence odd, writes the
payload *without touching the sequence word*, then makes it even (+2 per write); a reader
copies the payload and retries while the sequence is odd, changed under it, or the CRC does
not match. A sequence of 0 means "never written" (all fields zero).

Why the sequence word is outside what ``struct`` packs: CPython's ``struct.pack_into`` zeroes
its whole target before writing the fields (and writes ``<Q`` byte by byte), so when the
sequence was inside the packed region it read 0 -- even, "consistent" -- several times within
one write, and readers accepted zeroed or half-written slots (the router took an all-zero slot
for a URL change and dropped a healthy worker). Sequence words and the generation are now read
and written as whole aligned 8-byte words through a ``memoryview`` cast to ``"Q"`` (CPython
does a fixed 8-byte ``memcpy`` there, which compiles to one load or store, single-copy atomic
when aligned on x86-64 and aarch64; native byte order, as the table never leaves its host),
and payloads are copied in with one slice assignment.

**Memory ordering.** A seqlock needs the writer's stores to become visible in program order
(sequence odd, payload, sequence even) and the reader's loads to happen in order (sequence,
payload, sequence). The compiler cannot reorder them: each step is a separate call into the
interpreter. *x86-64* (TSO) keeps store-store and load-load order for plain accesses, so the
sequence alone suffices there. *aarch64* does not: without a store-store barrier on the writer
and a load-load barrier on the reader, the payload stores may be seen before the odd sequence,
or the reader's payload loads satisfied after its second sequence load. CPython's memoryview
accesses are plain loads and stores with no barrier; the GIL is per process and orders nothing
for another process, and system calls are not a documented barrier. We do not rely on any
barrier: the CRC over (sequence, fields) lets a reader detect a payload that does not belong
to the even sequence it saw, torn or reordered, and retry. A torn copy passes with probability
2^-32, and torn copies are themselves rare (a write takes microseconds).

**Stale segments.** The header records the owner's pid and process start time. A new run that
finds a segment of the same name checks the owner: alive means another run owns it (refused,
with a message); dead means a crashed run left it behind, and it is replaced. The stale
table's worker pids are returned so the caller can stop orphans that outlived their owner.
:func:`remove_stale_segments` removes every table whose owner is dead (``sglctl status`` and
``sglctl up`` call it), so a run killed with SIGKILL leaves nothing behind for long.

Only the standard library and psutil are used, so the router can import this module without
importing the supervisor.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import stat
import struct
import time
import zlib
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path

import psutil

from sglctl.proctree import process_start_time
from sglctl.shm import open_segment, untracked

log = logging.getLogger(__name__)

MAGIC = b"SGLCTLST"
#: 2: sequence words outside the packed payload, CRC-32 per part. 3: the worker's PD role
#: and bootstrap port in the supervisor part (the router part moved from 264 to 320).
VERSION = 3
HEADER_SIZE = 1024
SLOT_SIZE = 512
DEFAULT_SLOTS = 64
NAME_PREFIX = "sglctl_"


#: A worker's role, as the router names it (``Worker.role``); stored as its index here.
#: "regular" is 0, so a slot written without a role reads as a regular worker.
ROLES = ("regular", "prefill", "decode")


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
# Fixed part written at creation (never changes afterwards). Same place in every version, so
# the owner of a segment of another version can still be checked.
_HDR_FIXED = struct.Struct("<8sIIIIQdd")  # magic, version, n_slots, slot_size, header_size,
# owner pid, owner process start time, created_at (wall clock)
_OFF_GENERATION = 48  # one aligned 8-byte word
# Router section: seq word, then payload pid, heartbeat, requests, errors, in_flight, p50 ms,
# p99 ms, CRC.
_OFF_ROUTER = 56
_HDR_ROUTER = struct.Struct("<QdQQQdd")
_OFF_STRINGS = 128
# router_url, control_path, run_dir, model, backend
_HDR_STRINGS = struct.Struct("<128s256s256s128s16s")

# -- slots ----------------------------------------------------------------------------------
# Supervisor part at the slot's start: seq word, then state, worker_id, pid, pid_create_time,
# restarts, exit_code, started_at, changed_at, healthy_since, url, gpus, role (index in
# ROLES), bootstrap_port (0: none), CRC.
_SLOT_SUP = struct.Struct("<IIQdIiddd128s64sII")
# Router part: seq word, then in_flight, served, errors, updated_at, CRC. At 320, not right
# after the supervisor part, so that part can grow a field or two without moving it again.
_OFF_SLOT_ROUTER = 320
_SLOT_ROUTER = struct.Struct("<QQQd")
_SEQ_SIZE = 8
_CRC = struct.Struct("<I")


def _part_size(fields: struct.Struct) -> int:
    """Bytes a seqlocked part takes: sequence word, fields, CRC."""
    return _SEQ_SIZE + fields.size + _CRC.size


assert _OFF_STRINGS + _HDR_STRINGS.size <= HEADER_SIZE
assert _OFF_ROUTER + _part_size(_HDR_ROUTER) <= _OFF_STRINGS
assert _part_size(_SLOT_SUP) <= _OFF_SLOT_ROUTER
assert _OFF_SLOT_ROUTER + _part_size(_SLOT_ROUTER) <= SLOT_SIZE
# Sequence words must be aligned for their 8-byte loads and stores to be single accesses.
assert _OFF_GENERATION % 8 == _OFF_ROUTER % 8 == _OFF_SLOT_ROUTER % 8 == 0
assert HEADER_SIZE % 8 == SLOT_SIZE % 8 == 0

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
    #: One of :data:`ROLES`: the router registers the worker in that pool (PD layouts).
    role: str = "regular"
    #: A prefill worker's ``--disaggregation-bootstrap-port``, which the router hands to the
    #: decode side of each request (0: none).
    bootstrap_port: int = 0


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


def _encode(text: str, size: int) -> bytes:
    raw = text.encode()
    if len(raw) > size:
        raise ValueError(f"{text!r} is longer than {size} bytes")
    return raw


def _decode(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _parse_info(name: str, buf: memoryview) -> TableInfo:
    """The fixed header and strings (same offsets in every layout version)."""
    _, _, n_slots, _, _, pid, ctime, created = _HDR_FIXED.unpack_from(buf, 0)
    router_url, control, run_dir, model, backend = _HDR_STRINGS.unpack_from(buf, _OFF_STRINGS)
    return TableInfo(
        name=name,
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


def _peek_info(name: str) -> TableInfo | None:
    """Segment ``name``'s header whatever its layout version; None when it is missing, not
    an sglctl table, or still being created (no magic yet, or no owner recorded)."""
    try:
        shm = open_segment(name)
    except (FileNotFoundError, ValueError, OSError):
        return None
    try:
        buf = shm.buf
        if buf is None or shm.size < HEADER_SIZE or bytes(buf[: len(MAGIC)]) != MAGIC:
            return None
        info = _parse_info(name, buf)
        del buf
        if info.owner_pid <= 0 or info.owner_create_time <= 0:
            return None
        return info
    finally:
        with contextlib.suppress(BufferError):
            shm.close()


def _unlink(name: str) -> None:
    """Remove segment ``name``'s name (gone already is fine)."""
    try:
        shm = open_segment(name)
    except FileNotFoundError:
        return
    with untracked(), contextlib.suppress(FileNotFoundError):
        shm.unlink()
    with contextlib.suppress(BufferError):
        shm.close()


def _owner_gone(info: TableInfo) -> bool:
    """True only when the owner is surely dead: no such pid, or the pid was reused. A process
    we may not inspect counts as alive (never remove a table that might be in use)."""
    try:
        started = psutil.Process(info.owner_pid).create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False
    return abs(started - info.owner_create_time) >= 0.5


def remove_stale_segments() -> list[TableInfo]:
    """Remove every ``/dev/shm/sglctl_*`` table whose owner (pid + start time) is dead.

    A supervisor killed with SIGKILL cannot remove its segment; the next ``sglctl up`` on the
    same port replaces it, but one on another port, or none at all, would leave it forever.
    ``sglctl status`` (and ``sglctl up``) call this so that leftovers go as soon as anything
    looks. Segments still being created and segments that are not sglctl tables are left
    alone. Returns the removed tables' headers (the caller may report them, or remove the
    stop worker orphans they name); the control socket each names is removed with it.
    """
    removed = []
    for name in list_segments():
        info = _peek_info(name)
        if info is None or not _owner_gone(info):
            continue
        try:
            _unlink(name)
        except PermissionError:  # another user's run: theirs to clean up
            continue
        log.info("removed stale state table %s (its owner, pid %d, is gone)", name, info.owner_pid)
        _remove_control_socket(info)
        removed.append(info)
    return removed


def _remove_control_socket(info: TableInfo) -> None:
    """Remove the dead run's control socket named in its header (only if it is a socket)."""
    if not info.control_path:
        return
    path = Path(info.control_path)
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
            log.info("removed control socket %s left by the same run", path)


class StateTable:
    """A handle on one segment. Create with :meth:`create` (supervisor) or :meth:`attach`."""

    def __init__(self, shm: shared_memory.SharedMemory, name: str, owner: bool) -> None:
        if shm.buf is None:
            raise StateTableError(f"shared-memory segment {name!r} is not mapped")
        self._shm = shm
        self._buf: memoryview = shm.buf
        self._words: memoryview = self._buf[: len(self._buf) // 8 * 8].cast("Q")
        self._last_good: dict[int, bytes] = {}
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
            shm = open_segment(name, create=True, size=size)
        except FileExistsError:
            stale_slots = cls._take_over_stale(name)
            shm = open_segment(name, create=True, size=size)
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
        # The magic goes in last, after the owner: a reader that attaches mid-creation sees
        # "not ours yet", never an sglctl table with no owner (which would look stale).
        _HDR_FIXED.pack_into(
            buf,
            0,
            bytes(len(MAGIC)),
            VERSION,
            n_slots,
            SLOT_SIZE,
            HEADER_SIZE,
            me.pid,
            me.create_time(),
            time.time(),
        )
        buf[: len(MAGIC)] = MAGIC
        log.debug("created state table %s (%d slots, %d bytes)", name, n_slots, size)
        return cls(shm, name, owner=True), stale_slots

    @classmethod
    def _take_over_stale(cls, name: str) -> list[WorkerSlot]:
        """Inspect an existing segment ``name``; unlink it if its owner is dead, else refuse."""
        info = _peek_info(name)
        if info is None:
            raise StateTableError(
                f"shared-memory segment {name!r} exists but is not an sglctl state table "
                f"(or is being created right now); remove /dev/shm/{name} if no sglctl run "
                "uses it"
            )
        if info.owner_alive():
            raise StateTableError(
                f"another `sglctl up` (pid {info.owner_pid}, router {info.router_url or '?'}) "
                f"owns state table {name!r}; stop it first or choose another --port"
            )
        slots: list[WorkerSlot] = []
        # Another layout version: no slots to read (its workers cannot be named).
        with contextlib.suppress(StateTableError), cls.attach(name) as old:
            slots = [view.worker for view in old.read_slots()]
        log.warning(
            "replacing stale state table %s left by a crashed run (pid %d, started %s)",
            name,
            info.owner_pid,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created_at)),
        )
        _unlink(name)
        _remove_control_socket(info)
        return slots

    @classmethod
    def attach(cls, name: str) -> StateTable:
        """Open an existing segment (router, dashboard, control client)."""
        try:
            shm = open_segment(name)
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
        self._words.release()  # a view of the mapping: the mapping cannot close while it lives
        with contextlib.suppress(BufferError):
            self._shm.close()

    def unlink(self) -> None:
        """Remove the segment's name; existing mappings stay valid until closed."""
        with untracked(), contextlib.suppress(FileNotFoundError):
            self._shm.unlink()

    def __enter__(self) -> StateTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- header ----------------------------------------------------------------------------
    def info(self) -> TableInfo:
        return _parse_info(self.name, self._buf)

    def generation(self) -> int:
        """Bumped by the supervisor after every slot write: poll this, re-read on change."""
        return int(self._words[_OFF_GENERATION // 8])

    # -- supervisor side -------------------------------------------------------------------
    def write_slot(self, index: int, slot: WorkerSlot) -> None:
        """Publish the supervisor part of slot ``index`` (supervisor only)."""
        fields = _SLOT_SUP.pack(
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
            ROLES.index(slot.role),
            slot.bootstrap_port,
        )
        self._seqlock_write(self._slot_offset(index), fields)
        gen = _OFF_GENERATION // 8
        self._words[gen] = self._words[gen] + 1

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
        fields = _SLOT_ROUTER.pack(cols.in_flight, cols.served, cols.errors, cols.updated_at)
        self._seqlock_write(self._slot_offset(index) + _OFF_SLOT_ROUTER, fields)

    def write_router_totals(self, totals: RouterTotals) -> None:
        """Publish the router's pid, heartbeat and overall counters (router only)."""
        fields = _HDR_ROUTER.pack(
            totals.pid,
            totals.heartbeat,
            totals.requests,
            totals.errors,
            totals.in_flight,
            totals.p50_ms,
            totals.p99_ms,
        )
        self._seqlock_write(_OFF_ROUTER, fields)

    # -- readers ---------------------------------------------------------------------------
    def read_worker(self, index: int) -> WorkerSlot:
        """The supervisor part of slot ``index``, never torn."""
        raw = self._seqlock_read(self._slot_offset(index), _SLOT_SUP.size)
        (
            state, wid, pid, pctime, restarts, code, started, changed, healthy, url, gpus, role,
            bootstrap_port,
        ) = _SLOT_SUP.unpack(raw)  # fmt: skip
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
            role=ROLES[role] if role < len(ROLES) else "regular",
            bootstrap_port=bootstrap_port,
        )

    def read_router_columns(self, index: int) -> RouterColumns:
        raw = self._seqlock_read(self._slot_offset(index) + _OFF_SLOT_ROUTER, _SLOT_ROUTER.size)
        return RouterColumns(*_SLOT_ROUTER.unpack(raw))

    def read_router_totals(self) -> RouterTotals:
        return RouterTotals(*_HDR_ROUTER.unpack(self._seqlock_read(_OFF_ROUTER, _HDR_ROUTER.size)))

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

    def _seqlock_write(self, off: int, fields: bytes) -> None:
        """Write one part: sequence odd, payload (fields + CRC) in one copy, sequence even.

        ``off`` is the part's sequence word. Only the part's single writer calls this. A
        sequence left odd by a writer that died mid-write is simply moved on (+2, to odd).
        """
        word = off // 8
        seq = int(self._words[word])
        odd = (seq + 1) | 1
        final = odd + 1
        crc = _CRC.pack(zlib.crc32(fields, final & 0xFFFFFFFF))
        self._words[word] = odd
        self._buf[off + _SEQ_SIZE : off + _SEQ_SIZE + len(fields) + _CRC.size] = fields + crc
        self._words[word] = final

    def _seqlock_read(self, off: int, size: int) -> bytes:
        """Read one part's ``size`` bytes of fields, never torn (see the module docstring).

        Writes are rare and take microseconds, but the writer can be descheduled mid-write on
        a busy machine, so after a few spins we yield the CPU instead of burning it.
        """
        buf, words, word = self._buf, self._words, off // 8
        start, end = off + _SEQ_SIZE, off + _SEQ_SIZE + size
        deadline = 0.0
        spins = 0
        while True:
            before = int(words[word])
            if before == 0:
                return bytes(size)  # never written
            if not before & 1:
                raw = bytes(buf[start : end + _CRC.size])
                if int(words[word]) == before:
                    fields, crc = raw[:size], raw[size:]
                    if _CRC.unpack(crc)[0] == zlib.crc32(fields, before & 0xFFFFFFFF):
                        self._last_good[off] = fields
                        return fields
            spins += 1
            if spins < 64:
                continue
            now = time.monotonic()
            if not deadline:
                deadline = now + _MAX_READ_WAIT_SECS
            elif now > deadline:
                break
            time.sleep(0)
        # The writer died mid-write (the sequence stays odd, or the payload never matched it):
        # rather than hang the reader, or hand it a torn part, give the last consistent copy
        # this handle read (all zero if none). The next write by a new writer heals the part.
        log.warning(
            "state table %s: the part at offset %d stayed mid-write for %.1f s (its writer "
            "died?); using its last consistent value",
            self.name,
            off,
            _MAX_READ_WAIT_SECS,
        )
        return self._last_good.get(off, bytes(size))
