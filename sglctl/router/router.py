"""The router's shared state: one object per router process, built from a ``RouterConfig``.

:class:`Router` holds everything requests share -- config, registry, policies, the upstream
client and forwarder, metrics, admission, health checker, worker sources -- and runs the
background tasks (sources, health checks, policy maintenance, admin admissions) from
:meth:`Router.start` to :meth:`Router.stop`. The HTTP handlers reach it as
``request.app.state.router`` (:mod:`~sglctl.router.app` puts it there).

Worker sources combine: the static ``--worker-urls`` (and PD lists) are added at start, and
the sources that keep running -- the supervisor's table (``--state-table``) and Kubernetes
discovery (``config.k8s_discovery``) -- add and remove theirs beside them, each worker
tagged with its source. A URL already registered by one source is left to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import httpx

from sglctl.router.admission import AdmissionController
from sglctl.router.circuit_breaker import CircuitBreaker
from sglctl.router.config import RouterConfig
from sglctl.router.health import CheckedWorker, HealthChecker
from sglctl.router.kv_events import KvEventsFeed
from sglctl.router.kv_index import KvIndex
from sglctl.router.load_poll import LoadPoller
from sglctl.router.metrics import RouterMetrics, state_table_reader
from sglctl.router.policies import Policy, make_policy
from sglctl.router.policies.cache_aware import CacheAwarePolicy
from sglctl.router.proxy import Forwarder
from sglctl.router.retry import RetryBudget, RetryPolicy
from sglctl.router.sources import StaticSource, WorkerSource
from sglctl.router.stall import StallDetector, stall_disabled_because
from sglctl.router.stats import RollingStats
from sglctl.router.tokens import load_encoder
from sglctl.router.upstream import Upstream
from sglctl.router.upstream_httpx import HttpxUpstream
from sglctl.router.upstream_native import UpstreamPool
from sglctl.router.workers import Breaker, Worker, WorkerRegistry

if TYPE_CHECKING:
    from sglctl.router.discovery.k8s import DiscoveryStatus, K8sDiscoverySource
    from sglctl.router.peers import Peers
    from sglctl.router.processes import ChildSpec
    from sglctl.router.shared_loads import SharedLoads
    from sglctl.router.siblings import Message, Siblings

log = logging.getLogger(__name__)

#: Request headers passed to workers as request ids when --request-id-headers is not given.
DEFAULT_REQUEST_ID_HEADERS = ("x-request-id", "x-correlation-id", "x-trace-id", "request-id")
#: Worker origins whose health the router does not probe: the supervisor owns theirs.
EXTERNALLY_CHECKED = ("supervisor",)
#: PD mode's decode policy when --decode-policy is not given.
DEFAULT_DECODE_POLICY = "power_of_two"


class StartupError(RuntimeError):
    """A setting that cannot work here (e.g. no Kubernetes credentials): one line for the
    operator, printed by :func:`sglctl.router.main.main` instead of a traceback."""


class Router:
    """Everything a router process shares between requests."""

    def __init__(
        self,
        config: RouterConfig,
        *,
        extra_sources: list[WorkerSource] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        cluster: ChildSpec | None = None,
    ) -> None:
        """``transport`` replaces the network for worker calls (in-process tests);
        ``cluster``: this is one of several router processes (``--router-processes``)."""
        self.config = config
        self._transport = transport
        self.started_at = time.time()
        self.cluster = cluster
        self.loads: SharedLoads | None = None
        self.siblings: Siblings | None = None
        if cluster is None:
            self.registry = WorkerRegistry(self._make_breaker)
        else:
            self.registry = self._join(cluster)
        prefill_policy = config.prefill_policy if config.is_pd else None
        self.policy: Policy = make_policy(prefill_policy or config.policy, config)
        # PD mode picks the decode worker with its own policy: --decode-policy, by default
        # power of two (decode load is what matters there, not the prompt's prefix).
        self.decode_policy: Policy | None = (
            make_policy(config.decode_policy or DEFAULT_DECODE_POLICY, config)
            if config.is_pd
            else None
        )
        #: --kv-events (issue 16): the exact index every worker's events feed; its feed task
        #: is started in :meth:`start` once the HTTP client exists.
        self.kv_index: KvIndex | None = None
        self.kv_feed: KvEventsFeed | None = None
        if config.kv_events and isinstance(self.policy, CacheAwarePolicy):
            try:
                encoder = load_encoder(config.tokenizer_path)
            except ValueError as exc:
                raise StartupError(str(exc)) from None
            self.kv_index = KvIndex()
            self.policy.use_kv_events(self.kv_index, self._kv_fed, encoder)
            log.info("kv events on: tokenizing text prompts with %s", encoder.name)
        #: Whether requests need their routing text: for either PD policy, not only the first.
        self.needs_text = self.policy.needs_text or bool(
            self.decode_policy and self.decode_policy.needs_text
        )
        self.registry.add_listener(self._on_membership)
        self.retry = RetryPolicy(
            max_worker_retries=config.max_worker_retries,
            max_total_retries=config.max_total_retries,
            initial_backoff_ms=config.retry_initial_backoff_ms,
            max_backoff_ms=config.retry_max_backoff_ms,
            multiplier=config.retry_backoff_multiplier,
            jitter=config.retry_jitter_factor,
            enabled=not config.disable_retries,
        )
        self.retry_budget = RetryBudget()
        self.admission = AdmissionController(
            config.max_concurrent_requests, config.queue_size, config.queue_timeout_secs
        )
        self.metrics = RouterMetrics(
            self.registry,
            config.prometheus_duration_buckets,
            # Scrape-time views: policies (cache hits, tree per worker), admission (queue),
            # the supervisor's table (restarts, state); and --access-log.
            policies=lambda: [p for p in (self.policy, self.decode_policy) if p is not None],
            admission=self.admission,
            supervisor_slots=state_table_reader(config.state_table),
            access_log=config.access_log,
        )
        self.stats = RollingStats()
        self.health = HealthChecker(
            interval_secs=config.health_check_interval_secs,
            timeout_secs=config.health_check_timeout_secs,
            failure_threshold=config.health_failure_threshold,
            success_threshold=config.health_success_threshold,
            endpoint=config.health_check_endpoint,
            # Several processes: the first one checks, the others hear its verdicts.
            enabled=not config.disable_health_check and (cluster is None or cluster.index == 0),
            on_change=self._on_health_change,
            skip_sources=EXTERNALLY_CHECKED,
        )
        # Hung workers bypassed in ~2-3 s (stall.py).
        self.stall = StallDetector(
            self.registry,
            self.health,
            config.stall_suspect_secs,
            config.stall_probe_timeout_secs,
            skip_sources=EXTERNALLY_CHECKED,
            disabled_because=stall_disabled_because(config),
        )
        self.sources: list[WorkerSource] = list(extra_sources or [])
        try:
            self.discovery = self._make_discovery(config)
        except StartupError:
            if self.loads is not None:  # released now, not by a garbage collector at exit
                self.loads.close()
            raise
        if self.discovery is not None:
            self.sources.append(self.discovery)
            self.metrics.discovery_stats = self.discovery.metrics_stats
        self.static = StaticSource(config.worker_urls, config.prefill_servers, config.decode_urls)
        self.client: httpx.AsyncClient | None = None
        self.forwarder: Forwarder | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        #: Admin work in progress (a ``?wait`` probe, a pending worker's admission): cancelled
        #: as soon as shutdown begins, so that no admin call holds the router's exit.
        self._admin_tasks: set[asyncio.Task[Any]] = set()
        self._restore_signals: list[tuple[int, Any]] = []
        #: Names of the headers passed to workers (the caller's credentials, request ids).
        id_headers = [h.lower() for h in config.request_id_headers] or list(
            DEFAULT_REQUEST_ID_HEADERS
        )
        self.forwarded_headers = frozenset(
            h.encode("latin-1") for h in ("authorization", *id_headers)
        )
        #: --router-peers (issue 16, peers.py): the other replicas hear every decision.
        self.peers: Peers | None = self._make_peers(config, cluster)
        sinks = [s.tell_route for s in (self.siblings, self.peers) if s is not None]
        if sinks:
            from sglctl.router.siblings import publish_routes

            for policy in self.policies():
                publish_routes(policy, *sinks)

    # -- several processes (--router-processes) ---------------------------------------------
    def _join(self, cluster: ChildSpec) -> WorkerRegistry:
        """The shared in-flight counts and the line to the siblings (imported here: a
        single-process router never loads them)."""
        from sglctl.router.shared_loads import SharedLoads, worker_factory
        from sglctl.router.siblings import Siblings

        self.loads = SharedLoads.attach(cluster.loads, cluster.procs, cluster.index)
        self.loads.clear_row()
        self.siblings = Siblings(cluster.hub, cluster.index)
        return WorkerRegistry(self._make_breaker, worker_factory(self.loads))

    def _make_peers(self, config: RouterConfig, cluster: ChildSpec | None) -> Peers | None:
        if not config.router_peers:
            return None
        from sglctl.router import peers, siblings

        siblings_ = self.siblings
        found = peers.Peers(
            config.router_peers,
            config.router_peers_refresh_secs,
            peers.instance_id(cluster.hub if cluster is not None else None),
            apply=lambda message: siblings.apply(self, message),
            relay=siblings_.relay_routes if siblings_ is not None else None,
            api_key=config.api_key,
            own_load=self._own_load,
            set_told=self._set_told,
            stagger_secs=config.router_peers_stagger_secs,
        )
        self.metrics.peer_stats = found.stats
        policy = self.policy
        if isinstance(policy, CacheAwarePolicy):
            # A replica sees its own 1/N of the requests in flight: the peers tell theirs with
            # every batch (Worker.told_in_flight), and the load is the sum. Telling only
            # dispatches, the three replicas sent their misses to the same least-loaded
            # worker until the next poll (quiet machine: TTFT p50 2.3x one router's, p99
            # 1.38x), and requests another replica finished counted until then (p99 1.15-1.26x
            # on the conversation trace; benchmarks/RESULTS.md, "Router peers").
            policy.current_loads = True
            # Misses are placed in turn by rank, each replica after the routes of the ranks
            # before it arrived (CacheAwarePolicy.stagger): a burst reaching every replica at
            # once no longer herds onto the one least loaded worker.
            # The wait a rank follows how late routes arrive (Peers.restep), at least
            # --router-peers-stagger-secs.
            policy.stagger_by(found.rank, config.router_peers_stagger_secs, found.stagger_step)
            # The workers' own num_reqs (/get_load) raise it only with
            # --worker-load-correction, for load no replica sees (clients that talk to a
            # worker directly): the report lags the counts the replicas tell, and raising the
            # load to it moves misses on stale figures (conversation 600k, all traffic through
            # one of 3 replicas, one run each: max/mean requests 1.21 with the raise, 1.13
            # without, one router 1.08-1.16 in the same runs).
        log.info(
            "router peers: %s (instance %s)", ", ".join(map(str, config.router_peers)), found.id
        )
        return found

    def _own_load(self) -> dict[str, int]:
        """This replica's requests in flight per worker (the whole router's, with processes),
        for the peers."""
        return {w.url: w.in_flight for w in self.registry.all() if w.in_flight > 0}

    def _set_told(self, url: str, n: int) -> None:
        worker = self.registry.get(url)
        if worker is not None:
            worker.told_in_flight = n

    def policies(self) -> list[Policy]:
        return [p for p in (self.policy, self.decode_policy) if p is not None]

    def tell_siblings(self, message: Message) -> None:
        """Tell the other router processes (no-op with one process)."""
        if self.siblings is not None:
            self.siblings.tell(message)

    async def render_metrics(self) -> bytes:
        """``/metrics``: this process's, or with several processes the whole router's."""
        if self.siblings is None:
            return self.metrics.render()
        from sglctl.router.metrics import merge_scrapes

        local = self.metrics.render()
        return merge_scrapes(local, await self.siblings.scrape())

    # -- wiring ----------------------------------------------------------------------------
    @staticmethod
    def _make_discovery(config: RouterConfig) -> K8sDiscoverySource | None:
        """The Kubernetes source when discovery is on (credentials are read here, so a
        router that cannot reach any cluster says so before it listens)."""
        if config.k8s_discovery is None:
            return None
        # Imported here: lightkube costs ~200 ms that a router without discovery skips.
        from sglctl.router.discovery.k8s import K8sDiscoverySource

        try:
            return K8sDiscoverySource(config.k8s_discovery)
        except ValueError as exc:
            raise StartupError(str(exc)) from None

    def discovery_status(self) -> DiscoveryStatus | None:
        """What ``/readiness`` says about discovery (None when it is off)."""
        return self.discovery.status() if self.discovery is not None else None

    def _make_breaker(self, url: str) -> Breaker:
        c = self.config
        return CircuitBreaker(
            failure_threshold=c.cb_failure_threshold,
            success_threshold=c.cb_success_threshold,
            timeout_secs=c.cb_timeout_duration_secs,
            window_secs=c.cb_window_duration_secs or 120.0,
            enabled=not c.disable_circuit_breaker,
            name=url,
            on_open=(
                None
                if self.siblings is None
                else lambda why: self.tell_siblings({"t": "open", "w": url, "why": why})
            ),
        )

    def _on_health_change(self, worker: CheckedWorker, healthy: bool) -> None:
        if self.siblings is not None:
            why = self.health.status(worker.url).last_error
            self.tell_siblings({"t": "health", "w": worker.url, "ok": healthy, "why": why})
        if not healthy:
            why = self.health.status(worker.url).last_error or "failed its health checks"
            self.interrupt(worker.url, f"worker {worker.url} ejected: {why}")

    def interrupt(self, url: str, reason: str) -> int:
        """Fail over the requests in flight at ``url`` now (see :mod:`.inflight`).

        Called when a worker is taken out for being sick -- by the health checker or by the
        supervisor's mark in the state table: it may hold stuck requests (a hung GPU), which
        would otherwise wait for ``--request-timeout-secs``.
        """
        if self.forwarder is None:
            return 0
        return self.forwarder.in_flight.interrupt(url, reason)

    def _kv_fed(self, url: str) -> bool:
        """Whether ``url``'s KV event feed is up (the policy matches it on the index)."""
        return self.kv_feed is not None and self.kv_feed.has_feed(url)

    def _on_membership(self, event: str, worker: Worker) -> None:
        policies = [self.policy, self.decode_policy] if self.decode_policy else [self.policy]
        if self.config.is_pd:
            policies = (
                [self.policy] if worker.role == "prefill" else [self.decode_policy or self.policy]
            )
        for policy in policies:
            if event == "added":
                policy.on_worker_added(worker)
            elif event == "removed":
                policy.on_worker_removed(worker)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        c = self.config
        # One connection pool for everything the router sends to workers: unbounded
        # connections (admission control is the place to limit concurrency), keep-alive.
        transport = self._transport or httpx.AsyncHTTPTransport(
            limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=1024, keepalive_expiry=60.0
            ),
            trust_env=False,
        )
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(c.request_timeout_secs, connect=10.0),
            trust_env=False,
            follow_redirects=False,
            transport=transport,
        )
        # The hot path's client: sglctl's lean one, or httpx over the shared transport (always
        # when a test injects a transport).
        if self._transport is not None or c.upstream_client == "httpx":
            self.upstream: Upstream = HttpxUpstream(transport)
        else:
            self.upstream = UpstreamPool(fallback=HttpxUpstream(transport))
        self.forwarder = Forwarder(
            self.registry,
            self.policy,
            self.upstream,
            self.retry,
            budget=self.retry_budget,
            request_timeout_secs=c.request_timeout_secs,
            on_retry=self.metrics.retry,
            decode_policy=self.decode_policy,
            metrics=self.metrics,
        )
        self._chain_signals()
        await self.static.run(self.registry)
        if self.siblings is not None:
            self._spawn(self.siblings.run(self), "siblings")
        if self.peers is not None:
            self._spawn(self.peers.run(), "router peers")
        # Other worker sources. With --state-table the supervisor's shared-memory table
        # drives membership (helper C's StateTableSource, imported lazily so a plain router
        # never loads the shared-memory code).
        if c.state_table:
            from sglctl.router.state_table_source import StateTableSource

            self.sources.append(
                StateTableSource(c.state_table, stats=self.stats, on_sick=self.interrupt)
            )
        for source in self.sources:
            self._spawn(source.run(self.registry), f"source {type(source).__name__}")
        self._spawn(self.health.run(self.registry), "health checker")
        self._spawn(self.stall.run(), "stall detector")
        for policy in (self.policy, self.decode_policy):
            if policy is not None:
                self._spawn(policy.run_background(), f"{policy.name} maintenance")
        if self.kv_index is not None:
            self.kv_feed = KvEventsFeed(
                self.registry,
                self.kv_index,
                self.client,
                c.kv_events_port,
                c.kv_events_replay_port,
            )
            self._spawn(self.kv_feed.run(), "kv events feed")
        if self.policy.uses_worker_loads and c.load_poll_interval_secs > 0:
            poller = LoadPoller(self.registry, self.client, c.load_poll_interval_secs)
            self.policy.worker_loads = poller.loads  # the workers' own load, kept fresh
            self._spawn(poller.run(), "load poll")
        log.info(
            "router ready: policy %s%s, %d workers%s%s",
            self.policy.name,
            ", PD mode" if c.is_pd else "",
            len(self.registry),
            f", state table {c.state_table}" if c.state_table else "",
            f", k8s discovery of {c.k8s_discovery.describe()} in {c.k8s_discovery.where()}"
            if c.k8s_discovery
            else "",
        )

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(_report_task_end)
        self._tasks.append(task)

    def spawn_admin(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run admin work as a task that shutdown cancels (see :meth:`begin_shutdown`)."""
        task = asyncio.create_task(coro, name=name)
        self._admin_tasks.add(task)
        task.add_done_callback(self._admin_tasks.discard)
        task.add_done_callback(_report_task_end)
        return task

    def begin_shutdown(self) -> None:
        """Cancel admin work in progress: a client waiting in ``/add_worker?wait=`` gets
        its answer (503) at once instead of holding the server's graceful-shutdown wait."""
        for task in list(self._admin_tasks):
            task.cancel()

    def _chain_signals(self) -> None:
        """Call :meth:`begin_shutdown` on SIGINT/SIGTERM, then the handler already there.

        The server (uvicorn) waits for requests in progress *before* it runs the app's
        shutdown, so an admin call waiting for a worker would hold Ctrl-C for the whole
        grace period; hearing the signal ourselves ends such calls first. Only from the main
        thread (signal handlers cannot be set elsewhere; in-process tests run without).
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous = signal.getsignal(sig)
            except ValueError:
                return

            def handler(signum: int, frame: Any, previous: Any = previous) -> None:
                loop.call_soon_threadsafe(self.begin_shutdown)
                if callable(previous):
                    previous(signum, frame)
                elif previous == signal.SIG_DFL and signum == signal.SIGINT:
                    raise KeyboardInterrupt

            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread
                return
            self._restore_signals.append((sig, previous))

    async def stop(self) -> None:
        self.begin_shutdown()
        for sig, previous in self._restore_signals:
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, previous)
        self._restore_signals.clear()
        for task in [*self._tasks, *self._admin_tasks]:
            task.cancel()
        for task in [*self._tasks, *self._admin_tasks]:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        if self.forwarder is not None:
            self.forwarder.upstream.close_all()
        if self.client is not None:
            await self.client.aclose()
        if self.siblings is not None:
            from sglctl.router.siblings import close

            await close(self.siblings)
        log.info("router stopped")


def _report_task_end(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("background task %r died: %r", task.get_name(), exc, exc_info=exc)
