"""Workload generators: ``trace:PATH``, ``shared-prefix`` and ``multi-turn``.

:func:`build_workload` turns the ``--workload`` spelling into a :class:`Workload`.
"""

from __future__ import annotations

from sglctl.bench.workload import Workload
from sglctl.bench.workloads.multi_turn import MultiTurnConfig, multi_turn_workload
from sglctl.bench.workloads.shared_prefix import SharedPrefixConfig, shared_prefix_workload
from sglctl.bench.workloads.trace import TraceFormatError, load_trace, trace_workload

WORKLOAD_NAMES = ("trace:PATH", "shared-prefix", "multi-turn")

__all__ = [
    "WORKLOAD_NAMES",
    "MultiTurnConfig",
    "SharedPrefixConfig",
    "TraceFormatError",
    "build_workload",
    "load_trace",
    "multi_turn_workload",
    "shared_prefix_workload",
    "trace_workload",
]


def build_workload(
    spec: str,
    *,
    max_requests: int | None = None,
    shared_prefix: SharedPrefixConfig | None = None,
    multi_turn: MultiTurnConfig | None = None,
) -> Workload:
    """Build the workload named by ``spec``, cut to its first ``max_requests`` requests.

    Raises ValueError with the accepted spellings for an unknown name, and OSError /
    :class:`TraceFormatError` for a trace that cannot be read.
    """
    if spec.startswith("trace:"):
        path = spec.removeprefix("trace:")
        if not path:
            raise ValueError("trace workload needs a path: --workload trace:PATH")
        return trace_workload(path, limit=max_requests)
    if spec == "shared-prefix":
        return shared_prefix_workload(shared_prefix).head(max_requests)
    if spec == "multi-turn":
        return multi_turn_workload(multi_turn).head(max_requests)
    raise ValueError(f"unknown workload {spec!r}; expected one of: {', '.join(WORKLOAD_NAMES)}")
