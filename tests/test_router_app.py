"""The router app in-process: errors of CONTRACT section 3, retries, admin API, metrics.

Workers are tiny Starlette stubs reached through an in-memory transport, so these tests are
fast and deterministic; tests/test_router_integration.py repeats the main paths over real
sockets with real sim workers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from support import async_wait_until

from sglctl.net import find_free_port
from sglctl.router.app import create_app
from sglctl.router.config import RouterConfig
from sglctl.router.flags import parse_args
from sglctl.router.router import Router

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Stub:
    """A fake worker: answers /generate with its name, or fails as told."""

    name: str
    status: int = 200
    healthy: bool = True
    delay: float = 0.0
    calls: int = 0
    bodies: list[bytes] = field(default_factory=list)

    def app(self) -> Starlette:
        async def generate(request: Request) -> Response:
            self.calls += 1
            self.bodies.append(await request.body())
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.status != 200:
                return JSONResponse({"error": f"{self.name} broken"}, status_code=self.status)
            return JSONResponse({"text": "ok", "worker": self.name, "meta_info": {}})

        async def health(request: Request) -> Response:
            return Response(b"", status_code=200 if self.healthy else 503)

        async def info(request: Request) -> Response:
            return JSONResponse({"model_path": "stub-model", "worker": self.name})

        return Starlette(
            routes=[
                Route("/generate", generate, methods=["POST"]),
                Route("/v1/completions", generate, methods=["POST"]),
                Route("/v1/chat/completions", generate, methods=["POST"]),
                Route("/health", health),
                Route("/health_generate", health),
                Route("/get_model_info", info),
                Route("/get_server_info", info),
                Route("/v1/models", info),
                Route("/flush_cache", health, methods=["POST"]),
            ]
        )


class HostTransport(httpx.AsyncBaseTransport):
    """Routes each request to the stub whose name is the URL's host; others refuse."""

    def __init__(self, stubs: dict[str, Stub]) -> None:
        self.apps = {name: httpx.ASGITransport(app=stub.app()) for name, stub in stubs.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        app = self.apps.get(request.url.host)
        if app is None:
            raise httpx.ConnectError("connection refused", request=request)
        return await app.handle_async_request(request)


@dataclass
class Harness:
    router: Router
    client: httpx.AsyncClient
    stubs: dict[str, Stub]
    #: Each stub's worker URL (``http://NAME`` in process, a real port with ``native``).
    urls: dict[str, str] = field(default_factory=dict)


def make_config(workers: list[str], *flags: str) -> RouterConfig:
    argv = [
        "--disable-health-check",
        "--retry-initial-backoff-ms",
        "1",
        "--retry-max-backoff-ms",
        "5",
    ]
    if workers:
        argv += ["--worker-urls", *workers]
    return parse_args([*argv, *flags])


@contextlib.asynccontextmanager
async def served(stubs: dict[str, Stub]) -> AsyncIterator[dict[str, str]]:
    """Each stub on a real uvicorn server on a free 127.0.0.1 port: ``{name: url}``."""
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []
    urls: dict[str, str] = {}
    try:
        for name, stub in stubs.items():
            port = find_free_port()
            server = uvicorn.Server(
                uvicorn.Config(stub.app(), host="127.0.0.1", port=port, log_level="warning")
            )
            server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
            servers.append((server, asyncio.create_task(server.serve())))
            await async_wait_until(lambda s=server: s.started, timeout=30, what=f"stub {name}")
            urls[name] = f"http://127.0.0.1:{port}"
        yield urls
    finally:
        for server, _ in servers:
            server.should_exit = True
        for _, task in servers:
            await asyncio.wait_for(task, 30)


@pytest.fixture(params=["httpx"])
def harness(request: pytest.FixtureRequest) -> Callable[..., object]:
    """``async with harness(["a", "b"], *flags) as h``: stubs a, b behind a started router.

    ``httpx`` (the default): stubs in process behind an injected transport, which forces the
    httpx upstream. ``native`` (``@pytest.mark.parametrize("harness", ["httpx", "native"],
    indirect=True)``): stubs on real sockets and the router's default native upstream client.
    """
    mode = request.param

    @contextlib.asynccontextmanager
    async def build(names: list[str], *flags: str, extra: list[str] = ()) -> AsyncIterator[Harness]:  # type: ignore[assignment]
        stubs = {n: Stub(n) for n in [*names, *extra]}
        async with contextlib.AsyncExitStack() as stack:
            if mode == "native":
                urls = await stack.enter_async_context(served(stubs))
                urls["gone"] = f"http://127.0.0.1:{find_free_port()}"  # nothing listens
                config = make_config([urls[n] for n in names], *flags)
                assert config.upstream_client == "native"
                router = Router(config)
            else:
                urls = {n: f"http://{n}" for n in [*stubs, "gone"]}
                config = make_config([urls[n] for n in names], *flags)
                router = Router(config, transport=HostTransport(stubs))
            app = create_app(router)
            await router.start()
            try:
                async with httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://router"
                ) as client:
                    yield Harness(router, client, stubs, urls)
            finally:
                await router.stop()

    return build


