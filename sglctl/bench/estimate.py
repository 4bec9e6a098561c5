"""How long a benchmark run will take, said before it starts (a rough figure, not a promise).

The default ``sglctl bench --workload shared-prefix`` sends 1,024 requests of 256 output
tokens; at ``--concurrency 16`` against H100-speed workers that is about two minutes, which a
newcomer should hear before waiting for it, together with the flags that shorten it.

The figure assumes H100-speed decoding (the simulator's calibration, ``sglctl.sim.timing``:
~7.5 ms a decode step at batch 8-16 with a few thousand tokens of context each) and a prompt
mostly served from the prefix cache. Closed loop: requests go in waves of ``concurrency``,
each lasting its output length in decode steps. Open loop: the arrival span (``n / rate``,
or the trace's span over ``--speedup``) plus one request's time. ``--duration`` caps it.
"""

from __future__ import annotations

import math

from sglctl.bench.workload import Workload

#: Seconds of one decode step of a moderately batched H100 (see the module docstring).
DECODE_STEP_SECS = 0.0075
#: Seconds to prefill one uncached prompt token (H100, 8B model: ~40k tokens/s).
PREFILL_SECS_PER_TOKEN = 1 / 40_000


def estimate_seconds(
    workload: Workload,
    mode: str,
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    speedup: float = 1.0,
    duration: float | None = None,
) -> float:
    """Rough wall time of the run at H100 speed (0.0 for an empty workload)."""
    requests = workload.requests
    if not requests:
        return 0.0
    mean_out = workload.total_output_tokens() / len(requests)
    mean_in = workload.total_input_tokens() / len(requests)
    # Half the prompt uncached is pessimistic for shared-prefix workloads, fine for traces.
    one = mean_out * DECODE_STEP_SECS + 0.5 * mean_in * PREFILL_SECS_PER_TOKEN
    if mode == "concurrency":
        total = math.ceil(len(requests) / max(concurrency or 1, 1)) * one
    elif mode == "rate" and rate:
        total = len(requests) / rate + one
    else:
        arrivals = [r.arrival for r in requests if r.arrival is not None]
        span = (max(arrivals) - min(arrivals)) / speedup if arrivals else 0.0
        total = span + one
    return min(total, duration) if duration is not None else total


def human_duration(secs: float) -> str:
    """``"about 40 s"``, ``"about 2 min"``, ``"about 1.5 h"``."""
    if secs < 90:
        return f"about {max(1, round(secs))} s"
    if secs < 90 * 60:
        return f"about {round(secs / 60)} min"
    return f"about {secs / 3600:.1f} h"


def notice(workload: Workload, mode: str, secs: float, concurrency: int | None) -> str:
    """The line printed before a run: its size, its expected length, how to shorten it."""
    pace = f"--concurrency {concurrency}" if mode == "concurrency" else f"{mode} mode"
    text = (
        f"{workload.name}: {len(workload.requests)} requests at {pace}, "
        f"{human_duration(secs)} at H100 speed"
    )
    if secs >= 30:
        text += "; shorter: --max-requests N or --duration SECS"
        if workload.name == "shared-prefix":
            text += " (or --gsp-num-groups / --gsp-output-len)"
        elif workload.name == "multi-turn":
            text += " (or --mt-conversations / --mt-turns)"
    return text
