"""``sglctl up``: plan workers over the GPUs, start and supervise them, run the router.

The router learns worker state from the shared-memory table (:mod:`sglctl.state_table`); it
never imports this package. Under ``sglctl up`` the supervisor is the one source of worker
health: it probes every worker (it owns restarts, so it must), publishes the verdict to the
table, and the router follows the table within ~10 ms instead of probing again.

Modules, one concern each:

* ``config`` - ``sglctl up``'s flags and the typed :class:`UpConfig` built from them;
* ``plan`` - backend choice, GPU groups, ports (and every port conflict), worker command lines;
* ``up`` - the command: checks, the state table, then the supervisor until Ctrl-C;
* ``core`` - the :class:`Supervisor`: start order, run-time add/remove, orderly shutdown;
* ``worker`` - one worker's life and health probes; the only writer of its table slot;
* ``router_proc`` - the router as a supervised child process;
* ``backoff`` - restart backoff, crash window, and the one restart loop workers and router share;
* ``process`` - one child process: start, exit noticed at once, stop its whole tree;
* ``control`` - the control socket (``add-worker --local``, managed ``remove-worker``);
* ``logfile`` - per-child rotated logs with an in-memory tail; ``ui`` - the terminal display.
"""
