"""The one small interface every routing policy implements.

Modelled on the SGLang Router's: select a worker from a list (the registry's routable workers,
never anything else), given the request's routing key when the policy needs one; hooks when
workers come and go; an optional background task (the cache-aware tree's eviction). PD mode
has one policy per pool (``--prefill-policy``, ``--decode-policy``); the pair is chosen by the
PD plan (:mod:`sglctl.router.pd`), one ``select`` from each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from sglctl.router.load_poll import WorkerLoad
from sglctl.router.workers import Worker


@dataclass(frozen=True)
class RouteKey:
    """What a policy may look at: the request's routing text or its token ids (or neither)."""

    text: str | None = None
    input_ids: Sequence[int] | None = None
    #: A chat request: ``text`` is the messages' contents, not the prompt the worker renders
    #: (so ``--kv-events`` cannot tokenize it; see :mod:`sglctl.router.tokens`).
    chat: bool = False

    def __init__(
        self, text: str | None = None, input_ids: Sequence[int] | None = None, chat: bool = False
    ) -> None:
        # The dataclass keeps this __init__ (it does not replace one the class defines). Its
        # own frozen one calls object.__setattr__ per field: ~0.7 us more per request (one
        # key per request). Still immutable: assignment raises FrozenInstanceError.
        fields = self.__dict__
        fields["text"] = text
        fields["input_ids"] = input_ids
        fields["chat"] = chat

    @property
    def empty(self) -> bool:
        return not self.text and not self.input_ids


NO_KEY = RouteKey()


class Ticket(Protocol):
    """One attempt a policy wants to hear back about (see :meth:`Policy.begin_attempt`).

    The proxy calls :meth:`first_byte` once, when the answer's first byte arrived (the first
    streamed chunk, or the whole body), and :meth:`done` exactly once at the end, with the
    last bytes of the answer (where the worker's ``cached_tokens`` is).
    """

    def first_byte(self, streamed: bool) -> None: ...

    def done(self, ok: bool, tail: bytes) -> None: ...


class Policy(ABC):
    """Base class: subclasses implement :meth:`select` (and override the hooks they need)."""

    #: The ``--policy`` name, also used in metrics and ``/stats``.
    name = "base"
    #: Whether the router must extract the routing text from the body for this policy.
    needs_text = False
    #: Selections that matched / missed a cached prefix (``sglang_router_cache_*_total``);
    #: zero for policies without a cache model.
    cache_hits = 0
    cache_misses = 0
    #: What the last ``select`` decided and how long a cached prefix it matched, for the
    #: debug-level routing log (``cache_hit``, ``cache_miss``, ``balance_fallback``, ...).
    #: Read right after ``select`` returns (no ``await`` in between), so it is this request's.
    last_decision = "n/a"
    last_match = 0
    #: Whether the router polls the workers' own load (``/get_load``) for this policy; the
    #: poller then keeps :attr:`worker_loads` (worker URL -> its latest report) fresh.
    uses_worker_loads = False
    #: Whether :meth:`miss_delay` may be more than 0 (router peers' staggered misses): the
    #: proxy asks it only then, so that other routers pay nothing for it.
    miss_delays = False
    worker_loads: Mapping[str, WorkerLoad] = MappingProxyType({})

    @abstractmethod
    def select(self, workers: Sequence[Worker], key: RouteKey = NO_KEY) -> Worker | None:
        """Pick one of ``workers`` (all routable, non-empty) or None if it cannot."""

    def miss_delay(self, workers: Sequence[Worker], key: RouteKey = NO_KEY) -> float:
        """Seconds to wait before choosing for ``key`` among ``workers`` (0: choose now).

        Router replicas (``--router-peers``) stagger their *misses* by rank, so that a burst
        of new prompts arriving at every replica at once is placed one replica after the
        other, each knowing where the ones before it went (:class:`CacheAwarePolicy`).
        """
        return 0.0

    def begin_attempt(self, worker: Worker) -> Ticket | None:
        """The proxy sends an attempt to ``worker``, the last ``select``'s pick.

        Called right after ``select`` (no ``await`` in between); a policy that learns from
        answers returns a :class:`Ticket`, the others None (the proxy then does nothing more).
        """
        return None

    def on_worker_added(self, worker: Worker) -> None:
        """A worker joined the registry."""

    def on_worker_removed(self, worker: Worker) -> None:
        """A worker left the registry: forget anything kept about it."""

    def tree_size(self) -> int:
        """Characters held by the policy's prefix tree (0 for policies without one)."""
        return 0

    def tree_sizes(self) -> dict[str, int]:
        """Characters the prefix tree holds per worker URL (empty without a tree)."""
        return {}

    def flush(self) -> None:
        """The workers' caches were flushed: forget cache state."""

    async def run_background(self) -> None:
        """A long-running maintenance task (cancelled at shutdown); none by default."""
