"""A simulated SGLang worker: SGLang's HTTP API, a real radix prefix cache, GPU-like timing.

``sglctl sim-worker`` (or ``python -m sglctl.sim``) runs one. It lets the router, the
supervisor and the benchmarks run without a GPU, and behaves like SGLang except for speed:
same paths and JSON shapes, ``cached_tokens`` from a real radix tree over token ids, and
continuous-batching timing calibrated on an H100 serving an 8B model (see
:mod:`sglctl.sim.timing`). Must not import :mod:`sglctl.router`.
"""