BOTH_UPSTREAMS = pytest.mark.parametrize("harness", ["httpx", "native"], indirect=True)


def error_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "code"}, body
    assert body["error"]["code"] == response.status_code
    return body["error"]  # type: ignore[no-any-return]


# -- happy path -----------------------------------------------------------------------------
@BOTH_UPSTREAMS
async def test_generate_is_forwarded_byte_for_byte(harness) -> None:
    async with harness(["a"]) as h:
        raw = b'{"text": "hello",   "sampling_params": {"max_new_tokens": 4}}'
        r = await h.client.post("/generate", content=raw)
        assert r.status_code == 200
        assert r.json()["worker"] == "a"
        assert r.headers["x-sglctl-worker"] == h.urls["a"]
        assert h.stubs["a"].bodies == [raw]


@BOTH_UPSTREAMS
async def test_openai_routes_and_info_endpoints(harness) -> None:
    async with harness(["a"]) as h:
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        assert (await h.client.post("/v1/chat/completions", json=chat)).status_code == 200
        assert (await h.client.post("/v1/completions", json={"prompt": "hi"})).status_code == 200
        assert (await h.client.get("/v1/models")).json()["model_path"] == "stub-model"
        assert (await h.client.get("/get_model_info")).json()["model_path"] == "stub-model"
        info = (await h.client.get("/get_server_info")).json()
        assert info["router"]["workers"] == 1
        assert info["router"]["name"] == "sglctl"
        assert (await h.client.get("/health_generate")).status_code == 200


# -- errors (CONTRACT section 3) ------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/generate", b"{not json", "not valid JSON"),
        ("/generate", b"[1, 2]", "JSON object"),
        ("/generate", b"", "empty"),
        ("/generate", b'{"text": 5}', "'text'"),
        ("/generate", b'{"input_ids": ["a"]}', "'input_ids'"),
        ("/generate", b'{"text": "x", "stream": "yes"}', "'stream'"),
        ("/generate", b'{"text": "x", "sampling_params": [1]}', "'sampling_params'"),
        ("/generate", b'{"sampling_params": {}}', "required"),
        ("/v1/chat/completions", b'{"messages": "hi"}', "'messages'"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 3}]}', "content"),
        ("/v1/completions", b'{"prompt": {"a": 1}}', "'prompt'"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": "ten"}', "'max_tokens'"),
        ("/generate", b'{"text": "x", "priority": 1.5}', "priority"),
    ],
)
async def test_bad_input_is_400_and_never_reaches_a_worker(
    harness, path: str, body: bytes, needle: str
) -> None:
    async with harness(["a"]) as h:
        r = await h.client.post(path, content=body)
        assert r.status_code == 400
        error = error_of(r)
        assert needle in str(error["message"])
        assert error["type"] == "invalid_request_error"
        assert h.stubs["a"].calls == 0


@BOTH_UPSTREAMS
async def test_payload_over_limit_is_413(harness) -> None:
    async with harness(["a"], "--max-payload-size", "1000") as h:
        r = await h.client.post("/generate", json={"text": "x" * 2000})
        assert r.status_code == 413
        error_of(r)

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
            for _ in range(10):
                yield b" " * 200

        r = await h.client.post("/generate", content=chunks())
        assert r.status_code == 413
        assert h.stubs["a"].calls == 0


