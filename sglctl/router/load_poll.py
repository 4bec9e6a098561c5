"""The workers' own load (SGLang ``GET /get_load``), polled at a bounded rate.

The router counts the requests *it* sent; a worker also serves other routers, direct
clients and health probes, and only it knows how many requests wait for prefill. SGLang's
``/get_load`` answers ``[{"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"}, ...]``
(one entry per data-parallel rank; the simulated worker serves the same). One task polls
every worker every ``interval`` seconds, all at once, each call bounded by the interval, so
the cost is N small GETs per interval whatever the request rate. A worker that does not
answer (or answers something else) simply has no fresh entry: policies fall back to the
router's own counts (:mod:`~sglctl.router.policies.least_ttft` ignores stale entries).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

from sglctl.router.workers import WorkerRegistry

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_SECS = 0.5
#: Reports older than this are ignored (the poller is late or the worker is gone).
STALE_SECS = 3.0


@dataclass(frozen=True)
class WorkerLoad:
    """One worker's load as it reported it, summed over its data-parallel ranks."""

    num_reqs: int
    num_waiting_reqs: int
    num_tokens: int
    #: time.monotonic() when the answer arrived.
    at: float
    #: This router's own in-flight count on the worker when the answer arrived (for
    #: :func:`current_load`).
    own_in_flight: int = 0
    #: The worker's ``told_in_flight`` when the answer arrived (for :func:`current_load`).
    told: int = 0


def effective_load(in_flight: int, load: WorkerLoad | None, now: float) -> int:
    """A worker's load in requests: the router's own in-flight count, raised to what the
    worker reports it holds (``num_reqs``, waiting included) when that report is fresh.

    The max, not a sum: the worker's count includes this router's requests. It is what a
    router replica needs, each one seeing only its share of the traffic.
    """
    if load is None or now - load.at >= STALE_SECS:
        return in_flight
    return max(in_flight, load.num_reqs)


def current_load(in_flight: int, load: WorkerLoad | None, now: float, told: int = 0) -> int:
    """The worker's load now: the requests this router and the other replicas have in flight
    there (``told``: the worker's ``told_in_flight``, what ``--router-peers`` replicas last
    said of theirs), raised to the worker's last report moved on by the change of both since.

    :func:`effective_load` is the same on every replica between two polls, which is what
    ``--placement hash``'s bound needs (replicas agree on whom to skip). The greedy "least
    loaded" placement needs the opposite: with a report up to a poll interval old, the max of
    the report and the own count does not move when this router sends a request (its own
    count is inside the report), so every miss until the next poll would go to the same
    least-loaded worker. Adding the own change since the report spreads them. Replicas tell
    each other their in-flight counts with every batch of routes (``--router-peers``), so a
    request another replica sent or finished a few milliseconds ago counts at once, not at
    the next poll: telling only dispatches, a finished request counted until the next report,
    and three replicas stayed 1.15-1.26x one router's TTFT p99 on the conversation trace
    (``benchmarks/RESULTS.md``, "Router peers, the load told"). The report still matters for
    what no replica sees: clients that talk to the worker directly.
    """
    known = in_flight + told
    if load is None or now - load.at >= STALE_SECS:
        return known
    return max(known, load.num_reqs + known - load.own_in_flight - load.told)


def parse_load(body: Any, at: float, own_in_flight: int = 0, told: int = 0) -> WorkerLoad | None:
    """A ``/get_load`` answer (a list of per-rank dicts, or one dict) as a :class:`WorkerLoad`."""
    ranks = body if isinstance(body, list) else [body]
    totals = [0, 0, 0]
    for rank in ranks:
        if not isinstance(rank, dict):
            return None
        for i, field in enumerate(("num_reqs", "num_waiting_reqs", "num_tokens")):
            value = rank.get(field, 0)
            if not isinstance(value, int) or isinstance(value, bool):
                return None
            totals[i] += value
    return WorkerLoad(totals[0], totals[1], totals[2], at, own_in_flight, told)


class LoadPoller:
    """Keeps :attr:`loads` (worker URL -> :class:`WorkerLoad`) fresh for the policies."""

    def __init__(
        self,
        registry: WorkerRegistry,
        client: httpx.AsyncClient,
        interval_secs: float = DEFAULT_INTERVAL_SECS,
    ) -> None:
        self.registry = registry
        self.client = client
        self.interval_secs = interval_secs
        self.loads: dict[str, WorkerLoad] = {}
        #: URLs whose last poll failed (logged once per failure streak, not every interval).
        self._failing: set[str] = set()

    async def poll_once(self) -> None:
        workers = [w.url for w in self.registry.all()]
        for url in list(self.loads):
            if url not in workers:
                del self.loads[url]
        await asyncio.gather(*(self._poll(url) for url in workers))

    async def _poll(self, url: str) -> None:
        try:
            response = await self.client.get(
                url + "/get_load", timeout=max(min(self.interval_secs, 2.0), 0.2)
            )
            worker = self.registry.get(url)
            own = worker.in_flight if worker is not None else 0
            told = worker.told_in_flight if worker is not None else 0
            load = (
                parse_load(response.json(), time.monotonic(), own, told)
                if response.is_success
                else None
            )
            problem = None if load is not None else f"HTTP {response.status_code} or bad body"
        except (httpx.HTTPError, ValueError) as exc:
            load, problem = None, f"{type(exc).__name__}: {exc}"
        if load is None:
            self.loads.pop(url, None)
            if url not in self._failing:
                self._failing.add(url)
                log.info(
                    "load poll: %s/get_load failed (%s); routing on the router's own counts "
                    "for it until it answers",
                    url,
                    problem,
                )
            return
        self.loads[url] = load
        self._failing.discard(url)

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            try:
                await self.poll_once()
            except Exception:
                log.exception("load poll failed; retrying in %.1fs", self.interval_secs)
            await asyncio.sleep(self.interval_secs)
