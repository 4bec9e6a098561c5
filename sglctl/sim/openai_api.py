"""OpenAI-compatible endpoints (filled in by a later commit)."""

from __future__ import annotations

from starlette.routing import Route


def routes() -> list[Route]:
    return []
