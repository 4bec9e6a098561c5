"""A simulated SGLang worker: SGLang's HTTP API, a real radix prefix cache, GPU-like timing.

``sglctl sim-worker`` (or ``python -m sglctl.sim``) runs one. It lets the router, the
supervisor and the benchmarks run without a GPU, and behaves like SGLang except for speed:
same paths and JSON shapes, ``cached_tokens`` from a real radix tree over token ids, and
continuous-batching timing calibrated on an H100 serving an 8B model (see
:mod:`sglctl.sim.timing`). Must not import :mod:`sglctl.router`.

Modules, one concern each:

* ``tokenizer`` - the 4-characters-a-token rule (also used by the benchmark to build prompts);
* ``output`` - the deterministic answer text and where a request stops;
* ``radix`` - the prefix KV cache and the KV pool accounting;
* ``timing`` - how long prefill batches and decode steps take (the calibration);
* ``engine`` - the continuous-batching scheduler on one timer loop;
* ``protocol`` / ``native`` / ``openai_api`` / ``streaming`` / ``errors`` - the HTTP surface;
* ``service`` - request life cycle shared by endpoints; ``faults`` - fault injection;
* ``disagg`` - PD roles (``--disaggregation-mode prefill|decode``): rooms, KV hand-over;
  ``bootstrap`` - the prefill's bootstrap port (server and client); ``transfer`` - how long
  moving a prompt's KV takes;
* ``metrics`` - Prometheus ``sglang:`` metrics; ``app`` / ``server`` / ``cli`` - wiring.
"""
