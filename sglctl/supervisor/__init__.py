"""``sglctl up``: plan workers over the GPUs, start and supervise them, run the router.

The router learns worker state from the shared-memory table (:mod:`sglctl.state_table`); it
never imports this package.
"""
