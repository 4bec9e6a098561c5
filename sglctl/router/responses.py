"""JSON answers shared by every handler module (errors have their own: :mod:`.errors`)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


def json_response(data: Any, status: int = 200) -> Response:
    """``data`` as an ``application/json`` response (orjson: fast, and strict about types)."""
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")
