"""Bad input at scale: hypothesis throws malformed requests at every router endpoint.

One sim worker and one router (with an API key) serve the whole module. Properties, for every
example: the router answers (no hang: every call has a timeout), never with a 5xx (a healthy
worker is there, so even 502/503 would mean client input broke something), every 4xx carries
the JSON error shape of CONTRACT.md section 3, and the process stays up. At the end, the
router's log must not contain an unhandled exception.
"""

from __future__ import annotations

import json
import socket
import string
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglctl.net import find_free_port
from sglctl.spawn import ManagedProcess, spawn_router, spawn_sim_worker

API_KEY = "fuzz-secret"
PAYLOAD_LIMIT = 65_536
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
pytestmark = pytest.mark.timeout(300)


@dataclass
class Stack:
    worker: ManagedProcess
    router: ManagedProcess
    client: httpx.Client

    @property
    def url(self) -> str:
        return self.router.url


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir: Path = tmp_path_factory.mktemp("fuzz-logs")
    started: list[ManagedProcess] = []
    try:
        worker = spawn_sim_worker(log_dir, "--speedup", "1000")
        started.append(worker)
        router = spawn_router(
            log_dir,
            [worker.url],
            "--metrics-port",
            str(find_free_port()),
            "--api-key",
            API_KEY,
            "--max-payload-size",
            str(PAYLOAD_LIMIT),
            "--worker-startup-timeout-secs",
            "1",
            "--request-timeout-secs",
            "20",
        )
        started.append(router)
        with httpx.Client(base_url=router.url, timeout=30.0, trust_env=False) as client:
            yield Stack(worker, router, client)
        log = router.log_tail(100_000)
        assert "Traceback" not in log, "the router logged an unhandled exception:\n" + log[-5000:]
    finally:
        for proc in reversed(started):
            proc.stop()
            print(f"----- {proc.name} log tail -----\n{proc.log_tail()}", file=sys.stderr)


def check(stack: Stack, response: httpx.Response, what: str) -> None:
    """The per-example properties."""
    assert stack.router.alive(), f"router died on {what}"
    assert response.status_code < 500, f"{what} -> {response.status_code}: {response.text[:500]}"
    if response.status_code >= 400 and response.request.method != "HEAD":
        try:
            body = response.json()
        except ValueError:
            pytest.fail(
                f"{what} -> {response.status_code} with a non-JSON body: {response.text[:300]}"
            )
        error = body.get("error") if isinstance(body, dict) else None
        assert isinstance(error, dict), (
            f"{what} -> {response.status_code} without an error object: {body}"
        )
        assert isinstance(error.get("message"), str), body
        assert error.get("code") == response.status_code, body
    if response.status_code == 429:
        assert "retry-after" in response.headers


# -- strategies ------------------------------------------------------------------------------
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=25,
)
# Values for fields with a numeric meaning: never a valid huge generation length (that would be
# a slow, valid request, not bad input).
small_or_wrong = (
    st.integers(min_value=-5, max_value=16)
    | st.floats(allow_nan=False)
    | json_values.filter(lambda v: not isinstance(v, int) or isinstance(v, bool))
)

INFERENCE_PATHS = ["/generate", "/v1/completions", "/v1/chat/completions"]
BASES = {
    "/generate": {"text": "hello there", "sampling_params": {"max_new_tokens": 4}},
    "/v1/completions": {"model": "m", "prompt": "hello there", "max_tokens": 4},
    "/v1/chat/completions": {
        "model": "m",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 4,
    },
}
FIELDS = {
    "/generate": [
        "text",
        "input_ids",
        "sampling_params",
        "stream",
        "priority",
        "rid",
        "return_logprob",
    ],
    "/v1/completions": [
        "prompt",
        "model",
        "stream",
        "max_tokens",
        "priority",
        "n",
        "stop",
        "stream_options",
    ],
    "/v1/chat/completions": [
        "messages",
        "model",
        "stream",
        "max_tokens",
        "priority",
        "stop",
        "tools",
    ],
}


