"""Named shared-memory segments whose lifetime the code owns, not ``multiprocessing``.

Both the supervisor's worker table (:mod:`sglctl.state_table`) and the router processes'
in-flight table (:mod:`sglctl.router.shared_loads`) are unlinked explicitly by the one process
that created them; the resource tracker of Python < 3.13 would otherwise unlink a segment when
any process that merely attached to it exits.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from multiprocessing import shared_memory


@contextlib.contextmanager
def untracked() -> Iterator[None]:
    """Keep ``multiprocessing``'s resource tracker out of our segments (Python < 3.13).

    Before 3.13 every ``SharedMemory`` (even one that only attaches) registers with a tracker
    process that unlinks the segment when the registering process exits -- so the router
    exiting would delete the supervisor's table, and a router child exiting its siblings'
    in-flight table. Lifetimes here are explicit (the creator unlinks at shutdown; a stale
    segment is replaced by the next run), so we opt out.
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


def open_segment(name: str, create: bool = False, size: int = 0) -> shared_memory.SharedMemory:
    """Attach to (or with ``create``, make) segment ``name``, untracked."""
    with untracked():
        if sys.version_info >= (3, 13):
            return shared_memory.SharedMemory(name, create=create, size=size, track=False)
        return shared_memory.SharedMemory(name, create=create, size=size)
