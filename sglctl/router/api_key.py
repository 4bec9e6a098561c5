"""The ``--api-key`` check of the endpoints that change what the router does (admin, peers).

A module of its own so that :mod:`~sglctl.router.peers`, which the router's config imports,
can ask for the key without importing the admin handlers (and, through them, the router).
"""

from __future__ import annotations

import hmac

from starlette.requests import Request

from sglctl.router.errors import RouterError


def check_api_key(api_key: str | None, request: Request) -> None:
    """401 unless the request carries the configured API key (no-op without a key)."""
    if not api_key:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    ):
        raise RouterError(401, "this admin endpoint requires 'Authorization: Bearer <api key>'")