@st.composite
def mutated_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid request with one field replaced by something else (often the wrong type)."""
    path = draw(st.sampled_from(INFERENCE_PATHS))
    body = json.loads(json.dumps(BASES[path]))
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(FIELDS[path]))
        numeric = field in ("max_tokens", "n", "priority")
        body[field] = draw(small_or_wrong if numeric else json_values)
    if path == "/generate" and draw(st.booleans()):
        body["sampling_params"] = {
            "max_new_tokens": draw(small_or_wrong),
            "temperature": draw(scalars),
        }
    return path, json.dumps(body).encode()


# -- properties ------------------------------------------------------------------------------
@FUZZ
@given(path=st.sampled_from(INFERENCE_PATHS), value=json_values)
def test_any_json_value_as_body(stack: Stack, path: str, value: object) -> None:
    response = stack.client.post(path, content=json.dumps(value).encode())
    check(stack, response, f"POST {path} {json.dumps(value)[:200]}")


@FUZZ
@given(case=mutated_bodies())
def test_wrong_field_types(stack: Stack, case: tuple[str, bytes]) -> None:
    path, body = case
    response = stack.client.post(path, content=body, headers={"content-type": "application/json"})
    check(stack, response, f"POST {path} {body[:300]!r}")


@FUZZ
@given(path=st.sampled_from(INFERENCE_PATHS), body=st.binary(max_size=300))
def test_raw_bytes(stack: Stack, path: str, body: bytes) -> None:
    response = stack.client.post(path, content=body)
    check(stack, response, f"POST {path} {body[:100]!r}")


@settings(FUZZ, max_examples=40)
@given(
    path=st.sampled_from(INFERENCE_PATHS),
    depth=st.integers(min_value=1, max_value=200_000),
    kind=st.sampled_from(["list", "object", "object-in-field"]),
)
def test_deeply_nested_json(stack: Stack, path: str, depth: int, kind: str) -> None:
    if kind == "list":
        body = "[" * depth + "]" * depth
    elif kind == "object":
        body = '{"a":' * depth + "1" + "}" * depth
    else:
        body = '{"text": "x", "sampling_params": ' + '{"a":' * depth + "1" + "}" * depth + "}"
    response = stack.client.post(path, content=body.encode())
    check(stack, response, f"POST {path} nested {kind} depth {depth}")
    if len(body) > PAYLOAD_LIMIT:
        assert response.status_code == 413


@settings(FUZZ, max_examples=20)
@given(extra=st.integers(min_value=-64, max_value=64), declare=st.booleans())
def test_payload_around_the_limit(stack: Stack, extra: int, declare: bool) -> None:
    skeleton = b'{"text": "", "sampling_params": {"max_new_tokens": 1}}'
    filler = PAYLOAD_LIMIT - len(skeleton) + extra
    body = skeleton.replace(b'""', b'"' + b"a" * filler + b'"')
    if declare:
        response = stack.client.post("/generate", content=body)
    else:  # chunked: no Content-Length, the router must count the bytes itself
        response = stack.client.post("/generate", content=iter([body[:1000], body[1000:]]))
    check(stack, response, f"POST /generate of {len(body)} bytes")
    assert (response.status_code == 413) == (len(body) > PAYLOAD_LIMIT)


header_names = st.text(
    alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=20
)
header_values = st.text(
    alphabet=string.printable.replace("\r", "")
    .replace("\n", "")
    .replace("\x0b", "")
    .replace("\x0c", ""),
    max_size=60,
)
content_types = st.sampled_from(
    [
        "application/json",
        "text/plain",
        "multipart/form-data",
        "application/x-www-form-urlencoded",
        "",
        "application/json; charset=latin-1",
        "*/*",
    ]
)


@FUZZ
@given(
    path=st.sampled_from([*INFERENCE_PATHS, "/add_worker", "/workers", "/flush_cache"]),
    headers=st.dictionaries(header_names, header_values, max_size=5),
    content_type=content_types,
    encoding=st.sampled_from([None, "gzip", "br", "identity", "zz"]),
)
def test_odd_headers(
    stack: Stack, path: str, headers: dict[str, str], content_type: str, encoding: str | None
) -> None:
    headers = {
        k: v.strip()
        for k, v in headers.items()
        if k.lower() not in {"host", "content-length", "transfer-encoding"}
    }
    headers["content-type"] = content_type
    if encoding:
        headers["content-encoding"] = encoding
    response = stack.client.post(
        path, content=json.dumps(BASES.get(path, {})).encode(), headers=headers
    )
    check(stack, response, f"POST {path} headers {headers}")


path_text = st.text(
    alphabet=string.ascii_letters + string.digits + "-._~%/?&=+:@!$'()*,;", max_size=40
)


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    path=path_text,
    authorized=st.booleans(),
)
def test_odd_paths_and_methods(stack: Stack, method: str, path: str, authorized: bool) -> None:
    headers = {"authorization": f"Bearer {API_KEY}"} if authorized else {}
    if path.lstrip("/").startswith(("remove_worker", "workers")) and method in ("POST", "DELETE"):
        # Never let a fuzzed path remove the real worker (it cannot match, but be explicit).
        assert stack.worker.url not in path
    response = stack.client.request(method, "/" + path.lstrip("/"), headers=headers)
    check(stack, response, f"{method} /{path}")


def is_http(url: str) -> bool:
    try:
        return urlsplit(url.strip()).scheme.lower() in ("http", "https")
    except ValueError:
        return False


# Random text never gets an http(s) scheme: an example must not make the router resolve or
# connect to a real host. The fixed list below has http URLs that cannot reach anything.
worker_urls = (
    st.text(max_size=40).filter(lambda u: not is_http(u))
    | st.builds(
        lambda s, rest: f"{s}://{rest}",
        st.sampled_from(["ftp", "file", "gopher", "javascript", "unix", "ws", ""]),
        st.text(max_size=20),
    )
    | st.sampled_from(
        [
            "http://",
            "https://",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:-1",
            "http://[::1",
            "http://127.0.0.1:0",
            "http:///nohost",
            "file:///etc/passwd",
            "http://user:pass@",
        ]
    )
)


@FUZZ
@given(
    url=worker_urls,
    endpoint=st.sampled_from(["add_worker", "remove_worker", "workers-post", "workers-delete"]),
    authorized=st.booleans(),
)
def test_admin_endpoints_refuse_bad_worker_urls(
    stack: Stack, url: str, endpoint: str, authorized: bool
) -> None:
    headers = {"authorization": f"Bearer {API_KEY}"} if authorized else {}
    if endpoint == "add_worker":
        response = stack.client.post("/add_worker", params={"url": url}, headers=headers)
    elif endpoint == "remove_worker":
        response = stack.client.post("/remove_worker", params={"url": url}, headers=headers)
    elif endpoint == "workers-post":
        response = stack.client.post("/workers", json={"url": url}, headers=headers)
    else:
        response = stack.client.delete("/workers/" + quote(url, safe=""), headers=headers)
    adding = endpoint in ("add_worker", "workers-post")
    if adding and is_http(url) and response.status_code == 503:
        response = _as_client_error(response)  # unreachable http URL: 503 is the contract
    check(stack, response, f"{endpoint} {url!r}")
    if not authorized:
        assert response.status_code == 401
    else:
        assert response.status_code in (400, 404, 405, 422, 499), response.text
    # the real worker is still registered and healthy
    listing = stack.client.get(
        "/list_workers", headers={"authorization": f"Bearer {API_KEY}"}
    ).json()
    assert listing["urls"] == [stack.worker.url]


@settings(FUZZ, max_examples=60)
@given(body=json_values, authorized=st.booleans())
def test_workers_post_with_any_json(stack: Stack, body: object, authorized: bool) -> None:
    headers = {"authorization": f"Bearer {API_KEY}"} if authorized else {}
    if (
        isinstance(body, dict)
        and isinstance(body.get("url"), str)
        and body["url"].startswith("http")
    ):
        body["url"] = "ftp://not-a-worker"  # do not let an example reach a real network address
    response = stack.client.post("/workers", content=json.dumps(body).encode(), headers=headers)
    check(stack, response, f"POST /workers {json.dumps(body)[:200]}")


def _as_client_error(response: httpx.Response) -> httpx.Response:
    """A 503 'worker unreachable' answer, relabelled so ``check`` applies its other rules."""
    assert "did not pass its health check" in response.text or "unreachable" in response.text
    return httpx.Response(
        499,
        content=response.content.replace(b'"code":503', b'"code":499'),
        request=response.request,
    )


# -- malformed HTTP on a raw socket -------------------------------------------------------------
RAW_REQUESTS = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"ZZZ\r\nhello\r\n0\r\n\r\n",
    b'POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"text":',  # then close
    b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 200_000 + b"\r\n\r\n",
    b"GET /health HTTP/1.1\r\nNoColonHeader\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),  # a TLS hello
]


@pytest.mark.parametrize("raw", RAW_REQUESTS, ids=range(len(RAW_REQUESTS)))
def test_malformed_http(stack: Stack, raw: bytes) -> None:
    host, port = stack.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass  # closing on garbage is a fine answer
    assert stack.router.alive()
    assert stack.client.get("/liveness").status_code == 200


def test_router_still_serves_after_the_storm(stack: Stack) -> None:
    response = stack.client.post(
        "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}
    )
    assert response.status_code == 200, response.text
    assert "text" in response.json()
