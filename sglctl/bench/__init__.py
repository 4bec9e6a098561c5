"""``sglctl bench``: replay workloads (Mooncake traces, shared-prefix, multi-turn) through a router.

Modules, one concern each: :mod:`~sglctl.bench.workload` (what a request is),
:mod:`~sglctl.bench.workloads` (the generators), :mod:`~sglctl.bench.textgen` (segments to
text), :mod:`~sglctl.bench.ideal` (the hit-ratio ceiling), :mod:`~sglctl.bench.client` (one
timed streaming request), :mod:`~sglctl.bench.runner` (pacing), :mod:`~sglctl.bench.workers`
(per-worker counters), :mod:`~sglctl.bench.stats`, :mod:`~sglctl.bench.report` and
:mod:`~sglctl.bench.plot` (figures). Nothing is imported here so that ``sglctl --help`` stays
fast.
"""
