"""The router as a Starlette app: the shared objects, the route table, start-up and shutdown.

:class:`Router` holds everything one router process shares between requests (config,
registry, policy, HTTP client, forwarder, metrics, admission) and is built once from a
:class:`~sglctl.router.config.RouterConfig`. :func:`create_app` wires it to the routes of
CONTRACT.md section 2; the handlers live in :mod:`~sglctl.router.inference`,
:mod:`~sglctl.router.admin` and :mod:`~sglctl.router.info`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response

from sglctl import __version__
from sglctl.router import admin, inference, info
from sglctl.router.admission import AdmissionController
from sglctl.router.circuit_breaker import CircuitBreaker
from sglctl.router.config import RouterConfig
from sglctl.router.errors import RouterError, error_response
from sglctl.router.health import HealthChecker
from sglctl.router.metrics import RouterMetrics, state_table_reader, trace_routing
from sglctl.router.policies import Policy, make_policy
from sglctl.router.proxy import Forwarder
from sglctl.router.retry import RetryBudget, RetryPolicy
from sglctl.router.sources import StaticSource, WorkerSourceProtocol
from sglctl.router.stats import RollingStats
from sglctl.router.upstream import HttpxUpstream, Upstream, UpstreamPool
from sglctl.router.workers import Breaker, Worker, WorkerRegistry

log = logging.getLogger(__name__)


class Router:
    """Everything a router process shares between requests."""

    def __init__(
        self,
        config: RouterConfig,
        *,
        extra_sources: list[WorkerSourceProtocol] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport`` replaces the network for worker calls (in-process tests)."""
        self.config = config
        self._transport = transport
        self.started_at = time.time()
        self.registry = WorkerRegistry(self._make_breaker)
        prefill_policy = config.prefill_policy if config.is_pd else None
        self.policy: Policy = make_policy(prefill_policy or config.policy, config)
        # PD mode picks the decode worker with its own policy (and its own tree, if cache-aware).
        self.decode_policy: Policy | None = (
            make_policy(config.decode_policy or config.policy, config) if config.is_pd else None
        )
        self.registry.add_listener(self._on_membership)
        trace_routing(self.policy, self.decode_policy)  # [observability] debug: match lengths
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
            self._scrape_extra,
            config.prometheus_duration_buckets,
            # [observability] scrape-time views: policies (cache hits, tree per worker),
            # admission (queue), the supervisor's table (restarts, state); --access-log.
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
            enabled=not config.disable_health_check,
            on_change=self._on_health_change,
        )
        self.sources: list[WorkerSourceProtocol] = list(extra_sources or [])
        self.static = StaticSource(config.worker_urls, config.prefill_servers, config.decode_urls)
        self.client: httpx.AsyncClient | None = None
        self.forwarder: Forwarder | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    # -- wiring ----------------------------------------------------------------------------
    def _make_breaker(self, url: str) -> Breaker:
        c = self.config
        return CircuitBreaker(
            failure_threshold=c.cb_failure_threshold,
            success_threshold=c.cb_success_threshold,
            timeout_secs=c.cb_timeout_duration_secs,
            window_secs=c.cb_window_duration_secs or 120.0,
            enabled=not c.disable_circuit_breaker,
            name=url,
        )

    def _on_health_change(self, worker: Any, healthy: bool) -> None:
        """An ejected worker may hold stuck requests (a hung GPU): fail them over now
        instead of letting them wait for --request-timeout-secs."""
        if not healthy and self.forwarder is not None:
            self.forwarder.in_flight.interrupt(
                worker.url, f"worker {worker.url} failed its health checks"
            )

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

    def _scrape_extra(self) -> dict[str, float]:
        extra: dict[str, float] = {}
        for policy in (self.policy, self.decode_policy):
            if policy is None:
                continue
            extra["cache_hits"] = extra.get("cache_hits", 0) + getattr(policy, "cache_hits", 0)
            extra["cache_misses"] = extra.get("cache_misses", 0) + getattr(
                policy, "cache_misses", 0
            )
            tree = getattr(policy, "tree", None)
            if tree is not None:
                extra["tree_size"] = extra.get("tree_size", 0) + tree.total_size()
        stats = self.admission.stats()
        extra["queued"] = stats.queued
        extra["rejected"] = stats.rejected_full_total + stats.rejected_timeout_total
        return extra

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
        )
        await self.static.run(self.registry)
        # Other worker sources. With --state-table the supervisor's shared-memory table
        # drives membership (helper C's StateTableSource, imported lazily so a plain router
        # never loads the shared-memory code).
        if c.state_table:
            from sglctl.router.state_table_source import StateTableSource

            self.sources.append(StateTableSource(c.state_table, stats=self.stats))
        for source in self.sources:
            self._spawn(source.run(self.registry), f"source {type(source).__name__}")
        self._spawn(self.health.run(self.registry), "health checker")
        for policy in (self.policy, self.decode_policy):
            if policy is not None:
                self._spawn(policy.run_background(), f"{policy.name} maintenance")
        log.info(
            "router ready: policy %s, %d workers%s",
            self.policy.name,
            len(self.registry),
            f", state table {c.state_table}" if c.state_table else "",
        )

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(_report_task_end)
        self._tasks.append(task)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        if self.forwarder is not None:
            self.forwarder.upstream.close_all()
        if self.client is not None:
            await self.client.aclose()
        log.info("router stopped")


def _report_task_end(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("background task %r died: %r", task.get_name(), exc, exc_info=exc)


async def _router_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RouterError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, headers=dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal router error: {type(exc).__name__}")


def create_app(router: Router) -> Starlette:
    """The Starlette app serving ``router``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    routes = [
        *inference.routes(router),
        *admin.routes(router),
        *info.routes(router),
    ]
    middleware = []
    if router.config.cors_allowed_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=router.config.cors_allowed_origins,
                allow_methods=["*"],
                allow_headers=["*"],
            )
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            RouterError: _router_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
    app.state.router = router
    app.state.version = __version__
    return app
