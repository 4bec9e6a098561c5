"""The one worker-URL validator: flags, the admin API and the registry all go through it.

A worker URL is an origin and nothing more: ``http(s)://host[:port]``. The rules, and why:

* the scheme is required and must be http or https: a bare ``notaurl`` used to be taken as
  ``http://notaurl``, shown healthy, and then 502ed every request;
* a host is required; the port is optional (the scheme's default);
* credentials (``user:pass@``) are refused, and the message never repeats the password:
  worker URLs are shown by unauthenticated endpoints (``/list_workers``, ``/workers``,
  ``/get_server_info``) and in logs;
* a path other than ``/``, a query and a fragment are refused: the router appends its own
  paths (``/generate``, the health endpoint), so ``http://w/abc?q=1`` would turn the health
  probe into ``GET /abc?q=1/health``;
* a trailing slash is stripped, so ``http://w:1/`` and ``http://w:1`` are the same worker.

:func:`parse_worker_url` raises :class:`InvalidWorkerURL` whose message names where the URL
came from (``--worker-urls``, the ``url`` field, ...) and says what a valid one looks like.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import httpx

SCHEMES = ("http", "https")


class InvalidWorkerURL(ValueError):
    """A worker URL that breaks one of the rules above; the message is fit for the user."""


def _shown(raw: str) -> str:
    """``raw`` as it may appear in a message: credentials cut out."""
    head, sep, rest = raw.partition("://")
    if not sep:
        head, rest = "", raw
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        netloc = "<credentials>@" + netloc.rsplit("@", 1)[1]
    return (head + sep if sep else "") + netloc + slash + tail


def parse_worker_url(raw: object, where: str = "worker URL") -> str:
    """The normalised form of ``raw`` (``scheme://host[:port]``, lower-case scheme and host).

    ``where`` names the flag or field the URL came from, for the message.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidWorkerURL(f"{where}: a worker URL is required, e.g. http://127.0.0.1:30000")
    text = raw.strip()
    shown = _shown(text)
    expected = "expected http://host:port or https://host:port"
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError on a non-numeric or out-of-range port
        host = parts.hostname
    except ValueError:
        raise InvalidWorkerURL(f"{where}: invalid worker URL {shown!r} ({expected})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES or "://" not in text:
        hint = f"; did you mean http://{shown}?" if "://" not in text else ""
        raise InvalidWorkerURL(
            f"{where}: worker URL {shown!r} needs an http:// or https:// scheme{hint}"
        )
    if not host:
        raise InvalidWorkerURL(f"{where}: worker URL {shown!r} has no host ({expected})")
    if parts.username is not None or parts.password is not None:
        raise InvalidWorkerURL(
            f"{where}: worker URL {shown!r} contains credentials, which the router would show "
            "on unauthenticated endpoints; put the worker behind a network boundary instead"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment or text.endswith(("?", "#")):
        raise InvalidWorkerURL(
            f"{where}: worker URL {shown!r} must not have a path, query or fragment "
            f"(the router adds its own paths; {expected})"
        )
    host_text = f"[{host}]" if ":" in host else host
    netloc = host_text if port is None else f"{host_text}:{port}"
    url = urlunsplit((scheme, netloc, "", "", ""))
    try:
        httpx.URL(url)  # what the client could not connect to (a bad IDNA host, ...)
    except httpx.InvalidURL:
        raise InvalidWorkerURL(f"{where}: invalid worker URL {shown!r} ({expected})") from None
    return url


def lookup_key(raw: str) -> str:
    """The registry key for a lookup: the normalised URL, or ``raw`` stripped when invalid.

    Lookups (``remove``, ``get``, ``DELETE /workers/{url-or-id}``) must not raise on a
    malformed URL: an id or a typo simply matches nothing.
    """
    try:
        return parse_worker_url(raw)
    except InvalidWorkerURL:
        return raw.strip()
