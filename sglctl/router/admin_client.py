"""Client side of the admin API, for ``sglctl add-worker/remove-worker/list-workers``."""

from __future__ import annotations

import os

import httpx
import orjson

DEFAULT_ROUTER = "http://127.0.0.1:30000"


class AdminError(RuntimeError):
    """The router refused or could not be reached; the message is fit to print."""


def _headers(api_key: str | None) -> dict[str, str]:
    key = api_key or os.environ.get("SGLCTL_API_KEY")
    return {"authorization": f"Bearer {key}"} if key else {}


def _call(
    method: str, router: str, path: str, timeout: float, api_key: str | None, **params: str
) -> dict:
    url = router.rstrip("/") + path
    try:
        response = httpx.request(
            method, url, params=params or None, headers=_headers(api_key), timeout=timeout
        )
    except httpx.HTTPError as exc:
        raise AdminError(f"cannot reach the router at {router}: {exc}") from None
    try:
        data = orjson.loads(response.content) if response.content else {}
    except orjson.JSONDecodeError:
        data = {"raw": response.text}
    if response.status_code >= 400:
        message = (
            data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else None
        )
        raise AdminError(f"router answered {response.status_code}: {message or response.text}")
    return data if isinstance(data, dict) else {"result": data}


def add_worker(
    router: str,
    url: str,
    timeout: float = 30.0,
    api_key: str | None = None,
    wait: float | None = None,
) -> dict:
    """``POST /add_worker?url=``: the router answers within seconds (``status`` "ok", or
    "pending" when the worker is not healthy yet and will join once it is).

    ``wait``: seconds the router may wait for the worker to pass its health check instead
    (``?wait=``); the HTTP timeout is then ``wait`` plus a margin for the router's answer, so a
    caller's bound holds even when the router itself does not answer.
    """
    if wait is None:
        return _call("POST", router, "/add_worker", timeout, api_key, url=url)
    return _call("POST", router, "/add_worker", wait + 5.0, api_key, url=url, wait=f"{wait:g}")


def remove_worker(router: str, url: str, timeout: float = 30.0, api_key: str | None = None) -> dict:
    return _call("POST", router, "/remove_worker", timeout, api_key, url=url)


def list_workers(router: str, timeout: float = 30.0, api_key: str | None = None) -> list[dict]:
    """The ``GET /workers`` items (url, health, load, counters)."""
    return list(_call("GET", router, "/workers", timeout, api_key).get("workers", []))