@BOTH_UPSTREAMS
async def test_unknown_path_404_and_wrong_method_405(harness) -> None:
    async with harness(["a"]) as h:
        r = await h.client.get("/no/such/path")
        assert r.status_code == 404
        assert error_of(r)["type"] == "not_found_error"
        r = await h.client.get("/generate")
        assert r.status_code == 405
        error_of(r)


@BOTH_UPSTREAMS
async def test_no_worker_is_503(harness) -> None:
    async with harness([]) as h:
        r = await h.client.post("/generate", json={"text": "x"})
        assert r.status_code == 503
        assert "no healthy worker" in str(error_of(r)["message"])
        assert (await h.client.get("/health")).status_code == 503
        ready = await h.client.get("/readiness")
        assert ready.status_code == 503
        assert ready.json() == {"status": "not_ready", "healthy_workers": 0, "total_workers": 0}
        assert (await h.client.get("/liveness")).status_code == 200


async def test_unhealthy_workers_are_503(harness) -> None:
    async with harness(["a"]) as h:
        h.router.registry.get("http://a").health_ok = False  # type: ignore[union-attr]
        assert (await h.client.post("/generate", json={"text": "x"})).status_code == 503


@BOTH_UPSTREAMS
async def test_all_workers_failing_is_502_with_last_error(harness) -> None:
    async with harness(["a", "b"]) as h:
        for stub in h.stubs.values():
            stub.status = 500
        r = await h.client.post("/generate", json={"text": "x"})
        assert r.status_code == 502
        message = str(error_of(r)["message"])
        assert "HTTP 500" in message and "broken" in message
        # Retried on both workers, bounded: 1 + max_total_retries attempts at most.
        calls = h.stubs["a"].calls + h.stubs["b"].calls
        assert h.stubs["a"].calls >= 1 and h.stubs["b"].calls >= 1
        assert calls <= 1 + h.router.config.max_total_retries
        metrics = (await h.client.get("/metrics")).text
        assert "sglang_router_retries_total" in metrics
        assert (
            'sglang_router_requests_total{code="502",route="/generate",status="upstream_error"} 1.0'
            in metrics
        )


@BOTH_UPSTREAMS
async def test_failure_is_retried_on_another_worker(harness) -> None:
    async with harness(["a", "b"], "--policy", "round_robin") as h:
        h.stubs["a"].status = 503
        for _ in range(4):
            r = await h.client.post("/generate", json={"text": "x"})
            assert r.status_code == 200
            assert r.json()["worker"] == "b"


@BOTH_UPSTREAMS
async def test_unreachable_worker_is_retried_elsewhere(harness) -> None:
    async with harness(["a"], "--policy", "round_robin", extra=[]) as h:
        gone = h.router.registry.add(h.urls["gone"])  # nothing listens: connection refused
        for _ in range(4):
            assert (await h.client.post("/generate", json={"text": "x"})).json()["worker"] == "a"
        assert gone.errors_total >= 1


@BOTH_UPSTREAMS
async def test_worker_4xx_passes_through_without_retry(harness) -> None:
    async with harness(["a", "b"]) as h:
        for stub in h.stubs.values():
            stub.status = 400
        r = await h.client.post("/generate", json={"text": "x"})
        assert r.status_code == 400
        assert h.stubs["a"].calls + h.stubs["b"].calls == 1


@BOTH_UPSTREAMS
async def test_disable_retries(harness) -> None:
    async with harness(["a", "b"], "--disable-retries") as h:
        for stub in h.stubs.values():
            stub.status = 500
        assert (await h.client.post("/generate", json={"text": "x"})).status_code == 502
        assert h.stubs["a"].calls + h.stubs["b"].calls == 1


