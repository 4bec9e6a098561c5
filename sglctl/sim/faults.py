"""Fault injection for tests: crash, fail, or hang on purpose.

Semantics (counted over *generation* requests: ``/generate``, ``/v1/completions``,
``/v1/chat/completions``; health and info calls do not count):

* ``--crash-after N``: requests 1..N-1 are served normally; when the N-th is accepted the
  process exits at once with ``os._exit(1)``, before answering it or anything in flight, so
  clients see a dropped connection, as with a GPU fault or an OOM kill.
* ``--error-rate P``: each generation request is answered 500 with an SGLang-like JSON error
  with probability P, drawn from an RNG seeded by ``--seed`` (reproducible runs).
* ``--stall-after N``: the first N generation requests are answered; once the N-th has been
  answered the worker hangs: it still accepts connections but never responds again, to
  anything (``/health`` included), and requests in flight never finish. That is what a hung
  GPU worker looks like from outside.
"""

from __future__ import annotations

import logging
import os
import random
import sys

from sglctl.sim.config import SimConfig

log = logging.getLogger(__name__)


class FaultInjector:
    """Counts generation requests and decides each one's fate."""

    def __init__(self, config: SimConfig) -> None:
        self.crash_after = config.crash_after
        self.error_rate = config.error_rate
        self.stall_after = config.stall_after
        self._rng = random.Random(config.seed)
        self.accepted = 0
        self.answered = 0
        self.stalled = False

    def on_accept(self) -> bool:
        """Call when a generation request arrives; True means: answer it with a 500."""
        self.accepted += 1
        if self.crash_after is not None and self.accepted >= self.crash_after:
            log.error("--crash-after %d reached: exiting now", self.crash_after)
            sys.stderr.flush()
            os._exit(1)
        return self.error_rate > 0 and self._rng.random() < self.error_rate

    def on_answered(self) -> bool:
        """Call when a generation request's answer is complete; True means: stall from now."""
        self.answered += 1
        if self.stall_after is not None and self.answered >= self.stall_after and not self.stalled:
            log.error("--stall-after %d reached: no longer answering anything", self.stall_after)
            self.stalled = True
        return self.stalled
