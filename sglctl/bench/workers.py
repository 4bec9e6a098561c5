"""Find the workers behind a router and read their counters before and after a run.

The router does not say which worker served a request, so per-worker shares come from each
worker's own Prometheus counters: the difference between two scrapes is what the worker did
in between. Works with sglctl's router (``GET /list_workers``) and SGLang Router 0.3.2
(``GET /workers``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import httpx
from prometheus_client.parser import text_string_to_metric_families

from sglctl.bench.stats import WorkerShare

log = logging.getLogger(__name__)

REQUESTS = "sglang:num_requests_total"
PROMPT_TOKENS = "sglang:prompt_tokens_total"
GENERATION_TOKENS = "sglang:generation_tokens_total"
CACHED_TOKENS = "sglang:cached_tokens_total"
COUNTERS = (REQUESTS, PROMPT_TOKENS, GENERATION_TOKENS, CACHED_TOKENS)


async def discover_workers(client: httpx.AsyncClient, router_url: str) -> list[str]:
    """The router's worker URLs, or [] when it tells neither way (then shares are unknown)."""
    base = router_url.rstrip("/")
    try:
        resp = await client.get(f"{base}/list_workers")
        if resp.status_code == 200:
            urls = resp.json().get("urls")
            if isinstance(urls, list):
                return [str(u) for u in urls]
        resp = await client.get(f"{base}/workers")
        if resp.status_code == 200:
            workers = resp.json().get("workers")
            if isinstance(workers, list):
                return [str(w["url"]) for w in workers if isinstance(w, dict) and "url" in w]
    except (httpx.HTTPError, ValueError) as exc:
        log.warning("could not list the workers of %s: %s", router_url, exc)
    return []


def parse_counters(text: str) -> dict[str, float]:
    """Sum each counter of :data:`COUNTERS` over its label sets (absent counters are left out)."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in COUNTERS:
                totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    return totals


async def scrape_counters(
    client: httpx.AsyncClient, urls: Sequence[str]
) -> dict[str, dict[str, float]]:
    """``{url: counters}``; a worker that cannot be scraped maps to {} (and is logged)."""
    result: dict[str, dict[str, float]] = {}
    for url in urls:
        try:
            resp = await client.get(f"{url.rstrip('/')}/metrics")
            resp.raise_for_status()
            result[url] = parse_counters(resp.text)
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("could not read the metrics of worker %s: %s", url, exc)
            result[url] = {}
    return result


def worker_shares(
    before: Mapping[str, Mapping[str, float]], after: Mapping[str, Mapping[str, float]]
) -> list[WorkerShare]:
    """Per-worker deltas between two scrapes; workers missing from either scrape are skipped."""
    shares = []
    for url, end in after.items():
        start = before.get(url)
        if not end or start is None:
            continue

        def delta(
            name: str, start: Mapping[str, float] = start, end: Mapping[str, float] = end
        ) -> float:
            return max(end.get(name, 0.0) - start.get(name, 0.0), 0.0)

        shares.append(
            WorkerShare(
                url=url,
                requests=delta(REQUESTS),
                prompt_tokens=delta(PROMPT_TOKENS),
                generation_tokens=delta(GENERATION_TOKENS),
                cached_tokens=delta(CACHED_TOKENS),
            )
        )
    return shares