async def test_circuit_breaker_takes_a_failing_worker_out(harness) -> None:
    async with harness(["a", "b"], "--cb-failure-threshold", "2", "--policy", "round_robin") as h:
        h.stubs["a"].status = 500
        for _ in range(6):
            assert (await h.client.post("/generate", json={"text": "x"})).status_code == 200
        workers = {w["url"]: w for w in (await h.client.get("/workers")).json()["workers"]}
        assert workers["http://a"]["circuit_breaker_state"] == "open"
        calls_before = h.stubs["a"].calls
        for _ in range(4):
            await h.client.post("/generate", json={"text": "x"})
        assert h.stubs["a"].calls == calls_before


@BOTH_UPSTREAMS
async def test_queue_full_is_429_with_retry_after(harness) -> None:
    async with harness(["a"], "--max-concurrent-requests", "1", "--queue-size", "0") as h:
        h.stubs["a"].delay = 0.3
        slow = asyncio.create_task(h.client.post("/generate", json={"text": "x"}))
        await async_wait_until(lambda: h.router.admission.active, what="the slot taken")
        r = await h.client.post("/generate", json={"text": "y"})
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        error_of(r)
        assert (await slow).status_code == 200


@BOTH_UPSTREAMS
async def test_queue_timeout_is_429(harness) -> None:
    async with harness(
        ["a"], "--max-concurrent-requests", "1", "--queue-size", "5", "--queue-timeout-secs", "0.05"
    ) as h:
        h.stubs["a"].delay = 0.5
        slow = asyncio.create_task(h.client.post("/generate", json={"text": "x"}))
        await async_wait_until(lambda: h.router.admission.active, what="the slot taken")
        r = await h.client.post("/generate", json={"text": "y"})
        assert r.status_code == 429
        assert "retry-after" in r.headers
        await slow


# -- admin ----------------------------------------------------------------------------------
async def test_admin_add_list_remove(harness) -> None:
    async with harness(["a"], extra=["b"]) as h:
        r = await h.client.post("/add_worker", params={"url": "http://b"})
        assert r.status_code == 200
        assert r.json()["status"] == "ok" and r.json()["url"] == "http://b"
        assert (await h.client.post("/add_worker", params={"url": "http://b"})).status_code == 409
        assert (await h.client.get("/list_workers")).json() == {"urls": ["http://a", "http://b"]}
        loads = (await h.client.get("/get_loads")).json()
        assert loads == {
            "workers": [{"worker": "http://a", "load": 0}, {"worker": "http://b", "load": 0}]
        }
        items = (await h.client.get("/workers")).json()["workers"]
        for item in items:
            for field_name in ("url", "id", "is_healthy", "load", "requests_total", "errors_total"):
                assert field_name in item
            assert item["circuit_breaker_state"] == "closed"
        assert (
            await h.client.post("/remove_worker", params={"url": "http://b"})
        ).status_code == 200
        r = await h.client.post("/remove_worker", params={"url": "http://b"})
        assert r.status_code == 404
        error_of(r)


async def test_admin_0_3_2_style_workers_api(harness) -> None:
    async with harness(["a"], extra=["b"]) as h:
        r = await h.client.post("/workers", json={"url": "http://b"})
        assert r.status_code == 200
        worker_id = r.json()["id"]
        assert (await h.client.get(f"/workers/{worker_id}")).json()["url"] == "http://b"
        assert (await h.client.delete(f"/workers/{worker_id}")).status_code == 200
        assert (await h.client.delete("/workers/http://a")).status_code == 200
        assert (await h.client.get("/list_workers")).json() == {"urls": []}


async def test_add_unreachable_worker_fails_with_a_message(harness) -> None:
    async with harness(
        ["a"], "--worker-startup-timeout-secs", "0.2", "--worker-startup-check-interval", "0.05"
    ) as h:
        r = await h.client.post("/add_worker", params={"url": "http://nowhere:1234"})
        assert r.status_code == 503
        assert "health check" in str(error_of(r)["message"])
        assert (await h.client.post("/add_worker", params={"url": "ftp://x"})).status_code == 400
        assert (await h.client.post("/add_worker")).status_code == 400


