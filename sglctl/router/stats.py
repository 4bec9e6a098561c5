"""Rolling request statistics for ``GET /stats`` (the ``sglctl status`` dashboard).

Prometheus histograms answer "since start"; the dashboard wants "now": requests per second
over the last 10 s and latency percentiles over the last 60 s. Finished requests are kept as
(time, latency) pairs in a bounded deque and summarised on demand.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import numpy as np

RATE_WINDOW_SECS = 10.0
LATENCY_WINDOW_SECS = 60.0


class RollingStats:
    """Totals since start plus windowed rate and latency percentiles."""

    def __init__(
        self, max_samples: int = 200_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.requests_total = 0
        self.errors_total = 0
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._clock = clock

    def record(self, latency_secs: float, ok: bool) -> None:
        self.requests_total += 1
        if not ok:
            self.errors_total += 1
        now = self._clock()
        samples = self._samples
        samples.append((now, latency_secs))
        # Drop what left the window here too, not only when someone reads /stats: unread, the
        # deque filled to max_samples (~22 MB of tuples), which the soak showed as RSS growth.
        horizon = now - LATENCY_WINDOW_SECS
        while samples[0][0] < horizon:
            samples.popleft()

    def snapshot(self) -> dict[str, float | int]:
        now = self._clock()
        samples = self._samples
        while samples and samples[0][0] < now - LATENCY_WINDOW_SECS:
            samples.popleft()
        recent = (
            sum(1 for t, _ in reversed(samples) if t >= now - RATE_WINDOW_SECS) if samples else 0
        )
        if samples:
            lat = np.fromiter((x for _, x in samples), dtype=np.float64, count=len(samples))
            p50, p99 = (float(v) * 1000.0 for v in np.percentile(lat, [50, 99]))
        else:
            p50 = p99 = 0.0
        return {
            "requests_total": self.requests_total,
            "errors_total": self.errors_total,
            "requests_per_second": recent / RATE_WINDOW_SECS,
            "latency_p50_ms": round(p50, 3),
            "latency_p99_ms": round(p99, 3),
        }
