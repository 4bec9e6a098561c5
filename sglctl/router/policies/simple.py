"""The load-balancing policies that ignore the request's content."""

from __future__ import annotations

import random
from collections.abc import Sequence

from sglctl.router.policies.base import NO_KEY, Policy, RouteKey
from sglctl.router.workers import Worker


class RandomPolicy(Policy):
    """Uniformly random."""

    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, workers: Sequence[Worker], key: RouteKey = NO_KEY) -> Worker | None:
        return self._rng.choice(workers) if workers else None


class RoundRobinPolicy(Policy):
    """Each worker in turn (over whatever list is routable at the time)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def select(self, workers: Sequence[Worker], key: RouteKey = NO_KEY) -> Worker | None:
        if not workers:
            return None
        worker = workers[self._next % len(workers)]
        self._next += 1
        return worker


class PowerOfTwoPolicy(Policy):
    """Two random workers, the less loaded of them: near-shortest-queue without a global scan."""

    name = "power_of_two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, workers: Sequence[Worker], key: RouteKey = NO_KEY) -> Worker | None:
        if len(workers) < 2:
            return workers[0] if workers else None
        a, b = self._rng.sample(workers, 2)
        return a if a.in_flight <= b.in_flight else b


class ShortestQueuePolicy(Policy):
    """The worker with the fewest requests in flight (random among ties: none is favoured)."""

    name = "shortest_queue"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, workers: Sequence[Worker], key: RouteKey = NO_KEY) -> Worker | None:
        if not workers:
            return None
        least = min(w.in_flight for w in workers)
        candidates = [w for w in workers if w.in_flight == least]
        return candidates[0] if len(candidates) == 1 else self._rng.choice(candidates)