async def test_api_key_guards_admin_calls(harness) -> None:
    async with harness(["a"], "--api-key", "s3cret", extra=["b"]) as h:
        r = await h.client.post("/add_worker", params={"url": "http://b"})
        assert r.status_code == 401
        error_of(r)
        wrong = {"authorization": "Bearer nope"}
        assert (await h.client.post("/flush_cache", headers=wrong)).status_code == 401
        good = {"authorization": "Bearer s3cret"}
        assert (
            await h.client.post("/add_worker", params={"url": "http://b"}, headers=good)
        ).status_code == 200
        assert (await h.client.get("/list_workers")).status_code == 200  # reading needs no key


@BOTH_UPSTREAMS
async def test_flush_cache_fans_out_and_clears_the_tree(harness) -> None:
    async with harness(["a", "b"]) as h:
        await h.client.post("/generate", json={"text": "some prompt " * 20})
        assert h.router.policy.tree.total_size() > 0  # type: ignore[attr-defined]
        r = await h.client.post("/flush_cache")
        assert r.json()["status"] == "success"
        assert r.json()["workers_flushed"] == 2
        assert h.router.policy.tree.total_size() == 0  # type: ignore[attr-defined]


async def test_set_available_takes_effect_for_the_next_request(harness) -> None:
    async with harness(["a", "b"]) as h:
        h.router.registry.set_available("http://a", False)
        for _ in range(5):
            assert (await h.client.post("/generate", json={"text": "x"})).json()["worker"] == "b"


async def test_metrics_and_stats(harness) -> None:
    async with harness(["a"]) as h:
        prompt = "cached prompt " * 20
        for _ in range(3):
            await h.client.post("/generate", json={"text": prompt})
        text = (await h.client.get("/metrics")).text
        for name in (
            'sglang_router_requests_total{code="200",route="/generate",status="success"} 3.0',
            "sglang_router_request_duration_seconds_bucket",
            'sglang_router_worker_pending_requests{worker="http://a"} 0.0',
            'sglang_router_worker_healthy{worker="http://a"} 1.0',
            'sglang_router_circuit_breaker_state{worker="http://a"} 0.0',
            "sglang_router_cache_hits_total",
            "sglang_router_cache_misses_total",
            "sglang_router_retries_total",
        ):
            assert name in text, name
        stats = (await h.client.get("/stats")).json()
        assert stats["requests_total"] == 3
        assert stats["errors_total"] == 0
        assert stats["workers"] == 1 and stats["healthy_workers"] == 1
        assert stats["policy"] == "cache_aware"
        for name in ("requests_per_second", "latency_p50_ms", "latency_p99_ms"):
            assert stats[name] >= 0


@BOTH_UPSTREAMS
async def test_load_is_counted_while_in_flight(harness) -> None:
    async with harness(["a"]) as h:
        h.stubs["a"].delay = 0.3
        task = asyncio.create_task(h.client.post("/generate", json={"text": "x"}))
        worker = h.router.registry.all()[0]
        await async_wait_until(lambda: worker.in_flight == 1, what="the load counted")
        assert (await h.client.get("/get_loads")).json()["workers"][0]["load"] == 1
        await task
        assert (await h.client.get("/get_loads")).json()["workers"][0]["load"] == 0


def test_config_from_both_flag_generations() -> None:
    documented = parse_args(
        ["--worker-urls", "http://a/", "--metrics-port", "9", "--max-total-retries", "2"]
    )
    assert documented.worker_urls == ["http://a"]
    assert documented.metrics_port == 9 and documented.max_total_retries == 2
    aliases = parse_args(
        ["--prometheus-port", "9", "--prometheus-host", "0.0.0.0", "--retry-max-retries", "2"]
    )
    assert (
        aliases.metrics_port == 9
        and aliases.metrics_host == "0.0.0.0"
        and aliases.max_total_retries == 2
    )
    pd = parse_args(
        [
            "--pd-disaggregation",
            "--prefill",
            "http://p1",
            "9000",
            "--prefill",
            "http://p2",
            "--decode",
            "http://d",
        ]
    )
    assert pd.is_pd and [(p.url, p.bootstrap_port) for p in pd.prefill_servers] == [
        ("http://p1", 9000),
        ("http://p2", None),
    ]
    assert pd.decode_urls == ["http://d"]
    mode = parse_args(["--mode", "pd", "--prefill-urls", "http://p", "--decode-urls", "http://d"])
    assert mode.is_pd


