"""Error responses in the shapes clients of SGLang expect.

Native paths (``/generate`` ...) answer ``{"error": {"message", "type", "code"}}`` (SGLang sends
``{"error": {"message"}}``; the extra keys are the project-wide error shape and harmless).
OpenAI paths answer SGLang's ``{"object": "error", "message", "type", "param", "code"}`` plus
the same ``error`` object, so that both SGLang-aware clients and the ``openai`` package (which
reads ``body["error"]``) find the message.
"""

from __future__ import annotations

from http import HTTPStatus

import orjson
from starlette.responses import Response

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    413: "RequestTooLarge",
    499: "ClientClosedRequest",  # nginx's code: the client went away; no HTTPStatus for it
    500: "InternalServerError",
    503: "ServiceUnavailable",
}


def _type_of(status: int) -> str:
    """The error type for ``status``: ours, else the HTTP reason phrase, else "Error"."""
    known = _TYPES.get(status)
    if known is not None:
        return known
    try:
        return HTTPStatus(status).phrase.replace(" ", "")
    except ValueError:  # not a registered code
        return "Error"


class APIError(Exception):
    """Raised inside handlers; turned into a JSON error response by the app."""

    def __init__(self, message: str, status: int = 400, type_: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type_ or _type_of(status)


def error_body(message: str, status: int, type_: str | None = None, *, openai: bool) -> dict:
    kind = type_ or _type_of(status)
    inner = {"message": message, "type": kind, "code": status}
    if openai:
        return {"object": "error", "message": message, "type": kind, "param": None,
                "code": status, "error": inner}  # fmt: skip
    return {"error": inner}


def error_response(
    message: str, status: int = 400, type_: str | None = None, *, openai: bool = False
) -> Response:
    body = orjson.dumps(error_body(message, status, type_, openai=openai))
    return Response(body, status_code=status, media_type="application/json")


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")
