"""The sglctl router: a drop-in for the SGLang Router (flags, endpoints, errors).

``sglctl router`` (or ``python -m sglctl.router``) runs one; ``sglctl up`` runs one in front of
its workers, fed by the supervisor's shared-memory table. Must not import
:mod:`sglctl.supervisor` or :mod:`sglctl.sim`.

Modules, one concern each:

* ``config`` - ``RouterConfig``, the one typed settings object; ``flags`` - the
  SGLang-compatible command line parsed into it (and the one list of refused flags);
* ``urls`` - the one worker-URL validator (flags, admin API, registry);
* ``workers`` - ``Worker`` and ``WorkerRegistry``: membership, load slots, routability;
* ``sources`` - the ``WorkerSource`` protocol and ``--worker-urls``; ``state_table_source``
  - membership and health from ``sglctl up``'s shared-memory table; ``discovery`` - workers
  (and PD roles) from Kubernetes pods, list + watch (``RouterConfig.k8s_discovery``);
* ``health`` - active health checks; ``circuit_breaker`` - per-worker breaker;
* ``tree`` / ``policies`` - the prefix tree and the routing policies behind one interface;
* ``request`` - body limits and parsing of inference requests; ``admission`` - the
  concurrency limit and priority queue;
* ``proxy`` - the forwarding loop (pick, send, retry, relay); ``retry`` - retry rules and
  budget; ``inflight`` - interrupting requests stuck on a worker taken out; ``pd`` -
  prefill/decode pairs;
* ``upstream`` - the client protocol and its errors; ``upstream_native`` - the lean
  keep-alive client; ``upstream_httpx`` - the same over httpx;
* ``router`` - ``Router``, the shared state and its background tasks;
* ``app`` - the route table; ``inference`` / ``admin`` / ``info`` - the handlers;
  ``responses`` / ``errors`` - JSON answers and the OpenAI-style error shape;
* ``metrics`` / ``stats`` - Prometheus metrics and rolling latency stats;
* ``http_server`` - the HTTP/1.1 protocol (uvicorn's httptools one with limits and
  timeouts); ``fastpath`` - the lean path inside it for inference POSTs (no ASGI/Starlette);
* ``main`` - entry point and listeners; ``admin_client`` - the client side of the admin
  API for ``sglctl add-worker/remove-worker/list-workers``.
"""