def test_config_defaults_match_the_contract() -> None:
    c = parse_args([])
    assert (c.host, c.port, c.policy) == ("127.0.0.1", 30000, "cache_aware")
    assert (c.cache_threshold, c.balance_abs_threshold, c.balance_rel_threshold) == (
        0.5,
        32,
        1.0001,
    )
    assert (c.eviction_interval_secs, c.max_tree_size, c.max_payload_size) == (
        60,
        16777216,
        10485760,
    )
    assert (c.max_worker_retries, c.max_total_retries, c.retry_initial_backoff_ms) == (3, 6, 50)
    assert (c.cb_failure_threshold, c.cb_success_threshold, c.cb_timeout_duration_secs) == (
        10,
        3,
        60,
    )
    assert (
        c.health_check_timeout_secs,
        c.health_failure_threshold,
        c.health_success_threshold,
    ) == (5, 3, 2)
    assert (c.max_concurrent_requests, c.queue_size, c.queue_timeout_secs) == (-1, 100, 60)
    assert c.metrics_port == 29000 and c.worker_startup_timeout_secs == 1800
    assert c.unsupported == []


@pytest.mark.parametrize(
    "flags",
    [
        ["--policy", "manual"],
        ["--dp-aware"],
        ["--model-path", "meta-llama/Llama-3-8B"],
        ["--enable-igw"],
    ],
)
def test_unsupported_flags_are_reported_not_ignored(flags: list[str]) -> None:
    assert parse_args(flags).unsupported


def test_bad_flag_values_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for flags in (
        ["--policy", "nope"],
        ["--cache-threshold", "2"],
        ["--prefill", "http://p"],
        ["--max-tree-size", "0"],
    ):
        with pytest.raises(SystemExit):
            parse_args(flags)


@BOTH_UPSTREAMS
async def test_orjson_body_shapes(harness) -> None:
    async with harness(["a"]) as h:
        r = await h.client.post("/generate", content=orjson.dumps({"text": ["a", "b"]}))
        assert r.status_code == 200
        r = await h.client.post("/generate", content=orjson.dumps({"input_ids": [[1, 2], [3]]}))
        assert r.status_code == 200


# -- prefill/decode disaggregation ----------------------------------------------------------
PD_FLAGS = ("--pd-disaggregation", "--prefill", "http://p", "9000", "--decode", "http://d")


async def test_pd_sends_both_with_bootstrap_and_answers_from_decode(harness) -> None:
    async with harness([], *PD_FLAGS, extra=["p", "d"]) as h:
        r = await h.client.post("/generate", json={"text": "hello pd", "sampling_params": {}})
        assert r.status_code == 200
        assert r.json()["worker"] == "d"
        assert r.headers["x-sglctl-prefill-worker"] == "http://p"
        sent_p = orjson.loads(h.stubs["p"].bodies[0])
        sent_d = orjson.loads(h.stubs["d"].bodies[0])
        assert sent_p == sent_d
        assert sent_p["bootstrap_host"] == "p" and sent_p["bootstrap_port"] == 9000
        assert isinstance(sent_p["bootstrap_room"], int)
        assert sent_p["text"] == "hello pd"
        roles = {
            w["url"]: w["worker_type"] for w in (await h.client.get("/workers")).json()["workers"]
        }
        assert roles == {"http://p": "prefill", "http://d": "decode"}
        loads = (await h.client.get("/get_loads")).json()["workers"]
        assert all(item["load"] == 0 for item in loads)


async def test_pd_batch_gets_one_room_per_prompt(harness) -> None:
    async with harness([], *PD_FLAGS, extra=["p", "d"]) as h:
        r = await h.client.post("/generate", json={"text": ["a", "b", "c"]})
        assert r.status_code == 200
        sent = orjson.loads(h.stubs["d"].bodies[0])
        assert sent["bootstrap_host"] == ["p"] * 3
        assert len(set(sent["bootstrap_room"])) == 3


