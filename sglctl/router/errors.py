"""Error answers in the OpenAI shape, ``{"error": {"message", "type", "code"}}``.

Every failure the router reports goes through :class:`RouterError`, so the status codes of
CONTRACT.md section 3 live in one place: 400 bad JSON or wrong type, 401 missing API key, 404
unknown path or worker, 405 wrong method, 409 duplicate worker, 413 payload too large, 429
queue full or timed out (with ``Retry-After``), 502 every attempt failed at the workers, 503
no healthy worker, 504 request timeout.
"""

from __future__ import annotations

import orjson
from starlette.responses import Response

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "method_not_allowed",
    409: "conflict_error",
    413: "payload_too_large",
    429: "rate_limit_exceeded",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


class RouterError(Exception):
    """An error answer: raise it anywhere below a handler, the app turns it into JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or ERROR_TYPES.get(status, "error")
        self.headers = headers or {}

    def response(self) -> Response:
        return error_response(self.status, self.message, self.error_type, self.headers)


def error_body(status: int, message: str, error_type: str | None = None) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": error_type or ERROR_TYPES.get(status, "error"),
                "code": status,
            }
        }
    )


def error_response(
    status: int, message: str, error_type: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        error_body(status, message, error_type),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )
