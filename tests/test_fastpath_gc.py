"""The router process freezes its start-up heap and collects the young generation less often."""

from __future__ import annotations

import gc

from sglctl.router import main


def test_tune_gc_freezes_and_sets_thresholds() -> None:
    before = gc.get_threshold()
    try:
        main.tune_gc()
        assert gc.get_threshold() == main.GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
        # Cyclic garbage is still collected.
        a: list[object] = []
        a.append(a)
        del a
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