async def test_pd_failures(harness) -> None:
    async with harness([], *PD_FLAGS, extra=["p", "d"]) as h:
        h.stubs["p"].status = 500
        r = await h.client.post("/generate", json={"text": "x"})
        assert r.status_code == 502
        assert "http://p" in str(error_of(r)["message"])
        h.stubs["p"].status = 200
        h.router.registry.get("http://d").health_ok = False  # type: ignore[union-attr]
        r = await h.client.post("/generate", json={"text": "x"})
        assert r.status_code == 503
        error_of(r)


@pytest.mark.parametrize(
    "flags",
    [
        ["--worker-urls", "http://host:notaport"],
        ["--worker-urls", "ftp://host:1"],
        ["--worker-urls", "http://"],
        ["--pd-disaggregation", "--prefill", "http://p:x", "--decode", "http://d"],
    ],
)
def test_bad_worker_urls_are_usage_errors(flags: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(flags)


def test_worker_urls_need_a_scheme_and_the_error_names_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--worker-urls", "notaurl"])
    err = capsys.readouterr().err
    assert "--worker-urls" in err and "http://notaurl" in err
    assert parse_args(["--worker-urls", "http://127.0.0.1:8000/"]).worker_urls == [
        "http://127.0.0.1:8000"
    ]


# -- issue 9 items 4-6: admin bodies, add_worker answers at once, one URL validator ----------
@BOTH_UPSTREAMS
async def test_admin_body_over_the_cap_is_413_before_it_is_buffered(harness) -> None:
    async with harness(["a"]) as h:
        sent = 0

        async def huge() -> AsyncIterator[bytes]:  # no Content-Length: refused while read
            nonlocal sent
            for _ in range(300):
                sent += 1 << 20
                yield b" " * (1 << 20)

        r = await h.client.post("/workers", content=huge())
        assert r.status_code == 413
        error_of(r)
        assert sent < 8 << 20  # refused after the first chunks, not after 300 MB
        declared = await h.client.post(
            "/add_worker", content=b"{}", headers={"content-length": str(300 << 20)}
        )
        assert declared.status_code == 413


async def test_add_worker_refused_connection_is_503_at_once(harness) -> None:
    # The startup timeout is long: a refused connection must not wait for it.
    async with harness(["a"], "--worker-startup-timeout-secs", "600") as h:
        started = asyncio.get_running_loop().time()
        r = await h.client.post("/add_worker", params={"url": "http://nowhere:1234"})
        assert r.status_code == 503
        assert "refused" in str(error_of(r)["message"])
        assert asyncio.get_running_loop().time() - started < 30
        assert "http://nowhere:1234" not in h.router.registry


async def test_add_worker_not_ready_yet_is_202_pending_then_admitted(harness) -> None:
    async with harness(
        ["a"], "--worker-startup-check-interval", "0.05", "--disable-circuit-breaker", extra=["b"]
    ) as h:
        h.stubs["b"].healthy = False  # loading its model
        r = await h.client.post("/add_worker", params={"url": "http://b"})
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "pending"
        worker = h.router.registry.get("http://b")
        assert worker is not None and not worker.is_routable() and worker.source == "admin"
        h.stubs["b"].healthy = True
        await async_wait_until(worker.is_routable, timeout=20, what="the pending worker admitted")
        item = (await h.client.get(f"/workers/{worker.id}")).json()
        assert item["source"] == "admin" and item["meta"] == {}


async def test_add_worker_wait_is_cancelled_by_shutdown(harness) -> None:
    async with harness(
        ["a"], "--worker-startup-timeout-secs", "600", "--worker-startup-check-interval", "0.05",
        extra=["b"],
    ) as h:  # fmt: skip
        h.stubs["b"].healthy = False
        call = asyncio.create_task(
            h.client.post("/add_worker", params={"url": "http://b", "wait": "600"})
        )
        await async_wait_until(lambda: h.router._admin_tasks, what="the wait to start")
        h.router.begin_shutdown()
        r = await asyncio.wait_for(call, 30)
        assert r.status_code == 503 and "shutting down" in str(error_of(r)["message"])
        assert "http://b" not in h.router.registry


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("notaurl", "http://notaurl"),
        ("http://user:hunter2@b", "credentials"),
        ("http://b/abc", "path"),
        ("http://b?q=1", "query"),
        ("http://b#frag", "fragment"),
        ("ftp://b", "scheme"),
        ("http://", "host"),
    ],
)
async def test_admin_refuses_bad_worker_urls_naming_the_field(
    harness, url: str, expected: str
) -> None:
    async with harness(["a"]) as h:
        for r in (
            await h.client.post("/add_worker", params={"url": url}),
            await h.client.post("/workers", json={"url": url}),
        ):
            assert r.status_code == 400
            message = str(error_of(r)["message"])
            assert expected in message and "'url'" in message
            assert "hunter2" not in message


@pytest.mark.parametrize(
    "flags",
    [
        ["--worker-urls", "notaurl"],
        ["--worker-urls", "http://user:hunter2@h:1"],
        ["--worker-urls", "http://h:1/abc"],
        ["--worker-urls", "http://h:1?q=1"],
        ["--pd-disaggregation", "--prefill", "notaurl", "--decode", "http://d"],
        ["--mode", "pd", "--prefill-urls", "http://p", "--decode-urls", "notaurl"],
    ],
)
def test_start_up_refuses_bad_worker_urls_naming_the_flag(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(flags)
    err = capsys.readouterr().err
    assert "hunter2" not in err
    flag = (
        "--worker-urls"
        if "--worker-urls" in flags
        else "--prefill"
        if "notaurl" in flags[2]
        else "--decode"
    )
    assert flag in err


def test_urls_are_normalised_one_way_everywhere() -> None:
    from sglctl.router.workers import WorkerRegistry

    registry = WorkerRegistry()
    worker = registry.add("HTTP://B:8000/", source="k8s", meta={"pod": "p-0", "namespace": "ns"})
    assert worker.url == "http://b:8000" and "http://b:8000/" in registry
    assert worker.to_json()["meta"] == {"pod": "p-0", "namespace": "ns"}
    assert parse_args(["--worker-urls", "http://B:8000/"]).worker_urls == ["http://b:8000"]


# -- issue 10: the flag table and the config ----------------------------------------------------
def test_every_config_field_has_a_flag_and_every_flag_a_help_with_its_default() -> None:
    import argparse
    import dataclasses

    from sglctl.router.flags import build_parser

    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    built = {"pd_disaggregation", "prefill_servers", "unsupported", "k8s_discovery"}
    missing = {f.name for f in dataclasses.fields(RouterConfig)} - dests - built
    assert not missing, f"RouterConfig fields without a flag: {missing}"
    text = parser.format_help()
    for flag in ("--cache-threshold", "--balance-abs-threshold", "--queue-size",
                 "--max-worker-retries", "--worker-startup-timeout-secs"):  # fmt: skip
        action = next(a for a in parser._actions if flag in a.option_strings)
        assert action.help and action.help is not argparse.SUPPRESS, flag
    assert "(default: 1800.0)" in text
    assert "manual" not in text.split("--policy", 1)[1].split("\n", 1)[0]


@pytest.mark.parametrize(
    ("flags", "hint"),
    [(["--policy", "manual"], "cache_aware"), (["--dp-aware"], "--dp-size")],
)
def test_refusals_say_what_to_use_instead(flags: list[str], hint: str) -> None:
    (_flag, message), *_ = parse_args(flags).unsupported
    assert hint in message


def test_non_loopback_bind_without_api_key_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    from sglctl.router.main import warn_if_exposed

    with caplog.at_level("WARNING", logger="sglctl.router.main"):
        assert warn_if_exposed(parse_args(["--host", "0.0.0.0"]))
        assert not warn_if_exposed(parse_args(["--host", "0.0.0.0", "--api-key", "k"]))
        assert not warn_if_exposed(parse_args(["--host", "127.0.0.1"]))
        assert not warn_if_exposed(parse_args(["--host", "::1"]))
    assert len(caplog.records) == 1 and "--api-key" in caplog.records[0].getMessage()
